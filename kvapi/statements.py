"""Every SQL statement the Python side sends, by name.

Each data statement is one call of a kvapi SQL function, so a request costs
one round trip and the function enforces the whole contract. Arguments are
passed by name, so adding a defaulted parameter to a SQL function does not
shift the others.
"""

AUTHENTICATE = "SELECT kvapi.app_authenticate(%(app_id)s, %(key_hash)s)"

JWT_KEYS = "SELECT kvapi.app_jwt_keys(%(app_id)s)"

GET = """
SELECT value, version, ttl FROM kvapi.kv_get(%(app_id)s, %(key)s, p_touch => %(touch)s::jsonb,
    p_requester => %(requester)s::jsonb)
"""

SET = """
SELECT version, ttl FROM kvapi.kv_set(
    %(app_id)s, %(key)s, %(value)s::jsonb,
    p_ttl => %(ttl)s::jsonb, p_keep_ttl => %(keep_ttl)s, p_ephemeral => %(ephemeral)s,
    p_if_match => %(if_match)s::text[], p_if_absent => %(if_absent)s,
    p_requester => %(requester)s::jsonb)
"""

SETEX = """
SELECT version, ttl FROM kvapi.kv_setex(
    %(app_id)s, %(key)s, %(value)s::jsonb, %(ttl)s::jsonb, p_ephemeral => %(ephemeral)s,
    p_requester => %(requester)s::jsonb)
"""

SETNX = """
SELECT kvapi.kv_setnx(%(app_id)s, %(key)s, %(value)s::jsonb,
    p_ttl => %(ttl)s::jsonb, p_ephemeral => %(ephemeral)s, p_requester => %(requester)s::jsonb)
"""

CAS = """
SELECT kvapi.kv_cas(%(app_id)s, %(key)s, %(expected)s::jsonb, %(next)s::jsonb,
    p_ttl => %(ttl)s::jsonb, p_requester => %(requester)s::jsonb)
"""

INCR = "SELECT kvapi.kv_incr(%(app_id)s, %(key)s, %(by)s::bigint, p_requester => %(requester)s::jsonb)"

DECR = "SELECT kvapi.kv_decr(%(app_id)s, %(key)s, %(by)s::bigint, p_requester => %(requester)s::jsonb)"

EXISTS = "SELECT kvapi.kv_exists(%(app_id)s, %(key)s, p_requester => %(requester)s::jsonb)"

DELETE = """
SELECT kvapi.kv_del(%(app_id)s, %(key)s, p_if_match => %(if_match)s::text[],
    p_requester => %(requester)s::jsonb)
"""

EXPIRE = "SELECT kvapi.kv_expire(%(app_id)s, %(key)s, %(ttl)s::jsonb, p_requester => %(requester)s::jsonb)"

TTL = 'SELECT ttl, "exists" FROM kvapi.kv_ttl(%(app_id)s, %(key)s, p_requester => %(requester)s::jsonb)'

MGET = "SELECT kvapi.kv_mget(%(app_id)s, %(keys)s::text[], p_requester => %(requester)s::jsonb)"

MSET = """
SELECT kvapi.kv_mset(%(app_id)s, %(entries)s::jsonb,
    p_ttl => %(ttl)s::jsonb, p_ephemeral => %(ephemeral)s, p_requester => %(requester)s::jsonb)
"""

LIST = """
SELECT kvapi.kv_list(%(app_id)s, p_prefix => %(prefix)s, p_cursor => %(cursor)s,
    p_limit => %(limit)s::integer)
"""

EXPOSE = "SELECT kvapi.kv_expose(%(app_id)s, %(pattern)s, %(read)s, %(write)s)"

UNEXPOSE = "SELECT kvapi.kv_unexpose(%(app_id)s, %(pattern)s)"

LIST_RULES = "SELECT kvapi.kv_list_rules(%(app_id)s)"

EXPLAIN = "SELECT kvapi.kv_explain(%(app_id)s, %(key)s, %(user)s::jsonb)"

COUNT_REQUEST = "SELECT kvapi.kv_count_request(%(app_id)s)"

USAGE = "SELECT kvapi.kv_usage(%(app_id)s)"

PURGE_BATCH = "SELECT kvapi.kv_purge_batch(%(batch_size)s)"

ADD_JWT_KEY = "SELECT kvapi.app_add_jwt_key(%(app_id)s, %(algorithm)s, %(public_key)s)"

GRANT_ROLE = "SELECT kvapi.app_grant_role(%(app_id)s, %(role)s)"

SET_PLAN = "SELECT kvapi.app_set_plan(%(app_id)s, %(plan_id)s)"

PLAN_SET = """
SELECT kvapi.plan_set(%(plan_id)s, %(max_value_bytes)s, p_default_ttl_seconds => %(default_ttl_seconds)s,
    p_max_keys => %(max_keys)s, p_max_total_bytes => %(max_total_bytes)s,
    p_ops_per_second => %(ops_per_second)s)
"""

PLAN_LIST = "SELECT kvapi.plan_list()"

CREATE_APP = "SELECT kvapi.app_create(%(app_id)s, %(key_hash)s, %(jwt_secret)s)"

HEALTH = "SELECT 1"
