"""`kvapi mcp` driven by the MCP SDK's own client over stdio, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

DEFAULT_TTL = 30 * 86400
DOCS = Path(__file__).resolve().parent.parent / "docs"


def server_environment(base_url: str, app_id: str, service_key: str) -> dict[str, str]:
    return {"KVAPI_URL": base_url, "KVAPI_APP": app_id, "KVAPI_KEY": service_key, "KVAPI_LOG_LEVEL": "WARNING"}


async def run_session(command: str, args: list[str], env: dict[str, str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Start the MCP server, list its tools, and call manage_kv with each argument set in turn."""
    parameters = StdioServerParameters(command=command, args=args, env={**env, "PATH": os.environ.get("PATH", "")})
    async with stdio_client(parameters) as (read_stream, write_stream):
        async with ClientSession(read_stream, write_stream) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            results = [await session.call_tool("manage_kv", arguments) for arguments in calls]
    return {"tools": tools, "results": results}


def tool_output(result: Any) -> Any:
    """Return a successful tool result's JSON, checking that text and structured content agree."""
    assert result.is_error is False, result.content
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def test_manage_kv_tool(http_server, http_app):
    calls = [
        {"action": "set", "key": "greeting", "value": {"text": "hello", "n": 2**70}},
        {"action": "get", "key": "greeting"},
        {"action": "get", "key": "missing"},
        {"action": "set", "key": "forever", "value": [1], "ttl": "never"},
        {"action": "ttl", "key": "forever"},
        {"action": "set", "key": "short", "value": "x", "ttl": 3000},
        {"action": "incr", "key": "hits"},
        {"action": "incr", "key": "hits", "value": 9},
        {"action": "list", "prefix": "g"},
        {"action": "delete", "key": "greeting"},
        {"action": "delete", "key": "greeting"},
        {"action": "expose", "pattern": "public:*", "read": "public", "write": "deny"},
        {"action": "list_rules"},
        {"action": "incr", "key": "forever"},
        {"action": "get"},
        {"action": "set", "key": "k", "value": 1, "ttl": 0},
    ]
    env = server_environment(http_server.base_url, http_app.app_id, http_app.service_key)
    session = asyncio.run(run_session(sys.executable, ["-m", "kvapi", "mcp"], env, calls))

    assert [tool.name for tool in session["tools"]] == ["manage_kv"]
    schema = session["tools"][0].input_schema
    assert schema["required"] == ["action"]
    assert schema["properties"]["action"]["enum"] == ["get", "set", "delete", "list", "incr", "ttl", "expose", "list_rules"]

    results = session["results"]
    set_result = tool_output(results[0])
    assert set_result["key"] == "greeting"
    assert re.fullmatch(r"[0-9]+", set_result["version"])
    assert tool_output(results[1]) == {"key": "greeting", "found": True, "value": {"text": "hello", "n": 2**70}, "ttl": DEFAULT_TTL}
    assert tool_output(results[2]) == {"key": "missing", "found": False, "value": None, "ttl": None}
    assert tool_output(results[3])["key"] == "forever"
    assert tool_output(results[4]) == {"key": "forever", "ttl": None}
    assert tool_output(results[5])["key"] == "short"
    assert tool_output(results[6]) == {"key": "hits", "value": 1}
    assert tool_output(results[7]) == {"key": "hits", "value": 10}
    assert tool_output(results[8]) == {"keys": [{"key": "greeting", "ttl": DEFAULT_TTL}], "next_cursor": None}
    assert tool_output(results[9]) == {"key": "greeting", "deleted": True}
    assert tool_output(results[10]) == {"key": "greeting", "deleted": False}
    assert tool_output(results[11]) == {"pattern": "public:*", "read": "public", "write": "deny"}
    rules = tool_output(results[12])["rules"]
    assert [(rule["pattern"], rule["read"], rule["write"]) for rule in rules] == [("public:*", "public", "deny")]

    assert results[13].is_error is True
    assert results[13].content[0].text.startswith("Error executing tool manage_kv: KV_NOT_A_COUNTER: ")
    assert results[14].is_error is True
    assert results[14].content[0].text == "Error executing tool manage_kv: missing argument key: action get needs key"
    assert results[15].is_error is True
    assert results[15].content[0].text.startswith("Error executing tool manage_kv: KV_INVALID_REQUEST: invalid ttl 0")

    with psycopg.connect(http_server.database_url) as connection:
        expiry = dict(connection.execute(
            "SELECT key, expires_at IS NULL FROM kvapi_data.entries WHERE app_id = %s", [http_app.app_id]
        ).fetchall())
    assert expiry == {"forever": True, "short": False, "hits": False}


def test_docs_mcp_client_configuration(http_server, http_app):
    """The client configuration in docs/cli.md starts a working server."""
    (block,) = re.findall(r"^```json\n(.*?)^```", (DOCS / "cli.md").read_text(), flags=re.DOTALL | re.MULTILINE)
    configuration = json.loads(block)["mcpServers"]["kvapi"]
    assert configuration["command"] == "kvapi"
    assert sorted(configuration["env"]) == ["KVAPI_APP", "KVAPI_KEY", "KVAPI_URL"]
    command = str(Path(sys.executable).parent / configuration["command"])
    env = server_environment(http_server.base_url, http_app.app_id, http_app.service_key)
    calls = [{"action": "set", "key": "configured", "value": True}, {"action": "get", "key": "configured"}]
    session = asyncio.run(run_session(command, configuration["args"], env, calls))
    assert tool_output(session["results"][1]) == {"key": "configured", "found": True, "value": True, "ttl": DEFAULT_TTL}


def test_mcp_without_settings_exits_2():
    env = {name: value for name, value in os.environ.items() if not name.startswith("KVAPI_")}
    result = subprocess.run(
        [sys.executable, "-m", "kvapi", "mcp"], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "kvapi: missing environment variables KVAPI_URL and KVAPI_APP: set the kvapi server URL and the app id\n"
    )
