-- Public key-value operations. Each function is one atomic operation of the
-- kvapi contract and may run inside the caller's own transaction: a rollback
-- undoes its writes.
--
-- Common contract:
-- * p_app_id names the tenant; an unknown app raises KVAPP.
-- * Keys are 1 to 1024 UTF-8 bytes, or KVINV is raised.
-- * p_requester is NULL for trusted callers (service keys, bound database
--   roles), '{}' for anonymous end users and {"id", "role"?} for signed-in
--   ones; KVFOR is raised unless a rule allows the request, and also when
--   the database role may not touch the app (see 07_access.sql).
-- * Every call counts against the plan's operations per second and raises
--   KVRAT, changing nothing, when over it. Writes that would grow usage
--   past the plan raise KVKEY or KVFUL; deletes, expire and reads never do.
-- * An expired key is absent for every operation, whether or not the purge
--   has removed its row yet. Time is statement_timestamp().
-- * TTL arguments are jsonb so that SQL NULL (argument omitted) and JSON
--   null (never expires) mean different things; see kvapi_data.ttl_seconds.
-- * Versions are returned as text and are opaque to callers.
-- * Writers of a key serialise on kvapi_data.lock_key until the end of the
--   transaction; reads take no locks.
-- * The functions are SECURITY DEFINER so that roles bound to an app can
--   call them without any privilege on the tables.

-- Run the checks every operation on one key starts with, in this order:
-- key, app, caller, access for p_mode ('read' or 'write'), rate. Return the
-- plan. The common case (valid key, trusted caller, no rate limit) costs
-- one statement: the helpers that raise run only when a check fails or
-- needs more than the plan row.
CREATE FUNCTION kvapi_data.begin_operation(p_app_id text, p_key text, p_requester jsonb, p_mode text)
RETURNS kvapi_data.plans
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_plan kvapi_data.plans;
    v_app record;
BEGIN
    IF p_key IS NULL OR octet_length(p_key) NOT BETWEEN 1 AND 1024 THEN
        PERFORM kvapi_data.check_key(p_key);
    END IF;
    SELECT p AS plan, kvapi_data.caller_sees_all_apps() AS caller_ok INTO v_app
    FROM kvapi_data.apps a
    JOIN kvapi_data.plans p ON p.plan_id = a.plan_id
    WHERE a.app_id = p_app_id;
    IF NOT FOUND THEN
        PERFORM kvapi_data.app_plan(p_app_id);
    END IF;
    v_plan := v_app.plan;
    IF NOT v_app.caller_ok THEN
        PERFORM kvapi_data.check_caller(p_app_id);
    END IF;
    IF p_requester IS NOT NULL THEN
        PERFORM kvapi_data.check_rules(p_app_id, p_key, p_requester, p_mode);
    END IF;
    IF v_plan.ops_per_second IS NOT NULL THEN
        PERFORM kvapi_data.check_rate(p_app_id, v_plan.ops_per_second);
    END IF;
    RETURN v_plan;
END
$$;

-- Raise KVVER unless the precondition of an If-Match header is met: the key
-- is live and its version is in p_if_match, or p_if_match contains '*'.
CREATE FUNCTION kvapi_data.check_if_match(p_key text, p_if_match text[], p_found boolean, p_version bigint)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_if_match IS NULL
       OR (p_found AND (p_version::text = ANY (p_if_match) OR '*' = ANY (p_if_match))) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'KVVER',
        MESSAGE = format('version precondition failed for key %L: current version is %s',
                         left(p_key, 64), CASE WHEN p_found THEN p_version::text ELSE 'none (key absent)' END),
        HINT = 'Read the key again and retry with its current version.';
END
$$;

-- Read a key. Without p_touch the row is only read. With p_touch true (the
-- plan's default TTL) or a TTL in seconds, an expiring key gets that TTL
-- from now, and a key without expiry keeps none. Touching changes the expiry,
-- so it needs write access too, but it keeps the version. A missing key
-- returns NULL in every column.
CREATE FUNCTION kvapi.kv_get(p_app_id text, p_key text, p_touch jsonb DEFAULT NULL,
    p_requester jsonb DEFAULT NULL,
    OUT value jsonb, OUT version text, OUT ttl bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_row record;
    v_seconds bigint;
    v_ops_per_second integer;
    v_caller_ok boolean;
    v_version bigint;
    v_expires_at timestamptz;
BEGIN
    IF p_touch IS NULL THEN
        -- The hottest path: one statement reads the plan, the caller's scope
        -- and the row. The row is read before the access and rate checks,
        -- which is safe because nothing returns until they pass.
        IF p_key IS NULL OR octet_length(p_key) NOT BETWEEN 1 AND 1024 THEN
            PERFORM kvapi_data.check_key(p_key);
        END IF;
        SELECT p.ops_per_second, kvapi_data.caller_sees_all_apps(), f.value, f.version, f.expires_at
        INTO v_ops_per_second, v_caller_ok, value, v_version, v_expires_at
        FROM kvapi_data.apps a
        JOIN kvapi_data.plans p ON p.plan_id = a.plan_id
        LEFT JOIN kvapi_data.find_live(p_app_id, p_key, v_now) f ON true
        WHERE a.app_id = p_app_id;
        IF NOT FOUND THEN
            PERFORM kvapi_data.app_plan(p_app_id);
        END IF;
        IF NOT v_caller_ok THEN
            PERFORM kvapi_data.check_caller(p_app_id);
        END IF;
        IF p_requester IS NOT NULL THEN
            PERFORM kvapi_data.check_rules(p_app_id, p_key, p_requester, 'read');
        END IF;
        IF v_ops_per_second IS NOT NULL THEN
            PERFORM kvapi_data.check_rate(p_app_id, v_ops_per_second);
        END IF;
        version := v_version::text;
        ttl := kvapi_data.ttl_remaining(v_expires_at, v_now);
        RETURN;
    END IF;

    v_plan := kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'read');
    IF jsonb_typeof(p_touch) = 'boolean' AND p_touch = 'true' THEN
        v_seconds := v_plan.default_ttl_seconds;
    ELSE
        v_seconds := kvapi_data.ttl_seconds(p_touch, 'touch');
        IF v_seconds IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'KVINV',
                MESSAGE = 'invalid touch null: expected true or a whole number of seconds',
                HINT = 'Send touch=true for the default TTL or touch=N for N seconds.';
        END IF;
    END IF;
    IF p_requester IS NOT NULL THEN
        PERFORM kvapi_data.check_rules(p_app_id, p_key, p_requester, 'write');
    END IF;
    PERFORM kvapi_data.lock_key(p_app_id, p_key);

    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    IF NOT FOUND THEN
        RETURN;
    END IF;

    IF v_row.expires_at IS NOT NULL THEN
        v_row.expires_at := kvapi_data.expiry_after(v_now, v_seconds);
        IF v_row.ephemeral THEN
            UPDATE kvapi_data.ephemeral_entries t SET expires_at = v_row.expires_at
            WHERE t.app_id = p_app_id AND t.key = p_key;
        ELSE
            UPDATE kvapi_data.entries t SET expires_at = v_row.expires_at
            WHERE t.app_id = p_app_id AND t.key = p_key;
        END IF;
    END IF;

    value := v_row.value;
    version := v_row.version::text;
    ttl := kvapi_data.ttl_remaining(v_row.expires_at, v_now);
END
$$;

-- Write a key, replacing its value, TTL and tier, and return the new
-- version and TTL. p_ttl omitted (SQL NULL) gives the plan's default TTL,
-- never the old one. p_keep_ttl keeps the live key's expiry (a new key gets
-- the default) and cannot be combined with p_ttl.
-- Preconditions, for HTTP If-Match / If-None-Match: p_if_match passes when
-- the key is live and its version is in the array, or the array holds '*';
-- p_if_absent passes when the key is absent. A failed one raises KVVER and
-- writes nothing. Also raises KVINV (bad arguments) and KVBIG.
CREATE FUNCTION kvapi.kv_set(p_app_id text, p_key text, p_value jsonb,
    p_ttl jsonb DEFAULT NULL, p_keep_ttl boolean DEFAULT false,
    p_ephemeral boolean DEFAULT false,
    p_if_match text[] DEFAULT NULL, p_if_absent boolean DEFAULT false,
    p_requester jsonb DEFAULT NULL,
    OUT version text, OUT ttl bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_row record;
    v_found boolean;
    v_expires_at timestamptz;
    v_size integer;
BEGIN
    v_plan := kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'write');
    PERFORM kvapi_data.check_value(p_value, p_key, v_plan);
    IF p_keep_ttl AND p_ttl IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid request for key %L: keepTtl and ttl cannot be combined', left(p_key, 64)),
            HINT = 'Send either ttl or keepTtl: true, not both.';
    END IF;
    IF p_if_match IS NOT NULL AND p_if_absent THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid request for key %L: If-Match and If-None-Match cannot be combined', left(p_key, 64)),
            HINT = 'Send one precondition per request.';
    END IF;

    IF p_ttl IS NULL THEN
        v_expires_at := kvapi_data.expiry_after(v_now, v_plan.default_ttl_seconds);
    ELSE
        v_expires_at := kvapi_data.expiry_after(v_now, kvapi_data.ttl_seconds(p_ttl));
    END IF;

    PERFORM kvapi_data.lock_key(p_app_id, p_key);
    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    v_found := FOUND;

    PERFORM kvapi_data.check_if_match(p_key, p_if_match, v_found, v_row.version);
    IF p_if_absent AND v_found THEN
        RAISE EXCEPTION USING ERRCODE = 'KVVER',
            MESSAGE = format('key %L already exists', left(p_key, 64)),
            HINT = 'Drop If-None-Match: * to overwrite the key.';
    END IF;
    IF p_keep_ttl AND v_found THEN
        v_expires_at := v_row.expires_at;
    END IF;

    v_size := kvapi_data.entry_size(p_key, p_value);
    PERFORM kvapi_data.check_quota(v_plan, p_app_id, v_now, CASE WHEN v_found THEN 0 ELSE 1 END,
                                   v_size - coalesce(v_row.size_bytes, 0));
    version := kvapi_data.write_entry(p_app_id, p_key, p_value, v_expires_at,
                                      p_ephemeral, v_row.ephemeral, v_row.size_bytes)::text;
    ttl := kvapi_data.ttl_remaining(v_expires_at, v_now);
END
$$;

-- Write a key with a required TTL (JSON null or SQL NULL raises KVINV).
CREATE FUNCTION kvapi.kv_setex(p_app_id text, p_key text, p_value jsonb, p_ttl jsonb,
    p_ephemeral boolean DEFAULT false, p_requester jsonb DEFAULT NULL,
    OUT version text, OUT ttl bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_ttl IS NULL OR jsonb_typeof(p_ttl) = 'null' THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid ttl for setex on key %L: setex requires a TTL', left(p_key, 64)),
            HINT = 'Send ttl as a whole number of seconds, or use set for a key without expiry.';
    END IF;
    SELECT s.version, s.ttl INTO version, ttl
    FROM kvapi.kv_set(p_app_id, p_key, p_value, p_ttl => p_ttl, p_ephemeral => p_ephemeral,
                      p_requester => p_requester) s;
END
$$;

-- Write a key only when it is absent (or expired); return whether it was
-- written. Of concurrent callers on one key exactly one gets true.
CREATE FUNCTION kvapi.kv_setnx(p_app_id text, p_key text, p_value jsonb,
    p_ttl jsonb DEFAULT NULL, p_ephemeral boolean DEFAULT false, p_requester jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_seconds bigint;
BEGIN
    v_plan := kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'write');
    PERFORM kvapi_data.check_value(p_value, p_key, v_plan);
    IF p_ttl IS NULL THEN
        v_seconds := v_plan.default_ttl_seconds;
    ELSE
        v_seconds := kvapi_data.ttl_seconds(p_ttl);
    END IF;

    PERFORM kvapi_data.lock_key(p_app_id, p_key);
    PERFORM FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    IF FOUND THEN
        RETURN false;
    END IF;
    PERFORM kvapi_data.check_quota(v_plan, p_app_id, v_now, 1, kvapi_data.entry_size(p_key, p_value));
    PERFORM kvapi_data.write_entry(p_app_id, p_key, p_value,
                                   kvapi_data.expiry_after(v_now, v_seconds), p_ephemeral, NULL);
    RETURN true;
END
$$;

-- Compare-and-swap. The swap happens when the live value equals p_expected
-- by JSON equality (jsonb: key order and 1 vs 1.0 do not matter), or when
-- p_expected is NULL or JSON null and the key is absent. p_next NULL or JSON
-- null deletes the key on a match. The key keeps its TTL and tier unless
-- p_ttl is given; a key created by the swap gets the default TTL and the
-- durable tier. Returns whether the swap happened.
CREATE FUNCTION kvapi.kv_cas(p_app_id text, p_key text, p_expected jsonb, p_next jsonb,
    p_ttl jsonb DEFAULT NULL, p_requester jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_row record;
    v_found boolean;
    v_expect_absent boolean := p_expected IS NULL OR jsonb_typeof(p_expected) = 'null';
    v_delete boolean := p_next IS NULL OR jsonb_typeof(p_next) = 'null';
    v_expires_at timestamptz;
BEGIN
    v_plan := kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'write');
    IF NOT v_delete THEN
        PERFORM kvapi_data.check_value(p_next, p_key, v_plan);
    END IF;
    IF p_ttl IS NOT NULL THEN
        v_expires_at := kvapi_data.expiry_after(v_now, kvapi_data.ttl_seconds(p_ttl));
    END IF;

    PERFORM kvapi_data.lock_key(p_app_id, p_key);
    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    v_found := FOUND;

    IF v_expect_absent THEN
        IF v_found THEN
            RETURN false;
        END IF;
    ELSIF NOT v_found OR v_row.value <> p_expected THEN
        RETURN false;
    END IF;

    IF v_delete THEN
        IF v_found THEN
            PERFORM kvapi_data.delete_entry(p_app_id, p_key, v_row.ephemeral);
        END IF;
        RETURN true;
    END IF;

    IF p_ttl IS NULL THEN
        IF v_found THEN
            v_expires_at := v_row.expires_at;
        ELSE
            v_expires_at := kvapi_data.expiry_after(v_now, v_plan.default_ttl_seconds);
        END IF;
    END IF;
    PERFORM kvapi_data.check_quota(v_plan, p_app_id, v_now, CASE WHEN v_found THEN 0 ELSE 1 END,
                                   kvapi_data.entry_size(p_key, p_next) - coalesce(v_row.size_bytes, 0));
    PERFORM kvapi_data.write_entry(p_app_id, p_key, p_next, v_expires_at,
                                   coalesce(v_row.ephemeral, false), v_row.ephemeral, v_row.size_bytes);
    RETURN true;
END
$$;

-- Add p_delta to an integer counter and return the new value, for kv_incr
-- and kv_decr. numeric, because decrementing by -2^63 adds 2^63.
CREATE FUNCTION kvapi_data.add_to_counter(p_app_id text, p_key text, p_delta numeric, p_requester jsonb)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_row record;
    v_found boolean;
    v_text text;
    v_result numeric;
    v_expires_at timestamptz;
BEGIN
    v_plan := kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'write');
    IF p_delta IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid by NULL for key %L', left(p_key, 64)),
            HINT = 'Send by as a JSON integer, or omit it to add 1.';
    END IF;

    PERFORM kvapi_data.lock_key(p_app_id, p_key);
    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    v_found := FOUND;

    IF v_found THEN
        v_text := v_row.value::text;
        IF jsonb_typeof(v_row.value) <> 'number' OR v_text !~ '^-?[0-9]+$' THEN
            RAISE EXCEPTION USING ERRCODE = 'KVNAC',
                MESSAGE = format('value of key %L is not an integer counter: %s', left(p_key, 64), left(v_text, 100)),
                HINT = 'Set the key to a JSON integer, or delete it, before incrementing.';
        END IF;
        v_result := v_text::numeric + p_delta;
        v_expires_at := v_row.expires_at;
    ELSE
        v_result := p_delta;
        v_expires_at := kvapi_data.expiry_after(v_now, v_plan.default_ttl_seconds);
    END IF;

    IF v_result NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVOVF',
            MESSAGE = format('adding %s to key %L overflows a signed 64-bit integer', p_delta, left(p_key, 64)),
            HINT = 'Counters hold values from -9223372036854775808 to 9223372036854775807.';
    END IF;

    -- A counter's text grows with its value, so it can cross the value limit.
    PERFORM kvapi_data.check_value(to_jsonb(v_result), p_key, v_plan);
    PERFORM kvapi_data.check_quota(v_plan, p_app_id, v_now, CASE WHEN v_found THEN 0 ELSE 1 END,
                                   kvapi_data.entry_size(p_key, to_jsonb(v_result)) - coalesce(v_row.size_bytes, 0));
    PERFORM kvapi_data.write_entry(p_app_id, p_key, to_jsonb(v_result), v_expires_at,
                                   coalesce(v_row.ephemeral, false), v_row.ephemeral, v_row.size_bytes);
    RETURN v_result::bigint;
END
$$;

-- Add p_by to an integer counter and return the new value. A missing key
-- starts at 0 with the default TTL in the durable tier; a live key keeps its
-- TTL and tier. Raises KVNAC when the stored value is not a JSON integer
-- (1.0, 2.5, "3" and true are not) and KVOVF when the result leaves the
-- signed 64-bit range. In both cases the value is unchanged.
CREATE FUNCTION kvapi.kv_incr(p_app_id text, p_key text, p_by bigint DEFAULT 1,
    p_requester jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- PL/pgSQL, not SQL: a SECURITY DEFINER SQL function is never inlined,
    -- and PostgreSQL 15 plans its body again on every call.
    RETURN kvapi_data.add_to_counter(p_app_id, p_key, p_by, p_requester);
END
$$;

-- Subtract p_by from an integer counter; see kv_incr.
CREATE FUNCTION kvapi.kv_decr(p_app_id text, p_key text, p_by bigint DEFAULT 1,
    p_requester jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN kvapi_data.add_to_counter(p_app_id, p_key, -(p_by::numeric), p_requester);
END
$$;

-- Whether a live key exists.
CREATE FUNCTION kvapi.kv_exists(p_app_id text, p_key text, p_requester jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'read');
    PERFORM FROM kvapi_data.find_live(p_app_id, p_key, statement_timestamp());
    RETURN FOUND;
END
$$;

-- Delete a key and return whether a live key was deleted. p_if_match works
-- as in kv_set (KVVER when the key is absent or at another version).
CREATE FUNCTION kvapi.kv_del(p_app_id text, p_key text, p_if_match text[] DEFAULT NULL,
    p_requester jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row record;
    v_found boolean;
BEGIN
    PERFORM kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'write');
    PERFORM kvapi_data.lock_key(p_app_id, p_key);
    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, statement_timestamp());
    v_found := FOUND;

    PERFORM kvapi_data.check_if_match(p_key, p_if_match, v_found, v_row.version);
    IF NOT v_found THEN
        RETURN false;
    END IF;
    RETURN kvapi_data.delete_entry(p_app_id, p_key, v_row.ephemeral);
END
$$;

-- Set or remove a live key's TTL: p_ttl seconds from now, or JSON null for
-- no expiry (SQL NULL raises KVINV). Gives the key a new version. Returns
-- false when the key is absent.
CREATE FUNCTION kvapi.kv_expire(p_app_id text, p_key text, p_ttl jsonb, p_requester jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_row record;
    v_expires_at timestamptz;
BEGIN
    PERFORM kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'write');
    IF p_ttl IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid ttl for expire on key %L: the ttl is missing', left(p_key, 64)),
            HINT = 'Send ttl as a whole number of seconds, or null to remove the expiry.';
    END IF;
    v_expires_at := kvapi_data.expiry_after(v_now, kvapi_data.ttl_seconds(p_ttl));

    PERFORM kvapi_data.lock_key(p_app_id, p_key);
    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM kvapi_data.set_expiry(p_app_id, p_key, v_row.ephemeral, v_expires_at);
    RETURN true;
END
$$;

-- Remaining TTL in seconds (rounded up) and whether the key exists; ttl is
-- NULL for a key without expiry and for a missing key.
CREATE FUNCTION kvapi.kv_ttl(p_app_id text, p_key text, p_requester jsonb DEFAULT NULL,
    OUT ttl bigint, OUT "exists" boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_row record;
BEGIN
    PERFORM kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'read');
    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    "exists" := FOUND;
    IF FOUND THEN
        ttl := kvapi_data.ttl_remaining(v_row.expires_at, v_now);
    END IF;
END
$$;

-- Values of up to 1000 keys as a JSON array in the order asked, with null
-- for each missing key. A key the requester may not read denies the whole
-- request. Counts as one operation against the rate limit.
CREATE FUNCTION kvapi.kv_mget(p_app_id text, p_keys text[], p_requester jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_key text;
    v_values jsonb;
BEGIN
    IF p_keys IS NULL OR cardinality(p_keys) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid keys: mget takes 0 to 1000 keys, got %s', coalesce(cardinality(p_keys)::text, 'NULL')),
            HINT = 'Split the request into batches of at most 1000 keys.';
    END IF;
    v_plan := kvapi_data.app_plan(p_app_id);
    IF p_requester IS NULL THEN
        -- A trusted caller needs one caller check, not one per key. The
        -- first key is checked before it, as in the loop below.
        IF cardinality(p_keys) > 0 THEN
            PERFORM kvapi_data.check_key(p_keys[1]);
        END IF;
        PERFORM kvapi_data.check_caller(p_app_id);
        FOREACH v_key IN ARRAY p_keys LOOP
            IF v_key IS NULL OR octet_length(v_key) NOT BETWEEN 1 AND 1024 THEN
                PERFORM kvapi_data.check_key(v_key);
            END IF;
        END LOOP;
    ELSE
        FOREACH v_key IN ARRAY p_keys LOOP
            PERFORM kvapi_data.check_key(v_key);
            PERFORM kvapi_data.check_access(p_app_id, v_key, p_requester, 'read');
        END LOOP;
        IF cardinality(p_keys) = 0 THEN
            PERFORM kvapi_data.check_caller(p_app_id);
        END IF;
    END IF;
    IF v_plan.ops_per_second IS NOT NULL THEN
        PERFORM kvapi_data.check_rate(p_app_id, v_plan.ops_per_second);
    END IF;

    SELECT coalesce(jsonb_agg(f.value ORDER BY k.ordinality), '[]'::jsonb) INTO v_values
    FROM unnest(p_keys) WITH ORDINALITY AS k (key, ordinality)
    LEFT JOIN LATERAL kvapi_data.find_live(p_app_id, k.key, v_now) f ON true;
    RETURN v_values;
END
$$;

-- Write up to 1000 keys from a JSON object {key: value}, all or nothing,
-- each with p_ttl (or the default TTL) in the p_ephemeral tier. Returns the
-- number of keys written. The quota is checked once for the whole batch.
-- Keys are locked in byte order so that concurrent kv_mset calls cannot
-- deadlock.
CREATE FUNCTION kvapi.kv_mset(p_app_id text, p_entries jsonb, p_ttl jsonb DEFAULT NULL,
    p_ephemeral boolean DEFAULT false, p_requester jsonb DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_expires_at timestamptz;
    v_entry record;
    v_live record;
    v_keys text[] := '{}';
    v_live_tiers boolean[] := '{}';
    v_live_sizes integer[] := '{}';
    v_added_keys integer := 0;
    v_added_bytes bigint := 0;
    v_count integer;
BEGIN
    IF jsonb_typeof(p_entries) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid entries: expected a JSON object of key/value pairs, got %s',
                             coalesce(jsonb_typeof(p_entries), 'NULL')),
            HINT = 'Send entries as {"key": value, ...}.';
    END IF;
    v_count := (SELECT count(*) FROM jsonb_object_keys(p_entries));
    IF v_count > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid entries: mset takes 0 to 1000 entries, got %s', v_count),
            HINT = 'Split the request into batches of at most 1000 entries.';
    END IF;
    v_plan := kvapi_data.app_plan(p_app_id);
    IF p_ttl IS NULL THEN
        v_expires_at := kvapi_data.expiry_after(v_now, v_plan.default_ttl_seconds);
    ELSE
        v_expires_at := kvapi_data.expiry_after(v_now, kvapi_data.ttl_seconds(p_ttl));
    END IF;
    FOR v_entry IN SELECT e.key, e.value FROM jsonb_each(p_entries) e LOOP
        PERFORM kvapi_data.check_key(v_entry.key);
        PERFORM kvapi_data.check_access(p_app_id, v_entry.key, p_requester, 'write');
        PERFORM kvapi_data.check_value(v_entry.value, v_entry.key, v_plan);
    END LOOP;
    IF v_count = 0 THEN
        PERFORM kvapi_data.check_caller(p_app_id);
    END IF;
    PERFORM kvapi_data.check_rate(p_app_id, v_plan.ops_per_second);

    -- First pass: lock every key and measure how usage would change.
    FOR v_entry IN
        SELECT e.key COLLATE "C" AS key, e.value FROM jsonb_each(p_entries) e ORDER BY 1
    LOOP
        PERFORM kvapi_data.lock_key(p_app_id, v_entry.key);
        SELECT * INTO v_live FROM kvapi_data.find_live(p_app_id, v_entry.key, v_now);
        IF NOT FOUND THEN
            v_added_keys := v_added_keys + 1;
        END IF;
        v_added_bytes := v_added_bytes + kvapi_data.entry_size(v_entry.key, v_entry.value)
                         - coalesce(v_live.size_bytes, 0);
        v_keys := v_keys || v_entry.key;
        v_live_tiers := v_live_tiers || v_live.ephemeral;
        v_live_sizes := v_live_sizes || v_live.size_bytes;
    END LOOP;
    PERFORM kvapi_data.check_quota(v_plan, p_app_id, v_now, v_added_keys, v_added_bytes);

    FOR v_index IN 1..cardinality(v_keys) LOOP
        PERFORM kvapi_data.write_entry(p_app_id, v_keys[v_index], p_entries -> v_keys[v_index],
                                       v_expires_at, p_ephemeral, v_live_tiers[v_index], v_live_sizes[v_index]);
    END LOOP;
    RETURN v_count;
END
$$;

-- One page of live keys in byte order, as
-- {"keys": [{"key", "ttl", "ephemeral"}], "cursor": next page or null}.
-- The tier is listed so that exports can restore it.
-- Paging is by key, so a key present for the whole listing appears exactly
-- once. p_limit is 1 to 1000. For trusted callers only (no p_requester).
CREATE FUNCTION kvapi.kv_list(p_app_id text, p_prefix text DEFAULT '',
    p_cursor text DEFAULT NULL, p_limit integer DEFAULT 100)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := statement_timestamp();
    v_plan kvapi_data.plans;
    v_prefix text := coalesce(p_prefix, '');
    v_upper text := kvapi_data.prefix_upper_bound(coalesce(p_prefix, ''));
    v_after text;
    v_keys jsonb;
    v_count integer;
    v_last text;
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid limit %s: expected 1 to 1000', coalesce(p_limit::text, 'NULL')),
            HINT = 'Omit limit for pages of 100 keys.';
    END IF;
    IF octet_length(v_prefix) > 1024 THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid prefix %L...: the prefix is %s UTF-8 bytes long', left(v_prefix, 64), octet_length(v_prefix)),
            HINT = 'Keys are at most 1024 bytes, so use a shorter prefix.';
    END IF;
    v_plan := kvapi_data.app_plan(p_app_id);
    PERFORM kvapi_data.check_caller(p_app_id);
    PERFORM kvapi_data.check_rate(p_app_id, v_plan.ops_per_second);
    IF p_cursor IS NOT NULL THEN
        v_after := kvapi_data.decode_cursor(p_cursor);
    END IF;
    IF v_after IS NULL OR v_after COLLATE "C" < v_prefix THEN
        -- Start at the prefix itself; '' sorts first and the prefix may be a key.
        v_after := NULL;
    END IF;

    WITH page AS (
        SELECT u.key, u.expires_at, u.ephemeral
        FROM (
            (SELECT d.key, d.expires_at, false AS ephemeral FROM kvapi_data.entries d
             WHERE d.app_id = p_app_id AND d.key >= v_prefix
               AND (v_upper IS NULL OR d.key < v_upper)
               AND (v_after IS NULL OR d.key > v_after)
               AND (d.expires_at IS NULL OR d.expires_at > v_now)
             ORDER BY d.key LIMIT p_limit + 1)
            UNION ALL
            (SELECT e.key, e.expires_at, true AS ephemeral FROM kvapi_data.ephemeral_entries e
             WHERE e.app_id = p_app_id AND e.key >= v_prefix
               AND (v_upper IS NULL OR e.key < v_upper)
               AND (v_after IS NULL OR e.key > v_after)
               AND (e.expires_at IS NULL OR e.expires_at > v_now)
             ORDER BY e.key LIMIT p_limit + 1)
        ) u
        ORDER BY u.key
        LIMIT p_limit + 1
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('key', n.key, 'ttl', kvapi_data.ttl_remaining(n.expires_at, v_now),
                                                 'ephemeral', n.ephemeral)
                              ORDER BY n.key) FILTER (WHERE n.rank <= p_limit), '[]'::jsonb),
           count(*),
           max(n.key) FILTER (WHERE n.rank = p_limit)
    INTO v_keys, v_count, v_last
    FROM (SELECT page.*, row_number() OVER (ORDER BY page.key) AS rank FROM page) n;

    RETURN jsonb_build_object(
        'keys', v_keys,
        'cursor', CASE WHEN v_count > p_limit THEN kvapi_data.encode_cursor(v_last) END);
END
$$;

-- Live keys and bytes of an app and its plan's limits, as
-- {"keys", "bytes", "plan": {...}}.
CREATE FUNCTION kvapi.kv_usage(p_app_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_plan kvapi_data.plans;
    v_usage record;
BEGIN
    v_plan := kvapi_data.app_plan(p_app_id);
    PERFORM kvapi_data.check_caller(p_app_id);
    SELECT * INTO v_usage FROM kvapi_data.live_usage(p_app_id, statement_timestamp());
    RETURN jsonb_build_object(
        'keys', v_usage.keys,
        'bytes', v_usage.bytes,
        'plan', jsonb_build_object(
            'plan_id', v_plan.plan_id,
            'ops_per_second', v_plan.ops_per_second,
            'max_value_bytes', v_plan.max_value_bytes,
            'max_keys', v_plan.max_keys,
            'max_total_bytes', v_plan.max_total_bytes,
            'default_ttl_seconds', v_plan.default_ttl_seconds));
END
$$;
