"""How long the run folder of a large audit takes to write: the Parquet files, the
gallery's thumbnails, summary.json and report.html, for a synthetic run of 50,000
image examples (10 classes, the default gallery of 60), without training.

The examples table has the columns and types score_run.py gives it (``class_multipliers``
included); the folder is written by the pipeline's own writer (``write_run_folder``)
and the page by ``render_report``, each timed separately. Prints a markdown table
(median of ``--repeats`` runs); never asserts on time. Usage:

    python benchmarks/report_speed.py [--examples 50000] [--classes 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from minnorm_audit import __version__
from minnorm_audit.data import LoadedDataset
from minnorm_audit.report.html import render_report
from minnorm_audit.report.parquet import (
    EXAMPLES_DESCRIPTIONS,
    GALLERY_DESCRIPTIONS,
    SET_ASIDE_DESCRIPTIONS,
    write_json_atomic,
    write_parquet_atomic,
)
from minnorm_audit.write_run import build_gallery


def synthetic_run(num_examples: int, num_classes: int, seed: int = 0) -> tuple[pd.DataFrame, LoadedDataset, dict[str, Any]]:
    """Scored examples as score_run.py returns them, the loaded images they came from,
    and a summary like describe_run()'s (20 epochs of history)."""
    rng = np.random.default_rng(seed)
    classes = [f"class_{index}" for index in range(num_classes)]
    given = rng.integers(0, num_classes, num_examples)
    competing = (given + rng.integers(1, num_classes, num_examples)) % num_classes
    difficulty = rng.normal(-0.5, 0.8, num_examples)
    difficulty[rng.random(num_examples) < 0.08] += 3.0  # a tail of suspects
    threshold = float(np.quantile(difficulty, 0.92))
    flag = np.where(difficulty >= threshold, np.where(rng.random(num_examples) < 0.7, "mislabeled", "hard"), "ok")
    names = np.array(classes, dtype=object)
    sources = [f"{names[label]}/{index:06d}.png" for index, label in enumerate(given)]
    multipliers = rng.random((num_examples, num_classes), dtype=np.float32) * 0.1
    examples = pd.DataFrame({
        "example_id": np.arange(num_examples, dtype=np.int64),
        "source": sources,
        "given_label": names[given],
        "suggested_label": np.where(flag == "mislabeled", names[competing], names[given]),
        "competing_label": names[competing],
        "difficulty": difficulty,
        "difficulty_percentile": 100.0 * pd.Series(difficulty).rank(pct=True).to_numpy(),
        "flag": flag,
        "label_concentration": rng.random(num_examples),
        "margin": rng.normal(1.0, 0.5, num_examples),
        "class_multipliers": list(multipliers),
    })
    loaded = LoadedDataset(
        kind="images", task="classification", root=Path("/data/synthetic"), sources=sources,
        inputs=torch.from_numpy(rng.integers(0, 256, (num_examples, 3, 32, 32), dtype=np.uint8)),
        targets=torch.from_numpy(given), class_names=classes, target_names=[], feature_names=[], set_aside=[],
        fingerprint="0" * 64, image_size=32,
    )
    history = [{"epoch": epoch, "max_violation": 3.0 * 0.9**epoch, "fraction_fitted": 1 - 0.5 * 0.85**epoch,
                "multiplier_change": 0.6 * 0.9**epoch, "rank_stability": 1 - 0.5 * 0.7**epoch, "norm": 100.0 + epoch}
               for epoch in range(1, 21)]
    counts = {name: int((flag == name).sum()) for name in ("mislabeled", "hard", "ok")}
    summary = {
        "tool": "minnorm-audit", "version": __version__, "data": "/data/synthetic", "kind": "images",
        "task": "classification", "num_examples": num_examples, "num_set_aside": 0, "class_names": classes,
        "counts": counts,
        "flag_rule": {"difficulty_threshold": threshold, "difficulty_threshold_method": "Otsu split of difficulty",
                      "rule": "flagged when difficulty >= difficulty_threshold and difficulty > 0; mislabeled when "
                              "difficulty - margin >= preference_threshold, else hard",
                      "preference_threshold": 0.0},
        "diagnostics": {**history[-1], "epochs": 20, "scored_epoch": 20}, "history": history,
        "timings": {"load_s": 0.0, "train_s": 0.0, "total_s": 0.0}, "config": {"epochs": 20, "image_size": 32},
    }
    return examples, loaded, summary


def time_write(folder: Path, examples: pd.DataFrame, loaded: LoadedDataset, summary: dict[str, Any],
               gallery_size: int) -> dict[str, float]:
    """Seconds of each part of writing one run folder, in the order write_run_folder() runs them."""
    metadata = {"config": summary["config"], "class_names": summary["class_names"], "kind": "images",
                "task": "classification", "versions": {"minnorm_audit": __version__}}
    folder.mkdir(parents=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    write_parquet_atomic(folder / "examples.parquet", examples, descriptions=EXAMPLES_DESCRIPTIONS, metadata=metadata)
    seconds["examples.parquet"] = time.perf_counter() - started
    started = time.perf_counter()
    write_parquet_atomic(folder / "set_aside.parquet", pd.DataFrame({"source": pd.Series([], dtype=str),
                                                                     "reason": pd.Series([], dtype=str)}),
                         descriptions=SET_ASIDE_DESCRIPTIONS, metadata=metadata)
    seconds["set_aside.parquet"] = time.perf_counter() - started
    started = time.perf_counter()
    gallery = build_gallery(examples, loaded, gallery_size)
    write_parquet_atomic(folder / "gallery.parquet", gallery, descriptions=GALLERY_DESCRIPTIONS, metadata=metadata)
    seconds["gallery.parquet (thumbnails)"] = time.perf_counter() - started
    started = time.perf_counter()
    write_json_atomic(folder / "summary.json", summary)
    seconds["summary.json"] = time.perf_counter() - started
    started = time.perf_counter()
    render_report(folder)
    seconds["report.html (render_report)"] = time.perf_counter() - started
    seconds["all of the above"] = sum(seconds.values())
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--gallery-size", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs")
    import pyarrow

    print(f"versions: python {platform.python_version()}, minnorm-audit {__version__}, pandas {pd.__version__}, "
          f"pyarrow {pyarrow.__version__}, numpy {np.__version__}\n")
    examples, loaded, summary = synthetic_run(args.examples, args.classes)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            runs.append(time_write(Path(scratch) / f"run-{repeat}", examples, loaded, summary, args.gallery_size))
        page_bytes = (Path(scratch) / "run-0" / "report.html").stat().st_size
    print(f"| {args.examples:,} examples x {args.classes} classes, gallery {args.gallery_size} | "
          f"seconds, median of {args.repeats} | runs |")
    print("|---|---|---|")
    for part in runs[0]:
        values = [run[part] for run in runs]
        print(f"| {part} | {statistics.median(values):.3f} | {', '.join(f'{value:.3f}' for value in values)} |")
    print(f"\nreport.html: {page_bytes / 1e3:,.0f} kB")


if __name__ == "__main__":
    main()
