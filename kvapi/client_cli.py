"""Client commands of the kvapi CLI: `kvapi kv ...`, `kvapi rules ...` and `kvapi mcp`.

They talk to a kvapi server over HTTP through kvapi.client.KV, with the
server URL, app id and token from --url, --app and --key, else from
KVAPI_URL, KVAPI_APP and KVAPI_KEY. Results go to stdout: a bare value by
default, JSON objects with --json. Errors go to stderr as "kvapi: CODE:
message". Exit status: 0 on success, 1 when `kv get` finds no key, 2 on
usage and every other error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kvapi.client import KV, UNSET, KvError, Ttl

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_ERROR = 2

# Keys per list page and per mget request of an export (the API's maximum).
EXPORT_PAGE_SIZE = 1000
DEFAULT_IMPORT_BATCH_SIZE = 500


class UsageError(Exception):
    """A command line that cannot run: a missing setting or an invalid argument."""


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False))


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_value(text: str) -> Any:
    """Parse a value argument as JSON, rejecting NaN and Infinity."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise UsageError(
            f"invalid value {text[:80]!r}: not JSON ({error}); quote strings as JSON, such as '\"text\"', or pass --string"
        ) from None


def ttl_argument(text: str) -> int | None:
    """argparse type of TTL arguments: seconds, or "none" for no expiry."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid TTL {text!r}: expected whole seconds or none") from None


def touch_argument(text: str) -> bool | int:
    """argparse type of --touch: "true" for the default TTL, or seconds."""
    if text.lower() == "true":
        return True
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid touch {text!r}: expected true or whole seconds") from None


def client_from_args(args: argparse.Namespace) -> KV:
    url = args.url or os.environ.get("KVAPI_URL")
    app_id = getattr(args, "app_positional", None) or args.app or os.environ.get("KVAPI_APP")
    token = args.key or os.environ.get("KVAPI_KEY")
    if not url:
        raise UsageError("missing server URL: pass --url or set KVAPI_URL")
    if not app_id:
        raise UsageError("missing app id: pass --app or set KVAPI_APP")
    return KV(url, app_id, token, retries=args.retries)


def _client_command(run: Callable[[KV, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: build the client, and turn errors into messages and exit statuses."""

    def handler(args: argparse.Namespace) -> int:
        # httpx logs every request at INFO; only the CLI's own messages belong on stderr.
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            with client_from_args(args) as client:
                return run(client, args)
        except UsageError as error:
            print(f"kvapi: {error}", file=sys.stderr)
            return EXIT_ERROR
        except KvError as error:
            print(f"kvapi: {error.code}: {error.message}", file=sys.stderr)
            return EXIT_ERROR

    return handler


def _progress(args: argparse.Namespace, description: str) -> Any:
    """Return a tqdm progress bar on stderr, disabled unless stderr is a
    terminal or --progress is given."""
    from tqdm import tqdm

    return tqdm(desc=description, unit=" keys", file=sys.stderr, disable=not (args.progress or sys.stderr.isatty()))


# kv commands


def command_get(client: KV, args: argparse.Namespace) -> int:
    entry = client.get_entry(args.key_name, touch=args.touch)
    if entry is None:
        print(f"kvapi: KV_NOT_FOUND: key {args.key_name!r} not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        _print_json({"key": entry.key, "value": entry.value, "ttl": entry.ttl, "version": entry.version})
    elif args.raw and isinstance(entry.value, str):
        print(entry.value)
    else:
        print(_json_text(entry.value))
    return EXIT_OK


def command_set(client: KV, args: argparse.Namespace) -> int:
    value = args.value
    if value == "-":
        value = sys.stdin.read()
        if not args.string:
            value = value.strip()
    if not args.string:
        value = parse_json_value(value)
    version = client.set(
        args.key_name, value, ttl=args.ttl, keep_ttl=args.keep_ttl, ephemeral=args.ephemeral, if_version=args.if_version,
    )
    if args.json:
        _print_json({"key": args.key_name, "version": version})
    else:
        print(version)
    return EXIT_OK


def command_del(client: KV, args: argparse.Namespace) -> int:
    deleted = client.delete(args.key_name, if_version=args.if_version)
    if args.json:
        _print_json({"key": args.key_name, "deleted": deleted})
    else:
        print(_json_text(deleted))
    return EXIT_OK


def command_incr(client: KV, args: argparse.Namespace) -> int:
    operation = client.incr if args.kv_command == "incr" else client.decr
    value = operation(args.key_name, args.by)
    if args.json:
        _print_json({"key": args.key_name, "value": value})
    else:
        print(value)
    return EXIT_OK


def command_ttl(client: KV, args: argparse.Namespace) -> int:
    ttl = client.ttl(args.key_name)
    if args.json:
        _print_json({"key": args.key_name, "ttl": ttl})
    else:
        print(_json_text(ttl))
    return EXIT_OK


def command_expire(client: KV, args: argparse.Namespace) -> int:
    updated = client.expire(args.key_name, args.ttl)
    if args.json:
        _print_json({"key": args.key_name, "updated": updated})
    else:
        print(_json_text(updated))
    return EXIT_OK


def _listed_keys(client: KV, prefix: str | None, page_size: int) -> Iterator[tuple[str, int | None]]:
    cursor = None
    while True:
        page = client.list_page(prefix=prefix, cursor=cursor, limit=page_size)
        for info in page.keys:
            yield info.key, info.ttl
        if page.cursor is None:
            return
        cursor = page.cursor


def command_list(client: KV, args: argparse.Namespace) -> int:
    page_size = min(args.limit, EXPORT_PAGE_SIZE) if args.limit else 100
    keys = _listed_keys(client, args.prefix, page_size)
    if args.limit:
        keys = itertools.islice(keys, args.limit)
    if args.json:
        _print_json([{"key": key, "ttl": ttl} for key, ttl in keys])
    else:
        for key, _ttl in keys:
            print(key)
    return EXIT_OK


def command_mget(client: KV, args: argparse.Namespace) -> int:
    values = client.mget(args.keys)
    if args.json:
        _print_json([{"key": key, "value": value} for key, value in zip(args.keys, values)])
    else:
        for value in values:
            print(_json_text(value))
    return EXIT_OK


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def command_export(client: KV, args: argparse.Namespace) -> int:
    """Write every key as one NDJSON line: {"key", "value", "ttl", "expires_at", "ephemeral"}.

    `ttl` is the seconds left when the key was listed, and `expires_at` the
    matching Unix time (None when the key never expires), so that an import
    can restore the original expiry however late it runs.
    """
    # NOTE: a key deleted between the listing and its mget is left out,
    # and one written in between is exported with its newer value.
    cursor = None
    with _progress(args, "export") as progress:
        while True:
            request_started = time.time()
            page = client.list_page(prefix=args.prefix, cursor=cursor, limit=EXPORT_PAGE_SIZE)
            # The server computed the TTLs during the request, and rounded
            # them up: the expiry lies within the second before now + ttl.
            listed_at = (request_started + time.time()) / 2 - 0.5
            values = client.mget([info.key for info in page.keys]) if page.keys else []
            for info, value in zip(page.keys, values):
                if value is None:
                    continue
                expires_at = None if info.ttl is None else round(listed_at + info.ttl, 3)
                _print_json({"key": info.key, "value": value, "ttl": info.ttl, "expires_at": expires_at, "ephemeral": info.ephemeral})
            progress.update(len(page.keys))
            if page.cursor is None:
                return EXIT_OK
            cursor = page.cursor


@dataclass(frozen=True)
class ImportRecord:
    """A key to import. `expires_at` (Unix time), when not None, replaces `ttl`."""

    key: str
    value: Any
    ttl: Ttl
    expires_at: float | None
    ephemeral: bool


def _parse_import_line(line: str, number: int) -> ImportRecord:
    """Parse one NDJSON line of an import. Invalid lines raise UsageError."""
    try:
        record = json.loads(line, parse_constant=_reject_constant)
    except ValueError as error:
        raise UsageError(f"invalid import line {number}: not JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str) or record.get("value") is None:
        raise UsageError(
            f'invalid import line {number}: expected {{"key": string, "value": non-null JSON, "ttl"?, "expires_at"?, "ephemeral"?}}'
        )
    ephemeral = record.get("ephemeral")
    if ephemeral not in (True, False, None):
        raise UsageError(f"invalid import line {number}: ephemeral must be true, false or null, got {ephemeral!r}")

    expires_at = record.get("expires_at")
    if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))):
        raise UsageError(f"invalid import line {number}: expires_at must be a Unix time in seconds or null, got {expires_at!r}")
    ttl = record.get("ttl", UNSET)
    if ttl is not UNSET and ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)):
        raise UsageError(f"invalid import line {number}: ttl must be whole seconds or null, got {ttl!r}")
    return ImportRecord(record["key"], record["value"], ttl, expires_at, bool(ephemeral))


def command_import(client: KV, args: argparse.Namespace) -> int:
    """Write the keys of an NDJSON export, restoring values, expiry and tiers.

    A line's `expires_at` (Unix time) wins over its `ttl`, so keys expire
    when they would have at the source, and keys already expired are
    skipped. Lines are read in batches; the keys of a batch that share a TTL
    and a tier are written by one mset, all or nothing. A key whose tier is
    unknown ("ephemeral": null) is written durable, unless --ephemeral.
    """
    if not 1 <= args.batch_size <= 1000:
        raise UsageError(f"invalid --batch-size {args.batch_size}: expected 1 to 1000")
    lines = ((number, line) for number, line in enumerate(sys.stdin, start=1) if line.strip())
    imported = 0
    expired = 0
    with _progress(args, "import") as progress:
        for batch in _batched(lines, args.batch_size):
            # An expires_at becomes a TTL from now, rounded to whole seconds;
            # keys with the same TTL and tier share one mset.
            now = time.time()
            groups: dict[tuple[Any, bool, bool], dict[str, Any]] = {}
            for number, line in batch:
                record = _parse_import_line(line, number)
                absolute = record.expires_at is not None
                ttl = round(record.expires_at - now) if absolute else record.ttl
                if absolute and ttl < 1:
                    expired += 1
                    continue
                groups.setdefault((ttl, record.ephemeral or args.ephemeral, absolute), {})[record.key] = record.value
            for (ttl, ephemeral, absolute), entries in groups.items():
                if absolute:
                    # Earlier groups of the batch took time: shorten the TTL to match.
                    ttl = max(1, ttl - round(time.time() - now))
                imported += client.mset(entries, ttl=ttl, ephemeral=ephemeral)
            progress.update(len(batch))
    if expired:
        print(f"kvapi: skipped {expired} keys that expired after the export", file=sys.stderr)
    if args.json:
        _print_json({"imported": imported, "expired": expired})
    else:
        print(imported)
    return EXIT_OK


# rules commands


def command_expose(client: KV, args: argparse.Namespace) -> int:
    client.expose(args.pattern, args.read, args.write)
    if args.json:
        _print_json({"pattern": args.pattern, "read": args.read, "write": args.write})
    return EXIT_OK


def command_unexpose(client: KV, args: argparse.Namespace) -> int:
    removed = client.unexpose(args.pattern)
    if args.json:
        _print_json({"pattern": args.pattern, "removed": removed})
    else:
        print(_json_text(removed))
    return EXIT_OK


def command_rules_list(client: KV, args: argparse.Namespace) -> int:
    rules = client.list_rules()
    if args.json:
        _print_json([{"pattern": rule.pattern, "read": rule.read, "write": rule.write, "order": rule.order} for rule in rules])
    else:
        for rule in rules:
            print(f"{rule.pattern}\tread={rule.read}\twrite={rule.write}")
    return EXIT_OK


def command_explain(client: KV, args: argparse.Namespace) -> int:
    try:
        explanation = client.explain(args.key_name, user_id=args.user, role=args.role)
    except ValueError as error:
        raise UsageError(str(error)) from None
    rule = explanation.rule
    if args.json:
        rule_json = None if rule is None else {"pattern": rule.pattern, "read": rule.read, "write": rule.write, "order": rule.order}
        _print_json({"key": explanation.key, "rule": rule_json, "read": explanation.read, "write": explanation.write})
    else:
        print(f"rule: {'none (the key is private)' if rule is None else rule.pattern}")
        print(f"read: {_json_text(explanation.read)}")
        print(f"write: {_json_text(explanation.write)}")
    return EXIT_OK


def command_mcp(args: argparse.Namespace) -> int:
    from kvapi import mcp_server

    try:
        mcp_server.main()
    except ValueError as error:
        print(f"kvapi: {error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# parser


def _connection_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument("--url", help="kvapi server URL, such as http://127.0.0.1:8080 (default: KVAPI_URL)")
    group.add_argument("--app", help="app id (default: KVAPI_APP)")
    group.add_argument("--key", help="service key of the app, or an end user's JWT (default: KVAPI_KEY; none: anonymous)")
    group.add_argument("--retries", type=int, default=0, help="times to retry a rate-limited (429) request (default: 0)")
    options.add_argument("--json", action="store_true", help="print results as JSON objects")
    return options


def _add_command(parent: Any, name: str, run: Callable[[KV, argparse.Namespace], int], options: argparse.ArgumentParser,
                 help_text: str) -> argparse.ArgumentParser:
    parser = parent.add_parser(name, parents=[options], help=help_text, description=help_text)
    parser.set_defaults(handler=_client_command(run))
    return parser


def _register_kv(commands: Any, options: argparse.ArgumentParser) -> None:
    kv = commands.add_parser("kv", help="read and write the keys of an app on a kvapi server")
    kv_commands = kv.add_subparsers(dest="kv_command", required=True, metavar="COMMAND")

    get = _add_command(kv_commands, "get", command_get, options, "print a key's value as JSON (exit status 1 when the key is missing)")
    get.add_argument("key_name", metavar="KEY")
    get.add_argument("--touch", type=touch_argument, help="also reset an expiring key's TTL: true for the default, or seconds")
    get.add_argument("--raw", action="store_true", help="print a string value without JSON quotes")

    set_parser = _add_command(kv_commands, "set", command_set, options, "write a key and print its new version")
    set_parser.add_argument("key_name", metavar="KEY")
    set_parser.add_argument("value", metavar="VALUE", help="JSON value, or - to read it from stdin")
    set_parser.add_argument("--string", action="store_true", help="store VALUE as a JSON string instead of parsing it")
    set_parser.add_argument("--ttl", type=ttl_argument, default=UNSET,
                            help="seconds until the key expires, or none for no expiry (default: the plan's default TTL)")
    set_parser.add_argument("--keep-ttl", action="store_true", help="keep the key's current expiry")
    set_parser.add_argument("--ephemeral", action="store_true", help="store the key in the ephemeral tier")
    set_parser.add_argument("--if-version", metavar="VERSION", help="write only when the key is at this version")

    delete = _add_command(kv_commands, "del", command_del, options, "delete a key and print whether it existed")
    delete.add_argument("key_name", metavar="KEY")
    delete.add_argument("--if-version", metavar="VERSION", help="delete only when the key is at this version")

    for name, verb in (("incr", "add BY to"), ("decr", "subtract BY from")):
        counter = _add_command(kv_commands, name, command_incr, options, f"{verb} an integer counter and print the new value")
        counter.add_argument("key_name", metavar="KEY")
        counter.add_argument("--by", type=int, default=1, help="amount (default: 1)")

    ttl = _add_command(kv_commands, "ttl", command_ttl, options,
                       "print a key's remaining TTL in seconds (null: no expiry, or no key)")
    ttl.add_argument("key_name", metavar="KEY")

    expire = _add_command(kv_commands, "expire", command_expire, options,
                          "set a key's TTL and print whether the key exists")
    expire.add_argument("key_name", metavar="KEY")
    expire.add_argument("ttl", type=ttl_argument, metavar="TTL", help="seconds from now, or none for no expiry")

    list_parser = _add_command(kv_commands, "list", command_list, options, "print keys in byte order, one per line")
    list_parser.add_argument("--prefix", help="only keys that start with this text")
    list_parser.add_argument("--limit", type=int, help="print at most this many keys")

    mget = _add_command(kv_commands, "mget", command_mget, options, "print the values of keys as JSON, one per line (null: missing)")
    mget.add_argument("keys", nargs="+", metavar="KEY")

    export = _add_command(kv_commands, "export", command_export, options,
                          "write every key to stdout as NDJSON lines {key, value, ttl, expires_at, ephemeral}")
    export.add_argument("app_positional", nargs="?", metavar="APP", help="app id (default: --app, else KVAPI_APP)")
    export.add_argument("--prefix", help="only keys that start with this text")
    export.add_argument("--progress", action="store_true", help="show a progress bar on stderr even when it is not a terminal")

    import_parser = _add_command(kv_commands, "import", command_import, options,
                                 "write the keys of an NDJSON export read from stdin, and print how many")
    import_parser.add_argument("app_positional", nargs="?", metavar="APP", help="app id (default: --app, else KVAPI_APP)")
    import_parser.add_argument("--batch-size", type=int, default=DEFAULT_IMPORT_BATCH_SIZE,
                               help=f"lines per batch, 1 to 1000 (default: {DEFAULT_IMPORT_BATCH_SIZE})")
    import_parser.add_argument("--ephemeral", action="store_true", help="write every key in the ephemeral tier")
    import_parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr even when it is not a terminal")


def _register_rules(commands: Any, options: argparse.ArgumentParser) -> None:
    rules = commands.add_parser("rules", help="manage the access rules that open keys to end users")
    rule_commands = rules.add_subparsers(dest="rules_command", required=True, metavar="COMMAND")
    roles = ("deny", "public", "authed", "owner")

    expose = _add_command(rule_commands, "expose", command_expose, options, "open the keys that match PATTERN")
    expose.add_argument("pattern", metavar="PATTERN", help="':'-separated segments; * one segment, ** any text, {user.id}, {user.role}")
    expose.add_argument("--read", required=True, choices=roles, help="role that may read")
    expose.add_argument("--write", required=True, choices=roles, help="role that may write")

    unexpose = _add_command(rule_commands, "unexpose", command_unexpose, options,
                            "remove the rule of PATTERN and print whether it existed")
    unexpose.add_argument("pattern", metavar="PATTERN")

    _add_command(rule_commands, "list", command_rules_list, options, "print the rules in creation order: pattern, read, write")

    explain = _add_command(rule_commands, "explain", command_explain, options,
                           "print which rule decides access to KEY, and what it grants")
    explain.add_argument("key_name", metavar="KEY")
    explain.add_argument("--user", help="user id of the requester (default: an anonymous request)")
    explain.add_argument("--role", help="role of the requester (default: authenticated)")


def register_client_commands(commands: Any) -> None:
    """Add the kv, rules and mcp commands to the kvapi command parser."""
    options = _connection_options()
    _register_kv(commands, options)
    _register_rules(commands, options)
    mcp = commands.add_parser(
        "mcp", help="serve the manage_kv MCP tool over stdio, for the app in KVAPI_URL, KVAPI_APP and KVAPI_KEY",
    )
    mcp.set_defaults(handler=command_mcp)
