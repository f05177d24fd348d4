"""Minnorm with the norm of the CHANGE (``norm_anchor``): started at W0, a linear model
converges to W0 plus the minimum-norm correction, in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minnorm_audit.minnorm import Minnorm, relative_error


def anchored_problem(num_examples=40, num_features=120):
    """Under-determined least squares, a start W0 far from the row space, and the
    closed form: W* = W0 + (T - X W0^T)^T X^+^T, i.e. W0 plus the min-norm correction."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(num_examples, num_features, generator=generator, dtype=torch.float64) / num_features**0.5
    targets = torch.randn(num_examples, 3, generator=generator, dtype=torch.float64)
    start = torch.randn(3, num_features, generator=generator, dtype=torch.float64)
    residual = targets - inputs @ start.T
    correction = (torch.linalg.pinv(inputs) @ residual).T
    largest = float(torch.linalg.eigvalsh(inputs @ inputs.T).max())
    return inputs, targets, start, start + correction, largest


def train(model, inputs, targets, largest, *, norm_anchor, iterations=600):
    optimizer = Minnorm(
        torch.optim.SGD([model.weight], lr=1.0), num_examples=len(inputs), num_outputs=3, form="equality",
        dual_lr=0.5 / largest, model=model, multiplier_dtype=torch.float64, norm_anchor=norm_anchor,
    )
    ids = torch.arange(len(inputs))
    for _ in range(iterations):
        optimizer.zero_grad()
        optimizer.lagrangian(model(inputs), targets, ids).backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("anchor_kind", ["initial", "mapping"])
def test_anchored_linear_model_reaches_start_plus_min_norm_correction(anchor_kind):
    inputs, targets, start, expected, largest = anchored_problem()
    model = nn.Linear(inputs.shape[1], 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(start)
    anchor = "initial" if anchor_kind == "initial" else {model.weight: start.clone()}
    optimizer = train(model, inputs, targets, largest, norm_anchor=anchor)
    assert relative_error(model.weight.detach(), expected) <= 1e-4
    # Measured: relative error 2e-11, largest residual 5e-11 after 600 steps.
    # The interpolant it reached fits the targets, and the norm term is the change's.
    assert torch.allclose(inputs @ model.weight.detach().T, targets, atol=1e-6)
    assert optimizer.norm_value() == pytest.approx(0.5 * float((expected - start).pow(2).sum()), rel=1e-4)


def test_without_an_anchor_the_same_start_goes_to_the_plain_min_norm_interpolant():
    """The control: the anchor is what moves the answer (W0 is far from X^+ T)."""
    inputs, targets, start, expected, largest = anchored_problem()
    model = nn.Linear(inputs.shape[1], 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(start)
    train(model, inputs, targets, largest, norm_anchor=None)
    plain = (torch.linalg.pinv(inputs) @ targets).T
    assert relative_error(model.weight.detach(), plain) <= 1e-4
    assert relative_error(model.weight.detach(), expected) > 0.5


def test_bad_anchor_is_refused_in_one_line():
    model = nn.Linear(4, 3, bias=False)
    with pytest.raises(ValueError, match="shape"):
        Minnorm(torch.optim.SGD(model.parameters(), lr=1.0), num_examples=2, num_outputs=3,
                norm_anchor={model.weight: torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="norm_anchor must be"):
        Minnorm(torch.optim.SGD(model.parameters(), lr=1.0), num_examples=2, num_outputs=3, norm_anchor="start")
