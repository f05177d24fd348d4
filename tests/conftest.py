"""Shared, seeded fixtures for the test suite."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

# --------------------------------------------------------------------------- report: synthetic run folders

HOSTILE_CLASS = "<img src=x onerror=alert(1)>"
QUOTES_CLASS = "\"&'<>"
REPORT_CLASSES = ["cat", "dog", HOSTILE_CLASS, QUOTES_CLASS, "bird"]
SCRIPT_SOURCE = "dog/<script>alert(2)</script>.png"


def _thumbnail_png(index: int, size: int = 32) -> bytes:
    """A small, distinct RGB PNG (a coloured gradient with a diagonal stripe)."""
    from PIL import Image

    rng = np.random.default_rng(index)
    base = rng.integers(40, 215, size=3)
    ramp = np.linspace(-40, 40, size)
    pixels = np.clip(base[None, None, :] + ramp[:, None, None] + ramp[None, :, None] * 0.5, 0, 255)
    pixels = pixels.astype(np.uint8)
    for offset in range(-2, 3):
        diagonal = np.arange(max(0, -offset), min(size, size - offset))
        pixels[diagonal, diagonal + offset] = 255 - base
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def build_run_folder(
    folder: Path,
    *,
    task: str = "classification",
    kind: str = "images",
    num_examples: int = 400,
    gallery_size: int = 24,
    num_set_aside: int = 3,
    class_names: list[str] | None = None,
    with_multipliers: bool = True,
    demo: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a synthetic run folder with the report writers; returns its frames/summary.

    Classification: about 6% of examples are flagged (2/3 of them mislabeled). One
    gallery source contains ``<script>``; class names include markup.
    """
    from minnorm_audit.report import (
        EXAMPLES_DESCRIPTIONS,
        GALLERY_DESCRIPTIONS,
        SET_ASIDE_DESCRIPTIONS,
        write_json_atomic,
        write_parquet_atomic,
    )

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    regression = task == "regression"
    classes = list(class_names or ([] if regression else REPORT_CLASSES))
    count = num_examples

    fitted = rng.random(count) < 0.7
    difficulty = np.where(fitted, 0.0, rng.lognormal(mean=-1.0, sigma=1.2, size=count))
    flagged_positions = np.argsort(-difficulty, kind="stable")[: max(1, int(round(0.06 * count)))]
    threshold = float(difficulty[flagged_positions].min())
    concentration = rng.uniform(0.2, 1.0, size=count)
    flag = np.full(count, "ok", dtype=object)
    is_flagged = (difficulty >= threshold) & (difficulty > 0)
    if regression:
        flag[is_flagged] = "hard"
    else:
        flag[is_flagged & (concentration >= 0.5)] = "mislabeled"
        flag[is_flagged & (concentration < 0.5)] = "hard"
    ranks = pd.Series(difficulty).rank(method="average").to_numpy()
    percentile = 100.0 * (ranks - 1) / max(count - 1, 1)
    example_id = np.arange(count, dtype=np.int64)

    if kind == "table":
        source = np.array([str(index) for index in range(count)], dtype=object)
    else:
        source = np.empty(count, dtype=object)
    columns: dict[str, Any] = {"example_id": example_id}
    if regression:
        given_target = rng.normal(size=count)
        columns.update(
            source=source,
            given_target=given_target,
            predicted_target=given_target + np.where(is_flagged, rng.normal(0, 2, count), rng.normal(0, 0.05, count)),
        )
    else:
        given_index = rng.integers(0, len(classes), size=count)
        competing_index = (given_index + rng.integers(1, len(classes), size=count)) % len(classes)
        given = np.array(classes, dtype=object)[given_index]
        competing = np.array(classes, dtype=object)[competing_index]
        suggested = np.where(flag == "mislabeled", competing, given)
        columns.update(
            source=source,
            given_label=given,
            suggested_label=suggested,
            competing_label=competing,
        )
    if kind != "table":
        folders = columns["given_label"] if not regression else ["images"] * count
        source[:] = [f"{folder_name}/img_{index:06d}.png" for index, folder_name in enumerate(folders)]
    columns.update(
        difficulty=difficulty,
        difficulty_percentile=percentile,
        flag=flag,
    )
    if not regression:
        columns["label_concentration"] = np.where(difficulty > 0, concentration, 0.0)
        columns["margin"] = rng.normal(1.0, 0.5, size=count)
        if with_multipliers:
            mass = rng.random((count, len(classes))).astype(np.float32) * difficulty[:, None].astype(np.float32)
            columns["class_multipliers"] = list(mass)
    examples = pd.DataFrame(columns)

    gallery_rows = examples.loc[examples["flag"] != "ok"].sort_values("difficulty", ascending=False).head(gallery_size)
    gallery = gallery_rows[[c for c in GALLERY_DESCRIPTIONS if c in gallery_rows]].copy().reset_index(drop=True)
    if kind != "table" and len(gallery):
        gallery.loc[0, "source"] = SCRIPT_SOURCE
        examples.loc[examples["example_id"] == gallery.loc[0, "example_id"], "source"] = SCRIPT_SOURCE
    if kind == "table":
        gallery["thumbnail_png"] = pd.Series([None] * len(gallery), dtype=object)
        gallery["feature_values"] = [
            json.dumps({f"feature_{j}": float(np.round(rng.normal(), 4)) for j in range(6)} | {"<b>x</b>": 1.5})
            for _ in range(len(gallery))
        ]
    else:
        gallery["thumbnail_png"] = [_thumbnail_png(int(i)) for i in gallery["example_id"]]
        gallery["feature_values"] = pd.Series([None] * len(gallery), dtype=object)

    set_aside = pd.DataFrame(
        {
            "source": [f"broken/file_{index:04d}.jpg" for index in range(num_set_aside)],
            "reason": [("truncated image file" if index % 3 else "cannot identify image file") for index in range(num_set_aside)],
        }
    )

    counts = {name: int((flag == name).sum()) for name in ("mislabeled", "hard", "ok")}
    per_class = []
    if not regression:
        for name in classes:
            mask = examples["given_label"] == name
            per_class.append(
                {
                    "class": name,
                    "count": int(mask.sum()),
                    "mislabeled": int((mask & (examples["flag"] == "mislabeled")).sum()),
                    "hard": int((mask & (examples["flag"] == "hard")).sum()),
                }
            )
    diagnostics = {
        "max_violation": 0.012,
        "fraction_fitted": 0.996,
        "multiplier_change": 0.004,
        "rank_stability": 0.991,
        "norm": 153.2,
        "epochs": 12,
        "scored_epoch": 11,
        "stopping_rule": "rank_stability >= 0.99 for 2 evaluations",
    }
    history = [
        {
            "epoch": epoch,
            "max_violation": 2.0 * 0.6**epoch,
            "fraction_fitted": 1 - 0.5 * 0.6**epoch,
            "multiplier_change": 0.9**epoch if epoch else float("nan"),
            "rank_stability": 1 - 0.4 * 0.7**epoch,
            "norm": 100 + 5 * epoch,
        }
        for epoch in range(1, 13)
    ]
    summary: dict[str, Any] = {
        "tool": "minnorm-audit",
        "version": "0.1.0",
        "data": "/data/<script>pets</script>",
        "kind": kind,
        "task": task,
        "num_examples": count,
        "num_set_aside": num_set_aside,
        "class_names": classes,
        "counts": counts,
        "per_class": per_class,
        "flag_rule": {
            "difficulty_threshold": threshold,
            "difficulty_threshold_method": "Otsu split of log(1 + difficulty)",
            "concentration_threshold": 0.5,
            "rule": "flagged when difficulty >= difficulty_threshold and difficulty > 0; "
            "mislabeled when label_concentration >= concentration_threshold, else hard",
        },
        "diagnostics": diagnostics,
        "history": history,
        "timings": {"load_s": 1.25, "train_s": 40.5, "total_s": 42.0},
        "config": {
            "model": "cnn",
            "epochs": 12,
            "batch_size": 256,
            "lr": 0.05,
            "dual_lr": 0.1,
            "damping": 0.5,
            "seed": seed,
            "device": "cpu",
            "image_size": 32,
        },
    }
    if demo and not regression:
        summary["demo"] = {"noise_rate": 0.05, "num_flipped": 20, "precision": 0.85, "recall": 0.8}
    metadata = {
        "config": summary["config"],
        "versions": {"minnorm_audit": "0.1.0", "torch": "2.x"},
        "seed": seed,
        "dataset_fingerprint": "sha256:0123abcd",
        "diagnostics": diagnostics,
        "class_names": classes,
        "kind": kind,
        "task": task,
    }
    write_parquet_atomic(folder / "examples.parquet", examples, descriptions=EXAMPLES_DESCRIPTIONS, metadata=metadata)
    write_parquet_atomic(folder / "set_aside.parquet", set_aside, descriptions=SET_ASIDE_DESCRIPTIONS, metadata=metadata)
    write_parquet_atomic(folder / "gallery.parquet", gallery, descriptions=GALLERY_DESCRIPTIONS, metadata=metadata)
    write_json_atomic(folder / "summary.json", summary)
    return {"examples": examples, "gallery": gallery, "set_aside": set_aside, "summary": summary, "metadata": metadata}


@pytest.fixture(scope="session")
def make_run_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """Factory: ``make_run_folder(name="run", **options)`` -> (folder, contents).

    Writes a synthetic run folder (see :func:`build_run_folder`) in a fresh temporary
    folder on every call; session-scoped so module-scoped fixtures can use it too.
    """

    def make(name: str = "run", **options: Any) -> tuple[Path, dict[str, Any]]:
        folder = tmp_path_factory.mktemp("runs") / name
        return folder, build_run_folder(folder, **options)

    return make
