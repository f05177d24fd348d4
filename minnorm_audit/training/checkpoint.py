"""The resume checkpoint: what it holds, how it is written (atomically) and read back
(weights-only), and how a run is restored from it.

A checkpoint is written after every finished epoch (and once before the first), so a
run killed or interrupted anywhere resumes from the last finished epoch and ends with
the same multipliers as an uninterrupted run: it holds the model, the optimizer (with
the multipliers and their running mean), the batch order generator and torch's RNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..minnorm import Minnorm
from .config import TrainingError


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    from ..report.parquet import atomic_write

    atomic_write(path, lambda stream: torch.save(obj, stream))


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


def build_checkpoint(
    model: nn.Module,
    optimizer: Minnorm,
    batch_generator: torch.Generator,
    history: list[dict[str, float]],
    *,
    epoch: int,
    num_examples: int,
    dataset_fingerprint: str,
) -> dict[str, Any]:
    """The state of a run after ``epoch`` finished epochs, as the checkpoint stores it."""
    return {
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
) -> tuple[list[dict[str, float]], int]:
    """Load ``checkpoint_path`` into the model, optimizer, batch generator and torch's
    RNG; returns the history so far and the number of finished epochs. A checkpoint of
    other data (fingerprint or size) is refused."""
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
    return history, int(state["epoch"])
