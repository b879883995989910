"""The two install paths build the same schema.

One database is built by running every file of sql/ in order, the other by
running the alembic migrations. Their catalogs (functions, relations,
partitions, columns, indexes, constraints, sequences, triggers, types,
grants and the seeded plans) must match exactly, so a change to sql/ that
no migration carries, or a migration that drifts from sql/, fails here.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory

import pgserver
from kvapi import migrate

REPOSITORY = Path(__file__).resolve().parent.parent
SQL_DIR = REPOSITORY / "sql"
VERSIONS_DIR = REPOSITORY / "migrations" / "versions"
SCHEMAS = ("kvapi", "kvapi_data")
PARTITIONS = 4

_database_numbers = itertools.count()

# Each query returns (object name, description) rows for one part of the
# catalog. The name identifies the object across the two databases, and the
# description contains every property compared. OIDs never appear, because
# they differ between the databases.
CATALOG_QUERIES: dict[str, str] = {
    "schema": """
        SELECT n.nspname,
               concat_ws(E'\n', 'owner: ' || pg_get_userbyid(n.nspowner), 'acl: ' || coalesce(n.nspacl::text, '(default)'))
        FROM pg_namespace n
        WHERE n.nspname = ANY (%(schemas)s)
    """,
    "function": """
        SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               concat_ws(E'\n',
                   'kind: ' || p.prokind::text,
                   'result: ' || coalesce(pg_get_function_result(p.oid), '(none)'),
                   'volatility: ' || p.provolatile::text,
                   'security definer: ' || p.prosecdef,
                   'config: ' || coalesce(p.proconfig::text, '(none)'),
                   'owner: ' || pg_get_userbyid(p.proowner),
                   'acl: ' || coalesce(p.proacl::text, '(default)'),
                   'definition:', pg_get_functiondef(p.oid))
        FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = ANY (%(schemas)s)
    """,
    "relation": """
        SELECT n.nspname || '.' || c.relname,
               concat_ws(E'\n',
                   'kind: ' || c.relkind::text,
                   'persistence: ' || c.relpersistence::text,
                   'partition of: ' || (SELECT pn.nspname || '.' || pc.relname
                                         FROM pg_inherits i
                                         JOIN pg_class pc ON pc.oid = i.inhparent
                                         JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                                         WHERE i.inhrelid = c.oid),
                   'partition bound: ' || pg_get_expr(c.relpartbound, c.oid),
                   'partition key: ' || pg_get_partkeydef(c.oid),
                   'options: ' || c.reloptions::text,
                   'owner: ' || pg_get_userbyid(c.relowner),
                   'acl: ' || coalesce(c.relacl::text, '(default)'))
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY (%(schemas)s)
    """,
    "column": """
        SELECT n.nspname || '.' || c.relname || '.' || a.attname,
               concat_ws(E'\n',
                   'position: ' || row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
                   'type: ' || format_type(a.atttypid, a.atttypmod),
                   'collation: ' || coalesce(co.collname, '(none)'),
                   'not null: ' || a.attnotnull,
                   'default: ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '(none)'),
                   'identity: ' || nullif(a.attidentity::text, ''),
                   'generated: ' || nullif(a.attgenerated::text, ''),
                   'acl: ' || a.attacl::text)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_collation co ON co.oid = a.attcollation
        WHERE n.nspname = ANY (%(schemas)s) AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
    """,
    "index": """
        SELECT n.nspname || '.' || c.relname, pg_get_indexdef(c.oid)
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY (%(schemas)s)
    """,
    "constraint": """
        SELECT n.nspname || '.' || coalesce(c.relname, t.typname) || '.' || con.conname,
               concat_ws(E'\n', 'type: ' || con.contype::text, 'definition: ' || pg_get_constraintdef(con.oid))
        FROM pg_constraint con
        JOIN pg_namespace n ON n.oid = con.connamespace
        LEFT JOIN pg_class c ON c.oid = con.conrelid
        LEFT JOIN pg_type t ON t.oid = con.contypid
        WHERE n.nspname = ANY (%(schemas)s)
    """,
    "sequence": """
        SELECT n.nspname || '.' || c.relname,
               concat_ws(E'\n',
                   'type: ' || format_type(s.seqtypid, NULL),
                   'start: ' || s.seqstart,
                   'increment: ' || s.seqincrement,
                   'min: ' || s.seqmin,
                   'max: ' || s.seqmax,
                   'cache: ' || s.seqcache,
                   'cycle: ' || s.seqcycle,
                   'owned by: ' || (SELECT oc.relname || '.' || oa.attname
                                    FROM pg_depend dep
                                    JOIN pg_class oc ON oc.oid = dep.refobjid
                                    JOIN pg_attribute oa ON oa.attrelid = dep.refobjid AND oa.attnum = dep.refobjsubid
                                    WHERE dep.classid = 'pg_class'::regclass AND dep.objid = c.oid
                                      AND dep.refclassid = 'pg_class'::regclass AND dep.deptype IN ('a', 'i')))
        FROM pg_sequence s
        JOIN pg_class c ON c.oid = s.seqrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY (%(schemas)s)
    """,
    "trigger": """
        SELECT n.nspname || '.' || c.relname || '.' || tg.tgname, pg_get_triggerdef(tg.oid)
        FROM pg_trigger tg
        JOIN pg_class c ON c.oid = tg.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY (%(schemas)s) AND NOT tg.tgisinternal
    """,
    "type": """
        SELECT n.nspname || '.' || t.typname,
               concat_ws(E'\n', 'type kind: ' || t.typtype::text, 'acl: ' || coalesce(t.typacl::text, '(default)'))
        FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = ANY (%(schemas)s)
    """,
    "plan row": """
        SELECT p.plan_id, to_jsonb(p)::text FROM kvapi_data.plans p
    """,
}


def catalog(url: str) -> dict[str, dict[str, str]]:
    """Return {part of the catalog: {object name: description}} for the kvapi schemas."""
    snapshot: dict[str, dict[str, str]] = {}
    with psycopg.connect(url, autocommit=True) as connection:
        for part, query in CATALOG_QUERIES.items():
            rows = connection.execute(query, {"schemas": list(SCHEMAS)}).fetchall()
            snapshot[part] = {name: description for name, description in rows}
    return snapshot


def catalog_text(snapshot: dict[str, dict[str, str]]) -> list[str]:
    """Render a catalog snapshot as sorted lines, one block per object."""
    lines: list[str] = []
    for part in sorted(snapshot):
        for name in sorted(snapshot[part]):
            lines.append(f"{part} {name}\n")
            lines.extend(f"    {line}\n" for line in snapshot[part][name].splitlines())
    return lines


def catalog_diff(expected: dict[str, dict[str, str]], actual: dict[str, dict[str, str]],
                 expected_label: str, actual_label: str) -> str:
    return "".join(difflib.unified_diff(
        catalog_text(expected), catalog_text(actual), fromfile=expected_label, tofile=actual_label, n=4,
    ))


def install_from_sql(url: str) -> None:
    """Run every file of sql/ in order, each as one script in one transaction."""
    with psycopg.connect(url) as connection:
        for path in sorted(SQL_DIR.glob("*.sql")):
            connection.execute(path.read_text(encoding="utf-8"))


def script_directory(url: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(migrate.alembic_config(url))


def new_empty_database(server: pgserver.TestServer) -> Iterator[str]:
    """Create a database with no kvapi schema, yield its URL, then drop it."""
    name = f"kvapi_install_{os.getpid()}_{next(_database_numbers)}"
    admin_url = server.url(database="postgres")
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    try:
        yield server.url(database=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sql_database(pg_server: pgserver.TestServer) -> Iterator[str]:
    """URL of a database installed by running the files of sql/."""
    for url in new_empty_database(pg_server):
        install_from_sql(url)
        yield url


@pytest.fixture
def migrated_database(pg_server: pgserver.TestServer) -> Iterator[str]:
    """URL of a database installed by the alembic migrations."""
    for url in new_empty_database(pg_server):
        migrate.upgrade(url)
        yield url


@pytest.fixture
def sql_catalog(sql_database: str) -> dict[str, dict[str, str]]:
    return catalog(sql_database)


@pytest.fixture
def migrations_catalog(migrated_database: str) -> dict[str, dict[str, str]]:
    return catalog(migrated_database)


def test_sql_and_migrations_catalogs_match(sql_catalog, migrations_catalog):
    diff = catalog_diff(sql_catalog, migrations_catalog, "installed from sql/", "installed by alembic upgrade")
    if diff:
        pytest.fail(f"the catalogs differ:\n{diff}", pytrace=False)


def test_sql_install_has_objects(sql_catalog):
    """Guard against a vacuous match: both installs empty would also be equal."""
    for part in ("schema", "function", "relation", "column", "index", "constraint", "sequence", "plan row"):
        assert sql_catalog[part], f"no {part} found in schemas {SCHEMAS}"


@pytest.mark.parametrize("table", ["entries", "ephemeral_entries"])
def test_partitions_are_hash_partitions(sql_catalog, table):
    relations = sql_catalog["relation"]
    for remainder in range(PARTITIONS):
        name = f"kvapi_data.{table}_p{remainder:02d}"
        assert f"partition bound: FOR VALUES WITH (modulus {PARTITIONS}, remainder {remainder})" in relations[name]


@pytest.mark.parametrize("installed_by", ["sql", "migrations"])
def test_partition_persistence(request, installed_by):
    """Ephemeral partitions are UNLOGGED ('u'), durable ones permanent ('p')."""
    relations = request.getfixturevalue(f"{installed_by}_catalog")["relation"]
    for remainder in range(PARTITIONS):
        assert "persistence: u" in relations[f"kvapi_data.ephemeral_entries_p{remainder:02d}"].splitlines()
        assert "persistence: p" in relations[f"kvapi_data.entries_p{remainder:02d}"].splitlines()
    # A partitioned parent stores no rows; PostgreSQL 18 rejects an UNLOGGED one.
    assert "persistence: p" in relations["kvapi_data.ephemeral_entries"].splitlines()
    assert "persistence: p" in relations["kvapi_data.entries"].splitlines()


def test_upgrade_twice_changes_nothing(migrated_database):
    before = catalog(migrated_database)

    migrate.upgrade(migrated_database)

    diff = catalog_diff(before, catalog(migrated_database), "after one upgrade", "after two upgrades")
    if diff:
        pytest.fail(f"a second upgrade changed the catalog:\n{diff}", pytrace=False)
    head = script_directory(migrated_database).get_current_head()
    with psycopg.connect(migrated_database) as connection:
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(head,)]


def test_downgrade_to_base_removes_schemas(migrated_database):
    command.downgrade(migrate.alembic_config(migrated_database), "base")

    with psycopg.connect(migrated_database) as connection:
        schemas = connection.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY (%s)", [list(SCHEMAS)]
        ).fetchall()
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert schemas == []
    assert versions == []


def test_upgrade_after_downgrade_restores_catalog(sql_catalog, migrated_database):
    command.downgrade(migrate.alembic_config(migrated_database), "base")

    migrate.upgrade(migrated_database)

    diff = catalog_diff(sql_catalog, catalog(migrated_database), "installed from sql/", "upgraded after a downgrade")
    if diff:
        pytest.fail(f"the catalogs differ:\n{diff}", pytrace=False)


def revision_folders() -> dict[str, Path]:
    """Return {revision id: its SQL folder}; a revision module
    migrations/versions/NAME.py keeps its SQL in migrations/versions/NAME/."""
    scripts = script_directory("postgresql://unused")
    return {script.revision: Path(script.path).with_suffix("") for script in scripts.walk_revisions()}


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_every_folder_belongs_to_revision():
    folders = {path for path in VERSIONS_DIR.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders == set(revision_folders().values())


# SHA-256 of each revision's SQL folder (see folder_digest). A revision
# that has been released must replay the same way forever, so its SQL never
# changes: a change to sql/ goes into a new revision with a folder of its
# own, whose digest is added here when it is written.
FROZEN_FOLDERS = {
    "0001": "02c57dece0b53f91c2daf4afd7db11caf3b3a3e2b14e5cc55f7c6737c6d7d746",
    "0002": "919ff2c824d83b51cfb9e978046898b8a1a29c2e8a9feaafdb3fcdf219b58f16",
    "0003": "07c39c34f44fb054da535f3241c558184894bcb2acc182382856e192a9ff3b38",
}


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name, content in file_bytes(folder).items():
        digest.update(name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()


def test_revision_folders_are_frozen():
    digests = {revision: folder_digest(folder) for revision, folder in revision_folders().items()}
    assert digests == FROZEN_FOLDERS


def test_downgrade_to_0001_restores_its_catalog(pg_server):
    """Downgrading the head to revision 0001 gives the catalog that the
    0001 folder installs on its own, so every downgrade script restores
    what its revision replaced."""
    for url in new_empty_database(pg_server):
        with psycopg.connect(url) as connection:
            for path in sorted(revision_folders()["0001"].glob("*.sql")):
                connection.execute(path.read_text(encoding="utf-8"))
        first = catalog(url)
    for url in new_empty_database(pg_server):
        migrate.upgrade(url)
        command.downgrade(migrate.alembic_config(url), "0001")
        downgraded = catalog(url)

    diff = catalog_diff(first, downgraded, "installed by the 0001 folder", "downgraded from head to 0001")
    if diff:
        pytest.fail(f"the catalogs differ:\n{diff}", pytrace=False)


REPARTITION_APPS = ("alpha", "beta", "gamma")


def usages(connection: psycopg.Connection) -> list[tuple]:
    return [connection.execute("SELECT kvapi.kv_usage(%s)", [app_id]).fetchone() for app_id in REPARTITION_APPS]


def test_repartition_keeps_rows_and_usage(pg_server):
    """Revision 0003 copies every row of both tiers into the new partitions:
    the rows, their versions and expiries, and the usage counters are the
    same before and after the upgrade, and after a downgrade."""
    rows_query = (
        "SELECT app_id, key, value::text, version, expires_at, size_bytes, tier FROM ("
        " SELECT *, 'durable' AS tier FROM kvapi_data.entries"
        " UNION ALL SELECT *, 'ephemeral' FROM kvapi_data.ephemeral_entries) t ORDER BY tier, app_id, key"
    )
    for url in new_empty_database(pg_server):
        migrate.upgrade(url, "0002")
        with psycopg.connect(url, autocommit=True) as connection:
            for app_id in REPARTITION_APPS:
                connection.execute("SELECT kvapi.app_create(%s, sha256(%s::bytea), 'secret')", [app_id, app_id])
                connection.execute("SELECT kvapi.kv_mset(%s, '{\"a\": 1, \"b\": [2], \"c\": \"x\"}')", [app_id])
                connection.execute("SELECT kvapi.kv_mset(%s, '{\"e\": true}', p_ttl => '60', p_ephemeral => true)", [app_id])
                connection.execute("SELECT kvapi.kv_incr(%s, 'n', 5)", [app_id])
            before = connection.execute(rows_query).fetchall()
            usage_before = usages(connection)

        migrate.upgrade(url)
        with psycopg.connect(url, autocommit=True) as connection:
            upgraded = connection.execute(rows_query).fetchall()
            usage_upgraded = usages(connection)
            partitions = connection.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'kvapi_data.entries'::regclass").fetchone()[0]

        command.downgrade(migrate.alembic_config(url), "0002")
        with psycopg.connect(url, autocommit=True) as connection:
            downgraded = connection.execute(rows_query).fetchall()
            old_partitions = connection.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'kvapi_data.entries'::regclass").fetchone()[0]

    assert len(before) == 15
    assert upgraded == before
    assert usage_upgraded == usage_before
    assert partitions == PARTITIONS
    assert downgraded == before
    assert old_partitions == 16
