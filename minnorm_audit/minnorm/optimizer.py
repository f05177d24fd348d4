"""Minnorm training (Bansal, Advani, Cox, Saxe 2018) as a wrapper around any torch optimizer.

The problem (see ``shared/design/ALGORITHM.md``)::

    minimize   R(W) = 1/2 * sum_l ||W_l||_F^2
    subject to every example's constraint

Two constraint families (:mod:`.constraints`): ``"equality"`` (regression,
``g_i = t_i - f(x_i) = 0``, ``L = R + sum_i mu_i . g_i``) and ``"margin"``
(classification, ``g_ij = f_{y_i}(x_i) - f_j(x_i) - m >= 0`` for every competing
class ``j``, ``L = R - sum_ij lambda_ij g_ij``; one output: the binary form).

Dynamics: one step of the wrapped optimizer on ``L`` (descent on the weights), then
projected dual ascent on the batch's multipliers (:mod:`.dual`)::

    mu     <- mu + dual_lr * g
    lambda <- max(0, lambda - dual_lr * g)

Damping. Plain simultaneous descent/ascent cycles on linear SVMs and blows up on
networks. The weight step therefore uses the *augmented-Lagrangian* multiplier::

    mu_eff     = mu + damping * g
    lambda_eff = max(0, lambda - damping * g)

which is exactly the gradient of the augmented Lagrangian with penalty ``damping``.
With ``damping == dual_lr`` it equals the multiplier after its update, i.e. the
alternating scheme; ``damping > dual_lr`` adds a proportional term on top. The
default ``damping = 2 * dual_lr`` was stable for minibatch Adam on networks and
converges on the linear closed-form problems (tests/test_minnorm.py).

Minibatches: only the batch's multipliers are read and updated; the norm term is
scaled by ``batch_size / num_examples`` so that one epoch sees it once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from . import constraints, norm, readout
from .common import VIOLATION_FLOOR, ConstraintForm, StateMismatchError, _as_dtype
from .dual import DEFERRED_WINDOW_EXAMPLES, PendingDualUpdate, dual_step, merge_window, window_full
from .eager import dynamo_loaded, undecorated
from .planner import DEFAULT_MEMORY_BUDGET_BYTES, StoreChoice, build_store
from .stats import spearman_tensors
from .stores import CompactMultiplierStore, MultiplierStore, _describe_store
from .weights import functional_weight_step


class Minnorm(torch.optim.Optimizer):
    """Minnorm training around any ``torch.optim.Optimizer``.

    The wrapper shares ``param_groups`` and ``state`` with ``base_optimizer`` so LR
    schedulers and ``isinstance(opt, Optimizer)`` checks keep working. The class holds
    the state and orchestrates; the math is pure functions beside it: the constraint
    forms (:mod:`.constraints`), the projected dual step (:mod:`.dual`), the norm term
    (:mod:`.norm`), the readout of scores and diagnostics (:mod:`.readout`) and the
    traced weight step (:mod:`.weights`). Building it and stepping it import no
    ``torch._dynamo`` (:mod:`.eager`) when the base optimizer is one of :mod:`.eager`'s
    (``training.fit`` builds those).

    Two ways to step. The eager one, ``lagrangian(); backward(); step()``, inside
    :meth:`deferred_dual_updates` on a CPU. The capturable one, :meth:`static_step`: the
    whole step as one function of fixed-shape tensors with no host synchronisation,
    which ``training.fit`` captures in a CUDA graph on a GPU and ``torch.compile`` can
    trace with ``fullgraph=True``.

    Parameters
    ----------
    base_optimizer : torch.optim.Optimizer
        Takes the weight step on the Lagrangian.
    num_examples : int
        Size of the training set; example ids are ``0 .. num_examples - 1``.
    num_outputs : int
        Width of the network's output. In the margin form one output means the binary
        form, ``K >= 2`` outputs the multiclass form.
    form : {"margin", "equality"}, default="margin"
    margin : float, default=1.0
        Required margin ``m`` of the margin form.
    dual_lr : float, default=0.1
        Step size of the dual ascent (``eta_dual``).
    damping : float, optional
        Augmented-Lagrangian penalty ``kp`` used in the weight step; ``2 * dual_lr``
        when omitted. Must be ``>= 0``.
    model : torch.nn.Module, optional
        When given, the norm term uses :func:`default_norm_parameters` of the model.
    norm_parameters : iterable of Parameter, optional
        Overrides which parameters are in the norm term. Without ``model`` or
        ``norm_parameters``, every optimized parameter with ``ndim >= 2``.
    dataset_fingerprint : str, default=""
        Stored in ``state_dict()``; ``load_state_dict`` refuses a different one.
    device : torch.device or str, optional
        Where the multipliers live; defaults to the device of the first parameter.
    fitted_tolerance : float, default=1e-3
        An example counts as fitted when its largest violation is at most this.
    multiplier_dtype : torch.dtype, default=torch.float32
        float64 for closed-form checks.
    multiplier_store : {"auto", "dense", "compact"}, default="auto"
        :class:`DenseMultiplierStore` or :class:`CompactMultiplierStore`; ``"auto"``
        takes the dense one when all per-example state fits ``memory_budget_bytes``
        (see :func:`choose_store`).
    multiplier_slots : int, optional
        Slots per example of the compact store (default: up to 64, within the budget).
    memory_budget_bytes : int, default=1_000_000_000
        Budget for everything kept per example (multipliers, their running mean, the
        diagnostics' snapshot and scores, violations, labels).
    max_multiplier : float, optional
        Upper bound ``C`` on every ``lambda_ij`` (margin form): the soft-margin problem,
        whose dual is the box ``0 <= lambda <= C`` as in a C-SVM. An example that would
        need more force than ``C`` is no longer pushed harder and is not memorized;
        ``training.fit`` sets it each epoch (see ``TrainConfig.multiplier_cap``). Settable
        as the attribute ``max_multiplier``. None (default): the hard-margin problem.
    track_violations : bool, default=False
        Keep the per-class sum of ``-g`` over visits (:meth:`mean_violations`).
    norm_anchor : "initial", mapping of Parameter to Tensor, or None
        The norm of the CHANGE from a start ``W0``: the norm term becomes
        ``1/2 sum_l ||W_l - W0_l||^2`` (fine-tuning a pretrained network: the
        minimum-norm change that fits the data). ``"initial"``: every norm
        parameter's value now (copied); a mapping: ``W0`` for the parameters it
        names (same shape), 0 for the others. None (default): ``W0 = 0``.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        num_examples: int,
        num_outputs: int,
        form: ConstraintForm = "margin",
        margin: float = 1.0,
        dual_lr: float = 0.1,
        damping: float | None = None,
        model: nn.Module | None = None,
        norm_parameters: Iterable[nn.Parameter] | None = None,
        dataset_fingerprint: str = "",
        device: torch.device | str | None = None,
        fitted_tolerance: float = 1e-3,
        multiplier_dtype: torch.dtype = torch.float32,
        multiplier_store: StoreChoice = "auto",
        multiplier_slots: int | None = None,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        max_multiplier: float | None = None,
        track_violations: bool = False,
        norm_anchor: str | Mapping[nn.Parameter, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer instance")
        if form not in ("margin", "equality"):
            raise ValueError(f"form must be 'margin' or 'equality', got {form!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if dual_lr <= 0:
            raise ValueError(f"dual_lr must be > 0, got {dual_lr}")
        damping = 2.0 * dual_lr if damping is None else damping
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")

        self.base_optimizer = base_optimizer
        all_parameters = [p for group in base_optimizer.param_groups for p in group["params"]]
        # Optimizer.__init__ sets up hooks and bookkeeping; the groups are then replaced
        # by the base optimizer's own so both see the same learning rates (SAM's approach).
        super().__init__(all_parameters, dict(base_optimizer.defaults))
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.trainable_parameters = all_parameters  # what static_step zeroes the gradients of

        if norm_parameters is not None:
            self.norm_parameters = list(norm_parameters)
        elif model is not None:
            self.norm_parameters = norm.default_norm_parameters(model)
        else:
            self.norm_parameters = [p for p in all_parameters if p.ndim >= 2]
        self.norm_anchors = _norm_anchors(self.norm_parameters, norm_anchor)

        if device is None:
            device = all_parameters[0].device if all_parameters else torch.device("cpu")
        self.form: ConstraintForm = form
        self.num_outputs = int(num_outputs)
        self.margin = float(margin)
        self.dual_lr = float(dual_lr)
        self.damping = float(damping)
        self.dataset_fingerprint = str(dataset_fingerprint)
        self.fitted_tolerance = float(fitted_tolerance)
        self.multipliers: MultiplierStore = build_store(
            num_examples, num_outputs, form=form, store=multiplier_store, slots=multiplier_slots,
            memory_budget_bytes=memory_budget_bytes, dtype=multiplier_dtype, violations=track_violations,
            device=device,
        )
        # Largest violation seen at each example's latest visit; NaN until first visit.
        self.last_violation = torch.full(
            (num_examples,), float("nan"), device=device, dtype=multiplier_dtype
        )
        self.labels = torch.full((num_examples,), -1, dtype=torch.long, device=device)
        self._pending: list[PendingDualUpdate] = []
        self._pending_batch_size = 0
        # Dual updates of finished steps not applied yet (see deferred_dual_updates).
        self._queued: list[PendingDualUpdate] = []
        self._queued_examples = 0
        self._window_examples: int | None = None
        # Inside deferred_dual_updates(): the ids applied so far and their count.
        self._block_seen: torch.Tensor | None = None
        self._block_examples = 0
        self._max_multiplier: float | None = None
        # The same cap as a tensor for static_step (inf: none); a captured graph reads
        # it where it lies, so a new cap needs no new graph.
        self.cap_tensor = torch.full((), float("inf"), device=device, dtype=multiplier_dtype)
        self._previous_scores: torch.Tensor | None = None  # diagnostics' difficulty, on the device
        self.dual_steps = 0
        self.average_epochs = 0
        # Box constraint 0 <= lambda <= max_multiplier (soft margin); None = hard margin.
        self.max_multiplier = None if max_multiplier is None else float(max_multiplier)
        # The dual ascent before projection, per example and class: the sum over visits
        # of -g (margin form, floored at VIOLATION_FLOOR; equality form: the signed g)
        # and the visit count. Its mean is the "violation" score state of training.fit:
        # one more (n, width) table beside the dense store, one float per slot inside
        # the compact one.
        self.violation_sums: torch.Tensor | None = None
        self.visits: torch.Tensor | None = None
        self._ones: torch.Tensor | None = None  # see _visit_ones
        if track_violations:
            self.visits = torch.zeros(num_examples, device=device, dtype=torch.int32)
            if isinstance(self.multipliers, CompactMultiplierStore):
                self.multipliers.track_violations()  # one sum per slot, not per class
            else:
                self.violation_sums = torch.zeros(num_examples, num_outputs, device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ constraints
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Optimizer.__init__ calls it; torch's decorated one imports torch._dynamo (see .eager).
        method = torch.optim.Optimizer.add_param_group
        (method if dynamo_loaded() else undecorated(method))(self, param_group)

    @property
    def max_multiplier(self) -> float | None:
        """Upper bound ``C`` on every ``lambda_ij`` (None: hard margin)."""
        return self._max_multiplier

    @max_multiplier.setter
    def max_multiplier(self, value: float | None) -> None:
        # Queued dual steps were taken under the bound in force then.
        self.flush_dual_updates()
        self._max_multiplier = None if value is None else float(value)
        self.cap_tensor.fill_(float("inf") if value is None else float(value))

    @property
    def num_examples(self) -> int:
        return self.multipliers.num_examples

    @property
    def device(self) -> torch.device:
        return self.last_violation.device

    def constraint_values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``g`` for a batch, shape ``(batch, num_outputs)``, in float32 or wider.

        Margin form: ``g_ij = f_y - f_j - margin`` (the own-label column is 0 and is
        ignored); binary single-output form: ``s * f - margin``. Equality form:
        ``t - f``.
        """
        return constraints.constraint_values(
            outputs, targets, form=self.form, num_outputs=self.num_outputs, margin=self.margin
        )

    def effective_multipliers(
        self, multipliers: torch.Tensor, constraint_values: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Augmented-Lagrangian multipliers used in the weight step."""
        return constraints.effective_multipliers(
            multipliers, constraint_values, labels, form=self.form, num_outputs=self.num_outputs,
            damping=self.damping, max_multiplier=self._max_multiplier,
        )

    def lagrangian(
        self, outputs: torch.Tensor, targets: torch.Tensor, example_ids: torch.Tensor
    ) -> torch.Tensor:
        """The batch's constraint term of the Lagrangian, to call ``backward()`` on.

        The norm term's gradient is added by :meth:`step` (scaled by the batch's share
        of the dataset), so ``lagrangian(...).backward(); step()`` is one weight step on
        ``L``. The constraint values are remembered and the batch's multipliers are
        updated by the next :meth:`step`.

        Parameters
        ----------
        outputs : Tensor, shape (batch, num_outputs) or (batch,)
            Any layout (a non-contiguous slice such as ``out[:, :K]`` too); half
            precision is promoted to float32.
        targets : Tensor
            Class indices (margin form; 0 or 1 in the binary form) or real targets
            (equality form, ``batch x num_outputs`` values). Any device and dtype: they
            are moved to the outputs' (float64 targets from numpy are fine).
        example_ids : Tensor of int, shape (batch,)

        Returns
        -------
        Tensor
            Scalar: ``+sum mu_eff . g`` (equality) or ``-sum lambda_eff * g`` (margin).

        Raises
        ------
        ValueError
            ``outputs`` not ``num_outputs`` wide; binary labels other than 0 and 1 on
            the CPU (on another device they are refused by the per-epoch reads, see
            :meth:`check_recorded_labels`).
        IndexError
            An example id outside ``[0, num_examples)`` (on a GPU: a device-side assert).

        Notes
        -----
        The term is linear in the outputs once the multipliers are fixed, so it is
        built as ``outputs . C + constant`` with ``C = d term / d outputs`` computed
        without autograd: the gradient reaching the network is the one autograd gives
        for ``-sum lambda_eff * g`` (bit for bit: ``-lambda_eff`` on competing
        columns, the row sum on the own-label column), at two autograd nodes instead
        of seven.
        """
        # Plain attribute checks first: a no-op ``.to()`` still costs a dispatch per step.
        if example_ids.dtype != torch.long or example_ids.device != self.device:
            example_ids = example_ids.to(self.device, torch.long)
        if example_ids.ndim != 1:
            example_ids = example_ids.reshape(-1)
        outputs = constraints.promoted_outputs(outputs, self.num_outputs)
        store = self.multipliers
        try:
            multipliers = store.gather(example_ids)
        except IndexError:  # index_select checks the range (on a GPU: a device-side assert)
            raise IndexError(f"example ids must lie in [0, {self.num_examples})") from None
        term = constraints.linear_term(
            outputs.detach(), targets, multipliers, form=self.form, num_outputs=self.num_outputs,
            margin=self.margin, damping=self.damping, device=self.device, max_multiplier=self._max_multiplier,
        )
        self._pending.append(
            PendingDualUpdate(example_ids, term.constraint_values, term.labels, multipliers, store.version)
        )
        self._pending_batch_size += int(example_ids.numel())
        # reshape, not view: a network may return a non-contiguous slice (out[:, :K]).
        value = torch.dot(outputs.reshape(-1), _as_dtype(term.coefficients, outputs.dtype).reshape(-1))
        return torch.add(value, _as_dtype(term.constant, outputs.dtype), alpha=term.constant_scale)

    # ------------------------------------------------------------------ stepping
    def norm_value(self) -> float:
        """``R(W) = 1/2 sum ||W||^2`` over the norm parameters."""
        return norm.norm_value(self.norm_parameters, self.norm_anchors)

    def _norm_scale(self) -> float:
        # With no recorded batch (a step without lagrangian) the norm counts in full.
        if self._pending_batch_size == 0:
            return 1.0
        return self._pending_batch_size / self.num_examples

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One weight step of the base optimizer on ``L``, then the dual step."""
        if closure is None:
            norm.add_norm_gradient(self.norm_parameters, self._norm_scale(), self.norm_anchors)
            loss = self.base_optimizer.step()
        else:

            def closure_with_norm() -> Any:
                # Optimizers like LBFGS evaluate the closure several times; only the
                # last evaluation's constraint values drive the dual step.
                self._pending, self._pending_batch_size = [], 0
                with torch.enable_grad():
                    value = closure()
                scale = self._norm_scale()
                norm.add_norm_gradient(self.norm_parameters, scale, self.norm_anchors)
                return value + scale * self.norm_value() if value is not None else value

            loss = self.base_optimizer.step(closure_with_norm)
        self.dual_steps += 1
        self._apply_or_queue_pending()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ capturable step
    def static_step(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        example_ids: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """The whole Minnorm step on a fixed-shape batch, as one capturable function:
        forward, the Lagrangian, backward, the norm term, the weight step, the dual
        step and the per-example records (labels, latest violation, visits, violation
        sums). Every shape is fixed by the batch size, the cap and the norm scale are
        tensors, the gradients are zeroed in place and nothing is read back to the
        host, so a CUDA graph can capture it and ``torch.compile(fullgraph=True)``
        traces it whole. Its dual update is applied at once (no deferred window:
        inside one graph there is no per-operation dispatch for a window to save).

        Parameters
        ----------
        model : nn.Module
            The network trained (run it under autocast from outside if wanted).
        inputs : Tensor, shape (batch, ...)
        targets : Tensor, shape (batch,) or (batch, num_outputs)
            Class indices (margin form) or real targets (equality form), on the
            multipliers' device.
        example_ids : Tensor of int64, shape (batch,)
            Distinct ids on the multipliers' device.
        valid : Tensor of bool, shape (batch,)
            False marks padding: rows of an epoch's last, short batch filled with
            examples the epoch already visited (distinct from the batch's own). They
            go through the network but get no gradient, no dual update and no visit;
            their records are written back unchanged.

        Returns
        -------
        Tensor
            0-dim, detached: the batch's constraint term of the Lagrangian.

        Notes
        -----
        Needs the base optimizer's state (one eager :meth:`step` first: a warm-up).
        Outside a trace the weight step is the base optimizer's own; inside
        ``torch.compile`` it is :func:`~.weights.functional_weight_step` (torch's step
        breaks graphs on purpose). It changes no Python value (a trace would
        specialise on it and recompile every step): the caller counts the step with
        :meth:`count_static_step`.
        """
        if self._pending or self._queued or self._window_examples is not None:
            raise RuntimeError("static_step() cannot run inside deferred_dual_updates() or after lagrangian()")
        # A list of its own, not read through param_groups: dynamo treats optimizers'
        # param_groups specially and then loses gradients written by a traced backward.
        parameters = [p for p in self.trainable_parameters if p.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:  # the first call only
                parameter.grad = torch.zeros_like(parameter)
        # In place, not set to None: the gradients keep their addresses for a graph.
        if parameters:
            torch._foreach_zero_([p.grad for p in parameters])  # type: ignore[misc]
        outputs = constraints.promoted_outputs(model(inputs), self.num_outputs)
        store = self.multipliers
        multipliers = store.gather(example_ids)
        keep = valid.unsqueeze(1)
        term = constraints.linear_term(
            outputs.detach(), targets, multipliers, form=self.form, num_outputs=self.num_outputs,
            margin=self.margin, damping=self.damping, device=self.device, max_multiplier=self.cap_tensor,
            row_mask=keep, check_labels=False,
        )
        value = torch.dot(outputs.reshape(-1), _as_dtype(term.coefficients, outputs.dtype).reshape(-1))
        value = torch.add(value, _as_dtype(term.constant, outputs.dtype), alpha=term.constant_scale)
        value.backward()
        with torch.no_grad():
            # The norm term's share: the batch's real examples over the dataset, a tensor.
            scale = valid.sum().to(torch.float32) / self.num_examples
            norm_parameters = [p for p in self.norm_parameters if p.requires_grad and p.grad is not None]
            if norm_parameters:
                torch._foreach_add_(
                    [p.grad for p in norm_parameters], torch._foreach_mul(norm_parameters, scale)  # type: ignore[misc]
                )
            if torch.compiler.is_compiling():
                functional_weight_step(self.base_optimizer)
            else:
                self.base_optimizer.step()
            self._static_dual_update(example_ids, term, multipliers, valid)
        return value.detach()

    def count_static_step(self) -> None:
        """Bump the Python counters a :meth:`static_step` leaves alone: ``dual_steps``
        and the store's version (a batch read before it is stale after it)."""
        self.dual_steps += 1
        self.multipliers.version += 1

    def _static_dual_update(
        self, ids: torch.Tensor, term: constraints.LinearTerm, current: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """:meth:`apply_dual_updates` for one padded batch: padding rows write back what
        they read (their ids are distinct from the real rows', so no write collides)."""
        keep = valid.unsqueeze(1)
        updated, violation, increment = dual_step(
            current, term.constraint_values, term.labels, form=self.form, dual_lr=self.dual_lr,
            max_multiplier=self.cap_tensor, num_outputs=self.num_outputs, track_violations=self.visits is not None,
        )
        updated = torch.where(keep, updated, current.to(updated.dtype))
        if increment is not None:
            increment = torch.where(keep, increment, torch.zeros_like(increment))
        if term.labels is not None:
            self.labels.index_copy_(0, ids, torch.where(valid, term.labels, self.labels.index_select(0, ids)))
        if self.visits is not None:
            self.visits.index_add_(0, ids, valid.to(self.visits.dtype))
            if self.violation_sums is not None:
                self.violation_sums.index_add_(0, ids, increment)  # type: ignore[arg-type]
        # write, not scatter: no Python counter changes inside a traced or captured step.
        if isinstance(self.multipliers, CompactMultiplierStore):
            self.multipliers.write(ids, updated, increment)
        else:
            self.multipliers.write(ids, updated)
        violation = _as_dtype(violation, self.last_violation.dtype)
        self.last_violation.index_copy_(0, ids, torch.where(valid, violation, self.last_violation.index_select(0, ids)))

    # ------------------------------------------------------------------ running mean
    # ------------------------------------------------------------------ dual side
    def apply_dual_updates(self, pending: list[PendingDualUpdate]) -> None:
        """Projected dual ascent for recorded constraint values (all ranks call it
        with the same merged list in distributed training)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.apply_dual_updates(pending)
        store = self.multipliers
        for update in pending:
            ids = update.example_ids
            if update.multipliers is not None and update.store_version == store.version:
                current = update.multipliers  # read by lagrangian(); nothing changed since
            else:
                current = store.gather(ids)
            updated, violation, increment = dual_step(
                current, update.constraint_values, update.labels, form=self.form, dual_lr=self.dual_lr,
                max_multiplier=self._max_multiplier, num_outputs=self.num_outputs,
                track_violations=self.visits is not None,
            )
            if self.form != "equality":
                self.labels.index_copy_(0, ids, update.labels)
            if self.visits is not None:
                self.visits.index_add_(0, ids, self._visit_ones(ids.numel()))
                if self.violation_sums is not None:
                    self.violation_sums.index_add_(0, ids, increment)
            if isinstance(store, CompactMultiplierStore):
                store.scatter(ids, updated, increment)
            else:
                store.scatter(ids, updated)
            self.last_violation.index_copy_(0, ids, _as_dtype(violation, self.last_violation.dtype))

    @contextlib.contextmanager
    def deferred_dual_updates(self, window_examples: int = DEFERRED_WINDOW_EXAMPLES) -> Iterator[None]:
        """Within the block, :meth:`step` queues its dual update and the queue is applied
        in one pass once it holds ``window_examples`` examples (or
        ``DEFERRED_WINDOW_ELEMENTS`` examples x outputs), and when the block ends.

        The weight steps are unchanged, and the multipliers come out bit for bit as if
        every step had applied its own update, provided no example id appears twice
        within a window: a queued example is not read again before its update lands.
        Use it around one pass over a permutation of the data (one epoch), as
        ``training.fit`` does. An id queued twice within the block raises
        ``RuntimeError`` when the block ends (checked there, once: a check per window
        would stall a GPU's queue every few steps). Reading results
        (:meth:`diagnostics`, scores, :meth:`state_dict`, ...) applies the queue first.

        Why: on a CPU a dual update costs mostly the dispatch of a dozen small tensor
        operations; one pass per window makes it a small share of a training step.
        """
        if window_examples < 1:
            raise ValueError(f"window_examples must be >= 1, got {window_examples}")
        if self._window_examples is not None:
            raise RuntimeError("deferred_dual_updates() blocks cannot be nested")
        self._window_examples = int(window_examples)
        self._block_seen = torch.zeros(self.num_examples, dtype=torch.bool, device=self.device)
        self._block_examples = 0
        completed = False
        try:
            yield
            completed = True
        finally:
            self.flush_dual_updates()
            self._window_examples = None
            seen, self._block_seen = self._block_seen, None
            if completed and seen is not None and int(seen.sum()) != self._block_examples:
                raise RuntimeError(
                    "an example id appeared twice within one deferred_dual_updates() block: its multipliers "
                    "were read before its previous update was applied; defer only over batches of distinct "
                    "examples (one pass over a permutation)"
                )

    def flush_dual_updates(self) -> None:
        """Apply the queued dual updates of :meth:`deferred_dual_updates` (no-op when none)."""
        if not self._queued:
            return
        queued, self._queued, self._queued_examples = self._queued, [], 0
        merged = merge_window(queued, self.multipliers.version)
        if self._block_seen is not None:  # for the repeat check at the block's end
            self._block_seen.index_fill_(0, merged.example_ids, True)
            self._block_examples += int(merged.example_ids.numel())
        self.apply_dual_updates([merged])

    def _visit_ones(self, count: int) -> torch.Tensor:
        """A cached ``(count,)`` int32 tensor of ones for the visit counter."""
        ones = self._ones
        if ones is None or ones.numel() < count:
            ones = self._ones = torch.ones(max(count, 1024), dtype=torch.int32, device=self.device)
        return ones[:count]

    def take_pending(self) -> list[PendingDualUpdate]:
        """Hand over (and clear) the constraint values recorded since the last step."""
        pending, self._pending = self._pending, []
        self._pending_batch_size = 0
        return pending

    def restore_pending(self, pending: list[PendingDualUpdate]) -> None:
        """Hand back recorded updates (e.g. merged across ranks) for the next :meth:`step`,
        which scales the norm term by their example count and applies them."""
        self._pending = list(pending)
        self._pending_batch_size = sum(int(update.example_ids.numel()) for update in pending)

    def _apply_or_queue_pending(self) -> None:
        """After a weight step: apply the step's updates, or queue them inside
        :meth:`deferred_dual_updates` and apply the queue once its window is full."""
        if self._window_examples is None:
            self.apply_dual_updates(self.take_pending())
        else:
            self._queued_examples += self._pending_batch_size
            self._queued.extend(self.take_pending())
            if window_full(self._queued_examples, self._window_examples, self.num_outputs):
                self.flush_dual_updates()

    def accumulate_average(self) -> None:
        """Fold the current multipliers into their running mean over epochs (call once
        per epoch; the mean is the "average" score state of ``training.fit``)."""
        self.flush_dual_updates()
        count = self.average_epochs
        with torch.no_grad():
            self.multipliers.accumulate_average(count / (count + 1), 1 / (count + 1))
        self.average_epochs = count + 1

    # ------------------------------------------------------------------ readout
    def dense_multipliers(self) -> torch.Tensor:
        """The multipliers as an ``(num_examples, num_outputs)`` tensor (a new tensor of
        that full size for the compact store)."""
        self.flush_dual_updates()
        return self.multipliers.dense()

    def dense_average_multipliers(self) -> torch.Tensor:
        """The running mean over epochs (:meth:`accumulate_average`), ``(num_examples, num_outputs)``."""
        self.flush_dual_updates()
        return self.multipliers.dense_average()

    def mean_violations(self) -> torch.Tensor:
        """Mean over each example's visits of ``-g`` per class: the dual ascent before
        the projection onto ``[0, max_multiplier]``, per step of ``dual_lr``.

        Returns
        -------
        Tensor, float32, shape (num_examples, num_outputs), on the multipliers' device
            Margin form: each visit's ``-g_ij`` floored at ``VIOLATION_FLOOR`` (units of
            the outputs, like the margin). With ``K >= 2`` outputs the own-label column
            reads ``VIOLATION_FLOOR`` ("never a competing class"), and so does every
            column of an example not visited yet, in both stores (the compact store's
            classes without a slot read it too). Binary single output: the one column
            is the competing class (0 before the first visit). Equality form: the mean
            of the signed ``g = t - f``, unfloored (0 before the first visit).

        Raises
        ------
        RuntimeError
            Without ``track_violations=True``.
        """
        self.flush_dual_updates()
        if self.visits is None:
            raise RuntimeError("build Minnorm with track_violations=True to read mean violations")
        if isinstance(self.multipliers, CompactMultiplierStore):
            # Classes without a slot were never violated for long: the floor stands in.
            return self.multipliers.dense_mean_violations(self.visits, VIOLATION_FLOOR)
        return readout.mean_violation_rows(
            self.violation_sums, self.visits, self.labels, form=self.form, start=0, stop=self.num_examples
        )  # type: ignore[arg-type]

    def state_rows(self, state: str, start: int, stop: int) -> torch.Tensor:
        """Examples ``start:stop`` of one state, ``(rows, num_outputs)`` in float32:
        ``"final"`` multipliers, their ``"average"`` over epochs, or the mean
        ``"violation"`` (:meth:`mean_violations`). Reading a large dataset's scores a
        block of rows at a time never builds the full examples x classes table."""
        self.flush_dual_updates()
        store = self.multipliers
        if state in ("final", "average"):
            return store.rows(start, stop, average=state == "average").float()
        if state != "violation":
            raise ValueError(f"unknown state {state!r}: use final, average or violation")
        if self.visits is None:
            raise RuntimeError("build Minnorm with track_violations=True to read mean violations")
        if isinstance(store, CompactMultiplierStore):
            return store.mean_violation_rows(self.visits, VIOLATION_FLOOR, start, stop)
        assert self.violation_sums is not None
        return readout.mean_violation_rows(
            self.violation_sums, self.visits, self.labels, form=self.form, start=start, stop=stop
        )

    def multipliers_finite(self) -> bool:
        """True when no multiplier (nor its running mean) is NaN or inf."""
        self.flush_dual_updates()
        return self.multipliers.all_finite()

    def state_nbytes(self) -> int:
        """Bytes of per-example state held now: the store, violations, labels and the
        previous scores."""
        scores = 0 if self._previous_scores is None else self._previous_scores.numel() * self._previous_scores.element_size()
        return (
            self.multipliers.nbytes()
            + self.last_violation.numel() * self.last_violation.element_size()
            + self.labels.numel() * self.labels.element_size()
            + scores
            + sum(t.numel() * t.element_size() for t in (self.visits, self.violation_sums) if t is not None)
        )

    def check_recorded_labels(self) -> None:
        """Binary (single-output) margin form: refuse labels other than 0 and 1 among
        the labels recorded at the dual steps, whatever their device.

        ``lagrangian()`` refuses such labels at once when they come on the CPU; on
        another device a check per batch would stall the host once per step, so this
        one pass over the recorded labels runs at the per-epoch reads instead
        (:meth:`diagnostics`, :meth:`difficulty`, :meth:`suggested_labels`).

        Raises
        ------
        ValueError
            Naming the first offending example and its label.
        """
        self.flush_dual_updates()
        if self.form != "margin" or self.num_outputs != 1:
            return
        labels = self.labels
        # -1 marks "not visited yet"; a visited example has a finite last violation.
        bad = (labels != 0) & (labels != 1) & ~torch.isnan(self.last_violation)
        if bool(bad.any()):
            example = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"the binary (single-output) margin form needs labels 0 or 1, but example {example} "
                f"was trained with label {int(labels[example])}"
            )

    def difficulty(self) -> np.ndarray:
        """Per-example difficulty (higher = more suspect), see :func:`..scoring.difficulty_scores`."""
        self.check_recorded_labels()
        if isinstance(self.multipliers, CompactMultiplierStore):
            # max over competing classes: the slots hold every nonzero multiplier.
            return self.multipliers.row_max().detach().cpu().numpy().astype(np.float64)
        from ..scoring import difficulty_scores

        return difficulty_scores(self.dense_multipliers().detach().cpu().numpy(), form=self.form)

    def suggested_labels(self) -> np.ndarray:
        """The class the multipliers push each example toward (margin form)."""
        self.check_recorded_labels()
        if isinstance(self.multipliers, CompactMultiplierStore):
            maxima, classes = self.multipliers.row_argmax()
            return torch.where(maxima > 0, classes, self.labels).cpu().numpy()
        from ..scoring import suggested_labels

        return suggested_labels(
            self.dense_multipliers().detach().cpu().numpy(), self.labels.cpu().numpy()
        )

    def diagnostics(self) -> dict[str, float]:
        """Convergence figures since the previous call (call once per epoch).

        Returns
        -------
        dict
            ``max_violation``: largest constraint violation at each example's latest visit;
            ``fraction_fitted``: share of examples with all constraints within
            ``fitted_tolerance``; ``multiplier_change``: relative Frobenius change of the
            multipliers since the previous call; ``rank_stability``: Spearman correlation
            of the difficulty scores with those of the previous call;
            ``norm``: ``R(W)``; ``max_multiplier``: the cap ``C`` in force (margin form;
            NaN without a cap and in the equality form); ``fraction_at_cap``: share of
            the visited examples whose largest multiplier is within ``1e-6`` (relative)
            of ``C``, i.e. sits at the soft-margin box (NaN without a cap or before any
            visit; a share near 1 from the second epoch on means ``C`` is so small
            that the method is a plain hinge loss).

        Raises
        ------
        ValueError
            Binary form with recorded labels other than 0 and 1
            (:meth:`check_recorded_labels`).
        """
        self.check_recorded_labels()
        violation = self.last_violation
        visited = ~torch.isnan(violation)
        visited_count = int(visited.sum())
        max_violation = float(violation[visited].max()) if visited_count else float("nan")
        cap = self.max_multiplier if self.form == "margin" else None
        max_multiplier = at_cap = float("nan")
        if cap is not None:
            max_multiplier = float(cap)
            at_cap = readout.fraction_at_cap(self.multipliers, visited, visited_count, float(cap))
        fraction_fitted = float((violation <= self.fitted_tolerance).float().mean())
        multiplier_change = readout.relative_change(self.multipliers.change_since_snapshot())
        # On the device: no examples x classes table comes to the host, one scalar does.
        scores = readout.difficulty_tensor(self.multipliers, form=self.form)
        rank_stability = (
            float("nan") if self._previous_scores is None else spearman_tensors(scores, self._previous_scores)
        )
        self.multipliers.snapshot()
        self._previous_scores = scores
        return {
            "max_violation": max_violation,
            "fraction_fitted": fraction_fitted,
            "multiplier_change": multiplier_change,
            "rank_stability": rank_stability,
            "norm": self.norm_value(),
            "max_multiplier": max_multiplier,
            "fraction_at_cap": at_cap,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"base": base_optimizer.state_dict(), "minnorm": {...}}``; tensors and plain
        values only, so it loads with ``torch.load(weights_only=True)``.

        Like ``torch.optim``'s, the tensors are the live ones (no copy: the compact
        store exists to keep memory down); save them before training on, or clone.
        """
        self.flush_dual_updates()
        return {
            "base": self.base_optimizer.state_dict(),
            "minnorm": {
                "form": self.form,
                "num_examples": self.num_examples,
                "num_outputs": self.num_outputs,
                "margin": self.margin,
                "dual_lr": self.dual_lr,
                "damping": self.damping,
                "dataset_fingerprint": self.dataset_fingerprint,
                "store": self.multipliers.state_dict(),
                "last_violation": self.last_violation,
                "labels": self.labels,
                "dual_steps": self.dual_steps,
                "average_epochs": self.average_epochs,
                "max_multiplier": self.max_multiplier,
                "violation_sums": self.violation_sums,
                "visits": self.visits,
                "previous_scores": self._previous_scores,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a state saved by :meth:`state_dict`, refusing one from another
        dataset or problem with a clear message.

        Raises
        ------
        StateMismatchError
            Before anything is loaded, in one line naming the setting and both values,
            when the saved ``form``, ``num_examples``, ``num_outputs``,
            ``dataset_fingerprint``, ``margin``, ``dual_lr`` or ``damping`` differ from
            this run's (the settings are this run's, never replaced by the saved ones),
            when the multiplier store (kind, slots) differs, or when this run tracks
            violations and the saved state did not.
        """
        if "base" not in state_dict or "minnorm" not in state_dict:
            raise StateMismatchError("not a Minnorm state: expected keys 'base' and 'minnorm'")
        saved = state_dict["minnorm"]
        for key, mine in (
            ("form", self.form),
            ("num_examples", self.num_examples),
            ("num_outputs", self.num_outputs),
            ("dataset_fingerprint", self.dataset_fingerprint),
        ):
            if saved[key] != mine:
                raise StateMismatchError(
                    f"saved Minnorm state has {key}={saved[key]!r} but this run has {mine!r}: "
                    "it belongs to another dataset or problem"
                )
        # The problem's settings are this run's, never silently replaced by the saved ones.
        for key, mine in (("margin", self.margin), ("dual_lr", self.dual_lr), ("damping", self.damping)):
            if float(saved[key]) != mine:
                raise StateMismatchError(
                    f"saved Minnorm state has {key}={float(saved[key])!r} but this run has {mine!r}: "
                    f"build Minnorm with the saved {key} to resume, or start a new run"
                )
        store_state = saved.get("store") or {"kind": "dense", "multipliers": saved["multipliers"]}
        saved_store = (store_state["kind"], store_state.get("slots"))
        if saved_store != (self.multipliers.kind, self.multipliers.slots):
            raise StateMismatchError(
                f"saved Minnorm state uses the {_describe_store(*saved_store)} but this run the "
                f"{_describe_store(self.multipliers.kind, self.multipliers.slots)}: choose the same "
                "multiplier store (and slots) to resume"
            )
        if self.visits is not None and saved.get("visits") is None:
            raise StateMismatchError("saved Minnorm state did not track violations but this run does")
        self.base_optimizer.load_state_dict(state_dict["base"])
        # load_state_dict of the base rebuilds its param_groups list; share it again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._queued, self._queued_examples = [], 0  # updates of the state being replaced
        self.multipliers.load_state_dict(store_state)
        with torch.no_grad():
            self.last_violation.copy_(saved["last_violation"].to(self.device))
            self.labels.copy_(saved["labels"].to(self.device))
        self.dual_steps = int(saved["dual_steps"])
        self.average_epochs = int(saved.get("average_epochs", 0))
        self.max_multiplier = saved.get("max_multiplier", self.max_multiplier)
        if self.visits is not None:
            with torch.no_grad():
                if self.violation_sums is not None:
                    self.violation_sums.copy_(saved["violation_sums"].to(self.device))
                self.visits.copy_(saved["visits"].to(self.device))
        previous_scores = saved.get("previous_scores")
        if previous_scores is not None:  # float64, float32 on MPS (no float64 there)
            score_dtype = torch.float32 if self.device.type == "mps" else torch.float64
            previous_scores = previous_scores.to(self.device, score_dtype).clone()
        self._previous_scores = previous_scores
        self._pending, self._pending_batch_size = [], 0



def _norm_anchors(
    parameters: list[nn.Parameter], anchor: str | Mapping[nn.Parameter, torch.Tensor] | None
) -> list[torch.Tensor | None] | None:
    """One detached ``W0`` per norm parameter (None: anchored at 0), or None when none is."""
    if anchor is None:
        return None
    if isinstance(anchor, str):
        if anchor != "initial":
            raise ValueError(f"norm_anchor must be 'initial', a mapping of parameters to tensors or None, got {anchor!r}")
        return [p.detach().clone() for p in parameters]
    anchors: list[torch.Tensor | None] = []
    for p in parameters:
        value = anchor.get(p)
        if value is not None and tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"norm_anchor: a tensor of shape {tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")
        anchors.append(None if value is None else value.detach().to(p.device, p.dtype).clone())
    return anchors
