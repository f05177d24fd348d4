"""The fixed costs of an audit, the ones that do not grow with training: starting the
tool, the demo end to end (and its training alone), writing the run folder of 50,000
examples, and decoding a folder of 10,000 small images in one process or in a pool.

Prints a markdown table (median of ``--repeats`` runs where it says so); never asserts
on time. Usage:

    python benchmarks/fixed_costs.py [--repeats 3] [--files 10000] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def fresh_python(code: str) -> float:
    """Wall seconds of ``python -c code`` in a fresh interpreter (what it prints, if a
    number, is taken instead: a time measured inside)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    elapsed = time.perf_counter() - started
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return elapsed


def import_rows(repeats: int) -> list[tuple[str, list[float], str]]:
    timed = "import time; t = time.perf_counter(); {0}; print(time.perf_counter() - t)"
    return [
        ("import torch (floor of any audit)", [fresh_python(timed.format("import torch")) for _ in range(repeats)],
         "fresh interpreter"),
        ("import minnorm_audit", [fresh_python(timed.format("import minnorm_audit")) for _ in range(repeats)],
         "fresh interpreter; the API (and torch) load on first use"),
        ("import minnorm_audit; minnorm_audit.audit",
         [fresh_python(timed.format("import minnorm_audit; minnorm_audit.audit")) for _ in range(repeats)],
         "fresh interpreter, torch included"),
        ("minnorm-audit --version", [fresh_python("import sys; from minnorm_audit.cli import main; sys.argv = ['x', '--version'];"
                                                  "\ntry:\n    main()\nexcept SystemExit:\n    pass") for _ in range(repeats)],
         "fresh interpreter, wall; no torch"),
        ("import torch._dynamo (no longer paid by an audit)",
         [fresh_python("import time, torch; t = time.perf_counter(); import torch._dynamo; "
                       "print(time.perf_counter() - t)") for _ in range(repeats)],
         "after torch; what building torch.optim.Adam used to cost"),
        ("minnorm-audit --help", [fresh_python("import sys; from minnorm_audit.cli import main; sys.argv = ['x', '--help'];"
                                                "\ntry:\n    main()\nexcept SystemExit:\n    pass") for _ in range(repeats)],
         "fresh interpreter, wall"),
    ]


def demo_rows(repeats: int) -> list[tuple[str, list[float], str]]:
    """`minnorm-audit demo` end to end (wall, its own process) and the training inside it."""
    command = [str(Path(sys.executable).with_name("minnorm-audit")), "demo", "--quiet"]
    walls, trains, totals = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            subprocess.run([*command, "--out", str(Path(scratch) / "demo")], check=True, capture_output=True, cwd=REPO)
            walls.append(time.perf_counter() - started)
            timings = json.loads((Path(scratch) / "demo" / "run" / "summary.json").read_text())["timings"]
            trains.append(timings["train_s"])
            totals.append(timings["total_s"])
    return [
        ("minnorm-audit demo (1,797 8x8 digit images, CNN, 20 epochs), end to end", walls, "wall of the whole command"),
        ("  of which training (summary train_s)", trains, "channels-last CNN, fused Adam"),
        ("  of which load + train + score + write (summary total_s)", totals, "the rest: start, demo data, page"),
    ]


def report_rows(repeats: int) -> list[tuple[str, list[float], str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report_speed  # the 50k-example run folder of benchmarks/report_speed.py

    examples, loaded, summary = report_speed.synthetic_run(50_000, 10)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            runs.append(report_speed.time_write(Path(scratch) / f"run-{repeat}", examples, loaded, summary, 60))
    return [
        ("run folder of 50,000 examples: Parquet + thumbnails + summary + report.html",
         [run["all of the above"] for run in runs], "benchmarks/report_speed.py has the parts"),
        ("  of which render_report", [run["report.html (render_report)"] for run in runs], ""),
    ]


def decode_rows(files: int, repeats: int) -> list[tuple[str, list[float], str]]:
    from minnorm_audit.data import image_files

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        paths = []
        for index in range(files):
            folder = Path(scratch) / f"class_{index % 10}"
            folder.mkdir(exist_ok=True)
            path = folder / f"{index:05d}.png"
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
            paths.append(path)
        threads, pooled, same = [], [], True
        for _ in range(repeats):
            started = time.perf_counter()
            one = image_files._decode_image_files(paths, 28, processes=1)
            threads.append(time.perf_counter() - started)
            started = time.perf_counter()
            many = image_files._decode_image_files(paths, 28, processes=max(cpus, 2))
            pooled.append(time.perf_counter() - started)
            same = same and all(np.array_equal(a.pixels, b.pixels) for a, b in zip(one, many))
    return [
        (f"decode {files:,} 28x28 PNG files: one process (thread pool)", threads, "the path below 2,000 files"),
        (f"decode {files:,} 28x28 PNG files: pool of {max(cpus, 2)} processes", pooled,
         f"pixels identical to one process: {same}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--skip-demo", action="store_true", help="Leave out the demo rows (the slowest).")
    args = parser.parse_args()

    import pandas as pd
    import pyarrow
    import torch

    from minnorm_audit import __version__

    print(f"command: python {' '.join(sys.argv)}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs ({cpus} usable), "
          f"torch threads {torch.get_num_threads()}, load average at start {load:.1f}")
    print(f"versions: python {platform.python_version()}, minnorm-audit {__version__}, torch {torch.__version__}, "
          f"numpy {np.__version__}, pandas {pd.__version__}, pyarrow {pyarrow.__version__}\n")
    rows = import_rows(args.repeats)
    if not args.skip_demo:
        rows += demo_rows(args.repeats)
    rows += report_rows(args.repeats)
    rows += decode_rows(args.files, args.repeats)
    print(f"| fixed cost | seconds, median of {args.repeats} | runs | note |")
    print("|---|---|---|---|")
    for name, values, note in rows:
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{value:.2f}' for value in values)} | {note} |")


if __name__ == "__main__":
    main()
