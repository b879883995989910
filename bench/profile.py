"""Sample the kvapi HTTP workers with py-spy during the get case.

wrk sends GET requests at the highest client count while py-spy records
each granian worker for --profile seconds. The report lists the frames
where the workers spend their time (self) and the frames on the stack
(inclusive), as a share of all samples. This run is not part of the table:
sampling slows the workers down.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench import drivers, workloads
from bench.environment import BenchEnvironment

TOP_FRAMES = 15
SAMPLE_RATE = 200
_LINE_NUMBER = re.compile(r":\d+\)$")
# Frames of process start-up (runpy, multiprocessing, granian's worker
# spawning, kvapi's CLI) sit under every sample of a worker's main thread.
_STARTUP_FRAME = re.compile(r"\((?:<frozen runpy>|multiprocessing/|granian/server/|kvapi/cli\.py|kvapi/__main__\.py)")
_PATH_PREFIX = re.compile(r"\((?:.*/site-packages/|.*/lib/python3\.\d+/|" + re.escape(str(Path(__file__).resolve().parent.parent)) + "/)")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def worker_pids(environment: BenchEnvironment) -> list[int]:
    """PIDs of the granian worker processes (children of `kvapi serve`
    other than multiprocessing's resource tracker)."""
    pids = []
    for child in environment.servers["kvapi"].descendants():
        try:
            command = Path(f"/proc/{child.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"resource_tracker" not in command and b"kvapi" in command:
            pids.append(child.pid)
    return pids


def frame_name(frame: str) -> str:
    return _PATH_PREFIX.sub("(", _LINE_NUMBER.sub(")", frame))


def summarise(raw_files: list[Path]) -> tuple[int, Counter, Counter]:
    """Total samples, and samples per frame as leaf (self) and anywhere on the stack (inclusive)."""
    total = 0
    leaf: Counter = Counter()
    inclusive: Counter = Counter()
    for path in raw_files:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [frame_name(frame) for frame in stack.split(";")]
            total += count
            leaf[frames[-1]] += count
            for frame in set(frames):
                if not _STARTUP_FRAME.search(frame):
                    inclusive[frame] += count
    return total, leaf, inclusive


def run(environment: BenchEnvironment, args: argparse.Namespace) -> dict:
    seconds = args.profile
    clients = max(args.clients)
    executable = py_spy()
    if executable is None:
        return {"text": "Profile: py-spy is not installed (pip install py-spy)", "error": "py-spy not installed"}
    pids = worker_pids(environment)
    folder = environment.workdir / "profile"
    folder.mkdir(exist_ok=True)
    recorders = []
    for pid in pids:
        output = folder / f"worker_{pid}.txt"
        command = [executable, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                   "--rate", str(SAMPLE_RATE), "--format", "raw", "--output", str(output), "--nonblocking"]
        recorders.append((output, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    drivers.run_wrk(environment.servers["kvapi"].address, workloads.WRK_MODES[("http", "get")], clients=clients,
                    duration=seconds + 2, seed=environment.seed, keys=environment.keys, aux_keys=environment.aux_keys,
                    app_id=workloads.APP_ID, service_key=environment.service_key)
    errors = []
    raw_files = []
    for output, recorder in recorders:
        try:
            log, _ = recorder.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            log, _ = recorder.communicate()
        if recorder.returncode != 0 or not output.exists():
            errors.append(f"py-spy on PID {recorder.args[3]} failed with exit code {recorder.returncode}: {log.strip()[-300:]}")
        else:
            raw_files.append(output)

    total, leaf, inclusive = summarise(raw_files)
    lines = [f"Profile: py-spy, {SAMPLE_RATE} samples/s for {seconds:g} s on {len(pids)} kvapi workers, "
             f"HTTP get at {clients} clients; {total} samples with a Python frame on CPU"]
    lines += errors
    if total:
        lines.append("\ntop frames by self time (the frame running when sampled):")
        lines += [f"  {count * 100 / total:5.1f}%  {frame}" for frame, count in leaf.most_common(TOP_FRAMES)]
        lines.append("\ntop frames by inclusive time (the frame anywhere on the stack):")
        lines += [f"  {count * 100 / total:5.1f}%  {frame}" for frame, count in inclusive.most_common(TOP_FRAMES)]
    return {"text": "\n".join(lines), "samples": total, "errors": errors,
            "self": leaf.most_common(40), "inclusive": inclusive.most_common(40)}
