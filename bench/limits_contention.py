"""Benchmark the cost of plan limits for many concurrent writers of one app.

Writer threads, each with its own psycopg connection, call kvapi.kv_set on
distinct new keys of one app. One app has limits on: max_keys and
max_total_bytes are set far too high to trigger, and ops_per_second is
NULL. The other has limits off: max_keys, max_total_bytes and
ops_per_second are NULL. Both plans keep max_value_bytes at 1 MiB, because
a plan cannot go without one.
With limits on, every write also sums the app's usage counters and looks
up its expired rows (kvapi_data.check_quota); the usage counters are
updated either way.

The phases alternate (on, off, off, on, ...) so that a slow drift of the
machine or of the growing tables does not favour one side. The script
starts its own PostgreSQL 15 in a temporary folder, with fsync and
synchronous_commit on, and stops it by PID when done.

    python bench/limits_contention.py --seconds 10

It prints the writes per second of each phase, the totals of each side
and their ratio (on / off).
"""

from __future__ import annotations

import argparse
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

from kvapi import migrate  # noqa: E402
from kvapi.api.auth import hash_service_key, new_service_key  # noqa: E402

DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
# PostgreSQL refuses to run as root, so a root run starts it as this system user.
SERVER_USER = "kvapi-bench"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
VALUE_BYTES = 100
MAX_VALUE_BYTES = 1048576
# High enough never to trigger: 10^12 keys and 10^15 bytes.
UNREACHABLE_KEYS = 10**12
UNREACHABLE_BYTES = 10**15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_user() -> pwd.struct_passwd:
    """Return SERVER_USER, creating it as a system user when missing."""
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(SERVER_USER)


def as_server_user(command: list[str]) -> list[str]:
    """Prefix a command so that it runs as SERVER_USER when this script runs as root."""
    if os.geteuid() != 0:
        return command
    user = server_user()
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *command]


class PostgresServer:
    """A PostgreSQL server in a temporary folder on 127.0.0.1, with fsync and
    synchronous_commit on (the defaults a production server runs with)."""

    def __init__(self, root: Path, bin_dir: Path, max_connections: int) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.data_dir = root / "data"
        self.port = free_port()
        self.max_connections = max_connections
        self.process: subprocess.Popen | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        if os.geteuid() == 0:
            user = server_user()
            os.chown(self.root, user.pw_uid, user.pw_gid)
        initdb = as_server_user([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                                 "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"])
        subprocess.run(initdb, check=True, capture_output=True)
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": str(self.max_connections),
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        log = open(self.root / "postgres.log", "ab")
        try:
            self.process = subprocess.Popen(as_server_user(command), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with code {self.process.returncode}: see {self.root}/postgres.log")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections within {START_TIMEOUT_SECONDS:.0f} s")

    def stop(self) -> None:
        """Stop the postmaster with a fast shutdown (SIGINT), by its PID."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def create_app(url: str, app_id: str, plan_id: str, *, max_keys: int | None, max_total_bytes: int | None) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "SELECT kvapi.plan_set(%s, %s, p_max_keys => %s, p_max_total_bytes => %s, p_ops_per_second => NULL)",
            [plan_id, MAX_VALUE_BYTES, max_keys, max_total_bytes],
        )
        connection.execute("SELECT kvapi.app_create(%s, %s, 'unused', %s)",
                           [app_id, hash_service_key(new_service_key()), plan_id])


@dataclass
class Phase:
    name: str
    app_id: str
    writes: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def writes_per_second(self) -> float:
        return self.writes / self.seconds


def run_phase(url: str, phase: Phase, tag: str, writers: int, seconds: float) -> None:
    """Run `writers` threads writing new keys to phase.app_id for `seconds`."""
    value = '"' + "x" * (VALUE_BYTES - 2) + '"'
    ready = threading.Barrier(writers + 1)
    go = threading.Event()
    stop_at = [0.0]
    counts = [0] * writers
    latencies: list[list[float]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            with psycopg.connect(url, autocommit=True) as connection:
                statement = "SELECT version FROM kvapi.kv_set(%s, %s, %s::jsonb)"
                ready.wait(timeout=60)
                go.wait(timeout=60)
                number = 0
                while time.monotonic() < stop_at[0]:
                    began = time.perf_counter()
                    connection.execute(statement, [phase.app_id, f"{tag}:w{index}:{number}", value])
                    latencies[index].append(time.perf_counter() - began)
                    number += 1
                counts[index] = number
        except BaseException as error:
            errors.append(error)
            ready.abort()

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(writers)]
    for thread in threads:
        thread.start()
    ready.wait(timeout=60)
    started = time.monotonic()
    stop_at[0] = started + seconds
    go.set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    phase.seconds += time.monotonic() - started
    phase.writes += sum(counts)
    for own in latencies:
        phase.latencies.extend(own)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured phase, in seconds (default: 10)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="pairs of phases; each pair runs both sides, in alternating order (default: 2)")
    parser.add_argument("--writers", type=int, default=32, help="concurrent writer threads (default: 32)")
    parser.add_argument("--warm-up", type=float, default=3.0, help="unmeasured writes before the first phase, in seconds (default: 3)")
    parser.add_argument("--pg-bin", type=Path, default=Path(os.environ.get("KVAPI_BENCH_PG_BIN", DEFAULT_PG_BIN)),
                        help="folder of the PostgreSQL binaries (default: KVAPI_BENCH_PG_BIN, else /usr/lib/postgresql/15/bin)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="kvapi-limits-bench-"))
    os.chmod(root, 0o755)
    server = PostgresServer(root, args.pg_bin, max_connections=args.writers + 20)
    try:
        server.start()
        with psycopg.connect(server.url(), autocommit=True) as connection:
            connection.execute("CREATE DATABASE kvapi")
        url = server.url("kvapi")
        migrate.upgrade(url)
        create_app(url, "limits_on", "limits_on", max_keys=UNREACHABLE_KEYS, max_total_bytes=UNREACHABLE_BYTES)
        create_app(url, "limits_off", "limits_off", max_keys=None, max_total_bytes=None)
        with psycopg.connect(url, autocommit=True) as connection:
            version = connection.execute("SHOW server_version").fetchone()[0]
            fsync = connection.execute("SHOW fsync").fetchone()[0]
            synchronous_commit = connection.execute("SHOW synchronous_commit").fetchone()[0]

        print(f"PostgreSQL {version} (fsync={fsync}, synchronous_commit={synchronous_commit}), "
              f"{os.cpu_count()} CPUs, {platform.machine()}, load average {os.getloadavg()[0]:.2f} at start")
        print(f"{args.writers} writer threads, kvapi.kv_set of new keys with {VALUE_BYTES}-byte values, "
              f"{args.rounds} rounds of {args.seconds:g} s per side")

        on = Phase("limits on", "limits_on")
        off = Phase("limits off", "limits_off")
        if args.warm_up > 0:
            run_phase(url, Phase("warm-up", "limits_off"), "warm", args.writers, args.warm_up / 2)
            run_phase(url, Phase("warm-up", "limits_on"), "warm", args.writers, args.warm_up / 2)

        for number in range(args.rounds):
            order = (on, off) if number % 2 == 0 else (off, on)
            for phase in order:
                before = phase.writes, phase.seconds
                run_phase(url, phase, f"r{number}", args.writers, args.seconds)
                rate = (phase.writes - before[0]) / (phase.seconds - before[1])
                print(f"  round {number + 1}, {phase.name:10}: {rate:8.0f} writes/s")

        print()
        print(f"{'side':12}{'writes':>10}{'writes/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
        for phase in (on, off):
            print(f"{phase.name:12}{phase.writes:10d}{phase.writes_per_second:10.0f}"
                  f"{percentile(phase.latencies, 0.5) * 1000:9.2f}{percentile(phase.latencies, 0.99) * 1000:9.2f}")
        ratio = on.writes_per_second / off.writes_per_second
        print(f"ratio limits on / limits off: {ratio:.3f} (target: at least 0.8)")
        print(f"load average {os.getloadavg()[0]:.2f} at end")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
