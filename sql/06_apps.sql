-- Apps (tenants) and their service keys.

-- Create an app with its first service key. The caller generates the key
-- and passes only its SHA-256 digest, so the clear key never reaches the
-- database or its logs. Raises KVINV for an invalid app id and KVEXI when
-- the app already exists.
CREATE FUNCTION kvapi.app_create(p_app_id text, p_service_key_hash bytea, p_jwt_secret text,
    p_plan_id text DEFAULT 'default')
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_app_id IS NULL OR p_app_id !~ '^[A-Za-z0-9_-]{1,64}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid app id %L', left(p_app_id, 100)),
            HINT = 'Use 1 to 64 characters of A-Z, a-z, 0-9, _ and -.';
    END IF;
    INSERT INTO kvapi_data.apps (app_id, plan_id, jwt_secret)
    VALUES (p_app_id, p_plan_id, p_jwt_secret);
    INSERT INTO kvapi_data.service_keys (app_id, key_hash)
    VALUES (p_app_id, p_service_key_hash);
EXCEPTION
    WHEN unique_violation THEN
        RAISE EXCEPTION USING ERRCODE = 'KVEXI',
            MESSAGE = format('app %L already exists', p_app_id),
            HINT = 'Choose another app id.';
    WHEN foreign_key_violation THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('plan %L not found', p_plan_id),
            HINT = 'Use an existing plan, such as default.';
END
$$;

-- Return the id of the service key whose SHA-256 digest is p_key_hash,
-- if it belongs to p_app_id. Raises KVAPP for an unknown app (whatever the
-- key) and KVUNA for a key that is not one of the app's.
CREATE FUNCTION kvapi.app_authenticate(p_app_id text, p_key_hash bytea) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key_id bigint;
BEGIN
    SELECT k.key_id INTO v_key_id
    FROM kvapi_data.service_keys k
    WHERE k.key_hash = p_key_hash AND k.app_id = p_app_id;
    IF FOUND THEN
        RETURN v_key_id;
    END IF;
    PERFORM kvapi_data.app_plan(p_app_id);
    RAISE EXCEPTION USING ERRCODE = 'KVUNA',
        MESSAGE = format('invalid service key for app %L', p_app_id),
        HINT = 'Send Authorization: Bearer <service key> with a key created for this app.';
END
$$;

-- Create or change a plan. A NULL limit means no limit; a NULL default TTL
-- means keys written without a TTL never expire. Running servers apply the
-- change on their next request.
CREATE FUNCTION kvapi.plan_set(p_plan_id text, p_max_value_bytes integer,
    p_default_ttl_seconds integer DEFAULT 2592000, p_max_keys bigint DEFAULT NULL,
    p_max_total_bytes bigint DEFAULT NULL, p_ops_per_second integer DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO kvapi_data.plans AS p (plan_id, default_ttl_seconds, max_value_bytes, max_keys,
                                       max_total_bytes, ops_per_second)
    VALUES (p_plan_id, p_default_ttl_seconds, p_max_value_bytes, p_max_keys, p_max_total_bytes, p_ops_per_second)
    ON CONFLICT (plan_id) DO UPDATE
    SET default_ttl_seconds = excluded.default_ttl_seconds, max_value_bytes = excluded.max_value_bytes,
        max_keys = excluded.max_keys, max_total_bytes = excluded.max_total_bytes,
        ops_per_second = excluded.ops_per_second;
EXCEPTION
    WHEN check_violation OR not_null_violation THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('invalid plan %L: %s', p_plan_id, SQLERRM),
            HINT = 'Plan ids are 1 to 64 characters of A-Z, a-z, 0-9, _ and -; limits are positive; the value size limit is required.';
END
$$;

-- All plans as a JSON array, ordered by id.
CREATE FUNCTION kvapi.plan_list() RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (SELECT coalesce(jsonb_agg(to_jsonb(p) ORDER BY p.plan_id), '[]'::jsonb) FROM kvapi_data.plans p);

-- Move an app to another plan; the next request of the app uses it.
CREATE FUNCTION kvapi.app_set_plan(p_app_id text, p_plan_id text) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kvapi_data.app_plan(p_app_id);
    IF NOT EXISTS (SELECT 1 FROM kvapi_data.plans p WHERE p.plan_id = p_plan_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'KVINV',
            MESSAGE = format('plan %L not found', p_plan_id),
            HINT = 'Create it first with: kvapi plans set NAME ...';
    END IF;
    UPDATE kvapi_data.apps a SET plan_id = p_plan_id WHERE a.app_id = p_app_id;
END
$$;
