-- kvapi schema: tenants (apps), their plans and credentials, and the entries.
--
-- Schema kvapi contains the public functions that apps and database users
-- call. Schema kvapi_data contains the tables and internal helpers, which
-- only kvapi's own functions use.

CREATE SCHEMA kvapi_data;
CREATE SCHEMA kvapi;

-- Plans are data: an operator changes a row and every server applies the
-- change on its next request. NULL in a limit column means "no limit".
CREATE TABLE kvapi_data.plans (
    plan_id             text PRIMARY KEY
                        CHECK (plan_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    -- TTL given to keys written without one; NULL means such keys never expire.
    default_ttl_seconds integer
                        CHECK (default_ttl_seconds BETWEEN 1 AND 2147483647),
    -- Size of the value's JSON text as stored, octet_length(value::text).
    max_value_bytes     integer NOT NULL CHECK (max_value_bytes > 0),
    max_keys            bigint CHECK (max_keys > 0),
    max_total_bytes     bigint CHECK (max_total_bytes > 0),
    ops_per_second      integer CHECK (ops_per_second > 0)
);

INSERT INTO kvapi_data.plans (plan_id, default_ttl_seconds, max_value_bytes)
VALUES ('default', 30 * 86400, 1048576);

CREATE TABLE kvapi_data.apps (
    app_id     text PRIMARY KEY CHECK (app_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    plan_id    text NOT NULL DEFAULT 'default' REFERENCES kvapi_data.plans,
    -- HS256 secret for end-user tokens. It is stored in clear text because
    -- verifying an HMAC needs the secret itself, unlike service keys.
    jwt_secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Service keys are stored as SHA-256 digests only. The keys are 256-bit
-- random tokens, so a fast hash is enough: there is nothing to brute-force.
CREATE TABLE kvapi_data.service_keys (
    key_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app_id     text NOT NULL REFERENCES kvapi_data.apps ON DELETE CASCADE,
    key_hash   bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX service_keys_app_id_idx ON kvapi_data.service_keys (app_id);

-- Every successful write takes the next value, so a version never repeats
-- for a key, not even after delete and re-create or a crash (a logged
-- sequence never goes backwards after recovery).
CREATE SEQUENCE kvapi_data.version_seq AS bigint CACHE 1;

-- Durable entries. Keys use the "C" collation so that they compare byte for
-- byte and list in UTF-8 byte order.
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

-- Rows and bytes stored per app, including expired rows the purge has not
-- removed yet. Each database session adds its changes to a row of its own
-- (shard = pg_backend_pid(), unique among live sessions), so writers never
-- wait on each other's counter rows and cannot deadlock on them. A reader
-- sums the rows. The purge folds rows of finished transactions into shard 0.
-- Counters of the ephemeral tier are UNLOGGED, so a crash empties them
-- together with the rows they count.
CREATE TABLE kvapi_data.usage_counters (
    app_id text NOT NULL,
    shard  integer NOT NULL,
    keys   bigint NOT NULL,
    bytes  bigint NOT NULL,
    PRIMARY KEY (app_id, shard)
);

CREATE UNLOGGED TABLE kvapi_data.ephemeral_usage_counters (
    app_id text NOT NULL,
    shard  integer NOT NULL,
    keys   bigint NOT NULL,
    bytes  bigint NOT NULL,
    PRIMARY KEY (app_id, shard)
);

-- Requests per app, second and session, like the usage counters, for the
-- sliding-window rate limit. A crash loses at most two seconds of this
-- history, so they are UNLOGGED.
CREATE UNLOGGED TABLE kvapi_data.rate_windows (
    app_id       text NOT NULL,
    window_start bigint NOT NULL,
    shard        integer NOT NULL,
    requests     integer NOT NULL,
    PRIMARY KEY (app_id, window_start, shard)
);
