"""SqlKV: the client interface over a psycopg connection, for code that runs
next to the database.

Each method is one call of a kvapi SQL function (the statements in
kvapi.statements, the same ones the HTTP API sends). SqlKV never commits
and never rolls back: its writes belong to the caller's transaction, so a
key and the caller's own rows commit or roll back together. On an
autocommit connection every call commits by itself.

Errors raise the same KvError subclasses as the HTTP clients, chosen by the
SQLSTATE through kvapi.errors.BY_SQLSTATE. As with any PostgreSQL error, a
failed call aborts the caller's transaction (use a savepoint,
`connection.transaction()`, to recover inside one). Access rules do not
apply: the connection acts for the app as a whole, like a service key
(a database role bound to one app may touch only that app).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import psycopg
from psycopg.adapt import Loader

from kvapi import statements
from kvapi.client._operations import UNSET, Entry, Explanation, KeyInfo, Page, Rule, Ttl, encode_json, explain_user
from kvapi.client.errors import error_for
from kvapi.database import translate_error


class _JsonLoader(Loader):
    """Load jsonb with Python's json module, which keeps integers of any
    size exact, whatever JSON loader the connection is configured with."""

    def load(self, data: bytes | bytearray | memoryview) -> Any:
        return json.loads(bytes(data))


def _jsonb(value: Any) -> str:
    return encode_json(value).decode("utf-8")


def _ttl_param(ttl: Ttl) -> str | None:
    """TTL as a jsonb parameter: SQL NULL when omitted, JSON null for no expiry."""
    if ttl is UNSET:
        return None
    return _jsonb(ttl)


def _touch_param(touch: bool | int | None) -> str | None:
    if touch is None or touch is False:
        return None
    if touch is True or isinstance(touch, int):
        return _jsonb(touch)
    raise TypeError(f"touch must be True or a number of seconds, not {touch!r}")


def _check_key(key: str) -> str:
    # psycopg rejects U+0000 in text parameters before sending them.
    if isinstance(key, str) and "\x00" in key:
        raise error_for("KV_INVALID_REQUEST", f"invalid key {key!r}: keys cannot contain U+0000")
    return key


class SqlKV:
    """Client of one kvapi app over a psycopg (sync) connection; it never commits."""

    def __init__(self, connection: psycopg.Connection, app_id: str) -> None:
        self.connection = connection
        self.app_id = app_id

    def _row(self, statement: str, **params: Any) -> tuple[Any, ...]:
        with self.connection.cursor() as cursor:
            cursor.adapters.register_loader("jsonb", _JsonLoader)
            try:
                # requester NULL: a trusted caller, to whom access rules do not apply.
                cursor.execute(statement, {"app_id": self.app_id, "requester": None, **params})
            except psycopg.Error as error:
                translated = translate_error(error)
                if translated is None:
                    raise
                raise error_for(translated.code, translated.message, **translated.extra) from error
            row = cursor.fetchone()
        assert row is not None, "every kvapi function returns one row"
        return row

    def get(self, key: str, *, touch: bool | int | None = None) -> Any:
        """Return the value of `key`, or None when it is missing; see KV.get."""
        value, _version, _ttl = self._row(statements.GET, key=_check_key(key), touch=_touch_param(touch))
        return value

    def get_entry(self, key: str, *, touch: bool | int | None = None) -> Entry | None:
        """Return the Entry of `key`, or None when it is missing."""
        value, version, ttl = self._row(statements.GET, key=_check_key(key), touch=_touch_param(touch))
        if version is None:
            return None
        return Entry(key, value, version, ttl)

    def set(self, key: str, value: Any, *, ttl: Ttl = UNSET, keep_ttl: bool = False, ephemeral: bool = False,
            if_version: str | None = None, if_absent: bool = False) -> str:
        """Write `key` and return its new version; see KV.set."""
        version, _ttl = self._row(
            statements.SET, key=_check_key(key), value=_jsonb(value), ttl=_ttl_param(ttl), keep_ttl=keep_ttl,
            ephemeral=ephemeral, if_match=None if if_version is None else [if_version], if_absent=if_absent,
        )
        return version

    def setex(self, key: str, value: Any, ttl: int, *, ephemeral: bool = False) -> str:
        """Write `key` with a required TTL in seconds and return its new version."""
        version, _ttl = self._row(statements.SETEX, key=_check_key(key), value=_jsonb(value), ttl=_ttl_param(ttl), ephemeral=ephemeral)
        return version

    def setnx(self, key: str, value: Any, *, ttl: Ttl = UNSET, ephemeral: bool = False) -> bool:
        """Write `key` only when it is missing; return whether it was written."""
        (created,) = self._row(statements.SETNX, key=_check_key(key), value=_jsonb(value), ttl=_ttl_param(ttl), ephemeral=ephemeral)
        return created

    def cas(self, key: str, expected: Any, new: Any, *, ttl: Ttl = UNSET) -> bool:
        """Compare-and-swap; see KV.cas."""
        (swapped,) = self._row(
            statements.CAS, key=_check_key(key), expected=None if expected is None else _jsonb(expected),
            next=None if new is None else _jsonb(new), ttl=_ttl_param(ttl),
        )
        return swapped

    def incr(self, key: str, by: int = 1) -> int:
        """Add `by` to the integer counter at `key` and return the new value."""
        (value,) = self._row(statements.INCR, key=_check_key(key), by=by)
        return value

    def decr(self, key: str, by: int = 1) -> int:
        """Subtract `by` from the integer counter at `key` and return the new value."""
        (value,) = self._row(statements.DECR, key=_check_key(key), by=by)
        return value

    def exists(self, key: str) -> bool:
        (found,) = self._row(statements.EXISTS, key=_check_key(key))
        return found

    def delete(self, key: str, *, if_version: str | None = None) -> bool:
        """Delete `key` and return whether it existed."""
        (deleted,) = self._row(statements.DELETE, key=_check_key(key), if_match=None if if_version is None else [if_version])
        return deleted

    def expire(self, key: str, ttl: int | None) -> bool:
        """Give `key` a TTL in seconds, or no expiry with None; False when it is missing."""
        (updated,) = self._row(statements.EXPIRE, key=_check_key(key), ttl=_jsonb(ttl))
        return updated

    def ttl(self, key: str) -> int | None:
        """Return the remaining TTL in seconds; None for no expiry or a missing key."""
        ttl, _exists = self._row(statements.TTL, key=_check_key(key))
        return ttl

    def mget(self, keys: Iterable[str]) -> list[Any]:
        """Return the values of up to 1000 keys in order, None for each missing key."""
        (values,) = self._row(statements.MGET, keys=[_check_key(key) for key in keys])
        return values

    def mset(self, entries: Mapping[str, Any], *, ttl: Ttl = UNSET, ephemeral: bool = False) -> int:
        """Write up to 1000 keys, all or nothing; return the number written."""
        (count,) = self._row(statements.MSET, entries=_jsonb(dict(entries)), ttl=_ttl_param(ttl), ephemeral=ephemeral)
        return count

    def list_page(self, *, prefix: str | None = None, cursor: str | None = None, limit: int | None = None) -> Page:
        """Return one Page of keys in byte order, starting after `cursor`."""
        (page,) = self._row(statements.LIST, prefix=prefix or "", cursor=cursor, limit=100 if limit is None else limit)
        return Page([KeyInfo(item["key"], item["ttl"], item["ephemeral"]) for item in page["keys"]], page["cursor"])

    def list(self, prefix: str | None = None, limit: int | None = None) -> Iterator[str]:
        """Iterate over every live key (with `prefix`) in byte order, in pages of `limit` keys."""
        cursor = None
        while True:
            page = self.list_page(prefix=prefix, cursor=cursor, limit=limit)
            for info in page.keys:
                yield info.key
            if page.cursor is None:
                return
            cursor = page.cursor

    def expose(self, pattern: str, read: str, write: str) -> None:
        """Create the access rule `pattern`; see KV.expose."""
        self._row(statements.EXPOSE, pattern=pattern, read=read, write=write)

    def unexpose(self, pattern: str) -> bool:
        """Remove the access rule `pattern`; return whether it existed."""
        (removed,) = self._row(statements.UNEXPOSE, pattern=pattern)
        return removed

    def list_rules(self) -> list[Rule]:
        """Return the app's access rules in creation order."""
        (rules,) = self._row(statements.LIST_RULES)
        return [Rule.from_json(rule) for rule in rules]

    def explain(self, key: str, user_id: str | None = None, role: str | None = None) -> Explanation:
        """Return which rule decides access to `key` for a requester; see KV.explain."""
        user = explain_user(user_id, role) or {}
        (result,) = self._row(statements.EXPLAIN, key=_check_key(key), user=_jsonb(user))
        rule = Rule.from_json(result["rule"]) if result.get("rule") is not None else None
        return Explanation(result["key"], rule, result["read"], result["write"])
