"""Label-noise benchmark: minnorm-audit against loss, AUM, forgetting and cleanlab.

Prints markdown tables (the ones in docs/benchmarks.md); asserts nothing. Needs the
``bench`` extra (scikit-learn, cleanlab):

    pip install -e ".[bench]"
    python benchmarks/label_noise.py                      # both parts, 3 seeds
    python benchmarks/label_noise.py --part heldout --seeds 0 1 2 --json out.json

The grid (benchmarks/noise_lab.py): a tuning part (digits and two Gaussian-mixture
tables; the defaults and every baseline's epoch budget were chosen on it with
benchmarks/tune_scoring.py) and a held-out part (three other mixtures, wine and
breast cancer) that was never looked at while choosing. Each dataset gets symmetric
and asymmetric flips at 10% and 30%, exactly round(rate * n) labels, per seed.

minnorm-audit runs through its public API with its defaults (one training run);
the baselines train the same network (the default MLP) with Adam on cross-entropy,
each at its own best epoch budget from the tuning part.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_lab as lab  # noqa: E402

import minnorm_audit  # noqa: E402
from minnorm_audit.training import TrainConfig  # noqa: E402

# Each baseline's best epoch budget on the tuning part (benchmarks/tune_scoring.py,
# mean average precision over the tuning cells); see docs/benchmarks.md.
BASELINE_EPOCHS = {"loss": 5, "aum": 10, "forgetting": 10, "cleanlab": 5}
METHODS = ("minnorm-audit", "loss", "aum", "forgetting", "cleanlab")


def run_minnorm(features: np.ndarray, labels: np.ndarray, seed: int, workdir: Path) -> tuple[pd.DataFrame, float]:
    """One audit through the public API with its defaults (only the seed and CPU set)."""
    table = pd.DataFrame(features, columns=[f"f{i}" for i in range(features.shape[1])])
    table["label"] = labels
    data_file = workdir / "data" / "table.parquet"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(data_file)
    started = time.perf_counter()
    result = minnorm_audit.audit(data_file, out=workdir / "run", seed=seed, device="cpu")
    return result.examples, time.perf_counter() - started


def evaluate_cell(name: str, kind: str, rate: float, seed: int, workdir: Path) -> dict[str, dict[str, float]]:
    data = lab.load(name, seed)
    noisy, flipped = lab.inject_noise(data.labels, data.num_classes, kind, rate, seed)
    rows: dict[str, dict[str, float]] = {}

    examples, seconds = run_minnorm(data.features, noisy, seed, workdir)
    competing = examples["competing_label"].astype(int).to_numpy()
    flagged = (examples["flag"] == "mislabeled").to_numpy()
    rows["minnorm-audit"] = metrics(examples["difficulty"].to_numpy(), flipped, flagged, competing, data.labels, seconds)

    started = time.perf_counter()
    longest = max(BASELINE_EPOCHS[m] for m in ("loss", "aum", "forgetting"))
    _, trace = lab.train_plain(data.features, noisy, data.num_classes, epochs=longest, seed=seed)
    per_epoch = (time.perf_counter() - started) / longest
    for method, score_fn in (("loss", lambda e: lab.loss_score(trace, noisy, e)), ("aum", lambda e: lab.aum_score(trace, e)),
                             ("forgetting", lambda e: lab.forgetting_score(trace, e))):
        epochs = BASELINE_EPOCHS[method]
        rows[method] = metrics(score_fn(epochs), flipped, None, lab.plain_suggestion(trace, noisy, epochs), data.labels, per_epoch * epochs)

    cleanlab = lab.run_cleanlab(data.features, noisy, data.num_classes, epochs=BASELINE_EPOCHS["cleanlab"], seed=seed)
    rows["cleanlab"] = metrics(cleanlab.score, flipped, cleanlab.issues, cleanlab.suggestion, data.labels, cleanlab.seconds)
    for row in rows.values():
        row["time_vs_cleanlab"] = row["seconds"] / cleanlab.seconds
    return rows


def metrics(score, flipped, flagged, suggestion, clean_labels, seconds) -> dict[str, float]:
    row = {
        "auroc": lab.auroc(score, flipped),
        "ap": lab.average_precision(score, flipped),
        "p_at_k": lab.precision_at_k(score, flipped),
        "suggested_acc": float((suggestion[flipped] == clean_labels[flipped]).mean()),
        "seconds": seconds,
    }
    if flagged is not None:
        row["flag_precision"], row["flag_recall"], row["flag_f1"] = lab.flag_prf(np.asarray(flagged, bool), flipped)
    return row


def hard_examples_table(names: list[str], seed: int, workdir: Path) -> list[dict[str, object]]:
    """Correct-but-hard rows (5% of n) next to 10% symmetric flips: how are they flagged?"""
    out = []
    for name in names:
        data = lab.with_hard_examples(lab.load(name, seed), 0.05, seed)
        # Flips only among the original rows; hard rows keep their (correct) labels.
        original = ~data.hard
        noisy = data.labels.copy()
        noisy_original, flipped_original = lab.inject_noise(data.labels[original], data.num_classes, "symmetric", 0.1, seed)
        noisy[original] = noisy_original
        flipped = np.zeros(len(noisy), bool)
        flipped[np.flatnonzero(original)[flipped_original]] = True
        examples, _ = run_minnorm(data.features, noisy, seed, workdir / f"hard-{name}")
        flag = examples["flag"].to_numpy()
        cleanlab = lab.run_cleanlab(data.features, noisy, data.num_classes, epochs=BASELINE_EPOCHS["cleanlab"], seed=seed)
        out.append({
            "dataset": name,
            "hard rows": int(data.hard.sum()),
            "hard: mislabeled": int((flag[data.hard] == "mislabeled").sum()),
            "hard: hard": int((flag[data.hard] == "hard").sum()),
            "hard: ok": int((flag[data.hard] == "ok").sum()),
            "flips: mislabeled": f"{(flag[flipped] == 'mislabeled').mean():.1%}",
            "flips: hard": f"{(flag[flipped] == 'hard').mean():.1%}",
            "cleanlab issues among hard": int(cleanlab.issues[data.hard].sum()),
        })
    return out


def accuracy_table(seeds: list[int]) -> list[dict[str, object]]:
    """The paper's claim: test accuracy of the same MLP, Minnorm vs plain training."""
    from sklearn.model_selection import train_test_split

    from minnorm_audit.minnorm import Minnorm
    from minnorm_audit.training import build_model, fit

    images, labels = lab.load("digits", 0).features, lab.load("digits", 0).labels
    results: dict[str, list[float]] = defaultdict(list)
    for seed in seeds:
        x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.3, random_state=seed, stratify=labels)
        test_inputs = torch.as_tensor(x_test)
        torch.manual_seed(seed)
        model = build_model("mlp", torch.as_tensor(x_train), 10)
        config = TrainConfig(seed=seed, device="cpu")
        fit(model, torch.as_tensor(x_train), torch.as_tensor(y_train), form="margin", num_outputs=10, config=config)
        results[f"Minnorm ({config.epochs} epochs, defaults)"].append(float((lab.predict_logits(model, test_inputs).argmax(1) == y_test).mean()))
        for weight_decay in (0.0, 1e-4, 1e-2):
            for epochs in (20, 100):
                model, _ = lab.train_plain(x_train, y_train, 10, epochs=epochs, seed=seed, weight_decay=weight_decay, record=False)
                label = f"cross-entropy, {epochs} epochs, " + (f"L2 (AdamW weight decay {weight_decay:g})" if weight_decay else "no L2")
                results[label].append(float((lab.predict_logits(model, test_inputs).argmax(1) == y_test).mean()))
    del Minnorm
    return [{"training": k, "test accuracy": f"{np.mean(v):.4f} ± {np.std(v):.4f}"} for k, v in results.items()]


def markdown(rows: list[dict[str, object]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def summarize(part: str, cells: dict[tuple, list[dict[str, dict[str, float]]]]) -> str:
    fmt = lambda values: f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "n/a"  # noqa: E731
    detail, ap_by_method, gaps = [], defaultdict(list), []
    for (name, kind, rate), seeds in cells.items():
        for method in METHODS:
            values = lambda key: [s[method][key] for s in seeds if key in s[method]]  # noqa: E731
            detail.append({
                "dataset": name, "noise": f"{kind[:4]} {rate:.0%}", "method": method,
                "AUROC": fmt(values("auroc")), "AP": fmt(values("ap")), "P@k": fmt(values("p_at_k")),
                "flag P / R / F1": " / ".join(f"{np.mean(values(k)):.3f}" for k in ("flag_precision", "flag_recall", "flag_f1")) if values("flag_f1") else "n/a",
                "suggested right": fmt(values("suggested_acc")), "time / cleanlab": f"{np.mean(values('time_vs_cleanlab')):.2f}",
            })
            ap_by_method[method].append(np.mean(values("ap")))
        best_baseline = max(np.mean([s[m]["ap"] for s in seeds]) for m in METHODS[1:])
        gaps.append(np.mean([s["minnorm-audit"]["ap"] for s in seeds]) - best_baseline)

    overview = []
    for method in METHODS:
        every = [s[method] for seeds in cells.values() for s in seeds]
        overview.append({
            "method": method,
            "mean AP": f"{np.mean(ap_by_method[method]):.4f}",
            "detection error (1 - AP)": f"{1 - np.mean(ap_by_method[method]):.4f}",
            "mean AUROC": f"{np.mean([r['auroc'] for r in every]):.4f}",
            "flag F1": f"{np.mean([r['flag_f1'] for r in every]):.3f}" if "flag_f1" in every[0] else "n/a",
            "suggested right @10%": f"{np.mean([s[method]['suggested_acc'] for (n, k, r), seeds in cells.items() if r == 0.1 for s in seeds]):.3f}",
            "time / cleanlab": f"{np.mean([r['time_vs_cleanlab'] for r in every]):.2f}",
        })
    # The best baseline is the one with the lowest mean detection error over the part.
    baseline_errors = {m: 1 - np.mean(ap_by_method[m]) for m in METHODS[1:]}
    best = min(baseline_errors, key=baseline_errors.get)
    ratio = (1 - np.mean(ap_by_method["minnorm-audit"])) / baseline_errors[best]
    verdict = (
        f"minnorm-audit detection error / best baseline's ({best}): **{ratio:.2f}** (target <= 0.70); "
        f"worst cell: minnorm-audit AP {min(gaps):+.3f} vs that cell's best baseline (target >= -0.02)"
    )
    return f"### {part}: overview\n\n{markdown(overview)}\n\n{verdict}\n\n### {part}: per cell (mean ± std over seeds)\n\n{markdown(detail)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["tuning", "heldout", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-extras", action="store_true", help="Skip the hard-examples and accuracy tables.")
    parser.add_argument("--datasets", nargs="+", default=None, help="Only these datasets of the chosen part(s).")
    parser.add_argument("--json", type=Path, default=None, help="Also write every per-seed figure here.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every method gets the same single core: fair wall times

    parts = {"tuning": lab.TUNING_DATASETS, "heldout": lab.HELDOUT_DATASETS}
    chosen = list(parts) if args.part == "both" else [args.part]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; 1 torch thread per method")
    import cleanlab
    import sklearn

    print(f"versions: minnorm-audit {minnorm_audit.__version__}, torch {torch.__version__}, cleanlab {cleanlab.__version__}, "
          f"scikit-learn {sklearn.__version__}, python {platform.python_version()}")
    print(f"defaults: {TrainConfig()}; baseline epochs: {BASELINE_EPOCHS}\n")
    everything = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for part in chosen:
            cells: dict[tuple, list] = {}
            names = [n for n in parts[part] if args.datasets is None or n in args.datasets]
            for name, kind, rate in itertools.product(names, ("symmetric", "asymmetric"), (0.1, 0.3)):
                for seed in args.seeds:
                    workdir = Path(scratch) / f"{name}-{kind}-{rate}-{seed}"
                    cells.setdefault((name, kind, rate), []).append(evaluate_cell(name, kind, rate, seed, workdir))
                print(f"[{time.perf_counter() - started:7.0f}s] {part} {name} {kind} {rate}", file=sys.stderr, flush=True)
            print(summarize(part, cells))
            everything[part] = {"|".join(map(str, key)): value for key, value in cells.items()}
        if not args.skip_extras:
            hard = hard_examples_table(["digits", "gmm-k7-d24"], args.seeds[0], Path(scratch))
            print("### Hard but correctly labeled (5% extra rows, plus 10% symmetric flips)\n\n" + markdown(hard) + "\n")
            print("### Test accuracy on a held-out 30% of digits (clean labels)\n\n" + markdown(accuracy_table(args.seeds)) + "\n")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
