"""Which parameters enter the norm term ``R(W) = 1/2 sum_l ||W_l||_F^2``, its value and
its gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORMALIZATION_TYPES = _NORMALIZATION_TYPES + (nn.RMSNorm,)


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


def norm_value(parameters: Sequence[nn.Parameter]) -> float:
    """``R(W) = 1/2 sum ||W||^2`` over ``parameters`` (in float32 or wider)."""
    with torch.no_grad():
        return 0.5 * float(
            sum(p.detach().to(torch.promote_types(p.dtype, torch.float32)).pow(2).sum() for p in parameters)
        )


def add_norm_gradient(parameters: Sequence[nn.Parameter], scale: float) -> None:
    """``grad += scale * W`` for every parameter that requires grad (a missing ``.grad``
    starts at zero): the norm term's share of one weight step. Call under no_grad;
    ``.grad`` tensors never require grad."""
    parameters = [p for p in parameters if p.requires_grad]
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    if parameters:
        torch._foreach_add_([p.grad for p in parameters], parameters, alpha=scale)
