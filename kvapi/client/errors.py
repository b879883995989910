"""Exceptions raised by the kvapi clients.

The subclasses of KvError are generated at import time from
kvapi.errors.REGISTRY, the table that the SQL functions and the HTTP API
use too. So every registered error code has exactly one exception class
here, such as KvCasMismatchError for KV_CAS_MISMATCH.
"""

from __future__ import annotations

from typing import Any

from kvapi.errors import BY_CODE, REGISTRY

# Code of errors whose response carries no kvapi error body, such as an
# HTML page from a proxy in front of the server.
HTTP_ERROR_CODE = "KV_HTTP_ERROR"


class KvError(Exception):
    """An error reported by kvapi, or by the client on its behalf.

    `code` is the API error code (such as "KV_NOT_A_COUNTER") and `message`
    the explanation. `status` is the HTTP status of the response, or the
    status that the registry gives the code when no response was involved.
    `extra` contains every other field of the error body. `limit`, `actual`
    and `retry_after` are None unless the error carries them.
    """

    def __init__(self, code: str, message: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra

    @property
    def limit(self) -> Any:
        return self.extra.get("limit")

    @property
    def actual(self) -> Any:
        return self.extra.get("actual")

    @property
    def retry_after(self) -> float | None:
        return self.extra.get("retry_after")


def _generate_classes() -> dict[str, type[KvError]]:
    classes: dict[str, type[KvError]] = {}
    for entry in REGISTRY:
        classes[entry.code] = type(
            entry.exception,
            (KvError,),
            {
                "__doc__": f"{entry.code} (HTTP {entry.http_status}): {entry.description}.",
                "__module__": __name__,
                "code": entry.code,
            },
        )
    return classes


_CLASSES_BY_CODE = _generate_classes()
globals().update({cls.__name__: cls for cls in _CLASSES_BY_CODE.values()})

__all__ = ["KvError", "HTTP_ERROR_CODE", "error_class", "error_for", *(cls.__name__ for cls in _CLASSES_BY_CODE.values())]


def error_class(code: str) -> type[KvError]:
    """Return the exception class of an error code, or KvError for a code
    that the registry does not list (such as KV_INTERNAL_ERROR)."""
    return _CLASSES_BY_CODE.get(code, KvError)


def error_for(code: str, message: str, status: int | None = None, **extra: Any) -> KvError:
    """Build the exception for an error code. Without a status, the one that
    the registry gives the code is used."""
    if status is None and code in BY_CODE:
        status = BY_CODE[code].http_status
    return error_class(code)(code, message, status, **extra)
