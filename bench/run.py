"""Run kvapi's benchmark and print ops/s, p50 and p99 latency per case,
target and client count, with the ratios that kvapi aims for.

    python -m bench.run                       # every case and target, 10 s each, 1/8/32 clients
    python -m bench.run --quick               # 1 s each, 1 client, 1000 keys
    python -m bench.run --cases get,set_durable --targets functions,http --clients 8
    python -m bench.run --large-keys 1000000 --cases none   # large-data report only
    python -m bench.run --soak 600 --cases none --targets functions   # soak report only

Everything runs on 127.0.0.1 in a temporary folder, and every process the
run starts is stopped by PID when it ends. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import diagnose, large, profile, report, soak, workloads
from bench.environment import BenchEnvironment

logger = logging.getLogger("bench")

QUICK_DEFAULTS = {"duration": 1.0, "warmup": 0.0, "clients": "1", "keys": 1000}
FULL_DEFAULTS = {"duration": 10.0, "warmup": 2.0, "clients": "1,8,32", "keys": 100_000}


def parse_list(text: str, allowed: list[str], what: str) -> list[str]:
    if text in ("all", ""):
        return list(allowed)
    if text == "none":
        return []
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, help="seconds per measured run (default: 10; --quick: 1)")
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load before each case and target (default: 2; --quick: 0)")
    parser.add_argument("--clients", help="comma-separated client counts (default: 1,8,32; --quick: 1)")
    parser.add_argument("--cases", default="all",
                        help=f"comma-separated cases, 'all' or 'none' (default: all): {', '.join(workloads.CASES)}")
    parser.add_argument("--targets", default="all",
                        help=f"comma-separated targets (default: all): {', '.join(workloads.TARGETS)}")
    parser.add_argument("--keys", type=int, help="keys loaded before the runs (default: 100000; --quick: 1000)")
    parser.add_argument("--quick", action="store_true", help="short run with small defaults, for a smoke test")
    parser.add_argument("--workers", type=int, default=2, help="granian workers of kvapi and the baseline, webdis threads (default: 2)")
    parser.add_argument("--shared-buffers", default="128MB", help="PostgreSQL shared_buffers (default: 128MB)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of pgbench and wrk (default: 1)")
    parser.add_argument("--diagnose", action="store_true",
                        help="also measure plan_cache_mode settings, partition locks and SQL function overheads")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="also sample the kvapi workers with py-spy for SECONDS during HTTP get (default: 0, off)")
    parser.add_argument("--large-keys", type=int, default=0, metavar="N",
                        help="also run the large-data report: get/set p99 at --small-keys vs N keys, "
                             "bytes per key and purge time (default: 0, off)")
    parser.add_argument("--small-keys", type=int, default=10_000, help="key count of the large-data report's small side (default: 10000)")
    parser.add_argument("--purge-keys", type=int, default=100_000, help="expired keys that the large-data report purges (default: 100000)")
    parser.add_argument("--large-clients", type=int, default=8, help="clients of the large-data report's runs (default: 8)")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="also run the soak report: touch and incr for SECONDS, sampling the table's size (default: off)")
    parser.add_argument("--soak-clients", type=int, default=8, help="clients of the soak run (default: 8)")
    parser.add_argument("--soak-interval", type=float, default=30.0, help="seconds between the soak's samples (default: 30)")
    parser.add_argument("--output", type=Path, help="folder for results.json, server logs and profiles (default: none)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.clients = [int(item) for item in str(args.clients).split(",")]
        args.cases = parse_list(args.cases, workloads.CASES, "case")
        args.targets = parse_list(args.targets, workloads.TARGETS, "target")
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    if any(clients < 1 for clients in args.clients):
        parser.error("--clients must be positive integers")
    if args.keys < workloads.MGET_KEYS:
        parser.error(f"--keys must be at least {workloads.MGET_KEYS}")
    return args


def plan_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Return the (case, target) pairs to measure, in run order. The Litestar
    baseline has one request, listed under get. It also runs when get is not
    selected but an HTTP case is, because the HTTP ratios divide by it."""
    pairs = [(case, target) for case in args.cases for target in args.targets if workloads.supports(target, case)]
    if ("get", "litestar") not in pairs and "litestar" in args.targets and any(target == "http" for _, target in pairs):
        pairs.insert(0, ("get", "litestar"))
    return pairs


def run_matrix(environment: BenchEnvironment, args: argparse.Namespace) -> list[report.Result]:
    """Measure each planned case and target at each client count, printing
    each result as it arrives. The targets of one case run back to back, so
    that they see the same background load."""
    pairs = plan_runs(args)
    cases = list(dict.fromkeys(case for case, _ in pairs))
    results = []
    for case in cases:
        targets = [target for pair_case, target in pairs if pair_case == case]
        for clients in args.clients:
            for target in targets:
                if args.warmup > 0 and clients == args.clients[0] and target != "redis":
                    environment.run(target, case, max(args.clients), args.warmup)
                measurement = environment.run(target, case, clients, args.duration)
                result = report.Result(case, target, clients, measurement)
                results.append(result)
                detail = [f"[{measurement.error_detail}]"] if measurement.errors else []
                report.progress("measured", result.row() + detail)
    return results


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # SIGTERM ends the run like Ctrl-C, so that every server is stopped.
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.monotonic()
    output: dict[str, object] = {"command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])}
    with tempfile.TemporaryDirectory(prefix="kvapi-bench-") as folder:
        workdir = Path(folder)
        info = report.environment_info(workdir)
        output["environment"] = info
        needed_targets = set(args.targets) | ({"tables", "functions"} if args.diagnose else set())
        if args.profile > 0:
            needed_targets.add("http")
        with BenchEnvironment(workdir, keys=args.keys, workers=args.workers, targets=sorted(needed_targets),
                              shared_buffers=args.shared_buffers, seed=args.seed) as environment:
            print(f"kvapi benchmark: {args.keys:,} keys, {args.duration:g} s per run, clients {args.clients}, "
                  f"{args.workers} server workers", flush=True)
            print(report.environment_text(info), flush=True)
            results = run_matrix(environment, args)
            ratios = report.compute_ratios(results, args.clients)
            output["results"] = [result.as_dict() for result in results]
            output["ratios"] = ratios

            if args.diagnose:
                output["diagnosis"] = diagnose.run(environment, args)
            if args.profile > 0:
                output["profile"] = profile.run(environment, args)
            if args.large_keys > 0:
                output["large"] = large.run(environment, args)
            if args.soak > 0:
                output["soak"] = soak.run(environment, args)

            info["load_average_at_end"] = report.load_average()
            print("\nResults (CPU columns: CPU microseconds per operation of PostgreSQL, of the HTTP or Redis "
                  "server, and of the load generator)\n")
            print(report.results_table(results))
            print("\nRatios\n")
            print(report.ratios_table(ratios, args.clients))
            for section in ("diagnosis", "profile", "large", "soak"):
                if section in output:
                    print(f"\n{output[section]['text']}")
            print(f"\nload average (1, 5, 15 min): start {info['load_average_at_start']}, end {info['load_average_at_end']}")
            print(f"total time: {time.monotonic() - started:.0f} s")

            if args.output:
                save_output(args.output, output, environment)
    return 0


def save_output(folder: Path, output: dict[str, object], environment: BenchEnvironment) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(output, indent=2, default=str))
    for server in environment.servers.values():
        target = folder / server.log_path.name
        target.write_bytes(server.log_path.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
