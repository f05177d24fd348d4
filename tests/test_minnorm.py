"""The Minnorm trainer against closed forms (min-norm interpolant, SVM, KKT) and a
plain reference loop."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from torch import nn

from minnorm_audit.minnorm import (
    Minnorm,
    StateMismatchError,
    default_norm_parameters,
    relative_error,
    spearman,
)

svm = pytest.importorskip("sklearn.svm")


def full_batch_minnorm(model, inputs, targets, *, form, num_outputs, dual_lr, damping, iterations, lrs=(1.0, 1.0)):
    """Full-batch SGD Minnorm on a linear model in float64."""
    groups = [{"params": [model.weight], "lr": lrs[0]}]
    if model.bias is not None:
        groups.append({"params": [model.bias], "lr": lrs[1]})
    optimizer = Minnorm(
        torch.optim.SGD(groups),
        num_examples=len(inputs),
        num_outputs=num_outputs,
        form=form,
        dual_lr=dual_lr,
        damping=damping,
        model=model,
        multiplier_dtype=torch.float64,
    )
    example_ids = torch.arange(len(inputs))
    for _ in range(iterations):
        optimizer.zero_grad()
        optimizer.lagrangian(model(inputs), targets, example_ids).backward()
        optimizer.step()
    return optimizer


def test_regression_form_reaches_min_norm_interpolant_and_closed_form_dual():
    generator = torch.Generator().manual_seed(0)
    num_examples, num_features = 50, 200
    inputs = torch.randn(num_examples, num_features, generator=generator, dtype=torch.float64) / num_features**0.5
    targets = torch.randn(num_examples, 3, generator=generator, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Linear(num_features, 3, bias=False).double()  # random init: not in the row space
    gram = inputs @ inputs.T
    step = 1.0 / float(torch.linalg.eigvalsh(gram).max())
    optimizer = full_batch_minnorm(
        model, inputs, targets, form="equality", num_outputs=3, dual_lr=step, damping=step, iterations=300
    )
    min_norm_weights = (torch.linalg.pinv(inputs) @ targets).T
    closed_form_dual = torch.linalg.solve(gram, targets)
    assert relative_error(model.weight.detach(), min_norm_weights) <= 1e-6
    assert relative_error(optimizer.dense_multipliers(), closed_form_dual) <= 1e-6


def separable_binary(num_examples: int, num_features: int, seed: int):
    """Gaussian points labelled by a hyperplane with an offset, a gap of 0.5 around it."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(num_features)
    direction[:2] = [1.0, 0.5]
    direction /= np.linalg.norm(direction)
    points = rng.normal(size=(4 * num_examples, num_features))
    signed = points @ direction + 0.2
    keep = np.abs(signed) > 0.25
    return points[keep][:num_examples], (signed[keep][:num_examples] > 0).astype(np.int64)


@pytest.mark.parametrize(("num_examples", "num_features", "iterations"), [(40, 2, 4000), (200, 50, 6000)])
def test_margin_form_matches_hard_margin_svm(num_examples, num_features, iterations):
    points, labels = separable_binary(num_examples, num_features, seed=0)
    reference = svm.SVC(kernel="linear", C=1e6, tol=1e-12).fit(points, 2 * labels - 1)
    reference_alpha = np.zeros(len(points))
    reference_alpha[reference.support_] = np.abs(reference.dual_coef_[0])

    inputs = torch.tensor(points)
    model = nn.Linear(num_features, 1).double()
    step = 1.9 / float(np.linalg.eigvalsh(points @ points.T).max())
    optimizer = full_batch_minnorm(
        model, inputs, torch.tensor(labels), form="margin", num_outputs=1,
        dual_lr=step, damping=step, iterations=iterations,
    )
    weights = model.weight.detach().numpy()[0]
    cosine = weights @ reference.coef_[0] / np.linalg.norm(weights) / np.linalg.norm(reference.coef_[0])
    multipliers = optimizer.dense_multipliers().numpy()[:, 0]
    assert cosine >= 0.99999
    assert relative_error(weights, reference.coef_[0]) <= 1e-4
    assert abs(model.bias.item() - reference.intercept_[0]) <= 1e-4 * max(1.0, abs(reference.intercept_[0]))
    assert set(np.flatnonzero(multipliers > 1e-6)) == set(reference.support_)
    assert np.abs(multipliers - reference_alpha).max() <= 1e-4 * max(1.0, reference_alpha.max())


def test_multiclass_margin_form_satisfies_kkt_conditions():
    rng = np.random.default_rng(3)
    centers = np.array([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]])
    labels = np.repeat(np.arange(3), 15)
    points = centers[labels] + rng.normal(scale=0.7, size=(45, 2))
    inputs, targets = torch.tensor(points), torch.tensor(labels)
    model = nn.Linear(2, 3).double()
    step = 0.9 / float(np.linalg.eigvalsh(points @ points.T).max())
    optimizer = full_batch_minnorm(
        model, inputs, targets, form="margin", num_outputs=3, dual_lr=step, damping=step, iterations=6000
    )
    multipliers = optimizer.dense_multipliers().detach().numpy()
    margins = optimizer.constraint_values(model(inputs).detach(), targets).numpy()
    competing = np.ones_like(margins, dtype=bool)
    competing[np.arange(45), labels] = False

    assert margins[competing].min() >= -1e-5  # feasibility
    assert (multipliers >= 0).all() and np.abs(multipliers[~competing]).max() == 0  # dual feasibility
    assert np.abs(multipliers[competing] * margins[competing]).max() <= 1e-5  # complementary slackness
    # Stationarity: W_c = sum_i (1[y_i = c] sum_j lambda_ij - lambda_ic) x_i, and the
    # same coefficients sum to zero for the free biases.
    coefficients = -multipliers.copy()
    coefficients[np.arange(45), labels] = multipliers.sum(axis=1)
    expected_weights = coefficients.T @ points
    assert relative_error(model.weight.detach().numpy(), expected_weights) <= 1e-4
    assert np.abs(coefficients.sum(axis=0)).max() <= 1e-4 * multipliers.sum()
    assert (multipliers.sum(axis=1) > 1e-6).sum() >= 2  # some support vectors exist


def reference_run(model, base, inputs, labels, *, dual_lr, damping, steps, scheduler=None):
    """Minnorm written out by hand, full batch: L = 1/2 sum ||W||^2 - sum lambda_eff * g."""
    multipliers = torch.zeros(len(inputs), 3)
    own = torch.nn.functional.one_hot(labels, 3).bool()
    for _ in range(steps):
        outputs = model(inputs)
        margins = outputs.gather(1, labels[:, None]) - outputs - 1.0
        effective = torch.relu(multipliers - damping * margins.detach()).masked_fill(own, 0.0)
        norm = 0.5 * sum(p.pow(2).sum() for p in model.parameters() if p.ndim >= 2)
        lagrangian = norm - (effective * margins).sum()
        base.zero_grad()
        lagrangian.backward()
        base.step()
        if scheduler is not None:
            scheduler.step()
        multipliers = torch.relu(multipliers - dual_lr * margins.detach()).masked_fill(own, 0.0)
    return multipliers


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_wrapper_equals_plain_reference_loop(optimizer_name):
    torch.manual_seed(0)
    inputs = torch.randn(60, 5)
    labels = torch.randint(0, 3, (60,))

    def network():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    def base_for(model):
        if optimizer_name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
        return torch.optim.Adam(model.parameters(), lr=3e-3)

    reference_model = network()
    reference_base = base_for(reference_model)
    reference_scheduler = torch.optim.lr_scheduler.StepLR(reference_base, step_size=50, gamma=0.5)
    reference_multipliers = reference_run(
        reference_model, reference_base, inputs, labels, dual_lr=0.05, damping=0.1, steps=300,
        scheduler=reference_scheduler,
    )

    model = network()
    optimizer = Minnorm(base_for(model), num_examples=60, num_outputs=3, dual_lr=0.05, damping=0.1, model=model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    assert isinstance(optimizer, torch.optim.Optimizer)
    for _ in range(300):
        optimizer.zero_grad()
        optimizer.lagrangian(model(inputs), labels, torch.arange(60)).backward()
        optimizer.step()
        scheduler.step()

    assert optimizer.param_groups[0]["lr"] == reference_base.param_groups[0]["lr"] < 0.01
    for mine, theirs in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(optimizer.dense_multipliers(), reference_multipliers, rtol=1e-4, atol=1e-5)


def minibatch_run(model, optimizer, inputs, labels, steps, start=0):
    for step in range(start, start + steps):
        batch = torch.arange(step * 16, step * 16 + 16) % len(inputs)
        optimizer.zero_grad()
        optimizer.lagrangian(model(inputs[batch]), labels[batch], batch).backward()
        optimizer.step()


def test_save_load_continue_equals_uninterrupted_run():
    torch.manual_seed(0)
    inputs, labels = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def fresh():
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
        optimizer = Minnorm(
            torch.optim.Adam(model.parameters(), lr=1e-2), num_examples=64, num_outputs=3,
            dual_lr=0.1, model=model, dataset_fingerprint="abc",
        )
        return model, optimizer

    model, optimizer = fresh()
    minibatch_run(model, optimizer, inputs, labels, 40)

    model_a, optimizer_a = fresh()
    minibatch_run(model_a, optimizer_a, inputs, labels, 15)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b, optimizer_b = fresh()
    model_b.load_state_dict(saved["model"])
    optimizer_b.load_state_dict(saved["optimizer"])
    minibatch_run(model_b, optimizer_b, inputs, labels, 25, start=15)

    for mine, theirs in zip(model_b.parameters(), model.parameters()):
        assert torch.equal(mine, theirs)
    assert torch.equal(optimizer_b.dense_multipliers(), optimizer.dense_multipliers())
    assert set(saved["optimizer"]) == {"base", "minnorm"}


def test_load_state_dict_refuses_other_dataset():
    model = nn.Linear(3, 2)
    optimizer = Minnorm(torch.optim.SGD(model.parameters(), lr=0.1), num_examples=10, num_outputs=2,
                        dataset_fingerprint="one")
    other = Minnorm(torch.optim.SGD(model.parameters(), lr=0.1), num_examples=10, num_outputs=2,
                    dataset_fingerprint="two")
    with pytest.raises(StateMismatchError, match="dataset_fingerprint"):
        other.load_state_dict(optimizer.state_dict())
    bigger = Minnorm(torch.optim.SGD(model.parameters(), lr=0.1), num_examples=11, num_outputs=2,
                     dataset_fingerprint="one")
    with pytest.raises(StateMismatchError, match="num_examples"):
        bigger.load_state_dict(optimizer.state_dict())


def test_norm_term_leaves_out_biases_and_normalized_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 2),
    )
    chosen = {id(p) for p in default_norm_parameters(model)}
    assert chosen == {id(model[3].weight), id(model[8].weight)}


def test_norm_gradient_is_scaled_by_the_batch_share():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    optimizer = Minnorm(torch.optim.SGD(model.parameters(), lr=1.0), num_examples=8, num_outputs=2)
    # Margins comfortably met and zero multipliers: only the norm term moves the weights.
    inputs = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([1, 1])
    optimizer.zero_grad()
    optimizer.lagrangian(model(inputs) * 0 + torch.tensor([[0.0, 5.0]]), labels, torch.tensor([0, 1])).backward()
    optimizer.step()
    torch.testing.assert_close(model.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * (1 - 2 / 8))


def test_binary_single_output_uses_signed_margins():
    optimizer = Minnorm(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), num_examples=2, num_outputs=1)
    values = optimizer.constraint_values(torch.tensor([[2.0], [2.0]]), torch.tensor([1, 0]))
    torch.testing.assert_close(values, torch.tensor([[1.0], [-3.0]]))
    with pytest.raises(ValueError, match="labels 0 or 1"):
        optimizer.constraint_values(torch.tensor([[2.0]]), torch.tensor([-1]))


def test_spearman_matches_known_values():
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.ones(4), np.arange(4)))


def test_rejects_bad_settings():
    base = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="form"):
        Minnorm(base, num_examples=2, num_outputs=1, form="hinge")
    with pytest.raises(ValueError, match="dual_lr"):
        Minnorm(base, num_examples=2, num_outputs=1, dual_lr=0)
    with pytest.raises(TypeError):
        Minnorm(object(), num_examples=2, num_outputs=1)


def epoch_runs(*, store: str, slots: int | None, defer: bool, window: int = 40, epochs: int = 4):
    """Minibatch epochs over seeded permutations, dual updates applied per step or deferred."""
    torch.manual_seed(0)
    inputs, labels = torch.randn(90, 6), torch.randint(0, 5, (90,))
    labels[:9] = (labels[:9] + 1) % 5  # some examples the network must fight
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 5))
    optimizer = Minnorm(
        torch.optim.Adam(model.parameters(), lr=1e-2), num_examples=90, num_outputs=5, dual_lr=0.05,
        model=model, multiplier_store=store, multiplier_slots=slots, track_violations=True,
        max_multiplier=0.3,
    )
    order = torch.Generator().manual_seed(3)
    diagnostics = []
    for _ in range(epochs):
        batches = torch.randperm(90, generator=order).split(16)  # 6 batches, the last of 10
        with optimizer.deferred_dual_updates(window) if defer else contextlib.nullcontext():
            for batch in batches:
                optimizer.zero_grad()
                optimizer.lagrangian(model(inputs[batch]), labels[batch], batch).backward()
                optimizer.step()
        diagnostics.append(optimizer.diagnostics())
    return model, optimizer, diagnostics


@pytest.mark.parametrize("store, slots", [("dense", None), ("compact", 2)])
def test_deferred_dual_updates_are_bit_identical_to_per_step_updates(store, slots):
    model_a, optimizer_a, diagnostics_a = epoch_runs(store=store, slots=slots, defer=False)
    model_b, optimizer_b, diagnostics_b = epoch_runs(store=store, slots=slots, defer=True)
    for mine, theirs in zip(model_b.parameters(), model_a.parameters()):
        assert torch.equal(mine, theirs)
    assert torch.equal(optimizer_b.dense_multipliers(), optimizer_a.dense_multipliers())
    assert torch.equal(optimizer_b.mean_violations(), optimizer_a.mean_violations())
    assert torch.equal(optimizer_b.last_violation, optimizer_a.last_violation)
    assert torch.equal(optimizer_b.visits, optimizer_a.visits)
    assert optimizer_b.dual_steps == optimizer_a.dual_steps == 4 * 6
    np.testing.assert_equal(diagnostics_b, diagnostics_a)  # NaN (first epoch) equals NaN here
    # The run did move the multipliers (so equality above is not trivial).
    assert float(optimizer_a.dense_multipliers().max()) > 0


def test_deferred_queue_is_applied_before_any_read_and_a_repeat_is_refused():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = Minnorm(torch.optim.SGD(model.parameters(), lr=0.1), num_examples=8, num_outputs=2, dual_lr=0.5)
    inputs, labels = torch.randn(8, 3), torch.tensor([0, 1] * 4)

    def step(batch):
        optimizer.zero_grad()
        optimizer.lagrangian(model(inputs[batch]), labels[batch], batch).backward()
        optimizer.step()

    with optimizer.deferred_dual_updates(window_examples=100):
        step(torch.arange(0, 4))
        assert optimizer._queued  # queued, not applied yet
        queued_ids = optimizer._queued[0].example_ids
        read = optimizer.dense_multipliers().clone()  # a read applies the queue first
        assert not optimizer._queued
        assert bool((read[queued_ids] > 0).any())
        step(torch.arange(4, 8))
        optimizer.max_multiplier = 0.25  # queued steps keep the bound they were taken under
        assert not optimizer._queued
    with pytest.raises(RuntimeError, match="appeared twice within one window"):
        with optimizer.deferred_dual_updates(window_examples=100):
            step(torch.arange(0, 4))
            step(torch.arange(2, 6))
