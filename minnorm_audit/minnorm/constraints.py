"""The two constraint forms of the primal side.

``"equality"`` (regression)
    ``g_i = t_i - f(x_i) = 0``; one multiplier per example and output, any sign;
    ``L = R + sum_i mu_i . g_i``.
``"margin"`` (classification)
    ``g_ij = f_{y_i}(x_i) - f_j(x_i) - m >= 0`` for every competing class ``j``;
    multipliers ``lambda_ij >= 0``; ``L = R - sum_ij lambda_ij g_ij``.
    A network with a single output is the binary form: ``g_i = s_i f(x_i) - m`` with
    ``s_i = +1`` for label 1 and ``-1`` for label 0.

Here: the constraint values ``g`` of a batch, the augmented-Lagrangian multipliers of
the weight step and the batch's constraint term of the Lagrangian as a linear form in
the outputs. Functions of the problem's settings (form, outputs, margin, damping),
which :class:`~.optimizer.Minnorm` passes in at each call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .common import ConstraintForm, _as_dtype, clamp_to_box_


def promoted_outputs(outputs: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """``outputs`` as ``(batch, num_outputs)`` in float32 or wider."""
    # Half-precision outputs (autocast) are promoted; float64 stays float64.
    if outputs.dtype not in (torch.float32, torch.float64):
        outputs = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    if outputs.ndim == 1:
        outputs = outputs.unsqueeze(1)
    if outputs.shape[1] != num_outputs:
        raise ValueError(
            f"the network has {outputs.shape[1]} outputs but Minnorm was built for {num_outputs}"
        )
    return outputs


def margin_values(
    outputs: torch.Tensor, labels: torch.Tensor, *, num_outputs: int, margin: float, check_labels: bool = True
) -> torch.Tensor:
    """``g`` of the margin form (binary when ``num_outputs == 1``); own-label column 0.

    Binary form: labels other than 0 and 1 raise ``ValueError`` here when they are on
    the CPU (the check costs no device sync there). On another device checking each
    batch would stall the host once per step, so :class:`~.optimizer.Minnorm` checks the
    labels it recorded instead, at its per-epoch reads (``diagnostics()``,
    ``state_dict()``, the scores); so does a captured step (``check_labels=False``).
    """
    if num_outputs == 1:
        if check_labels and labels.device.type == "cpu" and bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError("the binary (single-output) margin form needs labels 0 or 1")
        signs = labels.to(outputs.dtype).mul(2).sub(1).unsqueeze(1)
        return signs * outputs - margin
    own = outputs.gather(1, labels.unsqueeze(1))
    return own - outputs - margin


def competing_mask(labels: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """1 for every (example, competing class) pair, 0 on the own-label column."""
    if num_outputs == 1:
        return torch.ones(labels.shape[0], 1, device=labels.device)
    mask = torch.ones(labels.shape[0], num_outputs, device=labels.device)
    mask.scatter_(1, labels.unsqueeze(1), 0.0)
    return mask


def constraint_values(
    outputs: torch.Tensor, targets: torch.Tensor, *, form: ConstraintForm, num_outputs: int, margin: float
) -> torch.Tensor:
    """``g`` for a batch, see :meth:`.optimizer.Minnorm.constraint_values`."""
    outputs = promoted_outputs(outputs, num_outputs)
    if form == "equality":
        targets = targets.to(outputs.device, outputs.dtype).reshape(outputs.shape)
        return targets - outputs
    return margin_values(
        outputs, targets.to(outputs.device, torch.long).reshape(-1), num_outputs=num_outputs, margin=margin
    )


def effective_multipliers(
    multipliers: torch.Tensor,
    constraint_values: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    form: ConstraintForm,
    num_outputs: int,
    damping: float,
    max_multiplier: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Augmented-Lagrangian multipliers used in the weight step: margin form
    ``clip(lambda - damping * g, 0, max_multiplier)`` (the soft-margin box applies here
    too, so the fixed point is the C-SVM's), equality form ``mu + damping * g``."""
    if form == "equality":
        return multipliers + damping * constraint_values
    # The arithmetic of lagrangian(): one add with alpha, then the box.
    effective = clamp_to_box_(torch.add(multipliers, constraint_values, alpha=-damping), max_multiplier)
    return effective * competing_mask(labels, num_outputs)


class LinearTerm(NamedTuple):
    """A batch's constraint term as ``outputs . coefficients + constant_scale * constant``.

    ``labels`` (long, on the multipliers' device; None in the equality form) and
    ``constraint_values`` (``g``, detached) are what the batch's dual step needs.
    """

    labels: torch.Tensor | None
    constraint_values: torch.Tensor
    coefficients: torch.Tensor
    constant: torch.Tensor
    constant_scale: float


def linear_term(
    detached: torch.Tensor,
    targets: torch.Tensor,
    multipliers: torch.Tensor,
    *,
    form: ConstraintForm,
    num_outputs: int,
    margin: float,
    damping: float,
    device: torch.device,
    max_multiplier: float | torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    check_labels: bool = True,
) -> LinearTerm:
    """The constraint term of :meth:`.optimizer.Minnorm.lagrangian` for the promoted,
    detached ``outputs`` and the batch's ``multipliers``.

    The term is linear in the outputs once the multipliers are fixed, so it is built as
    ``outputs . C + constant`` with ``C = d term / d outputs`` computed without
    autograd: the gradient reaching the network is the one autograd gives for
    ``-sum lambda_eff * g`` (bit for bit: ``-lambda_eff`` on competing columns, the row
    sum on the own-label column).

    ``max_multiplier`` may be a 0-dim tensor (a captured step's cap). ``row_mask``,
    ``(batch, 1)`` bool: rows where it is False (padding) get zero effective
    multipliers, so they add nothing to the term or its gradient.
    """
    # Worked in the wider of the two dtypes. Every tensor here is detached: no graph
    # is built.
    work_dtype = multipliers.dtype
    if work_dtype != detached.dtype:
        work_dtype = torch.promote_types(work_dtype, detached.dtype)
    labels: torch.Tensor | None
    if form == "equality":
        labels = None
        # Targets may come on another device or in another dtype (float64 from numpy).
        target_values = targets.to(detached.device, detached.dtype).reshape(detached.shape)
        constraint_values = target_values - detached
        effective = _as_dtype(constraint_values * damping, work_dtype)
        torch.add(_as_dtype(multipliers, work_dtype), effective, out=effective)
        if row_mask is not None:
            effective = effective * row_mask
        coefficients = effective.neg()  # d(sum mu_eff . (t - f)) / d f
        constant = (effective * target_values).sum()
        constant_scale = 1.0
    else:
        labels = targets
        if labels.dtype != torch.long or labels.device != device:
            labels = labels.to(device, torch.long)
        if labels.ndim != 1:
            labels = labels.reshape(-1)
        constraint_values = margin_values(
            detached, labels, num_outputs=num_outputs, margin=margin, check_labels=check_labels
        )
        # lambda - damping * g in one pass (promoted to the wider dtype), then the box
        # [0, C]: without the upper bound the weight step pushes a capped example with
        # up to C + damping * |g|, and the fixed point is not the soft-margin problem's.
        effective = clamp_to_box_(torch.add(multipliers, constraint_values, alpha=-damping), max_multiplier)
        if row_mask is not None:
            effective = effective * row_mask
        if num_outputs == 1:
            # -sum lambda_eff (s f - m): d/df = -lambda_eff * s.
            signs = labels.unsqueeze(1).to(work_dtype).mul_(2).sub_(1)
            coefficients = effective.neg().mul_(signs)
            constant = effective.sum()
            constant_scale = margin
        else:
            # -sum_j lambda_eff_j (f_y - f_j - m): d/df_j = lambda_eff_j, d/df_y = -sum_j lambda_eff_j.
            own = labels.unsqueeze(1)
            coefficients = effective.scatter_(1, own, 0.0)
            row_sums = coefficients.sum(dim=1, keepdim=True).neg_()
            coefficients.scatter_(1, own, row_sums)
            constant = row_sums.sum()
            constant_scale = -margin
    return LinearTerm(labels, constraint_values, coefficients, constant, constant_scale)
