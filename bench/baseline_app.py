"""Litestar app that returns one constant JSON body: the ceiling for kvapi's HTTP API.

It is served by granian exactly as `kvapi serve` serves kvapi (ASGI
interface, same worker count, same logging configuration), so the gap
between the two is what kvapi's handler, its pool and the database cost.

    python -m bench.baseline_app --port 8081 --workers 2
"""

from __future__ import annotations

import argparse

import msgspec
from litestar import Litestar, Response, get

from kvapi import logs

# The shape and size of kvapi's response to GET /v1/bench/kv/k:1 for a 100-byte value.
CONSTANT_BODY = msgspec.json.encode(
    {"key": "k:1", "value": "v" * 98, "ttl": 2592000, "version": "100001"}
)


@get("/const")
async def constant() -> Response:
    return Response(content=CONSTANT_BODY, media_type="application/json", headers={"ETag": '"100001"'})


def create_app() -> Litestar:
    return Litestar(route_handlers=[constant], logging_config=None, openapi_config=None)


def main() -> None:
    from granian import Granian
    from granian.constants import Interfaces

    parser = argparse.ArgumentParser(description="Serve the constant-JSON Litestar baseline with granian.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    parser.add_argument("--workers", type=int, default=2, help="granian worker processes (default: 2)")
    args = parser.parse_args()
    logs.configure("INFO")
    Granian(
        "bench.baseline_app:create_app",
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        log_dictconfig=logs.dict_config(),
    ).serve()


if __name__ == "__main__":
    main()
