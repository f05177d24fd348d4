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

import numpy as np
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
    default_batch_size,
    default_epochs,
    fit,
    is_main_process,
    predicted_classes,
)
from .training.threads import ThreadChoice, choose_threads, cpu_compute, forward_multiply_adds
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
            image_size=settings.resolved_image_size(),
            feature_columns=settings.feature_columns,
            data_root=settings.data_root,
            max_memory_gb=settings.train.max_memory_gb,
            ignore_columns=settings.ignore_columns,
            workers=settings.train.workers,
            split_folders=settings.split_folders,
            text_column=settings.text_column,
        )
    if settings.data_root is not None:
        raise TypeError("data_root applies to a manifest on disk, not to data given in memory")
    if isinstance(data, pd.DataFrame):
        return load_frame(data, label_column=settings.label_column, feature_columns=settings.feature_columns,
                          task=settings.task, ignore_columns=settings.ignore_columns,
                          text_column=settings.text_column)
    if isinstance(data, tuple) and len(data) == 2:
        return load_arrays(data[0], data[1], task=settings.task, image_size=settings.resolved_image_size())
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return load_torch_dataset(data, task=settings.task, image_size=settings.resolved_image_size())
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
    settings = with_usable_workers(settings)
    check_run_dir(run_dir, loaded, settings)
    started = time.perf_counter()
    # With a frozen backbone the head trains and is scored on the cached features; the
    # page's thumbnails still come from the images (``loaded``).
    trained_on, backbone_record = backbone_inputs(loaded, settings, run_dir)
    settings = with_epoch_budget(settings, trained_on)
    targets = training_targets(loaded)
    model = build_network(trained_on, settings, targets)
    threads = audit_threads(model, trained_on, settings)
    # Training and scoring on the chosen threads with denormals flushed; the caller's
    # thread count and denormal mode come back afterwards (training/threads.py).
    with cpu_compute(threads.threads):
        result = train(trained_on, settings, targets, run_dir, resume=resume, progress=progress, model=model)
        examples, flag_rule = score(result, trained_on, settings, targets)
    timings = {"load_s": load_seconds, "train_s": result.train_seconds,
               "total_s": load_seconds + (time.perf_counter() - started)}
    if backbone_record is not None:
        timings["features_s"] = backbone_record.get("feature_cache", {}).get("seconds_this_run", 0.0)
    compute = {**threads.to_record(), "flush_denormal": True}
    record = describe_run(examples, flag_rule, result, loaded, settings, timings=timings, demo=demo,
                          compute=compute)
    if backbone_record is not None:
        record.summary["backbone"] = backbone_record
        record.metadata["backbone"] = backbone_record
    elif loaded.kind == "images" and record.summary.get("inconclusive"):
        # From scratch, few images may never fit; a pretrained backbone is what works.
        record.summary["inconclusive"]["reason"] += IMAGES_ADVICE
    if is_main_process():  # under torchrun, rank 0 alone writes
        write_run_folder(run_dir, examples, record, loaded, settings.gallery_size, render=render)
    return AuditResult(examples=examples, summary=record.summary, run_dir=run_dir, set_aside=record.set_aside)


IMAGES_ADVICE = ("; with photos, audit through a pretrained network instead: --backbone resnet50 "
                 "(a torchvision or timm name, or a TorchScript / ONNX file, see --help)")


def backbone_inputs(
    loaded: LoadedDataset, settings: AuditOptions, run_dir: Path
) -> tuple[LoadedDataset, dict[str, Any] | None]:
    """What the network trains on, and what the summary records of the backbone.

    No backbone: ``loaded`` as it is. Frozen: ``loaded`` with the backbone's features
    (float32 ``(N, D)``, from the run folder's cache when there) as inputs.
    ``--finetune``: ``loaded`` as it is (the images; :func:`train` builds the network).
    """
    if not settings.backbone:
        if settings.finetune or settings.weights is not None:
            raise ValueError("--finetune and --weights need --backbone")
        return loaded, None
    from .backbone import load_backbone
    from .training.setup import resolve_device

    if loaded.kind != "images":
        raise ValueError("--backbone needs images; this data is a table (audit it without --backbone)")
    backbone = load_backbone(settings.backbone, weights=settings.weights)
    record: dict[str, Any] = {**backbone.describe(), "mode": "finetune" if settings.finetune else "frozen",
                              "image_size": loaded.image_size}
    if settings.finetune:
        record["head"] = "linear (zero start)"
        record["norm"] = "1/2 sum ||W - W0||^2 (the change from the pretrained weights)"
        return loaded, record
    from .backbone import backbone_cache

    features, cache = backbone_cache(backbone, loaded.inputs, loaded.fingerprint, run_dir,
                                     resolve_device(settings.train.device), write=is_main_process())
    cache["seconds_this_run"] = 0.0 if cache["reused"] else cache["seconds"]
    record["feature_cache"] = cache
    record["head"] = frozen_head(settings)
    return replace(loaded, inputs=features), record


def frozen_head(settings: AuditOptions) -> str:
    """The network trained on frozen features: ``linear`` (the C-SVM regime) unless
    ``--model`` names another."""
    return "linear" if settings.model == "auto" else settings.model


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
    """``settings`` with ``train.batch_size`` and ``train.epochs`` set: as given, or
    when None the small-data rule's batch size
    (:func:`~minnorm_audit.training.default_batch_size`: 128, or examples / 8 below
    1,024 examples) and the default budget of the network the audit builds
    (:func:`~minnorm_audit.training.default_epochs`: 10 epochs for the MLP on a
    classification task when that is at least 150 optimizer steps, else 20)."""
    if settings.train.batch_size is None:
        # Under torchrun the global batch is split over the ranks.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        batch = max(1, default_batch_size(len(loaded.targets)) // world)
        settings = replace(settings, train=replace(settings.train, batch_size=batch))
    if settings.train.epochs is not None:
        return settings
    is_image = isinstance(loaded.inputs, LazyImages) or loaded.inputs.ndim == 4
    network = ("cnn" if is_image else "text" if loaded.kind == "text" else "mlp") if settings.model == "auto" \
        else settings.model
    if settings.backbone:
        network = "finetune" if settings.finetune else frozen_head(settings)
    # Under torchrun every rank takes batch_size examples a step.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    assert settings.train.batch_size is not None
    epochs = default_epochs(network, len(loaded.targets), settings.train.batch_size * world,
                            classification=loaded.task == "classification")
    return replace(settings, train=replace(settings.train, epochs=epochs))


def with_usable_workers(settings: AuditOptions) -> AuditOptions:
    """``settings`` with ``train.workers`` at most the CPU cores: more decoding
    processes than cores only queue for them (the summary and page then show the
    workers the run started)."""
    cores = os.cpu_count() or 1
    if settings.train.workers <= cores:
        return settings
    return replace(settings, train=replace(settings.train, workers=cores))


def build_network(loaded: LoadedDataset, settings: AuditOptions, targets: TrainingTargets) -> torch.nn.Module:
    """The network the audit trains, built with the run's seed (untrained): on a
    backbone's features the head (or, fine-tuning, the whole pretrained network)."""
    torch.manual_seed(settings.train.seed)
    if settings.backbone and settings.finetune:
        return finetune_network(settings, loaded, targets.num_outputs)
    if settings.backbone:
        return build_model(frozen_head(settings), loaded.inputs, targets.num_outputs)
    if isinstance(loaded.inputs, LazyImages):
        return build_streamed_model(settings.model, loaded.inputs, targets.num_outputs,
                                    workers=settings.train.workers)
    return build_model(settings.model, loaded.inputs, targets.num_outputs)


def audit_threads(model: torch.nn.Module, loaded: LoadedDataset, settings: AuditOptions) -> ThreadChoice:
    """The CPU threads of the audit: ``settings.threads``, else the user's
    OMP_NUM_THREADS / MKL_NUM_THREADS, else the rule of
    :func:`~minnorm_audit.training.threads.choose_threads` on one training step's work."""
    if settings.threads is not None:
        return choose_threads(settings.threads)
    example = loaded.inputs[:1]
    if not isinstance(example, torch.Tensor):  # streamed images: one decoded item
        example = torch.as_tensor(example)
    batch_size = settings.train.batch_size or default_batch_size(len(loaded.inputs))
    # uint8 images as the network standardizes them; text ids stay integers.
    step = batch_size * forward_multiply_adds(model, example.float() if example.dtype == torch.uint8 else example)
    return choose_threads(None, step)


def train(
    loaded: LoadedDataset,
    settings: AuditOptions,
    targets: TrainingTargets,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    model: torch.nn.Module | None = None,
) -> FitResult:
    """Fit ``model`` (default: :func:`build_network`) with Minnorm, checkpointing into
    ``run_dir`` (``epochs=None``: the network's default budget, :func:`with_epoch_budget`)."""
    settings = with_epoch_budget(settings, loaded)
    config = settings.train
    if settings.backbone and settings.finetune:
        config = replace(config, norm_anchor="initial")
    if model is None:
        model = build_network(loaded, settings, targets)
    return fit(
        model,
        loaded.inputs,
        targets.values,
        form=targets.form,
        num_outputs=targets.num_outputs,
        config=config,
        dataset_fingerprint=loaded.fingerprint,
        checkpoint_path=run_dir / CHECKPOINT_FILE,
        resume=resume,
        progress=progress,
        run_settings=settings.to_record(),  # kept in the checkpoint: --resume reuses them
    )


def finetune_network(settings: AuditOptions, loaded: LoadedDataset, num_outputs: int) -> torch.nn.Module:
    """The backbone and a zero-started linear head, trained whole (``--finetune``)."""
    from .backbone import FinetuneNetwork, load_backbone

    backbone = load_backbone(settings.backbone or "", weights=settings.weights)
    sample = loaded.inputs.stack([0]) if isinstance(loaded.inputs, LazyImages) else loaded.inputs[:1]
    feature_dim = int(backbone.features(sample, torch.device("cpu")).shape[1])
    return FinetuneNetwork(backbone, feature_dim, num_outputs)


def score(
    result: FitResult, loaded: LoadedDataset, settings: AuditOptions, targets: TrainingTargets
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The examples table and the flag rule (score_run.py)."""
    if targets.form == "equality":
        predictions = targets.unstandardize(result.final_outputs)
        return score_regression(result, loaded, settings, predictions)
    examples, rule = score_classification(result, loaded, settings)
    # What the network predicts at the end, beside the given label (a class it never
    # learned shows up here: its examples are predicted as other classes).
    examples.insert(int(examples.columns.get_loc("margin")) + 1, "predicted_label",
                    predicted_labels(result, loaded.class_names, examples["margin"].to_numpy(),
                                     loaded.targets.numpy().astype(np.int64)))
    return examples, rule


def predicted_labels(result: FitResult, class_names: list[str], margins: Any, labels: Any) -> pd.Series:
    """The class name the trained network predicts for each example (string column):
    from the FitResult's predicted classes, else from its outputs; for a result that
    holds only margins, the given label where the margin is above 0 and missing
    elsewhere (which other class won is not known)."""
    names = pd.array(list(class_names), dtype="string")
    predicted = result.final_predicted
    if predicted is None and result.final_outputs is not None:
        predicted = predicted_classes(result.final_outputs)
    if predicted is not None:
        return pd.Series(names[np.asarray(predicted, dtype=np.int64)], dtype="string")
    column = pd.Series(names[labels], dtype="string")
    column[~(np.asarray(margins) > 0)] = pd.NA
    return column
