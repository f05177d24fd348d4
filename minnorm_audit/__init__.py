"""minnorm-audit: find mislabeled and hard examples with Minnorm training's multipliers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("minnorm-audit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from .audit import AuditOptions, AuditResult, audit  # noqa: E402
from .clean import CleanError, CleanResult, Decision, DecisionsError, clean, read_decisions  # noqa: E402
from .data import DataError, DataNotice, LoadedDataset, load_arrays, load_dataset, load_frame, load_torch_dataset  # noqa: E402
from .minnorm import Minnorm, StateMismatchError, default_norm_parameters  # noqa: E402
from .scoring import (  # noqa: E402
    difficulty_scores,
    flag_examples,
    label_concentration,
    percentile_ranks,
    suggested_labels,
)

__all__ = [
    "AuditOptions",
    "AuditResult",
    "CleanError",
    "CleanResult",
    "DataError",
    "DataNotice",
    "Decision",
    "DecisionsError",
    "LoadedDataset",
    "audit",
    "clean",
    "load_arrays",
    "load_dataset",
    "load_frame",
    "load_torch_dataset",
    "read_decisions",
    "Minnorm",
    "StateMismatchError",
    "__version__",
    "default_norm_parameters",
    "difficulty_scores",
    "flag_examples",
    "label_concentration",
    "percentile_ranks",
    "suggested_labels",
]
