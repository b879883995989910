"""Large-data report: does kvapi slow down as an app grows?

An app of its own gets --small-keys keys, and kv_get and kv_set are
measured through pgbench. Then the app grows to --large-keys keys and both
are measured again. When the tables are hash-partitioned, the app lands in
another partition than the main benchmark's app. It reports the bytes on
disk per key (pg_total_relation_size of the app's partition, indexes and
TOAST included, divided by its rows) and the time `kvapi purge` takes to
delete --purge-keys expired keys among the live ones at both sizes, and a
tenth of them at the large size. A purge whose cost follows the expired
keys takes the same time at both sizes, and a tenth of it for a tenth.
"""

from __future__ import annotations

import argparse
import re
import time

import psycopg

from bench import report, workloads
from bench.environment import BenchEnvironment
from bench.report import progress
from kvapi import purge
from kvapi.api.auth import hash_service_key, new_service_key

PARTITION_BOUND = re.compile(r"modulus (\d+), remainder (\d+)")


def choose_app_id(connection: psycopg.Connection) -> str:
    """Return an app id whose rows land in another hash partition than the
    main app's, so that the small measurement reads a small index."""
    row = connection.execute(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM kvapi_data.entries d JOIN pg_class c ON c.oid = d.tableoid "
        "WHERE d.app_id = %s LIMIT 1", [workloads.APP_ID]).fetchone()
    bound = PARTITION_BOUND.search(row[0] or "") if row else None
    if bound is None:
        return "large"
    modulus, remainder = int(bound.group(1)), int(bound.group(2))
    for number in range(1000):
        candidate = f"large{number}"
        (same,) = connection.execute(
            "SELECT satisfies_hash_partition('kvapi_data.entries'::regclass, %s, %s, %s::text)",
            [modulus, remainder, candidate]).fetchone()
        if not same:
            return candidate
    raise RuntimeError("no app id found outside the main app's partition")


def load(environment: BenchEnvironment, app_id: str, first: int, last: int, *, prefix: str = "k:", expired: bool = False) -> float:
    started = time.monotonic()
    with psycopg.connect(environment.database_url, autocommit=True) as connection:
        for statement, parameters in workloads.load_statements(last, app_id, first, prefix=prefix, with_aux=False, expired=expired):
            connection.execute(statement, parameters)
        connection.execute("VACUUM ANALYZE kvapi_data.entries")
        connection.execute("CHECKPOINT")
    return time.monotonic() - started


def bytes_per_key(environment: BenchEnvironment, app_id: str) -> dict:
    with psycopg.connect(environment.database_url, autocommit=True) as connection:
        (table,) = connection.execute(
            "SELECT tableoid::regclass::text FROM kvapi_data.entries WHERE app_id = %s LIMIT 1", [app_id]).fetchone()
        total, heap, rows = connection.execute(
            f"SELECT pg_total_relation_size('{table}'), pg_relation_size('{table}'), (SELECT count(*) FROM {table})").fetchone()
    return {"table": table, "total_bytes": total, "heap_bytes": heap, "rows": rows,
            "bytes_per_key": total / rows if rows else None, "heap_bytes_per_key": heap / rows if rows else None}


def timed_purge(environment: BenchEnvironment, app_id: str, expired_keys: int, live_keys: int) -> dict:
    """Add expired_keys keys that have already expired and time the purge
    that deletes them. Run at both sizes, it shows whether the purge's cost
    follows the expired keys or the live ones."""
    load(environment, app_id, 1, expired_keys, prefix="x:", expired=True)
    started = time.monotonic()
    deleted = purge.purge_once(environment.database_url)
    return {"expired_keys": expired_keys, "live_keys": live_keys, "deleted": deleted,
            "seconds": time.monotonic() - started}


def run(environment: BenchEnvironment, args: argparse.Namespace) -> dict:
    clients = args.large_clients
    with psycopg.connect(environment.database_url, autocommit=True) as connection:
        app_id = choose_app_id(connection)
        connection.execute("SELECT kvapi.app_create(%s, %s, %s)", [app_id, hash_service_key(new_service_key()), "unused"])

    data: dict = {"app_id": app_id, "clients": clients, "runs": [], "purges": []}
    rows = []
    loaded = 0
    for keys in (args.small_keys, args.large_keys):
        seconds = load(environment, app_id, loaded + 1, keys)
        data[f"load_seconds_{keys}"] = seconds
        loaded = keys
        for case in ("get", "set_durable"):
            if case in workloads.WRITE_CASES:
                environment.execute("CHECKPOINT")
            script = environment.write_script(f"large_{case}_{keys}", workloads.pgbench_script("functions", case, keys))
            measurement = environment.run_pgbench(script, clients, args.duration, app_id=app_id)
            data["runs"].append({"keys": keys, "case": case, "ops_per_second": measurement.ops_per_second,
                                 "p50_ms": measurement.p50_ms, "p99_ms": measurement.p99_ms, "errors": measurement.errors})
            rows.append([f"{keys:,}", workloads.CASE_TITLES[case], f"{measurement.ops_per_second:,.0f}",
                         report.format_ms(measurement.p50_ms), report.format_ms(measurement.p99_ms), str(measurement.errors)])
            progress("large", rows[-1])
        if keys == args.large_keys:
            data["storage"] = bytes_per_key(environment, app_id)
        purge_sizes = [args.purge_keys, args.purge_keys // 10] if keys == args.large_keys else [args.purge_keys]
        for expired_keys in purge_sizes:
            data["purges"].append(timed_purge(environment, app_id, expired_keys, keys))
            progress("large", [f"{keys:,}", f"purge of {expired_keys:,} expired keys", f"{data['purges'][-1]['seconds']:.2f} s"])

    storage = data["storage"]
    data["text"] = "\n".join([
        f"Large data: app {app_id}, kvapi SQL functions through pgbench, {clients} clients, {args.duration:g} s per run",
        report.format_table(["keys", "case", "ops/s", "p50_ms", "p99_ms", "errors"], rows),
        f"bytes on disk per key ({storage['table']}, 100-byte values, indexes and TOAST included): "
        f"{storage['bytes_per_key']:,.0f} ({storage['total_bytes']:,} bytes / {storage['rows']:,} rows; "
        f"heap alone {storage['heap_bytes_per_key']:,.0f} bytes per key)",
        *[f"purge of {result['expired_keys']:,} expired keys among {result['live_keys']:,} live ones "
          f"(kvapi.purge.purge_once, batches of {purge.BATCH_SIZE}): {result['deleted']:,} deleted in "
          f"{result['seconds']:.2f} s" for result in data["purges"]],
    ])
    return data
