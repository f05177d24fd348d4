"""The settings of one audit (the CLI's options), shared by the pipeline's steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Settings of one Minnorm training run (every field lands in the report).

    The defaults are the ones ``benchmarks/label_noise.py`` was run with.
    ``epochs=None`` is the default budget: :func:`default_epochs` for the network
    (an audit resolves it before training; ``fit`` alone takes ``DEFAULT_EPOCHS``).
    """

    epochs: int | None = None
    # None: default_batch_size (128, or examples / 8 below 1,024 examples).
    batch_size: int | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    dual_lr: float = 0.01
    damping: float | None = None
    margin: float = 1.0
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    # Which state the scores are read from, and the soft-margin cap that keeps that
    # state informative: see SCORE_STATES below and fit.cap_multipliers().
    score_state: str = "violation"
    multiplier_cap: float | None = 1.0
    # Data placement (data/'s batch sources): decoded data above this many GiB is not
    # held in memory (None: half of what is available); workers decode streamed images.
    max_memory_gb: float | None = None
    workers: int = 4
    # Multiplier store (minnorm.choose_store): "auto" keeps the dense table while all
    # per-example state fits multiplier_memory_gb, else the top-k "compact" store.
    multiplier_store: str = "auto"
    multiplier_slots: int | None = None
    multiplier_memory_gb: float = 1.0
    # The resume checkpoint is rewritten once this many seconds have passed since the
    # last write (0: after every epoch), after the last epoch, and when training stops
    # early (Ctrl-C, divergence): then with the state of the last finished epoch.
    # "initial": the norm term is the change from the weights training starts at
    # (fine-tuning a pretrained backbone, Minnorm's norm_anchor); None: from 0.
    norm_anchor: str | None = None
    checkpoint_seconds: float = 60.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AuditOptions:
    """Everything that shapes an audit besides the data path (defaults = the CLI's)."""

    format: str = "auto"
    label_column: str = "label"
    path_column: str = "path"
    task: str = "classification"
    # None: 224 with a backbone (ImageNet models' crop), 32 without (resolved_image_size).
    image_size: int | None = None
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
    ignore_columns: list[str] | None = None
    # Image folder: the split folder names (None: detected; ["none"]: off).
    split_folders: list[str] | None = None
    # A pretrained network the images go through (backbone.py): a torchvision or timm
    # name, a TorchScript or ONNX file; weights: a state dict file for a name.
    backbone: str | None = None
    weights: str | Path | None = None
    # False: the Minnorm head trains on the frozen features; True: the whole network
    # trains, with the norm of the change from the pretrained weights.
    finetune: bool = False
    # CPU intra-op threads (None: OMP_NUM_THREADS / MKL_NUM_THREADS when set, else
    # training.threads.choose_threads' rule from the network and batch size).
    threads: int | None = None

    def resolved_image_size(self) -> int:
        """``image_size``, or its default: 224 with a backbone, 32 without."""
        if self.image_size is not None:
            return int(self.image_size)
        return 224 if self.backbone else 32

    text_column: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The settings as plain values (what a checkpoint stores, so that ``--resume``
        reuses them): every field, ``train`` as a dict, the data root as text."""
        record: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "train"}
        for name in ("feature_columns", "ignore_columns", "split_folders"):
            record[name] = None if record[name] is None else [str(column) for column in record[name]]
        record["data_root"] = None if self.data_root is None else str(self.data_root)
        record["weights"] = None if self.weights is None else str(self.weights)
        record["train"] = self.train.to_dict()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AuditOptions:
        """The settings :meth:`to_record` gave (fields it does not know are left out,
        missing ones take their defaults)."""
        known = {name: value for name, value in record.items() if name in cls.__dataclass_fields__ and name != "train"}
        train = dict(record.get("train") or {})
        train = {name: value for name, value in train.items() if name in TrainConfig.__dataclass_fields__}
        return cls(**known, train=TrainConfig(**train))
