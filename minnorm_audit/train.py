"""fit(): Minnorm training of a network, with checkpoint/resume and diagnostics.

One code path for CPU and GPU: every epoch draws a seeded ``randperm`` and splits it
into batches of example ids, which are exactly what the multiplier lookup needs. The
data is held on the training device when it fits (airbench style), else batches come
from a DataLoader with workers and pinned memory (``streaming.py``). bf16 autocast on
CUDA, a no-op elsewhere.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
DistributedDataParallel, each global batch is split into contiguous per-rank slices
and the dual updates are merged across ranks (``distributed.py``); every rank ends
with the same multipliers, and only rank 0 writes the checkpoint and shows progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed
from .minnorm import ConstraintForm, Minnorm
from .streaming import BatchSource, LazyImages, make_batch_source


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite values, bad checkpoint); one clear line."""


@dataclass
class TrainConfig:
    """Settings of one Minnorm training run (every field lands in the report).

    The defaults are the ones ``benchmarks/label_noise.py`` was run with.
    """

    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    dual_lr: float = 0.01
    damping: float | None = None
    margin: float = 1.0
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    score_state: str = "average"
    # Data placement (streaming.py): decoded data above this many GiB is not held
    # in memory (None: half of what is available); workers decode streamed images.
    max_memory_gb: float | None = None
    workers: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """What training leaves behind for scoring."""

    final_multipliers: np.ndarray
    average_multipliers: np.ndarray
    labels: np.ndarray | None
    final_outputs: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0
    train_seconds: float = 0.0
    device: str = "cpu"
    data_placement: str = "device"
    world_size: int = 1

    def scored_multipliers(self, state: str) -> np.ndarray:
        """The multiplier state the scores are read from: ``"final"`` or ``"average"``."""
        if state == "final":
            return self.final_multipliers
        if state == "average":
            return self.average_multipliers
        raise ValueError(f"score_state must be 'final' or 'average', got {state!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is available")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise TrainingError("--device mps was asked for but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise TrainingError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    return torch.device(name)


def make_base_optimizer(name: str, parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer that takes Minnorm's weight steps."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "adamw":
        # Weight decay off: the norm term is Minnorm's own.
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    raise TrainingError(f"unknown optimizer {name!r}: use adam, adamw or sgd")


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA where supported; nothing elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    from .report.parquet import atomic_write

    atomic_write(path, lambda stream: torch.save(obj, stream))


def _seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _progress_bar(total: int, initial: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="minnorm", unit="epoch", file=sys.stderr, leave=False)


def fit(
    model: nn.Module,
    inputs: torch.Tensor | LazyImages,
    targets: torch.Tensor,
    *,
    form: ConstraintForm,
    num_outputs: int,
    config: TrainConfig,
    dataset_fingerprint: str = "",
    checkpoint_path: Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``(inputs, targets)`` with Minnorm and return its multipliers.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of ``inputs`` to ``(batch, num_outputs)``.
    inputs : Tensor or LazyImages
        The whole dataset; example ``i`` is row ``i`` (its id). Held on the device when
        it fits ``config.max_memory_gb``, else fed by a DataLoader (``streaming.py``).
    targets : Tensor
    form : {"margin", "equality"}
    num_outputs : int
    config : TrainConfig
    dataset_fingerprint : str
        Stored in checkpoints; resuming refuses a checkpoint of other data.
    checkpoint_path : Path, optional
        Written atomically after every epoch.
    resume : bool
        Continue from ``checkpoint_path``.
    progress : bool
        Show a tqdm bar on stderr.
    on_epoch : callable, optional
        Called with each epoch's diagnostics.

    Returns
    -------
    FitResult
        The same on every rank of a torchrun launch.
    """
    context, device = distributed.setup(resolve_device(config.device))
    _seed_everything(config.seed, config.deterministic)
    if device.type == "cuda" and not config.deterministic:
        torch.backends.cudnn.benchmark = True  # few batch shapes: tuned once each
    num_examples = int(inputs.shape[0])
    model = model.to(device)
    # The whole dataset on the device when it fits (the common case for audits of up
    # to a few hundred thousand small images or embeddings), else a DataLoader.
    source = make_batch_source(inputs, device, workers=config.workers, max_memory_gb=config.max_memory_gb)
    targets = targets.to(device)
    training_model = distributed.wrap_model(model, context, device)
    base = make_base_optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad], config.lr)
    optimizer = Minnorm(
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
    )
    batch_generator = torch.Generator(device="cpu")
    batch_generator.manual_seed(config.seed)
    average_multipliers = torch.zeros_like(optimizer.dense_multipliers())
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise TrainingError(f"no checkpoint to resume from at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("num_examples") != num_examples or state.get("dataset_fingerprint") != dataset_fingerprint:
            raise TrainingError(
                f"checkpoint {checkpoint_path} belongs to another dataset (fingerprint or size differs)"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batch_generator.set_state(state["batch_generator"])
        torch.set_rng_state(state["torch_rng"])
        average_multipliers.copy_(state["average_multipliers"].to(device))
        history = [dict(entry) for entry in state["history"]]
        start_epoch = int(state["epoch"])

    bar = _progress_bar(config.epochs, start_epoch, progress and context.is_main)
    started = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, config.epochs):
        train_one_epoch(training_model, optimizer, source, targets, config.batch_size, batch_generator, context)
        diagnostics = optimizer.diagnostics()
        check_finite(optimizer, diagnostics)
        # Running mean of the multipliers over epochs: the "average" score state.
        average_multipliers.mul_(epoch / (epoch + 1)).add_(optimizer.dense_multipliers(), alpha=1 / (epoch + 1))
        diagnostics = {"epoch": epoch + 1, **diagnostics}
        history.append(diagnostics)
        if checkpoint_path is not None and context.is_main:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "batch_generator": batch_generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "average_multipliers": average_multipliers.detach().cpu(),
                    "history": history,
                    "epoch": epoch + 1,
                    "num_examples": num_examples,
                    "dataset_fingerprint": dataset_fingerprint,
                },
                Path(checkpoint_path),
            )
        if bar is not None:
            bar.set_postfix(
                violation=f"{diagnostics['max_violation']:.3g}",
                fitted=f"{diagnostics['fraction_fitted']:.1%}",
            )
            bar.update(1)
        if on_epoch is not None and context.is_main:
            on_epoch(diagnostics)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - started

    final_outputs = predict(model, source, config.batch_size, context)
    source.close()
    labels = None if form == "equality" else targets.detach().cpu().numpy().astype(np.int64)
    return FitResult(
        final_multipliers=optimizer.dense_multipliers().detach().float().cpu().numpy(),
        average_multipliers=average_multipliers.detach().float().cpu().numpy(),
        labels=labels,
        final_outputs=final_outputs,
        history=history,
        epochs_run=len(history),
        train_seconds=train_seconds,
        device=str(device),
        data_placement=source.placement,
        world_size=context.world_size,
    )


def train_one_epoch(
    model: nn.Module,
    optimizer: Minnorm,
    source: BatchSource,
    targets: torch.Tensor,
    batch_size: int,
    batch_generator: torch.Generator,
    context: distributed.DistributedContext | None = None,
) -> None:
    """One pass over the data in random batches; every example is seen exactly once.

    The permutation is the same on every rank; each rank trains on its contiguous
    slice of every global batch (all of it in a single process).
    """
    context = context or distributed.DistributedContext()
    order = torch.randperm(len(source), generator=batch_generator)
    global_batches = list(order.split(batch_size))
    local_batches = [distributed.rank_slice(batch, context) for batch in global_batches]
    for global_batch, (batch_ids, batch_inputs) in zip(global_batches, source.iterate(local_batches)):
        with autocast_context(batch_inputs.device):
            outputs = model(batch_inputs)
        loss = optimizer.lagrangian(outputs, targets.index_select(0, batch_ids), batch_ids)
        if context.enabled:
            # DDP averages gradients; the Lagrangian is a sum over the global batch.
            loss = loss * context.world_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.merge_pending(optimizer, global_batch, context)
        optimizer.step()


@torch.no_grad()
def predict(
    model: nn.Module,
    source: BatchSource | torch.Tensor,
    batch_size: int,
    context: distributed.DistributedContext | None = None,
) -> np.ndarray:
    """Network outputs for every example, as float32 numpy (batch-wise, eval mode).

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
    for _, batch_inputs in source.iterate(list(shard.split(max(batch_size, 512)))):
        with autocast_context(batch_inputs.device):
            batch_outputs = model(batch_inputs)
        outputs.append(batch_outputs.float().reshape(batch_outputs.shape[0], -1))
    model.train(was_training)
    if context.enabled:
        width = _output_width(model, source) if not outputs else outputs[0].shape[1]
        local = torch.cat(outputs) if outputs else torch.zeros((0, width), device=_model_device(model))
        gathered = distributed.gather_rows(local, [int(part.numel()) for part in shards], context)
        return gathered.cpu().numpy()
    return torch.cat(outputs).cpu().numpy() if outputs else np.zeros((0, 0), dtype=np.float32)


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    first = next(model.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _output_width(model: nn.Module, source: BatchSource) -> int:
    """Output width from one example (a rank whose prediction shard is empty)."""
    _, first = next(source.iterate([torch.arange(1)]))
    with autocast_context(first.device):
        return int(model(first).reshape(1, -1).shape[1])


def check_finite(optimizer: Minnorm, diagnostics: dict[str, float]) -> None:
    """Stop with a message naming the likely cause when training produced NaN/inf."""
    multipliers_finite = bool(torch.isfinite(optimizer.dense_multipliers()).all())
    weights_finite = all(bool(torch.isfinite(p).all()) for group in optimizer.param_groups for p in group["params"])
    if not (multipliers_finite and weights_finite and math.isfinite(diagnostics["norm"])):
        what = "multipliers" if not multipliers_finite else "weights"
        raise TrainingError(
            f"training diverged: the {what} became NaN or inf; lower --lr or --dual-lr "
            "(the last good checkpoint is kept)"
        )
