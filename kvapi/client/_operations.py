"""The HTTP client's operations, independent of how requests are sent.

Each method of Operations builds a Call: the request of one kvapi operation
(method, path, query, headers, JSON body) and the function that turns the
response into the operation's result or raises its KvError. The sync client
(KV) and the async client (AsyncKV) send the same Calls, so both behave
exactly alike. Each method's docstring describes the operation as the
clients expose it.
"""

from __future__ import annotations

import builtins
import enum
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Any, Generic, Literal, TypeVar, Union
from urllib.parse import quote

import httpx

from kvapi import __version__
from kvapi.client.errors import HTTP_ERROR_CODE, KvError, error_for
from kvapi.errors import REGISTRY

T = TypeVar("T")


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset.UNSET
"""Default of `ttl` arguments: the TTL is not sent, so the operation's own
default applies. That is the plan's default TTL for set, setnx and mset,
and the current TTL for cas. `ttl=None` sends null, so the key never expires."""

Ttl = Union[int, None, Literal[_Unset.UNSET]]

# Exponential backoff for a 429 without a usable Retry-After header.
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0

# Statuses that only one registered code uses, to classify error responses
# without a kvapi error body (from a proxy, for example).
_STATUS_COUNTS = Counter(entry.http_status for entry in REGISTRY)
_CODE_BY_STATUS = {entry.http_status: entry.code for entry in REGISTRY if _STATUS_COUNTS[entry.http_status] == 1}


@dataclass(frozen=True)
class Entry:
    """A key's value with its version and remaining TTL in seconds (None: no expiry)."""

    key: str
    value: Any
    version: str
    ttl: int | None


@dataclass(frozen=True)
class KeyInfo:
    """A listed key with its remaining TTL in seconds (None: no expiry) and
    its tier."""

    key: str
    ttl: int | None
    ephemeral: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a key listing; `cursor` is None on the last page."""

    keys: builtins.list[KeyInfo]
    cursor: str | None


@dataclass(frozen=True)
class Rule:
    """An access rule: keys matching `pattern` are readable by the `read`
    role and writable by the `write` role. `order` is the creation rank."""

    pattern: str
    read: str
    write: str
    order: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rule:
        return cls(data["pattern"], data["read"], data["write"], data.get("order"))


@dataclass(frozen=True)
class Explanation:
    """Which rule decides access to `key` for one requester, and what it grants."""

    key: str
    rule: Rule | None
    read: bool
    write: bool


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and the parser of its response."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str] | None = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def encode_key(key: str) -> str:
    """Percent-encode a key as one path segment, '/' included. "." and ".."
    are encoded too, since HTTP clients resolve them as dot segments."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    try:
        encoded = quote(key, safe="")
    except UnicodeEncodeError as error:
        raise error_for("KV_INVALID_REQUEST", f"invalid key {key!r}: not encodable as UTF-8 ({error.reason})") from None
    if encoded in (".", ".."):
        encoded = encoded.replace(".", "%2E")
    return encoded


def encode_json(data: Any) -> bytes:
    """Serialise a request body. NaN and infinities raise ValueError, since
    JSON cannot represent them."""
    return json.dumps(data, allow_nan=False, separators=(",", ":")).encode("utf-8")


def decode_json(response: httpx.Response) -> Any:
    """Parse a JSON response. Python's json keeps integers of any size exact."""
    return json.loads(response.content)


def error_from_response(response: httpx.Response) -> KvError:
    """Build the KvError of an error response: from its {"error": {...}} body,
    else from its status alone."""
    try:
        body = decode_json(response)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        extra = {name: value for name, value in error.items() if name not in ("code", "message")}
        if "retry_after" not in extra and response.status_code == 429:
            retry_after = retry_after_seconds(response)
            if retry_after is not None:
                extra["retry_after"] = retry_after
        return error_for(error["code"], str(error.get("message", "")), response.status_code, **extra)

    code = _CODE_BY_STATUS.get(response.status_code, HTTP_ERROR_CODE)
    text = response.text[:200]
    message = f"HTTP {response.status_code} {response.reason_phrase} from {response.request.method} {response.request.url.path}: {text}"
    extra = {}
    if response.status_code == 429:
        retry_after = retry_after_seconds(response)
        if retry_after is not None:
            extra["retry_after"] = retry_after
    return error_for(code, message, response.status_code, **extra)


def checked_json(response: httpx.Response) -> Any:
    """Return the parsed body of a successful response, or raise its KvError."""
    if response.status_code >= 400:
        raise error_from_response(response)
    return decode_json(response)


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Return the Retry-After header in seconds (delay or HTTP date), or None."""
    header = response.headers.get("retry-after")
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def retry_delay(response: httpx.Response, attempt: int, retries: int) -> float | None:
    """Return how long to wait before retrying a rate-limited request, or
    None when the response is final. `attempt` counts retries already made."""
    if response.status_code != 429 or attempt >= retries:
        return None
    delay = retry_after_seconds(response)
    if delay is None:
        delay = min(BACKOFF_FIRST_SECONDS * 2**attempt, BACKOFF_MAX_SECONDS)
    return delay


def unavailable_error(error: httpx.TransportError, base_url: httpx.URL) -> KvError:
    return error_for("KV_UNAVAILABLE", f"cannot reach the kvapi server at {base_url}: {error!r}")


def auth_headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": f"kvapi-python/{__version__}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _ttl_fields(ttl: Ttl) -> dict[str, Any]:
    return {} if ttl is UNSET else {"ttl": ttl}


def _touch_param(touch: bool | int | None) -> dict[str, str] | None:
    if touch is None or touch is False:
        return None
    if touch is True:
        return {"touch": "true"}
    if isinstance(touch, int):
        return {"touch": str(touch)}
    raise TypeError(f"touch must be True or a number of seconds, not {touch!r}")


def _field(name: str) -> Callable[[httpx.Response], Any]:
    return lambda response: checked_json(response)[name]


def _parse_get(response: httpx.Response) -> Entry | None:
    if response.status_code == 404:
        body = None
        try:
            body = decode_json(response)
        except ValueError:
            pass
        if isinstance(body, dict) and "value" in body and body.get("error", {}).get("code") == "KV_NOT_FOUND":
            return None
    body = checked_json(response)
    return Entry(body["key"], body["value"], body["version"], body["ttl"])


def _parse_cas(response: httpx.Response) -> bool:
    if response.status_code == 409:
        error = error_from_response(response)
        if error.code == "KV_CAS_MISMATCH":
            return False
        raise error
    return checked_json(response)["swapped"]


def _parse_page(response: httpx.Response) -> Page:
    body = checked_json(response)
    return Page([KeyInfo(item["key"], item["ttl"], item.get("ephemeral", False)) for item in body["keys"]], body["cursor"])


def _parse_explanation(response: httpx.Response) -> Explanation:
    body = checked_json(response)
    rule = Rule.from_json(body["rule"]) if body.get("rule") is not None else None
    return Explanation(body["key"], rule, body["read"], body["write"])


def _parse_none(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_from_response(response)


class Operations:
    """Builders of the Calls of one app's operations."""

    def __init__(self, app_id: str) -> None:
        self.app_id = app_id
        self._base = f"/v1/{quote(app_id, safe='')}"

    def _key_call(self, method: str, key: str, parse: Callable[[httpx.Response], T], body: Any = None,
                  params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Call[T]:
        headers = dict(headers or {})
        content = None
        if body is not None:
            content = encode_json(body)
            headers["Content-Type"] = "application/json"
        return Call(method, f"{self._base}/kv/{encode_key(key)}", parse, params, content, headers)

    def _app_call(self, method: str, path: str, parse: Callable[[httpx.Response], T], body: Any = None,
                  params: dict[str, str] | None = None) -> Call[T]:
        headers = {}
        content = None
        if body is not None:
            content = encode_json(body)
            headers["Content-Type"] = "application/json"
        return Call(method, f"{self._base}/{path}", parse, params, content, headers)

    def get(self, key: str, *, touch: bool | int | None = None) -> Call[Any]:
        """Return the value of `key`, or None when the key is missing or expired.

        `touch=True` resets an expiring key's TTL to the plan's default and
        `touch=N` to N seconds; a key without expiry keeps none.
        """
        return self._key_call("GET", key, _value_of_entry, params=_touch_param(touch))

    def get_entry(self, key: str, *, touch: bool | int | None = None) -> Call[Entry | None]:
        """Return the Entry (key, value, version, ttl) of `key`, or None when
        it is missing. `touch` works as in get()."""
        return self._key_call("GET", key, _parse_get, params=_touch_param(touch))

    def set(self, key: str, value: Any, *, ttl: Ttl = UNSET, keep_ttl: bool = False, ephemeral: bool = False,
            if_version: str | None = None, if_absent: bool = False) -> Call[str]:
        """Write `key` and return its new version.

        The write replaces the value, the TTL and the tier. `ttl` is in
        seconds; omitted, the key gets the plan's default TTL (never the old
        one), and None means no expiry. `keep_ttl=True` keeps the current
        expiry instead (a new key gets the default). `ephemeral=True` stores
        the key in the ephemeral tier, which a crash may empty.
        `if_version` writes only when the key's current version is that one,
        and `if_absent` only when the key is missing; otherwise
        KvVersionMismatchError is raised.
        """
        body: dict[str, Any] = {"value": value, **_ttl_fields(ttl)}
        if keep_ttl:
            body["keepTtl"] = True
        if ephemeral:
            body["ephemeral"] = True
        headers = {}
        if if_version is not None:
            headers["If-Match"] = f'"{if_version}"'
        if if_absent:
            headers["If-None-Match"] = "*"
        return self._key_call("PUT", key, _field("version"), body, headers=headers)

    def setex(self, key: str, value: Any, ttl: int, *, ephemeral: bool = False) -> Call[str]:
        """Write `key` with a TTL of `ttl` seconds (required) and return its new version."""
        return self._key_call("POST", key, _field("version"), {"op": "setex", "value": value, "ttl": ttl, "ephemeral": ephemeral})

    def setnx(self, key: str, value: Any, *, ttl: Ttl = UNSET, ephemeral: bool = False) -> Call[bool]:
        """Write `key` only when it is missing or expired; return whether it was written."""
        body = {"op": "setnx", "value": value, **_ttl_fields(ttl), "ephemeral": ephemeral}
        return self._key_call("POST", key, _field("created"), body)

    def cas(self, key: str, expected: Any, new: Any, *, ttl: Ttl = UNSET) -> Call[bool]:
        """Replace the value of `key` with `new` when it equals `expected`;
        return whether it did.

        Values compare by JSON meaning (object key order and 1 vs 1.0 do not
        matter). `expected=None` means "the key must be missing" and
        `new=None` deletes the key. The key keeps its TTL and tier unless
        `ttl` is given; a key created by the swap gets the default TTL.
        """
        body = {"op": "cas", "expected": expected, "next": new, **_ttl_fields(ttl)}
        return self._key_call("POST", key, _parse_cas, body)

    def incr(self, key: str, by: int = 1) -> Call[int]:
        """Add `by` to the integer counter at `key` and return the new value.

        A missing key starts at 0 with the default TTL; an existing key keeps
        its TTL and tier. Raises KvNotACounterError when the value is not a
        JSON integer and KvCounterOverflowError past the signed 64-bit range.
        """
        return self._key_call("POST", key, _field("value"), {"op": "incr", "by": by})

    def decr(self, key: str, by: int = 1) -> Call[int]:
        """Subtract `by` from the integer counter at `key`; see incr()."""
        return self._key_call("POST", key, _field("value"), {"op": "decr", "by": by})

    def exists(self, key: str) -> Call[bool]:
        """Return whether `key` exists (and has not expired)."""
        return self._key_call("POST", key, _field("exists"), {"op": "exists"})

    def delete(self, key: str, *, if_version: str | None = None) -> Call[bool]:
        """Delete `key` and return whether it existed. With `if_version`, the
        key is deleted only at that version (else KvVersionMismatchError)."""
        headers = {"If-Match": f'"{if_version}"'} if if_version is not None else None
        return self._key_call("DELETE", key, _field("deleted"), headers=headers)

    def expire(self, key: str, ttl: int | None) -> Call[bool]:
        """Give `key` a TTL of `ttl` seconds from now, or no expiry with None;
        return False when the key is missing."""
        return self._key_call("POST", key, _field("updated"), {"op": "expire", "ttl": ttl})

    def ttl(self, key: str) -> Call[int | None]:
        """Return the remaining TTL of `key` in seconds, rounded up; None for
        a key without expiry and for a missing key (see exists())."""
        return self._key_call("POST", key, _field("ttl"), {"op": "ttl"})

    def mget(self, keys: Iterable[str]) -> Call[builtins.list[Any]]:
        """Return the values of up to 1000 keys in order, None for each missing key."""
        return self._app_call("POST", "kv", _field("values"), {"op": "mget", "keys": builtins.list(keys)})

    def mset(self, entries: Mapping[str, Any], *, ttl: Ttl = UNSET, ephemeral: bool = False) -> Call[int]:
        """Write up to 1000 keys, all or nothing, each with `ttl` (default:
        the plan's default TTL) in the same tier; return the number written."""
        body = {"op": "mset", "entries": dict(entries), **_ttl_fields(ttl), "ephemeral": ephemeral}
        return self._app_call("POST", "kv", _field("count"), body)

    def list_page(self, *, prefix: str | None = None, cursor: str | None = None, limit: int | None = None) -> Call[Page]:
        """Return one Page of keys in byte order, starting after `cursor`;
        `limit` is the page size, 1 to 1000 (default 100). Needs a service key."""
        params = {}
        if prefix:
            params["prefix"] = prefix
        if cursor is not None:
            params["cursor"] = cursor
        if limit is not None:
            params["limit"] = str(limit)
        return self._app_call("GET", "kv", _parse_page, params=params or None)

    def expose(self, pattern: str, read: str, write: str) -> Call[None]:
        """Create the access rule `pattern` with the roles `read` and `write`
        (each "deny", "public", "authed" or "owner"). Exposing a pattern
        again with the same roles changes nothing; with other roles it
        raises KvExposeConflictError."""
        return self._app_call("PUT", "kv-rules", _parse_none, {"pattern": pattern, "read": read, "write": write})

    def unexpose(self, pattern: str) -> Call[bool]:
        """Remove the access rule `pattern`; return whether it existed."""
        return self._app_call("DELETE", "kv-rules", _field("removed"), params={"pattern": pattern})

    def list_rules(self) -> Call[builtins.list[Rule]]:
        """Return the app's access rules in creation order."""
        return self._app_call("GET", "kv-rules", lambda response: [Rule.from_json(rule) for rule in checked_json(response)["rules"]])

    def explain(self, key: str, user_id: str | None = None, role: str | None = None) -> Call[Explanation]:
        """Return which rule decides access to `key` for a requester: the user
        `user_id` with `role` (default "authenticated"), or an anonymous
        request when `user_id` is None."""
        return self._app_call("POST", "kv-rules/explain", _parse_explanation, {"key": key, "user": explain_user(user_id, role)})


def explain_user(user_id: str | None, role: str | None) -> dict[str, str] | None:
    """Return the requester of an explain call: None for anonymous, else {"id", "role"?}."""
    if user_id is None:
        if role is not None:
            raise ValueError("explain: a role needs a user_id; omit both for an anonymous request")
        return None
    user = {"id": user_id}
    if role is not None:
        user["role"] = role
    return user


def _value_of_entry(response: httpx.Response) -> Any:
    entry = _parse_get(response)
    return None if entry is None else entry.value
