"""The servers and data of one benchmark run, and one measured run of a case."""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from pathlib import Path

import jwt
import psycopg

from bench import drivers, servers, workloads
from kvapi import migrate
from kvapi.api.auth import hash_service_key, new_service_key

logger = logging.getLogger(__name__)

DATABASE = "kvapi_bench"
REDIS_LOAD_BATCH = 10_000
BACKEND_EXIT_TIMEOUT_SECONDS = 5.0
# The server that each wrk target sends its requests to.
WRK_SERVERS = {"http": "kvapi", "litestar": "litestar", "webdis": "webdis"}


class BenchEnvironment:
    """PostgreSQL with kvapi migrated and loaded, plus the HTTP servers, Redis
    and webdis that the selected targets need. Use it as a context manager:
    leaving it stops every server it started."""

    def __init__(self, workdir: Path, *, keys: int, workers: int, targets: list[str], shared_buffers: str,
                 seed: int) -> None:
        self.workdir = workdir
        self.keys = keys
        self.aux_keys = workloads.aux_key_count(keys)
        self.workers = workers
        self.targets = targets
        self.seed = seed
        self.postgres = servers.PostgresServer(workdir / "pg", shared_buffers=shared_buffers)
        self.servers: dict[str, servers.Server] = {}
        self.database_url = ""
        self.service_key = new_service_key()
        self.jwt_secret = secrets.token_urlsafe(32)
        # An end-user token for get_guarded, valid for a day.
        self.user_token = jwt.encode(
            {"sub": workloads.END_USER, "exp": int(time.time()) + 86400}, self.jwt_secret, algorithm="HS256"
        )
        self.scripts_dir = workdir / "scripts"
        self.pgbench_logs = workdir / "pgbench_logs"
        self._stack = contextlib.ExitStack()
        self._run_number = 0

    def __enter__(self) -> BenchEnvironment:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _keep(self, server: servers.Server) -> servers.Server:
        self.servers[server.name] = server
        self._stack.callback(server.stop)
        return server

    def _start(self) -> None:
        self.workdir.chmod(0o755)
        self.scripts_dir.mkdir()
        self.pgbench_logs.mkdir()

        started = time.monotonic()
        self._keep(self.postgres.start())
        with psycopg.connect(self.postgres.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {DATABASE}")
        self.database_url = self.postgres.url(DATABASE)
        migrate.upgrade(self.database_url)
        self.load_postgres()
        logger.info("PostgreSQL ready with %d keys in %.1f s", self.keys, time.monotonic() - started)

        if "http" in self.targets:
            self._keep(servers.start_kvapi(self.workdir, self.database_url, self.workers))
        if "litestar" in self.targets:
            self._keep(servers.start_baseline(self.workdir, self.workers))
        if "redis" in self.targets or "webdis" in self.targets:
            self._keep(servers.start_redis(self.workdir))
            self.load_redis(self.redis_port)
            if "webdis" in self.targets:
                self._keep(servers.start_webdis(self.workdir, self.redis_port, self.workers))

    @property
    def redis_port(self) -> int:
        return int(self.servers["redis"].address.rsplit(":", 1)[1])

    # --- data ----------------------------------------------------------------

    def load_postgres(self) -> None:
        """Create the app, load its keys into kvapi's tables, copy them into
        the plain tables, then VACUUM ANALYZE and CHECKPOINT so that every run
        starts from the same state."""
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            connection.execute(
                "SELECT kvapi.app_create(%s, %s, %s)",
                [workloads.APP_ID, hash_service_key(self.service_key), self.jwt_secret],
            )
            connection.execute("SELECT kvapi.kv_expose(%s, %s, %s, %s)", [workloads.APP_ID, *workloads.READ_RULE])
            for statement, parameters in workloads.load_statements(self.keys):
                connection.execute(statement, parameters)
            connection.execute(workloads.PLAIN_SCHEMA)
            connection.execute("VACUUM ANALYZE")
            connection.execute("CHECKPOINT")

    def load_redis(self, port: int) -> None:
        """SET key:000000000000 .. key:(keys-1) to a 100-byte value, pipelined."""
        value = workloads.REDIS_VALUE.encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for first in range(0, self.keys, REDIS_LOAD_BATCH):
                numbers = range(first, min(first + REDIS_LOAD_BATCH, self.keys))
                commands = bytearray()
                for number in numbers:
                    key = workloads.redis_key(number).encode()
                    commands += b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value)
                sock.sendall(commands)
                expected = len(b"+OK\r\n") * len(numbers)
                received = 0
                while received < expected:
                    chunk = sock.recv(expected - received)
                    if not chunk:
                        raise RuntimeError("Redis closed the connection while keys were being loaded")
                    if b"-" in chunk:
                        raise RuntimeError(f"Redis rejected a SET while keys were being loaded: {chunk[:200]!r}")
                    received += len(chunk)

    def execute(self, statement: str) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            connection.execute(statement)

    # --- measurement ---------------------------------------------------------

    def cpu_snapshot(self) -> dict[str, float]:
        return {name: server.cpu_seconds() for name, server in self.servers.items()}

    def _postgres_children(self) -> int:
        return len(self.servers["postgres"].descendants())

    def _wait_for_backends(self, expected: int) -> None:
        """Wait until the backends of a finished pgbench run have exited, so
        that their CPU time is in the postmaster's children time."""
        deadline = time.monotonic() + BACKEND_EXIT_TIMEOUT_SECONDS
        while self._postgres_children() > expected and time.monotonic() < deadline:
            time.sleep(0.05)

    def run(self, target: str, case: str, clients: int, duration: float) -> drivers.Measurement:
        """Measure one case on one target; the CPU time each server used is
        in the result's server_cpu_seconds."""
        self._run_number += 1
        seed = self.seed + self._run_number
        if case in workloads.WRITE_CASES and target in workloads.PGBENCH_TARGETS | {"http"}:
            self.execute("CHECKPOINT")
        if target in workloads.PGBENCH_TARGETS:
            script = self.write_script(f"{target}_{case}", workloads.pgbench_script(target, case, self.keys))
            return self.run_pgbench(script, clients, duration)
        if target == "redis":
            return self._measured(lambda: drivers.run_redis_benchmark(
                self.redis_port, workloads.REDIS_COMMANDS[case], clients=clients, duration=duration, keys=self.keys))
        return self._measured(lambda: drivers.run_wrk(
            self.servers[WRK_SERVERS[target]].address, workloads.WRK_MODES[(target, case)],
            clients=clients, duration=duration, seed=seed, keys=self.keys, aux_keys=self.aux_keys,
            app_id=workloads.APP_ID, service_key=self.service_key, user_token=self.user_token))

    def _measured(self, measure) -> drivers.Measurement:
        before = self.cpu_snapshot()
        measurement = measure()
        after = self.cpu_snapshot()
        measurement.server_cpu_seconds = {name: after[name] - before.get(name, 0.0) for name in after}
        return measurement

    def write_script(self, name: str, text: str) -> Path:
        path = self.scripts_dir / f"{name}.sql"
        path.write_text(text)
        return path

    def run_pgbench(self, script: Path, clients: int, duration: float,
                    extra_env: dict[str, str] | None = None, app_id: str = workloads.APP_ID) -> drivers.Measurement:
        """Run a pgbench script (variable :app is app_id) and measure the CPU time of PostgreSQL."""
        self._run_number += 1
        backends = self._postgres_children()

        def measure() -> drivers.Measurement:
            measurement = drivers.run_pgbench(
                self.database_url, script, clients=clients, duration=duration, seed=self.seed + self._run_number,
                variables={"app": app_id}, log_dir=self.pgbench_logs, extra_env=extra_env)
            self._wait_for_backends(backends)
            return measurement

        return self._measured(measure)
