"""One-GPU benchmark: a CIFAR-10-size synthetic image audit through the real audit path.

50,000 images of 3 x 32 x 32 in 10 classes (class templates plus noise, 5% of the
labels flipped), audited with ``minnorm_audit.audit`` (default CNN, bf16 autocast on
CUDA, 20 epochs, batch 128). Prints one markdown table: the command, machine,
versions and device; whole-audit time; training examples per second; the
Minnorm-step / plain cross-entropy-step time ratio (same model, batch and autocast);
peak GPU memory; and, as a sanity check, the AUROC of the difficulty score for the
flipped labels. Targets on one H100 (issue 6): whole audit under 60 s, step ratio
<= 1.05. Nothing is asserted. Usage:

    python benchmarks/gpu.py                                   # CUDA when present
    python benchmarks/gpu.py --device cpu --num-examples 2000 --epochs 2   # a quick CPU check
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
import torch

from minnorm_audit import __version__, audit
from minnorm_audit.minnorm import Minnorm
from minnorm_audit.training import autocast_context, build_model, resolve_device

NUM_CLASSES = 10
FLIP_RATE = 0.05


def synthetic_images(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32), given labels (N,), and a mask of the flipped ones."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.interpolate(
        torch.rand(NUM_CLASSES, 3, 4, 4, generator=generator), size=(32, 32), mode="bilinear", align_corners=False
    )
    true_labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=generator)
    images = torch.empty((num_examples, 3, 32, 32), dtype=torch.uint8)
    for start in range(0, num_examples, 5000):  # in chunks: no 600 MB float temporary
        labels = true_labels[start : start + 5000]
        noise = torch.randn((len(labels), 3, 32, 32), generator=generator) * 0.25
        images[start : start + 5000] = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(num_examples, dtype=bool)
    flipped[rng.choice(num_examples, round(FLIP_RATE * num_examples), replace=False)] = True
    given = true_labels.numpy().copy()
    given[flipped] = (given[flipped] + rng.integers(1, NUM_CLASSES, size=int(flipped.sum()))) % NUM_CLASSES
    return images.numpy(), given, flipped


def auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve from average ranks (Mann-Whitney U)."""
    import pandas as pd

    ranks = pd.Series(scores).rank(method="average").to_numpy()
    count_positive, count_negative = int(positive.sum()), int((~positive).sum())
    if not count_positive or not count_negative:
        return float("nan")
    return float((ranks[positive].sum() - count_positive * (count_positive + 1) / 2) / (count_positive * count_negative))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int,
               blocks: int, steps_per_block: int) -> tuple[float, float]:
    """Median seconds per step of a Minnorm step and of a plain cross-entropy Adam step,
    same model, batch and autocast, timed in interleaved blocks.

    The same batch every step, so each dual update is applied at its step (fit() queues
    them, ``Minnorm.deferred_dual_updates``): an upper bound on fit()'s step."""
    inputs = torch.from_numpy(images[: max(batch_size, 1024)])
    torch.manual_seed(0)
    model = build_model("auto", inputs, NUM_CLASSES).to(device)
    batch_ids = torch.arange(batch_size, device=device)
    batch = inputs[:batch_size].to(device)
    batch_labels = torch.from_numpy(labels[:batch_size]).to(device)
    minnorm = Minnorm(torch.optim.Adam(model.parameters(), lr=1e-3), num_examples=len(images),
                      num_outputs=NUM_CLASSES, model=model, dual_lr=0.01, device=device,
                      track_violations=True, max_multiplier=0.05)  # as fit() trains by default
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)

    def minnorm_step() -> None:
        with autocast_context(device):
            outputs = model(batch)
        loss = minnorm.lagrangian(outputs, batch_labels, batch_ids)
        minnorm.zero_grad(set_to_none=True)
        loss.backward()
        minnorm.step()

    def plain_step() -> None:
        with autocast_context(device):
            outputs = model(batch)
        loss = torch.nn.functional.cross_entropy(outputs.float(), batch_labels)
        plain.zero_grad(set_to_none=True)
        loss.backward()
        plain.step()

    for _ in range(10):
        minnorm_step()
        plain_step()
    timings: dict[str, list[float]] = {"minnorm": [], "plain": []}
    for _ in range(blocks):
        for name, step in (("minnorm", minnorm_step), ("plain", plain_step)):
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps_per_block):
                step()
            synchronize(device)
            timings[name].append((time.perf_counter() - started) / steps_per_block)
    return float(np.median(timings["minnorm"])), float(np.median(timings["plain"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--num-examples", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=15, help="Interleaved timing blocks for the step ratio.")
    parser.add_argument("--steps-per-block", type=int, default=20)
    args = parser.parse_args()
    device = resolve_device(args.device)

    started = time.perf_counter()
    images, labels, flipped = synthetic_images(args.num_examples, args.seed)
    generate_seconds = time.perf_counter() - started

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as scratch:
        synchronize(device)
        started = time.perf_counter()
        result = audit((images, labels), out=Path(scratch) / "run", epochs=args.epochs, batch_size=args.batch_size,
                       device=args.device, seed=args.seed, image_size=32)
        synchronize(device)
        audit_seconds = time.perf_counter() - started
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    timings = result.summary["timings"]
    examples_per_second = args.num_examples * args.epochs / timings["train_s"]
    difficulty = result.examples["difficulty"].to_numpy()
    minnorm_seconds, plain_seconds = step_times(images, labels, device, args.batch_size,
                                                args.blocks, args.steps_per_block)

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        device_text = f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, bf16 autocast"
    else:
        device_text = f"CPU, {torch.get_num_threads()} torch threads, float32"
    rows = [
        ("command", f"python {' '.join(sys.argv)}"),
        ("machine", f"{platform.platform()}, {os.cpu_count()} CPUs"),
        ("device", device_text),
        ("versions", f"python {platform.python_version()}, torch {torch.__version__}, minnorm-audit {__version__}"),
        ("data", f"{args.num_examples:,} synthetic images 3x32x32, {NUM_CLASSES} classes, {FLIP_RATE:.0%} labels "
                 f"flipped (generated in {generate_seconds:.1f} s, not counted)"),
        ("audit", f"default CNN, {args.epochs} epochs, batch {args.batch_size}, data placement "
                  f"{result.summary['config'].get('data_placement', '?')}, 1 run"),
        ("whole audit (load + train + score + write), s", f"{audit_seconds:.1f}   (target on one H100: < 60)"),
        ("  of which training, s", f"{timings['train_s']:.1f}"),
        ("training examples/s (x epochs)", f"{examples_per_second:,.0f}"),
        ("Minnorm step, ms (median of blocks)", f"{minnorm_seconds * 1e3:.3f}"),
        ("plain cross-entropy step, ms", f"{plain_seconds * 1e3:.3f}"),
        ("step ratio Minnorm / plain", f"{minnorm_seconds / plain_seconds:.3f}   (target <= 1.05; "
                                       f"{args.blocks} blocks x {args.steps_per_block} steps)"),
        ("peak GPU memory, MiB", "n/a (CPU)" if peak_bytes is None else f"{peak_bytes / 2**20:,.0f}"),
        ("flipped-label AUROC of difficulty (sanity)", f"{auroc(flipped, difficulty):.3f}"),
    ]
    print("| figure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value.replace('|', '/')} |")


if __name__ == "__main__":
    main()
