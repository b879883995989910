"""Isolation between apps: credentials of one app over HTTP, and database
login roles bound to one app with kvapi.app_grant_role.

The login roles connect over TCP to the test server, which trusts loopback
connections (initdb -A trust), so their passwords are set but never checked.
Roles belong to the whole server, so the tests create roles with random
names and drop them at the end of the module.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import jwt
import psycopg
import pytest
from psycopg import conninfo, sql

from conftest import create_app, create_database, drop_database

TABLES = [
    ("kvapi_data.entries", "app_id"),
    ("kvapi_data.entries_p0", "app_id"),
    ("kvapi_data.ephemeral_entries", "app_id"),
    ("kvapi_data.apps", "app_id"),
    ("kvapi_data.service_keys", "app_id"),
    ("kvapi_data.rules", "app_id"),
    ("kvapi_data.jwt_keys", "app_id"),
    ("kvapi_data.role_bindings", "app_id"),
    ("kvapi_data.plans", "plan_id"),
    ("kvapi_data.usage_counters", "app_id"),
]

# Calls of every key-value function for the app named by %(app)s.
KV_CALLS = [
    "SELECT kvapi.kv_get(%(app)s, 'k')",
    "SELECT kvapi.kv_get(%(app)s, 'k', p_touch => 'true')",
    "SELECT kvapi.kv_set(%(app)s, 'k', '1')",
    "SELECT kvapi.kv_setex(%(app)s, 'k', '1', '100')",
    "SELECT kvapi.kv_setnx(%(app)s, 'k', '1')",
    "SELECT kvapi.kv_cas(%(app)s, 'k', '1', '2')",
    "SELECT kvapi.kv_incr(%(app)s, 'n')",
    "SELECT kvapi.kv_decr(%(app)s, 'n')",
    "SELECT kvapi.kv_exists(%(app)s, 'k')",
    "SELECT kvapi.kv_del(%(app)s, 'k')",
    "SELECT kvapi.kv_expire(%(app)s, 'k', '100')",
    "SELECT kvapi.kv_ttl(%(app)s, 'k')",
    "SELECT kvapi.kv_mget(%(app)s, ARRAY['k'])",
    "SELECT kvapi.kv_mget(%(app)s, ARRAY[]::text[])",
    "SELECT kvapi.kv_mset(%(app)s, '{\"k\": 1}')",
    "SELECT kvapi.kv_mset(%(app)s, '{}')",
    "SELECT kvapi.kv_list(%(app)s)",
]

# Functions that only the HTTP layer (kvapi_api) or the owner may call.
PRIVILEGED_CALLS = [
    "SELECT kvapi.app_jwt_keys(%(app)s)",
    "SELECT kvapi.app_authenticate(%(app)s, '\\x00'::bytea)",
    "SELECT kvapi.kv_expose(%(app)s, '**', 'public', 'public')",
    "SELECT kvapi.kv_unexpose(%(app)s, '**')",
    "SELECT kvapi.kv_list_rules(%(app)s)",
    "SELECT kvapi.kv_explain(%(app)s, 'k', '{}')",
    "SELECT kvapi.app_add_jwt_key(%(app)s, 'RS256', 'pem')",
    "SELECT kvapi.app_grant_role(%(app)s, current_user)",
    "SELECT kvapi.app_create('new_app', '\\x00'::bytea, 'secret')",
    "SELECT kvapi.kv_purge_batch(10)",
    "CALL kvapi.kv_purge(10, 1)",
    "SELECT kvapi_data.app_plan(%(app)s)",
    "SELECT kvapi_data.check_caller(%(app)s)",
]


def sqlstate_of(connection: psycopg.Connection, statement: str, params: dict | None = None) -> str | None:
    """Run statement and return the SQLSTATE it raised, or None when it succeeded."""
    try:
        connection.execute(statement, params)
    except psycopg.Error as error:
        return error.sqlstate
    return None


def table_statements(table: str, column: str) -> list[str]:
    return [
        f"SELECT * FROM {table}",
        f"INSERT INTO {table} DEFAULT VALUES",
        f"UPDATE {table} SET {column} = {column}",
        f"DELETE FROM {table}",
        f"TRUNCATE {table}",
    ]


# HTTP: credentials of one app on another app's routes.

def service(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_url(app_id: str, key: str) -> str:
    return f"/v1/{app_id}/kv/{quote(key, safe='')}"


@pytest.fixture
def two_apps(http_server, http_app) -> Iterator[tuple]:
    """Apps A and B on the shared server, each with a public rule and its
    own values under the same key names."""
    app_b = create_app(http_server.database_url)
    with httpx.Client(base_url=http_server.base_url, timeout=30) as http:
        for app, label in [(http_app, "a"), (app_b, "b")]:
            response = http.put(f"/v1/{app.app_id}/kv-rules", json={"pattern": "public:**", "read": "public", "write": "public"},
                                headers=service(app.service_key))
            assert response.status_code == 200
            for key in ["public:shared", f"{label}:only"]:
                response = http.put(key_url(app.app_id, key), json={"value": f"{label} value"}, headers=service(app.service_key))
                assert response.status_code == 200
        yield http, http_app, app_b


def test_service_key_of_other_app_is_401(two_apps):
    http, app_a, app_b = two_apps
    base = f"/v1/{app_b.app_id}"
    requests = [
        ("GET", key_url(app_b.app_id, "b:only"), None),
        ("HEAD", key_url(app_b.app_id, "b:only"), None),
        ("PUT", key_url(app_b.app_id, "b:only"), {"value": "from a"}),
        ("DELETE", key_url(app_b.app_id, "b:only"), None),
        ("POST", key_url(app_b.app_id, "b:only"), {"op": "setnx", "value": 1}),
        ("POST", f"{base}/kv", {"op": "mget", "keys": ["b:only"]}),
        ("POST", f"{base}/kv", {"op": "mset", "entries": {"b:only": "from a"}}),
        ("GET", f"{base}/kv", None),
        ("GET", f"{base}/kv-rules", None),
        ("PUT", f"{base}/kv-rules", {"pattern": "**", "read": "public", "write": "public"}),
        ("DELETE", f"{base}/kv-rules?pattern=public:**", None),
        ("POST", f"{base}/kv-rules/explain", {"key": "b:only", "user": None}),
    ]
    for method, url, body in requests:
        response = http.request(method, url, json=body, headers=service(app_a.service_key))
        assert response.status_code == 401, (method, url)
        if method != "HEAD":
            assert response.json()["error"]["code"] == "KV_UNAUTHORIZED", (method, url)

    stored = http.get(key_url(app_b.app_id, "b:only"), headers=service(app_b.service_key))
    assert stored.json()["value"] == "b value"
    rules = http.get(f"{base}/kv-rules", headers=service(app_b.service_key)).json()["rules"]
    assert [rule["pattern"] for rule in rules] == ["public:**"]


def test_token_of_other_app_is_401(http_server, two_apps):
    http, app_a, app_b = two_apps
    with psycopg.connect(http_server.database_url, autocommit=True) as connection:
        (secret_a,) = connection.execute("SELECT jwt_secret FROM kvapi_data.apps WHERE app_id = %s", [app_a.app_id]).fetchone()
    claims = {"sub": "alice", "exp": int(time.time()) + 600}
    token_a = {"Authorization": f"Bearer {jwt.encode(claims, secret_a, algorithm='HS256')}"}
    token_a_for_b = {"Authorization": f"Bearer {jwt.encode({**claims, 'aud': app_b.app_id}, secret_a, algorithm='HS256')}"}

    assert http.get(key_url(app_a.app_id, "public:shared"), headers=token_a).status_code == 200
    for headers in [token_a, token_a_for_b]:
        read = http.get(key_url(app_b.app_id, "public:shared"), headers=headers)
        assert read.status_code == 401
        assert read.json()["error"]["code"] == "KV_UNAUTHORIZED"
        write = http.put(key_url(app_b.app_id, "public:shared"), json={"value": "from a"}, headers=headers)
        assert write.status_code == 401
    stored = http.get(key_url(app_b.app_id, "public:shared"), headers=service(app_b.service_key))
    assert stored.json()["value"] == "b value"


def test_list_shows_only_own_keys(two_apps):
    http, app_a, app_b = two_apps
    listed_a = http.get(f"/v1/{app_a.app_id}/kv", headers=service(app_a.service_key)).json()
    assert [entry["key"] for entry in listed_a["keys"]] == ["a:only", "public:shared"]
    assert listed_a["cursor"] is None
    listed_b = http.get(f"/v1/{app_b.app_id}/kv", headers=service(app_b.service_key)).json()
    assert [entry["key"] for entry in listed_b["keys"]] == ["b:only", "public:shared"]
    assert http.get(key_url(app_a.app_id, "public:shared"), headers=service(app_a.service_key)).json()["value"] == "a value"
    assert http.get(key_url(app_a.app_id, "b:only"), headers=service(app_a.service_key)).status_code == 404


# Database login roles bound to one app. The tests share one database and
# its roles, because cloning the template database for each of them would
# take longer than the tests.

@dataclass
class LoginRole:
    name: str
    url: str


class RoleFactory:
    """Factory of login roles with random names on one database server,
    which close() drops."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.names: list[str] = []

    def create(self, database_url: str) -> LoginRole:
        name = f"kvapi_login_{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        self.names.append(name)
        return LoginRole(name, conninfo.make_conninfo(database_url, user=name, password=password))

    def close(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            for name in self.names:
                connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [name])
                connection.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def roles(pg_server) -> Iterator[RoleFactory]:
    factory = RoleFactory(pg_server.url(database="postgres"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def shared_url(pg_server, template_url, roles) -> Iterator[str]:
    """A database with apps app_a and app_b. Key k of app_a contains "a
    secret", and app_b opens public:** to anonymous reads."""
    name = f"kvapi_isolation_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        create_app(url, "app_a")
        create_app(url, "app_b")
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("SELECT kvapi.kv_set('app_a', 'k', '\"a secret\"')")
            connection.execute("SELECT kvapi.kv_expose('app_b', 'public:**', 'public', 'deny')")
            connection.execute("SELECT kvapi.kv_set('app_b', 'public:x', '1')")
            connection.execute("SELECT kvapi.kv_set('app_b', 'private:x', '1')")
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture(scope="module")
def admin(shared_url) -> Iterator[psycopg.Connection]:
    """A superuser connection to the shared database."""
    with psycopg.connect(shared_url, autocommit=True) as connection:
        yield connection


def bind(admin: psycopg.Connection, app_id: str, role: LoginRole) -> None:
    admin.execute("SELECT kvapi.app_grant_role(%s, %s)", [app_id, role.name])


@pytest.fixture(scope="module")
def bound_role(shared_url, admin, roles) -> LoginRole:
    role = roles.create(shared_url)
    bind(admin, "app_b", role)
    return role


@pytest.fixture(scope="module")
def bound(bound_role) -> Iterator[psycopg.Connection]:
    """A connection of a login role bound to app_b."""
    with psycopg.connect(bound_role.url, autocommit=True) as connection:
        yield connection


def app_a_secret(admin: psycopg.Connection) -> str:
    return admin.execute("SELECT value FROM kvapi.kv_get('app_a', 'k')").fetchone()[0]


def test_bound_role_connects_as_itself(bound, bound_role):
    assert bound.execute("SELECT session_user::text").fetchone()[0] == bound_role.name
    assert bound.info.host == "127.0.0.1"


def test_bound_role_uses_own_app(bound):
    version = bound.execute("SELECT version FROM kvapi.kv_set('app_b', 'own:k', '\"b value\"')").fetchone()[0]
    assert isinstance(version, str)
    assert bound.execute("SELECT value FROM kvapi.kv_get('app_b', 'own:k')").fetchone()[0] == "b value"
    assert bound.execute("SELECT kvapi.kv_incr('app_b', 'own:n', 5)").fetchone()[0] == 5
    assert bound.execute("SELECT kvapi.kv_mset('app_b', '{\"own:m\": 1}')").fetchone()[0] == 1
    assert bound.execute("SELECT kvapi.kv_mget('app_b', ARRAY['own:k', 'own:m'])").fetchone()[0] == ["b value", 1]
    listed = bound.execute("SELECT kvapi.kv_list('app_b', 'own:')").fetchone()[0]
    assert [entry["key"] for entry in listed["keys"]] == ["own:k", "own:m", "own:n"]
    assert bound.execute("SELECT kvapi.kv_del('app_b', 'own:k')").fetchone()[0] is True


@pytest.mark.parametrize("statement", KV_CALLS)
def test_bound_role_other_app_is_kvfor(bound, admin, statement):
    assert sqlstate_of(bound, statement, {"app": "app_a"}) == "KVFOR"
    assert app_a_secret(admin) == "a secret"


def test_bound_role_unknown_app_is_kvapp(bound):
    """An unknown app is KVAPP whatever the caller, as over HTTP."""
    for statement in KV_CALLS:
        assert sqlstate_of(bound, statement, {"app": "no_such_app"}) == "KVAPP", statement


def test_bound_role_end_user_requester(bound):
    get = "SELECT value FROM kvapi.kv_get('app_b', %(key)s, p_requester => '{}')"
    assert bound.execute(get, {"key": "public:x"}).fetchone()[0] == 1
    assert sqlstate_of(bound, get, {"key": "private:x"}) == "KVFOR"


@pytest.mark.parametrize(("table", "column"), TABLES)
def test_bound_role_tables_denied(bound, table, column):
    for statement in table_statements(table, column):
        assert sqlstate_of(bound, statement) == "42501", statement


@pytest.mark.parametrize("statement", PRIVILEGED_CALLS)
def test_bound_role_privileged_functions_denied(bound, statement):
    assert sqlstate_of(bound, statement, {"app": "app_b"}) == "42501"


def test_bound_role_cannot_become_api_role(bound):
    assert sqlstate_of(bound, "SET ROLE kvapi_api") == "42501"
    assert sqlstate_of(bound, "SET SESSION AUTHORIZATION postgres") == "42501"


def test_rebinding_moves_role(shared_url, admin, roles):
    role = roles.create(shared_url)
    bind(admin, "app_b", role)
    with psycopg.connect(role.url, autocommit=True) as connection:
        assert sqlstate_of(connection, "SELECT kvapi.kv_get('app_a', 'k')") == "KVFOR"
        bind(admin, "app_a", role)
        assert connection.execute("SELECT value FROM kvapi.kv_get('app_a', 'k')").fetchone()[0] == "a secret"
        assert sqlstate_of(connection, "SELECT kvapi.kv_get('app_b', 'public:x')") == "KVFOR"


def test_binding_is_per_database(bound_role, http_database):
    """A role bound in one database is a member of kvapi_client on the
    whole server, but it has no binding in another kvapi database."""
    other_app = create_app(http_database)
    other_url = conninfo.make_conninfo(bound_role.url, dbname=conninfo.conninfo_to_dict(http_database)["dbname"])
    with psycopg.connect(other_url, autocommit=True) as connection:
        for statement in KV_CALLS:
            assert sqlstate_of(connection, statement, {"app": other_app.app_id}) == "KVFOR", statement


def test_unbound_role_cannot_call(shared_url, roles):
    role = roles.create(shared_url)
    with psycopg.connect(role.url, autocommit=True) as connection:
        for statement in KV_CALLS + PRIVILEGED_CALLS:
            assert sqlstate_of(connection, statement, {"app": "app_b"}) == "42501", statement
        for table, _ in TABLES:
            assert sqlstate_of(connection, f"SELECT * FROM {table}") == "42501", table


def test_client_member_without_binding_is_kvfor(shared_url, admin, roles):
    """A member of kvapi_client with no binding in this database (such as a
    role bound in another database) may touch no app."""
    role = roles.create(shared_url)
    admin.execute(sql.SQL("GRANT kvapi_client TO {}").format(sql.Identifier(role.name)))
    with psycopg.connect(role.url, autocommit=True) as connection:
        for app_id in ["app_a", "app_b"]:
            for statement in KV_CALLS:
                assert sqlstate_of(connection, statement, {"app": app_id}) == "KVFOR", (app_id, statement)


# The grant-role command.

def run_cli(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "kvapi", *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_grant_role(shared_url, admin, roles):
    role = roles.create(shared_url)
    result = run_cli(shared_url, "apps", "grant-role", "app_b", role.name)
    assert result.returncode == 0
    assert result.stdout == ""
    events = [json.loads(line)["event"] for line in result.stderr.splitlines()]
    assert events == ["apps.grant_role"]

    binding = admin.execute("SELECT app_id FROM kvapi_data.role_bindings WHERE role_name = %s", [role.name]).fetchone()
    assert binding == ("app_b",)
    with psycopg.connect(role.url, autocommit=True) as connection:
        assert connection.execute("SELECT kvapi.kv_setnx('app_b', 'cli:k', '1')").fetchone()[0] is True


def test_cli_grant_unknown_role(shared_url, admin):
    bindings_before = admin.execute("SELECT count(*) FROM kvapi_data.role_bindings").fetchone()[0]
    result = run_cli(shared_url, "apps", "grant-role", "app_b", "no_such_role_kvapi")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("kvapi: ")
    assert "no_such_role_kvapi" in result.stderr
    assert "not found" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert admin.execute("SELECT count(*) FROM kvapi_data.role_bindings").fetchone()[0] == bindings_before
