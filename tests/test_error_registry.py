"""The error registry in kvapi/errors.py matches the SQL that raises the
errors and the HTTP statuses that the API promises."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import psycopg
import pytest

from kvapi.database import translate_error
from kvapi.errors import BY_CODE, BY_SQLSTATE, REGISTRY

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

# The error table of the kvapi contract: API code and HTTP status.
CONTRACT_STATUSES = {
    "KV_INVALID_REQUEST": 400,
    "KV_UNAUTHORIZED": 401,
    "KV_FORBIDDEN": 403,
    "KV_NOT_FOUND": 404,
    "KV_APP_NOT_FOUND": 404,
    "KV_VERSION_MISMATCH": 412,
    "KV_CAS_MISMATCH": 409,
    "KV_EXPOSE_CONFLICT": 409,
    "KV_NOT_A_COUNTER": 409,
    "KV_COUNTER_OVERFLOW": 409,
    "KV_VALUE_TOO_LARGE": 413,
    "KV_RATE_LIMITED": 429,
    "KV_STORAGE_FULL": 507,
    "KV_KEYS_EXHAUSTED": 507,
}

# Codes outside the contract's table: `kvapi apps create` on an existing
# app id, and a database that cannot be reached.
EXTRA_STATUSES = {
    "KV_APP_EXISTS": 409,
    "KV_UNAVAILABLE": 503,
}

ERRCODE_PATTERN = re.compile(r"ERRCODE\s*=\s*'(KV[A-Z0-9]+)'")


def raised_sqlstates() -> set[str]:
    """Return every SQLSTATE of class KV that a RAISE under sql/ sets."""
    found: set[str] = set()
    for path in sorted(SQL_DIR.glob("*.sql")):
        found.update(ERRCODE_PATTERN.findall(path.read_text(encoding="utf-8")))
    return found


def raise_statements() -> list[tuple[str, str]]:
    """Return (file:line, statement text) for every RAISE EXCEPTION under sql/.
    A statement ends at the first semicolon outside a quoted literal."""
    statements: list[tuple[str, str]] = []
    for path in sorted(SQL_DIR.glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\bRAISE\s+EXCEPTION\b", text):
            in_quotes = False
            end = match.start()
            while end < len(text):
                character = text[end]
                if character == "'":
                    in_quotes = not in_quotes
                elif character == ";" and not in_quotes:
                    break
                end += 1
            line = text.count("\n", 0, match.start()) + 1
            statements.append((f"{path.name}:{line}", text[match.start():end]))
    return statements


RAISE_STATEMENTS = raise_statements()


def test_sql_raises_errors():
    """Guard against a pattern that finds nothing and so checks nothing."""
    assert "KVINV" in raised_sqlstates()


@pytest.mark.parametrize("sqlstate", sorted(raised_sqlstates()))
def test_raised_sqlstate_is_registered(sqlstate):
    assert sqlstate in BY_SQLSTATE


def test_sqlstates_are_distinct():
    sqlstates = [entry.sqlstate for entry in REGISTRY if entry.sqlstate is not None]
    assert len(sqlstates) == len(set(sqlstates))


def test_codes_are_distinct():
    codes = [entry.code for entry in REGISTRY]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(
    "entry", [entry for entry in REGISTRY if entry.sqlstate is not None], ids=lambda entry: entry.code
)
def test_sqlstate_is_class_kv(entry):
    assert re.fullmatch(r"KV[A-Z0-9]{3}", entry.sqlstate)


@pytest.mark.parametrize("code, status", sorted(CONTRACT_STATUSES.items()))
def test_contract_code_status(code, status):
    assert code in BY_CODE
    assert BY_CODE[code].http_status == status


def test_registry_has_only_known_codes():
    assert set(BY_CODE) == set(CONTRACT_STATUSES) | set(EXTRA_STATUSES)


@pytest.mark.parametrize("code, status", sorted(EXTRA_STATUSES.items()))
def test_extra_code_status(code, status):
    assert BY_CODE[code].http_status == status


@pytest.mark.parametrize("location, statement", RAISE_STATEMENTS, ids=[location for location, _ in RAISE_STATEMENTS])
def test_raise_sets_kv_errcode(location, statement):
    assert ERRCODE_PATTERN.search(statement), f"{location}: RAISE EXCEPTION without an ERRCODE of class KV"


@pytest.mark.parametrize("location, statement", RAISE_STATEMENTS, ids=[location for location, _ in RAISE_STATEMENTS])
def test_raise_sets_hint(location, statement):
    assert re.search(r"\bHINT\s*=", statement), f"{location}: RAISE EXCEPTION without a HINT:\n{statement}"


# SQL calls that raise each error, run as the superuser in a database with
# the app "demo". A call may be a list of statements: the last one raises.
RAISING_CALLS = [
    ("KVINV", "KV_INVALID_REQUEST", ["SELECT kvapi.kv_get('demo', '')"]),
    ("KVINV", "KV_INVALID_REQUEST", ["SELECT kvapi.kv_set('demo', 'k', '1', p_ttl => '1.5')"]),
    ("KVINV", "KV_INVALID_REQUEST", ["SELECT kvapi.kv_list('demo', p_cursor => '!')"]),
    ("KVINV", "KV_INVALID_REQUEST", ["SELECT kvapi.kv_purge_batch(0)"]),
    ("KVINV", "KV_INVALID_REQUEST", ["SELECT kvapi.app_create('bad id', '\\x00'::bytea, 'secret')"]),
    ("KVAPP", "KV_APP_NOT_FOUND", ["SELECT kvapi.kv_get('missing-app', 'k')"]),
    ("KVVER", "KV_VERSION_MISMATCH", ["SELECT kvapi.kv_set('demo', 'k', '1', p_if_match => '{1}')"]),
    ("KVNAC", "KV_NOT_A_COUNTER", ["SELECT kvapi.kv_set('demo', 'k', '1.5')", "SELECT kvapi.kv_incr('demo', 'k')"]),
    ("KVOVF", "KV_COUNTER_OVERFLOW", [
        "SELECT kvapi.kv_set('demo', 'k', '9223372036854775807')", "SELECT kvapi.kv_incr('demo', 'k')",
    ]),
    ("KVBIG", "KV_VALUE_TOO_LARGE", [
        "UPDATE kvapi_data.plans SET max_value_bytes = 4 WHERE plan_id = 'default'",
        "SELECT kvapi.kv_set('demo', 'k', '\"too long\"')",
    ]),
    ("KVEXI", "KV_APP_EXISTS", [
        f"SELECT kvapi.app_create('demo', '\\x{'00' * 32}'::bytea, 'secret')",
    ]),
    ("KVUNA", "KV_UNAUTHORIZED", [
        f"SELECT kvapi.app_authenticate('demo', '\\x{hashlib.sha256(b'wrong').hexdigest()}'::bytea)",
    ]),
]


@pytest.mark.parametrize(
    "sqlstate, code, statements", RAISING_CALLS,
    ids=[f"{sqlstate}-{statements[-1][7:40]}" for sqlstate, _, statements in RAISING_CALLS],
)
def test_sql_error_translates_with_hint(conn, app, sqlstate, code, statements):
    for statement in statements[:-1]:
        conn.execute(statement)

    with pytest.raises(psycopg.Error) as raised:
        conn.execute(statements[-1])

    error = raised.value
    assert error.sqlstate == sqlstate
    assert error.diag.message_hint, f"{sqlstate} raised without a HINT: {error.diag.message_primary}"
    translated = translate_error(error)
    assert translated is not None
    assert translated.code == code
    assert translated.message.endswith(f". {error.diag.message_hint}")
