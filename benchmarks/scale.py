"""Memory and time of the multiplier store, and of one Minnorm epoch, at scale (CPU).

Prints markdown tables; never asserts on time. Usage:

    python benchmarks/scale.py [--sizes 100000 1000000] [--classes 1000]

For each size: the store ``Minnorm`` picks under the default 1 GB budget (dense while
all per-example state fits, else the top-k compact store), its bytes, and the time of
one epoch on synthetic data with a small MLP (32 features -> 128 hidden -> classes,
batch 512, Adam): the training steps, then the epoch-end work (diagnostics and the
running mean). The MLP is kept small on purpose so the whole script stays within a few
minutes on 2 CPU cores; the store's share of a step is what a larger network would
dilute. Last, the store for ImageNet-1k's 1,281,167 examples x 1000 classes is
allocated and measured (tensor bytes and resident memory).

``--price ROWS [ROWS ...]`` measures instead what one audit costs against the runs it
replaces, where training dominates: real digits as a 784-feature table (the bundled
8x8 digits upsampled to 28 x 28 under random affine jitter and pixel noise, as
``benchmarks/highdim.py``'s ``digits28``; as many jittered copies of each source as
the row count needs), 10% symmetric label flips. Per row count, all on the same
torch threads (``--threads``, default 1): the whole audit (public API, defaults),
5-fold out-of-fold training of the same MLP at 5 epochs a fold plus cleanlab's
``find_label_issues`` (cleanlab's input at its best budget), and AUM's single run (10
epochs, Adam on cross-entropy); their wall times, ratios, and the average precision
of each score for the flipped labels. ``--epochs E ...`` adds audit runs at other
budgets (the levers)::

    python benchmarks/scale.py --price 20000 3000 [--threads 1] [--epochs 7]
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
from torch import nn

from minnorm_audit import __version__
from minnorm_audit.minnorm import DEFAULT_MEMORY_BUDGET_BYTES, Minnorm, state_bytes

FEATURES, HIDDEN, BATCH = 32, 128, 512
IMAGENET_EXAMPLES, IMAGENET_CLASSES = 1_281_167, 1000


def resident_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build(num_examples: int, num_classes: int, store: str) -> tuple[nn.Module, Minnorm, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))
    started = time.perf_counter()
    optimizer = Minnorm(torch.optim.Adam(model.parameters(), lr=1e-3), num_examples=num_examples,
                        num_outputs=num_classes, dual_lr=0.01, model=model, multiplier_store=store,  # type: ignore[arg-type]
                        track_violations=True)  # as fit() trains by default
    return model, optimizer, time.perf_counter() - started


def one_epoch(num_examples: int, num_classes: int, store: str) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (num_examples,), generator=generator)
    # Class-dependent features, so some examples are fitted and some keep competing.
    centers = torch.randn(num_classes, FEATURES, generator=generator)
    inputs = centers[labels] + 2.0 * torch.randn(num_examples, FEATURES, generator=generator)
    model, optimizer, allocate_seconds = build(num_examples, num_classes, store)
    optimizer.diagnostics()  # allocates the snapshot the epoch-to-epoch change is measured from
    order = torch.randperm(num_examples, generator=generator)
    store_seconds = 0.0
    started = time.perf_counter()
    with optimizer.deferred_dual_updates():  # as fit() trains: one dual pass per 8,192 examples
        for batch in order.split(BATCH):
            loss = optimizer.lagrangian(model(inputs[batch]), labels[batch], batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    epoch_seconds = time.perf_counter() - started
    # The store's own work per batch (read, then write back), timed apart on 50 batches.
    probe = order[: 50 * BATCH].split(BATCH)
    started = time.perf_counter()
    for batch in probe:
        values = optimizer.multipliers.gather(batch)
        optimizer.multipliers.scatter(batch, values)
    store_seconds = (time.perf_counter() - started) / len(probe)
    started = time.perf_counter()
    diagnostics = optimizer.diagnostics()
    optimizer.accumulate_average()
    end_seconds = time.perf_counter() - started
    store_object = optimizer.multipliers
    active = float((store_object.values > 0).sum(1).float().mean())  # slots or columns in use
    return {
        "examples": num_examples,
        "classes": num_classes,
        "store": store_object.kind,
        "slots": store_object.slots or "-",
        "store_mb": store_object.nbytes() / 1e6,
        "state_mb": (optimizer.state_nbytes() + 8 * num_examples) / 1e6,
        "allocate_s": allocate_seconds,
        "epoch_s": epoch_seconds,
        "steps": len(order.split(BATCH)),
        "store_ms_per_batch": store_seconds * 1e3,
        "epoch_end_s": end_seconds,
        "active": active,
        "max_violation": diagnostics["max_violation"],
    }


def imagenet_store() -> dict[str, float]:
    before = resident_bytes()
    started = time.perf_counter()
    model = nn.Linear(4, IMAGENET_CLASSES)
    optimizer = Minnorm(torch.optim.SGD(model.parameters(), lr=0.1), num_examples=IMAGENET_EXAMPLES,
                        num_outputs=IMAGENET_CLASSES, track_violations=True)  # the default score state
    optimizer.diagnostics()  # allocates the snapshot and the previous scores: everything kept
    allocate_seconds = time.perf_counter() - started
    after = resident_bytes()
    started = time.perf_counter()
    optimizer.diagnostics()  # a full epoch-end pass (change measured densely, in chunks)
    diagnostics_seconds = time.perf_counter() - started
    return {
        "slots": float(optimizer.multipliers.slots or 0),
        "store_bytes": float(optimizer.multipliers.nbytes()),
        "state_bytes": float(optimizer.state_nbytes() + 8 * IMAGENET_EXAMPLES),
        "formula_bytes": float(state_bytes(IMAGENET_EXAMPLES, IMAGENET_CLASSES, store="compact",
                                           slots=optimizer.multipliers.slots, violations=True)),
        "dense_bytes": float(state_bytes(IMAGENET_EXAMPLES, IMAGENET_CLASSES, store="dense")),
        "resident_delta": float(after - before),
        "allocate_s": allocate_seconds,
        "diagnostics_s": diagnostics_seconds,
    }


def digits784(rows: int, seed: int):  # type: ignore[no-untyped-def]
    """``rows`` jittered 28 x 28 copies of the bundled digits (all 1,797 sources, both
    of highdim's parts) with 10% symmetric flips: ``(features, given, flipped)``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import highdim
    import noise_lab as lab

    copies = math.ceil(rows / 1797) + 1
    parts = [highdim.digits28(part, seed, copies=copies) for part in ("tuning", "held-out")]
    features = np.concatenate([part.features for part in parts])
    labels = np.concatenate([part.labels for part in parts])
    keep = np.random.default_rng(seed).permutation(len(labels))[:rows]
    given, flipped = lab.inject_noise(labels[keep], 10, "symmetric", 0.1, seed)
    return features[keep], given, flipped


def price(rows: int, seed: int, epoch_levers: list[int]) -> list[dict[str, object]]:
    """Wall time and average precision of the audit (defaults, then each lever), 5-fold
    cleanlab and AUM on one table of ``rows`` rows."""
    import tempfile

    import noise_lab as lab

    import minnorm_audit

    features, given, flipped = digits784(rows, seed)
    table_rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as workdir:
        import pandas as pd

        table = pd.DataFrame(features, columns=[f"p{i}" for i in range(features.shape[1])])
        table["label"] = given
        data_file = Path(workdir) / "digits784.parquet"
        table.to_parquet(data_file)
        for epochs in [None, *epoch_levers]:
            started, cpu_started = time.perf_counter(), time.process_time()
            result = minnorm_audit.audit(data_file, out=Path(workdir) / f"run-{epochs}", seed=seed, device="cpu",
                                         epochs=epochs)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            score = result.examples["difficulty"].to_numpy()  # in row order
            table_rows.append({"method": f"minnorm-audit, {epochs or 'default'} epochs", "seconds": seconds,
                               "cpu": cpu, "ap": lab.average_precision(score, flipped)})
    cpu_started = time.process_time()
    cleanlab = lab.run_cleanlab(features, given, 10, epochs=5, seed=seed)
    cleanlab_cpu = time.process_time() - cpu_started
    table_rows.append({"method": "cleanlab, 5-fold out-of-fold MLP at 5 epochs a fold", "seconds": cleanlab.seconds,
                       "cpu": cleanlab_cpu, "ap": lab.average_precision(cleanlab.score, flipped)})
    started, cpu_started = time.perf_counter(), time.process_time()
    _, trace = lab.train_plain(features, given, 10, epochs=10, seed=seed)
    aum_seconds, aum_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    table_rows.append({"method": "AUM, one run of 10 epochs", "seconds": aum_seconds,
                       "cpu": aum_cpu, "ap": lab.average_precision(lab.aum_score(trace, 10), flipped)})
    for row in table_rows:
        row["rows"] = rows
        row["ratio"] = float(row["seconds"]) / cleanlab.seconds  # type: ignore[arg-type]
        row["cpu_ratio"] = float(row["cpu"]) / cleanlab_cpu  # type: ignore[arg-type]
    return table_rows


def price_main(args: argparse.Namespace) -> None:
    rows_out = []
    for rows in args.price:
        rows_out += price(rows, args.seed, args.epochs)
    # On a loaded machine the wall time swings with the other jobs; with one thread the
    # process's CPU time is the work itself, so its ratio is the one to read there.
    print("| rows | method | wall s | x 5-fold cleanlab (wall) | CPU s | x 5-fold cleanlab (CPU) "
          "| AP of the score for the flipped labels |")
    print("|---|---|---|---|---|---|---|")
    for row in rows_out:
        print(f"| {row['rows']:,} | {row['method']} | {row['seconds']:.1f} | {row['ratio']:.2f} | {row['cpu']:.1f} "
              f"| {row['cpu_ratio']:.2f} | {row['ap']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--price", type=int, nargs="+", default=None,
                        help="Instead: audit vs 5-fold cleanlab vs AUM on digits784 tables of these row counts.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every method (--price).")
    parser.add_argument("--epochs", type=int, nargs="*", default=[], help="Extra audit budgets (--price).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dense-baseline", type=int, default=100_000,
                        help="Also time the dense store (forced) at this size (0: skip).")
    args = parser.parse_args()
    if args.price:
        torch.set_num_threads(args.threads)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"minnorm-audit {__version__}")
    if args.price:
        print("measured while other jobs ran (2 shared cores)\n")
        price_main(args)
        return
    print(f"model: MLP {FEATURES} -> {HIDDEN} -> classes, batch {BATCH}, Adam; budget "
          f"{DEFAULT_MEMORY_BUDGET_BYTES / 1e9:g} GB for all per-example state; one run per row\n")

    runs = []
    for size in args.sizes:
        runs.append(one_epoch(size, args.classes, "auto"))
        if size == args.dense_baseline:
            runs.append(one_epoch(size, args.classes, "dense"))
    for size in args.sizes[-1:]:
        runs.append(one_epoch(size, 10, "auto"))

    print("| examples | classes | store | slots | store MB | all per-example state MB | allocate s "
          "| epoch s (steps) | store read+write ms/batch | epoch-end s | classes with a multiplier, mean |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['examples']:,} | {run['classes']} | {run['store']} | {run['slots']} | {run['store_mb']:,.0f} "
              f"| {run['state_mb']:,.0f} | {run['allocate_s']:.2f} | {run['epoch_s']:.1f} ({run['steps']}) "
              f"| {run['store_ms_per_batch']:.2f} | {run['epoch_end_s']:.2f} | {run['active']:.1f} |")

    imagenet = imagenet_store()
    print(f"\nImageNet-1k scale: {IMAGENET_EXAMPLES:,} examples x {IMAGENET_CLASSES} classes, auto store = compact, "
          f"{imagenet['slots']:.0f} slots")
    print("| what | bytes | GB |")
    print("|---|---|---|")
    for name, key in (("store tensors (classes, values, running mean, snapshot)", "store_bytes"),
                      ("all per-example state (store + violation, label, scores)", "state_bytes"),
                      ("same, from the formula that chooses the store", "formula_bytes"),
                      ("resident memory added (RSS, after allocation)", "resident_delta"),
                      ("dense store for comparison (formula, not allocated)", "dense_bytes")):
        print(f"| {name} | {imagenet[key]:,.0f} | {imagenet[key] / 1e9:.3f} |")
    fits = imagenet["state_bytes"] <= DEFAULT_MEMORY_BUDGET_BYTES
    print(f"\nwithin the 1 GB budget: {'yes' if fits else 'NO'}; allocation {imagenet['allocate_s']:.1f} s, "
          f"one epoch-end diagnostics pass {imagenet['diagnostics_s']:.1f} s")


if __name__ == "__main__":
    main()
