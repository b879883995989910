"""The HTTP clients: KV (sync) and AsyncKV (async).

Both are thin shells over Operations. Every operation method is generated
from the Operations method of the same name, which builds the request and
parses the response. So the two clients share one implementation, one
signature and one docstring per operation. Only sending (with the opt-in
retry on 429) and the cursor-following list() are written once per shell.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio
import httpx

from kvapi.client._operations import Call, Operations, auth_headers, retry_delay, unavailable_error

logger = logging.getLogger("kvapi.client")

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 10.0


def _client_signature(build: Callable[..., Any]) -> inspect.Signature:
    """Return build's signature with the result type in place of Call[result]."""
    signature = inspect.signature(build)
    annotation = signature.return_annotation
    if isinstance(annotation, str) and annotation.startswith("Call[") and annotation.endswith("]"):
        annotation = annotation[len("Call["):-1]
    return signature.replace(return_annotation=annotation)


def _sync_operation(build: Callable[Concatenate[Operations, P], Call[T]]) -> Callable[Concatenate[KV, P], T]:
    @functools.wraps(build)
    def operation(self: KV, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._send(build(self._operations, *args, **kwargs))

    operation.__signature__ = _client_signature(build)  # type: ignore[attr-defined]
    operation.__qualname__ = f"KV.{build.__name__}"
    operation.__module__ = "kvapi.client"
    return operation


def _async_operation(build: Callable[Concatenate[Operations, P], Call[T]]) -> Callable[Concatenate[AsyncKV, P], Coroutine[Any, Any, T]]:
    @functools.wraps(build)
    async def operation(self: AsyncKV, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._send(build(self._operations, *args, **kwargs))

    operation.__signature__ = _client_signature(build)  # type: ignore[attr-defined]
    operation.__qualname__ = f"AsyncKV.{build.__name__}"
    operation.__module__ = "kvapi.client"
    return operation


def _settings_from_env(overrides: dict[str, Any]) -> dict[str, Any]:
    """Return client arguments from KVAPI_URL, KVAPI_APP and KVAPI_KEY."""
    missing = [name for name in ("KVAPI_URL", "KVAPI_APP") if not os.environ.get(name)]
    if missing:
        noun = "variables" if len(missing) > 1 else "variable"
        raise ValueError(f"missing environment {noun} {' and '.join(missing)}: set the kvapi server URL and the app id")
    return {
        "base_url": os.environ["KVAPI_URL"],
        "app_id": os.environ["KVAPI_APP"],
        "token": os.environ.get("KVAPI_KEY") or None,
        **overrides,
    }


def _log_retry(app_id: str, call: Call[Any], attempt: int, delay: float) -> None:
    logger.info(
        "rate limited; retrying",
        extra={"event": "client.retry", "app_id": app_id, "method": call.method, "attempt": attempt + 1, "delay": delay},
    )


class KV:
    """Synchronous client of one kvapi app over HTTP.

    `token` is a service key of the app or an end user's JWT; without one,
    requests are anonymous. With `retries=N`, a request that gets a 429
    response is retried up to N times, after the Retry-After delay (else
    after an exponential backoff). Errors raise KvError subclasses; a server that cannot be
    reached raises KvUnavailableError.
    """

    def __init__(self, base_url: str, app_id: str, token: str | None = None, *, retries: int = 0,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.app_id = app_id
        self.retries = retries
        self._operations = Operations(app_id)
        self._http = httpx.Client(base_url=base_url, headers=auth_headers(token), timeout=timeout)

    @classmethod
    def from_env(cls, **overrides: Any) -> KV:
        """Create a client from KVAPI_URL, KVAPI_APP and KVAPI_KEY; keyword
        arguments override them."""
        return cls(**_settings_from_env(overrides))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KV:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, params=call.params, content=call.body, headers=call.headers)
            except httpx.TransportError as error:
                raise unavailable_error(error, self._http.base_url) from error
            delay = retry_delay(response, attempt, self.retries)
            if delay is None:
                return call.parse(response)
            _log_retry(self.app_id, call, attempt, delay)
            time.sleep(delay)
            attempt += 1

    def list(self, prefix: str | None = None, limit: int | None = None) -> Iterator[str]:
        """Iterate over every live key (with `prefix`) in byte order,
        fetching pages of `limit` keys (1 to 1000, default 100). Needs a
        service key. A key present for the whole iteration appears once."""
        cursor = None
        while True:
            page = self._send(self._operations.list_page(prefix=prefix, cursor=cursor, limit=limit))
            for info in page.keys:
                yield info.key
            if page.cursor is None:
                return
            cursor = page.cursor

    get = _sync_operation(Operations.get)
    get_entry = _sync_operation(Operations.get_entry)
    set = _sync_operation(Operations.set)
    setex = _sync_operation(Operations.setex)
    setnx = _sync_operation(Operations.setnx)
    cas = _sync_operation(Operations.cas)
    incr = _sync_operation(Operations.incr)
    decr = _sync_operation(Operations.decr)
    exists = _sync_operation(Operations.exists)
    delete = _sync_operation(Operations.delete)
    expire = _sync_operation(Operations.expire)
    ttl = _sync_operation(Operations.ttl)
    mget = _sync_operation(Operations.mget)
    mset = _sync_operation(Operations.mset)
    list_page = _sync_operation(Operations.list_page)
    expose = _sync_operation(Operations.expose)
    unexpose = _sync_operation(Operations.unexpose)
    list_rules = _sync_operation(Operations.list_rules)
    explain = _sync_operation(Operations.explain)


class AsyncKV:
    """Asynchronous client of one kvapi app over HTTP; see KV. Use it as
    `async with AsyncKV(...) as kv:` or call `await kv.aclose()`."""

    def __init__(self, base_url: str, app_id: str, token: str | None = None, *, retries: int = 0,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.app_id = app_id
        self.retries = retries
        self._operations = Operations(app_id)
        self._http = httpx.AsyncClient(base_url=base_url, headers=auth_headers(token), timeout=timeout)

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncKV:
        """Create a client from KVAPI_URL, KVAPI_APP and KVAPI_KEY; keyword
        arguments override them."""
        return cls(**_settings_from_env(overrides))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKV:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, params=call.params, content=call.body, headers=call.headers)
            except httpx.TransportError as error:
                raise unavailable_error(error, self._http.base_url) from error
            delay = retry_delay(response, attempt, self.retries)
            if delay is None:
                return call.parse(response)
            _log_retry(self.app_id, call, attempt, delay)
            await anyio.sleep(delay)
            attempt += 1

    async def list(self, prefix: str | None = None, limit: int | None = None) -> AsyncIterator[str]:
        """Iterate over every live key (with `prefix`) in byte order,
        fetching pages of `limit` keys (1 to 1000, default 100). Needs a
        service key. A key present for the whole iteration appears once."""
        cursor = None
        while True:
            page = await self._send(self._operations.list_page(prefix=prefix, cursor=cursor, limit=limit))
            for info in page.keys:
                yield info.key
            if page.cursor is None:
                return
            cursor = page.cursor

    get = _async_operation(Operations.get)
    get_entry = _async_operation(Operations.get_entry)
    set = _async_operation(Operations.set)
    setex = _async_operation(Operations.setex)
    setnx = _async_operation(Operations.setnx)
    cas = _async_operation(Operations.cas)
    incr = _async_operation(Operations.incr)
    decr = _async_operation(Operations.decr)
    exists = _async_operation(Operations.exists)
    delete = _async_operation(Operations.delete)
    expire = _async_operation(Operations.expire)
    ttl = _async_operation(Operations.ttl)
    mget = _async_operation(Operations.mget)
    mset = _async_operation(Operations.mset)
    list_page = _async_operation(Operations.list_page)
    expose = _async_operation(Operations.expose)
    unexpose = _async_operation(Operations.unexpose)
    list_rules = _async_operation(Operations.list_rules)
    explain = _async_operation(Operations.explain)
