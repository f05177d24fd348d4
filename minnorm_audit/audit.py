"""The audit pipeline: loaded data -> Minnorm training -> scored examples -> run folder.

Which multipliers are scored (the crux, measured in benchmarks/label_noise.py):
the **mean of the multipliers over all epochs** ("average" state), read with the
**max over competing classes**, after a fixed budget of ``epochs`` epochs. The final
multipliers are a worse detector: once the flipped labels are memorized, clean hard
examples carry large multipliers too (the prototype's AUROC fell from 0.997 at 15-20
epochs to 0.85 at 200). On digits with 10% symmetric flips (20 epochs, dual_lr 0.01)
the final state gave AUROC 0.95 / AP 0.88 and the average 0.99 / 0.98. The average is
a time integral of the multipliers, i.e. a doubly integrated constraint violation,
which weighs the early epochs where the network still follows the majority.
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from .distributed import is_main_process
from .data import LoadedDataset, load_arrays, load_dataset, load_frame, load_torch_dataset
from .models import build_model
from .report.parquet import (
    EXAMPLES_DESCRIPTIONS,
    GALLERY_DESCRIPTIONS,
    SET_ASIDE_DESCRIPTIONS,
    write_json_atomic,
    write_parquet_atomic,
)
from .scores import (
    difficulty_scores,
    flag_examples,
    label_concentration,
    percentile_ranks,
    suggested_labels,
)
from .streaming import LazyImages, build_streamed_model
from .train import FitResult, TrainConfig, fit, output_margins

CHECKPOINT_FILE = "checkpoint.pt"
# Scoring reads the trained state in blocks of about this many examples x classes
# (32 MB per float64 temporary).
SCORE_BLOCK_ELEMENTS = 1 << 22
# examples.parquet's class_multipliers column (one float per class and example) is
# written up to this many classes: at 1,000 classes and a million examples it alone
# would be 4 GB.
CLASS_MULTIPLIERS_MAX_CLASSES = 100
STOPPING_RULE = (
    "fixed budget of {epochs} epochs (dual time dual_lr x epochs = {dual_time:g}){cap}; "
    "scores read from {state}"
)
SCORED_STATE_TEXT = {
    "violation": "the mean margin violation per competing class over those epochs (the dual ascent before projection)",
    "average": "the mean of the multipliers over those epochs",
    "final": "the multipliers after the last epoch",
}


@dataclass
class AuditOptions:
    """Everything that shapes an audit besides the data path (defaults = the CLI's)."""

    format: str = "auto"
    label_column: str = "label"
    path_column: str = "path"
    task: str = "classification"
    image_size: int = 32
    model: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    statistic: str = "max"
    flag_fraction: float | None = None
    threshold: float | None = None
    concentration_threshold: float = 0.1
    # Used with score_state "violation" (the default) instead of concentration_threshold.
    preference_threshold: float = 0.0
    gallery_size: int = 60
    feature_columns: list[str] | None = None
    data_root: str | Path | None = None


@dataclass
class AuditResult:
    """What an audit produced: the examples table, the summary and where they are.

    Attributes
    ----------
    examples : DataFrame
        The rows of ``examples.parquet``: one per audited example (``source``,
        ``given_label``, ``suggested_label``, ``difficulty``, ``flag``, ...).
    summary : dict
        The contents of ``summary.json`` (counts per flag and class, the flag rule,
        diagnostics, timings).
    run_dir : Path
        The run folder holding every output.
    set_aside : DataFrame
        Items that could not be used (``source``, ``reason``).
    """

    examples: pd.DataFrame
    summary: dict[str, Any]
    run_dir: Path
    set_aside: pd.DataFrame

    @property
    def paths(self) -> dict[str, Path]:
        """The run folder's files by name: ``examples``, ``summary``, ``set_aside``,
        ``gallery``, ``report`` and ``checkpoint``."""
        return {
            name: self.run_dir / file
            for name, file in (
                ("examples", "examples.parquet"),
                ("summary", "summary.json"),
                ("set_aside", "set_aside.parquet"),
                ("gallery", "gallery.parquet"),
                ("report", "report.html"),
                ("checkpoint", CHECKPOINT_FILE),
            )
        }


def default_run_dir(data_path: Path, reports_root: Path = Path("reports")) -> Path:
    """``reports/<data-name>-<timestamp>/`` (never inside the data)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = data_path.stem if data_path.is_file() else data_path.name
    return reports_root / f"{name or 'data'}-{stamp}"


def check_run_dir_outside_data(run_dir: Path, data_root: Path | None) -> None:
    """The tool never writes inside DATA (nothing to check for data given in memory)."""
    if data_root is None:
        return
    data_folder = data_root if data_root.is_dir() else data_root.parent
    resolved = run_dir.resolve()
    if data_root.is_dir() and (resolved == data_folder or data_folder in resolved.parents):
        raise ValueError(f"--out {run_dir} lies inside the data folder {data_root}; choose a folder outside it")


def audit(data: Any, out: str | os.PathLike[str] | None = None, **options: Any) -> AuditResult:
    """Audit a labeled dataset and write the run folder (the code path of ``minnorm-audit run``).

    Parameters
    ----------
    data : str, Path, DataFrame, tuple of (array, array) or torch Dataset
        What to audit:

        - a path: an image folder, a manifest or a table (CSV/Parquet), every
          layout ``minnorm-audit run`` accepts;
        - a pandas DataFrame of numeric feature columns and a label column
          (``label_column=``, default ``"label"``);
        - numpy arrays ``(X, y)``: ``X`` of shape ``(N, D)`` (features), or
          ``(N, C, H, W)`` / ``(N, H, W, C)`` (images);
        - a torch ``Dataset`` yielding ``(input, label)`` pairs (tensors, arrays or
          PIL images).

        In-memory data is identified by position: ``source`` is ``"0"``, ``"1"``, ...
    out : str or Path, optional
        Run folder; default ``reports/<name>-<timestamp>/``, where the name is the
        data's file or folder name, or ``dataframe``, ``arrays`` or ``dataset``.
    **options
        Fields of :class:`AuditOptions` (``label_column``, ``task``, ``image_size``,
        ``flag_fraction``, ``threshold``, ``feature_columns``, ``data_root``, ...)
        and of :class:`~minnorm_audit.train.TrainConfig` (``epochs``, ``lr``,
        ``dual_lr``, ``batch_size``, ``seed``, ``device``, ...).

    Returns
    -------
    AuditResult
        The examples table, the summary and the run folder's paths.

    Raises
    ------
    DataError
        The data is unusable as a whole (one line naming the problem).
    TypeError
        An unknown option, or ``data`` of a type not listed above.
    ValueError
        ``out`` lies inside the data folder, or an option is out of range.

    Examples
    --------
    >>> result = minnorm_audit.audit(frame, out="reports/frame", label_column="class", epochs=20)
    >>> suspects = result.examples.query("flag == 'mislabeled'")
    """
    train_fields = set(TrainConfig.__dataclass_fields__)
    train_options = {key: options.pop(key) for key in list(options) if key in train_fields}
    unknown = set(options) - set(AuditOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown audit option(s): {', '.join(sorted(unknown))}")
    settings = AuditOptions(**options, train=TrainConfig(**train_options))
    started = time.perf_counter()
    loaded = load_input(data, settings)
    load_seconds = time.perf_counter() - started
    if out is not None:
        run_dir = Path(out)
    elif loaded.root is None:
        run_dir = Path("reports") / f"{loaded.origin}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    else:
        run_dir = default_run_dir(Path(data))
    return run_audit(loaded, settings, run_dir, load_seconds=load_seconds)


def load_input(data: Any, settings: AuditOptions) -> LoadedDataset:
    """Load ``data`` (a path or an in-memory dataset, see :func:`audit`) with ``settings``."""
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(
            data,
            format=settings.format,
            label_column=settings.label_column,
            path_column=settings.path_column,
            task=settings.task,
            image_size=settings.image_size,
            feature_columns=settings.feature_columns,
            data_root=settings.data_root,
            max_memory_gb=settings.train.max_memory_gb,
        )
    if settings.data_root is not None:
        raise TypeError("data_root applies to a manifest on disk, not to data given in memory")
    if isinstance(data, pd.DataFrame):
        return load_frame(data, label_column=settings.label_column, feature_columns=settings.feature_columns,
                          task=settings.task)
    if isinstance(data, tuple) and len(data) == 2:
        return load_arrays(data[0], data[1], task=settings.task, image_size=settings.image_size)
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return load_torch_dataset(data, task=settings.task, image_size=settings.image_size)
    raise TypeError(
        "data must be a path, a pandas DataFrame, a tuple (X, y) of arrays or a torch Dataset, "
        f"got {type(data).__name__}"
    )


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
    return described


def data_description(loaded: LoadedDataset) -> str:
    """The data as summary.json and the page name it: its path, or what was given in memory."""
    return str(loaded.root) if loaded.root is not None else f"in-memory {loaded.origin}"


def run_audit(
    loaded: LoadedDataset,
    settings: AuditOptions,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = False,
    load_seconds: float = 0.0,
    demo: dict[str, Any] | None = None,
) -> AuditResult:
    """Train, score and write every output of one audit into ``run_dir``.

    Under torchrun every rank trains and scores (the results agree); rank 0 alone
    writes the run folder.
    """
    check_run_dir_outside_data(run_dir, loaded.root)
    if settings.data_root is not None:
        check_run_dir_outside_data(run_dir, Path(settings.data_root).expanduser().resolve())
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    regression = loaded.task == "regression"
    inputs = loaded.inputs
    if regression:
        target_mean = loaded.targets.mean(0)
        target_std = loaded.targets.std(0, unbiased=False).clamp_min(1e-12)
        train_targets = (loaded.targets - target_mean) / target_std
        num_outputs = int(loaded.targets.shape[1])
    else:
        train_targets = loaded.targets
        # Two classes: the binary single-output form of ALGORITHM.md.
        num_outputs = 1 if len(loaded.class_names) == 2 else len(loaded.class_names)
    torch.manual_seed(settings.train.seed)
    if isinstance(inputs, LazyImages):
        model = build_streamed_model(settings.model, inputs, num_outputs, workers=settings.train.workers)
    else:
        model = build_model(settings.model, inputs, num_outputs)
    result = fit(
        model,
        inputs,
        train_targets,
        form="equality" if regression else "margin",
        num_outputs=num_outputs,
        config=settings.train,
        dataset_fingerprint=loaded.fingerprint,
        checkpoint_path=run_dir / CHECKPOINT_FILE,
        resume=resume,
        progress=progress,
    )
    if regression:
        predictions = result.final_outputs * target_std.numpy() + target_mean.numpy()
        examples, flag_rule = score_regression(result, loaded, settings, predictions)
    else:
        examples, flag_rule = score_classification(result, loaded, settings)

    diagnostics = dict(result.history[-1]) if result.history else {}
    diagnostics.update(
        epochs=result.epochs_run,
        scored_epoch=result.epochs_run,
        stopping_rule=STOPPING_RULE.format(
            epochs=settings.train.epochs,
            dual_time=settings.train.dual_lr * settings.train.epochs,
            cap=(
                f", multipliers capped at {settings.train.multiplier_cap:g} x their 90th percentile"
                if settings.train.multiplier_cap is not None else ", no multiplier cap"
            ),
            state=SCORED_STATE_TEXT[settings.train.score_state],
        ),
        score_statistic=settings.statistic,
    )
    config = {
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
    }
    versions = {
        "minnorm_audit": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "python": platform.python_version(),
    }
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
    }
    set_aside = pd.DataFrame(
        {"source": [item.source for item in loaded.set_aside], "reason": [item.reason for item in loaded.set_aside]},
        columns=["source", "reason"],
    ).astype({"source": "string", "reason": "string"})
    total_seconds = load_seconds + (time.perf_counter() - started)
    summary = build_summary(
        examples, loaded, flag_rule, diagnostics, result, config, versions,
        timings={"load_s": load_seconds, "train_s": result.train_seconds, "total_s": total_seconds},
        demo=demo,
    )
    if is_main_process():  # under torchrun, rank 0 alone writes
        write_parquet_atomic(run_dir / "examples.parquet", examples, descriptions=EXAMPLES_DESCRIPTIONS, metadata=metadata)
        write_parquet_atomic(run_dir / "set_aside.parquet", set_aside, descriptions=SET_ASIDE_DESCRIPTIONS, metadata=metadata)
        gallery = build_gallery(examples, loaded, settings.gallery_size)
        write_parquet_atomic(run_dir / "gallery.parquet", gallery, descriptions=GALLERY_DESCRIPTIONS, metadata=metadata)
        write_json_atomic(run_dir / "summary.json", summary)
        from .report.html import render_report

        render_report(run_dir)
    return AuditResult(examples=examples, summary=summary, run_dir=run_dir, set_aside=set_aside)


def score_classification(
    result: FitResult, loaded: LoadedDataset, settings: AuditOptions
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The examples table of a classification audit."""
    labels = loaded.targets.numpy().astype(np.int64)
    class_count = len(loaded.class_names)
    count = len(labels)
    difficulty = np.empty(count, dtype=np.float64)
    concentration = np.empty(count, dtype=np.float64)
    competing = np.empty(count, dtype=np.int64)
    keep_class_multipliers = class_count <= CLASS_MULTIPLIERS_MAX_CLASSES
    class_multipliers: list[np.ndarray] = []
    # A block of rows at a time: an examples x classes table in float64 would not fit
    # in memory for an ImageNet-size audit.
    block_rows = max(1, SCORE_BLOCK_ELEMENTS // max(class_count, 1))
    for start in range(0, count, block_rows):
        stop = min(count, start + block_rows)
        block_labels = labels[start:stop]
        per_class, direction = scored_state(result, block_labels, class_count, settings.train.score_state, start)
        # The total of a violation state is the total positive push (the max skips -inf).
        summed = direction if settings.train.score_state == "violation" and settings.statistic == "sum" else per_class
        difficulty[start:stop] = difficulty_scores(summed, statistic=settings.statistic)  # type: ignore[arg-type]
        concentration[start:stop] = label_concentration(direction)
        competing[start:stop] = suggested_labels(direction, block_labels)
        if keep_class_multipliers:
            final = class_mass(result.state_rows("final", start, stop), block_labels, class_count)
            class_multipliers.extend(final.astype(np.float32))
    margins = result.final_margins
    if margins is None:  # a FitResult built by hand, with the outputs only
        if result.final_outputs is None:
            raise ValueError("the fit result holds neither final_margins nor final_outputs")
        margins = output_margins(torch.from_numpy(result.final_outputs), torch.from_numpy(labels)).numpy()
    if settings.train.score_state == "violation":
        # Difficulty is in logit units here: difficulty - margin is how far, averaged over
        # training, the network preferred the competing class over the given label. The
        # cap keeps flipped examples from being memorized, so a preference > 0 is the
        # network contradicting the label; flagged examples without it are ambiguous.
        preference = difficulty - settings.train.margin
        flags, rule = flag_examples(
            difficulty, preference, flag_fraction=settings.flag_fraction, threshold=settings.threshold,
            concentration_threshold=settings.preference_threshold, log_scale=False,
        )
        rule.pop("concentration_threshold")
        rule["preference_threshold"] = settings.preference_threshold
        rule["rule"] = (
            "flagged when difficulty >= difficulty_threshold and difficulty > 0; mislabeled when "
            "difficulty - margin >= preference_threshold (the network preferred the suggested "
            "class over the given label on average over training), else hard"
        )
    else:
        flags, rule = flag_examples(
            difficulty,
            concentration,
            flag_fraction=settings.flag_fraction,
            threshold=settings.threshold,
            concentration_threshold=settings.concentration_threshold,
        )
    suggested = np.where(flags == "mislabeled", competing, labels)
    names = np.asarray(loaded.class_names, dtype=object)
    examples = pd.DataFrame(
        {
            "example_id": np.arange(len(labels), dtype=np.int64),
            "source": pd.array(loaded.sources, dtype="string"),
            "given_label": pd.array(names[labels], dtype="string"),
            "suggested_label": pd.array(names[suggested], dtype="string"),
            "competing_label": pd.array(names[competing], dtype="string"),
            "difficulty": difficulty,
            "difficulty_percentile": percentile_ranks(difficulty),
            "flag": pd.array(flags, dtype="string"),
            "label_concentration": concentration,
            "margin": margins,
        }
    )
    if keep_class_multipliers:
        examples["class_multipliers"] = class_multipliers
    return examples, rule


def scored_state(
    result: FitResult, labels: np.ndarray, class_count: int, state: str, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class scores ``(n, K)`` and the per-class push ``(n, K)`` that the suggested
    label and ``label_concentration`` are read from (both 0 on the own-label column),
    for the examples ``start : start + len(labels)``.

    ``"violation"``: the mean violation per competing class (train.SCORE_STATES); the
    own-label column is set below every competing one so the max ignores it, and the
    push is its positive part. ``"average"``/``"final"``: multipliers; the push is read
    from the final multipliers, since the average keeps the first epochs, where every
    class pushes on every example, and blurs the direction.
    """
    rows = np.arange(len(labels))
    stop = start + len(labels)
    if state == "violation":
        # Binary single output: class_mass puts its one column on the competing class.
        violations = class_mass(result.state_rows(state, start, stop), labels, class_count)
        violations[rows, labels] = -np.inf
        push = np.clip(violations, 0.0, None)
        push[rows, labels] = 0.0
        return violations, push
    per_class = class_mass(result.state_rows(state, start, stop), labels, class_count)
    return per_class, class_mass(result.state_rows("final", start, stop), labels, class_count)


def score_regression(
    result: FitResult, loaded: LoadedDataset, settings: AuditOptions, predictions: np.ndarray
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The examples table of a regression audit (equality form: ``|mu_i|``)."""
    multipliers = result.scored_multipliers(settings.train.score_state)
    difficulty = difficulty_scores(multipliers, form="equality")
    # Regression has no "other class": a large multiplier only says "hard".
    flags, rule = flag_examples(
        difficulty,
        np.zeros_like(difficulty),
        flag_fraction=settings.flag_fraction,
        threshold=settings.threshold,
        concentration_threshold=1.0,
    )
    rule["rule"] = "flagged hard when difficulty >= difficulty_threshold and difficulty > 0"
    targets = loaded.targets.numpy()
    examples = pd.DataFrame(
        {
            "example_id": np.arange(len(targets), dtype=np.int64),
            "source": pd.array(loaded.sources, dtype="string"),
            "given_target": targets[:, 0].astype(np.float64),
            "predicted_target": predictions[:, 0].astype(np.float64),
            "difficulty": difficulty,
            "difficulty_percentile": percentile_ranks(difficulty),
            "flag": pd.array(flags, dtype="string"),
        }
    )
    return examples, rule


def class_mass(multipliers: np.ndarray, labels: np.ndarray, class_count: int) -> np.ndarray:
    """Per-class multiplier mass ``(n, K)``; the binary single output is spread back
    onto the competing class's column."""
    if multipliers.shape[1] == 1 and class_count == 2:
        per_class = np.zeros((len(labels), 2), dtype=np.float64)
        per_class[np.arange(len(labels)), 1 - labels] = multipliers[:, 0]
        return per_class
    return multipliers.astype(np.float64)


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
) -> dict[str, Any]:
    """summary.json: counts per flag and class, diagnostics, timings, thresholds."""
    counts = {flag: int((examples["flag"] == flag).sum()) for flag in ("mislabeled", "hard", "ok")}
    per_class = []
    if loaded.task == "classification":
        for name in loaded.class_names:
            rows = examples[examples["given_label"] == name]
            per_class.append(
                {
                    "class": name,
                    "count": int(len(rows)),
                    "mislabeled": int((rows["flag"] == "mislabeled").sum()),
                    "hard": int((rows["flag"] == "hard").sum()),
                }
            )
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
        "diagnostics": diagnostics,
        "history": result.history,
        "timings": timings,
        "config": config,
        "versions": versions,
        "dataset_fingerprint": loaded.fingerprint,
    }
    if demo is not None:
        summary["demo"] = demo
    return summary


def build_gallery(examples: pd.DataFrame, loaded: LoadedDataset, size: int) -> pd.DataFrame:
    """The top ``size`` flagged examples with a PNG thumbnail (images) or feature row."""
    flagged = examples[examples["flag"] != "ok"].sort_values("difficulty", ascending=False).head(max(size, 0))
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
        else:
            row = loaded.inputs[example_id].tolist()[:16]
            thumbnails.append(None)
            features.append(json.dumps(dict(zip(loaded.feature_names[:16], (round(v, 6) for v in row)))))
    gallery["thumbnail_png"] = pd.Series(thumbnails, dtype=object)
    gallery["feature_values"] = pd.array(features, dtype="string")
    return gallery


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 ``(3, H, W)`` tensor as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
