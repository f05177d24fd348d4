"""fit(): Minnorm training of a network, with checkpoint/resume and diagnostics.

One code path for CPU and GPU: every epoch draws a seeded ``randperm`` and splits it
into batches of example ids, which are exactly what the multiplier lookup needs. The
data is held on the training device when it fits (airbench style), else batches come
from a DataLoader with workers and pinned memory (data/'s batch sources). bf16
autocast on CUDA, a no-op elsewhere.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
DistributedDataParallel, each global batch is split into contiguous per-rank slices
and the dual updates are merged across ranks (``distributed.py``); every rank ends
with the same multipliers, and only rank 0 writes the checkpoint and shows progress.

fit() is its steps, in order: :func:`start_run` (seed, device, data, model,
optimizer), resume from the checkpoint or write the epoch-0 one, :func:`train_epochs`
(each epoch: :func:`run_epoch`, then :func:`end_epoch`: check_finite, cap, running
average, the checkpoint when due: :func:`checkpoint_epoch`) and :func:`finish`
(predictions and multipliers -> FitResult).
The state they share is one :class:`TrainingRun`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.placement import BatchSource, LazyImages, make_batch_source
from ..minnorm import ConstraintForm, Minnorm
from . import distributed
from .capture import StaticStep, capture_wanted, padded_batches
from .checkpoint import (
    atomic_torch_save,
    build_checkpoint,
    host_copy,
    restore_checkpoint,
)
from .config import (
    CAP_QUANTILE,
    DEFAULT_EPOCHS,
    SCORE_STATES,
    FitResult,
    TrainConfig,
    TrainingError,
    TrainingInterrupted,
    default_batch_size,
)
from .predict import autocast_context, output_margins, predict, predicted_classes
from .setup import make_minnorm, resolve_device, seed_everything, uses_channels_last

# FitResult holds full examples x outputs arrays up to this many elements (256 MB each
# in float32). Beyond it (an ImageNet-size audit: 1.28M x 1000 would be 5 GB per array)
# they stay None and scoring reads the trained state a block of rows at a time.
DENSE_RESULT_ELEMENTS = 1 << 26


@dataclass
class TrainingRun:
    """What one fit() call carries from step to step."""

    config: TrainConfig
    form: ConstraintForm
    num_examples: int
    num_outputs: int
    dataset_fingerprint: str
    checkpoint_path: Path | None
    context: distributed.DistributedContext
    device: torch.device
    model: nn.Module  # the network itself: its state_dict is what is checkpointed
    training_model: nn.Module  # the one trained: ``model``, or ``model`` in DDP under torchrun
    source: BatchSource
    targets: torch.Tensor
    optimizer: Minnorm
    batch_generator: torch.Generator
    static_step: StaticStep | None = None  # the captured step on CUDA (capture.py), else None
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    # The run's settings as plain values, stored in every checkpoint (see checkpoint.py).
    settings: dict[str, Any] | None = None
    # Checkpoints by time (config.checkpoint_seconds): when the last one was written,
    # and the state of the last finished epoch when it is not on disk yet (an
    # in-memory copy, written if training stops early).
    last_checkpoint_time: float = 0.0
    unsaved_checkpoint: dict[str, Any] | None = None
    # Convolutions run on channels-last (NHWC) weights and batches: see uses_channels_last.
    channels_last: bool = False


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
    run_settings: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``(inputs, targets)`` with Minnorm and return its multipliers.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of ``inputs`` to ``(batch, num_outputs)``.
    inputs : Tensor or LazyImages
        The whole dataset; example ``i`` is row ``i`` (its id). Held on the device when
        it fits ``config.max_memory_gb``, else fed by a DataLoader (data/'s batch sources).
    targets : Tensor
    form : {"margin", "equality"}
    num_outputs : int
    config : TrainConfig
        ``epochs=None`` trains ``DEFAULT_EPOCHS`` (an audit sets the network's budget first).
    dataset_fingerprint : str
        Stored in checkpoints; resuming refuses a checkpoint of other data.
    checkpoint_path : Path, optional
        Written atomically before the first epoch, then once ``config.checkpoint_seconds``
        have passed since the last write (0: after every epoch), after the last epoch,
        and when training stops early (Ctrl-C, divergence) with the state of the last
        finished epoch.
    resume : bool
        Continue from ``checkpoint_path``.
    progress : bool
        Show a tqdm bar on stderr.
    on_epoch : callable, optional
        Called with each epoch's diagnostics.
    run_settings : dict, optional
        The run's settings as plain values (``AuditOptions.to_record()``), stored in
        every checkpoint; default ``{"train": config.to_dict()}``. A resume with other
        training settings than the checkpoint's is refused.

    Returns
    -------
    FitResult
        The same on every rank of a torchrun launch.
    """
    if config.epochs is None:
        config = replace(config, epochs=DEFAULT_EPOCHS)
    if config.batch_size is None:
        config = replace(config, batch_size=default_batch_size(int(inputs.shape[0])))
    run = start_run(model, inputs, targets, form=form, num_outputs=num_outputs, config=config,
                    dataset_fingerprint=dataset_fingerprint, checkpoint_path=checkpoint_path)
    run.settings = run_settings
    if resume:
        run.history, run.start_epoch = restore_checkpoint(
            checkpoint_path, run.model, run.optimizer, run.batch_generator,
            num_examples=run.num_examples, dataset_fingerprint=dataset_fingerprint, config=config,
        )
        run.last_checkpoint_time = time.monotonic()  # the checkpoint just read is on disk
    else:
        # Epoch 0 is a consistent state too: a run stopped in its first epoch
        # (Ctrl-C, kill) resumes from here.
        save_checkpoint(run, 0)
    train_seconds = train_epochs(run, progress=progress, on_epoch=on_epoch)
    return finish(run, train_seconds)


def start_run(
    model: nn.Module,
    inputs: torch.Tensor | LazyImages,
    targets: torch.Tensor,
    *,
    form: ConstraintForm,
    num_outputs: int,
    config: TrainConfig,
    dataset_fingerprint: str,
    checkpoint_path: Path | None,
) -> TrainingRun:
    """Seed, pick the device (joining the process group under torchrun), place the
    data, move and wrap the model, build the optimizer and the batch order generator."""
    context, device = distributed.setup(resolve_device(config.device))
    seed_everything(config.seed, config.deterministic)
    if device.type == "cuda" and not config.deterministic:
        torch.backends.cudnn.benchmark = True  # few batch shapes: tuned once each
    num_examples = int(inputs.shape[0])
    model = model.to(device)
    channels_last = uses_channels_last(model, inputs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The whole dataset on the device when it fits (the common case for audits of up
    # to a few hundred thousand small images or embeddings), else a DataLoader.
    source = make_batch_source(inputs, device, workers=config.workers, max_memory_gb=config.max_memory_gb)
    targets = targets.to(device)
    training_model = distributed.wrap_model(model, context, device)
    optimizer = make_minnorm(model, form=form, num_examples=num_examples, num_outputs=num_outputs,
                             config=config, dataset_fingerprint=dataset_fingerprint, device=device)
    if config.score_state not in SCORE_STATES:
        raise TrainingError(f"score_state must be one of {', '.join(SCORE_STATES)}, got {config.score_state!r}")
    batch_generator = torch.Generator(device="cpu")
    batch_generator.manual_seed(config.seed)
    static_step = None
    if capture_wanted(device, num_examples, config.batch_size, context.enabled):
        static_step = StaticStep(training_model, optimizer, capture=True)
    return TrainingRun(
        config=config, form=form, num_examples=num_examples, num_outputs=num_outputs,
        dataset_fingerprint=dataset_fingerprint,
        checkpoint_path=checkpoint_path, context=context, device=device, model=model,
        training_model=training_model, source=source, targets=targets, optimizer=optimizer,
        batch_generator=batch_generator, channels_last=channels_last, static_step=static_step,
    )


def save_checkpoint(run: TrainingRun, epochs_done: int) -> None:
    """Write the run's state after ``epochs_done`` epochs (rank 0, when a path is set)."""
    if run.checkpoint_path is not None and run.context.is_main:
        atomic_torch_save(checkpoint_state(run, epochs_done), Path(run.checkpoint_path))
        run.unsaved_checkpoint = None
        run.last_checkpoint_time = time.monotonic()


def checkpoint_state(run: TrainingRun, epochs_done: int) -> dict[str, Any]:
    """What the checkpoint after ``epochs_done`` epochs holds (live tensors, see
    ``Minnorm.state_dict``)."""
    return build_checkpoint(
        run.model, run.optimizer, run.batch_generator, run.history, epoch=epochs_done,
        num_examples=run.num_examples, dataset_fingerprint=run.dataset_fingerprint,
        settings=run.settings or {"train": run.config.to_dict()},
    )


def train_epochs(
    run: TrainingRun, *, progress: bool, on_epoch: Callable[[dict[str, float]], None] | None
) -> float:
    """Epochs ``run.start_epoch`` to ``config.epochs``; returns the seconds they took."""
    bar = _progress_bar(run.config.epochs, run.start_epoch, progress and run.context.is_main)
    started = time.perf_counter()
    run.model.train()
    for epoch in range(run.start_epoch, run.config.epochs):
        run_epoch(run, epoch, bar)
        try:
            diagnostics = end_epoch(run, epoch)
            if bar is not None:
                bar.set_postfix(
                    violation=f"{diagnostics['max_violation']:.3g}",
                    fitted=f"{diagnostics['fraction_fitted']:.1%}",
                )
                bar.update(1)
            if on_epoch is not None and run.context.is_main:
                on_epoch(diagnostics)
        except KeyboardInterrupt:  # between epochs: as in run_epoch
            if bar is not None:
                bar.close()
            write_unsaved_checkpoint(run)
            raise TrainingInterrupted(epoch, run.checkpoint_path if run.context.is_main else None) from None
    if bar is not None:
        bar.close()
    return time.perf_counter() - started


def run_epoch(run: TrainingRun, epoch: int, bar: Any = None) -> None:
    """One epoch of training; Ctrl-C becomes :class:`TrainingInterrupted`."""
    try:
        train_one_epoch(run.training_model, run.optimizer, run.source, run.targets, run.config.batch_size,
                        run.batch_generator, run.context, channels_last=run.channels_last,
                        static_step=run.static_step)
    except KeyboardInterrupt:
        # Mid-epoch state is not resumable; the last finished epoch's is: on disk
        # already, or kept in memory since the last write and written now.
        if bar is not None:
            bar.close()
        write_unsaved_checkpoint(run)
        raise TrainingInterrupted(epoch, run.checkpoint_path if run.context.is_main else None) from None


def end_epoch(run: TrainingRun, epoch: int) -> dict[str, float]:
    """After epoch ``epoch`` (0-based): check, cap, average, record and checkpoint;
    returns the epoch's diagnostics."""
    diagnostics = run.optimizer.diagnostics()
    # Before anything is saved: a diverged epoch never replaces the last good checkpoint.
    try:
        check_finite(run.optimizer, diagnostics, config=run.config, epoch=epoch + 1,
                     checkpoint_path=run.checkpoint_path)
    except TrainingError:
        write_unsaved_checkpoint(run)  # the last good epoch, as the message says
        raise
    cap_multipliers(run.optimizer, run.config.multiplier_cap)
    # Running mean of the multipliers over epochs: the "average" score state.
    run.optimizer.accumulate_average()
    diagnostics = {"epoch": epoch + 1, **diagnostics}
    run.history.append(diagnostics)
    checkpoint_epoch(run, epoch + 1)
    return diagnostics


def checkpoint_epoch(run: TrainingRun, epochs_done: int) -> None:
    """After a finished epoch: write the checkpoint when ``config.checkpoint_seconds``
    have passed since the last write (or it is 0, or this was the last epoch), else
    keep an in-memory copy of the state for :func:`write_unsaved_checkpoint`."""
    if run.checkpoint_path is None or not run.context.is_main:
        return
    seconds = run.config.checkpoint_seconds
    due = (seconds <= 0 or epochs_done >= run.config.epochs
           or time.monotonic() - run.last_checkpoint_time >= seconds)
    if due:
        save_checkpoint(run, epochs_done)
    else:
        run.unsaved_checkpoint = host_copy(checkpoint_state(run, epochs_done))


def write_unsaved_checkpoint(run: TrainingRun) -> None:
    """Training stops early: put the last finished epoch's state on disk if the
    checkpoint there is older."""
    if run.unsaved_checkpoint is not None and run.checkpoint_path is not None and run.context.is_main:
        atomic_torch_save(run.unsaved_checkpoint, Path(run.checkpoint_path))
        run.unsaved_checkpoint = None
        run.last_checkpoint_time = time.monotonic()


def train_one_epoch(
    model: nn.Module,
    optimizer: Minnorm,
    source: BatchSource,
    targets: torch.Tensor,
    batch_size: int,
    batch_generator: torch.Generator,
    context: distributed.DistributedContext | None = None,
    *,
    channels_last: bool = False,
    static_step: StaticStep | None = None,
) -> None:
    """One pass over the data in random batches; every example is seen exactly once.

    The permutation is the same on every rank; each rank trains on its contiguous
    slice of every global batch (all of it in a single process). ``channels_last``:
    image batches are handed to the model in NHWC memory layout. ``static_step``
    (one process only): fixed-shape batches, the last one padded, through
    ``Minnorm.static_step`` (captured in a CUDA graph on a GPU, see ``capture.py``);
    else the eager step with deferred dual updates.
    """
    context = context or distributed.DistributedContext()
    order = torch.randperm(len(source), generator=batch_generator)
    if static_step is not None and len(order) >= batch_size:
        id_batches, valid_batches = padded_batches(order, batch_size)
        for (batch_ids, batch_inputs), valid in zip(source.iterate(id_batches), valid_batches):
            if channels_last:
                batch_inputs = batch_inputs.contiguous(memory_format=torch.channels_last)
            static_step(batch_inputs, targets.index_select(0, batch_ids), batch_ids,
                        valid.to(batch_ids.device, non_blocking=True))
        return
    global_batches = list(order.split(batch_size))
    local_batches = [distributed.rank_slice(batch, context) for batch in global_batches]
    # Every example once per epoch: the dual updates may be applied a window at a time.
    with optimizer.deferred_dual_updates():
        for global_batch, (batch_ids, batch_inputs) in zip(global_batches, source.iterate(local_batches)):
            if channels_last:
                batch_inputs = batch_inputs.contiguous(memory_format=torch.channels_last)
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


def cap_multipliers(optimizer: Minnorm, kappa: float | None) -> None:
    """Set the soft-margin cap from the current multipliers (margin form only; see
    ``config.SCORE_STATES`` for why)."""
    if kappa is None or optimizer.form != "margin":
        return
    largest = optimizer.multipliers.row_max().detach().float()
    rank = max(1, int(math.ceil(CAP_QUANTILE * largest.numel())))
    quantile = float(largest.kthvalue(rank).values)
    optimizer.max_multiplier = kappa * quantile if quantile > 0 else None


def finish(run: TrainingRun, train_seconds: float) -> FitResult:
    """The trained state as a FitResult: final outputs or margins, and the full
    multiplier arrays while they are small (scoring reads larger runs from the
    optimizer in blocks, FitResult.state_rows)."""
    dense_result = run.form == "equality" or run.num_examples * run.num_outputs <= DENSE_RESULT_ELEMENTS
    if dense_result:
        final_outputs = predict(run.model, run.source, run.config.batch_size, run.context)
        final_margins = (
            None if run.form == "equality"
            else output_margins(torch.from_numpy(final_outputs), run.targets.cpu()).numpy()
        )
        final_predicted = None if run.form == "equality" else predicted_classes(final_outputs)
    else:
        final_outputs = None
        final_margins, final_predicted = predict(run.model, run.source, run.config.batch_size, run.context,
                                                 margins_for=run.targets, with_predicted=True)
    run.source.close()
    labels = None if run.form == "equality" else run.targets.detach().cpu().numpy().astype(np.int64)
    return FitResult(
        final_multipliers=_dense_state(run, "final", dense_result),
        average_multipliers=_dense_state(run, "average", dense_result),
        labels=labels,
        final_outputs=final_outputs,
        final_margins=final_margins,
        final_predicted=final_predicted,
        minnorm=run.optimizer,
        model=run.model,
        history=run.history,
        epochs_run=len(run.history),
        train_seconds=train_seconds,
        device=str(run.device),
        data_placement=run.source.placement,
        world_size=run.context.world_size,
        mean_violations=_dense_state(run, "violation", dense_result),
    )


def _dense_state(run: TrainingRun, state: str, dense_result: bool) -> np.ndarray | None:
    if not dense_result or (state == "violation" and run.optimizer.visits is None):
        return None
    return run.optimizer.state_rows(state, 0, run.num_examples).detach().cpu().numpy()


def _progress_bar(total: int, initial: int, enabled: bool):  # type: ignore[no-untyped-def]
    """A tqdm bar over the epochs on stderr, or None; it stays on screen after the last
    epoch. Its size comes from shutil.get_terminal_size, which falls back to 80 x 24
    where the terminal reports 0 x 0 (a pty nobody sized: ``script``, ``docker exec -t``,
    some CI runners): there tqdm's own guess is -1 rows and it draws nothing at all."""
    if not enabled:
        return None
    import shutil

    from tqdm import tqdm

    size = shutil.get_terminal_size()
    return tqdm(total=total, initial=initial, desc="minnorm", unit="epoch", file=sys.stderr, leave=True,
                ncols=size.columns, nrows=size.lines)