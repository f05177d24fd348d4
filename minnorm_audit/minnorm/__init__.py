"""Minnorm training (Bansal et al. 2018): one Lagrange multiplier per example and constraint.

Modules (imports run one way: optimizer -> dual, readout, constraints, weights, planner,
eager -> stores, norm, stats -> common). One class orchestrates; the math is pure
functions beside it:

- ``optimizer``: :class:`Minnorm`, the ``torch.optim.Optimizer`` wrapper and the one
  class here: construction, the Lagrangian, the eager step and the capturable
  :meth:`Minnorm.static_step`, the deferred window, the running mean, the reads
  (multipliers, scores, diagnostics), ``state_dict``/``load_state_dict``.
- ``dual``: the projected dual ascent of a batch (:func:`dual_step`), the record of a
  forward pass (:class:`PendingDualUpdate`) and merging a window of them.
- ``constraints``: the margin and equality forms: constraint values, effective
  multipliers, the batch's constraint term as a linear form in the outputs.
- ``readout``: mean violations, difficulty on the device, relative change, share at the cap.
- ``weights``: the base optimizer's step in plain tensor operations, for traced steps.
- ``planner``: the memory planner: :func:`state_bytes`, :func:`choose_store`, building
  the store.
- ``stores``: :class:`DenseMultiplierStore` and :class:`CompactMultiplierStore`.
- ``norm``: which parameters are in the norm term (:func:`default_norm_parameters`), its
  value and gradient.
- ``eager``: torch optimizers that import no ``torch._dynamo`` until something compiles.
- ``stats``: :func:`spearman` and :func:`relative_error`.
- ``common``: ``ConstraintForm``, :class:`StateMismatchError`, ``VIOLATION_FLOOR``.

Every public name of the former single module ``minnorm_audit.minnorm`` is re-exported here.
"""

from .common import VIOLATION_FLOOR, ConstraintForm, StateMismatchError
from .dual import DEFERRED_WINDOW_ELEMENTS, DEFERRED_WINDOW_EXAMPLES, PendingDualUpdate
from .norm import default_norm_parameters
from .optimizer import Minnorm
from .planner import (
    DEFAULT_MAX_SLOTS,
    DEFAULT_MEMORY_BUDGET_BYTES,
    StoreChoice,
    choose_store,
    per_example_overhead_bytes,
    state_bytes,
)
from .stats import relative_error, spearman
from .stores import CompactMultiplierStore, DenseMultiplierStore, MultiplierStore

__all__ = [
    "DEFAULT_MAX_SLOTS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "DEFERRED_WINDOW_ELEMENTS",
    "DEFERRED_WINDOW_EXAMPLES",
    "VIOLATION_FLOOR",
    "CompactMultiplierStore",
    "ConstraintForm",
    "DenseMultiplierStore",
    "Minnorm",
    "MultiplierStore",
    "PendingDualUpdate",
    "StateMismatchError",
    "StoreChoice",
    "choose_store",
    "default_norm_parameters",
    "per_example_overhead_bytes",
    "relative_error",
    "spearman",
    "state_bytes",
]
