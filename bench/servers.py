"""Servers that a benchmark run starts on 127.0.0.1 and stops by PID.

PostgreSQL refuses to run as root, so when the benchmark runs as root the
server runs as an unprivileged system user: setpriv drops the privileges
and then execs, so the PID that Popen returns is the postmaster itself.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psycopg

logger = logging.getLogger(__name__)

SERVER_USER = "kvapi-bench"
DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bin_dir() -> Path:
    """Return the PostgreSQL binaries: KVAPI_BENCH_PG_BIN, else Debian's PostgreSQL 15."""
    return Path(os.environ.get("KVAPI_BENCH_PG_BIN", DEFAULT_PG_BIN))


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


def as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    user = _server_user()
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *command]


CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessId:
    """A PID with the process's start time (in clock ticks since boot), so
    that a PID reused by another process is never mistaken for it."""

    pid: int
    start_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 and on of /proc/PID/stat (field n is at index n - 3), or
    None when the process is gone. The command name (field 2) may contain
    spaces and parentheses, so the split starts after its last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_id(pid: int) -> ProcessId | None:
    fields = _stat_fields(pid)
    return ProcessId(pid, int(fields[19])) if fields else None


def is_running(process: ProcessId) -> bool:
    fields = _stat_fields(process.pid)
    return fields is not None and int(fields[19]) == process.start_ticks and fields[0] != "Z"


def descendants(pid: int) -> list[ProcessId]:
    """Find every live descendant of pid through the parent PIDs in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found = []
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop()
        identity = process_id(child)
        if identity:
            found.append(identity)
        pending.extend(children.get(child, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants.

    A descendant that has exited and been reaped is counted through its
    parent's cutime and cstime, so PostgreSQL backends that pgbench opened
    and closed still count."""
    total_ticks = 0
    for member in [pid, *(child.pid for child in descendants(pid))]:
        fields = _stat_fields(member)
        if fields:
            total_ticks += sum(int(value) for value in fields[11:15])
    return total_ticks / CLOCK_TICKS_PER_SECOND


@dataclass
class Server:
    """A started server process and everything it forked."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM
    address: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def descendants(self) -> list[ProcessId]:
        return descendants(self.pid)

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; log tail:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server with its own shutdown signal, then SIGKILL it and
        any descendant left after STOP_TIMEOUT_SECONDS."""
        children = self.descendants()
        if self.popen.poll() is None:
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing PID %d", self.name, STOP_TIMEOUT_SECONDS, self.pid)
                self.popen.kill()
                self.popen.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while any(is_running(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in children:
            if is_running(child):
                logger.warning("%s left PID %d running; killing it", self.name, child.pid)
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def start_process(name: str, command: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                  stop_signal: int = signal.SIGTERM, cwd: Path | None = None) -> Server:
    log_file = open(log_path, "ab")
    try:
        popen = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 stdin=subprocess.DEVNULL)
    finally:
        log_file.close()
    return Server(name, popen, log_path, stop_signal)


def wait_until(server: Server, ready, description: str) -> None:
    """Poll ready() until it returns true; raise if the server exits or
    START_TIMEOUT_SECONDS pass."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        server.check_running()
        try:
            if ready():
                return
        except (OSError, psycopg.OperationalError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.name} did not become ready ({description}) in {START_TIMEOUT_SECONDS:.0f} s; "
                       f"log tail:\n{server.log_tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


class PostgresServer:
    """A PostgreSQL server in its own data folder with durable settings:
    fsync and synchronous_commit on, full-page writes on."""

    def __init__(self, root: Path, *, shared_buffers: str = "128MB", max_connections: int = 200) -> None:
        self.root = root
        self.port = free_port()
        self.data_dir = root / "data"
        self.socket_dir = root / "socket"
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": shared_buffers,
            "max_connections": str(max_connections),
            "logging_collector": "off",
        }
        self.server: Server | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> Server:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            user = _server_user()
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        bin_dir = pg_bin_dir()
        initdb = as_server_user([
            str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C.UTF-8", "--lc-messages=C",
        ])
        result = subprocess.run(initdb, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed with exit code {result.returncode}: {result.stderr}")
        command = as_server_user([str(bin_dir / "postgres"), "-D", str(self.data_dir)]
                                 + [f"-c{name}={value}" for name, value in self.settings.items()])
        # SIGINT is PostgreSQL's fast shutdown: it ends open sessions instead
        # of waiting for them as SIGTERM does.
        self.server = start_process("postgres", command, self.root.parent / "postgres.log", stop_signal=signal.SIGINT)
        self.server.address = f"127.0.0.1:{self.port}"
        wait_until(self.server, lambda: psycopg.connect(self.url(), connect_timeout=2).close() is None, "accepting connections")
        return self.server


def start_kvapi(root: Path, database_url: str, workers: int) -> Server:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url}
    command = [sys.executable, "-m", "kvapi", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    server = start_process("kvapi", command, root / "kvapi.log", env=env, cwd=REPOSITORY_ROOT)
    server.address = f"http://127.0.0.1:{port}"
    wait_until(server, lambda: http_ok(f"{server.address}/health"), "GET /health returns 200")
    return server


def start_baseline(root: Path, workers: int) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "bench.baseline_app", "--port", str(port), "--workers", str(workers)]
    server = start_process("litestar", command, root / "litestar.log", env=env, cwd=REPOSITORY_ROOT)
    server.address = f"http://127.0.0.1:{port}"
    wait_until(server, lambda: http_ok(f"{server.address}/const"), "GET /const returns 200")
    return server


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def start_redis(root: Path) -> Server:
    """Start redis-server without persistence (no RDB snapshots, no AOF), so
    that it measures the in-memory ceiling rather than a durable peer."""
    port = free_port()
    folder = root / "redis"
    folder.mkdir()
    command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
               "--dir", str(folder), "--daemonize", "no", "--protected-mode", "yes"]
    server = start_process("redis", command, root / "redis.log")
    server.address = f"127.0.0.1:{port}"
    wait_until(server, lambda: _redis_ping(port), "PING returns PONG")
    return server


def start_webdis(root: Path, redis_port: int, threads: int) -> Server:
    port = free_port()
    config = {
        "redis_host": "127.0.0.1",
        "redis_port": redis_port,
        "redis_auth": None,
        "http_host": "127.0.0.1",
        "http_port": port,
        "threads": threads,
        "daemonize": False,
        "database": 0,
        "acl": [{"disabled": ["DEBUG", "FLUSHDB", "FLUSHALL", "SHUTDOWN", "CONFIG"]}],
        "verbosity": 1,
        "logfile": str(root / "webdis-own.log"),
    }
    config_path = root / "webdis.json"
    config_path.write_text(json.dumps(config, indent=2))
    server = start_process("webdis", ["webdis", str(config_path)], root / "webdis.log")
    server.address = f"http://127.0.0.1:{port}"
    wait_until(server, lambda: http_ok(f"{server.address}/PING"), "GET /PING returns 200")
    return server
