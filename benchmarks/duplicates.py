"""Duplicates benchmark: exact and near copies, conflicting copies and leaks, injected
into the bundled digits and a generated image set; and the blocked search's time.

Prints markdown tables (command, machine and versions at the top); asserts nothing.

    python benchmarks/duplicates.py                      # digits + generated, seed 0 (minutes)
    python benchmarks/duplicates.py --part search        # 100,000 x 512 blocked search timing only
    python benchmarks/duplicates.py --part copies --dataset digits --epochs 10

Copies: ``--copies`` (default 8%) of the examples get one copy each, the kinds in turn:
``exact`` (the same pixels), ``jpeg`` (re-encoded at quality 75), ``crop`` (a random 90%
crop resized back) and ``shift`` (moved by 1 pixel, edge replicated). Every other copy
carries a wrong label (a random other class): a conflicting copy, whose right answer
is the copy flagged mislabeled with the original's label as suggestion. Splits: 20% of
the examples are in ``test``, the rest in ``train``; each copy lands in either at
random, so about half of the copies are leaks. The audit is the product's (in-memory
arrays, default budget, the split per example as a split root gives it).

Measured per kind: the recall of the copy pairs (both in one group) and the share of
the other examples put in a group (false duplicates); beside it cleanlab Datalab's rule
(nearest-neighbour distance < 0.13 x the median) on the same features. Then the
features compared (pooled pixels vs the network's penultimate features): the pair
distances over the median nearest-neighbour distance of each kind (95th percentile)
against the clean examples' (1st percentile), which is what the radius fraction must
sit between. Then the conflicting-copy verdicts and the leaks. Timings are wall clock
on a machine shared with other jobs (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minnorm_audit  # noqa: E402
from minnorm_audit.audit import score, train, training_targets, with_epoch_budget  # noqa: E402
from minnorm_audit.data import load_arrays, load_bundled_digits  # noqa: E402
from minnorm_audit.duplicates import calibrated_radius, nearest_distances, pairs_within  # noqa: E402
from minnorm_audit.options import AuditOptions  # noqa: E402
from minnorm_audit.score_duplicates import NEAR_FRACTION, find_duplicates  # noqa: E402
from minnorm_audit.training import TrainConfig  # noqa: E402

KINDS = ("exact", "jpeg", "crop", "shift")
DATALAB_FRACTION = 0.13


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as 32 x 32 RGB uint8 (upsampled, bilinear), and labels."""
    images, labels = load_bundled_digits()
    big = np.stack([np.asarray(Image.fromarray((image * 15).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
                    for image in images])
    return np.repeat(big[..., None], 3, axis=3), labels


def generated_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 32 x 32 RGB images of 10 classes: a smooth random background and a
    class shape (square or disk, one of 5 colours) at a random place and size."""
    colours = np.array([[230, 40, 40], [40, 200, 40], [40, 60, 230], [230, 200, 40], [200, 40, 200]])
    labels = rng.integers(0, 10, count)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        low = rng.integers(40, 200, (4, 4, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(low).resize((32, 32), Image.BICUBIC)).astype(np.float64)
        size = rng.uniform(5, 11)
        cy, cx = rng.uniform(size, 32 - size, 2)
        mask = (np.abs(yy - cy) < size) & (np.abs(xx - cx) < size) if label < 5 else (
            (yy - cy) ** 2 + (xx - cx) ** 2 < size ** 2)
        image[mask] = colours[label % 5]
        image += rng.normal(0, 6, image.shape)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images, labels


def near_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One copy of ``image`` (H, W, 3 uint8) of ``kind``."""
    if kind == "exact":
        return image.copy()
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=75)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    if kind == "crop":
        side = int(round(0.9 * image.shape[0]))
        top, left = rng.integers(0, image.shape[0] - side + 1, 2)
        crop = Image.fromarray(image[top:top + side, left:left + side])
        return np.asarray(crop.resize(image.shape[:2][::-1], Image.BILINEAR))
    dy, dx = [(0, 1), (1, 0), (0, -1), (-1, 0)][rng.integers(0, 4)]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return padded[1 - dy:1 - dy + image.shape[0], 1 - dx:1 - dx + image.shape[1]]


def inject(images: np.ndarray, labels: np.ndarray, share: float, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """The data with copies appended: (images, labels, splits, truth) where truth lists
    (original, copy, kind, conflicting, true label) per copy."""
    count = len(labels)
    splits = np.where(rng.random(count) < 0.2, "test", "train").astype(object)
    originals = rng.choice(count, int(round(share * count)), replace=False)
    extra_images, extra_labels, extra_splits, truth = [], [], [], []
    for n, original in enumerate(originals.tolist()):
        kind = KINDS[n % len(KINDS)]
        conflicting = (n // len(KINDS)) % 2 == 1
        label = labels[original]
        if conflicting:
            label = rng.choice([c for c in np.unique(labels) if c != labels[original]])
        extra_images.append(near_copy(images[original], kind, rng))
        extra_labels.append(label)
        extra_splits.append("test" if rng.random() < 0.5 else "train")
        truth.append((original, count + n, kind, conflicting, int(labels[original])))
    return (np.concatenate([images, np.stack(extra_images)]), np.concatenate([labels, extra_labels]),
            np.concatenate([splits, np.array(extra_splits, dtype=object)]), truth)


def audit_copies(name: str, images: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    images, labels, splits, truth = inject(images, labels, args.copies, rng)
    loaded = load_arrays(images, labels, image_size=32)
    loaded.splits = list(splits)
    settings = AuditOptions(train=TrainConfig(seed=args.seed, device="cpu", epochs=args.epochs))
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        settings = with_epoch_budget(settings, loaded)
        targets = training_targets(loaded)
        cached = Path(args.cache) / f"{name}-{args.seed}-{settings.train.epochs}.pt" if args.cache else None
        if cached is not None and cached.is_file():
            fit = torch.load(cached, weights_only=False)
        else:
            fit = train(loaded, settings, targets, Path(run_dir), resume=False, progress=False)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(fit, cached)
        examples, rule = score(fit, loaded, settings, targets)
        audit_seconds = time.perf_counter() - started
    record = rule["duplicates"]
    count = len(labels)
    group = examples["duplicate_group"].to_numpy(dtype=float, na_value=np.nan)
    in_copies = np.zeros(count, dtype=bool)
    for original, copy, *_ in truth:
        in_copies[[original, copy]] = True
    print(f"\n## {name}: {count} images ({len(truth)} copies injected), audit {audit_seconds:.1f} s "
          f"(duplicate pass {record['seconds']:.2f} s = {record['seconds'] / count * 1e4:.2f} s per 10,000 examples), "
          f"features {record['features']}\n")

    # Datalab's rule on the same features.
    from minnorm_audit.score_duplicates import duplicate_features

    features, _ = duplicate_features(loaded, None, "pixels")
    nearest = nearest_distances(features, torch.arange(count)).numpy() if features is not None else None
    datalab = nearest < DATALAB_FRACTION * np.median(nearest) if nearest is not None else None
    print("| kind | copies | recall (ours) | Datalab rule on pooled pixels (copy and original flagged) |")
    print("|---|---|---|---|")
    for kind in KINDS:
        rows = [t for t in truth if t[2] == kind]
        found = sum(1 for o, c, *_ in rows if not np.isnan(group[o]) and group[o] == group[c])
        dl = sum(1 for o, c, *_ in rows if datalab is not None and datalab[c] and datalab[o])
        print(f"| {kind} | {len(rows)} | {found / len(rows):.3f} | {dl / len(rows):.3f} |")
    clean = ~in_copies
    false_group = float((~np.isnan(group[clean])).mean())
    false_datalab = float(datalab[clean].mean()) if datalab is not None else float("nan")
    print(f"| other examples put in a group | {int(clean.sum())} | {false_group:.4f} | {false_datalab:.4f} |")

    # Features compared on the same trained network.
    print("\n| features | radius fraction | recall exact/jpeg/crop/shift | clean in a group | "
          "pair distance / median, p95 per kind | clean nearest / median, p1 | seconds |")
    print("|---|---|---|---|---|---|---|")
    for kind_name in ("pixels", "aligned", "penultimate"):
        started = time.perf_counter()
        found = find_duplicates(loaded, fit, features=kind_name)
        seconds = time.perf_counter() - started
        feats, _ = duplicate_features(loaded, fit, kind_name)
        median = found["record"]["median_nearest_distance"]
        groups = found["groups"]
        recalls, ratios = [], []
        for kind in KINDS:
            rows = [t for t in truth if t[2] == kind]
            recalls.append(np.mean([groups[o] >= 0 and groups[o] == groups[c] for o, c, *_ in rows]))
            ratios.append(np.percentile([float((feats[o] - feats[c]).norm()) / median for o, c, *_ in rows], 95))
        clean_nearest = nearest_distances(feats, torch.from_numpy(np.flatnonzero(clean))).numpy() / median
        print(f"| {kind_name} | {NEAR_FRACTION[kind_name]:g} | {'/'.join(f'{r:.3f}' for r in recalls)} | "
              f"{float((groups[clean] >= 0).mean()):.4f} | {'/'.join(f'{r:.3f}' for r in ratios)} | "
              f"{np.percentile(clean_nearest, 1):.3f} | {seconds:.2f} |")

    # Conflicting copies and leaks.
    flags = examples["flag"].to_numpy(dtype=object)
    suggested = examples["suggested_label"].to_numpy(dtype=object)
    names = loaded.class_names
    conflicting = [t for t in truth if t[3]]
    right = sum(1 for o, c, kind, _, true in conflicting if flags[c] == "mislabeled" and suggested[c] == names[true])
    unsettled = sum(1 for o, c, *_ in conflicting if flags[c] == "conflicting")
    verdicts = examples["duplicate_verdict"].fillna("").to_numpy(dtype=object)
    wrong_original = sum(1 for o, c, *_ in conflicting if verdicts[o] == "mislabeled")
    grouped = [t for t in conflicting if not np.isnan(group[t[0]]) and group[t[0]] == group[t[1]]]
    right_grouped = sum(1 for o, c, kind, _, true in grouped
                        if flags[c] == "mislabeled" and suggested[c] == names[true])
    print(f"\nconflicting copies: {len(conflicting)}; wrong copy flagged mislabeled with the right suggestion "
          f"{right / len(conflicting):.3f} (among the {len(grouped)} grouped with their original: "
          f"{right_grouped / max(len(grouped), 1):.3f}); left conflicting {unsettled / len(conflicting):.3f}; "
          f"original flagged instead {wrong_original / len(conflicting):.3f}")
    leak = examples["leak"].to_numpy(dtype=bool)
    true_leaks = [(o, c) for o, c, *_ in truth if splits[o] != splits[c]]
    found_leaks = sum(1 for o, c in true_leaks if leak[o] and leak[c] and group[o] == group[c])
    leak_truth = np.zeros(count, dtype=bool)
    for o, c in true_leaks:
        leak_truth[[o, c]] = True
    print(f"leaks: {len(true_leaks)} cross-split copies; listed {found_leaks / max(len(true_leaks), 1):.3f}; "
          f"examples marked leak without an injected cross-split copy: {int((leak & ~leak_truth).sum())}; "
          f"summary {record['leaks']}")


def search_timing(args: argparse.Namespace) -> None:
    """100,000 x 512 features (clustered: 32-dim structure + noise) with 1,000 near copies."""
    generator = torch.Generator().manual_seed(args.seed)
    count, width = args.search_rows, 512
    features = torch.randn(count, 32, generator=generator) @ torch.randn(32, width, generator=generator)
    features += 0.5 * torch.randn(count, width, generator=generator)
    features[:1000] = features[count - 1000:] + 0.02 * torch.randn(1000, width, generator=generator)
    cpu_started = time.process_time()
    started = time.perf_counter()
    radius, median = calibrated_radius(features, 0.2)
    calibrated = time.perf_counter() - started
    pairs = pairs_within(features, radius)
    total = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    planted = set(zip(range(1000), range(count - 1000, count)))
    found = set(zip(pairs.first.tolist(), pairs.second.tolist()))
    print(f"\n## blocked search: {count:,} x {width} float32, {torch.get_num_threads()} torch threads\n")
    print("| step | wall s | process CPU s |")
    print("|---|---|---|")
    print(f"| radius (median nearest-neighbour distance, 1,024 queries) | {calibrated:.1f} | |")
    print(f"| radius search (bf16 screen + float32 check) | {total - calibrated:.1f} | |")
    print(f"| total | {total:.1f} | {cpu:.1f} |")
    print(f"\npairs found {len(found)}, planted copies found {len(planted & found)} of 1,000; "
          f"radius {radius:.3f} (median {median:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("copies", "search", "all"), default="all")
    parser.add_argument("--dataset", choices=("digits", "generated", "both"), default="both")
    parser.add_argument("--copies", type=float, default=0.08)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--generated-count", type=int, default=3000)
    parser.add_argument("--search-rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="keep each trained state here (a changed pass re-measured in seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: python benchmarks/duplicates.py {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; {args.threads} torch "
          f"threads; shared with other jobs (load average {os.getloadavg()[0]:.1f})")
    print(f"versions: minnorm_audit {minnorm_audit.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}")
    if args.part in ("copies", "all"):
        rng = np.random.default_rng(args.seed)
        if args.dataset in ("digits", "both"):
            audit_copies("digits", *digits_images(), args)
        if args.dataset in ("generated", "both"):
            audit_copies("generated", *generated_images(args.generated_count, rng), args)
    if args.part in ("search", "all"):
        search_timing(args)


if __name__ == "__main__":
    main()
