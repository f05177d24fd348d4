"""Default networks per modality.

Minnorm wants over-parameterized networks that can fit every example, and no
normalization layers in the norm term (ALGORITHM.md): the defaults are an MLP for
tables and a plain CNN without batch norm for images. Inputs are standardized by a
fixed (non-trainable) first layer computed from the data, so the network sees
zero-mean, unit-variance features (the prototype's violation floor was 3x lower).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..data.placement import LazyImages


class Standardize(nn.Module):
    """``(x - mean) / std`` with statistics frozen as buffers; uint8 images become float."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp_min(1e-6))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs.float() - self.mean) / self.std


def standardizer_for(inputs: torch.Tensor) -> Standardize:
    """Per-feature statistics for tables ``(N, D)``; per-channel for images ``(N, C, H, W)``."""
    values = inputs.float()
    if values.ndim == 2:
        return Standardize(values.mean(0), values.std(0, unbiased=False))
    dims = [0] + list(range(2, values.ndim))
    shape = [1, values.shape[1]] + [1] * (values.ndim - 2)
    return Standardize(values.mean(dims).reshape(shape), values.std(dims, unbiased=False).reshape(shape))


def mlp(num_features: int, num_outputs: int, *, hidden: int = 512, depth: int = 2) -> nn.Sequential:
    """ReLU MLP, ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = []
    width = num_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def plain_cnn(in_channels: int, num_outputs: int, *, width: int = 32) -> nn.Sequential:
    """A VGG-like CNN without normalization layers, for images of any size >= 8."""
    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(in_channels, width),
        *block(width, 2 * width),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_outputs),
    )


class TextNetwork(nn.Module):
    """Hashed n-gram ids ``(N, L)`` (0 = padding, :mod:`minnorm_audit.data.text`) ->
    the sum of their embeddings divided by the square root of their count
    (``nn.EmbeddingBag``, as an L2-normalized bag of n-grams is) -> one ReLU layer ->
    outputs.

    A fastText-style bag of word and character n-grams with a small head: cheap (the
    cost is linear in the text's length, no attention), and wide enough to fit every
    training text, which Minnorm needs. Dividing by ``sqrt(count)`` instead of the
    count keeps a text's vector on one scale whatever its length while letting each
    n-gram move it (a mean of 400 n-grams barely moves at Adam's step size).

    The norm term (:meth:`minnorm_norm_parameters`) holds the two Linear weights, not
    the embedding table nor the biases: the minimum-norm problem is posed on the head,
    over n-gram features the constraints learn. With the table in it, the norm gradient
    reaches every row at every step while a row's constraint gradient comes only when
    its n-gram is in the batch, and the network never left the majority class on the
    fine-food reviews (train accuracy 0.568, the majority's share; 0.879 without it,
    benchmarks/real_inputs.py, 5 epochs).
    """

    def __init__(self, num_buckets: int, num_outputs: int, *, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_buckets, dim, mode="sum")
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.hidden = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, num_outputs)

    def minnorm_norm_parameters(self) -> list[nn.Parameter]:
        """The weights in Minnorm's norm term: ``hidden.weight`` and ``output.weight``."""
        return [self.hidden.weight, self.output.weight]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Padding (id 0) is dropped before the bag: EmbeddingBag's padding_idx path is
        # several times slower on CPU than flat ids with offsets.
        present = ids != 0
        counts = present.sum(1)
        flat = ids[present]
        offsets = torch.zeros_like(counts)
        offsets[1:] = counts.cumsum(0)[:-1]
        weights = counts.clamp_min(1).float().rsqrt().repeat_interleave(counts)
        bags = self.embedding(flat, offsets, per_sample_weights=weights)
        return self.output(torch.relu(self.hidden(bags)))


def build_model(
    name: str, inputs: torch.Tensor, num_outputs: int
) -> nn.Module:
    """The network for ``name`` with a data-derived standardizer in front.

    Parameters
    ----------
    name : {"auto", "linear", "mlp", "cnn", "text"} or a torchvision model name (e.g. "resnet18")
        ``auto`` picks ``mlp`` for tables, ``cnn`` for images and ``text``
        (:class:`TextNetwork`, without a standardizer) for hashed text ids. torchvision models are
        built untrained (no weights are downloaded); their normalization layers and
        the layers feeding them are left out of the norm term
        (:func:`minnorm_audit.minnorm.default_norm_parameters`).
    inputs : Tensor
        The training inputs (statistics for the standardizer, shape for the network).
    num_outputs : int
    """
    is_image = inputs.ndim == 4
    is_text = not inputs.dtype.is_floating_point and inputs.dtype != torch.uint8
    if is_text:
        if name not in ("auto", "text"):
            raise ValueError(f"--model {name} cannot read text; use auto or text")
        from ..data.text import NUM_BUCKETS

        return TextNetwork(NUM_BUCKETS, num_outputs)
    if name == "text":
        raise ValueError("--model text needs a text column (--text-column)")
    if name == "auto":
        name = "cnn" if is_image else "mlp"
    if name == "linear":  # a linear classifier: the C-SVM regime of ALGORITHM.md
        body: nn.Module = nn.Linear(int(inputs[0].numel()), num_outputs)
        if is_image:
            body = nn.Sequential(nn.Flatten(), body)
    elif name == "mlp":
        body = mlp(int(inputs[0].numel()), num_outputs)
        if is_image:
            body = nn.Sequential(nn.Flatten(), body)
    elif name == "cnn":
        if not is_image:
            raise ValueError("--model cnn needs image data; use mlp for tables")
        body = plain_cnn(int(inputs.shape[1]), num_outputs)
    else:
        if not is_image:
            raise ValueError(f"--model {name} needs image data; use mlp for tables")
        import torchvision

        try:
            body = torchvision.models.get_model(name, weights=None, num_classes=num_outputs)
        except ValueError as error:
            raise ValueError(f"unknown model {name!r}: use auto, linear, mlp, cnn or a torchvision model name") from error
    return nn.Sequential(standardizer_for(inputs), body)


def build_streamed_model(name: str, images: LazyImages, num_outputs: int, *, workers: int = 0) -> torch.nn.Module:
    """``models.build_model`` for streamed images: the standardizer's statistics come
    from one streamed pass instead of an in-memory tensor (same values to float32
    rounding), the network is built exactly as for the eager path."""
    from ..data.placement import image_statistics

    model = build_model(name, images[:1], num_outputs)
    mean, std = image_statistics(images, workers=workers)
    model[0] = Standardize(mean, std)  # type: ignore[index]
    return model
