"""The kvapi command line: serve, migrate, apps create, purge.

Every command reaches the same database: DATABASE_URL when it is set, else
the embedded PostgreSQL server in the data folder (--data-dir, else
KVAPI_DATA_DIR, else the per-user data folder). While `kvapi serve` runs,
the other commands attach to its embedded server instead of starting one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from pathlib import Path

import psycopg

from kvapi import embedded, logs, purge, statements
from kvapi.api.auth import hash_service_key, load_public_key, new_service_key
from kvapi.client_cli import register_client_commands
from kvapi.database import translate_error

logger = logging.getLogger("kvapi.cli")

DEFAULT_PORT = 8080


def _upgrade(url: str) -> None:
    # alembic and SQLAlchemy take most of a second to import, so only the
    # commands that migrate load them.
    from kvapi import migrate

    migrate.upgrade(url)


def _database_url(args: argparse.Namespace) -> str:
    """Return the database URL. The embedded database is migrated here, so
    that any command works on a fresh data folder. A DATABASE_URL server is
    migrated only by `kvapi migrate` and `kvapi serve`, when its operator runs them."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    url = embedded.database_url(args.data_dir)
    _upgrade(url)
    return url


def command_serve(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import Interfaces

    url = _database_url(args)
    if os.environ.get("DATABASE_URL"):
        _upgrade(url)
    with psycopg.connect(url, autocommit=True) as connection:
        cron = purge.schedule_cron_job(connection)
    os.environ["DATABASE_URL"] = url
    # With a pg_cron job in place the workers need no purge loop of their own.
    os.environ["KVAPI_PURGE_INTERVAL"] = "0" if cron else str(args.purge_interval)
    os.environ["KVAPI_POOL_SIZE"] = str(args.pool_size)

    logger.info(
        "serving",
        extra={"event": "serve.start", "host": args.host, "port": args.port, "workers": args.workers, "purge_with_cron": cron},
    )
    server = Granian(
        "kvapi.api.app:create_app",
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        log_dictconfig=logs.dict_config(),
    )
    server.serve()
    logger.info("server stopped", extra={"event": "serve.stop"})
    return 0


def command_migrate(args: argparse.Namespace) -> int:
    url = _database_url(args)
    if os.environ.get("DATABASE_URL"):
        _upgrade(url)
    return 0


def command_apps_create(args: argparse.Namespace) -> int:
    service_key = new_service_key()
    jwt_secret = secrets.token_urlsafe(32)
    params = {"app_id": args.name, "key_hash": hash_service_key(service_key), "jwt_secret": jwt_secret}
    if _run_app_statement(args, statements.CREATE_APP, params) is None:
        return 1
    logger.info("app created", extra={"event": "apps.create", "app_id": args.name})
    result = {"app_id": args.name, "service_key": service_key, "jwt_secret": jwt_secret}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"app_id:      {args.name}")
        print(f"service_key: {service_key}")
        print(f"jwt_secret:  {jwt_secret}")
        print("Store both secrets now: kvapi keeps only a hash of the service key.")
    return 0


def _run_app_statement(args: argparse.Namespace, statement: str, params: dict) -> tuple | None:
    """Run an administration statement and return its row, or print the
    registered error and return None."""
    with psycopg.connect(_database_url(args), autocommit=True) as connection:
        try:
            return connection.execute(statement, params).fetchone()
        except psycopg.Error as error:
            translated = translate_error(error)
            if translated is None:
                raise
            print(f"kvapi: {translated.message}", file=sys.stderr)
            return None


def command_apps_add_key(args: argparse.Namespace) -> int:
    public_key = args.public_key_file.read_text(encoding="utf-8")
    try:
        load_public_key(args.algorithm, public_key)
    except ValueError as error:
        print(f"kvapi: {error} in {args.public_key_file}", file=sys.stderr)
        return 1
    params = {"app_id": args.app, "algorithm": args.algorithm, "public_key": public_key}
    if _run_app_statement(args, statements.ADD_JWT_KEY, params) is None:
        return 1
    logger.info("token key added", extra={"event": "apps.add_key", "app_id": args.app, "algorithm": args.algorithm})
    return 0


def command_apps_grant_role(args: argparse.Namespace) -> int:
    if _run_app_statement(args, statements.GRANT_ROLE, {"app_id": args.app, "role": args.role}) is None:
        return 1
    logger.info("role bound to app", extra={"event": "apps.grant_role", "app_id": args.app, "role": args.role})
    return 0


def _print_json_result(args: argparse.Namespace, statement: str, params: dict) -> int:
    """Run a statement that returns one jsonb value and print it."""
    row = _run_app_statement(args, statement, params)
    if row is None:
        return 1
    print(json.dumps(row[0], indent=2))
    return 0


def command_apps_usage(args: argparse.Namespace) -> int:
    return _print_json_result(args, statements.USAGE, {"app_id": args.app})


def command_apps_set_plan(args: argparse.Namespace) -> int:
    if _run_app_statement(args, statements.SET_PLAN, {"app_id": args.app, "plan_id": args.plan}) is None:
        return 1
    logger.info("app plan changed", extra={"event": "apps.set_plan", "app_id": args.app, "plan_id": args.plan})
    return 0


def command_plans_list(args: argparse.Namespace) -> int:
    return _print_json_result(args, statements.PLAN_LIST, {})


def command_plans_set(args: argparse.Namespace) -> int:
    params = {
        "plan_id": args.name,
        "max_value_bytes": args.max_value_bytes,
        "default_ttl_seconds": args.default_ttl,
        "max_keys": args.max_keys,
        "max_total_bytes": args.max_total_bytes,
        "ops_per_second": args.ops_per_second,
    }
    if _run_app_statement(args, statements.PLAN_SET, params) is None:
        return 1
    logger.info("plan saved", extra={"event": "plans.set", "plan_id": args.name})
    return 0


def _limit(text: str) -> int | None:
    """Parse a plan limit: a positive integer, or "none" for no limit."""
    if text.lower() == "none":
        return None
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: expected a positive integer or none")
    return value


def command_purge(args: argparse.Namespace) -> int:
    deleted = purge.purge_once(_database_url(args), args.batch_size)
    logger.info("purge finished", extra={"event": "purge.once", "deleted": deleted})
    print(json.dumps({"deleted": deleted}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvapi", description="A key-value store inside PostgreSQL.")
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="folder of the embedded PostgreSQL server (default: KVAPI_DATA_DIR, else the per-user data folder); "
             "ignored when DATABASE_URL is set",
    )
    parser.add_argument("--log-level", default=os.environ.get("KVAPI_LOG_LEVEL", "INFO"), help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="migrate the database and serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    serve.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    serve.add_argument("--pool-size", type=int, default=10, help="database connections per worker (default: 10)")
    serve.add_argument(
        "--purge-interval", type=float, default=60.0,
        help="seconds between purges of expired keys when pg_cron is not installed (default: 60; 0 disables)",
    )
    serve.set_defaults(handler=command_serve)

    migrate_parser = commands.add_parser("migrate", help="install or upgrade the kvapi schema")
    migrate_parser.set_defaults(handler=command_migrate)

    apps = commands.add_parser("apps", help="manage apps (tenants)")
    app_commands = apps.add_subparsers(dest="apps_command", required=True)
    create = app_commands.add_parser("create", help="create an app and print its service key and JWT secret")
    create.add_argument("name", help="app id: 1 to 64 characters of A-Z, a-z, 0-9, _ and -")
    create.add_argument("--json", action="store_true", help='print {"app_id", "service_key", "jwt_secret"} as JSON')
    create.set_defaults(handler=command_apps_create)
    add_key = app_commands.add_parser("add-key", help="register a public key that verifies the app's RS256 or ES256 end-user tokens")
    add_key.add_argument("app", help="app id")
    add_key.add_argument("public_key_file", type=Path, help="PEM file of the public key")
    add_key.add_argument("--algorithm", choices=["RS256", "ES256"], required=True, help="token algorithm the key verifies")
    add_key.set_defaults(handler=command_apps_add_key)
    grant_role = app_commands.add_parser(
        "grant-role", help="let an existing database role call the key-value functions for this app only"
    )
    grant_role.add_argument("app", help="app id")
    grant_role.add_argument("role", help="database role name")
    grant_role.set_defaults(handler=command_apps_grant_role)

    usage = app_commands.add_parser("usage", help="print the app's live keys and bytes and its plan's limits as JSON")
    usage.add_argument("app", help="app id")
    usage.set_defaults(handler=command_apps_usage)
    set_plan = app_commands.add_parser("set-plan", help="move an app to another plan (running servers apply it at once)")
    set_plan.add_argument("app", help="app id")
    set_plan.add_argument("plan", help="plan id")
    set_plan.set_defaults(handler=command_apps_set_plan)

    plans = commands.add_parser("plans", help="manage plans (limits per app)")
    plan_commands = plans.add_subparsers(dest="plans_command", required=True)
    plans_list = plan_commands.add_parser("list", help="print every plan as JSON")
    plans_list.set_defaults(handler=command_plans_list)
    plans_set = plan_commands.add_parser(
        "set", help="create or replace a plan; every limit not given is none (no limit)"
    )
    plans_set.add_argument("name", help="plan id: 1 to 64 characters of A-Z, a-z, 0-9, _ and -")
    plans_set.add_argument("--max-value-bytes", type=int, required=True, help="maximum size of one value's JSON text, in bytes")
    plans_set.add_argument("--default-ttl", type=_limit, default=30 * 86400,
                           help="TTL in seconds of keys written without one, or none (default: 2592000, 30 days)")
    plans_set.add_argument("--max-keys", type=_limit, default=None, help="maximum live keys, or none")
    plans_set.add_argument("--max-total-bytes", type=_limit, default=None, help="maximum bytes of keys and values, or none")
    plans_set.add_argument("--ops-per-second", type=_limit, default=None, help="maximum operations per second, or none")
    plans_set.set_defaults(handler=command_plans_set)

    purge_parser = commands.add_parser("purge", help="delete expired keys now, in batches")
    purge_parser.add_argument("--batch-size", type=int, default=purge.BATCH_SIZE, help="rows per transaction (default: 1000)")
    purge_parser.set_defaults(handler=command_purge)
    register_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        return args.handler(args)
    except psycopg.errors.UndefinedFunction as error:
        print(f"kvapi: the kvapi schema is missing or outdated ({error.diag.message_primary}); run: kvapi migrate", file=sys.stderr)
        return 2
    except psycopg.errors.InvalidSchemaName as error:
        print(f"kvapi: the kvapi schema is not installed ({error.diag.message_primary}); run: kvapi migrate", file=sys.stderr)
        return 2
    except psycopg.OperationalError as error:
        logger.error("database unavailable", extra={"event": "cli.db_unavailable", "error": str(error)})
        print(f"kvapi: cannot reach the database: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
