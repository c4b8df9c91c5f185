"""The inputs of the per-tensor LSTM, one row per tensor.

- :class:`TensorStatistics` (VeLO, upstream ``HyperV2``), 30 columns from ``p`` and the **old**
  momentum and rms (before this step's update): ``tanh(10 (t/T - c))`` for 9 centres ``c``, the
  9 loss features, ``clip_log_abs`` of the mean rms, a one-hot rank (5), and ``clip_log_abs``
  of the variances of momentum and of rms about the *momentum* mean (upstream's ``var_rms``
  quirk: ``max(M, R)`` columns), the accumulators scaled by ``rsqrt(max(1e-9, mean(p^2)))``.
- :class:`TrainingProgress` (Celo, Celo-Adam), 18 columns, the same for every tensor: the 9
  fraction features and the 9 loss features. The LSTM is then a learned schedule.

Each has an eager form (per tensor; sharded tensors' reductions as rounds of collectives,
:mod:`lopt_port.sharding`) and a fused form (from the per-tensor statistics of VeLO's fused
phase A).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lopt_port.constants import (
    VELO_LOG_ABS_CLIP,
    VELO_LOG_ABS_EPS,
    VELO_LOG_ABS_SCALE,
    VELO_NORM_MULT_FLOOR,
)
from lopt_port.sharding import Mean, Rounds, ShardSpec, local, run_local, run_rounds, shard_spec
from lopt_port.velo_config import NUM_RANK_FEATURES


def clip_log_abs(v: torch.Tensor) -> torch.Tensor:
    """``0.5 * clip(log(1e-8 + |10 v|), -5, 5)``."""
    mag = torch.log(VELO_LOG_ABS_EPS + torch.abs(v * VELO_LOG_ABS_SCALE))
    return torch.clamp(mag, -VELO_LOG_ABS_CLIP, VELO_LOG_ABS_CLIP) * 0.5


def rank_one_hot(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``one_hot(number of dims > 1, 5)`` (all zeros from rank 5 on)."""
    rank = sum(1 for s in shape if s > 1)
    out = torch.zeros(NUM_RANK_FEATURES, dtype=torch.float32, device=device)
    if rank < NUM_RANK_FEATURES:
        out[rank] = 1.0
    return out


def lstm_features(p: torch.Tensor, state: dict[str, Any], frac_feat: torch.Tensor,
                  loss_features: torch.Tensor) -> torch.Tensor:
    """VeLO's 30 LSTM inputs of one whole tensor from ``p`` and its old momentum and rms."""
    features, _ = run_local(lstm_feature_rounds(p, state, frac_feat, loss_features))
    return features


def lstm_feature_rounds(p: torch.Tensor, state: dict[str, Any], frac_feat: torch.Tensor,
                        loss_features: torch.Tensor) -> Rounds:
    """:func:`lstm_features` as rounds of reductions (:mod:`lopt_port.sharding`); returns
    ``(features, mean(p^2))``."""
    spec = shard_spec(p)
    rows = spec.global_shape[0] if spec is not None else None
    p32 = local(p).to(torch.float32)
    (mean_p2,) = yield [Mean(p32 * p32, rows=rows)]
    norm = torch.rsqrt(torch.clamp_min(mean_p2, VELO_NORM_MULT_FLOOR))
    m = local(state["momentum"]) * norm
    rms = local(state["rms"]) * norm
    axes = tuple(range(p.dim()))
    mean_m, mean_rms = m, rms  # a scalar parameter: nothing to average
    if axes:
        mean_m, mean_rms = yield [Mean(m, axes, keepdim=True, rows=rows),
                                  Mean(rms, axes, keepdim=True, rows=rows)]
    mean_rms = mean_rms.reshape(-1)
    var_m, var_rms = torch.square(m - mean_m), torch.square(rms - mean_m)
    if axes:
        var_m, var_rms = yield [Mean(var_m, axes, rows=rows), Mean(var_rms, axes, rows=rows)]
    return torch.cat([frac_feat, loss_features.to(m.device), clip_log_abs(mean_rms),
                      rank_one_hot(p.shape, m.device), clip_log_abs(var_m),
                      clip_log_abs(var_rms)]), mean_p2


class TensorStatistics:
    """VeLO's per-tensor inputs (module docstring); ``momentum_decays``: M."""

    def __init__(self, momentum_decays: int) -> None:
        self.k = momentum_decays

    def eager(self, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
              specs: Sequence[ShardSpec | None], frac_feat: torch.Tensor,
              loss_features: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The inputs of every tensor, and ``mean(p^2)`` of the sharded ones (computed on the
        way, over all ranks), by index."""
        sharded = [i for i, spec in enumerate(specs) if spec is not None]
        from_shards = dict(zip(sharded, run_rounds([
            (lstm_feature_rounds(params[i], states[i], frac_feat, loss_features), specs[i])
            for i in sharded]), strict=True))
        rows = torch.stack([
            from_shards[i][0] if i in from_shards
            else lstm_features(p, s, frac_feat, loss_features)
            for i, (p, s) in enumerate(zip(params, states, strict=True))])
        return rows, {i: v[1] for i, v in from_shards.items()}

    def fused(self, params: Sequence[torch.Tensor], stats: torch.Tensor,
              frac_feat: torch.Tensor, loss_features: torch.Tensor) -> torch.Tensor:
        """The inputs from phase A's per-tensor statistics ``stats`` ``[n, 2 + 3M]``: mean
        p^2, the M momentum means, the M momentum variances, the mean rms, the ``var_rms``
        columns."""
        k, n = self.k, len(params)
        norm = torch.rsqrt(torch.clamp_min(stats[:, 0], VELO_NORM_MULT_FLOOR))
        norm2 = (norm * norm)[:, None]
        rank = torch.stack([rank_one_hot(p.shape, stats.device) for p in params])
        return torch.cat([
            frac_feat.expand(n, -1), loss_features.expand(n, -1),
            clip_log_abs(stats[:, 1 + 2 * k] * norm)[:, None], rank,
            clip_log_abs(stats[:, 1 + k:1 + 2 * k] * norm2),
            clip_log_abs(stats[:, 2 + 2 * k:] * norm2)], dim=1)


class TrainingProgress:
    """Celo's inputs: the fraction and loss features, one identical row per tensor."""

    @staticmethod
    def _rows(n: int, frac_feat: torch.Tensor, loss_features: torch.Tensor) -> torch.Tensor:
        row = torch.cat([frac_feat, loss_features.to(frac_feat.device)])
        return row.expand(n, -1).contiguous()

    def eager(self, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
              specs: Sequence[ShardSpec | None], frac_feat: torch.Tensor,
              loss_features: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The 18 inputs of every tensor (no per-tensor reduction: no ``mean(p^2)``)."""
        return self._rows(len(params), frac_feat, loss_features), {}

    def fused(self, params: Sequence[torch.Tensor], stats: torch.Tensor | None,
              frac_feat: torch.Tensor, loss_features: torch.Tensor) -> torch.Tensor:
        """The same rows (the statistics are not read)."""
        return self._rows(len(params), frac_feat, loss_features)
