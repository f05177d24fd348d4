"""The capturable step (``Minnorm.static_step``, ``training/capture.py``): fixed-shape
padded batches give the eager run's numbers, and the whole step traces as one graph.

On a GPU fit() captures this step in a CUDA graph; these are its CPU twins: the same
function run eagerly, and traced whole by ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minnorm_audit.data.placement import DeviceBatches
from minnorm_audit.minnorm import Minnorm
from minnorm_audit.training import train_one_epoch
from minnorm_audit.training.capture import StaticStep, padded_batches

NUM_EXAMPLES, BATCH = 90, 16  # 6 batches, the last of 10 rows: 6 padded


def test_padded_batches_visit_every_example_once_and_pad_with_the_first_batch() -> None:
    order = torch.randperm(NUM_EXAMPLES, generator=torch.Generator().manual_seed(0))
    ids, valid = padded_batches(order, BATCH)
    assert [len(batch) for batch in ids] == [BATCH] * 6
    real = torch.cat([batch[mask] for batch, mask in zip(ids, valid)])
    assert torch.equal(real, order)  # every example once, in the permutation's order
    padding = ids[-1][~valid[-1]]
    assert torch.equal(padding, order[:6])  # visited by the first batch...
    assert not set(padding.tolist()) & set(ids[-1][valid[-1]].tolist())  # ...and not the last one's own
    with pytest.raises(ValueError, match="cannot fill one batch"):
        padded_batches(order[:10], BATCH)


def problem(form: str, outputs: int, store: str = "auto", slots: int | None = None):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    inputs = torch.randn(NUM_EXAMPLES, 6)
    if form == "equality":
        targets = torch.randn(NUM_EXAMPLES, outputs)
    else:
        targets = torch.randint(0, max(outputs, 2), (NUM_EXAMPLES,))
        targets[:9] = (targets[:9] + 1) % max(outputs, 2)  # examples the network must fight
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, outputs))
    optimizer = Minnorm(
        torch.optim.Adam(model.parameters(), lr=1e-2), num_examples=NUM_EXAMPLES, num_outputs=outputs,
        form=form, dual_lr=0.05, model=model, multiplier_store=store, multiplier_slots=slots,  # type: ignore[arg-type]
        track_violations=True, max_multiplier=0.3 if form == "margin" else None,
    )
    return inputs, targets, model, optimizer


def run_epochs(form: str, outputs: int, *, static: bool, epochs: int = 3, **store):  # type: ignore[no-untyped-def]
    inputs, targets, model, optimizer = problem(form, outputs, **store)
    source = DeviceBatches(inputs, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    step = StaticStep(model, optimizer, capture=False) if static else None
    for epoch in range(epochs):
        train_one_epoch(model, optimizer, source, targets, BATCH, generator, static_step=step)
        if epoch == 0 and form == "margin":
            optimizer.max_multiplier = 0.2  # a new cap mid-run reaches the static step's tensor
    return model, optimizer


@pytest.mark.parametrize(
    "form, outputs, store",
    [("margin", 5, {}), ("margin", 5, {"store": "compact", "slots": 2}), ("margin", 1, {}), ("equality", 2, {})],
)
def test_static_epochs_equal_the_eager_epochs(form, outputs, store) -> None:
    model_a, eager = run_epochs(form, outputs, static=False, **store)
    model_b, static = run_epochs(form, outputs, static=True, **store)
    for mine, theirs in zip(model_b.parameters(), model_a.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static.dense_multipliers(), eager.dense_multipliers(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static.mean_violations(), eager.mean_violations(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static.last_violation, eager.last_violation, rtol=1e-5, atol=1e-5)
    assert torch.equal(static.visits, eager.visits)  # padding rows are not visits
    assert int(static.visits.sum()) == 3 * NUM_EXAMPLES
    assert torch.equal(static.labels, eager.labels)
    assert static.dual_steps == eager.dual_steps == 3 * 6
    assert float(eager.dense_multipliers().abs().max()) > 0  # the run did move the multipliers


@pytest.mark.slow
def test_the_whole_step_compiles_as_one_graph_and_equals_the_eager_step() -> None:
    """torch.compile(fullgraph=True) fails on any graph break: forward, Lagrangian,
    backward, norm term, weight step and dual step trace as one graph."""
    import torch._dynamo

    inputs, targets, model, optimizer = problem("margin", 5)
    _, _, twin_model, twin = problem("margin", 5)  # the same seeds: the same network and state
    ids = torch.randperm(NUM_EXAMPLES, generator=torch.Generator().manual_seed(0))
    batches, masks = padded_batches(ids, BATCH)
    for one_model, one in ((model, optimizer), (twin_model, twin)):  # eager warm-up: Adam's state exists
        one.static_step(one_model, inputs[batches[0]], targets[batches[0]], batches[0], masks[0])
    version = optimizer.multipliers.version
    torch._dynamo.reset()
    # One graph for every batch, the padded last one too: no recompilation either.
    with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=True):
        compiled = torch.compile(twin.static_step, fullgraph=True, backend="aot_eager")
        for batch, mask in zip(batches[1:], masks[1:]):  # 4 full batches and the padded last one
            eager_value = optimizer.static_step(model, inputs[batch], targets[batch], batch, mask)
            compiled_value = compiled(twin_model, inputs[batch], targets[batch], batch, mask)
            torch.testing.assert_close(compiled_value, eager_value, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(twin_model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.dense_multipliers(), optimizer.dense_multipliers(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.mean_violations(), optimizer.mean_violations(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.last_violation, optimizer.last_violation, rtol=1e-5, atol=1e-5)
    assert torch.equal(twin.visits, optimizer.visits)
    assert float(optimizer.dense_multipliers().max()) > 0
    assert optimizer.multipliers.version == version  # no Python state changed in the step
