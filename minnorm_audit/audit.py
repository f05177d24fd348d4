"""The audit pipeline: load -> fit -> score -> write.

:func:`audit` loads the data (``data/``) and hands it to :func:`run_audit`, which is
its steps in order: :func:`check_run_dir`, :func:`training_targets`, :func:`train`
(``training/``), :func:`score` (``score_run.py`` over ``scoring.py``) and the run
folder (``write_run.py`` over ``report/``).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .data import DataNotice, LazyImages, LoadedDataset, load_arrays, load_dataset, load_frame, load_torch_dataset
from .minnorm import ConstraintForm
from .options import AuditOptions
from .score_run import score_classification, score_regression
from .training import (
    FitResult,
    TrainConfig,
    build_model,
    build_streamed_model,
    default_epochs,
    fit,
    is_main_process,
)
from .write_run import describe_run, write_run_folder

CHECKPOINT_FILE = "checkpoint.pt"


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
        ``flag_fraction``, ``threshold``, ``feature_columns``, ``ignore_columns``,
        ``data_root``, ...) and of :class:`~minnorm_audit.training.TrainConfig`
        (``epochs``, ``lr``, ``dual_lr``, ``batch_size``, ``seed``, ``device``, ...).

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

    Warns
    -----
    DataNotice
        Once per note the loader made about the input (a saved pandas index left out,
        pixel values clipped, a ';'-delimited CSV, ...); the notes are also in
        ``summary["notes"]``. Single unusable rows or items are not warned about: they
        are in ``result.set_aside``.

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
    for note in loaded.notes:
        warnings.warn(note, DataNotice, stacklevel=2)
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
            ignore_columns=settings.ignore_columns,
            workers=settings.train.workers,
            text_column=settings.text_column,
        )
    if settings.data_root is not None:
        raise TypeError("data_root applies to a manifest on disk, not to data given in memory")
    if isinstance(data, pd.DataFrame):
        return load_frame(data, label_column=settings.label_column, feature_columns=settings.feature_columns,
                          task=settings.task, ignore_columns=settings.ignore_columns,
                          text_column=settings.text_column)
    if isinstance(data, tuple) and len(data) == 2:
        return load_arrays(data[0], data[1], task=settings.task, image_size=settings.image_size)
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return load_torch_dataset(data, task=settings.task, image_size=settings.image_size)
    raise TypeError(
        "data must be a path, a pandas DataFrame, a tuple (X, y) of arrays or a torch Dataset, "
        f"got {type(data).__name__}"
    )


def run_audit(
    loaded: LoadedDataset,
    settings: AuditOptions,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = False,
    load_seconds: float = 0.0,
    demo: dict[str, Any] | None = None,
    render: bool = True,
) -> AuditResult:
    """Train, score and write every output of one audit into ``run_dir``
    (``render=False``: all but report.html, for a caller that adds to the summary and
    renders the page once itself).

    Under torchrun every rank trains and scores (the results agree); rank 0 alone
    writes the run folder.
    """
    settings = with_epoch_budget(settings, loaded)
    check_run_dir(run_dir, loaded, settings)
    started = time.perf_counter()
    targets = training_targets(loaded)
    result = train(loaded, settings, targets, run_dir, resume=resume, progress=progress)
    examples, flag_rule = score(result, loaded, settings, targets)
    timings = {"load_s": load_seconds, "train_s": result.train_seconds,
               "total_s": load_seconds + (time.perf_counter() - started)}
    record = describe_run(examples, flag_rule, result, loaded, settings, timings=timings, demo=demo)
    if is_main_process():  # under torchrun, rank 0 alone writes
        write_run_folder(run_dir, examples, record, loaded, settings.gallery_size, render=render)
    return AuditResult(examples=examples, summary=record.summary, run_dir=run_dir, set_aside=record.set_aside)


def check_run_dir(run_dir: Path, loaded: LoadedDataset, settings: AuditOptions) -> None:
    """Refuse a run folder inside the data; create it (rank 0)."""
    check_run_dir_outside_data(run_dir, loaded.root)
    if settings.data_root is not None:
        check_run_dir_outside_data(run_dir, Path(settings.data_root).expanduser().resolve())
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class TrainingTargets:
    """What the network is trained to output: the labels (margin form), or the
    regression targets standardized per column (equality form)."""

    values: torch.Tensor
    num_outputs: int
    form: ConstraintForm
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def unstandardize(self, outputs: Any) -> Any:
        """Network outputs back in the targets' units (regression)."""
        assert self.mean is not None and self.std is not None
        return outputs * self.std.numpy() + self.mean.numpy()


def training_targets(loaded: LoadedDataset) -> TrainingTargets:
    """The targets fit() trains on, their width and the constraint form."""
    if loaded.task == "regression":
        mean = loaded.targets.mean(0)
        std = loaded.targets.std(0, unbiased=False).clamp_min(1e-12)
        return TrainingTargets((loaded.targets - mean) / std, int(loaded.targets.shape[1]), "equality", mean, std)
    # Two classes: the binary single-output form of ALGORITHM.md.
    num_outputs = 1 if len(loaded.class_names) == 2 else len(loaded.class_names)
    return TrainingTargets(loaded.targets, num_outputs, "margin")


def with_epoch_budget(settings: AuditOptions, loaded: LoadedDataset) -> AuditOptions:
    """``settings`` with ``train.epochs`` set: as given, or when None the default budget
    of the network the audit builds (:func:`~minnorm_audit.training.default_epochs`:
    10 epochs for the MLP on a classification task when that is at least 150 optimizer
    steps, else 20)."""
    if settings.train.epochs is not None:
        return settings
    is_image = isinstance(loaded.inputs, LazyImages) or loaded.inputs.ndim == 4
    network = ("cnn" if is_image else "text" if loaded.kind == "text" else "mlp") if settings.model == "auto" \
        else settings.model
    # Under torchrun every rank takes batch_size examples a step.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    epochs = default_epochs(network, len(loaded.targets), settings.train.batch_size * world,
                            classification=loaded.task == "classification")
    return replace(settings, train=replace(settings.train, epochs=epochs))


def train(
    loaded: LoadedDataset,
    settings: AuditOptions,
    targets: TrainingTargets,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
) -> FitResult:
    """Build the network (seeded) and fit it with Minnorm, checkpointing into ``run_dir``
    (``epochs=None``: the network's default budget, :func:`with_epoch_budget`)."""
    settings = with_epoch_budget(settings, loaded)
    torch.manual_seed(settings.train.seed)
    if isinstance(loaded.inputs, LazyImages):
        model = build_streamed_model(settings.model, loaded.inputs, targets.num_outputs, workers=settings.train.workers)
    else:
        model = build_model(settings.model, loaded.inputs, targets.num_outputs)
    return fit(
        model,
        loaded.inputs,
        targets.values,
        form=targets.form,
        num_outputs=targets.num_outputs,
        config=settings.train,
        dataset_fingerprint=loaded.fingerprint,
        checkpoint_path=run_dir / CHECKPOINT_FILE,
        resume=resume,
        progress=progress,
        run_settings=settings.to_record(),  # kept in the checkpoint: --resume reuses them
    )


def score(
    result: FitResult, loaded: LoadedDataset, settings: AuditOptions, targets: TrainingTargets
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The examples table and the flag rule (score_run.py)."""
    if targets.form == "equality":
        predictions = targets.unstandardize(result.final_outputs)
        return score_regression(result, loaded, settings, predictions)
    return score_classification(result, loaded, settings)
