"""The sweep that chose minnorm-audit's stopping rule and score (tuning part ONLY).

For each tuning cell it trains once per dual learning rate, keeps the multipliers of
every epoch, and scores several candidate states of them; it also finds each
baseline's best epoch budget. The held-out part of the grid is never touched here.

    python benchmarks/tune_scoring.py [--seeds 0 1 2] [--max-epochs 40]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_lab as lab  # noqa: E402

from minnorm_audit.minnorm import Minnorm  # noqa: E402
from minnorm_audit.training import build_model, cap_multipliers  # noqa: E402


def minnorm_trajectory(features, labels, num_classes, *, epochs, dual_lr, seed, kappa=None, lr=1e-3, batch_size=128, damping=None):
    """Minnorm training exactly as minnorm_audit.training.fit does it, keeping every
    epoch's multipliers and the in-training margins."""
    inputs = torch.as_tensor(features)
    targets = torch.as_tensor(labels)
    torch.manual_seed(seed)
    binary = num_classes == 2
    outputs = 1 if binary else num_classes
    model = build_model("mlp", inputs, outputs)
    optimizer = Minnorm(torch.optim.Adam(model.parameters(), lr=lr), num_examples=len(labels), num_outputs=outputs,
                        dual_lr=dual_lr, damping=damping, model=model, track_violations=True)
    generator = torch.Generator().manual_seed(seed)
    snapshots, margins, violations = [], [], []
    for _ in range(epochs):
        epoch_margins = np.zeros(len(labels), dtype=np.float32)
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            out = model(inputs[batch])
            loss = optimizer.lagrangian(out, targets[batch], batch)
            with torch.no_grad():
                g = optimizer.constraint_values(out.detach(), targets[batch])
                if not binary:
                    g = g.scatter(1, targets[batch, None], float("inf"))
                epoch_margins[batch.numpy()] = g.min(1).values.numpy()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        cap_multipliers(optimizer, kappa)
        mean_violation = optimizer.mean_violations().double().numpy().copy()
        lam = optimizer.dense_multipliers().detach().double().numpy().copy()
        if binary:
            full = np.zeros((len(labels), 2))
            full[np.arange(len(labels)), 1 - labels] = lam[:, 0]
            lam = full
            full = np.full((len(labels), 2), -np.inf)
            full[np.arange(len(labels)), 1 - labels] = mean_violation[:, 0]
            mean_violation = full
        else:
            mean_violation[np.arange(len(labels)), labels] = -np.inf
        snapshots.append(lam)
        margins.append(epoch_margins)
        violations.append(mean_violation)
    return np.stack(snapshots), np.stack(margins), np.stack(violations)


def candidate_scores(snapshots: np.ndarray, margins: np.ndarray, violations: np.ndarray, epochs: int) -> dict[str, np.ndarray]:
    lam = snapshots[:epochs]
    peak = lam.max(2)  # (epochs, n)
    ranks = peak.argsort(1).argsort(1) / peak.shape[1]
    half = epochs // 2
    return {
        "violation-max": violations[epochs - 1].max(1),
        "final-max": peak[-1],
        "final-sum": lam[-1].sum(1),
        "mean-max": lam.mean(0).max(1),
        "mean-sum": lam.mean(0).sum(1),
        "tailmean-max": lam[half:].mean(0).max(1),
        "meanrank-max": ranks.mean(0),
        "minnorm-aum": -margins[:epochs].mean(0),
        "mean-max+aum": (lam.mean(0).max(1).argsort().argsort() + (-margins[:epochs].mean(0)).argsort().argsort()) / 2.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--dual-lrs", type=float, nargs="+", default=[0.01])
    parser.add_argument("--kappas", type=float, nargs="+", default=[0.0, 1.0, 1.5, 2.0], help="0 = no cap")
    parser.add_argument("--datasets", nargs="+", default=list(lab.TUNING_DATASETS))
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    assert not set(args.datasets) & set(lab.HELDOUT_DATASETS), "the held-out part is never tuned on"

    budgets = [e for e in (5, 10, 20, 30, 40) if e <= args.max_epochs]
    results: dict[tuple, list[float]] = defaultdict(list)
    started = time.perf_counter()
    for name, kind, rate, seed in itertools.product(args.datasets, ("symmetric", "asymmetric"), (0.1, 0.3), args.seeds):
        data = lab.load(name, seed)
        noisy, flipped = lab.inject_noise(data.labels, data.num_classes, kind, rate, seed)
        for dual_lr, kappa in itertools.product(args.dual_lrs, args.kappas):
            snapshots, margins, violations = minnorm_trajectory(data.features, noisy, data.num_classes, epochs=args.max_epochs,
                                                                dual_lr=dual_lr, seed=seed, kappa=kappa or None)
            method = f"minnorm cap {kappa:g}" if kappa else "minnorm no cap"
            for epochs in budgets:
                for score_name, score in candidate_scores(snapshots, margins, violations, epochs).items():
                    results[(method, score_name, dual_lr, epochs)].append(lab.average_precision(score, flipped))
                for name_, suggestion in (("suggest-final", snapshots[epochs - 1].argmax(1)), ("suggest-mean", snapshots[:epochs].mean(0).argmax(1)),
                                          ("suggest-violation", violations[epochs - 1].argmax(1))):
                    results[(method, name_, dual_lr, epochs)].append(float((suggestion[flipped] == data.labels[flipped]).mean()))
        if not args.skip_baselines:
            _, trace = lab.train_plain(data.features, noisy, data.num_classes, epochs=args.max_epochs, seed=seed)
            for epochs in budgets:
                results[("loss", "", 0, epochs)].append(lab.average_precision(lab.loss_score(trace, noisy, epochs), flipped))
                results[("aum", "", 0, epochs)].append(lab.average_precision(lab.aum_score(trace, epochs), flipped))
                results[("forgetting", "", 0, epochs)].append(lab.average_precision(lab.forgetting_score(trace, epochs), flipped))
            for epochs in (5, 10, 20):
                cl = lab.run_cleanlab(data.features, noisy, data.num_classes, epochs=epochs, seed=seed)
                results[("cleanlab", "", 0, epochs)].append(lab.average_precision(cl.score, flipped))
        print(f"[{time.perf_counter() - started:7.1f}s] {name} {kind} {rate} seed {seed}", file=sys.stderr, flush=True)

    rows = sorted(((np.mean(v), np.std(v), k) for k, v in results.items()), key=lambda r: -r[0])
    print("| method | score | dual_lr | epochs | mean AP (or suggestion acc) | std | cells |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mean, std, (method, score, dual_lr, epochs) in rows:
        print(f"| {method} | {score} | {dual_lr:g} | {epochs} | {mean:.4f} | {std:.4f} | {len(results[(method, score, dual_lr, epochs)])} |")
    if args.json:
        args.json.write_text(json.dumps({"|".join(map(str, k)): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
