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
    # Which state the scores are read from, and the soft-margin cap that keeps that
    # state informative: see SCORE_STATES and cap_multipliers() below.
    score_state: str = "violation"
    multiplier_cap: float | None = 1.0
    # Data placement (streaming.py): decoded data above this many GiB is not held
    # in memory (None: half of what is available); workers decode streamed images.
    max_memory_gb: float | None = None
    workers: int = 4
    # Multiplier store (minnorm.choose_store): "auto" keeps the dense table while all
    # per-example state fits multiplier_memory_gb, else the top-k "compact" store.
    multiplier_store: str = "auto"
    multiplier_slots: int | None = None
    multiplier_memory_gb: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# FitResult holds full examples x outputs arrays up to this many elements (256 MB each
# in float32). Beyond it (an ImageNet-size audit: 1.28M x 1000 would be 5 GB per array)
# they stay None and scoring reads the trained state a block of rows at a time.
DENSE_RESULT_ELEMENTS = 1 << 26


@dataclass
class FitResult:
    """What training leaves behind for scoring.

    The per-class arrays (``final_multipliers``, ``average_multipliers``,
    ``mean_violations``, ``final_outputs``) are None above ``DENSE_RESULT_ELEMENTS``;
    :meth:`state_rows` reads any state in blocks either way, and ``final_margins``
    holds what scoring needs of the outputs.
    """

    final_multipliers: np.ndarray | None
    average_multipliers: np.ndarray | None
    labels: np.ndarray | None
    final_outputs: np.ndarray | None
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0
    train_seconds: float = 0.0
    device: str = "cpu"
    data_placement: str = "device"
    world_size: int = 1
    mean_violations: np.ndarray | None = None
    # Classification: given-label output minus the best other output, per example.
    final_margins: np.ndarray | None = None
    # The trained Minnorm, read by state_rows() when the arrays above were not built.
    minnorm: Minnorm | None = field(default=None, repr=False)

    def state_rows(self, state: str, start: int, stop: int) -> np.ndarray:
        """Examples ``start:stop`` of one state (:data:`SCORE_STATES`), ``(rows, outputs)``."""
        if state not in SCORE_STATES:
            raise ValueError(f"score_state must be one of {', '.join(SCORE_STATES)}, got {state!r}")
        array = {"final": self.final_multipliers, "average": self.average_multipliers,
                 "violation": self.mean_violations}[state]
        if array is not None:
            return array[start:stop]
        if state == "violation" and (self.minnorm is None or self.minnorm.visits is None):
            raise ValueError("this run did not track violations (score_state was not 'violation')")
        if self.minnorm is None:
            raise ValueError(f"this result holds no {state!r} state")
        return self.minnorm.state_rows(state, start, stop).detach().cpu().numpy()

    def scored_multipliers(self, state: str) -> np.ndarray:
        """The whole state the scores are read from (one of :data:`SCORE_STATES`); for a
        large run prefer :meth:`state_rows`, which never builds the full table."""
        return self.state_rows(state, 0, self.num_examples)

    @property
    def num_examples(self) -> int:
        if self.minnorm is not None:
            return self.minnorm.num_examples
        for array in (self.final_multipliers, self.average_multipliers, self.mean_violations, self.final_outputs):
            if array is not None:
                return int(array.shape[0])
        raise ValueError("this result holds no per-example state")


# Which state of the multipliers is scored. Chosen on the TUNING part of the
# label-noise grid only (digits and two Gaussian mixtures, seed 0, an ad-hoc sweep
# that benchmarks/tune_scoring.py reproduces); docs/benchmarks.md has the held-out
# tables made with these defaults.
#
# "violation" (default): the dual ascent before projection, i.e. each example's mean
#   over its visits of -g_ij per competing class (Minnorm.mean_violations). The
#   projected multiplier lambda = max(0, ...) forgets how long an example sat at a
#   bound; the unprojected sum keeps it. With the cap below, mean AP over the 4 noise
#   settings at 20 epochs: digits 0.972, mixtures 0.997 (sweep's per-visit worst-class
#   variant), against 0.929 / 0.980 for "average" and 0.826 / 0.96 for "final"
#   without the cap, and AUM's best (10 epochs) 0.955 / 0.983.
# "average": the mean of the multipliers over the epochs (the previous default; best
#   at 10 epochs, 0.956 on digits, and decaying after).
# "final": the multipliers after the last epoch. Without the cap it decays with dual
#   time: once flipped examples are memorized, clean hard ones carry large
#   multipliers too (ALGORITHM.md's prototype findings).
#
# The cap (multiplier_cap = kappa): after each epoch every lambda_ij is bounded by
# kappa x the 90th percentile of the examples' largest multipliers (the box of a
# soft-margin C-SVM, with C set from the data so it needs no per-dataset scale).
# Examples that would need more force than C (flipped labels, mostly) stop being
# pushed into memorization, so their violation keeps accumulating while clean
# examples get fitted. kappa = 1 beat 1.5 (digits 0.957 at 10 epochs) and matched
# the best fixed cap (0.03: digits 0.972, mixtures 0.998 at 10 epochs) without a
# scale to set; None trains the hard-margin problem of the paper.
SCORE_STATES = ("violation", "average", "final")
CAP_QUANTILE = 0.9


def cap_multipliers(optimizer: Minnorm, kappa: float | None) -> None:
    """Set the soft-margin cap from the current multipliers (margin form only)."""
    if kappa is None or optimizer.form != "margin":
        return
    largest = optimizer.multipliers.row_max().detach().float()
    rank = max(1, int(math.ceil(CAP_QUANTILE * largest.numel())))
    quantile = float(largest.kthvalue(rank).values)
    optimizer.max_multiplier = kappa * quantile if quantile > 0 else None


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
    try:
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
            track_violations=config.score_state == "violation",
            multiplier_store=config.multiplier_store,  # type: ignore[arg-type]
            multiplier_slots=config.multiplier_slots,
            memory_budget_bytes=int(config.multiplier_memory_gb * 1e9),
        )
    except ValueError as error:  # e.g. violations asked for beside the compact store
        raise TrainingError(str(error)) from error
    if config.score_state not in SCORE_STATES:
        raise TrainingError(f"score_state must be one of {', '.join(SCORE_STATES)}, got {config.score_state!r}")
    batch_generator = torch.Generator(device="cpu")
    batch_generator.manual_seed(config.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise TrainingError(f"no checkpoint to resume from at {checkpoint_path}")
        state = load_checkpoint(Path(checkpoint_path))
        if state.get("num_examples") != num_examples or state.get("dataset_fingerprint") != dataset_fingerprint:
            raise TrainingError(
                f"checkpoint {checkpoint_path} belongs to another dataset (fingerprint or size differs)"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batch_generator.set_state(state["batch_generator"])
        torch.set_rng_state(state["torch_rng"])
        history = [dict(entry) for entry in state["history"]]
        start_epoch = int(state["epoch"])

    def save_checkpoint(epochs_done: int) -> None:
        if checkpoint_path is not None and context.is_main:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),  # holds the multipliers' running mean
                    "batch_generator": batch_generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "epoch": epochs_done,
                    "num_examples": num_examples,
                    "dataset_fingerprint": dataset_fingerprint,
                },
                Path(checkpoint_path),
            )

    if not resume:
        # Epoch 0 is a consistent state too: a run stopped in its first epoch
        # (Ctrl-C, kill) resumes from here.
        save_checkpoint(0)
    bar = _progress_bar(config.epochs, start_epoch, progress and context.is_main)
    started = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, config.epochs):
        try:
            train_one_epoch(training_model, optimizer, source, targets, config.batch_size, batch_generator, context)
        except KeyboardInterrupt:
            # Mid-epoch state is not resumable; the checkpoint of the last finished
            # epoch is (written after every epoch, atomically).
            if bar is not None:
                bar.close()
            raise TrainingInterrupted(epoch, checkpoint_path if context.is_main else None) from None
        diagnostics = optimizer.diagnostics()
        # Before anything is saved: a diverged epoch never replaces the last good checkpoint.
        check_finite(optimizer, diagnostics, config=config, epoch=epoch + 1, checkpoint_path=checkpoint_path)
        cap_multipliers(optimizer, config.multiplier_cap)
        # Running mean of the multipliers over epochs: the "average" score state.
        optimizer.accumulate_average()
        diagnostics = {"epoch": epoch + 1, **diagnostics}
        history.append(diagnostics)
        save_checkpoint(epoch + 1)
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

    # Full examples x outputs arrays only while they are small; scoring reads larger
    # runs from the optimizer in blocks (FitResult.state_rows).
    dense_result = form == "equality" or num_examples * num_outputs <= DENSE_RESULT_ELEMENTS
    if dense_result:
        final_outputs = predict(model, source, config.batch_size, context)
        final_margins = (
            None if form == "equality" else output_margins(torch.from_numpy(final_outputs), targets.cpu()).numpy()
        )
    else:
        final_outputs = None
        final_margins = predict(model, source, config.batch_size, context, margins_for=targets)
    source.close()
    labels = None if form == "equality" else targets.detach().cpu().numpy().astype(np.int64)

    def dense(state: str) -> np.ndarray | None:
        if not dense_result or (state == "violation" and optimizer.visits is None):
            return None
        return optimizer.state_rows(state, 0, num_examples).detach().cpu().numpy()

    return FitResult(
        final_multipliers=dense("final"),
        average_multipliers=dense("average"),
        labels=labels,
        final_outputs=final_outputs,
        final_margins=final_margins,
        minnorm=optimizer,
        history=history,
        epochs_run=len(history),
        train_seconds=train_seconds,
        device=str(device),
        data_placement=source.placement,
        world_size=context.world_size,
        mean_violations=dense("violation"),
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
    # Every example once per epoch: the dual updates may be applied a window at a time.
    with optimizer.deferred_dual_updates():
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


@torch.no_grad()
def predict(
    model: nn.Module,
    source: BatchSource | torch.Tensor,
    batch_size: int,
    context: distributed.DistributedContext | None = None,
    *,
    margins_for: torch.Tensor | None = None,
) -> np.ndarray:
    """Network outputs for every example, as float32 numpy (batch-wise, eval mode);
    with ``margins_for`` (the labels) only each example's margin (:func:`output_margins`),
    so an examples x classes table is never built.

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
        with autocast_context(batch_inputs.device):
            batch_outputs = model(batch_inputs)
        batch_outputs = batch_outputs.float().reshape(batch_outputs.shape[0], -1)
        if margins_for is not None:
            batch_labels = margins_for.index_select(0, batch_ids.to(margins_for.device))
            batch_outputs = output_margins(batch_outputs, batch_labels).unsqueeze(1)
        outputs.append(batch_outputs)
    model.train(was_training)
    if context.enabled:
        if outputs:
            local = torch.cat(outputs)
        elif margins_for is not None:  # every rank must send the same dtype and width
            local = torch.zeros((0, 1), dtype=torch.float64, device=_model_device(model))
        else:
            local = torch.zeros((0, _output_width(model, source)), device=_model_device(model))
        gathered = distributed.gather_rows(local, [int(part.numel()) for part in shards], context).cpu().numpy()
    elif outputs:
        gathered = torch.cat(outputs).cpu().numpy()
    else:
        gathered = np.zeros((0, 1 if margins_for is not None else 0), dtype=np.float32)
    return gathered[:, 0] if margins_for is not None else gathered


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


def check_finite(
    optimizer: Minnorm,
    diagnostics: dict[str, float],
    *,
    config: TrainConfig | None = None,
    epoch: int | None = None,
    checkpoint_path: Path | None = None,
) -> None:
    """Stop with one line naming the likely cause and the setting to change when an
    epoch left NaN or inf in the weights, the norm or the multipliers (and with them
    in the Lagrangian, whose value they make up). Called before the epoch's checkpoint
    is written, so the last good one stays on disk."""
    weights_finite = all(bool(torch.isfinite(p).all()) for group in optimizer.param_groups for p in group["params"])
    weights_finite = weights_finite and math.isfinite(diagnostics["norm"])
    multipliers_finite = optimizer.multipliers_finite()
    if weights_finite and multipliers_finite:
        return
    when = f" in epoch {epoch}" if epoch is not None else ""
    if not weights_finite:
        # Huge steps blow the weights up first; the multipliers follow through the outputs.
        cause = "the weights became NaN or inf, most likely a learning rate too high for this model and data"
        advice = "lower --lr or --dual-lr (start with --lr" + (f", now {config.lr:g})" if config else ")")
    else:
        cause = "the multipliers became NaN or inf while the weights stayed finite, most likely too large a dual step"
        advice = "lower --lr or --dual-lr (start with --dual-lr" + (f", now {config.dual_lr:g})" if config else ")")
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        kept = f"; the last good checkpoint ({checkpoint_path}, epoch {max((epoch or 1) - 1, 0)}) is kept"
    else:
        kept = "; nothing was saved from this epoch"
    raise TrainingError(
        f"training diverged{when}: {cause}; {advice} and start a new run (inputs with NaN or inf values "
        f"do the same: check the data if lowering does not help){kept}"
    )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint_path`` holds the last finished epoch."""

    def __init__(self, epoch: int, checkpoint_path: Path | None) -> None:
        super().__init__(f"interrupted in epoch {epoch + 1}")
        self.epoch = epoch
        self.checkpoint_path = checkpoint_path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, so a
    crafted checkpoint cannot run code; anything else is refused in one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors have many types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TrainingError(
            f"checkpoint {path} cannot be loaded safely (weights-only): {first_line[:200]}; start a new run"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
        raise TrainingError(f"checkpoint {path} is not a minnorm-audit checkpoint; start a new run")
    return state
