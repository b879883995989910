"""Every SQL statement the Python side sends, by name.

Each data statement is one call of a kvapi SQL function, so a request costs
one round trip and the function enforces the whole contract. Arguments are
passed by name, so adding a defaulted parameter to a SQL function does not
shift the others.
"""

AUTHENTICATE = "SELECT kvapi.app_authenticate(%(app_id)s, %(key_hash)s)"

GET = "SELECT value, version, ttl FROM kvapi.kv_get(%(app_id)s, %(key)s, p_touch => %(touch)s::jsonb)"

SET = """
SELECT version, ttl FROM kvapi.kv_set(
    %(app_id)s, %(key)s, %(value)s::jsonb,
    p_ttl => %(ttl)s::jsonb, p_keep_ttl => %(keep_ttl)s, p_ephemeral => %(ephemeral)s,
    p_if_match => %(if_match)s::text[], p_if_absent => %(if_absent)s)
"""

SETEX = """
SELECT version, ttl FROM kvapi.kv_setex(
    %(app_id)s, %(key)s, %(value)s::jsonb, %(ttl)s::jsonb, p_ephemeral => %(ephemeral)s)
"""

SETNX = """
SELECT kvapi.kv_setnx(%(app_id)s, %(key)s, %(value)s::jsonb,
    p_ttl => %(ttl)s::jsonb, p_ephemeral => %(ephemeral)s)
"""

CAS = """
SELECT kvapi.kv_cas(%(app_id)s, %(key)s, %(expected)s::jsonb, %(next)s::jsonb,
    p_ttl => %(ttl)s::jsonb)
"""

INCR = "SELECT kvapi.kv_incr(%(app_id)s, %(key)s, %(by)s::bigint)"

DECR = "SELECT kvapi.kv_decr(%(app_id)s, %(key)s, %(by)s::bigint)"

EXISTS = "SELECT kvapi.kv_exists(%(app_id)s, %(key)s)"

DELETE = "SELECT kvapi.kv_del(%(app_id)s, %(key)s, p_if_match => %(if_match)s::text[])"

EXPIRE = "SELECT kvapi.kv_expire(%(app_id)s, %(key)s, %(ttl)s::jsonb)"

TTL = 'SELECT ttl, "exists" FROM kvapi.kv_ttl(%(app_id)s, %(key)s)'

MGET = "SELECT kvapi.kv_mget(%(app_id)s, %(keys)s::text[])"

MSET = """
SELECT kvapi.kv_mset(%(app_id)s, %(entries)s::jsonb,
    p_ttl => %(ttl)s::jsonb, p_ephemeral => %(ephemeral)s)
"""

LIST = """
SELECT kvapi.kv_list(%(app_id)s, p_prefix => %(prefix)s, p_cursor => %(cursor)s,
    p_limit => %(limit)s::integer)
"""

PURGE_BATCH = "SELECT kvapi.kv_purge_batch(%(batch_size)s)"

CREATE_APP = "SELECT kvapi.app_create(%(app_id)s, %(key_hash)s, %(jwt_secret)s)"

HEALTH = "SELECT 1"
