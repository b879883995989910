-- Purging expired rows. Reads already ignore expired rows, so the purge
-- only reclaims space and never changes what an operation returns.

-- Delete up to p_batch_size expired rows from each tier and return how many
-- were deleted. Rows that a writer has locked are skipped (SKIP LOCKED), so
-- the purge never waits on application traffic; the DELETE re-checks the
-- expiry, so a key rewritten after it was picked survives.
CREATE FUNCTION kvapi.kv_purge_batch(p_batch_size integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_durable integer;
    v_ephemeral integer;
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid batch size %s: expected a positive integer', coalesce(p_batch_size::text, 'NULL'));
    END IF;

    WITH doomed AS (
        SELECT d.app_id, d.key FROM kvapi_data.entries d
        WHERE d.expires_at <= v_now
        ORDER BY d.expires_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM kvapi_data.entries t USING doomed
    WHERE t.app_id = doomed.app_id AND t.key = doomed.key AND t.expires_at <= v_now;
    GET DIAGNOSTICS v_durable = ROW_COUNT;

    WITH doomed AS (
        SELECT e.app_id, e.key FROM kvapi_data.ephemeral_entries e
        WHERE e.expires_at <= v_now
        ORDER BY e.expires_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM kvapi_data.ephemeral_entries t USING doomed
    WHERE t.app_id = doomed.app_id AND t.key = doomed.key AND t.expires_at <= v_now;
    GET DIAGNOSTICS v_ephemeral = ROW_COUNT;

    RETURN v_durable + v_ephemeral;
END
$$;

-- Purge in batches, committing after each so that no lock is held for
-- long, until a batch comes back short or p_max_batches have run. This is
-- what the pg_cron job calls; it must be CALLed outside a transaction block.
-- It has no pinned search_path because PostgreSQL forbids COMMIT in a
-- procedure with a SET clause; every name in it is schema-qualified.
CREATE PROCEDURE kvapi.kv_purge(p_batch_size integer DEFAULT 1000, p_max_batches integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
    v_deleted integer;
BEGIN
    FOR v_batch IN 1..p_max_batches LOOP
        v_deleted := kvapi.kv_purge_batch(p_batch_size);
        COMMIT;
        EXIT WHEN v_deleted < p_batch_size;
    END LOOP;
END
$$;
