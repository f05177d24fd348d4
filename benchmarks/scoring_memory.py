"""Peak memory of a whole audit with many classes: scoring block by block vs full arrays.

Prints a markdown table; never asserts. Usage:

    python benchmarks/scoring_memory.py [--examples 200000] [--classes 1000] [--epochs 1]

Each mode runs ``minnorm_audit.audit()`` in a fresh subprocess on the same synthetic
table (32 features, Gaussian class centres) and reports the child's peak resident
memory (``ru_maxrss``) and wall time:

- ``blocks`` (the default since this benchmark was written): above
  ``training.loop.DENSE_RESULT_ELEMENTS`` examples x classes, fit() keeps no full per-class
  arrays and the audit reads the trained state in blocks of about
  ``score_run.SCORE_BLOCK_ELEMENTS`` examples x classes; ``class_multipliers`` is left out above ``CLASS_MULTIPLIERS_MAX_CLASSES``.
- ``full arrays`` (how audits scored before): both limits raised so that every
  examples x classes array is built, as float32 results and float64 temporaries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

CHILD = r"""
import importlib, json, sys, time, resource
import numpy as np
import minnorm_audit
from minnorm_audit import score_run
from minnorm_audit.training import loop as fit_module
examples, classes, epochs, mode, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if mode == "full arrays":
    fit_module.DENSE_RESULT_ELEMENTS = 1 << 62
    score_run.CLASS_MULTIPLIERS_MAX_CLASSES = 1 << 30
rng = np.random.default_rng(0)
labels = rng.integers(0, classes, size=examples)
centres = rng.normal(size=(classes, 32)).astype(np.float32)
features = centres[labels] + rng.normal(scale=0.8, size=(examples, 32)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
result = minnorm_audit.audit((features, labels), out=out, epochs=epochs, device="cpu", batch_size=512)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                  "data_peak_gb": before * 1024 / 1e9,
                  "columns": len(result.examples.columns)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    import torch

    from minnorm_audit import __version__

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, minnorm-audit {__version__}\n")
    print(f"| {args.examples:,} examples x {args.classes} classes, {args.epochs} epoch(s) | peak resident memory (GB) "
          "| of which data + imports before the audit | audit seconds |")
    print("|---|---|---|---|")
    for mode in ("blocks", "full arrays"):
        with tempfile.TemporaryDirectory() as scratch:
            completed = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.examples), str(args.classes), str(args.epochs), mode,
                 os.path.join(scratch, "run")],
                capture_output=True, text=True,
            )
        if completed.returncode != 0:
            print(f"| {mode} | failed (exit {completed.returncode}): {completed.stderr.strip().splitlines()[-1:]} | | |")
            continue
        figures = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {figures['peak_gb']:.2f} | {figures['data_peak_gb']:.2f} | {figures['seconds']:.1f} |")


if __name__ == "__main__":
    main()
