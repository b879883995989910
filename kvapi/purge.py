"""Purging expired keys: one pass on demand, a pg_cron job, or a loop in the server.

Expired keys are already invisible to every operation; purging only frees
their space. Each batch is its own short transaction (kvapi.kv_purge_batch
skips rows that writers hold), so a purge never blocks application traffic.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg

from kvapi import statements

logger = logging.getLogger(__name__)

CRON_JOB_NAME = "kvapi-purge"
CRON_SCHEDULE = "* * * * *"
BATCH_SIZE = 1000
# Only one server process at a time runs the purge loop; the others skip a
# pass while this session-level advisory lock is taken.
PURGE_LOCK = (1803120993, 1)


def purge_once(url: str, batch_size: int = BATCH_SIZE) -> int:
    """Delete every expired row in batches and return how many were deleted."""
    total = 0
    with psycopg.connect(url, autocommit=True) as connection:
        while True:
            (deleted,) = connection.execute(statements.PURGE_BATCH, {"batch_size": batch_size}).fetchone()
            total += deleted
            if deleted < batch_size:
                return total


def schedule_cron_job(connection: psycopg.Connection) -> bool:
    """Schedule the purge with pg_cron when it is installed in this database;
    return whether it is. pg_cron 1.4 schedules by minute at most."""
    installed = connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_cron'").fetchone()
    if installed is None:
        return False
    connection.execute(
        "SELECT cron.schedule(%s, %s, 'CALL kvapi.kv_purge()')", [CRON_JOB_NAME, CRON_SCHEDULE]
    )
    logger.info("purge scheduled with pg_cron", extra={"event": "purge.cron_scheduled", "job": CRON_JOB_NAME})
    return True


async def purge_loop(pool, interval_seconds: float) -> None:
    """Purge every interval_seconds until cancelled; errors are logged and retried."""
    logger.info("purge loop started", extra={"event": "purge.loop_start", "interval_seconds": interval_seconds})
    try:
        while True:
            try:
                deleted = await _purge_pass(pool)
                if deleted:
                    logger.info("purged expired keys", extra={"event": "purge.pass", "deleted": deleted})
            except (psycopg.Error, OSError) as error:
                logger.warning(
                    "purge pass failed; retrying at the next interval",
                    extra={"event": "purge.retry", "error": str(error)},
                )
            await asyncio.sleep(interval_seconds)
    finally:
        logger.info("purge loop stopped", extra={"event": "purge.loop_stop"})


async def _purge_pass(pool) -> int:
    total = 0
    async with pool.connection() as connection:
        cursor = await connection.execute("SELECT pg_try_advisory_lock(%s, %s)", PURGE_LOCK)
        (locked,) = await cursor.fetchone()
        if not locked:
            return 0
        try:
            while True:
                cursor = await connection.execute(statements.PURGE_BATCH, {"batch_size": BATCH_SIZE})
                (deleted,) = await cursor.fetchone()
                total += deleted
                if deleted < BATCH_SIZE:
                    return total
        finally:
            await connection.execute("SELECT pg_advisory_unlock(%s, %s)", PURGE_LOCK)
