"""Backbone benchmark: audits through a backbone pretrained on OTHER classes, beside the
from-scratch CNN, cleanlab and a kNN vote on the same features.

No pretrained ImageNet weights can be downloaded where this was written, so the
mechanism is measured with a backbone made here (a stand-in for a real pretrained
network, not a claim about one):

1. pretrain: the default plain CNN (``training/models.plain_cnn``) trained with
   cross-entropy on the bundled digits' classes 0-4 (16 x 16 px, random shifts),
   exported without its last layer as a TorchScript file and an ONNX file (features:
   128 numbers per image, from float pixels in [0, 1]); the two give the same features;
2. audit the digits' classes 5-9 (never seen in pretraining) with labels flipped
   (symmetric, to another of the 5 classes), the whole set (~900 images) and small
   sets of 20 and 60 images per class, with:

   - ``scratch``: ``minnorm-audit`` as it is without a backbone (the plain CNN);
   - ``bb-linear`` / ``bb-mlp``: ``--backbone tiny.pt`` (frozen), linear or MLP head;
   - ``cleanlab``: 5-fold out-of-fold logistic regression on the same frozen
     features, ``find_label_issues`` (flags) and ``get_label_quality_scores`` (AP);
   - ``knn``: a Docta-style vote of the 10 nearest neighbours (cosine) on the same
     features: score = share of neighbours that disagree with the given label,
     flagged when the neighbours' majority label is another.

   AP: the score ranking flipped above clean rows; F1: the flag (``mislabeled`` for
   the audits) against the flips; ``concl``: the audit was not inconclusive.
3. ``--large``: a frozen-feature audit of 50,000 images (the digits 5-9 with random
   shifts, contrast and pixel noise, 10% flips): seconds for the features (once) and
   for the head's training.

    python benchmarks/backbone.py --large         # the table and the 50,000-image row (~45 min on 2 busy cores)
    python benchmarks/backbone.py --sizes 20 --rates 0.1 --small-seeds 0   # one cell

Prints markdown; asserts nothing. Needs the ``bench`` extra (scikit-learn, cleanlab).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import minnorm_audit
from minnorm_audit.backbone import extract_features, load_backbone
from minnorm_audit.data.demo import load_bundled_digits
from minnorm_audit.training.models import plain_cnn

SIDE = 16


def digits_images(side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as uint8 (N, 3, side, side) images and their labels."""
    pixels, labels = load_bundled_digits()
    scaled = np.round(pixels.astype(np.float32) * 255.0 / 16.0).astype(np.uint8)
    big = scaled.repeat(side // 8, axis=1).repeat(side // 8, axis=2)
    return np.repeat(big[:, None], 3, axis=1), labels.astype(np.int64)


def shifted(images: torch.Tensor, generator: torch.Generator, most: int = 2) -> torch.Tensor:
    """Each image rolled by up to ``most`` pixels each way (a cheap augmentation)."""
    out = torch.empty_like(images)
    shifts = torch.randint(-most, most + 1, (len(images), 2), generator=generator)
    for row, (dy, dx) in enumerate(shifts.tolist()):
        out[row] = torch.roll(images[row], (dy, dx), dims=(1, 2))
    return out


class Features(nn.Module):
    """The pretrained CNN up to its last layer: [0, 1] pixels -> 128 features."""

    def __init__(self, body: nn.Sequential, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.body = body[:-1]
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body((pixels - self.mean) / self.std)


def pretrain(out_dir: Path, seed: int = 0, epochs: int = 15) -> tuple[Path, Path, float]:
    """Train the plain CNN on digits 0-4 (cross-entropy), export its features as
    TorchScript and ONNX; the largest difference of the two exports' features."""
    images, labels = digits_images()
    keep = labels < 5
    x = torch.from_numpy(images[keep]).float() / 255.0
    y = torch.from_numpy(labels[keep])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    body = plain_cnn(3, 5)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    optimizer = torch.optim.Adam(body.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(64):
            loss = nn.functional.cross_entropy(body((shifted(x[batch], generator) - mean) / std), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    features = Features(body, mean, std).eval()
    example = x[:4]
    script = out_dir / "digits04.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(features, example).save(str(script))
        onnx_file = out_dir / "digits04.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(features, (example,), str(onnx_file), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "n"}, "features": {0: "n"}}, dynamo=False)
    probe = torch.from_numpy(digits_images()[0][labels >= 5][:64])
    a = extract_features(load_backbone(str(script)), probe, torch.device("cpu"))
    b = extract_features(load_backbone(str(onnx_file)), probe, torch.device("cpu"))
    return script, onnx_file, float((a - b).abs().max())


def flip(labels: np.ndarray, rate: float, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    noisy = labels.copy()
    flipped = np.zeros(len(labels), dtype=bool)
    chosen = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    for row in chosen:
        noisy[row] = rng.choice([c for c in range(classes) if c != labels[row]])
        flipped[row] = True
    return noisy, flipped


def scores(flipped: np.ndarray, score: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import average_precision_score, f1_score

    return float(average_precision_score(flipped, score)), float(f1_score(flipped, flagged, zero_division=0.0))


def run_audit(images: np.ndarray, labels: np.ndarray, flipped: np.ndarray, **options) -> dict:
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        result = minnorm_audit.audit((images, labels), out=folder, image_size=SIDE, device="cpu", **options)
        seconds = time.perf_counter() - started
    table = result.examples
    ap, f1 = scores(flipped, table["difficulty"].to_numpy(), (table["flag"] == "mislabeled").to_numpy())
    return {"ap": ap, "f1": f1, "conclusive": not result.summary["inconclusive"],
            "acc": result.summary["fit"].get("train_accuracy"), "s": seconds, "summary": result.summary}


def cleanlab_scores(features: np.ndarray, labels: np.ndarray, flipped: np.ndarray, seed: int) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probabilities = cross_val_predict(model, features, labels, cv=folds, method="predict_proba")
    issues = find_label_issues(labels, probabilities)
    quality = get_label_quality_scores(labels, probabilities)
    ap, f1 = scores(flipped, 1.0 - quality, issues)
    return {"ap": ap, "f1": f1, "conclusive": None, "acc": None, "s": time.perf_counter() - started}


def knn_scores(features: np.ndarray, labels: np.ndarray, flipped: np.ndarray, k: int = 10) -> dict:
    started = time.perf_counter()
    standard = (features - features.mean(0)) / (features.std(0) + 1e-6)
    unit = standard / np.linalg.norm(standard, axis=1, keepdims=True).clip(1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(labels) - 1)
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    votes = labels[neighbours]
    disagree = (votes != labels[:, None]).mean(1)
    majority = np.array([np.bincount(row, minlength=labels.max() + 1).argmax() for row in votes])
    ap, f1 = scores(flipped, disagree, majority != labels)
    return {"ap": ap, "f1": f1, "conclusive": None, "acc": None, "s": time.perf_counter() - started}


def cell(images: np.ndarray, labels: np.ndarray, per_class: int | None, rate: float, seed: int, script: Path,
         methods: list[str], extra: dict | None = None) -> dict[str, dict]:
    extra = extra or {}
    rng = np.random.default_rng(seed)
    rows = np.arange(len(labels))
    if per_class is not None:
        rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                               for c in range(labels.max() + 1)])
    x, truth = images[rows], labels[rows]
    noisy, flipped = flip(truth, rate, int(labels.max()) + 1, rng)
    out: dict[str, dict] = {}
    backbone = load_backbone(str(script))
    features = extract_features(backbone, torch.from_numpy(x), torch.device("cpu")).numpy()
    for method in methods:
        if method == "scratch":
            out[method] = run_audit(x, noisy, flipped, seed=seed, **extra)
        elif method in ("bb-linear", "bb-mlp"):
            out[method] = run_audit(x, noisy, flipped, seed=seed, backbone=str(script),
                                    model="linear" if method == "bb-linear" else "mlp", **extra)
        elif method == "cleanlab":
            out[method] = cleanlab_scores(features, noisy, flipped, seed)
        elif method == "knn":
            out[method] = knn_scores(features, noisy, flipped)
    return out


def large_row(script: Path, count: int, seed: int) -> dict:
    """A frozen-feature audit of ``count`` images made from the digits 5-9."""
    images, labels = digits_images()
    keep = labels >= 5
    base, truth = torch.from_numpy(images[keep]), labels[keep] - 5
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(base), (count,), generator=generator)
    x = shifted(base[picks], generator).float()
    contrast = 0.6 + 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
    x = (x * contrast + 12.0 * torch.randn(x.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    rng = np.random.default_rng(seed)
    noisy, flipped = flip(truth[picks.numpy()], 0.1, 5, rng)
    row = run_audit(x.numpy(), noisy, flipped, seed=seed, backbone=str(script))
    cache = row["summary"]["backbone"]["feature_cache"]
    return {**row, "features_s": cache["seconds"], "train_s": row["summary"]["timings"]["train_s"],
            "epochs": row["summary"]["config"]["epochs"], "batch": row["summary"]["config"]["batch_size"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds of the whole-set cells.")
    parser.add_argument("--small-seeds", type=int, nargs="+", default=[0, 1], help="Seeds of the 20 and 60 per class cells.")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--sizes", nargs="+", default=["20", "60", "all"])
    parser.add_argument("--methods", nargs="+", default=["scratch", "bb-linear", "bb-mlp", "cleanlab", "knn"])
    parser.add_argument("--backbone-file", type=Path, default=None,
                        help="A TorchScript backbone made by an earlier run (skips pretraining).")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="An audit option for the minnorm runs, e.g. --set batch_size=128 (the rule before the small-data one).")
    parser.add_argument("--large", action="store_true", help="Also the 50,000-image frozen-feature row.")
    parser.add_argument("--large-count", type=int, default=50_000)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import cleanlab
    import sklearn

    print(f"command: python benchmarks/backbone.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f} at start (other jobs ran); no GPU")
    print(f"versions: minnorm_audit {minnorm_audit.__version__}, torch {torch.__version__}, cleanlab "
          f"{cleanlab.__version__}, scikit-learn {sklearn.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        if args.backbone_file is not None:
            script, difference = args.backbone_file, float("nan")
        else:
            script, _, difference = pretrain(Path(folder))
        print(f"{'given' if args.backbone_file else 'pretrained'} on digits 0-4 (seed 0; small cells: seeds {args.small_seeds}, whole set: {args.seeds}) "
              f"in {time.perf_counter() - started:.1f} s; TorchScript vs ONNX features: "
              f"largest difference {difference:.2e}\n", flush=True)
        if args.large:
            row = large_row(script, args.large_count, args.seeds[0])
            print(f"{args.large_count:,} images, frozen backbone, linear head: features {row['features_s']:.1f} s "
                  f"(once, CPU, float32), head training {row['train_s']:.1f} s ({row['epochs']} epochs, batch "
                  f"{row['batch']}), whole audit {row['s']:.1f} s; AP {row['ap']:.3f}, flag F1 {row['f1']:.3f}, "
                  f"train acc {row['acc']:.3f}, conclusive {row['conclusive']}\n", flush=True)
        images, labels = digits_images()
        target = labels >= 5
        images, labels = images[target], labels[target] - 5
        print("| set | flips | method | AP | flag F1 | conclusive | train acc | seconds |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        for size in args.sizes:
            per_class = None if size == "all" else int(size)
            for rate in args.rates:
                seeds = args.small_seeds if per_class else args.seeds
                extra = {key: float(value) if "." in value or "e" in value else int(value)
                         for key, value in (item.split("=", 1) for item in args.set)}
                runs = [cell(images, labels, per_class, rate, seed, script, args.methods, extra) for seed in seeds]
                for method in args.methods:
                    rows = [run[method] for run in runs]
                    ap = np.mean([r["ap"] for r in rows])
                    f1 = np.mean([r["f1"] for r in rows])
                    concl = "-" if rows[0]["conclusive"] is None else f"{sum(r['conclusive'] for r in rows)}/{len(rows)}"
                    acc = "-" if rows[0]["acc"] is None else f"{np.mean([r['acc'] for r in rows]):.2f}"
                    name = f"{per_class}/class" if per_class else f"all ({len(labels)})"
                    print(f"| {name} | {rate:.0%} | {method} | {ap:.3f} | {f1:.3f} | {concl} | {acc} | "
                          f"{np.mean([r['s'] for r in rows]):.1f} |", flush=True)


if __name__ == "__main__":
    main()
