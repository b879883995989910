"""An MCP server with one tool, manage_kv, for the keys and rules of one kvapi app.

`kvapi mcp` serves it over stdio. It reaches the app through the SDK
(kvapi.client.AsyncKV) with the server URL, app id and token in KVAPI_URL,
KVAPI_APP and KVAPI_KEY; the tool can do what that token may do.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from kvapi import __version__
from kvapi.client import UNSET, AsyncKV, KvError

Action = Literal["get", "set", "delete", "list", "incr", "ttl", "expose", "list_rules"]
Role = Literal["deny", "public", "authed", "owner"]

# Keys per `list` call; the result's next_cursor fetches the next page.
LIST_PAGE_SIZE = 100

TOOL_DESCRIPTION = """Read and write the keys of a kvapi app, and manage its access rules.

Actions and their arguments:
- get: key. Returns {key, found, value, ttl}.
- set: key, value (any JSON except null), ttl (optional). Returns {key, version}.
- delete: key. Returns {key, deleted}.
- list: prefix and cursor (optional). Returns {keys: [{key, ttl}], next_cursor}; pass next_cursor back for the next page.
- incr: key, value (optional integer to add, default 1; negative subtracts). Returns {key, value}.
- ttl: key. Returns {key, ttl}.
- expose: pattern, read, write. Returns {pattern, read, write}.
- list_rules: no arguments. Returns {rules: [{pattern, read, write, order}]}.

ttl is in seconds; omitted, a written key gets the app's default TTL, and "never" means no expiry.
A ttl of null in a result means the key never expires. Patterns separate segments with ':';
'*' matches one segment, '**' any text, '{user.id}' the requesting user's id.
Roles: deny, public (anyone), authed (any signed-in user), owner (the user named by {user.id})."""


def _require(action: str, **arguments: Any) -> None:
    missing = [name for name, value in arguments.items() if value is None]
    if missing:
        raise ToolError(f"missing argument {', '.join(missing)}: action {action} needs {', '.join(arguments)}")


async def run_action(kv: AsyncKV, action: str, key: str | None, value: Any, ttl: int | str | None, prefix: str | None,
                     cursor: str | None, pattern: str | None, read: str | None, write: str | None) -> dict[str, Any]:
    """Run one manage_kv action and return its result."""
    if action == "get":
        _require(action, key=key)
        entry = await kv.get_entry(key)
        if entry is None:
            return {"key": key, "found": False, "value": None, "ttl": None}
        return {"key": key, "found": True, "value": entry.value, "ttl": entry.ttl}

    if action == "set":
        _require(action, key=key, value=value)
        ttl_argument: Any = ttl
        if ttl is None:
            ttl_argument = UNSET
        elif ttl == "never":
            ttl_argument = None
        return {"key": key, "version": await kv.set(key, value, ttl=ttl_argument)}

    if action == "delete":
        _require(action, key=key)
        return {"key": key, "deleted": await kv.delete(key)}

    if action == "list":
        page = await kv.list_page(prefix=prefix, cursor=cursor, limit=LIST_PAGE_SIZE)
        return {"keys": [{"key": info.key, "ttl": info.ttl} for info in page.keys], "next_cursor": page.cursor}

    if action == "incr":
        _require(action, key=key)
        by = 1 if value is None else value
        if isinstance(by, bool) or not isinstance(by, int):
            raise ToolError(f"invalid value {by!r} for incr: expected an integer amount")
        return {"key": key, "value": await kv.incr(key, by)}

    if action == "ttl":
        _require(action, key=key)
        return {"key": key, "ttl": await kv.ttl(key)}

    if action == "expose":
        _require(action, pattern=pattern, read=read, write=write)
        await kv.expose(pattern, read, write)
        return {"pattern": pattern, "read": read, "write": write}

    if action == "list_rules":
        rules = await kv.list_rules()
        return {"rules": [{"pattern": rule.pattern, "read": rule.read, "write": rule.write, "order": rule.order} for rule in rules]}

    raise ToolError(f"unknown action {action!r}")


def build_server(kv: AsyncKV) -> MCPServer:
    """Create the MCP server whose manage_kv tool works on kv's app."""

    @contextlib.asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            await kv.aclose()

    server = MCPServer(
        name="kvapi",
        version=__version__,
        instructions=f"Key-value store of the kvapi app {kv.app_id!r}; use the manage_kv tool.",
        lifespan=lifespan,
    )

    @server.tool(name="manage_kv", description=TOOL_DESCRIPTION)
    async def manage_kv(
        action: Action,
        key: str | None = None,
        value: Any = None,
        ttl: int | Literal["never"] | None = None,
        prefix: str | None = None,
        cursor: str | None = None,
        pattern: str | None = None,
        read: Role | None = None,
        write: Role | None = None,
    ) -> dict[str, Any]:
        try:
            return await run_action(kv, action, key, value, ttl, prefix, cursor, pattern, read, write)
        except KvError as error:
            raise ToolError(f"{error.code}: {error.message}") from error

    return server


def main() -> None:
    """Serve the tool over stdio. Raises ValueError when KVAPI_URL or KVAPI_APP is missing."""
    build_server(AsyncKV.from_env()).run("stdio")
