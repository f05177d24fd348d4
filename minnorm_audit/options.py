"""The settings of one audit (the CLI's options), shared by the pipeline's steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
