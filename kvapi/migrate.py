"""Install or upgrade the kvapi schema with alembic."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent


def migrations_dir() -> Path:
    """Return the alembic scripts: inside the package when installed from a
    wheel, else the migrations/ folder of the source checkout."""
    for candidate in (_PACKAGE_DIR / "_migrations", _PACKAGE_DIR.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError(f"kvapi migrations not found next to {_PACKAGE_DIR}")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at url to revision (default: the latest)."""
    logger.info("migrating database", extra={"event": "migrate.start", "revision": revision})
    command.upgrade(alembic_config(url), revision)
    logger.info("database migrated", extra={"event": "migrate.done", "revision": revision})
