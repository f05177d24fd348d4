"""Names every layer of the package shares: the constraint forms, the error for a saved
state that does not fit, the floor of the violation sums and a dtype helper."""

from __future__ import annotations

from typing import Literal

import torch

ConstraintForm = Literal["margin", "equality"]


class StateMismatchError(ValueError):
    """A saved Minnorm state does not belong to this dataset or problem."""


#: Lowest value one visit adds to the violation sums of the margin form: an example far
#: inside its margin at one visit cannot cancel many visits at which it was violated.
#: The equality form sums the signed ``g`` unfloored (its score is ``|mean g|``, which
#: must treat targets above and below the prediction alike). It is also what the
#: margin form's mean violations read on the own-label column ("never a competing
#: class") and for an example not visited yet (Minnorm.mean_violations).
VIOLATION_FLOOR = -5.0


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without the dispatch when it is already ``dtype``."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def clamp_to_box_(values: torch.Tensor, cap: float | torch.Tensor | None) -> torch.Tensor:
    """``values`` clipped to ``[0, cap]`` in place (``cap`` None: ``[0, inf)``). A 0-dim
    tensor ``cap`` (a captured step's) goes through the tensor overload: the scalar one
    would read it back to the host."""
    if isinstance(cap, torch.Tensor):
        return values.clamp_min_(0.0).clamp_max_(cap.to(values.dtype))
    return values.clamp_(min=0.0, max=cap)
