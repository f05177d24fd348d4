"""Throughput of `minnorm-audit run` and the cost of a Minnorm step over a plain step.

Prints a markdown table; never asserts on time. Usage:

    python benchmarks/throughput.py [--repeats 15] [--step-runs 5] [--steps-only]

The step ratio is measured ``--step-runs`` times, each the median over ``--repeats``
interleaved blocks of 64 steps (one window of deferred dual updates, as ``fit()``
trains; the CNN gets a fifth as many blocks). The median of those runs is reported
with the spread: on a shared machine one run can be far off.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from minnorm_audit import __version__
from minnorm_audit.audit import AuditOptions, run_audit
from minnorm_audit.data import load_dataset, write_demo_dataset
from minnorm_audit.minnorm import DEFERRED_WINDOW_EXAMPLES, Minnorm
from minnorm_audit.training import TrainConfig, build_model


def audit_rate(data_path: Path, out: Path, image_size: int, epochs: int) -> tuple[int, float]:
    """Examples per second of a whole audit (load + train + score + write)."""
    started = time.perf_counter()
    loaded = load_dataset(data_path, image_size=image_size)
    settings = AuditOptions(image_size=image_size, train=TrainConfig(epochs=epochs, device="cpu"))
    run_audit(loaded, settings, out, load_seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    return len(loaded.sources), seconds


def step_ratio(inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, repeats: int) -> tuple[float, float]:
    """Median seconds per step of Minnorm and of plain cross-entropy training (same model, batches).

    Steps are taken as ``fit()`` takes them: batches of 128 distinct examples from a
    permutation, the dual updates queued by ``deferred_dual_updates()`` and applied
    once per window. So each timed block is one window (``DEFERRED_WINDOW_EXAMPLES``
    examples, 64 steps), its dual pass included, and the plain block runs the same
    batches.
    """
    model = build_model("auto", inputs, num_classes)
    minnorm = Minnorm(torch.optim.Adam(model.parameters(), lr=1e-3), num_examples=len(inputs),
                      num_outputs=num_classes, model=model,
                      # As fit() trains by default: violation sums kept, soft-margin cap on.
                      track_violations=True, max_multiplier=0.05)
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    block_size = DEFERRED_WINDOW_EXAMPLES

    def draw_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ids = torch.randperm(len(inputs), generator=generator)[:block_size]
        return [(batch, inputs[batch], labels[batch]) for batch in ids.split(128)]

    def minnorm_block(batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        with minnorm.deferred_dual_updates():
            for batch_ids, batch, batch_labels in batches:
                loss = minnorm.lagrangian(model(batch), batch_labels, batch_ids)
                minnorm.zero_grad()
                loss.backward()
                minnorm.step()

    def plain_block(batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        for _, batch, batch_labels in batches:
            loss = torch.nn.functional.cross_entropy(model(batch), batch_labels)
            plain.zero_grad()
            loss.backward()
            plain.step()

    timings: dict[str, list[float]] = {"minnorm": [], "plain": []}
    warmup = draw_batches()
    minnorm_block(warmup)
    plain_block(warmup)
    # Interleaved so both see the same machine state.
    for _ in range(repeats):
        batches = draw_batches()
        for name, block in (("minnorm", minnorm_block), ("plain", plain_block)):
            started = time.perf_counter()
            block(batches)
            timings[name].append((time.perf_counter() - started) / len(batches))
    return float(np.median(timings["minnorm"])), float(np.median(timings["plain"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="Timed blocks of 64 steps per run (MLP; CNN a fifth).")
    parser.add_argument("--table-rows", type=int, default=20_000)
    parser.add_argument("--step-runs", type=int, default=5, help="Repeat the step-ratio measurement; report the median.")
    parser.add_argument("--steps-only", action="store_true", help="Skip the whole-audit rows.")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, minnorm-audit {__version__}\n")

    if args.steps_only:
        print_step_ratios(args.repeats, args.step_runs)
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        demo = write_demo_dataset(scratch_path / "digits")
        count, seconds = audit_rate(demo.root, scratch_path / "run-digits", 16, 20)
        rows.append(("demo digits, images 16x16, CNN, 20 epochs", count, seconds))
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 10, size=args.table_rows)
        features = rng.normal(size=(args.table_rows, 128)).astype(np.float32) + labels[:, None] * 0.05
        frame = pd.DataFrame(features, columns=[f"e{i}" for i in range(128)])
        frame["label"] = labels
        frame.to_parquet(scratch_path / "table.parquet")
        count, seconds = audit_rate(scratch_path / "table.parquet", scratch_path / "run-table", 32, 20)
        rows.append((f"synthetic table {args.table_rows:,} x 128, MLP, 20 epochs", count, seconds))

    print("| audit | examples | seconds | examples/s (x epochs) |")
    print("|---|---|---|---|")
    for name, count, seconds in rows:
        print(f"| {name} | {count:,} | {seconds:.1f} | {count * 20 / seconds:,.0f} |")

    print()
    print_step_ratios(args.repeats, args.step_runs)


def print_step_ratios(repeats: int, runs: int) -> None:
    """The Minnorm / plain cross-entropy step table (median over ``runs`` runs)."""
    print(f"| model, batch 128 | Minnorm step (ms) | plain CE step (ms) | ratio, median of {runs} runs | ratio per run |")
    print("|---|---|---|---|---|")
    images = torch.randint(0, 256, (DEFERRED_WINDOW_EXAMPLES, 3, 16, 16), dtype=torch.uint8)
    table = torch.randn(DEFERRED_WINDOW_EXAMPLES, 128)
    labels = torch.randint(0, 10, (DEFERRED_WINDOW_EXAMPLES,))
    # A CNN block of 64 steps takes seconds and its ratio is far from the target: fewer blocks.
    for name, inputs, blocks in (("CNN on 16x16 images", images, max(repeats // 5, 2)),
                                 ("MLP on 128 features", table, repeats)):
        measured = [step_ratio(inputs, labels, 10, blocks) for _ in range(max(runs, 1))]
        ratios = [minnorm / plain for minnorm, plain in measured]
        middle = int(np.argsort(ratios)[len(ratios) // 2])
        minnorm_seconds, plain_seconds = measured[middle]
        print(f"| {name} | {minnorm_seconds * 1e3:.2f} | {plain_seconds * 1e3:.2f} | {ratios[middle]:.3f} "
              f"| {', '.join(f'{ratio:.3f}' for ratio in ratios)} |")


if __name__ == "__main__":
    main()
