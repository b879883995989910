"""Load generators: pgbench, wrk and redis-benchmark, and parsers of their output."""

from __future__ import annotations

import os
import re
import resource
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench import servers

CPU_COUNT = os.cpu_count() or 1
# Extra seconds a tool may run past its duration before it counts as hung.
TOOL_GRACE_SECONDS = 60


@dataclass
class Measurement:
    """Throughput and latency of one run; latencies in milliseconds."""

    ops_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None = None
    operations: int = 0
    errors: int = 0
    error_detail: str = ""
    tool_cpu_seconds: float = 0.0
    server_cpu_seconds: dict[str, float] = field(default_factory=dict)


def threads_for(clients: int) -> int:
    return max(1, min(clients, CPU_COUNT))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tool(command: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run a load generator; return its result and the CPU seconds it used."""
    before = children_cpu_seconds()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                            stdin=subprocess.DEVNULL)
    return result, children_cpu_seconds() - before


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --- pgbench ------------------------------------------------------------------

_PGBENCH_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_PGBENCH_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PGBENCH_FAILED = re.compile(r"^number of failed transactions: ([0-9]+)", re.MULTILINE)
_PGBENCH_PROCESSED = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)


def pgbench_log_latencies(log_dir: Path, prefix: str) -> list[float]:
    """Latencies in milliseconds from pgbench -l files (third field: microseconds)."""
    latencies: list[float] = []
    for path in log_dir.glob(f"{prefix}.*"):
        with open(path) as log:
            for line in log:
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]) / 1000.0)
        path.unlink()
    latencies.sort()
    return latencies


def run_pgbench(database_url: str, script_path: Path, *, clients: int, duration: float, seed: int,
                variables: dict[str, str], log_dir: Path, extra_env: dict[str, str] | None = None,
                extra_files: list[Path] | None = None) -> Measurement:
    """Run a pgbench script with prepared statements and parse tps and
    latencies. With extra_files, each transaction runs one of the scripts,
    chosen at random with equal weights."""
    prefix = f"pgbench_{script_path.stem}"
    command = [
        "pgbench", "--no-vacuum", "--protocol=prepared",
        f"--client={clients}", f"--jobs={threads_for(clients)}", f"--time={max(1, round(duration))}",
        f"--random-seed={seed}", f"--file={script_path}", *[f"--file={path}" for path in extra_files or []],
        "--log", f"--log-prefix={log_dir / prefix}",
        *[f"--define={name}={value}" for name, value in variables.items()],
        database_url,
    ]
    env = {**os.environ, **(extra_env or {})}
    result, tool_cpu = run_tool(command, duration + TOOL_GRACE_SECONDS, env)
    output = result.stdout + result.stderr
    latencies = pgbench_log_latencies(log_dir, prefix)
    tps = _PGBENCH_TPS.search(output)
    mean = _PGBENCH_LATENCY.search(output)
    failed = _PGBENCH_FAILED.search(output)
    processed = _PGBENCH_PROCESSED.search(output)
    errors = int(failed.group(1)) if failed else 0
    detail = ""
    if result.returncode != 0 or tps is None:
        aborted = [line for line in result.stderr.splitlines() if "abort" in line or "ERROR" in line]
        errors = max(errors, len(aborted), 1)
        detail = (aborted[0] if aborted else output.strip()[-500:])
    return Measurement(
        ops_per_second=float(tps.group(1)) if tps else 0.0,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        mean_ms=float(mean.group(1)) if mean else None,
        operations=int(processed.group(1)) if processed else len(latencies),
        errors=errors,
        error_detail=detail,
        tool_cpu_seconds=tool_cpu,
    )


# --- wrk ----------------------------------------------------------------------

_WRK_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)
_WRK_REQUESTS = re.compile(r"^\s*([0-9]+) requests in", re.MULTILINE)
_WRK_PERCENTILE = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_WRK_MEAN = re.compile(r"^\s+Latency\s+([0-9.]+)(us|ms|s|m)\s", re.MULTILINE)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: ([0-9]+)")
_WRK_SOCKET_ERRORS = re.compile(r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "requests.lua"


def parse_wrk(output: str) -> Measurement:
    rate = _WRK_RATE.search(output)
    percentiles = {match.group(1): float(match.group(2)) * _UNIT_MS[match.group(3)] for match in _WRK_PERCENTILE.finditer(output)}
    mean = _WRK_MEAN.search(output)
    requests = _WRK_REQUESTS.search(output)
    errors = 0
    details = []
    non_2xx = _WRK_NON_2XX.search(output)
    if non_2xx:
        errors += int(non_2xx.group(1))
        details.append(f"{non_2xx.group(1)} non-2xx responses")
    socket_errors = _WRK_SOCKET_ERRORS.search(output)
    if socket_errors:
        errors += sum(int(value) for value in socket_errors.groups())
        details.append(socket_errors.group(0))
    return Measurement(
        ops_per_second=float(rate.group(1)) if rate else 0.0,
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        mean_ms=float(mean.group(1)) * _UNIT_MS[mean.group(2)] if mean else None,
        operations=int(requests.group(1)) if requests else 0,
        errors=errors,
        error_detail="; ".join(details),
    )


def run_wrk(base_url: str, mode: str, *, clients: int, duration: float, seed: int, keys: int, aux_keys: int,
            app_id: str, service_key: str, user_token: str = "") -> Measurement:
    """Run wrk with bench/wrk/requests.lua in the given mode."""
    command = [
        "wrk", f"--threads={threads_for(clients)}", f"--connections={clients}", f"--duration={max(1, round(duration))}s",
        "--timeout=10s", "--latency", f"--script={WRK_SCRIPT}", base_url,
        "--", mode, str(keys), str(aux_keys), app_id, service_key, str(seed), user_token,
    ]
    result, tool_cpu = run_tool(command, duration + TOOL_GRACE_SECONDS)
    measurement = parse_wrk(result.stdout)
    if result.returncode != 0 or not _WRK_RATE.search(result.stdout):
        measurement.errors = max(measurement.errors, 1)
        measurement.error_detail = (result.stderr or result.stdout).strip()[-500:]
    measurement.tool_cpu_seconds = tool_cpu
    return measurement


# --- redis-benchmark ----------------------------------------------------------

def parse_redis_csv(output: str) -> Measurement:
    """Parse redis-benchmark --csv output (Redis 7: rps, avg, min, p50, p95, p99, max)."""
    lines = [line for line in output.splitlines() if line.startswith('"')]
    if len(lines) < 2:
        raise ValueError(f"redis-benchmark printed no CSV result: {output.strip()[-500:]}")
    header = [cell.strip('"') for cell in lines[0].split('","')]
    values = [cell.strip('"') for cell in lines[1].split('","')]
    row = dict(zip(header, values))
    return Measurement(
        ops_per_second=float(row["rps"]),
        p50_ms=float(row["p50_latency_ms"]),
        p99_ms=float(row["p99_latency_ms"]),
        mean_ms=float(row["avg_latency_ms"]),
    )


REDIS_PROBE_REQUESTS = 20_000


def run_redis_benchmark(port: int, arguments: list[str], *, clients: int, duration: float, keys: int) -> Measurement:
    """Run redis-benchmark for about `duration` seconds. It counts requests,
    not time, so a first run of REDIS_PROBE_REQUESTS measures the rate and
    sizes the real one. It runs single-threaded: with --threads, Redis 7.0's
    redis-benchmark rounds the elapsed time to its 250 ms progress ticks,
    which skews the rate of short runs."""
    def run(requests: int) -> tuple[Measurement, float]:
        command = [
            "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(requests),
            "-r", str(keys), "--csv", *arguments,
        ]
        result, tool_cpu = run_tool(command, duration * 5 + TOOL_GRACE_SECONDS)
        if result.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed with exit code {result.returncode}: {result.stderr.strip()[-500:]}")
        measurement = parse_redis_csv(result.stdout)
        measurement.operations = requests
        return measurement, tool_cpu

    probe, _ = run(max(REDIS_PROBE_REQUESTS, clients * 100))
    measurement, tool_cpu = run(max(clients * 100, int(probe.ops_per_second * duration)))
    measurement.tool_cpu_seconds = tool_cpu
    return measurement


def tool_versions() -> dict[str, str]:
    """Versions of the load generators and servers that are not Python packages."""
    versions: dict[str, str] = {}
    commands = {
        "pgbench": ["pgbench", "--version"],
        "postgres": [str(servers.pg_bin_dir() / "postgres"), "--version"],
        "redis-server": ["redis-server", "--version"],
    }
    for name, command in commands.items():
        try:
            versions[name] = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError as error:
            versions[name] = f"unavailable: {error}"
    # webdis has no version option (it reads any argument as its configuration
    # file and starts), and wrk prints its version only with its usage text.
    for package in ("webdis", "wrk", "redis-tools"):
        result = subprocess.run(["dpkg-query", "--show", "--showformat=${Version}", package], capture_output=True, text=True)
        versions[package] = f"{package} {result.stdout.strip()} (Debian package)" if result.returncode == 0 else "unavailable"
    return versions
