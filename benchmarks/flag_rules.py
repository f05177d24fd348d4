"""Which null for the ``mislabeled`` flag? Rules compared on the TUNING part only.

The calibrated flag (minnorm_audit/calibration.py) measures each example's competitor
margin against its class's own null: a location and robust spread of the preference
among the examples labeled with that class. Those examples include the flipped ones;
at 30% noise they inflate the spread and the flag loses most of its recall. This
benchmark trains each cell once (the product's defaults, through audit.train, cached
with ``--cache``), then re-scores it under each null and prints one markdown table:
mean flag precision / recall / F1 over the tuning datasets per noise cell, the share
of a clean dataset's rows called mislabeled, and cleanlab ``find_label_issues``' F1
from 5-fold out-of-fold probabilities of the same network (label_noise.py's row).

    python benchmarks/flag_rules.py --cache .flag-cache [--seeds 0] [--epochs 20]

Nulls: ``all`` (every example of the class: the rule before this benchmark);
``trimmed`` / ``trimmed-raw`` (median and spread re-estimated without the examples at
or above the flag threshold until nothing changes, with / without a correction for the
trimmed tail); ``trimT`` (the same, trimmed at T whatever the flag threshold);
``fitted`` (the examples whose given label the network predicts at the end);
``fitted-trimmed`` (the fitted ones, trimmed: the product's rule,
``calibration.fitted_null``). A suffix ``:either`` / ``:violated`` / ``:none`` replaces
the two gates (preferred on average AND still violated at the end) with either, the
second alone, or nothing. Datasets: the tuning tables, ``digits-cnn`` (the bundled
digits as 8x8 images with the default CNN: the demo's setting) and the tuning parts of
benchmarks/highdim.py's 784-feature proxies (``digits28``, ``manifold784``);
``NAME@N``: a random N-row subset of a tuning dataset (small data).
The held-out part is never run here.
"""

from __future__ import annotations

import argparse
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
from minnorm_audit import calibration  # noqa: E402
from minnorm_audit.audit import AuditOptions  # noqa: E402
from minnorm_audit.data import load_arrays  # noqa: E402
from minnorm_audit.score_run import classification_scores, output_margins, still_violated_at_end  # noqa: E402
from minnorm_audit.training import TrainConfig  # noqa: E402

CELLS = [("clean", 0.0), ("symmetric", 0.1), ("symmetric", 0.3), ("asymmetric", 0.1), ("asymmetric", 0.3)]


def statistics(features, labels, k, seed, config, cache, tag):
    data = vd.Planted(features.astype(np.float32), labels, labels, np.full(len(labels), "x"), k)
    result, seconds = vd.trained_state(data, seed, config, cache, tag)
    loaded = load_arrays(data.features, data.labels)
    to_int = np.array([int(name) for name in loaded.class_names])
    given = loaded.targets.numpy().astype(np.int64)
    assert (to_int[given] == labels).all()
    settings = AuditOptions(train=config)
    scores = classification_scores(result, given, len(loaded.class_names), settings, False)
    margins = output_margins(torch.from_numpy(result.final_outputs), torch.from_numpy(given)).numpy()
    violated = still_violated_at_end(result, given, scores.competing, margins, config.margin)
    return {
        "preference": scores.difficulty - config.margin, "competitor": scores.competitor_margin,
        "violated": violated, "labels": given, "k": len(loaded.class_names), "margins": margins,
        "difficulty": scores.difficulty, "seconds": seconds, "to_int": to_int, "competing": scores.competing,
    }


def null(stats, kind, z_threshold):
    pref, labels, k = stats["preference"], stats["labels"], stats["k"]
    if kind == "all":
        return calibration.per_class_location_scale(pref, labels, k)
    if kind in ("fitted", "fitted-trimmed"):
        # The product's null (calibration.fitted_null); one round is the fitted examples alone.
        medians, scales = calibration.per_class_location_scale(pref, labels, k)
        return calibration.fitted_null(pref, labels, k, stats["margins"] > 0, medians, scales, z_threshold,
                                       max_rounds=1 if kind == "fitted" else calibration.NULL_ROUNDS)
    if kind.startswith("trimmed") or kind.startswith("trim"):
        trim_at = float(kind[4:]) if kind.startswith("trim") and not kind.startswith("trimmed") else z_threshold
        medians, scales = calibration.per_class_location_scale(pref, labels, k)
        for _ in range(50):
            z = (pref - medians[labels]) / scales[labels]
            keep = z < trim_at
            m2, s2 = calibration.per_class_location_scale(pref[keep], labels[keep], k)
            if kind == "trimmed":
                # MAD of a normal truncated at z_threshold sigma is smaller; undo that.
                s2 = s2 * truncation_factor(z_threshold)
            counts = np.bincount(labels[keep], minlength=k)
            base_m, base_s = calibration.per_class_location_scale(pref, labels, k)
            enough = counts >= calibration.MIN_CLASS_EXAMPLES
            m2, s2 = np.where(enough, m2, base_m), np.where(enough, s2, base_s)
            if np.allclose(m2, medians) and np.allclose(s2, scales):
                break
            medians, scales = m2, s2
        return medians, scales
    raise ValueError(kind)


def truncation_factor(t: float) -> float:
    """sigma / (1.4826 MAD) for a standard normal truncated above at t (numerically)."""
    x = np.random.default_rng(0).normal(size=2_000_000)
    x = x[x < t]
    return 1.0 / (1.4826 * np.median(np.abs(x - np.median(x))))


def flags_for(stats, kind, z_threshold):
    kind, _, gate = kind.partition(":")
    medians, scales = null(stats, kind, z_threshold)
    labels = stats["labels"]
    cz = (stats["competitor"] - medians[labels]) / scales[labels]
    prefers, violated = stats["competitor"] > 0, stats["violated"]
    gates = {"": prefers & violated, "either": prefers | violated, "none": np.ones_like(violated),
             "violated": violated, "prefers": prefers}
    return (cz >= z_threshold) & gates[gate]


def prf(flagged, flipped):
    return lab.flag_prf(flagged, flipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the product's budget for the network")
    parser.add_argument("--nulls", nargs="+", default=["all", "trimmed", "trimmed-raw", "fitted"])
    parser.add_argument("--z", type=float, nargs="+", default=[calibration.MISLABELED_Z])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--datasets", nargs="+", default=list(lab.TUNING_DATASETS) + ["digits-cnn"],
                        help="tuning datasets, and digits-cnn: the digits as images with the CNN (the demo)")
    parser.add_argument("--no-cleanlab", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="other TrainConfig fields")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    import highdim

    config = TrainConfig(epochs=args.epochs, device="cpu", **highdim.parse_overrides(args.set))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"minnorm-audit {minnorm_audit.__version__}; tuning part: {', '.join(lab.TUNING_DATASETS)}\n")
    results: dict = {}
    started = time.perf_counter()
    for name in args.datasets:
        for seed in args.seeds:
            config_seed = TrainConfig(**{**config.to_dict(), "seed": seed})
            if name in ("digits28", "manifold784"):
                import highdim

                data = getattr(highdim, name)("tuning", seed)
            elif name == "digits-cnn":  # the demo's setting: the digits as 8x8 images, the default CNN
                data = lab.load("digits", seed)
                data = lab.Dataset(name, (data.features / 16.0).reshape(-1, 1, 8, 8), data.labels, data.num_classes)
            elif "@" in name:  # a random subset of a tuning dataset: small data
                base, rows = name.split("@")
                data = lab.load(base, seed)
                keep = np.sort(np.random.default_rng([seed, 5]).permutation(len(data.labels))[:int(rows)])
                data = lab.Dataset(name, data.features[keep], data.labels[keep], data.num_classes)
            else:
                data = lab.load(name, seed)
            for kind, rate in CELLS:
                if kind == "clean":
                    noisy, flipped = data.labels.copy(), np.zeros(len(data.labels), bool)
                else:
                    noisy, flipped = lab.inject_noise(data.labels, data.num_classes, kind, rate, seed)
                stats = statistics(data.features, noisy, data.num_classes, seed, config_seed, args.cache,
                                   f"{data.name}-{kind}-{rate}-e{args.epochs}")
                cell = results.setdefault((kind, rate), {})
                cell.setdefault("ap", []).append(lab.average_precision(stats["difficulty"], flipped) if flipped.any() else np.nan)
                for nk in args.nulls:
                    for z in args.z:
                        flagged = flags_for(stats, nk, z)
                        key = f"{nk} z={z:g}"
                        if kind == "clean":
                            cell.setdefault(key, []).append((flagged.mean(), 0, 0))
                        else:
                            cell.setdefault(key, []).append(prf(flagged, flipped))
                if kind != "clean" and not args.no_cleanlab:
                    cl = cached_cleanlab(data.features.reshape(len(noisy), -1), noisy, data.num_classes, seed, args.cache, f"{name}-{kind}-{rate}")
                    cell.setdefault("cleanlab", []).append(prf(cl, flipped))
                print(f"[{time.perf_counter() - started:6.0f}s] {name} seed {seed} {kind} {rate}", file=sys.stderr, flush=True)
    keys = [f"{nk} z={z:g}" for nk in args.nulls for z in args.z] + ([] if args.no_cleanlab else ["cleanlab"])
    header = ["rule"] + [f"{k} {r:g}" for k, r in CELLS if k != "clean"] + ["mean F1", "clean: mislabeled"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("| AP of the difficulty | " + " | ".join(f"{np.mean(results[c]['ap']):.4f}" for c in CELLS if c[0] != "clean")
          + f" | mean AP {np.nanmean([np.mean(results[c]['ap']) for c in CELLS if c[0] != 'clean']):.4f} | |")
    for key in keys:
        cells = []
        f1s = []
        for c in CELLS:
            if c[0] == "clean":
                continue
            p, r, f = np.mean(results[c][key], axis=0)
            f1s.append(f)
            cells.append(f"{p:.2f} / {r:.2f} / {f:.3f}")
        clean = "" if key == "cleanlab" else f"{100 * np.mean([v[0] for v in results[('clean', 0.0)][key]]):.2f}%"
        print(f"| {key} | " + " | ".join(cells) + f" | {np.mean(f1s):.3f} | {clean} |")
    print(f"\ncells: precision / recall / F1 of the mislabeled flag; total time {time.perf_counter() - started:.0f} s")


def cached_cleanlab(features, labels, k, seed, cache, tag):
    path = cache / f"cl-issues-{tag}-{seed}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path)
    issues = lab.run_cleanlab(features, labels, k, epochs=vd.CLEANLAB_EPOCHS, seed=seed).issues
    if path is not None:
        np.save(path, issues)
    return issues


if __name__ == "__main__":
    main()
