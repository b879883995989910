-- Revision 0003: 4 hash partitions per entries table instead of 16, for the reason in the comment above the partitions below.
-- The rows are copied into new tables; both tables are locked until the
-- migration commits.

-- Move the current tables out of the way and free their index names.
ALTER TABLE kvapi_data.entries RENAME TO entries_old;
ALTER TABLE kvapi_data.ephemeral_entries RENAME TO ephemeral_entries_old;
ALTER TABLE kvapi_data.entries_old DROP CONSTRAINT entries_pkey;
ALTER TABLE kvapi_data.ephemeral_entries_old DROP CONSTRAINT ephemeral_entries_pkey;
DROP INDEX kvapi_data.entries_expires_at_idx, kvapi_data.ephemeral_entries_expires_at_idx,
    kvapi_data.entries_app_expires_at_idx, kvapi_data.ephemeral_entries_app_expires_at_idx;
DO $$
BEGIN
    FOR v_remainder IN 0..15 LOOP
        EXECUTE format('ALTER TABLE kvapi_data.entries_p%s RENAME TO entries_old_p%s',
                       lpad(v_remainder::text, 2, '0'), lpad(v_remainder::text, 2, '0'));
        EXECUTE format('ALTER TABLE kvapi_data.ephemeral_entries_p%s RENAME TO ephemeral_entries_old_p%s',
                       lpad(v_remainder::text, 2, '0'), lpad(v_remainder::text, 2, '0'));
    END LOOP;
END
$$;

CREATE TABLE kvapi_data.entries (
    app_id     text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      jsonb NOT NULL,
    version    bigint NOT NULL,
    -- NULL means the key never expires.
    expires_at timestamptz,
    -- Storage the row counts against the plan: octet_length(key) +
    -- octet_length(value::text).
    size_bytes integer NOT NULL,
    PRIMARY KEY (app_id, key)
) PARTITION BY HASH (app_id);

-- Ephemeral entries have the same shape. The parent stays logged because
-- PostgreSQL 18 rejects an UNLOGGED partitioned table. Its partitions are
-- UNLOGGED, so their rows skip the WAL and are emptied after a crash (but
-- survive a clean shutdown).
CREATE TABLE kvapi_data.ephemeral_entries (
    app_id     text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      jsonb NOT NULL,
    version    bigint NOT NULL,
    expires_at timestamptz,
    size_bytes integer NOT NULL,
    PRIMARY KEY (app_id, key)
) PARTITION BY HASH (app_id);

-- 4 hash partitions each. Inside kvapi's functions every statement runs a
-- generic plan, which on PostgreSQL 15 locks every partition before it
-- prunes them. A backend has 16 fast-path lock slots. Locks beyond them go
-- through the shared lock manager, where concurrent calls contend. With 4
-- partitions a get's statement (apps, plans, both tables and their
-- partitions, the indexes it reads) stays within those slots.
-- docs/benchmarks.md measures 16, 4 and no partitions.
DO $$
BEGIN
    FOR v_remainder IN 0..3 LOOP
        EXECUTE format(
            'CREATE TABLE kvapi_data.entries_p%s PARTITION OF kvapi_data.entries'
            ' FOR VALUES WITH (MODULUS 4, REMAINDER %s)',
            lpad(v_remainder::text, 2, '0'), v_remainder);
        EXECUTE format(
            'CREATE UNLOGGED TABLE kvapi_data.ephemeral_entries_p%s'
            ' PARTITION OF kvapi_data.ephemeral_entries'
            ' FOR VALUES WITH (MODULUS 4, REMAINDER %s)',
            lpad(v_remainder::text, 2, '0'), v_remainder);
    END LOOP;
END
$$;

-- The purge walks these in expiry order, so one pass reads only rows that
-- have expired, however many live keys surround them.
CREATE INDEX entries_expires_at_idx
    ON kvapi_data.entries (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX ephemeral_entries_expires_at_idx
    ON kvapi_data.ephemeral_entries (expires_at) WHERE expires_at IS NOT NULL;

-- Usage of each app finds its expired-but-unpurged rows here, to subtract
-- them: expired keys never count against a limit.
CREATE INDEX entries_app_expires_at_idx
    ON kvapi_data.entries (app_id, expires_at) INCLUDE (size_bytes) WHERE expires_at IS NOT NULL;
CREATE INDEX ephemeral_entries_app_expires_at_idx
    ON kvapi_data.ephemeral_entries (app_id, expires_at) INCLUDE (size_bytes) WHERE expires_at IS NOT NULL;

INSERT INTO kvapi_data.entries SELECT * FROM kvapi_data.entries_old;
INSERT INTO kvapi_data.ephemeral_entries SELECT * FROM kvapi_data.ephemeral_entries_old;
DROP TABLE kvapi_data.entries_old, kvapi_data.ephemeral_entries_old;
