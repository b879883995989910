"""Extraction of keys from the raw request path.

ASGI servers decode %2F into "/" in scope["path"], and routers collapse
"//" and resolve ".." segments, so a key routed through them would lose
its exact text. This wrapper runs before Litestar's router: for every path
under /v1/{app_id}/kv/ it decodes the key once from scope["raw_path"],
stores it and the app id in the scope, and rewrites the path to
/v1/{app_id}/kv/key, which always matches the key routes. Handlers take the
key and app id from the scope, never from the rewritten path.

The hottest methods (GET and PUT of a key) can skip Litestar: a handler
given for the method serves the request from the decoded key as raw ASGI.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

# Scope entries set for key routes; the handlers read them.
KEY_SCOPE = "kvapi.key"
KEY_ERROR_SCOPE = "kvapi.key_error"
APP_ID_SCOPE = "kvapi.app_id"

_KEY_PATH = re.compile(rb"^/v1/([^/]*)/kv/(.*)$", re.DOTALL)
_APP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def decode_key(raw: bytes) -> str:
    """Percent-decode a raw path segment exactly once into a UTF-8 key.
    Raises ValueError naming the problem."""
    decoded = unquote_to_bytes(raw)
    try:
        key = decoded.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"invalid key: the percent-decoded path is not valid UTF-8 (byte {error.start}); "
            "encode the key as UTF-8 before percent-encoding it"
        ) from None
    if "\x00" in key:
        raise ValueError("invalid key: keys cannot contain U+0000 (%00)")
    return key


# handler(scope, receive, send, app_id, key) serves a request for a non-empty, decoded key.
KeyHandler = Callable[[Scope, Any, Any, str, str], Awaitable[None]]


class KeyPathRouter:
    """ASGI wrapper that routes /v1/{app_id}/kv/{key} by its raw path."""

    def __init__(self, app: ASGIApp, handlers: dict[str, KeyHandler] | None = None) -> None:
        self.app = app
        self.handlers = handlers or {}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
            match = _KEY_PATH.match(raw_path)
            if match is not None:
                scope = dict(scope)
                app_id = unquote_to_bytes(match.group(1)).decode("utf-8", errors="replace")
                try:
                    scope[KEY_SCOPE] = decode_key(match.group(2))
                except ValueError as error:
                    scope[KEY_ERROR_SCOPE] = str(error)
                scope[APP_ID_SCOPE] = app_id
                key = scope.get(KEY_SCOPE)
                handler = self.handlers.get(scope["method"])
                if handler is not None and key:
                    await handler(scope, receive, send, app_id, key)
                    return
                # A placeholder replaces app ids that are not valid path
                # segments, and the handler reports them as unknown apps.
                routable_app_id = app_id if _APP_ID.fullmatch(app_id) else "_"
                scope["path"] = f"/v1/{routable_app_id}/kv/key"
                scope["raw_path"] = scope["path"].encode("ascii")
        await self.app(scope, receive, send)
