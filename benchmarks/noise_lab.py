"""Shared pieces of the label-noise benchmark: datasets, injected noise, baselines, metrics.

Used by ``benchmarks/label_noise.py`` (the report) and ``benchmarks/tune_scoring.py``
(the sweep that picked the defaults, run on the tuning part only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from minnorm_audit.data import load_bundled_digits
from minnorm_audit.training import build_model


# ---------------------------------------------------------------------------- datasets
@dataclass
class Dataset:
    """A labeled table, the clean labels, and which rows are 'hard but clean'."""

    name: str
    features: np.ndarray  # float32 (n, d)
    labels: np.ndarray  # int64 (n,), clean
    num_classes: int
    hard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __post_init__(self) -> None:
        if self.hard.size == 0:
            self.hard = np.zeros(len(self.labels), dtype=bool)


@dataclass(frozen=True)
class MixtureSpec:
    """Classes as Gaussian mixtures: ``components`` blobs per class in ``dims`` dims,
    blob centres drawn with spread ``separation`` around the origin, unit blob width."""

    name: str
    num_classes: int
    dims: int
    num_examples: int
    separation: float
    components: int = 2


# Tuning part: what the defaults were chosen on. Held-out part: never looked at while
# choosing (different class counts, dimensions, overlaps, and two real datasets).
TUNING_MIXTURES = (
    MixtureSpec("gmm-k5-d16", num_classes=5, dims=16, num_examples=2000, separation=1.6),
    MixtureSpec("gmm-k10-d32", num_classes=10, dims=32, num_examples=3000, separation=1.4),
)
HELDOUT_MIXTURES = (
    MixtureSpec("gmm-k3-d8-overlap", num_classes=3, dims=8, num_examples=1500, separation=1.3, components=3),
    MixtureSpec("gmm-k7-d24", num_classes=7, dims=24, num_examples=2500, separation=1.5),
    MixtureSpec("gmm-k20-d64", num_classes=20, dims=64, num_examples=4000, separation=1.2),
)
TUNING_DATASETS = ("digits",) + tuple(spec.name for spec in TUNING_MIXTURES)
HELDOUT_DATASETS = tuple(spec.name for spec in HELDOUT_MIXTURES) + ("wine", "breast_cancer")


def make_mixture(spec: MixtureSpec, seed: int) -> Dataset:
    rng = np.random.default_rng([seed, spec.num_classes, spec.dims])
    centres = rng.normal(0.0, spec.separation, size=(spec.num_classes, spec.components, spec.dims))
    labels = rng.integers(0, spec.num_classes, size=spec.num_examples)
    blob = rng.integers(0, spec.components, size=spec.num_examples)
    features = centres[labels, blob] + rng.normal(size=(spec.num_examples, spec.dims))
    return Dataset(spec.name, features.astype(np.float32), labels.astype(np.int64), spec.num_classes)


def load(name: str, seed: int) -> Dataset:
    """A dataset of the grid by name (mixtures are redrawn per seed)."""
    for spec in TUNING_MIXTURES + HELDOUT_MIXTURES:
        if spec.name == name:
            return make_mixture(spec, seed)
    if name == "digits":
        images, labels = load_bundled_digits()
        return Dataset("digits", images.reshape(len(images), -1).astype(np.float32), labels, 10)
    if name in ("wine", "breast_cancer"):
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        return Dataset(name, bunch.data.astype(np.float32), bunch.target.astype(np.int64), int(bunch.target.max()) + 1)
    raise ValueError(f"unknown dataset {name!r}")


def with_hard_examples(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """Append correctly labeled but genuinely hard rows.

    Each hard row is a real example of class ``c`` moved 70% of the way toward a random
    example of another class, then given heavy feature noise; its label stays ``c``.
    It is ambiguous, not wrong: the kind of example a cleaning tool must not call
    mislabeled.
    """
    rng = np.random.default_rng([seed, 7])
    count = int(round(fraction * len(dataset.labels)))
    anchors = rng.choice(len(dataset.labels), size=count, replace=False)
    features, labels = dataset.features, dataset.labels
    scale = features.std(axis=0, keepdims=True)
    hard_rows = []
    for anchor in anchors:
        others = np.flatnonzero(labels != labels[anchor])
        partner = features[rng.choice(others)]
        row = features[anchor] + 0.7 * (partner - features[anchor])
        hard_rows.append(row + 0.5 * scale[0] * rng.normal(size=row.shape))
    return Dataset(
        dataset.name + "+hard",
        np.concatenate([features, np.asarray(hard_rows, dtype=np.float32)]),
        np.concatenate([labels, labels[anchors]]),
        dataset.num_classes,
        hard=np.concatenate([np.zeros(len(labels), bool), np.ones(count, bool)]),
    )


def digits28(part: str, seed: int, copies: int = 3) -> Dataset:
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
    return Dataset(f"digits28-{part}", features, np.tile(labels[rows], copies).astype(np.int64), 10)


# ---------------------------------------------------------------------------- noise
def inject_noise(labels: np.ndarray, num_classes: int, kind: str, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(rate * n)`` labels; returns (noisy labels, flip mask).

    symmetric: a flipped label goes to a uniformly random other class.
    asymmetric: class ``c`` always goes to ``permutation[c]`` (a fixed derangement).
    """
    rng = np.random.default_rng([seed, 11])
    count = int(round(rate * len(labels)))
    flipped = rng.choice(len(labels), size=count, replace=False)
    noisy = labels.copy()
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=count)
        noisy[flipped] = (labels[flipped] + shift) % num_classes
    elif kind == "asymmetric":
        # A random cyclic order of the classes: each class flips to its successor.
        order = rng.permutation(num_classes)
        successor = np.empty(num_classes, dtype=np.int64)
        successor[order] = np.roll(order, -1)
        noisy[flipped] = successor[labels[flipped]]
    else:
        raise ValueError(kind)
    mask = np.zeros(len(labels), dtype=bool)
    mask[flipped] = True
    assert (noisy[mask] != labels[mask]).all() and (noisy[~mask] == labels[~mask]).all()
    return noisy, mask


# ---------------------------------------------------------------------------- plain training
@dataclass
class PlainTrace:
    """Per-epoch record of plain cross-entropy training (for loss, AUM, forgetting)."""

    margins_in_training: np.ndarray  # (epochs, n): given-label logit - best other, at its batch
    correct_in_training: np.ndarray  # (epochs, n) bool: argmax == given label, at its batch
    eval_logits: list[np.ndarray]  # per epoch, (n, K) after the epoch (eval pass)
    seconds_per_epoch: float


def _model_for(features: torch.Tensor, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", features, num_classes)


def train_plain(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    record: bool = True,
) -> tuple[nn.Module, PlainTrace]:
    """Adam on cross-entropy, same network and batching as minnorm-audit's defaults."""
    inputs = torch.as_tensor(features)
    targets = torch.as_tensor(labels)
    model = _model_for(inputs, num_classes, seed)
    # The fused kernels, as minnorm-audit's own training uses: the same update, and the
    # same speed-up for every method.
    optimizer = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True) if weight_decay
                 else torch.optim.Adam(model.parameters(), lr=lr, fused=True))
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    margins = np.zeros((epochs, n), dtype=np.float32)
    correct = np.zeros((epochs, n), dtype=bool)
    eval_logits: list[np.ndarray] = []
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            logits = model(inputs[batch])
            loss = nn.functional.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if record:
                with torch.no_grad():
                    detached = logits.detach()
                    own = detached.gather(1, targets[batch, None])[:, 0]
                    others = detached.scatter(1, targets[batch, None], float("-inf"))
                    margins[epoch, batch.numpy()] = (own - others.max(1).values).numpy()
                    correct[epoch, batch.numpy()] = (detached.argmax(1) == targets[batch]).numpy()
        if record:
            eval_logits.append(predict_logits(model, inputs))
    seconds = (time.perf_counter() - started) / max(epochs, 1)
    return model, PlainTrace(margins, correct, eval_logits, seconds)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    model.eval()
    out = torch.cat([model(chunk) for chunk in inputs.split(2048)]).numpy()
    model.train()
    return out


def loss_score(trace: PlainTrace, labels: np.ndarray, epochs: int) -> np.ndarray:
    """Final per-example cross-entropy after ``epochs`` (higher = more suspect)."""
    logits = trace.eval_logits[epochs - 1].astype(np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def aum_score(trace: PlainTrace, epochs: int) -> np.ndarray:
    """Area under the margin (Pleiss et al. 2020), negated so higher = more suspect."""
    return -trace.margins_in_training[:epochs].mean(0)


def forgetting_score(trace: PlainTrace, epochs: int) -> np.ndarray:
    """Forgetting events (Toneva et al. 2019); never-learned examples rank above all."""
    correct = trace.correct_in_training[:epochs]
    events = (correct[:-1] & ~correct[1:]).sum(0).astype(np.float64)
    never_learned = ~correct.any(0)
    # Ties among never-learned examples are broken by how rarely they were right.
    events[never_learned] = events.max() + 1 + (1 - correct[:, never_learned].mean(0))
    return events


def plain_suggestion(trace: PlainTrace, labels: np.ndarray, epochs: int) -> np.ndarray:
    """Best class other than the given one, from the final network."""
    logits = trace.eval_logits[epochs - 1].copy()
    logits[np.arange(len(labels)), labels] = -np.inf
    return logits.argmax(1)


# ---------------------------------------------------------------------------- cleanlab
@dataclass
class CleanlabResult:
    score: np.ndarray
    issues: np.ndarray
    suggestion: np.ndarray
    seconds: float


def run_cleanlab(features: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int, seed: int, folds: int = 5) -> CleanlabResult:
    """5-fold cross-validated probabilities of the same network, then cleanlab."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    started = time.perf_counter()
    probabilities = np.zeros((len(labels), num_classes))
    # cleanlab needs every class in every training fold; tiny classes fall back to KFold.
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() >= folds:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels)
    else:
        from sklearn.model_selection import KFold

        splitter = KFold(folds, shuffle=True, random_state=seed).split(features)
    for fold, (train_rows, test_rows) in enumerate(splitter):
        model, _ = train_plain(features[train_rows], labels[train_rows], num_classes, epochs=epochs, seed=seed * 100 + fold, record=False)
        logits = predict_logits(model, torch.as_tensor(features[test_rows]))
        probabilities[test_rows] = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
    quality = get_label_quality_scores(labels, probabilities)
    issues = find_label_issues(labels, probabilities)
    suggestion = probabilities.copy()
    suggestion[np.arange(len(labels)), labels] = -1
    return CleanlabResult(1.0 - quality, issues, suggestion.argmax(1), time.perf_counter() - started)


# ---------------------------------------------------------------------------- metrics
def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(positive, score))


def precision_at_k(score: np.ndarray, positive: np.ndarray) -> float:
    k = int(positive.sum())
    top = np.argsort(-score, kind="stable")[:k]
    return float(positive[top].mean()) if k else float("nan")


def flag_prf(flagged: np.ndarray, positive: np.ndarray) -> tuple[float, float, float]:
    hits = int((flagged & positive).sum())
    precision = hits / flagged.sum() if flagged.sum() else 0.0
    recall = hits / positive.sum() if positive.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(precision), float(recall), float(f1)
