-- Revision 0002 undone: the function definitions of revision 0001.

DROP FUNCTION kvapi_data.write_entry(text, text, jsonb, timestamptz, boolean, boolean, integer);

CREATE OR REPLACE FUNCTION kvapi.kv_cas(p_app_id text, p_key text, p_expected jsonb, p_next jsonb,
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
                                   coalesce(v_row.ephemeral, false), v_row.ephemeral);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION kvapi.kv_decr(p_app_id text, p_key text, p_by bigint DEFAULT 1,
    p_requester jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN kvapi_data.add_to_counter(p_app_id, p_key, -(p_by::numeric), p_requester);

CREATE OR REPLACE FUNCTION kvapi.kv_get(p_app_id text, p_key text, p_touch jsonb DEFAULT NULL,
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
BEGIN
    v_plan := kvapi_data.begin_operation(p_app_id, p_key, p_requester, 'read');

    IF p_touch IS NOT NULL THEN
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
        PERFORM kvapi_data.check_access(p_app_id, p_key, p_requester, 'write');
        PERFORM kvapi_data.lock_key(p_app_id, p_key);
    END IF;

    SELECT * INTO v_row FROM kvapi_data.find_live(p_app_id, p_key, v_now);
    IF NOT FOUND THEN
        RETURN;
    END IF;

    IF p_touch IS NOT NULL AND v_row.expires_at IS NOT NULL THEN
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

CREATE OR REPLACE FUNCTION kvapi.kv_incr(p_app_id text, p_key text, p_by bigint DEFAULT 1,
    p_requester jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN kvapi_data.add_to_counter(p_app_id, p_key, p_by, p_requester);

CREATE OR REPLACE FUNCTION kvapi.kv_mget(p_app_id text, p_keys text[], p_requester jsonb DEFAULT NULL)
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
    FOREACH v_key IN ARRAY p_keys LOOP
        PERFORM kvapi_data.check_key(v_key);
        PERFORM kvapi_data.check_access(p_app_id, v_key, p_requester, 'read');
    END LOOP;
    IF cardinality(p_keys) = 0 THEN
        PERFORM kvapi_data.check_caller(p_app_id);
    END IF;
    PERFORM kvapi_data.check_rate(p_app_id, v_plan.ops_per_second);

    SELECT coalesce(jsonb_agg(f.value ORDER BY k.ordinality), '[]'::jsonb) INTO v_values
    FROM unnest(p_keys) WITH ORDINALITY AS k (key, ordinality)
    LEFT JOIN LATERAL kvapi_data.find_live(p_app_id, k.key, v_now) f ON true;
    RETURN v_values;
END
$$;

CREATE OR REPLACE FUNCTION kvapi.kv_mset(p_app_id text, p_entries jsonb, p_ttl jsonb DEFAULT NULL,
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
    END LOOP;
    PERFORM kvapi_data.check_quota(v_plan, p_app_id, v_now, v_added_keys, v_added_bytes);

    FOR v_index IN 1..cardinality(v_keys) LOOP
        PERFORM kvapi_data.write_entry(p_app_id, v_keys[v_index], p_entries -> v_keys[v_index],
                                       v_expires_at, p_ephemeral, v_live_tiers[v_index]);
    END LOOP;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION kvapi.kv_set(p_app_id text, p_key text, p_value jsonb,
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
                                      p_ephemeral, v_row.ephemeral)::text;
    ttl := kvapi_data.ttl_remaining(v_expires_at, v_now);
END
$$;

CREATE OR REPLACE FUNCTION kvapi_data.add_to_counter(p_app_id text, p_key text, p_delta numeric, p_requester jsonb)
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
                                   coalesce(v_row.ephemeral, false), v_row.ephemeral);
    RETURN v_result::bigint;
END
$$;

CREATE OR REPLACE FUNCTION kvapi_data.begin_operation(p_app_id text, p_key text, p_requester jsonb, p_mode text)
RETURNS kvapi_data.plans
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_plan kvapi_data.plans;
BEGIN
    PERFORM kvapi_data.check_key(p_key);
    v_plan := kvapi_data.app_plan(p_app_id);
    PERFORM kvapi_data.check_access(p_app_id, p_key, p_requester, p_mode);
    PERFORM kvapi_data.check_rate(p_app_id, v_plan.ops_per_second);
    RETURN v_plan;
END
$$;

CREATE OR REPLACE FUNCTION kvapi_data.check_access(p_app_id text, p_key text, p_requester jsonb, p_mode text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_rule kvapi_data.rules;
    v_role text;
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    IF p_requester IS NULL THEN
        RETURN;
    END IF;
    -- The usual requesters pass this test without a function call.
    IF NOT coalesce(p_requester = '{}'::jsonb
                    OR (jsonb_typeof(p_requester -> 'id') = 'string' AND jsonb_typeof(p_requester -> 'role') = 'string'
                        AND p_requester - 'id' - 'role' = '{}'::jsonb AND p_requester ->> 'id' <> ''), false) THEN
        PERFORM kvapi_data.check_requester(p_requester);
    END IF;
    SELECT * INTO v_rule FROM kvapi_data.deciding_rule(p_app_id, p_key);
    v_role := CASE p_mode WHEN 'read' THEN v_rule.read_role ELSE v_rule.write_role END;
    -- The common rules need no regular expression to grant: public, and
    -- authed without a {user.role} segment. rule_grants handles the rest.
    IF v_role = 'public' AND NOT 'role' = ANY (v_rule.placeholder_kinds) THEN
        RETURN;
    END IF;
    IF v_role = 'authed' AND p_requester ? 'id' AND NOT 'role' = ANY (v_rule.placeholder_kinds) THEN
        RETURN;
    END IF;
    IF kvapi_data.rule_grants(v_rule, v_role, p_key, p_requester) THEN
        RETURN;
    END IF;
    -- An unknown app is KVAPP, not KVFOR, for every requester.
    PERFORM kvapi_data.app_plan(p_app_id);
    RAISE EXCEPTION USING ERRCODE = 'KVFOR',
        MESSAGE = format('%s access to key %L denied for %s', p_mode, left(p_key, 64),
                         CASE WHEN p_requester ? 'id' THEN format('user %L', p_requester ->> 'id') ELSE 'anonymous requests' END),
        HINT = CASE WHEN v_rule.pattern IS NULL
                    THEN 'No rule matches this key; open it with expose.'
                    ELSE format('The deciding rule is %L (read: %s, write: %s).', v_rule.pattern, v_rule.read_role, v_rule.write_role) END;
END
$$;

CREATE OR REPLACE FUNCTION kvapi_data.check_caller(p_app_id text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_bound_app text;
BEGIN
    IF pg_has_role(session_user, 'kvapi_api', 'MEMBER')
       OR (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user) THEN
        RETURN;
    END IF;
    SELECT b.app_id INTO v_bound_app FROM kvapi_data.role_bindings b WHERE b.role_name = session_user;
    IF v_bound_app = p_app_id THEN
        RETURN;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'KVFOR',
        MESSAGE = format('database role %I is not bound to app %L', session_user, p_app_id),
        HINT = 'Bind the role with: kvapi apps grant-role APP ROLE';
END
$$;

CREATE OR REPLACE FUNCTION kvapi_data.expiry_after(p_now timestamptz, p_seconds bigint)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE
RETURN p_now + make_interval(secs => p_seconds);

CREATE FUNCTION kvapi_data.write_entry(p_app_id text, p_key text, p_value jsonb,
    p_expires_at timestamptz, p_ephemeral boolean, p_live_ephemeral boolean)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_version bigint := nextval('kvapi_data.version_seq');
    v_size integer := kvapi_data.entry_size(p_key, p_value);
    v_old_size integer;
    v_existed boolean;
BEGIN
    IF p_live_ephemeral IS DISTINCT FROM p_ephemeral AND p_live_ephemeral IS NOT NULL THEN
        PERFORM kvapi_data.delete_entry(p_app_id, p_key, p_live_ephemeral);
    END IF;

    -- The row in the target tier may exist even when the key is absent
    -- (expired, not yet purged). The usage counters count rows, so they
    -- need its size. FOR UPDATE keeps the purge (SKIP LOCKED) away from it.
    IF p_ephemeral THEN
        SELECT t.size_bytes INTO v_old_size FROM kvapi_data.ephemeral_entries t
        WHERE t.app_id = p_app_id AND t.key = p_key FOR UPDATE;
        v_existed := FOUND;
        INSERT INTO kvapi_data.ephemeral_entries AS t (app_id, key, value, version, expires_at, size_bytes)
        VALUES (p_app_id, p_key, p_value, v_version, p_expires_at, v_size)
        ON CONFLICT (app_id, key) DO UPDATE
        SET value = excluded.value, version = excluded.version, expires_at = excluded.expires_at,
            size_bytes = excluded.size_bytes;
    ELSE
        SELECT t.size_bytes INTO v_old_size FROM kvapi_data.entries t
        WHERE t.app_id = p_app_id AND t.key = p_key FOR UPDATE;
        v_existed := FOUND;
        INSERT INTO kvapi_data.entries AS t (app_id, key, value, version, expires_at, size_bytes)
        VALUES (p_app_id, p_key, p_value, v_version, p_expires_at, v_size)
        ON CONFLICT (app_id, key) DO UPDATE
        SET value = excluded.value, version = excluded.version, expires_at = excluded.expires_at,
            size_bytes = excluded.size_bytes;
    END IF;

    PERFORM kvapi_data.add_usage(p_app_id, p_ephemeral, CASE WHEN v_existed THEN 0 ELSE 1 END,
                                 v_size - coalesce(v_old_size, 0));
    RETURN v_version;
END
$$;

DROP FUNCTION kvapi_data.caller_sees_all_apps;

DROP FUNCTION kvapi_data.check_rules;

REVOKE EXECUTE ON FUNCTION kvapi_data.write_entry(text, text, jsonb, timestamptz, boolean, boolean) FROM PUBLIC;
