"""minnorm-audit: find mislabeled and hard examples with Minnorm training's multipliers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("minnorm-audit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

import importlib
import sys
import types
from typing import Any

# The public API is imported on first use (PEP 562), not with the package: the command
# line's `--version` and `-h` then run without importing torch (2-14 s on a loaded
# 2-core machine). Each public name -> the module that defines it.
_LAZY = {
    **dict.fromkeys(("AuditOptions", "AuditResult", "audit"), ".audit"),
    **dict.fromkeys(("CleanError", "CleanResult", "Decision", "DecisionsError", "clean", "read_decisions"), ".clean"),
    **dict.fromkeys(("DataError", "DataNotice", "LoadedDataset", "load_arrays", "load_dataset", "load_frame",
                     "load_torch_dataset"), ".data"),
    **dict.fromkeys(("Minnorm", "StateMismatchError", "default_norm_parameters"), ".minnorm"),
    **dict.fromkeys(("difficulty_scores", "flag_examples", "label_concentration", "percentile_ranks",
                     "suggested_labels"), ".scoring"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``minnorm_audit.audit`` and ``minnorm_audit.clean`` stay the functions, as they
    were when the package imported them eagerly: importing the submodules of the same
    name (which the import system then sets on the package) keeps the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("audit", "clean") and isinstance(value, types.ModuleType):
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
