"""minnorm-audit: find mislabeled and hard examples with Minnorm training's multipliers."""

from importlib.metadata import PackageNotFoundError, version

from .minnorm import Minnorm, StateMismatchError, default_norm_parameters
from .scores import (
    difficulty_scores,
    flag_examples,
    label_concentration,
    percentile_ranks,
    suggested_labels,
)

try:
    __version__ = version("minnorm-audit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
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
