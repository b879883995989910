"""`kvapi kv ...` and `kvapi rules ...` end to end against a real server."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

import kvapi.cli
from conftest import App, create_app, create_database, drop_database, start_kvapi_server, stop_kvapi_server
from kvapi.client import KV

DEFAULT_TTL = 30 * 86400
DOCS = Path(__file__).resolve().parent.parent / "docs"
VERSION = re.compile(r"[0-9]+\n")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Cli:
    """Runs the kvapi command line with KVAPI_URL, KVAPI_APP and KVAPI_KEY set
    for one app: in this process through kvapi.cli.main, which is fast, or
    as a real `python -m kvapi` process with separate_process=True."""

    env: dict[str, str]

    def __call__(self, *args: str, stdin: str = "", separate_process: bool = False) -> Result:
        if separate_process:
            return run_process(list(args), self.env, stdin)
        return run_in_process(list(args), self.env, stdin)


def run_process(args: list[str], env: dict[str, str], stdin: str) -> Result:
    completed = subprocess.run(
        [sys.executable, "-m", "kvapi", *args], input=stdin, capture_output=True, text=True, timeout=120, env=env,
    )
    return Result(completed.returncode, completed.stdout, completed.stderr)


def run_in_process(args: list[str], env: dict[str, str], stdin: str) -> Result:
    """Run kvapi.cli.main with env's KVAPI_* variables and stdin, and restore
    the environment and the logging configuration that main() changes."""
    saved_environ = os.environ.copy()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        for name in [name for name in os.environ if name.startswith("KVAPI_")]:
            del os.environ[name]
        os.environ.update({name: value for name, value in env.items() if name.startswith("KVAPI_")})
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), replaced_stdin(stdin):
            try:
                returncode = kvapi.cli.main(args)
            except SystemExit as exit:
                returncode = exit.code
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return Result(returncode, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def replaced_stdin(text: str) -> Iterator[None]:
    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def client_env(base_url: str, app: App) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KVAPI_") and name != "DATABASE_URL"}
    env.update(KVAPI_URL=base_url, KVAPI_APP=app.app_id, KVAPI_KEY=app.service_key)
    return env


@pytest.fixture
def cli(http_server, http_app) -> Cli:
    return Cli(client_env(http_server.base_url, http_app))


@pytest.fixture
def kv(http_server, http_app) -> Iterator[KV]:
    with KV(http_server.base_url, http_app.app_id, http_app.service_key) as client:
        yield client


@pytest.fixture(scope="module")
def second_server(pg_server, template_url, tmp_path_factory):
    """A second `kvapi serve` on a database of its own, to import into."""
    name = f"kvapi_cli_import_{os.getpid()}"
    url = create_database(pg_server, name)
    server = start_kvapi_server(url, tmp_path_factory.mktemp("second_server") / "serve.log")
    try:
        yield server
    finally:
        stop_kvapi_server(server)
        drop_database(pg_server, name)


def assert_ttl_near(ttl: int, expected: int, started: float) -> None:
    """Check a TTL set to `expected` seconds at some point after `started` (time.monotonic())."""
    elapsed = time.monotonic() - started
    assert expected - elapsed - 1 <= ttl <= expected


def test_set_and_get(cli):
    result = cli("kv", "set", "greeting", '"hello"')
    assert result.returncode == 0
    assert VERSION.fullmatch(result.stdout)
    assert result.stderr == ""
    version = result.stdout.strip()

    result = cli("kv", "get", "greeting")
    assert result.returncode == 0
    assert result.stdout == '"hello"\n'
    assert result.stderr == ""
    assert cli("kv", "get", "greeting", "--raw").stdout == "hello\n"
    result = cli("kv", "get", "greeting", "--json")
    assert json.loads(result.stdout) == {"key": "greeting", "value": "hello", "ttl": DEFAULT_TTL, "version": version}


def test_get_missing_key_exits_1(cli):
    result = cli("kv", "get", "nope", separate_process=True)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "kvapi: KV_NOT_FOUND: key 'nope' not found\n"


def test_set_options(cli, kv, http_server, http_app):
    assert cli("kv", "set", "forever", "[1, 2]", "--ttl", "none").returncode == 0
    assert kv.get_entry("forever").ttl is None
    started = time.monotonic()
    assert cli("kv", "set", "text", "plain words", "--string", "--ttl", "100").returncode == 0
    assert kv.get("text") == "plain words"
    assert_ttl_near(kv.ttl("text"), 100, started)
    assert cli("kv", "set", "text", "2", "--keep-ttl").returncode == 0
    assert kv.get("text") == 2
    assert_ttl_near(kv.ttl("text"), 100, started)
    assert cli("kv", "set", "from/stdin", "-", stdin='{"big": 123456789012345678901234567890}\n').returncode == 0
    assert kv.get("from/stdin") == {"big": 123456789012345678901234567890}
    assert cli("kv", "set", "eph", "1", "--ephemeral").returncode == 0
    with psycopg.connect(http_server.database_url) as connection:
        rows = connection.execute(
            "SELECT count(*) FROM kvapi_data.ephemeral_entries WHERE app_id = %s AND key = 'eph'", [http_app.app_id]
        ).fetchone()
    assert rows == (1,)


def test_set_if_version(cli, kv):
    version = kv.set("v", 1)
    kv.set("v", 2)
    result = cli("kv", "set", "v", "3", "--if-version", version)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kvapi: KV_VERSION_MISMATCH: ")
    assert kv.get("v") == 2


def test_set_invalid_json_exits_2(cli):
    result = cli("kv", "set", "k", "abc")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "kvapi: invalid value 'abc': not JSON (Expecting value: line 1 column 1 (char 0)); "
        "quote strings as JSON, such as '\"text\"', or pass --string\n"
    )
    assert cli("kv", "set", "k", "NaN").returncode == 2


def test_counters_delete_expire_ttl(cli, kv):
    assert cli("kv", "incr", "n").stdout == "1\n"
    assert cli("kv", "incr", "n", "--by", "41").stdout == "42\n"
    assert cli("kv", "decr", "n", "--by", "2").stdout == "40\n"
    assert cli("kv", "decr", "n", "--json").stdout == '{"key": "n", "value": 39}\n'
    assert cli("kv", "expire", "n", "none").stdout == "true\n"
    assert cli("kv", "ttl", "n").stdout == "null\n"
    assert cli("kv", "ttl", "n", "--json").stdout == '{"key": "n", "ttl": null}\n'
    assert cli("kv", "expire", "missing", "10", "--json").stdout == '{"key": "missing", "updated": false}\n'
    assert cli("kv", "del", "n").stdout == "true\n"
    assert cli("kv", "del", "n", "--json").stdout == '{"key": "n", "deleted": false}\n'
    assert kv.exists("n") is False


def test_expire_sets_ttl(cli, kv):
    kv.set("e", 1)
    started = time.monotonic()
    result = cli("kv", "expire", "e", "500")
    assert result.returncode == 0
    assert result.stdout == "true\n"
    assert_ttl_near(kv.ttl("e"), 500, started)


def test_server_error_exits_2(cli, kv):
    kv.set("s", "text")
    result = cli("kv", "incr", "s", separate_process=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kvapi: KV_NOT_A_COUNTER: ")
    assert kv.get("s") == "text"


def test_list_and_mget(cli, kv):
    kv.mset({"b:1": 1, "b:2": {"x": [1]}, "b/3": "three", "c": True})
    assert cli("kv", "list").stdout == "b/3\nb:1\nb:2\nc\n"
    assert cli("kv", "list", "--prefix", "b:").stdout == "b:1\nb:2\n"
    assert cli("kv", "list", "--limit", "2").stdout == "b/3\nb:1\n"
    assert json.loads(cli("kv", "list", "--prefix", "b:", "--json").stdout) == [
        {"key": "b:1", "ttl": DEFAULT_TTL}, {"key": "b:2", "ttl": DEFAULT_TTL},
    ]
    assert cli("kv", "mget", "b:2", "none", "c").stdout == '{"x": [1]}\nnull\ntrue\n'
    assert json.loads(cli("kv", "mget", "b/3", "none", "--json").stdout) == [
        {"key": "b/3", "value": "three"}, {"key": "none", "value": None},
    ]


def test_flags_override_environment(http_server, http_app):
    env = client_env("http://127.0.0.1:9", App("wrong_app", "kvs_wrong"))
    cli = Cli(env)
    args = ["--url", http_server.base_url, "--app", http_app.app_id, "--key", http_app.service_key]
    assert cli("kv", "set", "flagged", "7", *args).returncode == 0
    assert cli("kv", "get", "flagged", *args).stdout == "7\n"


def test_missing_settings_exit_2(http_server, http_app):
    env = client_env(http_server.base_url, http_app)
    del env["KVAPI_URL"]
    result = Cli(env)("kv", "get", "k")
    assert result.returncode == 2
    assert result.stderr == "kvapi: missing server URL: pass --url or set KVAPI_URL\n"
    env = client_env(http_server.base_url, http_app)
    del env["KVAPI_APP"]
    result = Cli(env)("kv", "get", "k")
    assert result.returncode == 2
    assert result.stderr == "kvapi: missing app id: pass --app or set KVAPI_APP\n"


def test_wrong_key_and_unreachable_server(http_server, http_app):
    result = Cli(client_env(http_server.base_url, App(http_app.app_id, "kvs_wrong")))("kv", "get", "k")
    assert result.returncode == 2
    assert result.stderr.startswith("kvapi: KV_UNAUTHORIZED: ")
    result = Cli(client_env("http://127.0.0.1:9", http_app))("kv", "get", "k")
    assert result.returncode == 2
    assert result.stderr.startswith("kvapi: KV_UNAVAILABLE: cannot reach the kvapi server at http://127.0.0.1:9")


def test_usage_errors_exit_2(cli):
    result = cli("kv", "get")
    assert result.returncode == 2
    assert "the following arguments are required: KEY" in result.stderr
    result = cli("kv", "set", "k", "1", "--ttl", "soon")
    assert result.returncode == 2
    assert "invalid TTL 'soon': expected whole seconds or none" in result.stderr


def test_rules_commands(cli):
    result = cli("rules", "expose", "public:*", "--read", "public", "--write", "deny")
    assert result.returncode == 0
    assert result.stdout == ""
    assert cli("rules", "expose", "users:{user.id}:**", "--read", "owner", "--write", "owner", "--json").stdout == (
        '{"pattern": "users:{user.id}:**", "read": "owner", "write": "owner"}\n'
    )
    assert cli("rules", "list").stdout == "public:*\tread=public\twrite=deny\nusers:{user.id}:**\tread=owner\twrite=owner\n"
    rules = json.loads(cli("rules", "list", "--json").stdout)
    assert [(rule["pattern"], rule["read"], rule["write"]) for rule in rules] == [
        ("public:*", "public", "deny"), ("users:{user.id}:**", "owner", "owner"),
    ]
    assert cli("rules", "explain", "users:7:cart", "--user", "8").stdout == "rule: users:{user.id}:**\nread: false\nwrite: false\n"
    explained = json.loads(cli("rules", "explain", "public:x", "--json").stdout)
    assert explained["rule"]["pattern"] == "public:*"
    assert (explained["key"], explained["read"], explained["write"]) == ("public:x", True, False)
    assert cli("rules", "explain", "k", "--role", "admin").returncode == 2
    assert cli("rules", "unexpose", "public:*").stdout == "true\n"
    assert cli("rules", "unexpose", "public:*", "--json").stdout == '{"pattern": "public:*", "removed": false}\n'


def test_rules_conflict_exits_2(cli):
    cli("rules", "expose", "a:*", "--read", "public", "--write", "deny")
    result = cli("rules", "expose", "a:*", "--read", "authed", "--write", "deny")
    assert result.returncode == 2
    assert result.stderr.startswith("kvapi: KV_EXPOSE_CONFLICT: ")


EXPORTED = {
    "plain": "text",
    "big": 123456789012345678901234567890,
    "nested/key?#%": {"a": [1, 2.5, None, True], "ü": "ß"},
    "forever": [1],
    "short": 0,
    "volatile": "eph",
}


def test_export_then_import_into_second_server(cli, kv, http_server, http_app, second_server):
    kv.mset({key: value for key, value in EXPORTED.items() if key not in ("forever", "short", "volatile")})
    kv.set("forever", EXPORTED["forever"], ttl=None)
    started, started_at = time.monotonic(), time.time()
    kv.set("short", EXPORTED["short"], ttl=300)
    kv.set("volatile", EXPORTED["volatile"], ttl=600, ephemeral=True)
    for start in (0, 1000):
        kv.mset({f"bulk:{number:05d}": number for number in range(start, min(start + 1000, 1500))}, ttl=None)

    exported = cli("kv", "export", http_app.app_id, "--progress", separate_process=True)
    assert exported.returncode == 0
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(lines) == 1506
    by_key = {line["key"]: line for line in lines}
    assert by_key["forever"] == {"key": "forever", "value": [1], "ttl": None, "expires_at": None, "ephemeral": False}
    assert by_key["volatile"]["ephemeral"] is True
    assert by_key["big"]["value"] == 123456789012345678901234567890
    assert by_key["nested/key?#%"]["value"] == EXPORTED["nested/key?#%"]
    assert_ttl_near(by_key["short"]["ttl"], 300, started)
    assert started_at + 299 <= by_key["short"]["expires_at"] <= time.time() + 300
    assert "export" in exported.stderr
    assert "1506" in exported.stderr

    target = create_app(second_server.database_url)
    target_cli = Cli(client_env(second_server.base_url, target))
    imported = target_cli("kv", "import", "--batch-size", "400", stdin=exported.stdout, separate_process=True)
    assert imported.returncode == 0
    assert imported.stdout == "1506\n"
    assert imported.stderr == ""

    with KV(second_server.base_url, target.app_id, target.service_key) as copy:
        source_keys = list(kv.list(limit=1000))
        assert list(copy.list(limit=1000)) == source_keys
        for start in range(0, len(source_keys), 1000):
            batch = source_keys[start:start + 1000]
            assert copy.mget(batch) == kv.mget(batch)
        assert copy.ttl("bulk:01499") is None
        tiers = {info.key: info.ephemeral for info in copy.list_page(prefix="f", limit=10).keys + copy.list_page(prefix="v", limit=10).keys}
        assert tiers == {"forever": False, "volatile": True}

    source_expiry = expiry_times(http_server.database_url, http_app.app_id)
    copied_expiry = expiry_times(second_server.database_url, target.app_id)
    assert copied_expiry.keys() == source_expiry.keys()
    for key, expires_at in source_expiry.items():
        if expires_at is None:
            assert copied_expiry[key] is None, key
        else:
            # The HTTP API carries TTLs in whole seconds, so the export and
            # the import each round the expiry time by up to half a second,
            # and request latency adds a little.
            assert abs((copied_expiry[key] - expires_at).total_seconds()) <= 1.5, key


def expiry_times(database_url: str, app_id: str) -> dict[str, object]:
    """Return {key: expires_at} of an app's keys in both tiers, read from its database."""
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT key, expires_at FROM kvapi_data.entries WHERE app_id = %(app)s "
            "UNION ALL SELECT key, expires_at FROM kvapi_data.ephemeral_entries WHERE app_id = %(app)s",
            {"app": app_id},
        ).fetchall()
    return dict(rows)


def test_import_restores_tiers(cli, kv, http_server, http_app):
    lines = [
        {"key": "t:durable", "value": 1, "ttl": None, "ephemeral": False},
        {"key": "t:ephemeral", "value": 2, "ttl": 60, "ephemeral": True},
        {"key": "t:unknown", "value": 3, "ttl": 60, "ephemeral": None},
        {"key": "t:default", "value": 4},
    ]
    result = cli("kv", "import", stdin="".join(json.dumps(line) + "\n" for line in lines))
    assert result.returncode == 0
    assert result.stdout == "4\n"
    with psycopg.connect(http_server.database_url) as connection:
        ephemeral = [row[0] for row in connection.execute(
            "SELECT key FROM kvapi_data.ephemeral_entries WHERE app_id = %s ORDER BY key", [http_app.app_id]
        )]
    assert ephemeral == ["t:ephemeral"]
    assert kv.mget(["t:durable", "t:ephemeral", "t:unknown", "t:default"]) == [1, 2, 3, 4]
    assert kv.ttl("t:durable") is None
    assert kv.ttl("t:ephemeral") == 60
    assert kv.ttl("t:default") == DEFAULT_TTL


def test_import_restores_expiry_and_skips_expired(cli, kv):
    now = time.time()
    lines = [
        {"key": "later", "value": 1, "ttl": 5, "expires_at": now + 1000},
        {"key": "gone", "value": 2, "ttl": 5, "expires_at": now - 10},
        {"key": "relative", "value": 3, "ttl": 700},
    ]
    started = time.monotonic()
    result = cli("kv", "import", "--json", stdin="".join(json.dumps(line) + "\n" for line in lines))
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"imported": 2, "expired": 1}
    assert result.stderr == "kvapi: skipped 1 keys that expired after the export\n"
    assert_ttl_near(kv.ttl("later"), 1000, started)
    assert_ttl_near(kv.ttl("relative"), 700, started)
    assert kv.exists("gone") is False


def test_import_invalid_line_exits_2(cli, kv):
    result = cli("kv", "import", "--json", stdin='{"key": "ok", "value": 1}\nnot json\n')
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "kvapi: invalid import line 2: not JSON (Expecting value: line 1 column 1 (char 0))\n"
    assert kv.exists("ok") is False
    result = cli("kv", "import", stdin='{"key": "k", "value": null}\n')
    assert result.returncode == 2
    assert result.stderr.startswith("kvapi: invalid import line 1: expected ")


def console_blocks(path: Path) -> list[list[tuple[str, list[str]]]]:
    """Return the ```console blocks of a Markdown file as (command, expected output lines) lists."""
    blocks = []
    for text in re.findall(r"^```console\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE):
        steps: list[tuple[str, list[str]]] = []
        for line in text.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        blocks.append(steps)
    return blocks


def run_console_step(cli: Cli, command: str, last_status: int, cwd: Path) -> tuple[list[str], int]:
    """Run one documented command and return its output lines (stdout, then
    stderr) and exit status. `kvapi` runs in this process; `echo $?`, `< file`
    and `> file` work as in a shell, relative to cwd."""
    if command == "echo $?":
        return [str(last_status)], 0
    words = shlex.split(command)
    assert words[0] == "kvapi", command
    stdin = ""
    stdout_path = None
    if "<" in words:
        stdin = (cwd / words[words.index("<") + 1]).read_text()
        del words[words.index("<"):words.index("<") + 2]
    if ">" in words:
        stdout_path = cwd / words[words.index(">") + 1]
        del words[words.index(">"):words.index(">") + 2]
    result = cli(*words[1:], stdin=stdin)
    stdout = result.stdout
    if stdout_path is not None:
        stdout_path.write_text(stdout)
        stdout = ""
    return (stdout + result.stderr).splitlines(), result.returncode


def test_docs_cli_examples(http_server, http_app, tmp_path):
    """Every ```console block of docs/cli.md gives the output shown; <version> matches any version."""
    cli = Cli(client_env(http_server.base_url, http_app))
    blocks = console_blocks(DOCS / "cli.md")
    assert len(blocks) >= 5
    status = 0
    for steps in blocks:
        for command, expected in steps:
            actual, status = run_console_step(cli, command, status, tmp_path)
            pattern = "\n".join(re.escape(line).replace(re.escape("<version>"), "[0-9]+") for line in expected)
            assert re.fullmatch(pattern, "\n".join(actual)), f"$ {command}\nexpected: {expected}\nactual: {actual}"


def test_docs_cli_shell_block_runs(tmp_path):
    (block,) = re.findall(r"^```sh\n(.*?)^```", (DOCS / "cli.md").read_text(), flags=re.DOTALL | re.MULTILINE)
    result = subprocess.run(["bash", "-c", block + 'test "$KVAPI_APP" = demo'], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
