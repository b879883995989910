"""The machine description, the results table and the ratio rows."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import drivers, workloads

TABLE_COLUMNS = ["case", "target", "clients", "ops/s", "p50_ms", "p99_ms", "errors",
                 "pg_cpu_us/op", "server_cpu_us/op", "tool_cpu_us/op"]
# The server process (besides PostgreSQL) that serves each target.
TARGET_SERVER = {"http": "kvapi", "litestar": "litestar", "webdis": "webdis", "redis": "redis"}


@dataclass
class Result:
    case: str
    target: str
    clients: int
    measurement: drivers.Measurement

    def cpu_us_per_op(self, seconds: float) -> float | None:
        operations = self.measurement.operations
        if operations <= 0:
            return None
        return seconds * 1e6 / operations

    def row(self) -> list[str]:
        m = self.measurement
        server = TARGET_SERVER.get(self.target)
        server_seconds = m.server_cpu_seconds.get(server, 0.0) if server else None
        if self.target == "webdis":
            # webdis is only a front end: Redis does the work behind it.
            server_seconds = (server_seconds or 0.0) + m.server_cpu_seconds.get("redis", 0.0)
        pg_seconds = m.server_cpu_seconds.get("postgres") if self.target not in ("redis", "webdis", "litestar") else None
        return [
            workloads.CASE_TITLES[self.case],
            workloads.TARGET_TITLES[self.target],
            str(self.clients),
            f"{m.ops_per_second:,.0f}",
            format_ms(m.p50_ms),
            format_ms(m.p99_ms),
            str(m.errors),
            format_number(self.cpu_us_per_op(pg_seconds) if pg_seconds is not None else None),
            format_number(self.cpu_us_per_op(server_seconds) if server_seconds is not None else None),
            format_number(self.cpu_us_per_op(m.tool_cpu_seconds)),
        ]

    def as_dict(self) -> dict:
        return {"case": self.case, "target": self.target, "clients": self.clients, **asdict(self.measurement)}


@dataclass(frozen=True)
class Ratio:
    label: str
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    target: float | None


RATIOS = [
    Ratio("get: kvapi SQL functions / raw SQL on kvapi tables", ("functions", "get"), ("tables", "get"), 0.9),
    Ratio("set durable: kvapi SQL functions / raw SQL on kvapi tables", ("functions", "set_durable"), ("tables", "set_durable"), 0.9),
    Ratio("incr: kvapi SQL functions / raw SQL on kvapi tables", ("functions", "incr"), ("tables", "incr"), 0.9),
    Ratio("get: raw SQL, kvapi partitioned tables / plain table", ("tables", "get"), ("plain", "get"), 0.9),
    Ratio("kvapi HTTP get / Litestar constant JSON", ("http", "get"), ("litestar", "get"), 0.8),
    Ratio("kvapi HTTP set durable / Litestar constant JSON", ("http", "set_durable"), ("litestar", "get"), 0.6),
    Ratio("kvapi HTTP get / webdis GET", ("http", "get"), ("webdis", "get"), None),
    Ratio("get by an end user / get with a service key: SQL functions", ("functions", "get_guarded"), ("functions", "get"), 0.9),
    Ratio("get by an end user / get with a service key: HTTP", ("http", "get_guarded"), ("http", "get"), 0.9),
]


def progress(section: str, cells: list[str]) -> None:
    """Print one finished measurement to stderr while the run goes on."""
    print(f"{section}: {'  '.join(cells)}", file=sys.stderr, flush=True)


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip(),
             "  ".join("-" * width for width in widths)]
    for row in rows:
        lines.append("  ".join(cell.rjust(width) if index >= 2 else cell.ljust(width)
                               for index, (cell, width) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def results_table(results: list[Result]) -> str:
    return format_table(TABLE_COLUMNS, [result.row() for result in results])


def compute_ratios(results: list[Result], clients_list: list[int]) -> list[dict]:
    """Ratio of ops/s for each entry of RATIOS at each client count; None
    where either side was not measured."""
    rate = {(r.target, r.case, r.clients): r.measurement.ops_per_second for r in results}
    rows = []
    for ratio in RATIOS:
        values = {}
        for clients in clients_list:
            numerator = rate.get((*ratio.numerator, clients))
            denominator = rate.get((*ratio.denominator, clients))
            values[clients] = numerator / denominator if numerator is not None and denominator else None
        rows.append({"label": ratio.label, "target": ratio.target, "values": values})
    return rows


def ratios_table(ratios: list[dict], clients_list: list[int]) -> str:
    header = ["ratio of ops/s", "target", *[f"clients={clients}" for clients in clients_list]]
    rows = []
    for ratio in ratios:
        cells = [ratio["label"], f">= {ratio['target']}x" if ratio["target"] else "-"]
        for clients in clients_list:
            value = ratio["values"][clients]
            if value is None:
                cells.append("n/a")
            elif ratio["target"] is None:
                cells.append(f"{value:.2f}x")
            else:
                cells.append(f"{value:.2f}x {'ok' if value >= ratio['target'] else 'MISS'}")
        rows.append(cells)
    return format_table(header, rows)


# --- the machine and the software ------------------------------------------------

PYTHON_PACKAGES = ["granian", "uvloop", "litestar", "psycopg", "psycopg-binary", "psycopg-pool", "msgspec", "py-spy"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def filesystem_of(path: Path) -> str:
    result = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True)
    lines = result.stdout.split()
    return lines[-1] if result.returncode == 0 and len(lines) > 1 else "unknown"


def environment_info(workdir: Path) -> dict[str, object]:
    versions = drivers.tool_versions()
    versions["python"] = platform.python_version()
    for package in PYTHON_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "workdir_filesystem": filesystem_of(workdir),
        "load_average_at_start": load_average(),
        "versions": versions,
    }


def environment_text(info: dict[str, object]) -> str:
    lines = [
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}, {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"data on {info['workdir_filesystem']}",
        f"load average (1, 5, 15 min) at start: {info['load_average_at_start']}"
        + (f"; at end: {info['load_average_at_end']}" if "load_average_at_end" in info else ""),
        "versions:",
    ]
    lines += [f"  {name}: {version}" for name, version in info["versions"].items()]
    return "\n".join(lines)
