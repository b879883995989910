"""Access rules in SQL: the pattern matcher, precedence between rules, the
grants of each role, and the management functions kv_expose, kv_unexpose
and kv_list_rules.

Each case of the tables runs three ways: kvapi.kv_explain, kvapi.kv_get and
kvapi.kv_set, the last two called with the requester as p_requester, so the
explanation and the guard of the operations must agree. The tests share one
database and each works in an app of its own, because cloning the template
database for each of the many small cases would take longer than the cases.
"""

from __future__ import annotations

import itertools
import os
import unicodedata
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import create_database, drop_database

ANON: dict[str, str] = {}
# Expected outcome of a rule that does not match the key: no rule decides,
# so nothing is granted.
NO_MATCH = "no match"
# Expected outcome of a requester that kv_explain and the guarded
# operations reject with KVINV.
INVALID = "invalid requester"
SEED = "seed"
WRITTEN = "written"

_app_numbers = itertools.count()


def user(user_id: str, role: str | None = None) -> dict[str, str]:
    """Return the p_requester of an end user; without role the SQL side
    uses the default role "authenticated"."""
    if role is None:
        return {"id": user_id}
    return {"id": user_id, "role": role}


NFC_E = unicodedata.normalize("NFC", "\u00e9")
NFD_E = unicodedata.normalize("NFD", "\u00e9")

# (pattern, "read/write" roles, key, requester, expected): expected is
# (read granted, write granted) when the rule matches the key, NO_MATCH or
# INVALID.
MATCHER_CASES = [
    # A pattern matches the whole key: no prefix, suffix or case-insensitive match.
    ("profile", "public/public", "profile", ANON, (True, True)),
    ("profile", "public/public", "profile:x", ANON, NO_MATCH),
    ("profile", "public/public", "my:profile", ANON, NO_MATCH),
    ("profile", "public/public", "Profile", ANON, NO_MATCH),
    ("a:b", "public/public", "a:b:", ANON, NO_MATCH),
    ("a:b", "public/public", "xa:b", ANON, NO_MATCH),
    # * matches one segment, possibly empty, never across ':'.
    ("p:*", "public/deny", "p:", ANON, (True, False)),
    ("p:*", "public/deny", "p:x", ANON, (True, False)),
    ("p:*", "public/deny", "p:x:y", ANON, NO_MATCH),
    ("p:*", "public/deny", "p", ANON, NO_MATCH),
    ("p:*:z", "public/deny", "p::z", ANON, (True, False)),
    ("*", "public/deny", "abc", ANON, (True, False)),
    ("*", "public/deny", "a:b", ANON, NO_MATCH),
    ("p*", "public/deny", "p", ANON, (True, False)),
    ("p*", "public/deny", "p:q", ANON, NO_MATCH),
    ("p:*", "public/deny", "p:line\nbreak", ANON, (True, False)),
    # ** matches any text, ':' included, possibly empty.
    ("p:**", "deny/public", "p:", ANON, (False, True)),
    ("p:**", "deny/public", "p:a:b:c", ANON, (False, True)),
    ("p:**", "deny/public", "p", ANON, NO_MATCH),
    ("**", "deny/public", "x:y:z", ANON, (False, True)),
    ("a**z", "deny/public", "az", ANON, (False, True)),
    ("a**z", "deny/public", "a:b:z", ANON, (False, True)),
    ("a**z", "deny/public", "a:b:zy", ANON, NO_MATCH),
    ("**:end", "deny/public", ":end", ANON, (False, True)),
    # Roles: deny, public, authed.
    ("flags:**", "authed/deny", "flags:beta", ANON, (False, False)),
    ("flags:**", "authed/deny", "flags:beta", user("alice"), (True, False)),
    ("secret:**", "deny/deny", "secret:x", user("alice"), (False, False)),
    # {user.id} with the owner role: only the id equal to the segment.
    ("profile:{user.id}", "owner/owner", "profile:alice", user("alice"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:alice", user("bob"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:alice", ANON, (False, False)),
    ("profile:{user.id}", "public/owner", "profile:alice", user("bob"), (True, False)),
    ("profile:{user.id}", "owner/owner", "profile:", user("alice"), NO_MATCH),
    ("profile:{user.id}", "owner/owner", "profile:alice:x", user("alice"), NO_MATCH),
    ("pair:{user.id}:{user.id}", "owner/owner", "pair:alice:alice", user("alice"), (True, True)),
    ("pair:{user.id}:{user.id}", "owner/owner", "pair:alice:bob", user("alice"), (False, False)),
    # An id containing ':' never equals a segment.
    ("profile:{user.id}", "owner/owner", "profile:a:b", user("a:b"), NO_MATCH),
    ("profile:{user.id}:**", "owner/owner", "profile:a:b", user("a:b"), (False, False)),
    ("profile:{user.id}:**", "owner/owner", "profile:a:b", user("a"), (True, True)),
    # Ids compare as literal text, whatever characters they contain.
    ("profile:{user.id}", "owner/owner", "profile:*", user("*"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:x", user("*"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:*", user("x"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:**", user("**"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:abc", user("**"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:{user.id}", user("{user.id}"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:bob", user("{user.id}"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:%", user("%"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:anything", user("%"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:_", user("_"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:a", user("_"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:a\\b", user("a\\b"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:ab", user("a\\b"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:a.c", user("a.c"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:abc", user("a.c"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:x", user("."), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:a+", user("a+"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:aa", user("a+"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:(a)", user("(a)"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:a", user("(a)"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:[ab]", user("[ab]"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:a", user("[ab]"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:^a$", user("^a$"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:a", user("^a$"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:a|b", user("a|b"), (True, True)),
    ("profile:{user.id}", "owner/owner", "profile:a", user("a|b"), (False, False)),
    ("profile:{user.id}", "owner/owner", "profile:b", user("a|b"), (False, False)),
    # NFC and NFD spellings of one character are different ids and keys.
    ("profile:{user.id}", "owner/owner", f"profile:caf{NFD_E}", user(f"caf{NFC_E}"), (False, False)),
    ("profile:{user.id}", "owner/owner", f"profile:caf{NFC_E}", user(f"caf{NFD_E}"), (False, False)),
    ("profile:{user.id}", "owner/owner", f"profile:caf{NFD_E}", user(f"caf{NFD_E}"), (True, True)),
    (f"caf{NFC_E}:*", "public/public", f"caf{NFD_E}:x", ANON, NO_MATCH),
    (f"caf{NFD_E}:*", "public/public", f"caf{NFC_E}:x", ANON, NO_MATCH),
    (f"caf{NFC_E}:*", "public/public", f"caf{NFC_E}:x", ANON, (True, True)),
    # Invalid requesters: an empty id, an id or role that is not a string,
    # or a field other than id and role.
    ("profile:{user.id}", "owner/owner", "profile:alice", {"id": ""}, INVALID),
    ("profile:{user.id}", "owner/owner", "profile:alice", {"id": "", "role": "authenticated"}, INVALID),
    ("profile:{user.id}", "owner/owner", "profile:alice", {"id": 7}, INVALID),
    ("profile:{user.id}", "owner/owner", "profile:alice", {"id": "alice", "role": 7}, INVALID),
    ("profile:{user.id}", "owner/owner", "profile:alice", {"id": "alice", "role": None}, INVALID),
    ("profile:{user.id}", "owner/owner", "profile:alice", {"role": "admin"}, INVALID),
    ("profile:{user.id}", "owner/owner", "profile:alice", {"id": "alice", "admin": True}, INVALID),
    # {user.role}: the segment must equal the requester's role.
    ("role:{user.role}:**", "public/public", "role:admin:x", user("alice", "admin"), (True, True)),
    ("role:{user.role}:**", "public/public", "role:admin:x", user("alice", "editor"), (False, False)),
    ("role:{user.role}:**", "public/public", "role:admin:x", ANON, (False, False)),
    ("role:{user.role}:**", "public/public", "role:authenticated:x", user("alice"), (True, True)),
    ("role:{user.role}:**", "authed/deny", "role:admin:x", user("alice", "admin"), (True, False)),
    ("role:{user.role}:**", "public/public", "role:a:b:x", user("alice", "a:b"), (False, False)),
    ("role:{user.role}:**", "public/public", "role:*:x", user("alice", "*"), (True, True)),
    ("role:{user.role}:**", "public/public", "role:admin:x", user("alice", "*"), (False, False)),
    ("role:{user.role}:**", "public/public", "role::x", user("alice", ""), NO_MATCH),
    ("t:{user.role}:{user.id}", "owner/owner", "t:admin:alice", user("alice", "admin"), (True, True)),
    ("t:{user.role}:{user.id}", "owner/owner", "t:editor:alice", user("alice", "admin"), (False, False)),
    ("t:{user.role}:{user.id}", "owner/owner", "t:admin:alice", user("bob", "admin"), (False, False)),
    # Every pattern character other than *, ** and the placeholders is
    # literal: % and _ are not LIKE wildcards, regular expression
    # characters are not special, and a backslash escapes nothing.
    ("100%:*", "public/public", "100%:x", ANON, (True, True)),
    ("100%:*", "public/public", "100x:x", ANON, NO_MATCH),
    ("100%:*", "public/public", "1000:x", ANON, NO_MATCH),
    ("a%", "public/public", "abc", ANON, NO_MATCH),
    ("a_b", "public/public", "a_b", ANON, (True, True)),
    ("a_b", "public/public", "axb", ANON, NO_MATCH),
    ("v1.0:*", "public/public", "v1.0:a", ANON, (True, True)),
    ("v1.0:*", "public/public", "v1x0:a", ANON, NO_MATCH),
    ("(a|b)", "public/public", "(a|b)", ANON, (True, True)),
    ("(a|b)", "public/public", "a", ANON, NO_MATCH),
    ("x+", "public/public", "x+", ANON, (True, True)),
    ("x+", "public/public", "xx", ANON, NO_MATCH),
    ("[ab]", "public/public", "[ab]", ANON, (True, True)),
    ("[ab]", "public/public", "a", ANON, NO_MATCH),
    ("^a$", "public/public", "^a$", ANON, (True, True)),
    ("^a$", "public/public", "a", ANON, NO_MATCH),
    ("a\\*", "public/public", "a\\xyz", ANON, (True, True)),
    ("a\\*", "public/public", "a*", ANON, NO_MATCH),
    ("a\\d", "public/public", "a1", ANON, NO_MATCH),
    ("a\\d", "public/public", "a\\d", ANON, (True, True)),
    ("a b:*", "public/public", "a b:c", ANON, (True, True)),
    ("\u65e5\u672c:*", "public/public", "\u65e5\u672c:x", ANON, (True, True)),
    ("\u65e5\u672c:*", "public/public", "\u65e5\u672c\u8a9e:x", ANON, NO_MATCH),
    ("profile:*", "public/public", "profile:{x}", ANON, (True, True)),
]

# (rules in creation order, key, requester, pattern of the deciding rule,
# (read granted, write granted)).
PRECEDENCE_CASES = [
    # No rule matches: deny.
    ([], "anything", ANON, None, (False, False)),
    ([], "anything", user("alice"), None, (False, False)),
    # {user.id} matches any non-empty segment for every requester, so a
    # user never falls through a per-user rule to a broader one.
    ([("user:{user.id}:**", "owner", "owner"), ("user:**", "public", "public")],
     "user:alice:x", user("bob"), "user:{user.id}:**", (False, False)),
    ([("user:{user.id}:**", "owner", "owner"), ("user:**", "public", "public")],
     "user:alice:x", user("alice"), "user:{user.id}:**", (True, True)),
    ([("user:{user.id}:**", "owner", "owner"), ("user:**", "public", "public")],
     "user:alice:x", ANON, "user:{user.id}:**", (False, False)),
    ([("user:{user.id}:**", "owner", "owner"), ("user:**", "public", "public")],
     "user:", ANON, "user:**", (True, True)),
    ([("**", "public", "public"), ("user:{user.id}:**", "owner", "owner")],
     "user:alice:x", user("bob"), "user:{user.id}:**", (False, False)),
    ([("profile:*", "public", "public"), ("profile:{user.id}", "owner", "owner")],
     "profile:alice", user("bob"), "profile:*", (True, True)),
    ([("role:{user.role}", "public", "public"), ("role:*", "public", "public")],
     "role:admin", user("alice", "editor"), "role:{user.role}", (False, False)),
    # Equal literal prefixes ("user:"): the earlier rule decides, for every
    # requester alike, the owner included.
    ([("user:**", "public", "deny"), ("user:{user.id}:**", "owner", "owner")],
     "user:alice:x", user("bob"), "user:**", (True, False)),
    ([("user:**", "public", "deny"), ("user:{user.id}:**", "owner", "owner")],
     "user:alice:x", user("alice"), "user:**", (True, False)),
    # Longest literal prefix wins, whatever the creation order.
    ([("a:*", "public", "deny"), ("a:b", "deny", "public")], "a:b", ANON, "a:b", (False, True)),
    ([("a:b", "deny", "public"), ("a:*", "public", "deny")], "a:b", ANON, "a:b", (False, True)),
    ([("a:*", "public", "deny"), ("a:b", "deny", "public")], "a:c", ANON, "a:*", (True, False)),
    ([("a:*", "public", "public"), ("a:b*", "authed", "authed")], "a:bc", ANON, "a:b*", (False, False)),
    ([("a:*", "public", "public"), ("a:b*", "authed", "authed")], "a:bc", user("alice"), "a:b*", (True, True)),
    ([("**", "public", "public"), ("a:**", "deny", "deny")], "a:x", ANON, "a:**", (False, False)),
    ([("**", "public", "public"), ("a:**", "deny", "deny")], "b:x", ANON, "**", (True, True)),
    # Same literal prefix, different patterns: the earliest rule decides.
    ([("k:*", "public", "deny"), ("k:**", "deny", "public")], "k:x", ANON, "k:*", (True, False)),
    ([("k:**", "deny", "public"), ("k:*", "public", "deny")], "k:x", ANON, "k:**", (False, True)),
    ([("k:*", "public", "deny"), ("k:**", "deny", "public")], "k:x:y", ANON, "k:**", (False, True)),
    ([("k:{user.id}", "owner", "owner"), ("k:*", "public", "public")], "k:alice", user("bob"), "k:{user.id}", (False, False)),
    ([("k:*", "public", "public"), ("k:{user.id}", "owner", "owner")], "k:alice", user("bob"), "k:*", (True, True)),
]


@pytest.fixture(scope="module")
def shared_url(pg_server, template_url) -> Iterator[str]:
    name = f"kvapi_access_rules_{os.getpid()}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture(scope="module")
def shared_conn(shared_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(shared_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def app_id(shared_conn: psycopg.Connection) -> str:
    """A fresh app of the shared database."""
    new_id = f"rules_{next(_app_numbers)}"
    shared_conn.execute("SELECT kvapi.app_create(%s, %s, %s)", [new_id, os.urandom(32), "secret"])
    return new_id


def sqlstate_of(conn: psycopg.Connection, sql: str, params: Any) -> str | None:
    """Run sql and return the SQLSTATE it raised, or None when it succeeded."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as error:
        return error.sqlstate
    return None


def expose(conn: psycopg.Connection, app_id: str, pattern: str, read: str, write: str) -> None:
    conn.execute("SELECT kvapi.kv_expose(%s, %s, %s, %s)", [app_id, pattern, read, write])


def list_rules(conn: psycopg.Connection, app_id: str) -> list[dict[str, Any]]:
    return conn.execute("SELECT kvapi.kv_list_rules(%s)", [app_id]).fetchone()[0]


def explain(conn: psycopg.Connection, app_id: str, key: str, requester: dict) -> dict[str, Any]:
    return conn.execute("SELECT kvapi.kv_explain(%s, %s, %s)", [app_id, key, Jsonb(requester)]).fetchone()[0]


def trusted_value(conn: psycopg.Connection, app_id: str, key: str) -> Any:
    return conn.execute("SELECT value FROM kvapi.kv_get(%s, %s)", [app_id, key]).fetchone()[0]


def rule_entry(conn: psycopg.Connection, app_id: str, pattern: str | None) -> dict[str, Any] | None:
    """Return the kv_list_rules entry of pattern, the form kv_explain uses."""
    if pattern is None:
        return None
    (entry,) = [rule for rule in list_rules(conn, app_id) if rule["pattern"] == pattern]
    return entry


def check_decision(conn: psycopg.Connection, app_id: str, key: str, requester: dict,
                   deciding: str | None, expected: tuple[bool, bool] | str) -> None:
    """Check kv_explain, then kv_get and kv_set as the requester, against
    the expected decision."""
    conn.execute("SELECT kvapi.kv_set(%s, %s, %s)", [app_id, key, Jsonb(SEED)])
    get_sql = "SELECT value FROM kvapi.kv_get(%s, %s, p_requester => %s)"
    set_sql = "SELECT kvapi.kv_set(%s, %s, %s, p_requester => %s)"

    if expected == INVALID:
        assert sqlstate_of(conn, "SELECT kvapi.kv_explain(%s, %s, %s)", [app_id, key, Jsonb(requester)]) == "KVINV"
        assert sqlstate_of(conn, get_sql, [app_id, key, Jsonb(requester)]) == "KVINV"
        assert sqlstate_of(conn, set_sql, [app_id, key, Jsonb(WRITTEN), Jsonb(requester)]) == "KVINV"
        assert trusted_value(conn, app_id, key) == SEED
        return

    read, write = expected
    assert explain(conn, app_id, key, requester) == {
        "key": key,
        "rule": rule_entry(conn, app_id, deciding),
        "read": read,
        "write": write,
    }

    if read:
        assert conn.execute(get_sql, [app_id, key, Jsonb(requester)]).fetchone()[0] == SEED
    else:
        assert sqlstate_of(conn, get_sql, [app_id, key, Jsonb(requester)]) == "KVFOR"

    if write:
        assert sqlstate_of(conn, set_sql, [app_id, key, Jsonb(WRITTEN), Jsonb(requester)]) is None
        assert trusted_value(conn, app_id, key) == WRITTEN
    else:
        assert sqlstate_of(conn, set_sql, [app_id, key, Jsonb(WRITTEN), Jsonb(requester)]) == "KVFOR"
        assert trusted_value(conn, app_id, key) == SEED


@pytest.mark.parametrize(("pattern", "roles", "key", "requester", "expected"), MATCHER_CASES)
def test_matcher_case(shared_conn, app_id, pattern, roles, key, requester, expected):
    read_role, write_role = roles.split("/")
    expose(shared_conn, app_id, pattern, read_role, write_role)
    if expected == NO_MATCH:
        check_decision(shared_conn, app_id, key, requester, None, (False, False))
    else:
        check_decision(shared_conn, app_id, key, requester, pattern, expected)


@pytest.mark.parametrize(("rules", "key", "requester", "deciding", "expected"), PRECEDENCE_CASES)
def test_precedence_case(shared_conn, app_id, rules, key, requester, deciding, expected):
    for pattern, read_role, write_role in rules:
        expose(shared_conn, app_id, pattern, read_role, write_role)
    check_decision(shared_conn, app_id, key, requester, deciding, expected)


def test_decision_missing_key_is_forbidden(shared_conn, app_id):
    expose(shared_conn, app_id, "profile:{user.id}", "owner", "owner")
    get_sql = "SELECT value FROM kvapi.kv_get(%s, %s, p_requester => %s)"
    assert sqlstate_of(shared_conn, get_sql, [app_id, "profile:alice", Jsonb(user("bob"))]) == "KVFOR"
    assert sqlstate_of(shared_conn, get_sql, [app_id, "profile:alice", Jsonb(user("alice"))]) is None


def test_explain_null_requester_is_anonymous(shared_conn, app_id):
    expose(shared_conn, app_id, "flags:**", "authed", "deny")
    result = shared_conn.execute("SELECT kvapi.kv_explain(%s, %s, NULL)", [app_id, "flags:x"]).fetchone()[0]
    assert result["read"] is False
    assert result["write"] is False
    assert result["rule"]["pattern"] == "flags:**"


def test_explain_invalid_key_and_unknown_app(shared_conn, app_id):
    sql = "SELECT kvapi.kv_explain(%s, %s, %s)"
    assert sqlstate_of(shared_conn, sql, [app_id, "", Jsonb(ANON)]) == "KVINV"
    assert sqlstate_of(shared_conn, sql, [app_id, "a" * 1025, Jsonb(ANON)]) == "KVINV"
    assert sqlstate_of(shared_conn, sql, ["no_such_app", "k", Jsonb(ANON)]) == "KVAPP"


def test_guarded_unknown_app_is_kvapp(shared_conn):
    get_sql = "SELECT value FROM kvapi.kv_get(%s, %s, p_requester => %s)"
    assert sqlstate_of(shared_conn, get_sql, ["no_such_app", "k", Jsonb(ANON)]) == "KVAPP"
    assert sqlstate_of(shared_conn, get_sql, ["no_such_app", "k", Jsonb(user("alice"))]) == "KVAPP"


def test_mget_with_denied_key_is_forbidden(shared_conn, app_id):
    expose(shared_conn, app_id, "public:**", "public", "public")
    shared_conn.execute("SELECT kvapi.kv_set(%s, 'public:a', '1')", [app_id])
    sql = "SELECT kvapi.kv_mget(%s, %s, p_requester => %s)"
    assert shared_conn.execute(sql, [app_id, ["public:a", "public:b"], Jsonb(ANON)]).fetchone()[0] == [1, None]
    assert sqlstate_of(shared_conn, sql, [app_id, ["public:a", "private:a"], Jsonb(ANON)]) == "KVFOR"


def test_mset_with_denied_key_writes_nothing(shared_conn, app_id):
    expose(shared_conn, app_id, "public:**", "public", "public")
    sql = "SELECT kvapi.kv_mset(%s, %s, p_requester => %s)"
    entries = {"public:a": 1, "public:z": 2, "private:m": 3}
    assert sqlstate_of(shared_conn, sql, [app_id, Jsonb(entries), Jsonb(ANON)]) == "KVFOR"
    assert trusted_value(shared_conn, app_id, "public:a") is None
    assert trusted_value(shared_conn, app_id, "public:z") is None
    assert trusted_value(shared_conn, app_id, "private:m") is None


def test_reexpose_same_roles_changes_nothing(shared_conn, app_id):
    expose(shared_conn, app_id, "a:**", "public", "deny")
    expose(shared_conn, app_id, "b:**", "authed", "authed")
    before = list_rules(shared_conn, app_id)
    expose(shared_conn, app_id, "a:**", "public", "deny")
    assert list_rules(shared_conn, app_id) == before


def test_reexpose_other_roles_is_conflict(shared_conn, app_id):
    expose(shared_conn, app_id, "a:**", "public", "deny")
    before = list_rules(shared_conn, app_id)
    sql = "SELECT kvapi.kv_expose(%s, %s, %s, %s)"
    assert sqlstate_of(shared_conn, sql, [app_id, "a:**", "public", "public"]) == "KVEXP"
    assert sqlstate_of(shared_conn, sql, [app_id, "a:**", "authed", "deny"]) == "KVEXP"
    assert list_rules(shared_conn, app_id) == before


@pytest.mark.parametrize(("pattern", "read", "write"), [
    ("profile:*", "owner", "deny"),
    ("profile:*", "deny", "owner"),
    ("profile:{user.role}", "owner", "owner"),
    ("profile", "owner", "owner"),
])
def test_owner_without_user_id_is_invalid(shared_conn, app_id, pattern, read, write):
    sql = "SELECT kvapi.kv_expose(%s, %s, %s, %s)"
    assert sqlstate_of(shared_conn, sql, [app_id, pattern, read, write]) == "KVINV"
    assert list_rules(shared_conn, app_id) == []


@pytest.mark.parametrize("pattern", [
    "***", "a:***", "****", "{user.name}", "{user.id", "{", "a:{}", "{USER.ID}", "", "x" * 1025, None,
])
def test_invalid_pattern_is_invalid(shared_conn, app_id, pattern):
    sql = "SELECT kvapi.kv_expose(%s, %s, %s, %s)"
    assert sqlstate_of(shared_conn, sql, [app_id, pattern, "public", "public"]) == "KVINV"
    assert list_rules(shared_conn, app_id) == []


@pytest.mark.parametrize(("read", "write"), [
    ("admin", "deny"), ("deny", "admin"), ("Public", "deny"), ("", "deny"), ("deny", " public"), (None, "deny"), ("deny", None),
])
def test_invalid_role_is_invalid(shared_conn, app_id, read, write):
    sql = "SELECT kvapi.kv_expose(%s, %s, %s, %s)"
    assert sqlstate_of(shared_conn, sql, [app_id, "a:**", read, write]) == "KVINV"
    assert list_rules(shared_conn, app_id) == []


def test_unexpose_true_then_false(shared_conn, app_id):
    expose(shared_conn, app_id, "a:**", "public", "deny")
    sql = "SELECT kvapi.kv_unexpose(%s, %s)"
    assert shared_conn.execute(sql, [app_id, "a:**"]).fetchone()[0] is True
    assert shared_conn.execute(sql, [app_id, "a:**"]).fetchone()[0] is False
    assert list_rules(shared_conn, app_id) == []


def test_unexpose_reopens_fallback(shared_conn, app_id):
    expose(shared_conn, app_id, "a:**", "public", "public")
    expose(shared_conn, app_id, "a:b:**", "deny", "deny")
    assert explain(shared_conn, app_id, "a:b:c", ANON)["read"] is False
    shared_conn.execute("SELECT kvapi.kv_unexpose(%s, %s)", [app_id, "a:b:**"])
    assert explain(shared_conn, app_id, "a:b:c", ANON)["read"] is True


def test_list_rules_order_rises(shared_conn, app_id):
    patterns = ["z:**", "a:**", "m:{user.id}", "b:*"]
    for pattern in patterns:
        expose(shared_conn, app_id, pattern, "owner" if "{user.id}" in pattern else "public", "deny")
    rules = list_rules(shared_conn, app_id)
    assert [rule["pattern"] for rule in rules] == patterns
    orders = [rule["order"] for rule in rules]
    assert orders == sorted(set(orders))
    assert rules[2] == {"pattern": "m:{user.id}", "read": "owner", "write": "deny", "order": orders[2]}


def test_list_rules_after_unexpose_and_reexpose(shared_conn, app_id):
    expose(shared_conn, app_id, "a:**", "public", "deny")
    expose(shared_conn, app_id, "b:**", "public", "deny")
    shared_conn.execute("SELECT kvapi.kv_unexpose(%s, %s)", [app_id, "a:**"])
    expose(shared_conn, app_id, "a:**", "authed", "authed")
    rules = list_rules(shared_conn, app_id)
    assert [rule["pattern"] for rule in rules] == ["b:**", "a:**"]
    assert rules[0]["order"] < rules[1]["order"]


def test_rules_belong_to_one_app(shared_conn, app_id):
    other = f"rules_{next(_app_numbers)}"
    shared_conn.execute("SELECT kvapi.app_create(%s, %s, %s)", [other, os.urandom(32), "secret"])
    expose(shared_conn, other, "public:**", "public", "public")
    assert list_rules(shared_conn, app_id) == []
    assert explain(shared_conn, app_id, "public:x", ANON) == {
        "key": "public:x", "rule": None, "read": False, "write": False,
    }


def test_rule_management_unknown_app_is_kvapp(shared_conn):
    assert sqlstate_of(shared_conn, "SELECT kvapi.kv_expose('no_such_app', 'a', 'public', 'deny')", ()) == "KVAPP"
    assert sqlstate_of(shared_conn, "SELECT kvapi.kv_unexpose('no_such_app', 'a')", ()) == "KVAPP"
    assert sqlstate_of(shared_conn, "SELECT kvapi.kv_list_rules('no_such_app')", ()) == "KVAPP"
