"""The trained network's outputs and margins for every example (batch-wise, eval
mode, fp32, gathered across torchrun ranks), and the autocast training runs under."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.placement import BatchSource, make_batch_source
from . import distributed


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA where supported; nothing elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def output_margins(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Given-label output minus the best other output, float64 on the outputs' device
    (binary single output: the signed output)."""
    outputs = outputs.double().reshape(outputs.shape[0], -1)
    labels = labels.long().reshape(-1, 1).to(outputs.device)
    if outputs.shape[1] == 1:
        return ((2 * labels - 1) * outputs)[:, 0]
    own = outputs.gather(1, labels)[:, 0]
    others = outputs.scatter(1, labels, float("-inf")).amax(dim=1)
    return own - others


def predicted_classes(outputs: torch.Tensor | np.ndarray) -> np.ndarray:
    """The class each example is predicted as, int64 ``(n,)``: the largest output
    (binary single output: class 1 when the output is above 0)."""
    values = torch.as_tensor(outputs).reshape(len(outputs), -1)
    if values.shape[1] == 1:
        return (values[:, 0] > 0).long().cpu().numpy()
    return values.argmax(dim=1).cpu().numpy().astype(np.int64)


@torch.no_grad()
def predict(
    model: nn.Module,
    source: BatchSource | torch.Tensor,
    batch_size: int,
    context: distributed.DistributedContext | None = None,
    *,
    margins_for: torch.Tensor | None = None,
    with_predicted: bool = False,
) -> Any:
    """Network outputs for every example, as float32 numpy (batch-wise, eval mode);
    with ``margins_for`` (the labels) only each example's margin (:func:`output_margins`),
    so an examples x classes table is never built, and with ``with_predicted`` as well
    the pair ``(margins (n,) float64, predicted classes (n,) int64)``
    (:func:`predicted_classes`).

    In a torchrun launch each rank predicts a contiguous shard and the shards are
    gathered, so every rank returns all outputs.
    """
    context = context or distributed.DistributedContext()
    if isinstance(source, torch.Tensor):
        source = make_batch_source(source, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    shards = torch.tensor_split(torch.arange(len(source)), context.world_size)
    shard = shards[context.rank]
    outputs = []
    for batch_ids, batch_inputs in source.iterate(list(shard.split(max(batch_size, 512)))):
        # fp32 on every device: the margins decide fitted / inconclusive, and bf16
        # rounding (8 bits of mantissa) would move examples near 0 across it.
        batch_outputs = model(batch_inputs)
        batch_outputs = batch_outputs.float().reshape(batch_outputs.shape[0], -1)
        if margins_for is not None:
            batch_labels = margins_for.index_select(0, batch_ids.to(margins_for.device))
            # Margin and predicted class side by side (a class index is exact in float64).
            # (on the device: no copy to the host per batch).
            predicted = (batch_outputs[:, 0] > 0) if batch_outputs.shape[1] == 1 else batch_outputs.argmax(dim=1)
            batch_outputs = torch.stack([output_margins(batch_outputs, batch_labels), predicted.double()], dim=1)
        outputs.append(batch_outputs)
    model.train(was_training)
    if context.enabled:
        if outputs:
            local = torch.cat(outputs)
        elif margins_for is not None:  # every rank must send the same dtype and width
            local = torch.zeros((0, 2), dtype=torch.float64, device=_model_device(model))
        else:
            local = torch.zeros((0, _output_width(model, source)), device=_model_device(model))
        gathered = distributed.gather_rows(local, [int(part.numel()) for part in shards], context).cpu().numpy()
    elif outputs:
        gathered = torch.cat(outputs).cpu().numpy()
    else:
        gathered = np.zeros((0, 2 if margins_for is not None else 0), dtype=np.float32)
    if margins_for is None:
        return gathered
    if with_predicted:
        return gathered[:, 0], gathered[:, 1].astype(np.int64)
    return gathered[:, 0]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _output_width(model: nn.Module, source: BatchSource) -> int:
    """Output width from one example (a rank whose prediction shard is empty)."""
    _, first = next(source.iterate([torch.arange(1)]))
    return int(model(first).reshape(1, -1).shape[1])
