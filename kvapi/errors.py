"""The error code registry shared by the SQL functions, the HTTP API and the SDK.

Each SQL function raises a SQLSTATE of class KV; this table maps it to the
API code, the HTTP status and the SDK exception name. tests/test_error_registry.py
checks that every SQLSTATE raised under sql/ is registered here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    code: str
    http_status: int
    sqlstate: str | None
    exception: str
    description: str


REGISTRY: tuple[ErrorCode, ...] = (
    ErrorCode("KV_INVALID_REQUEST", 400, "KVINV", "KvInvalidRequestError",
              "bad key, TTL, body, pattern, role or `by`"),
    ErrorCode("KV_UNAUTHORIZED", 401, "KVUNA", "KvUnauthorizedError",
              "bad, expired or foreign token; bad service key"),
    ErrorCode("KV_FORBIDDEN", 403, "KVFOR", "KvForbiddenError", "no rule allows the request"),
    ErrorCode("KV_NOT_FOUND", 404, None, "KvNotFoundError", "missing key (GET and HEAD)"),
    ErrorCode("KV_APP_NOT_FOUND", 404, "KVAPP", "KvAppNotFoundError",
              "unknown app, whatever the credentials"),
    ErrorCode("KV_VERSION_MISMATCH", 412, "KVVER", "KvVersionMismatchError",
              "If-Match or If-None-Match precondition failed"),
    ErrorCode("KV_CAS_MISMATCH", 409, None, "KvCasMismatchError",
              "cas expected value did not match"),
    ErrorCode("KV_EXPOSE_CONFLICT", 409, "KVEXP", "KvExposeConflictError",
              "same pattern exposed with other roles"),
    ErrorCode("KV_NOT_A_COUNTER", 409, "KVNAC", "KvNotACounterError",
              "incr or decr on a value that is not a JSON integer"),
    ErrorCode("KV_COUNTER_OVERFLOW", 409, "KVOVF", "KvCounterOverflowError",
              "incr or decr past the signed 64-bit range"),
    ErrorCode("KV_APP_EXISTS", 409, "KVEXI", "KvAppExistsError", "an app with that id already exists"),
    ErrorCode("KV_VALUE_TOO_LARGE", 413, "KVBIG", "KvValueTooLargeError",
              "value over the plan's size limit"),
    ErrorCode("KV_RATE_LIMITED", 429, "KVRAT", "KvRateLimitedError",
              "over the plan's operations per second"),
    ErrorCode("KV_UNAVAILABLE", 503, None, "KvUnavailableError",
              "the database cannot be reached; retry later"),
    ErrorCode("KV_STORAGE_FULL", 507, "KVFUL", "KvStorageFullError",
              "over the plan's total bytes"),
    ErrorCode("KV_KEYS_EXHAUSTED", 507, "KVKEY", "KvKeysExhaustedError",
              "over the plan's key count"),
)

BY_CODE: dict[str, ErrorCode] = {entry.code: entry for entry in REGISTRY}
BY_SQLSTATE: dict[str, ErrorCode] = {entry.sqlstate: entry for entry in REGISTRY if entry.sqlstate}


class KvError(Exception):
    """An error with a registered code. `extra` contains additional fields of
    the error body, such as `limit` and `actual`."""

    def __init__(self, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.entry = BY_CODE[code]
        self.message = message
        self.extra = extra

    @property
    def code(self) -> str:
        return self.entry.code

    @property
    def http_status(self) -> int:
        return self.entry.http_status


def markdown_table() -> str:
    """Render the registry as the table in docs/errors.md (a test checks
    that the file matches)."""
    lines = [
        "| HTTP status | code | SQLSTATE | SDK exception | when |",
        "|---|---|---|---|---|",
    ]
    for entry in REGISTRY:
        lines.append(
            f"| {entry.http_status} | `{entry.code}` | {f'`{entry.sqlstate}`' if entry.sqlstate else '-'} "
            f"| `{entry.exception}` | {entry.description} |"
        )
    return "\n".join(lines) + "\n"
