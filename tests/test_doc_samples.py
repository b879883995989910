"""The code samples of docs/access.md and docs/limits.md run as written.

curl samples run with bash against a real `kvapi serve`, with KVAPI_URL,
KVAPI_APP and KVAPI_KEY set for a fresh app, and their output must equal the comment below
them. `kvapi` samples run as `python -m kvapi` with DATABASE_URL set to the
test database. SQL samples run with psycopg as a superuser.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from psycopg.conninfo import make_conninfo

from conftest import RunningServer
from kvapi.api.auth import hash_service_key, new_service_key

DOCS = Path(__file__).resolve().parent.parent / "docs"
ACCESS = DOCS / "access.md"
LIMITS = DOCS / "limits.md"
# The password that replaces the '...' placeholder of the CREATE ROLE sample.
SERVER_ROLE_PASSWORD = "doc-sample-" + secrets.token_hex(8)


def code_blocks(path: Path, language: str) -> list[str]:
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [match.group(2) for match in fence.finditer(path.read_text()) if match.group(1) == language]


def curl_samples(path: Path) -> list[tuple[str, str]]:
    """Return each curl command of the sh blocks (continuation lines
    included) with the output that the `# ` comment line below it shows."""
    samples = []
    for block in code_blocks(path, "sh"):
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
            assert index < len(lines), f"no output comment below {command[0]!r}"
            assert lines[index].startswith("# "), f"no output comment below {command[0]!r}"
            samples.append(("\n".join(command), lines[index][2:]))
            index += 1
    return samples


def run_curl(command: str, server_url: str, app_id: str, service_key: str) -> str:
    env = {**os.environ, "KVAPI_URL": server_url, "KVAPI_APP": app_id, "KVAPI_KEY": service_key}
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    return result.stdout


def run_kvapi(command: str, database_url: str) -> subprocess.CompletedProcess[str]:
    """Run one `kvapi ...` sample line as `python -m kvapi ...`. The shell
    drops the line's trailing comment."""
    assert command.startswith("kvapi ")
    env = {**os.environ, "DATABASE_URL": database_url}
    python_command = f"{sys.executable} -m {command}"
    return subprocess.run(["bash", "-c", python_command], env=env, capture_output=True, text=True, timeout=60)


def create_app_with_secret(database_url: str, app_id: str) -> tuple[str, str]:
    """Create an app and return its service key and JWT secret."""
    service_key = new_service_key()
    jwt_secret = secrets.token_urlsafe(32)
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("SELECT kvapi.app_create(%s, %s, %s)", [app_id, hash_service_key(service_key), jwt_secret])
    return service_key, jwt_secret


def user_token(app_id: str, user_id: str, key: object, algorithm: str) -> str:
    return jwt.encode({"sub": user_id, "exp": int(time.time()) + 600, "aud": app_id}, key, algorithm=algorithm)


@pytest.fixture
def fresh_app(http_server: RunningServer) -> tuple[str, str, str]:
    """A fresh app on the shared server: its id, service key and JWT secret."""
    app_id = f"docs_{secrets.token_hex(6)}"
    service_key, jwt_secret = create_app_with_secret(http_server.database_url, app_id)
    return app_id, service_key, jwt_secret


# --- docs/access.md ----------------------------------------------------------

def without_rule_order(text: str) -> str:
    return re.sub(r'"order": [0-9]+', '"order": N', text)


def test_access_curl_samples_run_as_written(http_server: RunningServer, fresh_app: tuple[str, str, str]) -> None:
    app_id, service_key, _ = fresh_app
    samples = curl_samples(ACCESS)
    assert len(samples) == 2

    for command, expected_output in samples:
        output = run_curl(command, http_server.base_url, app_id, service_key)
        # A rule's order is its creation rank among all rules of the
        # database, which is 1 on a fresh install but not on the shared
        # test database.
        assert without_rule_order(output) == without_rule_order(expected_output), command


def test_access_owner_rule_grants_own_profile_only(http_server: RunningServer, fresh_app: tuple[str, str, str]) -> None:
    app_id, service_key, jwt_secret = fresh_app
    rule_command, _ = curl_samples(ACCESS)[0]
    run_curl(rule_command, http_server.base_url, app_id, service_key)
    alice = {"Authorization": f"Bearer {user_token(app_id, 'alice', jwt_secret, 'HS256')}"}

    with httpx.Client(base_url=f"{http_server.base_url}/v1/{app_id}", timeout=30) as client:
        own_write = client.put("/kv/profile:alice", json={"value": {"name": "Alice"}}, headers=alice)
        assert own_write.status_code == 200
        own_read = client.get("/kv/profile:alice", headers=alice)
        assert own_read.status_code == 200
        assert own_read.json()["value"] == {"name": "Alice"}

        other_write = client.put("/kv/profile:bob", json={"value": {"name": "Mallory"}}, headers=alice)
        assert other_write.status_code == 403
        assert other_write.json()["error"]["code"] == "KV_FORBIDDEN"
        anonymous_read = client.get("/kv/profile:alice")
        assert anonymous_read.status_code == 403
        assert anonymous_read.json()["error"]["code"] == "KV_FORBIDDEN"


def test_access_add_key_sample_verifies_rs256(
    http_server: RunningServer, fresh_app: tuple[str, str, str], tmp_path: Path
) -> None:
    app_id, service_key, _ = fresh_app
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    sample = "kvapi apps add-key APP key.pem --algorithm RS256"
    assert f"`{sample}`" in ACCESS.read_text()

    added = subprocess.run(
        [sys.executable, "-m", *sample.replace("APP", app_id).split()],
        env={**os.environ, "DATABASE_URL": http_server.database_url},
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert added.returncode == 0, added.stderr

    rule_command, _ = curl_samples(ACCESS)[0]
    run_curl(rule_command, http_server.base_url, app_id, service_key)
    token = user_token(app_id, "alice", private_key, "RS256")
    response = httpx.put(
        f"{http_server.base_url}/v1/{app_id}/kv/profile:alice",
        json={"value": "signed with RS256"}, headers={"Authorization": f"Bearer {token}"}, timeout=30,
    )
    assert response.status_code == 200


def role_url(db_url: str, role: str, password: str) -> str:
    return make_conninfo(db_url, user=role, password=password)


def test_access_server_role_sample_reads_every_app(db_url: str, conn: psycopg.Connection) -> None:
    (sample,) = code_blocks(ACCESS, "sql")
    statements = [line for line in sample.splitlines() if line.strip()]
    assert statements == ["CREATE ROLE kvapi_server LOGIN PASSWORD '...';", "GRANT kvapi_api TO kvapi_server;"]
    create_app_with_secret(db_url, "myapp")
    conn.execute("""SELECT kvapi.kv_set('myapp', 'greeting', '"hello"')""")

    try:
        for statement in statements:
            conn.execute(statement.replace("'...'", f"'{SERVER_ROLE_PASSWORD}'"))
        with psycopg.connect(role_url(db_url, "kvapi_server", SERVER_ROLE_PASSWORD), autocommit=True) as server:
            assert server.execute("SELECT session_user").fetchone() == ("kvapi_server",)
            value, version, ttl = server.execute("SELECT * FROM kvapi.kv_get('myapp', 'greeting')").fetchone()
            assert value == "hello"
            assert ttl == 2592000
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                server.execute("SELECT count(*) FROM kvapi_data.entries")
    finally:
        conn.execute("DROP ROLE IF EXISTS kvapi_server")


def test_access_grant_role_limits_to_one_app(db_url: str, conn: psycopg.Connection) -> None:
    sample = "kvapi apps grant-role APP ROLE"
    assert f"`{sample}`" in ACCESS.read_text()
    create_app_with_secret(db_url, "myapp")
    create_app_with_secret(db_url, "otherapp")
    role = f"docs_role_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)

    try:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        granted = run_kvapi(sample.replace("APP", "myapp").replace("ROLE", role), db_url)
        assert granted.returncode == 0, granted.stderr
        with psycopg.connect(role_url(db_url, role, password), autocommit=True) as bound:
            version, ttl = bound.execute("""SELECT * FROM kvapi.kv_set('myapp', 'k', '1')""").fetchone()
            assert ttl == 2592000
            assert bound.execute("SELECT value FROM kvapi.kv_get('myapp', 'k')").fetchone() == (1,)
            with pytest.raises(psycopg.Error) as denied:
                bound.execute("SELECT * FROM kvapi.kv_get('otherapp', 'k')")
            assert denied.value.sqlstate == "KVFOR"
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                bound.execute("SELECT count(*) FROM kvapi_data.entries")
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE IF EXISTS {role}")


# --- docs/limits.md ----------------------------------------------------------

def test_limits_cli_samples_run_as_written(db_url: str, conn: psycopg.Connection) -> None:
    (block,) = code_blocks(LIMITS, "sh")
    commands = [line for line in block.splitlines() if line.startswith("kvapi ")]
    assert len(commands) == 3
    create_app_with_secret(db_url, "myapp")
    conn.execute("""SELECT kvapi.kv_set('myapp', 'greeting', '"hello"')""")

    outputs = []
    for command in commands:
        result = run_kvapi(command, db_url)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        outputs.append(result.stdout)

    assert outputs[:2] == ["", ""]
    (usage_output,) = code_blocks(LIMITS, "json")
    assert outputs[2] == usage_output

    # The plan applies to the next call: a value above 4096 bytes is rejected.
    oversized = json.dumps("x" * 4095)
    with pytest.raises(psycopg.Error) as rejected:
        conn.execute("SELECT kvapi.kv_set('myapp', 'big', %s)", [oversized])
    assert rejected.value.sqlstate == "KVBIG"
    conn.execute("SELECT kvapi.kv_set('myapp', 'fits', %s)", [json.dumps("x" * 4094)])
