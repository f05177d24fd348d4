"""A small float64 Minnorm fit, run by tests/test_distributed.py under torchrun (2 gloo
ranks) and in-process (1 rank). Not a test module itself.

Usage: python tests/ddp_fit_worker.py OUT_DIR   (each rank writes OUT_DIR/rank<r>.npz)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

# 129 examples in batches of 32: the last global batch holds one example, so with two
# ranks rank 1 gets an empty slice there (the case DDP must still all-reduce through).
NUM_EXAMPLES = 129
BATCH_SIZE = 32
NUM_CLASSES = 4


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    generator = np.random.default_rng(0)
    labels = generator.integers(0, NUM_CLASSES, size=NUM_EXAMPLES)
    centers = generator.normal(size=(NUM_CLASSES, 16))
    features = centers[labels] + generator.normal(scale=0.8, size=(NUM_EXAMPLES, 16))
    flipped = generator.choice(NUM_EXAMPLES, 12, replace=False)
    labels[flipped] = (labels[flipped] + 1) % NUM_CLASSES
    return torch.tensor(features, dtype=torch.float64), torch.tensor(labels)


def run(out_dir: Path) -> dict[str, np.ndarray]:
    from minnorm_audit.scoring import difficulty_scores
    from minnorm_audit.training import TrainConfig, distributed, fit

    inputs, labels = problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES)).double()
    config = TrainConfig(epochs=4, batch_size=BATCH_SIZE, dual_lr=0.05, lr=3e-3, device="cpu", seed=3)
    result = fit(model, inputs, labels, form="margin", num_outputs=NUM_CLASSES, config=config,
                 checkpoint_path=out_dir / "checkpoint.pt")
    arrays = {
        "final_multipliers": result.final_multipliers,
        "average_multipliers": result.average_multipliers,
        "mean_violations": result.mean_violations,
        "final_outputs": result.final_outputs,
        "difficulty": difficulty_scores(result.average_multipliers),
        "norms": np.array([entry["norm"] for entry in result.history]),
        "world_size": np.array(result.world_size),
    }
    rank = distributed.context_from_env().rank
    np.savez(out_dir / f"rank{rank}.npz", **arrays)
    return arrays


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from minnorm_audit.training import distributed

    run(Path(sys.argv[1]))
    # As the CLI ends a torchrun rank: leave the group, then exit without finalizing
    # the interpreter beside gloo threads that outlive the group (exit_rank_after).
    with distributed.exit_rank_after(distributed.teardown()):
        pass
