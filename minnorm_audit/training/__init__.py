"""Minnorm training of a network on a loaded dataset: the "train" step of the data path.

- ``loop.py``: :func:`fit` as its named steps (start_run, train_epochs, end_epoch, finish)
  and the epoch loop (eager, or the captured step on a GPU).
- ``setup.py``: device, seeds, channels-last layout, the (fused) optimizers and Minnorm.
- ``config.py``: :class:`TrainConfig`, :class:`FitResult`, the score states, the errors.
- ``checkpoint.py``: the resume checkpoint (atomic write, weights-only load, restore).
- ``predict.py``: outputs and margins of the trained network; bf16 autocast.
- ``distributed.py``: torchrun / DistributedDataParallel (rank slices, merged dual updates).
- ``models.py``: the default networks (MLP, plain CNN, torchvision) behind a standardizer.

Imports run down the data path: this package uses ``data`` and ``minnorm``, which never
import it. ``minnorm_audit.training.fit`` is the function; its module is ``training.loop``.
"""

from .checkpoint import atomic_torch_save, load_checkpoint, read_run_settings
from .config import (
    DEFAULT_EPOCHS,
    SCORE_STATES,
    FitResult,
    TrainConfig,
    TrainingError,
    TrainingInterrupted,
    default_batch_size,
    default_epochs,
)
from .distributed import DistributedContext, exit_rank_after, is_main_process, teardown
from .loop import cap_multipliers, check_finite, fit, train_one_epoch
from .models import Standardize, build_model, build_streamed_model
from .predict import autocast_context, output_margins, predict, predicted_classes
from .setup import resolve_device

__all__ = [
    "DEFAULT_EPOCHS",
    "SCORE_STATES",
    "DistributedContext",
    "FitResult",
    "Standardize",
    "TrainConfig",
    "TrainingError",
    "TrainingInterrupted",
    "atomic_torch_save",
    "autocast_context",
    "build_model",
    "build_streamed_model",
    "cap_multipliers",
    "check_finite",
    "default_batch_size",
    "default_epochs",
    "exit_rank_after",
    "fit",
    "is_main_process",
    "load_checkpoint",
    "output_margins",
    "predict",
    "predicted_classes",
    "read_run_settings",
    "resolve_device",
    "teardown",
    "train_one_epoch",
]
