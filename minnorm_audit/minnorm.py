"""Minnorm training (Bansal, Advani, Cox, Saxe 2018) as a wrapper around any torch optimizer.

The problem (see ``shared/design/ALGORITHM.md``)::

    minimize   R(W) = 1/2 * sum_l ||W_l||_F^2
    subject to every example's constraint

Two constraint families:

``"equality"`` (regression)
    ``g_i = t_i - f(x_i) = 0``; one multiplier per example and output, any sign;
    ``L = R + sum_i mu_i . g_i``.
``"margin"`` (classification)
    ``g_ij = f_{y_i}(x_i) - f_j(x_i) - m >= 0`` for every competing class ``j``;
    multipliers ``lambda_ij >= 0``; ``L = R - sum_ij lambda_ij g_ij``.
    A network with a single output is the binary form: ``g_i = s_i f(x_i) - m`` with
    ``s_i = +1`` for label 1 and ``-1`` for label 0.

Dynamics: one step of the wrapped optimizer on ``L`` (descent on the weights), then
projected dual ascent on the batch's multipliers::

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

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

ConstraintForm = Literal["margin", "equality"]

_NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORMALIZATION_TYPES = _NORMALIZATION_TYPES + (nn.RMSNorm,)


class StateMismatchError(ValueError):
    """A saved Minnorm state does not belong to this dataset or problem."""


def default_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that enter the norm term ``R(W)`` for ``model``.

    Weight matrices and convolution kernels (parameters with two or more dimensions)
    are included; biases, normalization-layer parameters and the weights of a layer
    whose output goes straight into a normalization layer are excluded, because a
    normalization makes that layer's norm free to shrink (the min-norm problem would
    be degenerate). "Straight into" is read from module registration order, which is
    the data-flow order for ``nn.Sequential`` and for torchvision's ResNet/VGG blocks.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of torch.nn.Parameter
    """
    leaves = [module for module in model.modules() if not list(module.children())]
    feeding_normalization: set[int] = set()
    for current, following in zip(leaves, leaves[1:]):
        if isinstance(following, _NORMALIZATION_TYPES):
            feeding_normalization.add(id(current))
    selected: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in leaves:
        if isinstance(module, _NORMALIZATION_TYPES) or id(module) in feeding_normalization:
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.ndim >= 2 and id(parameter) not in seen:
                seen.add(id(parameter))
                selected.append(parameter)
    return selected


class DenseMultiplierStore:
    """All multipliers in one ``(num_examples, width)`` tensor on the training device.

    For the margin form ``width`` is the number of outputs (the column of an example's
    own label is kept at zero), for the equality form the number of targets.
    """

    def __init__(
        self,
        num_examples: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.values = torch.zeros(num_examples, width, device=device, dtype=dtype)

    @property
    def num_examples(self) -> int:
        return self.values.shape[0]

    @property
    def width(self) -> int:
        return self.values.shape[1]

    def gather(self, example_ids: torch.Tensor) -> torch.Tensor:
        return self.values.index_select(0, example_ids)

    def scatter(self, example_ids: torch.Tensor, values: torch.Tensor) -> None:
        self.values.index_copy_(0, example_ids, values.to(self.values.dtype))

    def dense(self) -> torch.Tensor:
        return self.values


@dataclass
class PendingDualUpdate:
    """Constraint values of one forward pass, applied to the multipliers by ``step()``."""

    example_ids: torch.Tensor
    constraint_values: torch.Tensor
    labels: torch.Tensor | None


class Minnorm(torch.optim.Optimizer):
    """Minnorm training around any ``torch.optim.Optimizer``.

    The wrapper shares ``param_groups`` and ``state`` with ``base_optimizer`` so LR
    schedulers and ``isinstance(opt, Optimizer)`` checks keep working.

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
            self.norm_parameters = default_norm_parameters(model)
        else:
            self.norm_parameters = [p for p in all_parameters if p.ndim >= 2]

        if device is None:
            device = all_parameters[0].device if all_parameters else torch.device("cpu")
        self.form: ConstraintForm = form
        self.num_outputs = int(num_outputs)
        self.margin = float(margin)
        self.dual_lr = float(dual_lr)
        self.damping = float(damping)
        self.dataset_fingerprint = str(dataset_fingerprint)
        self.fitted_tolerance = float(fitted_tolerance)
        self.multipliers = DenseMultiplierStore(
            num_examples, num_outputs, device=device, dtype=multiplier_dtype
        )
        # Largest violation seen at each example's latest visit; NaN until first visit.
        self.last_violation = torch.full(
            (num_examples,), float("nan"), device=device, dtype=multiplier_dtype
        )
        self.labels = torch.full((num_examples,), -1, dtype=torch.long, device=device)
        self._pending: list[PendingDualUpdate] = []
        self._pending_batch_size = 0
        self._previous_multipliers: torch.Tensor | None = None
        self._previous_scores: np.ndarray | None = None
        self.dual_steps = 0

    # ------------------------------------------------------------------ constraints
    @property
    def num_examples(self) -> int:
        return self.multipliers.num_examples

    @property
    def device(self) -> torch.device:
        return self.multipliers.values.device

    def constraint_values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``g`` for a batch, shape ``(batch, num_outputs)``, in float32 or wider.

        Margin form: ``g_ij = f_y - f_j - margin`` (the own-label column is 0 and is
        ignored); binary single-output form: ``s * f - margin``. Equality form:
        ``t - f``.
        """
        # Half-precision outputs (autocast) are promoted; float64 stays float64.
        outputs = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
        if outputs.ndim == 1:
            outputs = outputs.unsqueeze(1)
        if outputs.shape[1] != self.num_outputs:
            raise ValueError(
                f"the network has {outputs.shape[1]} outputs but Minnorm was built for {self.num_outputs}"
            )
        if self.form == "equality":
            targets = targets.to(outputs.dtype).reshape(outputs.shape)
            return targets - outputs
        labels = targets.long().reshape(-1)
        if self.num_outputs == 1:
            if labels.device.type == "cpu" and bool(((labels != 0) & (labels != 1)).any()):
                raise ValueError("the binary (single-output) margin form needs labels 0 or 1")
            signs = labels.to(outputs.dtype).mul(2).sub(1).unsqueeze(1)
            return signs * outputs - self.margin
        own = outputs.gather(1, labels.unsqueeze(1))
        return own - outputs - self.margin

    def _competing_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """1 for every (example, competing class) pair, 0 on the own-label column."""
        if self.num_outputs == 1:
            return torch.ones(labels.shape[0], 1, device=labels.device)
        mask = torch.ones(labels.shape[0], self.num_outputs, device=labels.device)
        mask.scatter_(1, labels.unsqueeze(1), 0.0)
        return mask

    def effective_multipliers(
        self, multipliers: torch.Tensor, constraint_values: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Augmented-Lagrangian multipliers used in the weight step."""
        if self.form == "equality":
            return multipliers + self.damping * constraint_values
        effective = torch.relu(multipliers - self.damping * constraint_values)
        return effective * self._competing_mask(labels)

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
        targets : Tensor
            Class indices (margin form) or real targets (equality form).
        example_ids : Tensor of int, shape (batch,)

        Returns
        -------
        Tensor
            Scalar: ``+sum mu_eff . g`` (equality) or ``-sum lambda_eff * g`` (margin).
        """
        example_ids = example_ids.to(self.device, torch.long).reshape(-1)
        # The range check reads values back, a sync on a GPU: done on the CPU only.
        if example_ids.device.type == "cpu" and example_ids.numel() and (
            int(example_ids.min()) < 0 or int(example_ids.max()) >= self.num_examples
        ):
            raise IndexError(f"example ids must lie in [0, {self.num_examples})")
        constraint_values = self.constraint_values(outputs, targets)
        labels = None if self.form == "equality" else targets.long().reshape(-1).to(self.device)
        detached = constraint_values.detach()
        effective = self.effective_multipliers(self.multipliers.gather(example_ids), detached, labels)
        self._pending.append(PendingDualUpdate(example_ids, detached, labels))
        self._pending_batch_size += int(example_ids.numel())
        term = (effective.to(constraint_values.dtype) * constraint_values).sum()
        return term if self.form == "equality" else -term

    # ------------------------------------------------------------------ stepping
    def norm_value(self) -> float:
        """``R(W) = 1/2 sum ||W||^2`` over the norm parameters."""
        with torch.no_grad():
            return 0.5 * float(
                sum(p.detach().to(torch.promote_types(p.dtype, torch.float32)).pow(2).sum() for p in self.norm_parameters)
            )

    def _add_norm_gradient(self, scale: float) -> None:
        parameters = [p for p in self.norm_parameters if p.requires_grad]
        with torch.no_grad():
            for parameter in parameters:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            if parameters:
                torch._foreach_add_([p.grad for p in parameters], parameters, alpha=scale)

    def _norm_scale(self) -> float:
        # With no recorded batch (a step without lagrangian) the norm counts in full.
        if self._pending_batch_size == 0:
            return 1.0
        return self._pending_batch_size / self.num_examples

    def apply_dual_updates(self, pending: list[PendingDualUpdate]) -> None:
        """Projected dual ascent for recorded constraint values (all ranks call it
        with the same merged list in distributed training)."""
        with torch.no_grad():
            for update in pending:
                ids = update.example_ids
                g = update.constraint_values
                current = self.multipliers.gather(ids)
                if self.form == "equality":
                    updated = current + self.dual_lr * g
                    violation = g.abs().amax(dim=1)
                else:
                    mask = self._competing_mask(update.labels)
                    updated = torch.relu(current - self.dual_lr * g) * mask
                    violation = (torch.relu(-g) * mask).amax(dim=1)
                    self.labels.index_copy_(0, ids, update.labels)
                self.multipliers.scatter(ids, updated)
                self.last_violation.index_copy_(0, ids, violation)
            self.dual_steps += 1

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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One weight step of the base optimizer on ``L``, then the dual step."""
        if closure is None:
            self._add_norm_gradient(self._norm_scale())
            loss = self.base_optimizer.step()
        else:

            def closure_with_norm() -> Any:
                # Optimizers like LBFGS evaluate the closure several times; only the
                # last evaluation's constraint values drive the dual step.
                self._pending, self._pending_batch_size = [], 0
                with torch.enable_grad():
                    value = closure()
                scale = self._norm_scale()
                self._add_norm_gradient(scale)
                return value + scale * self.norm_value() if value is not None else value

            loss = self.base_optimizer.step(closure_with_norm)
        self.apply_dual_updates(self.take_pending())
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ outputs
    def dense_multipliers(self) -> torch.Tensor:
        """The multipliers as an ``(num_examples, num_outputs)`` tensor."""
        return self.multipliers.dense()

    def difficulty(self) -> np.ndarray:
        """Per-example difficulty (higher = more suspect), see :func:`scores.difficulty_scores`."""
        from .scores import difficulty_scores

        return difficulty_scores(self.dense_multipliers().detach().cpu().numpy(), form=self.form)

    def suggested_labels(self) -> np.ndarray:
        """The class the multipliers push each example toward (margin form)."""
        from .scores import suggested_labels

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
            ``norm``: ``R(W)``.
        """
        current = self.dense_multipliers().detach().float()
        violation = self.last_violation
        visited = ~torch.isnan(violation)
        max_violation = float(violation[visited].max()) if bool(visited.any()) else float("nan")
        fraction_fitted = float((violation <= self.fitted_tolerance).float().mean())
        if self._previous_multipliers is None:
            multiplier_change = float("nan")
        else:
            previous_norm = float(self._previous_multipliers.norm())
            change = float((current - self._previous_multipliers).norm())
            multiplier_change = change / previous_norm if previous_norm > 0 else float("inf") if change > 0 else 0.0
        scores = self.difficulty()
        rank_stability = (
            float("nan") if self._previous_scores is None else spearman(scores, self._previous_scores)
        )
        self._previous_multipliers = current.clone()
        self._previous_scores = scores
        return {
            "max_violation": max_violation,
            "fraction_fitted": fraction_fitted,
            "multiplier_change": multiplier_change,
            "rank_stability": rank_stability,
            "norm": self.norm_value(),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"base": base_optimizer.state_dict(), "minnorm": {...}}``; tensors and plain
        values only, so it loads with ``torch.load(weights_only=True)``."""
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
                "multipliers": self.dense_multipliers().detach().clone(),
                "last_violation": self.last_violation.clone(),
                "labels": self.labels.clone(),
                "dual_steps": self.dual_steps,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a state saved by :meth:`state_dict`, refusing one from another
        dataset or problem with a clear message."""
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
        self.base_optimizer.load_state_dict(state_dict["base"])
        # load_state_dict of the base rebuilds its param_groups list; share it again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.margin = float(saved["margin"])
        self.dual_lr = float(saved["dual_lr"])
        self.damping = float(saved["damping"])
        with torch.no_grad():
            self.multipliers.values.copy_(saved["multipliers"].to(self.device))
            self.last_violation.copy_(saved["last_violation"].to(self.device))
            self.labels.copy_(saved["labels"].to(self.device))
        self.dual_steps = int(saved["dual_steps"])
        self._pending, self._pending_batch_size = [], 0


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for constant input."""
    first_ranks = _average_ranks(np.asarray(first, dtype=np.float64))
    second_ranks = _average_ranks(np.asarray(second, dtype=np.float64))
    if first_ranks.std() == 0 or second_ranks.std() == 0:
        return float("nan")
    return float(np.corrcoef(first_ranks, second_ranks)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts
    return (first_rank + 0.5 * (counts - 1))[inverse].astype(np.float64)


def relative_error(estimate: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """``||estimate - reference|| / ||reference||``."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(estimate - reference) / max(np.linalg.norm(reference), math.ulp(1.0)))
