"""The base optimizer's weight step as plain tensor operations, for a traced step.

``torch.optim``'s ``step`` breaks a ``torch.compile`` graph on purpose (its
``_use_grad`` wrapper calls ``torch._dynamo.graph_break()``), so a step compiled with
``fullgraph=True`` cannot call it. :func:`functional_weight_step` is the same update
(Adam, AdamW, SGD; torch's single-tensor formulas with the step count as a tensor, as
their ``capturable`` form) read from and written to the optimizer's own
``param_groups`` and ``state``: a traced step and an eager one share one optimizer
state. It equals torch's step up to rounding (the fused kernels order some operations
differently). Outside a trace :class:`~.optimizer.Minnorm` calls torch's own step.
"""

from __future__ import annotations

import torch


def functional_weight_step(optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer`` (Adam, AdamW or SGD) on the parameters' ``.grad``,
    in place. Call under no_grad, after at least one step of the optimizer itself (its
    state, e.g. Adam's moments, must exist: a warm-up step creates it).

    Raises
    ------
    ValueError
        Another optimizer, or an option these formulas leave out (amsgrad, maximize),
        or a parameter without its optimizer state yet.
    """
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        for group in optimizer.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("the traced weight step does not do Adam's amsgrad or maximize options")
            decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
            for parameter in group["params"]:
                if parameter.grad is not None:
                    _adam_update(parameter, optimizer.state, group, decoupled)
        return
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group.get("maximize"):
                raise ValueError("the traced weight step does not do SGD's maximize option")
            for parameter in group["params"]:
                if parameter.grad is not None:
                    _sgd_update(parameter, optimizer.state, group)
        return
    raise ValueError(f"the traced weight step supports Adam, AdamW and SGD, not {type(optimizer).__name__}")


def _state_of(parameter: torch.Tensor, state: dict, keys: tuple[str, ...]) -> dict:
    entry = state.get(parameter)
    if not entry or any(key not in entry for key in keys):
        raise ValueError("the traced weight step needs the optimizer's state: take one eager step first (warm-up)")
    return entry


def _adam_update(parameter: torch.Tensor, state: dict, group: dict, decoupled: bool) -> None:
    entry = _state_of(parameter, state, ("step", "exp_avg", "exp_avg_sq"))
    grad, step_count = parameter.grad, entry["step"]
    exp_avg, exp_avg_sq = entry["exp_avg"], entry["exp_avg_sq"]
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    step_count.add_(1)
    if weight_decay != 0:
        if decoupled:
            parameter.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(parameter, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # The step count is a tensor: no host read, as torch's capturable form.
    bias_correction1 = 1 - torch.pow(beta1, step_count)
    bias_correction2_sqrt = (1 - torch.pow(beta2, step_count)).sqrt()
    denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    parameter.sub_(exp_avg / denominator * (lr / bias_correction1))


def _sgd_update(parameter: torch.Tensor, state: dict, group: dict) -> None:
    grad = parameter.grad
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    if weight_decay != 0:
        grad = grad.add(parameter, alpha=weight_decay)
    if momentum != 0:
        buffer = _state_of(parameter, state, ("momentum_buffer",))["momentum_buffer"]
        if buffer is None:
            raise ValueError("the traced weight step needs SGD's momentum buffer: take one eager step first")
        buffer.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
    parameter.add_(grad, alpha=-lr)
