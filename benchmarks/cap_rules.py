"""Which soft-margin cap rule? Rules compared on the TUNING part of the label-noise grid.

Each rule decides the cap C on every multiplier (the box 0 <= lambda <= C) after each
epoch; "box in weight step: no" reproduces the code before the effective multiplier of
the weight step was clipped to C too. Prints one markdown table: mean average
precision of the difficulty for the flipped labels and mean F1 of the ``mislabeled``
flag, over the tuning datasets x {symmetric, asymmetric} x {10%, 30%}. The held-out
part is never run here.

    python benchmarks/cap_rules.py [--seeds 0] [--rules q90 q98 fixed0.03 delay3 grow0.5 grow2 none noclip-q90]

Rules: ``qP``: P-th percentile of the examples' largest multipliers, recomputed each
epoch (q90 is the default, ``multiplier_cap=1.0``); ``fixedC``: C as given;
``delayK``: no cap for K epochs, then q90 of that state, frozen (lets multipliers
integrate first); ``growF``: C = F x dual_lr x epochs so far (a cap that grows with dual
time); ``none``: the hard-margin problem; ``noclip-q90``: q90 with the old weight step.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_lab as lab  # noqa: E402

import minnorm_audit  # noqa: E402
from minnorm_audit.minnorm import constraints  # noqa: E402

from minnorm_audit.training import loop as fit_module
CELLS = [("symmetric", 0.1), ("symmetric", 0.3), ("asymmetric", 0.1), ("asymmetric", 0.3)]


def make_cap_rule(rule: str):
    """A replacement for training.loop.cap_multipliers implementing ``rule``."""
    epochs = {"count": 0}

    def quantile_cap(optimizer, q):
        largest = optimizer.multipliers.row_max().detach().float()
        rank = max(1, int(math.ceil(q * largest.numel())))
        value = float(largest.kthvalue(rank).values)
        return value if value > 0 else None

    def cap(optimizer, kappa):
        if kappa is None or optimizer.form != "margin":
            return
        epochs["count"] += 1
        if rule.startswith("fixed"):
            optimizer.max_multiplier = float(rule[5:])
        elif rule.startswith("grow"):
            optimizer.max_multiplier = float(rule[4:]) * optimizer.dual_lr * epochs["count"]
        elif rule.startswith("delay"):
            wait = int(rule[5:])
            if epochs["count"] < wait:
                optimizer.max_multiplier = None
            elif epochs["count"] == wait:
                optimizer.max_multiplier = quantile_cap(optimizer, 0.9)
        else:
            optimizer.max_multiplier = quantile_cap(optimizer, float(rule.removeprefix("noclip-")[1:]) / 100)

    return cap


def run_rule(rule: str, seeds: list[int]) -> tuple[float, float, float]:
    original_cap, original_term = fit_module.cap_multipliers, constraints.linear_term
    options = {}
    if rule == "none":
        options["multiplier_cap"] = None
    else:
        fit_module.cap_multipliers = make_cap_rule(rule)
    if rule.startswith("noclip-"):
        def linear_term(*args, max_multiplier=None, **kwargs):  # the old weight step: relu only
            return original_term(*args, max_multiplier=None, **kwargs)
        constraints.linear_term = linear_term
    aps, f1s, started = [], [], time.perf_counter()
    try:
        for name in lab.TUNING_DATASETS:
            for seed in seeds:
                dataset = lab.load(name, seed)
                for kind, rate in CELLS:
                    noisy, flipped = lab.inject_noise(dataset.labels, dataset.num_classes, kind, rate, seed)
                    with tempfile.TemporaryDirectory() as folder:
                        result = minnorm_audit.audit((dataset.features, noisy), out=Path(folder) / "run",
                                                     seed=seed, device="cpu", **options)
                    examples = result.examples
                    aps.append(lab.average_precision(examples["difficulty"].to_numpy(), flipped))
                    f1s.append(lab.flag_prf((examples["flag"] == "mislabeled").to_numpy(), flipped)[2])
    finally:
        fit_module.cap_multipliers, constraints.linear_term = original_cap, original_term
    return float(np.mean(aps)), float(np.mean(f1s)), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rules", nargs="+", default=["q90", "q98", "fixed0.03", "delay3", "grow0.5", "grow2", "none", "noclip-q90"])
    args = parser.parse_args()
    print("# Cap rules on the tuning part\n")
    print(f"- command: `{' '.join(sys.argv)}`")
    print(f"- machine: {platform.platform()}, {torch.get_num_threads()} threads; torch {torch.__version__}, numpy {np.__version__}")
    print(f"- seeds {args.seeds}; datasets {', '.join(lab.TUNING_DATASETS)}; cells {CELLS}\n")
    print("| rule | mean AP | mean flag F1 | seconds |\n|---|---|---|---|")
    for rule in args.rules:
        ap, f1, seconds = run_rule(rule, args.seeds)
        print(f"| {rule} | {ap:.4f} | {f1:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
