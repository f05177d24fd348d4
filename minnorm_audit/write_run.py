"""Writing one audit's run folder, the "write" step of the data path.

From the loaded data, the training run and the scored examples this builds what the
folder holds (the Parquet schema metadata, summary.json, the set-aside and gallery
tables) and writes it with report/'s atomic writers; report.html is then rendered
from the written files alone.

Why here and not in report/: building these needs the in-memory run (the decoded
inputs for the gallery's thumbnails, the FitResult's history and placement, the
AuditOptions), while report/ reads and renders only what a run folder holds, so that
``minnorm-audit report RUN`` re-renders any folder without the data or a model, and
report/ imports nothing from data/ or training/.
"""

from __future__ import annotations

import io
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from .calibration import MIN_BALANCED_ACCURACY_GAIN, MIN_TRAINING_ACCURACY
from .data import LoadedDataset
from .report.parquet import (
    EXAMPLES_DESCRIPTIONS,
    GALLERY_DESCRIPTIONS,
    SET_ASIDE_DESCRIPTIONS,
    write_json_atomic,
    write_parquet_atomic,
)
from .scoring import FLAGS
from .training import FitResult

if TYPE_CHECKING:
    from .options import AuditOptions

STOPPING_RULE = (
    "fixed budget of {epochs} epochs (dual time dual_lr x epochs = {dual_time:g}){cap}; "
    "scores read from {state}"
)
SCORED_STATE_TEXT = {
    "violation": "the mean margin violation per competing class over those epochs (the dual ascent before projection)",
    "average": "the mean of the multipliers over those epochs",
    "final": "the multipliers after the last epoch",
}
# A class is "not learned" when fewer than this share of its examples are predicted as
# their given label at the end of training (its training recall). Why this line: every
# flag threshold is measured from the class's own examples (its median difficulty and
# spread); below half, the class's median example is one the network got wrong, so a
# wrong label has nothing to stand out from and the class's flags say nothing either
# way (a real 6-class table: all 17 examples of a class unfitted, all flagged ok).
# The run as a whole is inconclusive below the same share (calibration's
# MIN_TRAINING_ACCURACY); this names the classes a conclusive run still failed on.
NOT_LEARNED_RECALL = 0.5
# An example is "fitted" within this much of its margin (Minnorm's fitted_tolerance).
FITTED_TOLERANCE = 1e-3


@dataclass
class RunRecord:
    """Everything written beside the examples table."""

    metadata: dict[str, Any]  # every Parquet file's schema metadata
    summary: dict[str, Any]  # summary.json
    set_aside: pd.DataFrame  # set_aside.parquet


def describe_run(
    examples: pd.DataFrame,
    flag_rule: dict[str, Any],
    result: FitResult,
    loaded: LoadedDataset,
    settings: AuditOptions,
    *,
    timings: dict[str, float],
    demo: dict[str, Any] | None = None,
    compute: dict[str, Any] | None = None,
) -> RunRecord:
    """The run's metadata, summary and set-aside table."""
    # The verdict on the run travels beside the flag rule, not inside it.
    flag_rule = dict(flag_rule)
    inconclusive = flag_rule.pop("inconclusive", None)
    duplicates = flag_rule.pop("duplicates", None)  # score_duplicates.duplicates_pass's record
    diagnostics = run_diagnostics(result, settings)
    # How well the network fits the given labels at the end: shown with the diagnostics.
    diagnostics.update(training_fit(examples, loaded.task))
    config = run_config(result, loaded, settings)
    # The CPU threads used and where the count came from, denormal flushing
    # (training/threads.py); absent when the caller did not say.
    config.update(compute or {})
    versions = package_versions()
    metadata = {
        "config": config,
        "versions": versions,
        "seed": settings.train.seed,
        "dataset_fingerprint": loaded.fingerprint,
        "diagnostics": diagnostics,
        "class_names": loaded.class_names,
        "kind": loaded.kind,
        "task": loaded.task,
        "data": data_description(loaded),
        "input": describe_input(loaded, settings),
        "flag_rule": flag_rule,
        "inconclusive": inconclusive,
    }
    summary = build_summary(examples, loaded, flag_rule, diagnostics, result, config, versions,
                            timings=timings, demo=demo, inconclusive=inconclusive)
    if duplicates is not None:
        summary["duplicates"] = duplicates
    if "split" in examples.columns:
        summary["splits"] = split_counts(examples)
    return RunRecord(metadata=metadata, summary=summary, set_aside=set_aside_frame(loaded))


def write_run_folder(
    run_dir: Path, examples: pd.DataFrame, record: RunRecord, loaded: LoadedDataset, gallery_size: int,
    *, render: bool = True,
) -> None:
    """Write examples, set_aside and gallery Parquet files and summary.json, then
    render report.html from them (rank 0 alone calls this; ``render=False`` leaves the
    page to the caller)."""
    metadata = record.metadata
    write_parquet_atomic(run_dir / "examples.parquet", examples, descriptions=EXAMPLES_DESCRIPTIONS, metadata=metadata)
    write_parquet_atomic(run_dir / "set_aside.parquet", record.set_aside, descriptions=SET_ASIDE_DESCRIPTIONS,
                         metadata=metadata)
    gallery = build_gallery(examples, loaded, gallery_size)
    write_parquet_atomic(run_dir / "gallery.parquet", gallery, descriptions=GALLERY_DESCRIPTIONS, metadata=metadata)
    write_json_atomic(run_dir / "summary.json", record.summary)
    if render:
        from .report.html import render_report

        render_report(run_dir)


def run_diagnostics(result: FitResult, settings: AuditOptions) -> dict[str, Any]:
    """The last epoch's diagnostics, with the stopping rule and the statistic scored."""
    diagnostics = dict(result.history[-1]) if result.history else {}
    diagnostics.update(
        epochs=result.epochs_run,
        scored_epoch=result.epochs_run,
        stopping_rule=STOPPING_RULE.format(
            epochs=settings.train.epochs,
            dual_time=settings.train.dual_lr * settings.train.epochs,
            cap=(
                f", multipliers boxed to [0, C] in the dual and the weight step, C = {settings.train.multiplier_cap:g} x "
                "the 90th percentile of the examples' largest multipliers after each epoch (in practice set "
                "after the first epoch and unchanged; diagnostics max_multiplier and fraction_at_cap)"
                if settings.train.multiplier_cap is not None else ", no multiplier cap"
            ),
            state=SCORED_STATE_TEXT[settings.train.score_state],
        ),
        score_statistic=settings.statistic,
    )
    return diagnostics


def training_fit(examples: pd.DataFrame, task: str) -> dict[str, float | None]:
    """How well the trained network fits the labels it was given, at the end of training.

    Classification: ``train_accuracy``, the share of examples whose predicted class (the
    largest output) is the given label, i.e. whose ``margin`` is above 0. Regression:
    ``train_r2``, the coefficient of determination of ``predicted_target`` against
    ``given_target`` (None when the targets do not vary).
    """
    if task == "regression":
        given = examples["given_target"].to_numpy(dtype=np.float64)
        predicted = examples["predicted_target"].to_numpy(dtype=np.float64)
        spread = float(((given - given.mean()) ** 2).sum()) if len(given) else 0.0
        r2 = 1.0 - float(((given - predicted) ** 2).sum()) / spread if spread > 0 else None
        return {"train_r2": r2}
    margins = examples["margin"].to_numpy(dtype=np.float64)
    if not len(margins):
        return {"train_accuracy": None, "balanced_accuracy": None}
    recall = (margins > 0).astype(np.float64)
    per_class = pd.Series(recall).groupby(examples["given_label"].astype(str).to_numpy()).mean()
    return {"train_accuracy": float(recall.mean()), "balanced_accuracy": float(per_class.mean())}


def inconclusive_thresholds(class_count: int) -> dict[str, float]:
    """The lines below which the audit is inconclusive (calibration.training_verdict):
    training accuracy, and balanced accuracy (halfway from chance, 1 / classes, to 1)."""
    chance = 1.0 / max(class_count, 1)
    return {"train_accuracy": MIN_TRAINING_ACCURACY,
            "balanced_accuracy": chance + MIN_BALANCED_ACCURACY_GAIN * (1.0 - chance)}


def class_fit(examples: pd.DataFrame, class_names: list[str], margin: float) -> list[dict[str, Any]]:
    """Per class (given label), how the trained network fits it and what was flagged.

    Each row: ``class``, ``count``, the count per flag (``mislabeled``, ``hard``,
    ``outlier``, ``ok``), ``training_recall`` (share of the class's examples predicted
    as their given label at the end: ``margin > 0``; None for an empty class),
    ``fraction_fitted`` (share at the training margin at the end, ``margin >= margin
    setting - 1e-3``: the per-class, end-of-training twin of the diagnostics'
    ``fraction_fitted``; under the norm term many examples end just short of it), ``predicted_as`` (the class its
    examples are most often predicted as when not their own, or None) and
    ``not_learned`` (training recall below :data:`NOT_LEARNED_RECALL`).
    """
    given = examples["given_label"].astype(str).to_numpy()
    flags = examples["flag"].astype(str).to_numpy()
    margins = examples["margin"].to_numpy(dtype=np.float64)
    predicted = (examples["predicted_label"].astype(object).to_numpy() if "predicted_label" in examples
                 else np.full(len(examples), None, dtype=object))
    rows = []
    for name in class_names:
        mask = given == name
        count = int(mask.sum())
        recall = float((margins[mask] > 0).mean()) if count else None
        others = pd.Series(predicted[mask & ~(margins > 0)]).dropna().astype(str)
        others = others[others != name]
        rows.append({
            "class": name,
            "count": count,
            **{flag: int((flags[mask] == flag).sum()) for flag in FLAGS},
            "training_recall": recall,
            "fraction_fitted": float((margins[mask] >= margin - FITTED_TOLERANCE).mean()) if count else None,
            "predicted_as": str(others.value_counts().index[0]) if len(others) else None,
            "not_learned": recall is not None and recall < NOT_LEARNED_RECALL,
        })
    return rows


def not_learned_findings(per_class: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The classes the network did not learn (``not_learned`` rows of
    :func:`class_fit`) as findings: ``class``, ``count``, ``training_recall``,
    ``predicted_as`` and ``finding``, one sentence."""
    findings = []
    for row in per_class:
        if not row.get("not_learned"):
            continue
        instead = f", mostly predicted as {row['predicted_as']}" if row.get("predicted_as") else ""
        findings.append({
            "class": row["class"], "count": row["count"], "training_recall": row["training_recall"],
            "predicted_as": row.get("predicted_as"),
            "finding": (f"class {row['class']} not learned: its {row['count']} examples are not judged "
                        f"(only {row['training_recall']:.0%} predicted as {row['class']} at the end of training"
                        f"{instead}; below {NOT_LEARNED_RECALL:.0%}, a wrong label in it cannot stand out, so "
                        "'ok' there is no clean bill)"),
        })
    return findings


def run_config(result: FitResult, loaded: LoadedDataset, settings: AuditOptions) -> dict[str, Any]:
    """The settings of the run, with where it actually ran."""
    return {
        **settings.train.to_dict(),
        "model": settings.model,
        "format": settings.format,
        "task": loaded.task,
        "image_size": loaded.image_size,
        "statistic": settings.statistic,
        "device": result.device,
        "requested_device": settings.train.device,
        "data_placement": result.data_placement,
        "world_size": result.world_size,
        # The gallery's page size (report --gallery-size changes it), and the cores that
        # cap the workers (audit.with_usable_workers).
        "gallery_size": settings.gallery_size,
        "cpu_cores": os.cpu_count() or 1,
    }


def package_versions() -> dict[str, str]:
    return {
        "minnorm_audit": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "python": platform.python_version(),
    }


def set_aside_frame(loaded: LoadedDataset) -> pd.DataFrame:
    """The items that could not be used, with the reason (``set_aside.parquet``)."""
    return pd.DataFrame(
        {"source": [item.source for item in loaded.set_aside], "reason": [item.reason for item in loaded.set_aside]},
        columns=["source", "reason"],
    ).astype({"source": "string", "reason": "string"})


def describe_input(loaded: LoadedDataset, settings: AuditOptions) -> dict[str, Any]:
    """Where the audited examples came from, for ``clean`` to find them again.

    ``layout`` is ``images`` (image folder), ``manifest``, ``table``, or for data
    given in memory ``dataframe``, ``arrays`` or ``dataset``; ``paths_relative_to``
    is the folder that image ``source`` paths are relative to.
    """
    if loaded.root is None:
        return {"layout": loaded.origin, "kind": loaded.kind}
    layout = "images" if loaded.root.is_dir() else ("manifest" if loaded.kind == "images" else "table")
    described: dict[str, Any] = {"layout": layout, "kind": loaded.kind, "path": str(loaded.root)}
    if layout == "images":
        described["paths_relative_to"] = str(loaded.root)
    elif layout == "manifest":
        base = Path(settings.data_root).expanduser().resolve() if settings.data_root is not None else loaded.root.parent
        described.update(paths_relative_to=str(base), path_column=settings.path_column)
    if layout in ("manifest", "table"):
        described["label_column"] = settings.label_column
    if layout == "table":
        described["feature_columns"] = list(loaded.feature_names)
        # As given (for `clean`'s re-audit command): the features as named, the columns left out.
        described["feature_columns_option"] = None if settings.feature_columns is None else list(settings.feature_columns)
        described["ignore_columns"] = None if settings.ignore_columns is None else list(settings.ignore_columns)
    return described


def data_description(loaded: LoadedDataset) -> str:
    """The data as summary.json and the page name it: its path, or what was given in memory."""
    return str(loaded.root) if loaded.root is not None else f"in-memory {loaded.origin}"


def build_summary(
    examples: pd.DataFrame,
    loaded: LoadedDataset,
    flag_rule: dict[str, Any],
    diagnostics: dict[str, Any],
    result: FitResult,
    config: dict[str, Any],
    versions: dict[str, str],
    *,
    timings: dict[str, float],
    demo: dict[str, Any] | None,
    inconclusive: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json: counts per flag and class, diagnostics, timings, thresholds, and
    ``inconclusive``: None, or ``{"reason": ...}`` when the network has not learned the
    data (score_run.audit_verdict; the flags are then not to be trusted)."""
    # Every flag, zero counts included.
    counts = {flag: int((examples["flag"] == flag).sum()) for flag in FLAGS}
    classification = loaded.task == "classification"
    per_class = class_fit(examples, loaded.class_names, float(config.get("margin", 1.0))) if classification else []
    fit = {key: diagnostics[key] for key in ("train_accuracy", "balanced_accuracy", "train_r2", "fraction_fitted")
           if key in diagnostics}
    if classification:
        fit["inconclusive_below"] = inconclusive_thresholds(len(loaded.class_names))
        fit["not_learned_below"] = NOT_LEARNED_RECALL
    summary: dict[str, Any] = {
        "tool": "minnorm-audit",
        "version": __version__,
        "data": data_description(loaded),
        "kind": loaded.kind,
        "task": loaded.task,
        "num_examples": int(len(examples)),
        "num_set_aside": len(loaded.set_aside),
        "class_names": loaded.class_names,
        "counts": counts,
        "per_class": per_class,
        "flag_rule": flag_rule,
        "inconclusive": inconclusive,
        "diagnostics": diagnostics,
        "history": result.history,
        # train_accuracy, balanced_accuracy (classification) or train_r2 (regression): see
        # training_fit(); fraction_fitted: share of examples at their margin at their last
        # visit; inconclusive_below: the lines calibration.training_verdict draws.
        "fit": fit,
        # Classes a conclusive run still did not learn (class_fit, NOT_LEARNED_RECALL).
        "not_learned": not_learned_findings(per_class),
        # What the loader decided about the input (a saved index left out, values clipped, ...).
        "notes": list(loaded.notes),
        # Tables and text: how each feature column was encoded (data/encode.py).
        "column_encodings": list(loaded.column_encodings),
        "timings": timings,
        "config": config,
        "versions": versions,
        "dataset_fingerprint": loaded.fingerprint,
    }
    if demo is not None:
        summary["demo"] = demo
    return summary


def split_counts(examples: pd.DataFrame) -> list[dict[str, Any]]:
    """Per split of a split root: examples and counts per flag (summary.json ``splits``)."""
    flags = list(FLAGS) + sorted(set(examples["flag"].dropna().unique()) - set(FLAGS))
    return [{"split": str(split), "count": int(len(rows)),
             **{flag: int((rows["flag"] == flag).sum()) for flag in flags}}
            for split, rows in examples.groupby("split", sort=True, observed=True)]


def build_gallery(examples: pd.DataFrame, loaded: LoadedDataset, size: int) -> pd.DataFrame:
    """The top ``size`` flagged examples with a PNG thumbnail (images) or feature row."""
    # Up to ``size`` mislabeled and hard examples, and up to ``size`` outliers beside
    # them (the page shows outliers in their own section; their difficulty is often
    # lower, so they would not make the top of one shared list).
    ranked = examples[examples["flag"] != "ok"].sort_values("difficulty", ascending=False)
    is_outlier = ranked["flag"] == "outlier"
    flagged = pd.concat([ranked[~is_outlier].head(max(size, 0)), ranked[is_outlier].head(max(size, 0))])
    columns = [c for c in ("example_id", "source", "given_label", "suggested_label", "competing_label",
                           "given_target", "predicted_target", "difficulty", "difficulty_percentile", "flag")
               if c in examples.columns]
    gallery = flagged[columns].reset_index(drop=True)
    thumbnails: list[bytes | None] = []
    features: list[str | None] = []
    for example_id in gallery["example_id"].tolist():
        if loaded.kind == "images":
            thumbnails.append(png_bytes(loaded.inputs[example_id]))
            features.append(None)
        elif loaded.original_values is not None:  # encoded columns and text: the cells as given
            thumbnails.append(None)
            features.append(json.dumps(original_cells(loaded.original_values, example_id)))
        else:
            row = loaded.inputs[example_id].tolist()[:16]
            thumbnails.append(None)
            features.append(json.dumps(dict(zip(loaded.feature_names[:16], (round(v, 6) for v in row)))))
    gallery["thumbnail_png"] = pd.Series(thumbnails, dtype=object)
    gallery["feature_values"] = pd.array(features, dtype="string")
    return gallery


# A text cell in the gallery is cut to this many characters (the page escapes it).
GALLERY_TEXT_CHARS = 300


def original_cells(original: pd.DataFrame, example_id: int) -> dict[str, Any]:
    """The first 16 feature cells of one example as given: numbers as numbers, the
    rest as text cut to GALLERY_TEXT_CHARS characters, missing as None."""
    cells: dict[str, Any] = {}
    for name, value in list(original.iloc[example_id].items())[:16]:
        if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
            cells[str(name)] = None
        elif isinstance(value, (bool, np.bool_)):
            cells[str(name)] = bool(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            cells[str(name)] = value.item() if hasattr(value, "item") else value
        else:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            cells[str(name)] = text if len(text) <= GALLERY_TEXT_CHARS else text[: GALLERY_TEXT_CHARS - 3] + "..."
    return cells


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 ``(3, H, W)`` tensor as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
