"""Verdicts benchmark: what the flags say about each kind of example, beside cleanlab.

Prints markdown tables (command, machine and versions at the top); asserts nothing.
Needs the ``bench`` extra (scikit-learn, cleanlab with Datalab):

    pip install -e ".[bench]"
    python benchmarks/verdicts.py --quick                  # digits + gmm-k5-d16, seed 0 (a few minutes)
    python benchmarks/verdicts.py                          # the tuning part, seed 0
    python benchmarks/verdicts.py --part heldout           # the held-out part
    python benchmarks/verdicts.py --part both --cache .verdicts-cache

Per dataset (benchmarks/noise_lab.py's grid) and seed, two audits with the product's
defaults (one training run each, through minnorm_audit's own train and score steps):

- ``clean data``: the dataset alone, labels untouched. Every flag here is a false alarm.
- ``planted``: the dataset with 10% of its labels flipped (symmetric), plus extra rows
  of known kinds appended: ``ambiguous`` (5% of n: a 0.6/0.4 blend of an example and
  one of another class, labeled with the majority class: correct but ambiguous),
  ``atypical`` (5%: an example with heavy feature noise; for the digits the rows are
  split between noise, occlusion of a 4x4 block, rotation by 30-45 degrees and
  inversion; labels correct), ``outlier:noise`` (2%: independent Gaussian noise with
  each feature's mean and spread, clipped to its range, a random label) and
  ``outlier:domain`` (2%: rows of another dataset, each feature mapped onto this
  one's mean and spread and clipped to its range, a random label). ``clean`` are the
  planted run's untouched rows.

For each kind: the share of its rows called mislabeled / hard / outlier / ok, and what
cleanlab's Datalab says on the same data (issue types ``label`` and ``outlier``, from
5-fold out-of-fold probabilities of noise_lab's plain training of the same network at
its best budget, 5 epochs, and the standardized features). Datalab has no "hard":
its columns are the share with a label issue, with an outlier issue, and with neither.

The flipped labels' precision is given twice: among the original rows (clean +
flipped: the "10% noise" figure) and among all rows (planted extras included).

``--cache DIR`` keeps each trained state (the violation state, final outputs, history)
and cleanlab's probabilities, so a changed flag rule is re-measured in seconds; delete
DIR when training changes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_lab as lab  # noqa: E402

import minnorm_audit  # noqa: E402
from minnorm_audit.audit import AuditOptions, train, training_targets  # noqa: E402
from minnorm_audit.data import load_arrays  # noqa: E402
from minnorm_audit.score_run import score_classification  # noqa: E402
from minnorm_audit.training import DEFAULT_EPOCHS, FitResult, TrainConfig  # noqa: E402

CLEANLAB_EPOCHS = 5  # cleanlab's best budget on the tuning part (label_noise.BASELINE_EPOCHS)
NOISE_RATE = 0.1
EXTRA_SHARES = {"ambiguous": 0.05, "atypical": 0.05, "outlier:noise": 0.02, "outlier:domain": 0.02}
VERDICTS = ("mislabeled", "hard", "outlier", "ok")
# Where each dataset's out-of-domain rows come from.
OTHER_DOMAIN = {"digits": "gmm-k10-d32"}
QUICK_DATASETS = ("digits", "gmm-k5-d16")
UNDERTRAINED = {"rows": 200, "epochs": 2}


# ---------------------------------------------------------------------------- planting
@dataclass
class Planted:
    features: np.ndarray  # float32 (n, d)
    labels: np.ndarray  # int64 (n,): the given labels
    true_labels: np.ndarray  # int64 (n,): the clean labels (outliers: their random label)
    kinds: np.ndarray  # str (n,)
    num_classes: int


def other_domain_rows(target: lab.Dataset, count: int, seed: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rows of another dataset on ``target``'s features: columns tiled or cut
    to its width, standardized, then given each target feature's mean and spread."""
    source = lab.load(OTHER_DOMAIN.get(target.name, "digits"), seed).features.astype(np.float64)
    source = source[:, source.std(0) > 0]
    rows = source[rng.choice(len(source), size=count, replace=False)]
    d = target.features.shape[1]
    columns = rng.permutation(source.shape[1])
    columns = np.resize(columns, d)  # tiled when the source has fewer columns
    z = (rows[:, columns] - source[:, columns].mean(0)) / source[:, columns].std(0)
    return map_onto(z, target.features)


def map_onto(z: np.ndarray, features: np.ndarray) -> np.ndarray:
    mean, std = features.mean(0), features.std(0)
    return np.clip(mean + std * z, features.min(0), features.max(0))


def atypical_rows(data: lab.Dataset, anchors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Correctly labeled but atypical copies of ``anchors``; returns (rows, sub-kinds)."""
    features = data.features.astype(np.float64)
    std = features.std(0)
    rows, kinds = [], []
    image_kinds = ("noise", "occlusion", "rotation", "inversion")
    for position, anchor in enumerate(anchors):
        row = features[anchor].copy()
        kind = image_kinds[position % 4] if data.name == "digits" else "noise"
        if kind == "noise":
            row = row + 0.8 * std * rng.normal(size=row.shape)
        elif kind == "occlusion":
            image = row.reshape(8, 8)
            top, left = rng.integers(0, 5, size=2)
            image[top:top + 4, left:left + 4] = 0.0
        elif kind == "rotation":
            from scipy.ndimage import rotate

            angle = rng.uniform(30, 45) * rng.choice([-1, 1])
            row = rotate(row.reshape(8, 8), angle, reshape=False, order=1, mode="constant").reshape(-1)
        elif kind == "inversion":
            row = 16.0 - row
        rows.append(np.clip(row, features.min(0), features.max(0)) if kind != "inversion" else row)
        kinds.append(f"atypical:{kind}")
    return np.asarray(rows), np.asarray(kinds)


def plant(data: lab.Dataset, seed: int) -> Planted:
    """10% symmetric flips among the rows, plus the extra rows of EXTRA_SHARES."""
    rng = np.random.default_rng([seed, 2024])
    n, k = len(data.labels), data.num_classes
    noisy, flipped = lab.inject_noise(data.labels, k, "symmetric", NOISE_RATE, seed)
    features = [data.features.astype(np.float64)]
    given, true, kinds = [noisy], [data.labels], [np.where(flipped, "flipped", "clean")]
    counts = {kind: max(2, int(round(share * n))) for kind, share in EXTRA_SHARES.items()}

    anchors = rng.choice(n, size=counts["ambiguous"], replace=False)
    partners = np.array([rng.choice(np.flatnonzero(data.labels != data.labels[a])) for a in anchors])
    features.append(0.6 * data.features[anchors] + 0.4 * data.features[partners])
    given.append(data.labels[anchors]), true.append(data.labels[anchors]), kinds.append(np.full(len(anchors), "ambiguous"))

    anchors = rng.choice(n, size=counts["atypical"], replace=False)
    rows, sub_kinds = atypical_rows(data, anchors, rng)
    features.append(rows)
    given.append(data.labels[anchors]), true.append(data.labels[anchors]), kinds.append(sub_kinds)

    count = counts["outlier:noise"]
    features.append(map_onto(rng.normal(size=(count, data.features.shape[1])), data.features.astype(np.float64)))
    random_labels = rng.integers(0, k, size=count)
    given.append(random_labels), true.append(random_labels), kinds.append(np.full(count, "outlier:noise"))

    count = counts["outlier:domain"]
    features.append(other_domain_rows(data, count, seed, rng))
    random_labels = rng.integers(0, k, size=count)
    given.append(random_labels), true.append(random_labels), kinds.append(np.full(count, "outlier:domain"))
    return Planted(np.concatenate(features).astype(np.float32), np.concatenate(given).astype(np.int64),
                   np.concatenate(true).astype(np.int64), np.concatenate(kinds), k)


def clean_only(data: lab.Dataset) -> Planted:
    return Planted(data.features.astype(np.float32), data.labels.copy(), data.labels.copy(),
                   np.full(len(data.labels), "clean data"), data.num_classes)


# ---------------------------------------------------------------------------- minnorm-audit
RESULT_ARRAYS = ("final_multipliers", "average_multipliers", "mean_violations", "final_outputs", "final_margins")


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def trained_state(data: Planted, seed: int, config: TrainConfig, cache: Path | None, tag: str) -> tuple[FitResult, float]:
    """One Minnorm training run with the product's defaults (through audit.train)."""
    key = cache_key("minnorm", tag, seed, config.to_dict(), data.features.shape,
                    hashlib.sha256(data.features.tobytes() + data.labels.tobytes()).hexdigest())
    path = cache / f"minnorm-{tag}-{key}.npz" if cache else None
    if path is not None and path.exists():
        stored = np.load(path, allow_pickle=False)
        arrays = {name: (stored[name] if name in stored else None) for name in RESULT_ARRAYS}
        history = json.loads(str(stored["history"]))
        return FitResult(labels=data.labels, history=history, epochs_run=len(history),
                         train_seconds=float(stored["seconds"]), **arrays), float(stored["seconds"])
    loaded = load_arrays(data.features, data.labels)
    settings = AuditOptions(train=config)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = train(loaded, settings, training_targets(loaded), Path(scratch), resume=False, progress=False)
        seconds = time.perf_counter() - started
    result.minnorm = None  # the arrays below are all scoring reads
    if path is not None:
        arrays = {name: getattr(result, name) for name in RESULT_ARRAYS if getattr(result, name) is not None}
        np.savez_compressed(path, history=json.dumps(result.history), seconds=seconds, **arrays)
    return result, seconds


def minnorm_verdicts(data: Planted, seed: int, config: TrainConfig, cache: Path | None, tag: str) -> dict[str, Any]:
    """Flags (as given-label order), suggested labels (ints) and the run's verdict."""
    result, seconds = trained_state(data, seed, config, cache, tag)
    loaded = load_arrays(data.features, data.labels)
    # load_arrays names the classes by their text; map back to the integers.
    to_int = np.array([int(name) for name in loaded.class_names])
    assert (to_int[loaded.targets.numpy()] == data.labels).all()
    settings = AuditOptions(train=config)
    examples, rule = score_classification(result, loaded, settings)
    suggested = examples["suggested_label"].astype(int).to_numpy()
    margins = examples["margin"].to_numpy()
    return {
        "flags": examples["flag"].astype(str).to_numpy(),
        "difficulty": examples["difficulty"].to_numpy(),
        "suggested": suggested,
        "rule": rule,
        "training_accuracy": float((margins > 0).mean()),
        "inconclusive": rule.get("inconclusive"),
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------- cleanlab
def cleanlab_verdicts(data: Planted, seed: int, cache: Path | None, tag: str) -> dict[str, Any]:
    """Datalab's label and outlier issues from 5-fold out-of-fold probabilities."""
    from cleanlab import Datalab
    from sklearn.model_selection import KFold, StratifiedKFold

    key = cache_key("cleanlab", tag, seed, CLEANLAB_EPOCHS, data.features.shape,
                    hashlib.sha256(data.features.tobytes() + data.labels.tobytes()).hexdigest())
    path = cache / f"cleanlab-{tag}-{key}.npz" if cache else None
    started = time.perf_counter()
    if path is not None and path.exists():
        stored = np.load(path)
        probabilities, train_seconds = stored["probabilities"], float(stored["seconds"])
    else:
        probabilities = np.zeros((len(data.labels), data.num_classes))
        folds = 5
        if np.bincount(data.labels, minlength=data.num_classes).min() >= folds:
            splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.features, data.labels)
        else:
            splits = KFold(folds, shuffle=True, random_state=seed).split(data.features)
        for fold, (train_rows, test_rows) in enumerate(splits):
            model, _ = lab.train_plain(data.features[train_rows], data.labels[train_rows], data.num_classes,
                                       epochs=CLEANLAB_EPOCHS, seed=seed * 100 + fold, record=False)
            logits = lab.predict_logits(model, torch.as_tensor(data.features[test_rows]))
            probabilities[test_rows] = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
        train_seconds = time.perf_counter() - started
        if path is not None:
            np.savez_compressed(path, probabilities=probabilities, seconds=train_seconds)
    features = data.features.astype(np.float64)
    features = (features - features.mean(0)) / np.where(features.std(0) > 0, features.std(0), 1.0)
    started = time.perf_counter()
    datalab = Datalab(data={"label": data.labels}, label_name="label", verbosity=0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        datalab.find_issues(pred_probs=probabilities, features=features, issue_types={"label": {}, "outlier": {}})
    label_issues = datalab.get_issues("label")
    outlier_issues = datalab.get_issues("outlier")
    return {
        "label": label_issues["is_label_issue"].to_numpy(bool),
        "outlier": outlier_issues["is_outlier_issue"].to_numpy(bool),
        "suggested": label_issues["predicted_label"].to_numpy().astype(np.int64),
        "seconds": train_seconds + time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------- tables
def share(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else float("nan")


def kind_rows(dataset: str, data: Planted, ours: dict[str, Any], theirs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind in dict.fromkeys(data.kinds):  # first-seen order
        rows_of_kind = data.kinds == kind
        row: dict[str, Any] = {"dataset": dataset, "kind": kind, "rows": int(rows_of_kind.sum())}
        for verdict in VERDICTS:
            row[verdict] = share(ours["flags"][rows_of_kind] == verdict)
        row["cl label"] = share(theirs["label"][rows_of_kind])
        row["cl outlier"] = share(theirs["outlier"][rows_of_kind])
        row["cl neither"] = share(~(theirs["label"] | theirs["outlier"])[rows_of_kind])
        rows.append(row)
    return rows


def flip_row(dataset: str, data: Planted, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    flipped = data.kinds == "flipped"
    original = np.isin(data.kinds, ("clean", "flipped"))
    called = ours["flags"] == "mislabeled"
    row: dict[str, Any] = {"dataset": dataset, "flips": int(flipped.sum())}
    row["precision"] = share(flipped[original & called])
    row["recall"] = share(called[flipped])
    row["precision, all rows"] = share(flipped[called])
    row["suggested right"] = share(ours["suggested"][flipped & called] == data.true_labels[flipped & called])
    row["cl precision"] = share(flipped[original & theirs["label"]])
    row["cl recall"] = share(theirs["label"][flipped])
    row["cl precision, all rows"] = share(flipped[theirs["label"]])
    return row


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def mean_rows(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean over seeds of rows with the same keys."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for group in groups.values():
        merged = dict(group[0])
        for column, value in group[0].items():
            if isinstance(value, float):
                merged[column] = float(np.nanmean([row[column] for row in group]))
        out.append(merged)
    return out


def part_overview(clean: list[dict[str, Any]], kinds: list[dict[str, Any]], flips: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets' figures over one part (means over its datasets; worst in brackets)."""
    def by_kind(prefix: str, column: str) -> list[float]:
        return [row[column] for row in kinds if row["kind"].startswith(prefix)]

    def line(what: str, ours: list[float], theirs: list[float] | None, worst: str = "max") -> dict[str, Any]:
        pick = max if worst == "max" else min
        return {
            "figure": what,
            "minnorm-audit mean": float(np.mean(ours)) if ours else float("nan"),
            "worst dataset": float(pick(ours)) if ours else float("nan"),
            "cleanlab mean": float(np.mean(theirs)) if theirs else float("nan"),
            "cleanlab worst": float(pick(theirs)) if theirs else float("nan"),
        }

    return [
        line("clean data: mislabeled share", [r["mislabeled"] for r in clean], [r["cl label"] for r in clean]),
        line("clean data: hard + outlier share (cleanlab: outlier)", [r["hard"] + r["outlier"] for r in clean], [r["cl outlier"] for r in clean]),
        line("flips: mislabeled precision (original rows)", [r["precision"] for r in flips], [r["cl precision"] for r in flips], "min"),
        line("flips: mislabeled recall", [r["recall"] for r in flips], [r["cl recall"] for r in flips], "min"),
        line("ambiguous: called mislabeled", by_kind("ambiguous", "mislabeled"), by_kind("ambiguous", "cl label")),
        line("atypical: called mislabeled", by_kind("atypical", "mislabeled"), by_kind("atypical", "cl label")),
        line("ambiguous + atypical: called outlier", by_kind("ambiguous", "outlier") + by_kind("atypical", "outlier"),
             by_kind("ambiguous", "cl outlier") + by_kind("atypical", "cl outlier")),
        line("outliers: called outlier", by_kind("outlier", "outlier"), by_kind("outlier", "cl outlier"), "min"),
        line("outliers: called mislabeled", by_kind("outlier", "mislabeled"), by_kind("outlier", "cl label")),
        line("untouched rows of the planted run: ok (cleanlab: neither issue)", by_kind("clean", "ok"), by_kind("clean", "cl neither"), "min"),
    ]


def undertrained_rows(seed: int, cache: Path | None) -> list[dict[str, Any]]:
    """Networks that have not learned the data: the first 200 bundled digit images
    (8 x 8, audited as 32 x 32 images by the plain CNN, like an image folder) after 2
    epochs and after the default 20 (the CNN still has not learned them: 40 steps), and
    the same 200 digits as a table after 2 epochs (the MLP predicts most labels but fits
    almost none to its margin)."""
    from minnorm_audit.data import load_bundled_digits

    images, labels = load_bundled_digits()
    rows = UNDERTRAINED["rows"]
    small = Planted(images[:rows], labels[:rows].astype(np.int64), labels[:rows].astype(np.int64),
                    np.full(rows, "clean data"), 10)
    table = replace(small, features=images[:rows].reshape(rows, -1).astype(np.float32))
    out = []
    for what, data, epochs in ((f"first {rows} digit images, CNN", small, UNDERTRAINED["epochs"]),
                               (f"first {rows} digit images, CNN", small, DEFAULT_EPOCHS),
                               (f"first {rows} digits as a 64-feature table, MLP", table, UNDERTRAINED["epochs"])):
        config = TrainConfig(seed=seed, device="cpu", epochs=epochs)
        ours = minnorm_verdicts(data, seed, config, cache, f"digits-{data.features.ndim}d-{rows}-{epochs}")
        verdict = ours["inconclusive"]
        out.append({
            "run": f"{what}, {epochs} epochs",
            "training accuracy": ours["training_accuracy"],
            "mislabeled": int((ours["flags"] == "mislabeled").sum()),
            "hard": int((ours["flags"] == "hard").sum()),
            "outlier": int((ours["flags"] == "outlier").sum()),
            "verdict": f"inconclusive: {verdict['reason']}" if verdict else "conclusive",
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["tuning", "heldout", "both"], default="tuning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--datasets", nargs="+", default=None, help="Only these datasets of the chosen part(s).")
    parser.add_argument("--quick", action="store_true", help=f"Only {', '.join(QUICK_DATASETS)}, seed 0 (a few minutes).")
    parser.add_argument("--no-cleanlab", action="store_true", help="Skip the Datalab columns.")
    parser.add_argument("--cache", type=Path, default=None, help="Keep trained states here and reuse them.")
    parser.add_argument("--json", type=Path, default=None, help="Also write every row here.")
    args = parser.parse_args()
    if args.quick:
        args.part, args.seeds, args.datasets = "tuning", [0], list(QUICK_DATASETS)
    torch.set_num_threads(1)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(device="cpu")

    import cleanlab
    import sklearn

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; 1 torch thread")
    print(f"versions: minnorm-audit {minnorm_audit.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"cleanlab {cleanlab.__version__}, scikit-learn {sklearn.__version__}, python {platform.python_version()}")
    budget = "the network's default budget of" if config.epochs is None else config.epochs
    print(f"training: product defaults ({budget} epochs, dual_lr {config.dual_lr}, cap {config.multiplier_cap}); "
          f"cleanlab: Datalab on {CLEANLAB_EPOCHS}-epoch 5-fold out-of-fold probabilities; seeds {args.seeds}\n")

    parts = {"tuning": lab.TUNING_DATASETS, "heldout": lab.HELDOUT_DATASETS}
    chosen = list(parts) if args.part == "both" else [args.part]
    started = time.perf_counter()
    everything: dict[str, Any] = {}
    empty = {"label": None, "outlier": None}
    for part in chosen:
        names = [name for name in parts[part] if args.datasets is None or name in args.datasets]
        clean_rows, kind_table, flip_table = [], [], []
        for name in names:
            for seed in args.seeds:
                data = lab.load(name, seed)
                seed_config = replace(config, seed=seed)
                for tag, planted in (("clean", clean_only(data)), ("planted", plant(data, seed))):
                    ours = minnorm_verdicts(planted, seed, seed_config, args.cache, f"{name}-{tag}")
                    theirs = (cleanlab_verdicts(planted, seed, args.cache, f"{name}-{tag}") if not args.no_cleanlab
                              else {k: np.zeros(len(planted.labels), bool) for k in empty} | {"suggested": planted.labels})
                    rows = kind_rows(name, planted, ours, theirs)
                    if tag == "clean":
                        row = rows[0]
                        row["train acc"] = ours["training_accuracy"]
                        row["verdict"] = "inconclusive" if ours["inconclusive"] else "conclusive"
                        clean_rows.append(row)
                    else:
                        kind_table.extend(rows)
                        flip_table.append(flip_row(name, planted, ours, theirs))
                    print(f"[{time.perf_counter() - started:6.0f}s] {part} {name} seed {seed} {tag}: "
                          f"minnorm {ours['seconds']:.0f}s, cleanlab {theirs.get('seconds', 0):.0f}s",
                          file=sys.stderr, flush=True)
        clean_rows = mean_rows(clean_rows, ("dataset",))
        kind_table = mean_rows(kind_table, ("dataset", "kind"))
        flip_table = mean_rows(flip_table, ("dataset",))
        title = "Tuning part" if part == "tuning" else "Held-out part"
        print(f"## {title} ({', '.join(names)}; mean over seeds {args.seeds})\n")
        print("### Overview (means over the part's datasets, and the worst dataset)\n")
        print(markdown(part_overview(clean_rows, kind_table, flip_table)) + "\n")
        print("### Clean data alone: share of examples per verdict\n")
        print(markdown(clean_rows) + "\n")
        print("### Planted run: share of each kind per verdict (cl = cleanlab Datalab)\n")
        print(markdown(kind_table) + "\n")
        print(f"### Flipped labels ({NOISE_RATE:.0%} symmetric): the mislabeled flag\n")
        print(markdown(flip_table) + "\n")
        everything[part] = {"clean": clean_rows, "kinds": kind_table, "flips": flip_table}
    undertrained = undertrained_rows(args.seeds[0], args.cache)
    print("## Undertrained network\n")
    print(markdown(undertrained) + "\n")
    everything["undertrained"] = undertrained
    print(f"total time: {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
