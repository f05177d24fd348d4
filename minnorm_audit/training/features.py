"""The trained network's penultimate features: the input of its last linear layer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.placement import make_batch_source


@torch.no_grad()
def penultimate_features(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 512) -> np.ndarray:
    """The input of ``model``'s last ``nn.Linear`` for every example, float32 (N, F)
    (the default CNN: its 128 globally pooled channels; the MLP: its last hidden layer),
    computed batch-wise in eval mode on the model's device. ``inputs`` is a tensor or
    :class:`~minnorm_audit.data.placement.LazyImages`.

    Raises
    ------
    ValueError
        The model has no ``nn.Linear`` layer.
    """
    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError("the model has no linear layer to read penultimate features from")
    captured: list[torch.Tensor] = []
    hook = linear[-1].register_forward_hook(lambda _m, args, _out: captured.append(args[0].float().cpu()))
    device = next(model.parameters()).device
    source = make_batch_source(inputs, device)
    was_training = model.training
    model.eval()
    try:
        batches = list(torch.arange(len(source)).split(batch_size))
        for _, batch in source.iterate(batches):
            model(batch)
    finally:
        hook.remove()
        model.train(was_training)
        source.close()
    return torch.cat(captured).reshape(len(source), -1).numpy()
