"""Minnorm training (Bansal et al. 2018): one Lagrange multiplier per example and constraint.

Modules (imports run one way: optimizer -> dual, readout, constraints, planner ->
stores, norm, stats -> common):

- ``optimizer``: :class:`Minnorm`, the ``torch.optim.Optimizer`` wrapper: construction,
  the Lagrangian, the weight step, the running mean, ``state_dict``/``load_state_dict``.
- ``dual``: projected dual ascent, :class:`PendingDualUpdate`, the deferred window
  (Minnorm's dual-side methods, as a mixin).
- ``readout``: Minnorm's read methods: multipliers, mean violations, scores, suggested
  labels, diagnostics (a mixin).
- ``constraints``: the margin and equality forms: constraint values, effective
  multipliers, the batch's constraint term as a linear form in the outputs.
- ``planner``: the memory planner: :func:`state_bytes`, :func:`choose_store`, building
  the store.
- ``stores``: :class:`DenseMultiplierStore` and :class:`CompactMultiplierStore`.
- ``norm``: which parameters are in the norm term (:func:`default_norm_parameters`), its
  value and gradient.
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
