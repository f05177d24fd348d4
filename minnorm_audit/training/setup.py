"""What a training run is built from: the device, the seeds, the memory layout of the
network and the optimizers (torch's, fused where the device has the kernels, inside
the Minnorm wrapper)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..data.placement import LazyImages
from ..minnorm import ConstraintForm, Minnorm, eager
from .config import TrainConfig, TrainingError


def uses_channels_last(model: nn.Module, inputs: torch.Tensor | LazyImages) -> bool:
    """Whether to train ``model`` channels-last: image inputs and 2-D convolutions.

    oneDNN (CPU) and cuDNN (GPU, bf16) run NHWC convolutions natively; on NCHW tensors
    they convert on every call (the default CNN on the bundled digits, 2 CPU threads:
    12.3 ms a step instead of 15.6 ms). The same computation in another memory layout:
    results agree up to rounding.
    """
    is_image = isinstance(inputs, LazyImages) or inputs.ndim == 4
    return is_image and any(isinstance(module, nn.Conv2d) for module in model.modules())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; ``cuda:N`` is GPU N; an unavailable
    device is an error (:class:`TrainingError`, one line)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise TrainingError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name} was asked for but no CUDA GPU is available")
    if index and int(index) >= torch.cuda.device_count():
        raise TrainingError(f"--device {name} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                            f"GPU(s), numbered from 0")
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise TrainingError("--device mps was asked for but MPS is not available")
    if index:
        # Make it the current GPU too, so that whatever asks "the" GPU (bf16 support,
        # a cuBLAS workspace) asks this one.
        torch.cuda.set_device(int(index))
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch and numpy; ``deterministic`` asks for deterministic kernels too."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# Devices whose parameters take torch's fused optimizer kernels (one kernel per step for
# all parameters instead of a Python loop over them: the default MLP's Adam step on one
# CPU thread took 0.32 ms instead of 1.55 ms; an audit of 4,000 x 64 rows trained in
# 2.26 s instead of 2.80 s).
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def make_base_optimizer(name: str, parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer that takes Minnorm's weight steps: torch's own, built so that
    training imports no ``torch._dynamo`` (``minnorm/eager.py``), with the fused
    kernels where the parameters' device has them (the same update up to rounding)."""
    fused = bool(parameters) and all(
        p.device.type in FUSED_DEVICE_TYPES and p.is_floating_point() for p in parameters)
    options: dict[str, bool] = {"fused": True} if fused else {}
    # On CUDA Adam keeps its step count on the device, so fit()'s step can be captured
    # in a CUDA graph (training/capture.py); the same update.
    capturable = bool(parameters) and all(p.device.type == "cuda" for p in parameters)
    if capturable and name in ("adam", "adamw"):
        options["capturable"] = True
    if name == "adam":
        return eager.Adam(parameters, lr=lr, **options)
    if name == "adamw":
        # Weight decay off: the norm term is Minnorm's own.
        return eager.AdamW(parameters, lr=lr, weight_decay=0.0, **options)
    if name == "sgd":
        return eager.SGD(parameters, lr=lr, **options)
    raise TrainingError(f"unknown optimizer {name!r}: use adam, adamw or sgd")


def make_minnorm(
    model: nn.Module,
    *,
    form: ConstraintForm,
    num_examples: int,
    num_outputs: int,
    config: TrainConfig,
    dataset_fingerprint: str,
    device: torch.device,
) -> Minnorm:
    """The Minnorm wrapper around ``config.optimizer`` over the model's trainable parameters."""
    base = make_base_optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad], config.lr)
    try:
        return Minnorm(
            base,
            num_examples=num_examples,
            num_outputs=num_outputs,
            form=form,
            margin=config.margin,
            dual_lr=config.dual_lr,
            damping=config.damping,
            model=model,
            dataset_fingerprint=dataset_fingerprint,
            device=device,
            # A float64 model (closed-form checks) keeps float64 multipliers.
            multiplier_dtype=torch.promote_types(_parameter_dtype(model), torch.float32),
            track_violations=config.score_state == "violation",
            multiplier_store=config.multiplier_store,  # type: ignore[arg-type]
            multiplier_slots=config.multiplier_slots,
            memory_budget_bytes=int(config.multiplier_memory_gb * 1e9),
            norm_anchor=config.norm_anchor,
        )
    except ValueError as error:  # e.g. violations asked for beside the compact store
        raise TrainingError(str(error)) from error


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    first = next(model.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32
