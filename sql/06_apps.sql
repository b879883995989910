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
