"""Verdicts benchmark: does the `mislabeled` flag flag as many as there are errors, and the
right ones? Per cell, beside the best any threshold on the same run's difficulty could do
(the oracle, known only to a benchmark) and cleanlab's flag on the same data.

Prints markdown tables (command, machine and versions at the top); asserts nothing.
Needs the ``bench`` extra (cleanlab, scikit-learn):

    pip install -e ".[bench]"
    python benchmarks/verdicts.py --part tuning  --cache .verdicts-cache   # what the rule was shaped on
    python benchmarks/verdicts.py --part heldout --cache .verdicts-cache   # looked at once, at the end

Cells (each one training run with the product's defaults, through minnorm_audit's own
train and score steps, seed 0 for tuning and 1 for held-out; flips by
noise_lab.inject_noise):

- ``d28``: the bundled digits upsampled to 28 x 28 with small random affine moves and
  pixel noise, as a 784-feature table (the MLP memorization regime; noise_lab.digits28,
  even rows for tuning, odd rows for held-out, three copies);
- ``d28img``: the same pixels as 28 x 28 images (the CNN), two copies;
- ``d8``: the digits' own 64 features; ``g10`` / ``g20``: separable Gaussian mixtures with
  many classes; ``ov`` / ``ov3``: low-dimensional mixtures whose classes overlap heavily
  (training accuracy 0.70-0.76 on clean labels);
- ``junkU`` / ``junkB``: 3% alike junk rows with random labels appended (uniform pixel
  noise; near-blank scans, which are each other's nearest neighbours);
- ``blend``: 5% 50/50 blends of two digits labeled as either (correct but ambiguous);
- ``clean``: no flips.

Columns: AP of ``difficulty``; oracle = the best F1 of any single threshold on it; the
flag's P / R / F1; ``cl F1`` = cleanlab ``find_label_issues`` on 5-fold out-of-fold
probabilities of the same MLP at its best budget (5 epochs a fold) on the same rows
(junk and blends left out); ``flips->outlier``; ``clean mis`` / ``clean h+o`` = share of the
untouched rows called mislabeled / hard or outlier; junk and blends: share called outlier /
mislabeled; ``suggested ok`` = share of caught flips whose suggested label is the true one.
``--cache DIR`` keeps each trained state and cleanlab's probabilities.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_lab as lab  # noqa: E402

import minnorm_audit  # noqa: E402
from minnorm_audit.audit import AuditOptions, train, training_targets  # noqa: E402
from minnorm_audit.data import load_arrays, load_bundled_digits  # noqa: E402
from minnorm_audit.score_run import score_classification  # noqa: E402
from minnorm_audit.training import FitResult, TrainConfig  # noqa: E402

CLEANLAB_EPOCHS = 5  # cleanlab's best budget on the tuning part (label_noise.BASELINE_EPOCHS)
RESULT_ARRAYS = ("final_multipliers", "average_multipliers", "mean_violations", "final_outputs", "final_margins")
OVERLAP_TUNING = lab.MixtureSpec("gmm-k4-d6-ov", num_classes=4, dims=6, num_examples=3000, separation=0.9)
OVERLAP_HELDOUT = lab.MixtureSpec("gmm-k3-d8-ov", num_classes=3, dims=8, num_examples=3000, separation=0.8,
                                  components=3)
UNDERTRAINED = {"rows": 200, "epochs": 2}


def cells(part: str) -> list[dict[str, Any]]:
    seed = 0 if part == "tuning" else 1
    mixture = lab.TUNING_MIXTURES[1] if part == "tuning" else lab.HELDOUT_MIXTURES[2]
    overlap = OVERLAP_TUNING if part == "tuning" else OVERLAP_HELDOUT
    tag = "" if part == "tuning" else "h-"
    common = {"part": part, "seed": seed}
    return [dict(common, name=f"{tag}{name}", **spec) for name, spec in [
        ("d28-s10", dict(base="d28", noise="symmetric", rate=0.1)),
        ("d28-s30", dict(base="d28", noise="symmetric", rate=0.3)),
        ("d28-a10" if part == "tuning" else "d28-a30", dict(base="d28", noise="asymmetric", rate=0.1 if part == "tuning" else 0.3)),
        ("d28img-s10", dict(base="d28img", noise="symmetric", rate=0.1)),
        ("d8-s10", dict(base="d8", noise="symmetric", rate=0.1)),
        ("d8-a30", dict(base="d8", noise="asymmetric", rate=0.3)),
        (f"{mixture.name}-s30", dict(base="gmm", mix=mixture, noise="symmetric", rate=0.3)),
        (f"{mixture.name}-s10", dict(base="gmm", mix=mixture, noise="symmetric", rate=0.1)),
        (f"{overlap.name}-s10", dict(base="gmm", mix=overlap, noise="symmetric", rate=0.1)),
        (f"{overlap.name}-a10", dict(base="gmm", mix=overlap, noise="asymmetric", rate=0.1)),
        (f"{overlap.name}-clean", dict(base="gmm", mix=overlap)),
        ("d28-clean", dict(base="d28")),
        ("d28-junkU", dict(base="d28", noise="symmetric", rate=0.1, extra=[("uniform", 0.03)])),
        ("d28-junkB", dict(base="d28", noise="symmetric", rate=0.1, extra=[("blank", 0.03)])),
        ("d28-blend", dict(base="d28", extra=[("blend", 0.05)])),
    ]]


# ---------------------------------------------------------------------------- data
def junk_rows(features: np.ndarray, share: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    count, width = int(round(share * len(features))), features.shape[1]
    if kind == "uniform":
        return rng.uniform(features.min(), features.max(), size=(count, width)).astype(np.float32)
    # Near-blank scans: one faint level with a little sensor noise, alike each other.
    return (np.full((count, width), 0.05) + 0.02 * rng.normal(size=(count, width))).clip(0, 1).astype(np.float32)


def blend_rows(features: np.ndarray, labels: np.ndarray, share: float, rng: np.random.Generator):
    count = int(round(share * len(features)))
    first = rng.choice(len(features), count, replace=False)
    second = np.array([rng.choice(np.flatnonzero(labels != labels[i])) for i in first])
    given = np.where(rng.random(count) < 0.5, labels[first], labels[second])
    return (0.5 * features[first] + 0.5 * features[second]).astype(np.float32), given


def make_cell(spec: dict[str, Any]):
    """(inputs, given labels, true labels, kind of each row, classes, image side or None)."""
    seed, part = spec["seed"], spec["part"]
    rng = np.random.default_rng([seed, 99])
    image = None
    if spec["base"] in ("d28", "d28img"):
        data = lab.digits28(part, seed, 3 if spec["base"] == "d28" else 2)
        features, labels, classes = data.features, data.labels, 10
        image = 28 if spec["base"] == "d28img" else None
    elif spec["base"] == "d8":
        images, all_labels = load_bundled_digits()
        rows = np.arange(len(all_labels))[(0 if part == "tuning" else 1)::2]
        features, labels, classes = images[rows].reshape(len(rows), -1).astype(np.float32), all_labels[rows], 10
    else:
        data = lab.make_mixture(spec["mix"], seed)
        features, labels, classes = data.features, data.labels, data.num_classes
    true = labels.copy()
    kinds = np.full(len(labels), "clean", dtype=object)
    if spec.get("rate", 0) > 0:
        labels, flipped = lab.inject_noise(true, classes, spec["noise"], spec["rate"], seed)
        kinds[flipped] = "flipped"
    originals = len(true)
    for kind, share in spec.get("extra", []):
        if kind in ("uniform", "blank"):
            rows = junk_rows(features[:originals], share, kind, rng)
            extra_labels = rng.integers(0, classes, len(rows))
            name = f"junk:{kind}"
        else:
            rows, extra_labels = blend_rows(features[:originals], true, share, rng)
            name = "blend"
        features = np.concatenate([features, rows])
        labels, true = np.concatenate([labels, extra_labels]), np.concatenate([true, extra_labels])
        kinds = np.concatenate([kinds, np.full(len(rows), name, dtype=object)])
    inputs = features.reshape(len(features), 1, image, image) if image else features
    return inputs, labels.astype(np.int64), true.astype(np.int64), kinds.astype(str), classes, image


# ---------------------------------------------------------------------------- runs
def trained(name: str, inputs: np.ndarray, labels: np.ndarray, image: int | None, cache: Path | None,
            epochs: int | None = None, batch_size: int | None = None):
    """One Minnorm training run with the product's defaults (through audit.train)."""
    options = {} if image is None else {"image_size": image}
    loaded = load_arrays(inputs, labels, **options)
    to_int = np.array([int(n) for n in loaded.class_names])
    assert (to_int[loaded.targets.numpy()] == labels).all()
    settings = AuditOptions(train=TrainConfig(epochs=epochs, batch_size=batch_size), **options)
    key = hashlib.sha256(inputs.tobytes() + labels.tobytes() + json.dumps(settings.train.to_dict()).encode()).hexdigest()[:12]
    path = cache / f"fit-{name}-{key}.npz" if cache else None
    if path is not None and path.exists():
        stored = np.load(path, allow_pickle=False)
        arrays = {n: (stored[n] if n in stored else None) for n in RESULT_ARRAYS}
        history = json.loads(str(stored["history"]))
        return FitResult(labels=labels, history=history, epochs_run=len(history),
                         train_seconds=float(stored["seconds"]), **arrays), loaded, settings, float(stored["seconds"])
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = train(loaded, settings, training_targets(loaded), Path(scratch), resume=False, progress=False)
        seconds = time.perf_counter() - started
    result.minnorm = None
    result.model = None
    if path is not None:
        arrays = {n: getattr(result, n) for n in RESULT_ARRAYS if getattr(result, n) is not None}
        np.savez_compressed(path, history=json.dumps(result.history), seconds=seconds, **arrays)
    return result, loaded, settings, seconds


def cleanlab_flags(name: str, inputs: np.ndarray, labels: np.ndarray, classes: int, seed: int, cache: Path | None):
    """cleanlab's find_label_issues on 5-fold out-of-fold probabilities of the same MLP."""
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    flat = inputs.reshape(len(inputs), -1).astype(np.float32)
    key = hashlib.sha256(flat.tobytes() + labels.tobytes()).hexdigest()[:12]
    path = cache / f"cl-{name}-{key}.npz" if cache else None
    if path is not None and path.exists():
        probabilities = np.load(path)["probs"]
    else:
        probabilities = np.zeros((len(labels), classes))
        for fold, (rows, held) in enumerate(StratifiedKFold(5, shuffle=True, random_state=seed).split(flat, labels)):
            model, _ = lab.train_plain(flat[rows], labels[rows], classes, epochs=CLEANLAB_EPOCHS,
                                       seed=seed * 100 + fold, record=False)
            logits = lab.predict_logits(model, torch.as_tensor(flat[held]))
            probabilities[held] = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
        if path is not None:
            np.savez_compressed(path, probs=probabilities)
    return find_label_issues(labels, probabilities)


def best_f1(score: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(-score)
    hits = np.cumsum(positive[order])
    precision, recall = hits / np.arange(1, len(order) + 1), hits / max(positive.sum(), 1)
    return float(np.max(np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)))


def evaluate(spec: dict[str, Any], cache: Path | None) -> dict[str, Any]:
    inputs, labels, true, kinds, classes, image = make_cell(spec)
    result, loaded, settings, seconds = trained(spec["name"], inputs, labels, image, cache)
    examples, rule = score_classification(result, loaded, settings)
    flags = examples["flag"].astype(str).to_numpy()
    difficulty = examples["difficulty"].to_numpy()
    called, flipped, clean = flags == "mislabeled", kinds == "flipped", kinds == "clean"
    row: dict[str, Any] = {"cell": spec["name"], "rows": len(labels),
                           "train acc": float((examples["margin"].to_numpy() > 0).mean()),
                           "inconclusive": rule.get("inconclusive") is not None}
    if flipped.any():
        hits = (called & flipped).sum()
        precision, recall = hits / max(called.sum(), 1), hits / flipped.sum()
        original = ~np.char.startswith(kinds, "junk") & (kinds != "blend")
        theirs = cleanlab_flags(spec["name"], inputs[original], labels[original], classes, spec["seed"], cache)
        their_hits = (theirs & flipped[original]).sum()
        their_p, their_r = their_hits / max(theirs.sum(), 1), their_hits / flipped.sum()
        suggested = examples["suggested_label"].astype(int).to_numpy()
        row.update({"AP": lab.average_precision(difficulty, flipped), "oracle F1": best_f1(difficulty, flipped),
                    "P": precision, "R": recall, "F1": 2 * precision * recall / max(precision + recall, 1e-12),
                    "cl F1": 2 * their_p * their_r / max(their_p + their_r, 1e-12),
                    "flagged / flips": f"{called.sum()} / {flipped.sum()}",
                    "flips->outlier": float((flags[flipped] == "outlier").mean()),
                    "suggested ok": float((suggested[called & flipped] == true[called & flipped]).mean())})
    row["clean mis"] = float(called[clean].mean())
    row["clean h+o"] = float(np.isin(flags[clean], ["hard", "outlier"]).mean())
    for kind in ("junk:uniform", "junk:blank", "blend"):
        if (kinds == kind).any():
            row[f"{kind}->outlier"] = float((flags[kinds == kind] == "outlier").mean())
            row[f"{kind}->mis"] = float((flags[kinds == kind] == "mislabeled").mean())
    row["train s"] = seconds
    return row


def undertrained(part: str, cache: Path | None) -> list[dict[str, Any]]:
    """Short runs on 200 rows with 10% flips: the product's 2-epoch budget (which the
    small-data batch rule makes enough to learn the 8x8 digits) and one optimizer step
    (one epoch at batch 200: a network that has not learned anything)."""
    spec = dict(part=part, seed=0 if part == "tuning" else 1, base="d8", noise="symmetric", rate=0.1,
                name=f"{part}-undertrained")
    inputs, labels, true, *_ = make_cell(spec)
    rows = UNDERTRAINED["rows"]
    found = []
    for epochs, batch, what in ((UNDERTRAINED["epochs"], None, f"{UNDERTRAINED['epochs']} epochs"),
                                (1, rows, "1 step (1 epoch, batch 200)")):
        result, loaded, settings, _ = trained(f"{spec['name']}-{epochs}-{batch}", inputs[:rows], labels[:rows], None,
                                              cache, epochs=epochs, batch_size=batch)
        examples, rule = score_classification(result, loaded, settings)
        called = (examples["flag"] == "mislabeled").to_numpy()
        flipped = true[:rows] != labels[:rows]
        found.append({"cell": f"{rows} rows, {what}",
                      "train acc": float((np.asarray(result.final_outputs).argmax(1) == loaded.targets.numpy()).mean()),
                      "inconclusive": rule.get("inconclusive") is not None,
                      "flagged mislabeled": float(called.mean()),
                      "flagged / flips": f"{int(called.sum())} / {int(flipped.sum())}",
                      "precision": float((called & flipped).sum() / called.sum()) if called.any() else float("nan")})
    return found


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table of ``frame`` (its cells already text)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("tuning", "heldout"), default="tuning")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--cells", help="comma-separated cell names (default: all of the part)")
    args = parser.parse_args()
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    import cleanlab
    import sklearn

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"versions: minnorm-audit {minnorm_audit.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"cleanlab {cleanlab.__version__}, scikit-learn {sklearn.__version__}, python {platform.python_version()}\n")
    chosen = cells(args.part)
    if args.cells:
        chosen = [cell for cell in chosen if cell["name"] in args.cells.split(",")]
    rows = []
    for spec in chosen:
        rows.append(evaluate(spec, args.cache))
        print(f"[{spec['name']}] " + ", ".join(f"{k} {fmt(v)}" for k, v in rows[-1].items() if k != "cell"), flush=True)
    table = pd.DataFrame(rows)
    flips = table.dropna(subset=["F1"]) if "F1" in table else table.iloc[:0]
    print(f"\n## {args.part} part: label flips\n")
    print(markdown(flips[["cell", "train acc", "AP", "oracle F1", "P", "R", "F1", "cl F1", "flagged / flips", "flips->outlier",
                 "suggested ok"]].map(fmt)))
    print(f"\n## {args.part} part: clean rows, junk, blends\n")
    other = [c for c in table.columns if c in ("clean mis", "clean h+o") or "->" in c and c != "flips->outlier"]
    print(markdown(table[["cell", "train acc"] + other].map(fmt)))
    if not args.cells:
        print(f"\n## {args.part} part: undertrained\n")
        print(markdown(pd.DataFrame(undertrained(args.part, args.cache)).map(fmt)))


if __name__ == "__main__":
    main()
