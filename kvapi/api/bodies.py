"""Request bodies of the HTTP API and their decoding.

msgspec checks JSON types here (a TTL must be a JSON integer, so 1.0, "10"
and true fail, as does 1e2, which PostgreSQL's jsonb parser would quietly
normalise). Values stay msgspec.Raw: their exact JSON text goes to
PostgreSQL, which validates and stores it. Ranges and every other rule are
enforced by the SQL functions.
"""

from __future__ import annotations

from typing import Union

import msgspec
from msgspec import UNSET, Raw, UnsetType

from kvapi.errors import KvError

# A JSON integer, JSON null, or absent. Absent maps to SQL NULL (default or
# keep), null to JSON null (no expiry); see kvapi_data.ttl_seconds.
Ttl = Union[int, None, UnsetType]


class PutBody(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    value: Raw
    ttl: Ttl = UNSET
    keep_ttl: bool = False
    ephemeral: bool = False


class SetnxOp(msgspec.Struct, tag_field="op", tag="setnx", forbid_unknown_fields=True):
    value: Raw
    ttl: Ttl = UNSET
    ephemeral: bool = False


class SetexOp(msgspec.Struct, tag_field="op", tag="setex", forbid_unknown_fields=True):
    value: Raw
    ttl: Ttl = UNSET
    ephemeral: bool = False


class CasOp(msgspec.Struct, tag_field="op", tag="cas", forbid_unknown_fields=True):
    expected: Raw
    next: Raw
    ttl: Ttl = UNSET


class IncrOp(msgspec.Struct, tag_field="op", tag="incr", forbid_unknown_fields=True):
    by: int = 1


class DecrOp(msgspec.Struct, tag_field="op", tag="decr", forbid_unknown_fields=True):
    by: int = 1


class ExpireOp(msgspec.Struct, tag_field="op", tag="expire", forbid_unknown_fields=True):
    ttl: Ttl = UNSET


class TtlOp(msgspec.Struct, tag_field="op", tag="ttl", forbid_unknown_fields=True):
    pass


class ExistsOp(msgspec.Struct, tag_field="op", tag="exists", forbid_unknown_fields=True):
    pass


KeyOp = Union[SetnxOp, SetexOp, CasOp, IncrOp, DecrOp, ExpireOp, TtlOp, ExistsOp]


class MgetOp(msgspec.Struct, tag_field="op", tag="mget", forbid_unknown_fields=True):
    keys: list[str]


class MsetOp(msgspec.Struct, tag_field="op", tag="mset", forbid_unknown_fields=True):
    entries: Raw
    ttl: Ttl = UNSET
    ephemeral: bool = False


BatchOp = Union[MgetOp, MsetOp]

class ExposeBody(msgspec.Struct, forbid_unknown_fields=True):
    pattern: str
    read: str
    write: str


class ExplainUser(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    role: str = "authenticated"


class ExplainBody(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    user: ExplainUser | None = None


_decoders: dict[object, msgspec.json.Decoder] = {}

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def decode(body: bytes, body_type: object, usage: str) -> object:
    """Decode a JSON body into body_type, or raise KV_INVALID_REQUEST with
    msgspec's description of the problem and the expected shape."""
    decoder = _decoders.get(body_type)
    if decoder is None:
        decoder = _decoders[body_type] = msgspec.json.Decoder(body_type)
    if not body:
        raise KvError("KV_INVALID_REQUEST", f"invalid request body: the body is empty; send {usage}")
    try:
        # msgspec copies Raw fields without checking their UTF-8.
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise KvError(
            "KV_INVALID_REQUEST", f"invalid request body: not valid UTF-8 at byte {error.start}; send UTF-8 JSON"
        ) from None
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as error:
        raise KvError("KV_INVALID_REQUEST", f"invalid request body: {error}; send {usage}") from None
    except RecursionError:
        raise KvError(
            "KV_INVALID_REQUEST", "invalid request body: JSON nested too deeply; send a value with less nesting"
        ) from None


def raw_text(raw: Raw) -> str:
    """Return the JSON text of a Raw field for a jsonb parameter."""
    return bytes(raw).decode("utf-8")


def ttl_param(ttl: Ttl) -> str | None:
    """Return a TTL as a jsonb parameter: None when absent, "null" for JSON null."""
    if ttl is UNSET:
        return None
    if ttl is None:
        return "null"
    return str(ttl)


def check_by(by: int) -> int:
    if not INT64_MIN <= by <= INT64_MAX:
        raise KvError(
            "KV_INVALID_REQUEST",
            f"invalid by {by}: expected a JSON integer from {INT64_MIN} to {INT64_MAX}",
        )
    return by
