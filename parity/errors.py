"""Error measures shared by the golden replay and the harness (float64 arithmetic)."""

from __future__ import annotations

import numpy as np


def relative(ours: np.ndarray, ref: np.ndarray) -> float:
    """``max|ours - ref| / max|ref|`` (the absolute error when ``ref`` is all zeros).

    Shapes must agree: a shape difference is reported as ``inf``.
    """
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    diff = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    return float(diff / scale) if scale > 0 else float(diff)


def absolute(ours: np.ndarray, ref: np.ndarray) -> float:
    """``max|ours - ref|``; ``inf`` on a shape difference."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    return float(np.abs(ours - ref).max()) if ref.size else 0.0


def relative_per_column(ours: np.ndarray, ref: np.ndarray) -> float:
    """Worst over the last axis of ``max|ours - ref| / max|ref|`` within each column."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    ours2, ref2 = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
    scale = np.abs(ref2).max(axis=0)
    diff = np.abs(ours2 - ref2).max(axis=0)
    return float(np.max(np.where(scale > 0, diff / np.where(scale > 0, scale, 1), diff)))
