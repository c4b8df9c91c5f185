"""Error measures shared by the golden replay and the harness (float64 arithmetic)."""

from __future__ import annotations

import numpy as np


def relative(ours: np.ndarray, ref: np.ndarray, before: np.ndarray | None = None) -> float:
    """``max|ours - ref| / max|ref|`` (the absolute error when ``ref`` is all zeros).

    With ``before`` (the value a step started from, e.g. parameters before an update), the
    scale is ``max(|ref|, |before|)``: a step that lands near zero is rounded at the scale it
    started from, and a relative error against the small result would be meaningless.
    Shapes must agree: a shape difference is reported as ``inf``.
    """
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    diff = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    if before is not None:
        scale = max(scale, np.abs(np.asarray(before, np.float64)).max())
    return float(diff / scale) if scale > 0 else float(diff)


def absolute(ours: np.ndarray, ref: np.ndarray) -> float:
    """``max|ours - ref|``; ``inf`` on a shape difference."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    return float(np.abs(ours - ref).max()) if ref.size else 0.0


def relative_per_column(ours: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    """Worst over the last axis of ``max|ours - ref| / max(floor, max|ref|)`` within each
    column (the absolute error in an all-zero column when ``floor`` is 0).

    ``floor = 1`` suits normalized features: a column of unit root mean square is measured
    absolutely, one that an outlier stretched past 1 (up to sqrt(n)) at its own scale, and a
    column of tiny values (features of a zero gradient) is not inflated by its own smallness.
    """
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    ours2, ref2 = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
    scale = np.maximum(np.abs(ref2).max(axis=0), floor)
    diff = np.abs(ours2 - ref2).max(axis=0)
    return float(np.max(np.where(scale > 0, diff / np.where(scale > 0, scale, 1), diff)))


def update_error(ours: np.ndarray, ref: np.ndarray, ref_mlp_output: np.ndarray,
                 exp_mult: float, step_mult: float) -> float:
    """``max|ours - ref|`` over the update's natural scale.

    The update is ``direction * exp(magnitude * exp_mult) * step_mult``; its scale is
    ``step_mult * max exp(magnitude * exp_mult) * max|MLP output|`` over the tensor: the step
    an output of the tensor's largest size would make. Where the direction output cancels
    (terms summing to 1.2 giving 0.05), this measures the error against the size of what was
    summed, as a floating-point forward error bound does, instead of against the small
    result.
    """
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    out = np.asarray(ref_mlp_output, np.float64)
    scale = step_mult * np.exp(out[..., 1] * exp_mult).max() * np.abs(out).max()
    diff = np.abs(ours - ref).max()
    return float(diff / scale) if scale > 0 else float(diff)
