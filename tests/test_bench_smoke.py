"""The benchmark suite runs end to end at a tiny size, so that it cannot rot.

It starts its own PostgreSQL, kvapi, Litestar, Redis and webdis servers and
drives them with pgbench, wrk and redis-benchmark for about a second per
run. Nothing here asserts a speed: only that the run completes and prints
its table and ratio rows.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report, run

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
TOOLS = ["pgbench", "wrk", "redis-server", "redis-benchmark", "webdis"]
COMMAND = [
    sys.executable, "-m", "bench.run", "--quick", "--duration", "1", "--clients", "1", "--keys", "1000",
    "--cases", "get,set_durable",
]


@pytest.fixture(scope="module")
def bench_run() -> subprocess.CompletedProcess:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert missing == [], f"benchmark tools missing from PATH: {missing}; install the Debian packages postgresql-15, wrk, redis-server and webdis"
    return subprocess.run(COMMAND, cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300)


def test_bench_run_exits_zero(bench_run):
    assert bench_run.returncode == 0, bench_run.stderr[-3000:]


def test_bench_prints_table_header(bench_run):
    header = next((line for line in bench_run.stdout.splitlines() if line.startswith("case ")), "")
    assert header.split() == report.TABLE_COLUMNS


@pytest.mark.parametrize("target", ["raw SQL, plain table", "raw SQL, kvapi tables", "kvapi SQL functions",
                                    "kvapi HTTP", "Litestar constant JSON", "webdis", "Redis"])
def test_bench_prints_get_row_per_target(bench_run, target):
    rows = [line for line in bench_run.stdout.splitlines() if line.startswith("get ") and f"  {target}  " in line]
    assert len(rows) == 1, bench_run.stdout[-3000:]


@pytest.mark.parametrize("ratio", [ratio.label for ratio in report.RATIOS])
def test_bench_prints_ratio_row(bench_run, ratio):
    rows = [line for line in bench_run.stdout.splitlines() if line.startswith(ratio)]
    assert len(rows) == 1, bench_run.stdout[-3000:]


def test_bench_prints_load_average(bench_run):
    assert "load average (1, 5, 15 min): start" in bench_run.stdout


REPORTS_COMMAND = [
    sys.executable, "-m", "bench.run", "--quick", "--duration", "1", "--cases", "none", "--targets", "functions",
    "--keys", "1000", "--diagnose", "--large-keys", "2000", "--small-keys", "1000", "--purge-keys", "500",
    "--soak", "2", "--soak-interval", "1",
]


@pytest.fixture(scope="module")
def reports_run() -> subprocess.CompletedProcess:
    return subprocess.run(REPORTS_COMMAND, cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300)


def test_reports_run_exits_zero(reports_run):
    assert reports_run.returncode == 0, reports_run.stderr[-3000:]


@pytest.mark.parametrize("heading", [
    "plan_cache_mode (pgbench -M prepared",
    "Cost of each step of kv_get alone",
    "The floor under kv_get:",
    "Large data: app ",
    "Soak: kv_get with touch and kv_incr",
])
def test_reports_print_section(reports_run, heading):
    lines = [line for line in reports_run.stdout.splitlines() if line.startswith(heading)]
    assert len(lines) == 1, reports_run.stdout[-3000:]


def test_reports_time_three_purges(reports_run):
    purges = [line for line in reports_run.stdout.splitlines() if line.startswith("purge of ")]
    assert [line.split(" deleted in ")[0].split(": ")[-1] for line in purges] == ["500", "500", "50"]


def test_reports_runs_have_no_errors(reports_run):
    # Every diagnosis row ends with its error count.
    rows = [line.split() for line in reports_run.stdout.splitlines() if line.startswith(("raw get", "PL/pgSQL floor", "kvapi."))]
    assert rows, reports_run.stdout[-3000:]
    assert [row[-1] for row in rows] == ["0"] * len(rows)


def test_documented_commands_parse():
    """Every `python -m bench.run` command in docs/benchmarks.md is accepted
    by today's argument parser, so the page cannot drift from the tool."""
    text = (REPOSITORY_ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    commands = [match.group(1).split("#")[0] for match in re.finditer(r"python -m bench\.run([^`\n]*)", text)]
    rejected = []
    for arguments in commands:
        try:
            run.parse_args(shlex.split(arguments))
        except SystemExit:
            rejected.append(arguments.strip())
    assert len(commands) >= 10
    assert rejected == []
