"""kvapi's benchmark suite: `python -m bench.run --help`.

Every run starts its own servers on 127.0.0.1 in a temporary folder
(PostgreSQL 15, `kvapi serve`, a constant-JSON Litestar baseline, Redis and
webdis), drives them with pgbench, wrk and redis-benchmark, prints one table,
and stops every process it started.
"""
