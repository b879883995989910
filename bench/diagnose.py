"""Where a get's time goes: plan cache modes, partition locks, helper costs.

1. Raw get on the plain and the partitioned tables, and kvapi.kv_get, under
   each plan_cache_mode (set through PGOPTIONS for pgbench's sessions).
2. EXPLAIN ANALYZE of the prepared get under a generic and a custom plan,
   and the relation locks one execution takes (fast-path or not).
3. Mean latency at 1 client of each step kv_get makes, one statement each.
4. The floor under kv_get, built in the benchmark's own throwaway
   database: a PL/pgSQL function shaped like kv_get (SECURITY DEFINER,
   pinned search_path, both tiers read in one statement) that does nothing
   else, on kvapi's tables (4 hash partitions each), on copies with 16
   partitions and on plain copies. Next to the raw get on the same tables
   and kv_get, it splits kv_get's cost into the function call, the second
   tier, the partitions and kvapi's own checks.
5. Time per call of each function that get, set durable and incr run,
   from pg_stat_user_functions with track_functions = all (1 client):
   total time includes the functions it calls, self time does not.
"""

from __future__ import annotations

import argparse
import logging

import psycopg

from bench import drivers, report, workloads
from bench.report import progress
from bench.environment import BenchEnvironment

logger = logging.getLogger(__name__)

PLAN_CACHE_MODES = ["auto", "force_custom_plan", "force_generic_plan"]
PREPARED_GET = (
    "PREPARE bench_get(text, text) AS SELECT value, version, expires_at FROM {table} "
    "WHERE app_id = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())"
)
EXECUTE_GET = f"EXECUTE bench_get('{workloads.APP_ID}', 'k:1')"
LOCKS_TAKEN = (
    "SELECT count(*) FILTER (WHERE fastpath), count(*) FILTER (WHERE NOT fastpath) "
    "FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'relation'"
)
KEY = "'k:' || :id"
# Steps of kvapi.kv_get, each run alone. Internal helpers change with the
# product; a step whose call fails is reported with its error.
STEPS = [
    ("round trip: SELECT 1", "SELECT 1;"),
    ("raw get, plain table", None),
    ("raw get, kvapi tables", None),
    ("kvapi_data.check_key", f"SELECT kvapi_data.check_key({KEY});"),
    ("kvapi_data.app_plan", "SELECT kvapi_data.app_plan(:app);"),
    ("kvapi_data.check_caller", "SELECT kvapi_data.check_caller(:app);"),
    ("kvapi_data.caller_sees_all_apps", "SELECT kvapi_data.caller_sees_all_apps();"),
    ("kvapi_data.begin_operation", f"SELECT kvapi_data.begin_operation(:app, {KEY}, NULL, 'read');"),
    ("kvapi_data.find_live", f"SELECT * FROM kvapi_data.find_live(:app, {KEY}, now());"),
    ("find_live's query, inline", None),
    ("kvapi.kv_get", f"SELECT * FROM kvapi.kv_get(:app, {KEY});"),
]
FIND_LIVE_QUERY = (
    "SELECT d.value, d.version, d.expires_at, false FROM kvapi_data.entries d "
    f"WHERE d.app_id = :app AND d.key = {KEY} AND (d.expires_at IS NULL OR d.expires_at > now()) "
    "UNION ALL SELECT e.value, e.version, e.expires_at, true FROM kvapi_data.ephemeral_entries e "
    f"WHERE e.app_id = :app AND e.key = {KEY} AND (e.expires_at IS NULL OR e.expires_at > now()) LIMIT 1;"
)
# Table layouts of the floor experiment: schema and partitions per table
# (0 for plain tables). kvapi_data is kvapi's own layout, bench_plain the
# benchmark's plain copy, and bench_p16 a copy with 16 partitions, kvapi's
# layout before revision 0003.
FLOOR_LAYOUTS = [("kvapi_data", 4), ("bench_p16", 16), ("bench_plain", 0)]
PARTITIONED_COPY = """
CREATE SCHEMA bench_p16;
CREATE TABLE bench_p16.entries (LIKE kvapi_data.entries INCLUDING ALL) PARTITION BY HASH (app_id);
CREATE TABLE bench_p16.ephemeral_entries (LIKE kvapi_data.ephemeral_entries INCLUDING ALL) PARTITION BY HASH (app_id);
"""
PARTITIONED_COPY_TABLES = """
SELECT format('CREATE TABLE bench_p16.entries_p%s PARTITION OF bench_p16.entries FOR VALUES WITH (MODULUS 16, REMAINDER %s)', r, r),
       format('CREATE UNLOGGED TABLE bench_p16.ephemeral_entries_p%s PARTITION OF bench_p16.ephemeral_entries '
              'FOR VALUES WITH (MODULUS 16, REMAINDER %s)', r, r)
FROM generate_series(0, 15) AS r
"""
# kv_get's shape without its checks: one statement over both tiers.
FLOOR_FUNCTION = """
CREATE FUNCTION bench_floor.get_{schema}(p_app_id text, p_key text, OUT value jsonb, OUT version text, OUT ttl bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row record;
BEGIN
    SELECT d.value, d.version, d.expires_at INTO v_row FROM {schema}.entries d
    WHERE d.app_id = p_app_id AND d.key = p_key AND (d.expires_at IS NULL OR d.expires_at > statement_timestamp())
    UNION ALL
    SELECT e.value, e.version, e.expires_at FROM {schema}.ephemeral_entries e
    WHERE e.app_id = p_app_id AND e.key = p_key AND (e.expires_at IS NULL OR e.expires_at > statement_timestamp())
    LIMIT 1;
    value := v_row.value;
    version := v_row.version::text;
    ttl := ceil(extract(epoch FROM v_row.expires_at - statement_timestamp()))::bigint;
END
$$
"""


def run(environment: BenchEnvironment, args: argparse.Namespace) -> dict:
    duration = args.duration
    clients_list = sorted({1, max(args.clients)})
    result: dict = {}
    sections = []

    result["plan_cache_modes"], text = plan_cache_modes(environment, clients_list, duration)
    sections.append(text)
    result["explain"], text = explain_and_locks(environment)
    sections.append(text)
    result["steps"], text = step_costs(environment, max(1.0, duration / 2))
    sections.append(text)
    result["floor"], text = floor_under_kv_get(environment, clients_list, duration)
    sections.append(text)
    result["function_times"], text = function_times(environment, duration)
    sections.append(text)
    result["text"] = "Diagnosis\n\n" + "\n\n".join(sections)
    return result


def _row(label: str, clients: int, measurement: drivers.Measurement) -> list[str]:
    pg_seconds = measurement.server_cpu_seconds.get("postgres", 0.0)
    per_op = pg_seconds * 1e6 / measurement.operations if measurement.operations else None
    return [label, str(clients), f"{measurement.ops_per_second:,.0f}", report.format_ms(measurement.mean_ms),
            report.format_ms(measurement.p99_ms), report.format_number(per_op), str(measurement.errors)]


MEASUREMENT_HEADER = ["script", "clients", "ops/s", "mean_ms", "p99_ms", "pg_cpu_us/op", "errors"]


def plan_cache_modes(environment: BenchEnvironment, clients_list: list[int], duration: float) -> tuple[list, str]:
    scripts = {
        "raw get, plain table": workloads.pgbench_script("plain", "get", environment.keys),
        "raw get, kvapi tables": workloads.pgbench_script("tables", "get", environment.keys),
        "kvapi.kv_get": workloads.pgbench_script("functions", "get", environment.keys),
    }
    data, rows = [], []
    for label, text in scripts.items():
        script = environment.write_script(f"diagnose_{label.replace(' ', '_').replace(',', '')}", text)
        for mode in PLAN_CACHE_MODES:
            for clients in clients_list:
                measurement = environment.run_pgbench(script, clients, duration,
                                                      extra_env={"PGOPTIONS": f"-c plan_cache_mode={mode}"})
                data.append({"script": label, "plan_cache_mode": mode, "clients": clients, "ops_per_second": measurement.ops_per_second,
                             "mean_ms": measurement.mean_ms, "p99_ms": measurement.p99_ms,
                             "pg_cpu_seconds": measurement.server_cpu_seconds.get("postgres"), "operations": measurement.operations,
                             "errors": measurement.errors})
                rows.append(_row(f"{label}, {mode}", clients, measurement))
                progress("diagnose", rows[-1])
    return data, "plan_cache_mode (pgbench -M prepared, app id and key as parameters)\n" + report.format_table(MEASUREMENT_HEADER, rows)


def explain_and_locks(environment: BenchEnvironment) -> tuple[dict, str]:
    data: dict = {}
    lines = ["EXPLAIN ANALYZE of the prepared get (first key), and the relation locks one execution holds"]
    with psycopg.connect(environment.database_url, autocommit=True) as connection:
        for table in (workloads.PLAIN_TABLES.durable, workloads.KVAPI_TABLES.durable):
            connection.execute("DEALLOCATE ALL")
            connection.execute(PREPARED_GET.format(table=table))
            for mode in ("force_generic_plan", "force_custom_plan"):
                connection.execute(f"SET plan_cache_mode = {mode}")
                plan = "\n".join(row[0] for row in connection.execute(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {EXECUTE_GET}"))
                with connection.transaction():
                    connection.execute(EXECUTE_GET).fetchall()
                    fast, slow = connection.execute(LOCKS_TAKEN).fetchone()
                data[f"{table} {mode}"] = {"plan": plan, "fastpath_locks": fast, "lock_manager_locks": slow}
                lines.append(f"\n-- {table}, plan_cache_mode = {mode}: {fast} fast-path relation locks, "
                             f"{slow} in the shared lock manager\n{plan}")
        # Generic plans are what a function's statements settle on after
        # five calls in a session. The first call plans them, and planning
        # opens every partition and index, so only the second call's locks
        # are those of a call in the steady state.
        connection.execute("SET plan_cache_mode = force_generic_plan")
        connection.execute("SELECT * FROM kvapi.kv_get(%s::text, 'k:1')", [workloads.APP_ID]).fetchall()
        with connection.transaction():
            connection.execute("SELECT * FROM kvapi.kv_get(%s::text, 'k:1')", [workloads.APP_ID]).fetchall()
            fast, slow = connection.execute(LOCKS_TAKEN).fetchone()
        connection.execute("RESET plan_cache_mode")
        data["kvapi.kv_get"] = {"fastpath_locks": fast, "lock_manager_locks": slow}
        lines.append(f"\n-- SELECT * FROM kvapi.kv_get('bench', 'k:1'), second call, generic plans: {fast} fast-path "
                     f"relation locks, {slow} in the shared lock manager")
    return data, "\n".join(lines)


def step_costs(environment: BenchEnvironment, duration: float) -> tuple[list, str]:
    texts = {
        "raw get, plain table": workloads.pgbench_script("plain", "get", environment.keys),
        "raw get, kvapi tables": workloads.pgbench_script("tables", "get", environment.keys),
        "find_live's query, inline": workloads.KEY_ID.format(keys=environment.keys) + FIND_LIVE_QUERY + "\n",
    }
    data, rows = [], []
    for index, (label, statement) in enumerate(STEPS):
        text = texts.get(label) or workloads.KEY_ID.format(keys=environment.keys) + statement + "\n"
        script = environment.write_script(f"diagnose_step_{index}", text)
        measurement = environment.run_pgbench(script, 1, duration)
        data.append({"step": label, "mean_ms": measurement.mean_ms, "ops_per_second": measurement.ops_per_second,
                     "errors": measurement.errors, "error_detail": measurement.error_detail})
        rows.append(_row(label, 1, measurement))
        progress("diagnose", rows[-1])
    return data, ("Cost of each step of kv_get alone (1 client; each includes one round trip, see SELECT 1)\n"
                  + report.format_table(MEASUREMENT_HEADER, rows))


def floor_under_kv_get(environment: BenchEnvironment, clients_list: list[int], duration: float) -> tuple[list, str]:
    with psycopg.connect(environment.database_url, autocommit=True) as connection:
        connection.execute(PARTITIONED_COPY)
        for (create_durable, create_ephemeral) in connection.execute(PARTITIONED_COPY_TABLES).fetchall():
            connection.execute(create_durable)
            connection.execute(create_ephemeral)
        connection.execute("INSERT INTO bench_p16.entries SELECT * FROM kvapi_data.entries")
        connection.execute("INSERT INTO bench_p16.ephemeral_entries SELECT * FROM kvapi_data.ephemeral_entries")
        connection.execute("ANALYZE bench_p16.entries")
        connection.execute("ANALYZE bench_p16.ephemeral_entries")
        connection.execute("CREATE SCHEMA bench_floor")
        for schema, _ in FLOOR_LAYOUTS:
            connection.execute(FLOOR_FUNCTION.format(schema=schema))

    key_id = workloads.KEY_ID.format(keys=environment.keys)
    scripts = []
    for schema, partitions in FLOOR_LAYOUTS:
        layout = f"{partitions} partitions" if partitions else "plain tables"
        raw = (f"SELECT value, version, expires_at FROM {schema}.entries WHERE app_id = :app AND key = 'k:' || :id "
               f"AND {workloads.LIVE};\n")
        scripts.append((f"raw get, {layout}", key_id + raw))
        scripts.append((f"PL/pgSQL floor, both tiers, {layout}",
                        key_id + f"SELECT value, version, ttl FROM bench_floor.get_{schema}(:app, 'k:' || :id);\n"))
    scripts.append(("kvapi.kv_get, 4 partitions", workloads.pgbench_script("functions", "get", environment.keys)))

    data, rows = [], []
    for index, (label, text) in enumerate(scripts):
        script = environment.write_script(f"diagnose_floor_{index}", text)
        for clients in clients_list:
            measurement = environment.run_pgbench(script, clients, duration)
            data.append({"script": label, "clients": clients, "ops_per_second": measurement.ops_per_second,
                         "mean_ms": measurement.mean_ms, "p99_ms": measurement.p99_ms,
                         "pg_cpu_seconds": measurement.server_cpu_seconds.get("postgres"),
                         "operations": measurement.operations, "errors": measurement.errors,
                         "error_detail": measurement.error_detail})
            rows.append(_row(label, clients, measurement))
            progress("diagnose", rows[-1])
    return data, ("The floor under kv_get: raw get and a PL/pgSQL function shaped like kv_get without its checks, "
                  "by table layout\n" + report.format_table(MEASUREMENT_HEADER, rows))


FUNCTION_TIMES = """
SELECT schemaname || '.' || funcname, calls, total_time * 1000 / calls, self_time * 1000 / calls
FROM pg_stat_user_functions WHERE calls > 0 ORDER BY total_time DESC
"""


def function_times(environment: BenchEnvironment, duration: float) -> tuple[list, str]:
    data, rows = [], []
    for case in ("get", "set_durable", "incr"):
        environment.execute("SELECT pg_stat_reset()")
        script = environment.write_script(f"diagnose_times_{case}", workloads.pgbench_script("functions", case, environment.keys))
        environment.run_pgbench(script, 1, duration, extra_env={"PGOPTIONS": "-c track_functions=all"})
        with psycopg.connect(environment.database_url, autocommit=True) as connection:
            # The backends report their counters when they exit; wait for them.
            connection.execute("SELECT pg_stat_clear_snapshot()")
            functions = connection.execute(FUNCTION_TIMES).fetchall()
        for name, calls, total_us, self_us in functions:
            data.append({"case": case, "function": name, "calls": calls, "total_us": total_us, "self_us": self_us})
            rows.append([workloads.CASE_TITLES[case], name, f"{calls:,}", f"{total_us:,.1f}", f"{self_us:,.1f}"])
            progress("diagnose", rows[-1])
    return data, ("Time per call of each function (pg_stat_user_functions, track_functions = all, 1 client; "
                  "total includes the functions called, self does not)\n"
                  + report.format_table(["case", "function", "calls", "total_us", "self_us"], rows))
