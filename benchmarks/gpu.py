"""One-GPU benchmark: every GPU figure of the audit in one run (under 5 minutes on a GPU).

Data is generated, nothing is downloaded: 50,000 images of 3 x 32 x 32 in 10 classes
(CIFAR-10's size; class templates plus noise, 5% of the labels flipped). Prints one
markdown table with the command, machine, versions and device, and:

- the whole audit at defaults (``minnorm_audit.audit``: default CNN and epochs, bf16
  autocast and the captured step on CUDA), its training share and examples per second,
  peak GPU memory, and the flipped-label AUROC as a sanity check;
- the Minnorm step against a plain cross-entropy step (same model, batch, autocast):
  GPU time (CUDA events) and wall time per step, and their ratios;
- fit()'s training time per epoch against a bare loop of the same eager steps;
- one epoch with the step captured in a CUDA graph (``training/capture.py``) against
  the same epoch eager;
- the CLI run (``minnorm-audit run``) on a folder of 10,000 28 x 28 PNG files;
- decoding those 10,000 files with a pool of 16 worker processes.

Targets (issue 24): the CIFAR-10-size audit <= 8 s on one H100/H200. Nothing is
asserted. On a CPU (``--device cpu`` and smaller sizes) every row still runs, so the
script is tested where no GPU is; GPU-only figures read "n/a". Usage:

    python benchmarks/gpu.py                                        # CUDA when present
    python benchmarks/gpu.py --device cpu --num-examples 2000 --epochs 2 --png-files 500 --workers 2
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from minnorm_audit import __version__, audit
from minnorm_audit.data.placement import DeviceBatches
from minnorm_audit.minnorm import Minnorm
from minnorm_audit.training import TrainConfig, autocast_context, build_model, resolve_device, train_one_epoch
from minnorm_audit.training.capture import StaticStep
from minnorm_audit.training.setup import make_minnorm

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


def timed(step: Callable[[], None], device: torch.device, repeat: int) -> tuple[float, float]:
    """(wall seconds, GPU seconds or NaN) per call of ``step``, over ``repeat`` calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        started = time.perf_counter()
        start.record()
        for _ in range(repeat):
            step()
        end.record()
        synchronize(device)
        return (time.perf_counter() - started) / repeat, start.elapsed_time(end) / 1e3 / repeat
    started = time.perf_counter()
    for _ in range(repeat):
        step()
    return (time.perf_counter() - started) / repeat, float("nan")


def step_times(images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int,
               blocks: int, steps_per_block: int) -> dict[str, float]:
    """Median wall and GPU seconds per step of a Minnorm step and of a plain
    cross-entropy Adam step, same model, batch and autocast, in interleaved blocks.

    The same batch every step, so each dual update is applied at its step (fit()'s
    eager path queues them, ``Minnorm.deferred_dual_updates``): an upper bound on
    fit()'s eager step."""
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
    timings: dict[str, list[float]] = {"minnorm": [], "plain": [], "minnorm_gpu": [], "plain_gpu": []}
    for _ in range(blocks):
        for name, step in (("minnorm", minnorm_step), ("plain", plain_step)):
            wall, gpu = timed(step, device, steps_per_block)
            timings[name].append(wall)
            timings[name + "_gpu"].append(gpu)
    return {name: float(np.median(values)) for name, values in timings.items()}


def epoch_times(images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int,
                epochs: int) -> dict[str, float]:
    """Seconds per epoch, last of ``epochs`` (the first pays warm-up and capture), of the
    default CNN's Minnorm training: fit()'s eager path, a bare loop of the same steps,
    and fit()'s captured static step (CUDA only; on a CPU its eager twin)."""
    inputs = torch.from_numpy(images)
    targets = torch.from_numpy(labels).long().to(device)
    results: dict[str, float] = {}

    def build() -> tuple[torch.nn.Module, Minnorm]:
        torch.manual_seed(0)
        model = build_model("auto", inputs, NUM_CLASSES).to(device)
        config = TrainConfig(device=str(device), batch_size=batch_size)
        optimizer = make_minnorm(model, form="margin", num_examples=len(inputs), num_outputs=NUM_CLASSES,
                                 config=config, dataset_fingerprint="", device=device)
        return model, optimizer

    source = DeviceBatches(inputs, device)
    for name in ("eager", "static"):
        model, optimizer = build()
        generator = torch.Generator().manual_seed(0)
        step = StaticStep(model, optimizer, capture=device.type == "cuda") if name == "static" else None
        for _ in range(epochs):
            synchronize(device)
            started = time.perf_counter()
            train_one_epoch(model, optimizer, source, targets, batch_size, generator, static_step=step)
            synchronize(device)
            results[name] = time.perf_counter() - started

    # The bare loop: the same eager steps without fit()'s loop (no deferred window, no
    # DeviceBatches, no autocast context per call beyond the forward).
    model, optimizer = build()
    device_inputs = inputs.to(device)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator).to(device)
        synchronize(device)
        started = time.perf_counter()
        for batch_ids in order.split(batch_size):
            with autocast_context(device):
                outputs = model(device_inputs[batch_ids])
            loss = optimizer.lagrangian(outputs, targets[batch_ids], batch_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        results["bare"] = time.perf_counter() - started
    return results


def write_pngs(folder: Path, files: int) -> list[Path]:
    """``files`` 28 x 28 grayscale PNG files in 10 class folders (random pixels)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(files):
        class_folder = folder / f"class_{index % 10}"
        class_folder.mkdir(parents=True, exist_ok=True)
        path = class_folder / f"{index:05d}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def png_rows(files: int, workers: int, device: str) -> dict[str, float]:
    """Seconds of the CLI run on a folder of ``files`` PNGs, and of decoding them with a
    pool of ``workers`` processes."""
    from minnorm_audit.data import image_files

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "pngs"
        paths = write_pngs(folder, files)
        started = time.perf_counter()
        image_files._decode_image_files(paths, 28, processes=workers)
        decode_seconds = time.perf_counter() - started
        command = [sys.executable, "-m", "minnorm_audit", "run", str(folder), "--out", str(Path(scratch) / "run"),
                   "--device", device]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        cli_seconds = time.perf_counter() - started
    return {"decode": decode_seconds, "cli": cli_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--num-examples", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=None, help="Audit epochs [default: the audit's default].")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=15, help="Interleaved timing blocks for the step ratio.")
    parser.add_argument("--steps-per-block", type=int, default=20)
    parser.add_argument("--epoch-repeats", type=int, default=2, help="Epochs per loop in the per-epoch rows.")
    parser.add_argument("--png-files", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=16, help="Decode pool size.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    started_all = time.perf_counter()

    started = time.perf_counter()
    images, labels, flipped = synthetic_images(args.num_examples, args.seed)
    generate_seconds = time.perf_counter() - started

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as scratch:
        synchronize(device)
        started = time.perf_counter()
        options = {} if args.epochs is None else {"epochs": args.epochs}
        result = audit((images, labels), out=Path(scratch) / "run", batch_size=args.batch_size,
                       device=args.device, seed=args.seed, image_size=32, **options)
        synchronize(device)
        audit_seconds = time.perf_counter() - started
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    timings = result.summary["timings"]
    epochs_run = int(result.summary.get("diagnostics", {}).get("epochs") or (args.epochs or 0))
    difficulty = result.examples["difficulty"].to_numpy()
    steps = step_times(images, labels, device, args.batch_size, args.blocks, args.steps_per_block)
    epochs = epoch_times(images, labels, device, args.batch_size, args.epoch_repeats)
    pngs = png_rows(args.png_files, args.workers, str(device.type))

    cuda = device.type == "cuda"
    if cuda:
        properties = torch.cuda.get_device_properties(device)
        device_text = f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, bf16 autocast"
    else:
        device_text = f"CPU, {torch.get_num_threads()} torch threads, float32 (no CUDA graph: the static step runs eagerly)"

    def gpu(value: float) -> str:
        return f"{value * 1e3:.3f}" if cuda else "n/a (CPU)"

    rows = [
        ("command", f"python {' '.join(sys.argv)}"),
        ("machine", f"{platform.platform()}, {os.cpu_count()} CPUs"),
        ("device", device_text),
        ("versions", f"python {platform.python_version()}, torch {torch.__version__}, minnorm-audit {__version__}"),
        ("data", f"{args.num_examples:,} synthetic images 3x32x32, {NUM_CLASSES} classes, {FLIP_RATE:.0%} labels "
                 f"flipped (generated in {generate_seconds:.1f} s, not counted)"),
        ("audit", f"defaults: default CNN, {epochs_run or 'default'} epochs, batch {args.batch_size}, data placement "
                  f"{result.summary['config'].get('data_placement', '?')}, 1 run"),
        ("whole audit (load + train + score + write), s", f"{audit_seconds:.1f}   (target on one H100/H200: <= 8)"),
        ("  of which training, s", f"{timings['train_s']:.1f}"),
        ("training examples/s (x epochs)",
         f"{args.num_examples * max(epochs_run, 1) / timings['train_s']:,.0f}" if epochs_run else "?"),
        ("peak GPU memory, MiB", "n/a (CPU)" if peak_bytes is None else f"{peak_bytes / 2**20:,.0f}"),
        ("flipped-label AUROC of difficulty (sanity)", f"{auroc(flipped, difficulty):.3f}"),
        ("Minnorm step, wall ms (median of blocks)", f"{steps['minnorm'] * 1e3:.3f}"),
        ("plain cross-entropy step, wall ms", f"{steps['plain'] * 1e3:.3f}"),
        ("step ratio Minnorm / plain, wall", f"{steps['minnorm'] / steps['plain']:.3f}   "
                                             f"({args.blocks} blocks x {args.steps_per_block} steps)"),
        ("Minnorm step, GPU ms (CUDA events)", gpu(steps["minnorm_gpu"])),
        ("plain step, GPU ms", gpu(steps["plain_gpu"])),
        ("step ratio Minnorm / plain, GPU time",
         f"{steps['minnorm_gpu'] / steps['plain_gpu']:.3f}" if cuda else "n/a (CPU)"),
        ("epoch, fit()'s eager loop, s", f"{epochs['eager']:.3f}"),
        ("epoch, bare loop of the same steps, s", f"{epochs['bare']:.3f}   (fit / bare: "
                                                 f"{epochs['eager'] / epochs['bare']:.2f})"),
        ("epoch, fit()'s captured step (CUDA graph), s" if cuda else "epoch, fit()'s static step (eager on CPU), s",
         f"{epochs['static']:.3f}   (captured / eager: {epochs['static'] / epochs['eager']:.2f})"),
        (f"CLI run on {args.png_files:,} 28x28 PNG files (minnorm-audit run, new process), s", f"{pngs['cli']:.1f}"),
        (f"decode {args.png_files:,} PNG files, pool of {args.workers} processes, s", f"{pngs['decode']:.2f}"),
        ("this script, s", f"{time.perf_counter() - started_all:.0f}"),
    ]
    print("| figure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value.replace('|', '/')} |")


if __name__ == "__main__":
    main()
