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


def relative_error(estimate: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """``||estimate - reference|| / ||reference||``."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(estimate - reference) / max(np.linalg.norm(reference), math.ulp(1.0)))
