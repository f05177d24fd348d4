"""The resume checkpoint: what it holds, how it is written (atomically) and read back
(weights-only), and how a run is restored from it.

A checkpoint is written once before the first epoch, then after a finished epoch once
``TrainConfig.checkpoint_seconds`` (60) have passed since the last write (0: after every
epoch), after the last epoch, and on Ctrl-C or divergence with the last finished
epoch's state (``fit.checkpoint_epoch``). A run interrupted anywhere resumes from the
last finished epoch, a killed one from the last checkpoint written, and either ends with
the same multipliers as an uninterrupted run: it holds the model, the optimizer (with
the multipliers and their running mean), the batch order generator and torch's RNG,
and the run's settings (``settings``: the audit's options as plain values, with the
TrainConfig under ``"train"``), so that ``--resume`` trains on with the settings the
run started with (:func:`read_run_settings`) and a resume with others is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..minnorm import Minnorm
from .config import TrainConfig, TrainingError


# The checkpoint stays private whatever the umask: it holds the trained model and every
# example's multipliers, state derived from the user's data (the run's other files are
# written with the umask's mode).
CHECKPOINT_MODE = 0o600


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``
    (mode :data:`CHECKPOINT_MODE`)."""
    from ..report.parquet import atomic_write

    atomic_write(path, lambda stream: torch.save(obj, stream), mode=CHECKPOINT_MODE)


# TrainConfig fields that shape what is trained: a resume must keep them. ``epochs`` may
# change (nothing in an epoch depends on the planned total) but not below the epochs
# already done; device, workers, memory budget and deterministic kernels are where and
# how it runs, not what.
RESUME_FIXED_FIELDS = (
    "batch_size", "optimizer", "lr", "dual_lr", "damping", "margin", "seed", "score_state", "multiplier_cap",
    "multiplier_store", "multiplier_slots", "multiplier_memory_gb",
)


def host_copy(value: Any) -> Any:
    """A checkpoint state kept in memory until it is written: every tensor copied to
    host memory and every container copied (training goes on changing the live ones);
    state dicts keep their ``_metadata``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = value.copy()
        for key, item in value.items():
            copied[key] = host_copy(item)
        if hasattr(value, "_metadata"):
            copied._metadata = value._metadata  # type: ignore[attr-defined]
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


def load_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, so a
    crafted checkpoint cannot run code; anything else is refused in one line.
    ``mmap``: map the tensors instead of reading them (to read the settings only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - unpickling errors have many types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TrainingError(
            f"checkpoint {path} cannot be loaded safely (weights-only): {first_line[:200]}; start a new run"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
        raise TrainingError(f"checkpoint {path} is not a minnorm-audit checkpoint; start a new run")
    return state


def build_checkpoint(
    model: nn.Module,
    optimizer: Minnorm,
    batch_generator: torch.Generator,
    history: list[dict[str, float]],
    *,
    epoch: int,
    num_examples: int,
    dataset_fingerprint: str,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The state of a run after ``epoch`` finished epochs, as the checkpoint stores it;
    ``settings``: the run's settings as plain values (see the module notes)."""
    return {
        "settings": settings,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # holds the multipliers' running mean
        "batch_generator": batch_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "epoch": epoch,
        "num_examples": num_examples,
        "dataset_fingerprint": dataset_fingerprint,
    }


def restore_checkpoint(
    checkpoint_path: Path | None,
    model: nn.Module,
    optimizer: Minnorm,
    batch_generator: torch.Generator,
    *,
    num_examples: int,
    dataset_fingerprint: str,
    config: TrainConfig | None = None,
) -> tuple[list[dict[str, float]], int]:
    """Load ``checkpoint_path`` into the model, optimizer, batch generator and torch's
    RNG; returns the history so far and the number of finished epochs. A checkpoint of
    other data (fingerprint or size), of other training settings
    (:data:`RESUME_FIXED_FIELDS`) or with more finished epochs than ``config.epochs`` is
    refused."""
    if checkpoint_path is None or not Path(checkpoint_path).exists():
        raise TrainingError(f"no checkpoint to resume from at {checkpoint_path}")
    state = load_checkpoint(Path(checkpoint_path))
    if state.get("num_examples") != num_examples or state.get("dataset_fingerprint") != dataset_fingerprint:
        raise TrainingError(
            f"checkpoint {checkpoint_path} belongs to another dataset (fingerprint or size differs)"
        )
    if config is not None:
        _check_resumed_config(Path(checkpoint_path), state, config)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batch_generator.set_state(state["batch_generator"])
    torch.set_rng_state(state["torch_rng"])
    history = [dict(entry) for entry in state["history"]]
    return history, int(state["epoch"])


def read_run_settings(path: Path) -> tuple[dict[str, Any] | None, int]:
    """The settings a checkpoint stores (None for a checkpoint written before they were
    stored) and its number of finished epochs, without reading its tensors."""
    if not Path(path).exists():
        raise TrainingError(f"no checkpoint to resume from at {path}")
    state = load_checkpoint(Path(path), mmap=True)
    settings = state.get("settings")
    return (dict(settings) if isinstance(settings, dict) else None), int(state.get("epoch", 0))


def _check_resumed_config(path: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume with training settings other than the run's (one line)."""
    stored = (state.get("settings") or {}).get("train") or {}
    for name in RESUME_FIXED_FIELDS:
        if name in stored and stored[name] != getattr(config, name):
            raise TrainingError(
                f"checkpoint {path} was trained with {name}={stored[name]!r}, not {getattr(config, name)!r}; "
                "resume with the run's settings or start a new run"
            )
    done = int(state.get("epoch", 0))
    if done > config.epochs:
        raise TrainingError(
            f"checkpoint {path} has {done} finished epochs, more than epochs={config.epochs}; "
            "resume with at least as many epochs or start a new run"
        )
