-- Roles and privileges. Only the owner (the role that ran the migrations)
-- may touch kvapi_data. Every other role goes through the SECURITY DEFINER
-- functions in kvapi.
--   kvapi_client: may call the key-value functions. Roles bound to one app
--                 with kvapi.app_grant_role are made members of it.
--   kvapi_api:    the HTTP layer's role, for every app: the key-value
--                 functions plus authentication, rules and purging.
-- Roles are shared by all databases of a server, so they are created only
-- when missing.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kvapi_client') THEN
        CREATE ROLE kvapi_client NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kvapi_api') THEN
        CREATE ROLE kvapi_api NOLOGIN;
    END IF;
END
$$;

-- The owner is trusted for every app (kvapi_data.check_caller tests
-- membership in kvapi_api).
GRANT kvapi_api TO CURRENT_USER;
GRANT kvapi_client TO kvapi_api;

REVOKE ALL ON SCHEMA kvapi_data FROM PUBLIC;
REVOKE ALL ON SCHEMA kvapi FROM PUBLIC;
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA kvapi FROM PUBLIC;
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA kvapi_data FROM PUBLIC;

GRANT USAGE ON SCHEMA kvapi TO kvapi_client;
GRANT EXECUTE ON FUNCTION
    kvapi.kv_get, kvapi.kv_set, kvapi.kv_setex, kvapi.kv_setnx, kvapi.kv_cas,
    kvapi.kv_incr, kvapi.kv_decr, kvapi.kv_exists, kvapi.kv_del, kvapi.kv_expire,
    kvapi.kv_ttl, kvapi.kv_mget, kvapi.kv_mset, kvapi.kv_list, kvapi.kv_usage
    TO kvapi_client;
GRANT EXECUTE ON FUNCTION
    kvapi.app_authenticate, kvapi.app_jwt_keys, kvapi.kv_expose, kvapi.kv_unexpose,
    kvapi.kv_list_rules, kvapi.kv_explain, kvapi.kv_purge_batch, kvapi.kv_count_request
    TO kvapi_api;
