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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import constraints, norm
from .common import ConstraintForm, StateMismatchError, _as_dtype
from .dual import DualAscentMixin, PendingDualUpdate
from .eager import EagerOptimizerMixin
from .planner import DEFAULT_MEMORY_BUDGET_BYTES, StoreChoice, build_store
from .readout import ReadoutMixin
from .stores import CompactMultiplierStore, MultiplierStore, _describe_store


class Minnorm(DualAscentMixin, ReadoutMixin, EagerOptimizerMixin, torch.optim.Optimizer):
    """Minnorm training around any ``torch.optim.Optimizer``.

    The wrapper shares ``param_groups`` and ``state`` with ``base_optimizer`` so LR
    schedulers and ``isinstance(opt, Optimizer)`` checks keep working. The dual step and
    the deferred window are :class:`~.dual.DualAscentMixin`'s methods, the read methods
    (multipliers, scores, diagnostics) :class:`~.readout.ReadoutMixin`'s. Building it
    and stepping it import no ``torch._dynamo`` (:mod:`.eager`) when the base optimizer
    is one of :mod:`.eager`'s (``training.fit`` builds those).

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
        self._max_multiplier: float | None = None
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
    @property
    def max_multiplier(self) -> float | None:
        """Upper bound ``C`` on every ``lambda_ij`` (None: hard margin)."""
        return self._max_multiplier

    @max_multiplier.setter
    def max_multiplier(self, value: float | None) -> None:
        # Queued dual steps were taken under the bound in force then.
        self.flush_dual_updates()
        self._max_multiplier = None if value is None else float(value)

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

    # ------------------------------------------------------------------ running mean
    def accumulate_average(self) -> None:
        """Fold the current multipliers into their running mean over epochs (call once
        per epoch; the mean is the "average" score state of ``training.fit``)."""
        self.flush_dual_updates()
        count = self.average_epochs
        with torch.no_grad():
            self.multipliers.accumulate_average(count / (count + 1), 1 / (count + 1))
        self.average_epochs = count + 1

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
