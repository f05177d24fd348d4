"""Small numeric helpers: Spearman rank correlation (the diagnostics' rank stability)
and the relative error the tests and benchmarks measure against closed forms."""

from __future__ import annotations

import math

import numpy as np
import torch


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for constant input."""
    first_ranks = _average_ranks(np.asarray(first, dtype=np.float64))
    second_ranks = _average_ranks(np.asarray(second, dtype=np.float64))
    if first_ranks.std() == 0 or second_ranks.std() == 0:
        return float("nan")
    return float(np.corrcoef(first_ranks, second_ranks)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts
    return (first_rank + 0.5 * (counts - 1))[inverse].astype(np.float64)


def spearman_tensors(first: torch.Tensor, second: torch.Tensor) -> float:
    """:func:`spearman` of two 1-D tensors computed where they are (on the GPU for the
    per-epoch diagnostics): only the result comes back to the host."""
    # MPS has no float64; the ranks are exact in float32 up to 2**23 examples.
    dtype = torch.float32 if first.device.type == "mps" else torch.float64
    first_ranks = _average_ranks_tensor(first.reshape(-1), dtype)
    second_ranks = _average_ranks_tensor(second.reshape(-1).to(first.device), dtype)
    first_ranks = first_ranks - first_ranks.mean()
    second_ranks = second_ranks - second_ranks.mean()
    denominator = torch.sqrt(first_ranks.square().sum() * second_ranks.square().sum())
    correlation = (first_ranks * second_ranks).sum() / denominator
    # Constant input: NaN, as spearman(); one scalar fetched either way.
    return float(torch.where(denominator > 0, correlation, torch.full_like(correlation, float("nan"))))


def _average_ranks_tensor(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0-based ranks, ties given their average rank (as ``_average_ranks``)."""
    sorted_values, order = torch.sort(values)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    counts = counts.to(dtype)
    average = torch.cumsum(counts, 0) - counts + 0.5 * (counts - 1)
    ranks = torch.empty(values.shape, dtype=dtype, device=values.device)
    ranks[order] = average[inverse]
    return ranks


def relative_error(estimate: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """``||estimate - reference|| / ||reference||``."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(estimate - reference) / max(np.linalg.norm(reference), math.ulp(1.0)))
