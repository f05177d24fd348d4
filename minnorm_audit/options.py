"""The settings of one audit (the CLI's options), shared by the pipeline's steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .training.config import TrainConfig


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
    ignore_columns: list[str] | None = None
    text_column: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The settings as plain values (what a checkpoint stores, so that ``--resume``
        reuses them): every field, ``train`` as a dict, the data root as text."""
        record: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "train"}
        for name in ("feature_columns", "ignore_columns"):
            record[name] = None if record[name] is None else [str(column) for column in record[name]]
        record["data_root"] = None if self.data_root is None else str(self.data_root)
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
