"""What each benchmark case sends to each target, and the data it needs.

Keys: the app `bench` contains durable keys k:1..k:KEYS, ephemeral keys
e:1..e:AUX and counters c:1..c:AUX, where AUX = min(KEYS, MAX_AUX_KEYS).
Every k: and e: key stores VALUE, a JSON string of exactly 100 bytes, with
the default 30-day TTL. The plain tables in schema bench_plain hold the same
rows. Redis stores key:000000000000..key:(KEYS-1), zero-padded as
redis-benchmark's __rand_int__ writes them, with a 100-byte value.

Cases that write keep every value equal to VALUE: set writes VALUE, cas
swaps VALUE for VALUE (so it always succeeds), and setnx targets existing
keys (so it always returns false and writes nothing). Only the counters
change.
"""

from __future__ import annotations

from dataclasses import dataclass

APP_ID = "bench"
VALUE_TEXT = "v" * 98
# JSON text of the stored value: 98 characters plus two quotes, 100 bytes.
VALUE_JSON = f'"{VALUE_TEXT}"'
MAX_AUX_KEYS = 100_000
MGET_KEYS = 100
# Stride between the keys of one mget, so that they spread over the key range.
MGET_STRIDE = 7919
DEFAULT_TTL = "interval '30 days'"

CASES = ["get", "get_guarded", "get_touch", "set_durable", "set_ephemeral", "incr", "setnx", "cas", "mget"]
CASE_TITLES = {
    "get": "get",
    "get_guarded": "get by an end user",
    "get_touch": "get with touch",
    "set_durable": "set durable",
    "set_ephemeral": "set ephemeral",
    "incr": "incr",
    "setnx": "setnx (existing key)",
    "cas": "cas (always swaps)",
    "mget": f"mget of {MGET_KEYS} keys",
}
# Cases that write to PostgreSQL; a CHECKPOINT runs before each of their
# runs so that every run pays the same full-page writes.
WRITE_CASES = {"get_touch", "set_durable", "set_ephemeral", "incr", "setnx", "cas"}

TARGETS = ["plain", "tables", "functions", "http", "litestar", "webdis", "redis"]
TARGET_TITLES = {
    "plain": "raw SQL, plain table",
    "tables": "raw SQL, kvapi tables",
    "functions": "kvapi SQL functions",
    "http": "kvapi HTTP",
    "litestar": "Litestar constant JSON",
    "webdis": "webdis",
    "redis": "Redis",
}
PGBENCH_TARGETS = {"plain", "tables", "functions"}
WRK_TARGETS = {"http", "litestar", "webdis"}


def aux_key_count(keys: int) -> int:
    return min(keys, MAX_AUX_KEYS)


# --- PostgreSQL: schema and data -------------------------------------------

# A copy of kvapi's tables without partitioning: LIKE ... INCLUDING ALL
# copies the columns, defaults, constraints and indexes, so the plain tables
# keep kvapi's shape when it changes. They are filled from kvapi's tables.
PLAIN_SCHEMA = """
CREATE SCHEMA bench_plain;
CREATE SEQUENCE bench_plain.version_seq AS bigint CACHE 1;
CREATE TABLE bench_plain.entries (LIKE kvapi_data.entries INCLUDING ALL);
CREATE UNLOGGED TABLE bench_plain.ephemeral_entries (LIKE kvapi_data.ephemeral_entries INCLUDING ALL);
INSERT INTO bench_plain.entries SELECT * FROM kvapi_data.entries;
INSERT INTO bench_plain.ephemeral_entries SELECT * FROM kvapi_data.ephemeral_entries;
"""

# Rows are inserted straight into kvapi's tables, because loading through
# kvapi.kv_mset costs milliseconds per key (see docs/benchmarks.md), and the
# app's usage counters are raised by the same amounts as kv_mset would.
# Parameters: app id, prefix, value JSON, first, last.
LOAD_ROWS = """
WITH inserted AS (
    INSERT INTO {table} (app_id, key, value, version, expires_at, size_bytes)
    SELECT %(app_id)s, %(prefix)s || i, %(value)s::jsonb, nextval('kvapi_data.version_seq'), {expires_at},
           octet_length(%(prefix)s || i) + octet_length(%(value)s::jsonb::text)
    FROM generate_series(%(first)s::integer, %(last)s::integer) AS i
    RETURNING size_bytes
)
SELECT kvapi_data.add_usage(%(app_id)s, {ephemeral}, count(*)::integer, sum(size_bytes)) FROM inserted
"""
LOAD_BATCH = 1_000_000


def load_statements(keys: int, app_id: str = APP_ID, first: int = 1, *, prefix: str = "k:",
                    with_aux: bool = True, expired: bool = False) -> list[tuple[str, dict]]:
    """Statements and parameters that load prefix||first .. prefix||keys into
    kvapi's tables and, with_aux, the ephemeral keys and the counters. Keys
    get the default TTL, or expired a second ago when `expired` is set."""
    ranges = [(prefix, VALUE_JSON, first, keys, False)]
    if with_aux:
        aux = aux_key_count(keys)
        ranges += [("e:", VALUE_JSON, 1, aux, True), ("c:", "0", 1, aux, False)]
    statements = []
    for key_prefix, value, low, high, ephemeral in ranges:
        table = KVAPI_TABLES.ephemeral if ephemeral else KVAPI_TABLES.durable
        expires_at = "now() - interval '1 second'" if expired else f"now() + {DEFAULT_TTL}"
        statement = LOAD_ROWS.format(table=table, expires_at=expires_at, ephemeral="true" if ephemeral else "false")
        for batch_first in range(low, high + 1, LOAD_BATCH):
            batch_last = min(batch_first + LOAD_BATCH - 1, high)
            statements.append((statement, {"app_id": app_id, "prefix": key_prefix, "value": value,
                                           "first": batch_first, "last": batch_last}))
    return statements


@dataclass(frozen=True)
class TableSet:
    """The durable table, the ephemeral table and the version sequence of one target."""

    durable: str
    ephemeral: str
    sequence: str


PLAIN_TABLES = TableSet("bench_plain.entries", "bench_plain.ephemeral_entries", "bench_plain.version_seq")
KVAPI_TABLES = TableSet("kvapi_data.entries", "kvapi_data.ephemeral_entries", "kvapi_data.version_seq")


# --- pgbench scripts --------------------------------------------------------
# pgbench -M prepared sends :app and :id as parameters of a prepared
# statement, as the HTTP API sends the app id and the key. The app id is
# a parameter (-D app=bench), never a literal, because a literal lets the
# planner prune partitions at plan time, which the API's calls never get.

KEY_ID = "\\set id random(1, {keys})\n"
AUX_ID = "\\set id random(1, {aux})\n"
LIVE = "(expires_at IS NULL OR expires_at > now())"
MGET_KEY_ARRAY = (
    f"ARRAY(SELECT 'k:' || (1 + (:id + i * {MGET_STRIDE}) % {{keys}}) FROM generate_series(0, {MGET_KEYS - 1}) AS i)"
)

# size_bytes is what kvapi stores for each row: octet_length(key) + octet_length(value::text).
def _upsert(table: str, prefix: str, value: str) -> str:
    return (
        f"INSERT INTO {{{table}}} AS t (app_id, key, value, version, expires_at, size_bytes) "
        f"VALUES (:app, '{prefix}' || :id, '{value}', nextval('{{sequence}}'), now() + {DEFAULT_TTL}, "
        f"octet_length('{prefix}' || :id) + {len(value.encode())}) "
    )


RAW_SQL = {
    "get": KEY_ID + f"SELECT value, version, expires_at FROM {{durable}} WHERE app_id = :app AND key = 'k:' || :id AND {LIVE};\n",
    "get_touch": KEY_ID + (
        f"UPDATE {{durable}} SET expires_at = now() + {DEFAULT_TTL} "
        f"WHERE app_id = :app AND key = 'k:' || :id AND {LIVE} RETURNING value, version, expires_at;\n"
    ),
    "set_durable": KEY_ID + _upsert("durable", "k:", VALUE_JSON) + (
        "ON CONFLICT (app_id, key) DO UPDATE SET value = excluded.value, version = excluded.version, "
        "expires_at = excluded.expires_at, size_bytes = excluded.size_bytes RETURNING version;\n"
    ),
    "set_ephemeral": AUX_ID + _upsert("ephemeral", "e:", VALUE_JSON) + (
        "ON CONFLICT (app_id, key) DO UPDATE SET value = excluded.value, version = excluded.version, "
        "expires_at = excluded.expires_at, size_bytes = excluded.size_bytes RETURNING version;\n"
    ),
    "incr": AUX_ID + _upsert("durable", "c:", "1") + (
        "ON CONFLICT (app_id, key) DO UPDATE SET value = to_jsonb((t.value::text)::bigint + 1), "
        "version = excluded.version RETURNING value;\n"
    ),
    "setnx": KEY_ID + _upsert("durable", "k:", VALUE_JSON) + "ON CONFLICT (app_id, key) DO NOTHING;\n",
    "cas": KEY_ID + (
        f"UPDATE {{durable}} SET value = '{VALUE_JSON}', version = nextval('{{sequence}}') "
        f"WHERE app_id = :app AND key = 'k:' || :id AND value = '{VALUE_JSON}' AND {LIVE} RETURNING version;\n"
    ),
    "mget": KEY_ID + (
        "SELECT jsonb_agg(t.value ORDER BY k.ordinality) "
        f"FROM unnest({MGET_KEY_ARRAY}) WITH ORDINALITY AS k (key, ordinality) "
        "LEFT JOIN {durable} t ON t.app_id = :app AND t.key = k.key "
        "AND (t.expires_at IS NULL OR t.expires_at > now());\n"
    ),
}

# get_guarded reads as the end user END_USER, whom READ_RULE (exposed by
# BenchEnvironment.load_postgres) lets read every k: key. The raw SQL
# targets have no access control, so their get_guarded is the plain get.
END_USER = "bench-user"
READ_RULE = ("k:**", "authed", "deny")

FUNCTION_SQL = {
    "get": KEY_ID + "SELECT value, version, ttl FROM kvapi.kv_get(:app, 'k:' || :id);\n",
    "get_guarded": KEY_ID + (
        "SELECT value, version, ttl FROM kvapi.kv_get(:app, 'k:' || :id, "
        f"p_requester => '{{{{\"id\": \"{END_USER}\"}}}}');\n"
    ),
    "get_touch": KEY_ID + "SELECT value, version, ttl FROM kvapi.kv_get(:app, 'k:' || :id, p_touch => 'true');\n",
    "set_durable": KEY_ID + f"SELECT version, ttl FROM kvapi.kv_set(:app, 'k:' || :id, '{VALUE_JSON}');\n",
    "set_ephemeral": AUX_ID + (
        f"SELECT version, ttl FROM kvapi.kv_set(:app, 'e:' || :id, '{VALUE_JSON}', p_ephemeral => true);\n"
    ),
    "incr": AUX_ID + "SELECT kvapi.kv_incr(:app, 'c:' || :id);\n",
    "setnx": KEY_ID + f"SELECT kvapi.kv_setnx(:app, 'k:' || :id, '{VALUE_JSON}');\n",
    "cas": KEY_ID + f"SELECT kvapi.kv_cas(:app, 'k:' || :id, '{VALUE_JSON}', '{VALUE_JSON}');\n",
    "mget": KEY_ID + f"SELECT kvapi.kv_mget(:app, {MGET_KEY_ARRAY});\n",
}


def pgbench_script(target: str, case: str, keys: int) -> str:
    if target == "functions":
        template = FUNCTION_SQL[case]
        tables = KVAPI_TABLES
    else:
        template = RAW_SQL["get" if case == "get_guarded" else case]
        tables = PLAIN_TABLES if target == "plain" else KVAPI_TABLES
    return template.format(durable=tables.durable, ephemeral=tables.ephemeral, sequence=tables.sequence,
                           keys=keys, aux=aux_key_count(keys))


# --- wrk and redis-benchmark ------------------------------------------------

# The case that bench/wrk/requests.lua runs for each HTTP target and case.
WRK_MODES = {
    ("http", "get"): "get",
    ("http", "get_guarded"): "get_guarded",
    ("http", "get_touch"): "get_touch",
    ("http", "set_durable"): "set_durable",
    ("http", "set_ephemeral"): "set_ephemeral",
    ("http", "incr"): "incr",
    ("http", "setnx"): "setnx",
    ("http", "cas"): "cas",
    ("http", "mget"): "mget",
    ("litestar", "get"): "const",
    ("webdis", "get"): "webdis_get",
    ("webdis", "set_durable"): "webdis_set",
}

REDIS_VALUE = "v" * 100
_REDIS_RANDOM_KEY = "key:__rand_int__"
# redis-benchmark arguments for each case: a built-in test (-t) or a command.
REDIS_COMMANDS = {
    "get": ["-t", "get"],
    "get_touch": ["GETEX", _REDIS_RANDOM_KEY, "EX", "2592000"],
    "set_durable": ["-t", "set", "-d", "100"],
    "incr": ["-t", "incr"],
    "setnx": ["SETNX", _REDIS_RANDOM_KEY, REDIS_VALUE],
    "mget": ["MGET", *([_REDIS_RANDOM_KEY] * MGET_KEYS)],
}


def supports(target: str, case: str) -> bool:
    if target in PGBENCH_TARGETS:
        return True
    if target == "redis":
        return case in REDIS_COMMANDS
    return (target, case) in WRK_MODES


def redis_key(number: int) -> str:
    return f"key:{number:012d}"
