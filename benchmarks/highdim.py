"""High-dimensional proxy: label-noise ranking and flags on 784-feature tables.

A report from outside measured minnorm-audit behind AUM on real digit images at full
resolution fed as a flat 784-feature table (that data is not here). This benchmark
builds proxies of our own and compares, on the same default MLP: minnorm-audit (its
defaults, one run), AUM (Pleiss et al. 2020, 10 epochs of Adam on cross-entropy) and
cleanlab ``find_label_issues`` (5-fold out-of-fold probabilities, 5 epochs). Prints
average precision of each score for the flipped labels and the F1 of the flags.

Proxies (each with a tuning and a held-out part that share no source row or seed):

- ``digits28``: the bundled 8x8 digits upsampled to 28 x 28 (bilinear), each source
  image used in 3 copies under a random affine jitter (rotation +-12 degrees, scale
  0.9-1.1, shift +-2 px) plus pixel noise; sources with an even index are the tuning
  part (~2,700 rows), odd the held-out part. Copies of one source share its label
  and are flipped independently.
- ``manifold784``: a class mixture in a low-dimensional latent space (tuning: 10
  classes in 8 dimensions; held-out: 8 classes in 12) mapped into 784 dimensions by a
  fixed random two-layer tanh network, plus noise: high ambient, low intrinsic
  dimension.

    python benchmarks/highdim.py --part tuning [--cache .highdim-cache] [--epochs 20] [--set dual_lr=0.02]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_lab as lab  # noqa: E402
import verdicts as vd  # noqa: E402

import minnorm_audit  # noqa: E402
from minnorm_audit.data.demo import load_bundled_digits  # noqa: E402
from minnorm_audit.training import TrainConfig  # noqa: E402

CELLS = [("symmetric", 0.1), ("symmetric", 0.3), ("asymmetric", 0.3)]
AUM_EPOCHS = lab_epochs = 10
CLEANLAB_EPOCHS = vd.CLEANLAB_EPOCHS


def digits28(part: str, seed: int, copies: int = 3) -> lab.Dataset:
    images, labels = load_bundled_digits()
    rows = np.arange(len(labels))[(0 if part == "tuning" else 1)::2]
    generator = torch.Generator().manual_seed(1000 * seed + (0 if part == "tuning" else 1))
    source = torch.as_tensor(images[rows], dtype=torch.float32)[:, None] / 16.0
    source = torch.nn.functional.interpolate(source, size=(28, 28), mode="bilinear", align_corners=False)
    out = []
    for _ in range(copies):
        n = len(rows)
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
        scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 14)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, source.shape, align_corners=False)
        moved = torch.nn.functional.grid_sample(source, grid, align_corners=False)
        moved = (moved + 0.05 * torch.randn(moved.shape, generator=generator)).clamp(0, 1)
        out.append(moved.reshape(n, -1))
    features = torch.cat(out).numpy().astype(np.float32)
    return lab.Dataset(f"digits28-{part}", features, np.tile(labels[rows], copies).astype(np.int64), 10)


def manifold784(part: str, seed: int) -> lab.Dataset:
    classes, latent, count = (10, 8, 3000) if part == "tuning" else (8, 12, 3000)
    rng = np.random.default_rng([seed, 784, 0 if part == "tuning" else 1])
    centres = rng.normal(0.0, 1.5, size=(classes, latent))
    labels = rng.integers(0, classes, size=count)
    z = centres[labels] + rng.normal(size=(count, latent))
    w1 = rng.normal(size=(latent, 64)) / math.sqrt(latent)
    w2 = rng.normal(size=(64, 784)) / math.sqrt(64)
    features = np.tanh(z @ w1) @ w2 + 0.1 * rng.normal(size=(count, 784))
    return lab.Dataset(f"manifold784-{part}", features.astype(np.float32), labels.astype(np.int64), classes)


def evaluate(data: lab.Dataset, kind: str, rate: float, seed: int, config: TrainConfig, cache: Path | None) -> dict:
    noisy, flipped = lab.inject_noise(data.labels, data.num_classes, kind, rate, seed)
    planted = vd.Planted(data.features, noisy, data.labels, np.where(flipped, "flipped", "clean"), data.num_classes)
    tag = f"{data.name}-{kind}-{rate}-e{config.epochs}"
    ours = vd.minnorm_verdicts(planted, seed, config, cache, tag)
    row = {"minnorm AP": lab.average_precision(ours["difficulty"], flipped),
           "minnorm F1": lab.flag_prf(ours["flags"] == "mislabeled", flipped)[2],
           "minnorm s": ours["seconds"]}
    started = time.perf_counter()
    _, trace = lab.train_plain(data.features, noisy, data.num_classes, epochs=AUM_EPOCHS, seed=seed)
    row["AUM AP"] = lab.average_precision(lab.aum_score(trace, AUM_EPOCHS), flipped)
    row["loss AP"] = lab.average_precision(lab.loss_score(trace, noisy, 5), flipped)
    row["AUM s"] = time.perf_counter() - started
    path = cache / f"cl-{tag}-{seed}.npz" if cache else None
    if path is not None and path.exists():
        stored = np.load(path)
        score, issues, seconds = stored["score"], stored["issues"], float(stored["seconds"])
    else:
        cl = lab.run_cleanlab(data.features, noisy, data.num_classes, epochs=CLEANLAB_EPOCHS, seed=seed)
        score, issues, seconds = cl.score, cl.issues, cl.seconds
        if path is not None:
            np.savez(path, score=score, issues=issues, seconds=seconds)
    row["cleanlab AP"] = lab.average_precision(score, flipped)
    row["cleanlab F1"] = lab.flag_prf(issues, flipped)[2]
    row["cleanlab s"] = seconds
    return row


def parse_overrides(items: list[str]) -> dict:
    """``FIELD=VALUE`` strings -> TrainConfig keyword arguments of the field's type."""
    def typed(field: str, value: str):
        annotation = str(TrainConfig.__dataclass_fields__[field].type)  # e.g. "float | None"
        if value == "None":
            return None
        for name, kind in (("bool", lambda v: v.lower() in ("1", "true")), ("int", int), ("float", float)):
            if annotation.startswith(name):
                return kind(value)
        return value

    return {key: typed(key, value) for key, value in (item.split("=", 1) for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["tuning", "heldout"], default="tuning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the product's budget for the network")
    parser.add_argument("--proxies", nargs="+", default=["digits28", "manifold784"])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other TrainConfig fields, e.g. dual_lr=0.02 multiplier_cap=0.5 (levers)")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    torch.set_num_threads(1)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread; torch {torch.__version__}, "
          f"minnorm-audit {minnorm_audit.__version__}, python {platform.python_version()}\n")
    columns = ["minnorm AP", "AUM AP", "loss AP", "cleanlab AP", "minnorm F1", "cleanlab F1", "minnorm s", "AUM s", "cleanlab s"]
    print("| proxy | noise | rows | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 3))
    started = time.perf_counter()
    for proxy in args.proxies:
        for kind, rate in CELLS:
            rows = []
            for seed in args.seeds:
                data = digits28(args.part, seed) if proxy == "digits28" else manifold784(args.part, seed)
                config = TrainConfig(epochs=args.epochs, device="cpu", seed=seed, **overrides)
                rows.append(evaluate(data, kind, rate, seed, config, args.cache))
            mean = {c: np.mean([r[c] for r in rows]) for c in columns}
            print(f"| {data.name} | {kind} {rate:g} | {len(data.labels)} | "
                  + " | ".join(f"{mean[c]:.1f}" if c.endswith(" s") else f"{mean[c]:.3f}" for c in columns) + " |", flush=True)
            print(f"[{time.perf_counter() - started:6.0f}s] {proxy} {kind} {rate}", file=sys.stderr, flush=True)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
