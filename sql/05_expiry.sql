-- Purging expired rows. Reads already ignore expired rows, so the purge
-- only reclaims space and never changes what an operation returns.

-- Delete up to p_batch_size expired rows from each tier and return how many
-- were deleted. Rows that a writer has locked are skipped (SKIP LOCKED), so
-- the purge never waits on application traffic. The DELETE re-checks the
-- expiry, so a key rewritten after it was picked survives.
CREATE FUNCTION kvapi.kv_purge_batch(p_batch_size integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_shard integer := pg_backend_pid();
    v_durable integer;
    v_ephemeral integer;
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid batch size %s: expected a positive integer', coalesce(p_batch_size::text, 'NULL')),
            HINT = 'Omit the batch size for batches of 1000 rows.';
    END IF;

    -- Deleted rows leave the usage counters in the same statement, added to
    -- this session's shard of each app.
    WITH doomed AS (
        SELECT d.app_id, d.key FROM kvapi_data.entries d
        WHERE d.expires_at <= v_now
        ORDER BY d.expires_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM kvapi_data.entries t USING doomed
        WHERE t.app_id = doomed.app_id AND t.key = doomed.key AND t.expires_at <= v_now
        RETURNING t.app_id, t.size_bytes
    ), per_app AS (
        SELECT deleted.app_id, count(*) AS keys, sum(deleted.size_bytes) AS bytes FROM deleted GROUP BY deleted.app_id
    ), counted AS (
        INSERT INTO kvapi_data.usage_counters AS c (app_id, shard, keys, bytes)
        SELECT per_app.app_id, v_shard, -per_app.keys, -per_app.bytes FROM per_app
        ON CONFLICT (app_id, shard) DO UPDATE SET keys = c.keys + excluded.keys, bytes = c.bytes + excluded.bytes
    )
    SELECT coalesce(sum(per_app.keys), 0) INTO v_durable FROM per_app;

    WITH doomed AS (
        SELECT e.app_id, e.key FROM kvapi_data.ephemeral_entries e
        WHERE e.expires_at <= v_now
        ORDER BY e.expires_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM kvapi_data.ephemeral_entries t USING doomed
        WHERE t.app_id = doomed.app_id AND t.key = doomed.key AND t.expires_at <= v_now
        RETURNING t.app_id, t.size_bytes
    ), per_app AS (
        SELECT deleted.app_id, count(*) AS keys, sum(deleted.size_bytes) AS bytes FROM deleted GROUP BY deleted.app_id
    ), counted AS (
        INSERT INTO kvapi_data.ephemeral_usage_counters AS c (app_id, shard, keys, bytes)
        SELECT per_app.app_id, v_shard, -per_app.keys, -per_app.bytes FROM per_app
        ON CONFLICT (app_id, shard) DO UPDATE SET keys = c.keys + excluded.keys, bytes = c.bytes + excluded.bytes
    )
    SELECT coalesce(sum(per_app.keys), 0) INTO v_ephemeral FROM per_app;

    -- Fold the counter rows of sessions that are not writing now into
    -- shard 0, so the rows do not pile up as sessions come and go.
    PERFORM kvapi_data.compact_usage('kvapi_data.usage_counters');
    PERFORM kvapi_data.compact_usage('kvapi_data.ephemeral_usage_counters');

    -- Rate windows older than the previous second are never read again.
    DELETE FROM kvapi_data.rate_windows w WHERE w.window_start < floor(extract(epoch FROM v_now)) - 2;

    RETURN v_durable + v_ephemeral;
END
$$;

-- Move the rows of p_table (a usage counter table) that no transaction
-- has locked into shard 0. Rows in use are skipped, never waited for. Shard 0
-- rows are written in app order, so two purges cannot deadlock on them.
CREATE FUNCTION kvapi_data.compact_usage(p_table regclass) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    EXECUTE format($sql$
        WITH idle AS (
            SELECT c.app_id, c.shard FROM %1$s c WHERE c.shard <> 0
            LIMIT 10000 FOR UPDATE SKIP LOCKED
        ), moved AS (
            DELETE FROM %1$s c USING idle
            WHERE c.app_id = idle.app_id AND c.shard = idle.shard
            RETURNING c.app_id, c.keys, c.bytes
        )
        INSERT INTO %1$s AS c (app_id, shard, keys, bytes)
        SELECT moved.app_id, 0, sum(moved.keys), sum(moved.bytes) FROM moved
        GROUP BY moved.app_id ORDER BY moved.app_id
        ON CONFLICT (app_id, shard) DO UPDATE SET keys = c.keys + excluded.keys, bytes = c.bytes + excluded.bytes
    $sql$, p_table);
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
