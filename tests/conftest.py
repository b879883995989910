"""Shared fixtures: one real PostgreSQL server for the session, a migrated
template database cloned for each test, and a real `kvapi serve` process
for HTTP tests.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from kvapi import migrate
from kvapi.api.auth import hash_service_key, new_service_key

sys.path.insert(0, str(Path(__file__).parent))
import pgserver  # noqa: E402

TEMPLATE_DB = "kvapi_template"
_database_numbers = itertools.count()


def database_url(server: pgserver.TestServer, name: str) -> str:
    return server.url(database=name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.TestServer]:
    server = pgserver.start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_url(pg_server: pgserver.TestServer) -> str:
    """A database migrated once, cloned by every test that needs a fresh one."""
    with psycopg.connect(database_url(pg_server, "postgres"), autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    url = database_url(pg_server, TEMPLATE_DB)
    migrate.upgrade(url)
    return url


def create_database(server: pgserver.TestServer, name: str) -> str:
    with psycopg.connect(database_url(server, "postgres"), autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    return database_url(server, name)


def drop_database(server: pgserver.TestServer, name: str) -> None:
    with psycopg.connect(database_url(server, "postgres"), autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(pg_server: pgserver.TestServer, template_url: str) -> Iterator[str]:
    """URL of a fresh, migrated database of this test's own."""
    name = f"kvapi_test_{os.getpid()}_{next(_database_numbers)}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to this test's database, as a superuser."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@dataclass(frozen=True)
class App:
    app_id: str
    service_key: str


def create_app(url: str, app_id: str | None = None) -> App:
    app_id = app_id or f"app_{secrets.token_hex(6)}"
    service_key = new_service_key()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "SELECT kvapi.app_create(%s, %s, %s)", [app_id, hash_service_key(service_key), secrets.token_urlsafe(32)]
        )
    return App(app_id, service_key)


@pytest.fixture
def app(db_url: str) -> App:
    """An app in this test's database."""
    return create_app(db_url, "demo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    database_url: str
    process: subprocess.Popen
    log_path: Path


def start_kvapi_server(database: str, log_path: Path, *, extra_env: dict[str, str] | None = None, args: list[str] | None = None) -> RunningServer:
    """Start `kvapi serve` on a free loopback port and wait for /health."""
    port = free_port()
    env = {**os.environ, "KVAPI_LOG_LEVEL": "INFO", **(extra_env or {})}
    if database:
        env["DATABASE_URL"] = database
    log_file = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "kvapi", "serve", "--host", "127.0.0.1", "--port", str(port), *(args or [])],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kvapi serve exited with {process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return RunningServer(base_url, database, process, log_path)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"kvapi serve did not become healthy: {log_path.read_text()[-3000:]}")


def stop_kvapi_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def http_database(pg_server: pgserver.TestServer, template_url: str) -> str:
    return create_database(pg_server, "kvapi_http")


@pytest.fixture(scope="session")
def http_server(http_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real `kvapi serve` process shared by the HTTP tests. Tests isolate
    themselves by creating apps of their own (see the `http_app` fixture)."""
    log_path = tmp_path_factory.mktemp("http_server") / "serve.log"
    server = start_kvapi_server(http_database, log_path)
    try:
        yield server
    finally:
        stop_kvapi_server(server)


@pytest.fixture
def http_app(http_server: RunningServer) -> App:
    """A fresh app on the shared HTTP server's database."""
    return create_app(http_server.database_url)


@pytest.fixture
def client(http_server: RunningServer, http_app: App) -> Iterator[httpx.Client]:
    """An httpx client for the shared server, authenticated as http_app's service key."""
    with httpx.Client(
        base_url=http_server.base_url,
        headers={"Authorization": f"Bearer {http_app.service_key}"},
        timeout=30,
    ) as http_client:
        yield http_client
