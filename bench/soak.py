"""Soak report: does the durable table stay bounded under touch and incr?

pgbench runs kvapi.kv_get with touch on the loaded k: keys and kvapi.kv_incr
on the c: counters, half and half, for --soak seconds at --soak-clients
clients, with autovacuum at the server's defaults. Every --soak-interval
seconds a second connection samples the partitions of kvapi_data.entries.
From the size functions it reads the total size (indexes and TOAST
included), heap size and primary key and expiry index sizes; from
pg_stat_user_tables the live and dead tuples, updates, HOT updates and
autovacuum runs. The report lists
the samples and compares the last size with the first.

Touch changes expires_at, which the expiry indexes cover, so its updates
can never be HOT. An incr changes only the value and the version, so its update
is HOT when the row's page has room for the new version.
"""

from __future__ import annotations

import argparse
import threading
import time

import psycopg

from bench import drivers, report, workloads
from bench.environment import BenchEnvironment
from bench.report import progress

SAMPLE = """
SELECT sum(pg_total_relation_size(s.relid)), sum(pg_relation_size(s.relid)),
       (SELECT sum(pg_relation_size(x.indexrelid)) FILTER (WHERE x.indisprimary) FROM pg_index x
        JOIN pg_inherits j ON j.inhrelid = x.indrelid WHERE j.inhparent = 'kvapi_data.entries'::regclass),
       (SELECT sum(pg_relation_size(x.indexrelid)) FILTER (WHERE NOT x.indisprimary) FROM pg_index x
        JOIN pg_inherits j ON j.inhrelid = x.indrelid WHERE j.inhparent = 'kvapi_data.entries'::regclass),
       sum(s.n_live_tup), sum(s.n_dead_tup), sum(s.n_tup_upd), sum(s.n_tup_hot_upd), sum(s.autovacuum_count)
FROM pg_stat_user_tables s
JOIN pg_inherits i ON i.inhrelid = s.relid
WHERE i.inhparent = 'kvapi_data.entries'::regclass
"""
COLUMNS = ["seconds", "total_MB", "heap_MB", "pkey_MB", "expiry_MB", "live", "dead", "updates", "HOT %", "autovacuums"]


def touch_script(keys: int) -> str:
    return workloads.KEY_ID.format(keys=keys) + (
        "SELECT value, version, ttl FROM kvapi.kv_get(:app, 'k:' || :id, p_touch => 'true');\n")


def incr_script(aux_keys: int) -> str:
    return workloads.AUX_ID.format(aux=aux_keys) + "SELECT kvapi.kv_incr(:app, 'c:' || :id);\n"


def sample(connection: psycopg.Connection, started: float) -> dict:
    total, heap, pkey, expiry, live, dead, updates, hot, autovacuums = connection.execute(SAMPLE).fetchone()
    return {"seconds": time.monotonic() - started, "total_bytes": int(total), "heap_bytes": int(heap),
            "pkey_bytes": int(pkey), "expiry_index_bytes": int(expiry),
            "live": int(live), "dead": int(dead), "updates": int(updates), "hot_updates": int(hot),
            "autovacuums": int(autovacuums)}


def row_cells(previous: dict | None, current: dict) -> list[str]:
    """Format one table row; the HOT share counts the updates since the previous sample."""
    cells = [f"{current['seconds']:.0f}",
             *[f"{current[name] / 2**20:,.1f}" for name in ("total_bytes", "heap_bytes", "pkey_bytes", "expiry_index_bytes")],
             f"{current['live']:,}", f"{current['dead']:,}"]
    if previous is None:
        return cells + ["-", "-", str(current["autovacuums"])]
    updates = current["updates"] - previous["updates"]
    hot = current["hot_updates"] - previous["hot_updates"]
    return cells + [f"{updates:,}", f"{100 * hot / updates:.0f}" if updates else "-", str(current["autovacuums"])]


def run(environment: BenchEnvironment, args: argparse.Namespace) -> dict:
    seconds, clients, interval = args.soak, args.soak_clients, args.soak_interval
    touch = environment.write_script("soak_touch", touch_script(environment.keys))
    incr = environment.write_script("soak_incr", incr_script(environment.aux_keys))
    measurement: dict[str, drivers.Measurement] = {}

    def load() -> None:
        measurement["result"] = drivers.run_pgbench(
            environment.database_url, touch, clients=clients, duration=seconds, seed=environment.seed,
            variables={"app": workloads.APP_ID}, log_dir=environment.pgbench_logs, extra_files=[incr])

    samples = []
    rows = []
    with psycopg.connect(environment.database_url, autocommit=True) as connection:
        started = time.monotonic()
        samples.append(sample(connection, started))
        rows.append(row_cells(None, samples[-1]))
        progress("soak", rows[-1])
        worker = threading.Thread(target=load, name="soak-pgbench")
        worker.start()
        while worker.is_alive():
            worker.join(timeout=interval)
            # pg_stat_user_tables lags the backends by up to a second.
            samples.append(sample(connection, started))
            rows.append(row_cells(samples[-2], samples[-1]))
            progress("soak", rows[-1])

    result = measurement["result"]
    first, last = samples[0], samples[-1]
    peak = max(item["total_bytes"] for item in samples)
    updates = last["updates"] - first["updates"]
    hot = last["hot_updates"] - first["hot_updates"]
    summary = (
        f"{result.operations:,} operations ({result.ops_per_second:,.0f}/s, {result.errors} errors); "
        f"size {first['total_bytes'] / 2**20:,.1f} MB at the start, {peak / 2**20:,.1f} MB at the peak, "
        f"{last['total_bytes'] / 2**20:,.1f} MB at the end ({last['total_bytes'] / first['total_bytes']:.2f}x); "
        f"HOT updates {100 * hot / updates if updates else 0:.0f}% of {updates:,}; "
        f"{last['autovacuums'] - first['autovacuums']} autovacuum runs"
    )
    text = "\n".join([
        f"Soak: kv_get with touch and kv_incr, half and half, {clients} clients, {seconds:g} s, "
        f"sampled every {interval:g} s (kvapi_data.entries, all partitions)",
        report.format_table(COLUMNS, rows),
        summary,
    ])
    return {"clients": clients, "seconds": seconds, "ops_per_second": result.ops_per_second,
            "operations": result.operations, "errors": result.errors, "samples": samples, "text": text}
