"""The fused VeLO step: phase A and phase B kernels of ``csrc/`` around the per-tensor network.

Per step, for every tensor at once:

1. ``velo_accumulate`` (one op): gradients with prefab weight decay and the +-1000 clip; each
   tensor's statistics of ``p`` and the *old* momentum and rms (mean p^2, means and
   variances of m, mean rms and upstream's ``var_rms`` about the momentum mean); the factored
   statistics; the moving averages; the per-feature sums of squares of the 30 features.
2. In torch, on the parameters' device: loss buffer, the 30 LSTM inputs per tensor from those
   statistics, the LSTM over all tensors, ``controls``, ``lr_mult``, and every tensor's MLP
   weights as one batched product.
3. ``velo_apply`` (one op): features, normalization, each tensor's MLP, the step.

Nothing leaves the device (``lr_mult`` and the statistics are read by the kernels where they
are). The state is the eager path's, so runs can switch between ``fused=True`` and ``False``.
FSDP2 parameters run on their local shards, phase A's statistics and sums of squares
completed over the ranks (:mod:`lopt_port.fused_shards`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lopt_port import extension
from lopt_port.constants import VELO_GRAD_CLIP
from lopt_port.fused_shards import (
    LocalStep,
    any_dtensor,
    complete,
    finish_factored,
    rows,
    spread,
    velo_stats,
)
from lopt_port.small_fc_lopt_fused import (
    decays_unsupported_reason,
    param_unsupported_reason,
    state_lists,
)

__all__ = ["PhaseA", "config_unsupported_reason", "param_unsupported_reason", "phase_a",
           "phase_b"]

MAX_HIDDEN = 16


def config_unsupported_reason(hparams: Mapping[str, Any]) -> str | None:
    """Why these hyperparameters cannot run fused (``None`` when they can)."""
    if (reason := decays_unsupported_reason(hparams)) is not None:
        return reason
    if hparams["ff_hidden_size"] > MAX_HIDDEN or hparams["ff_hidden_layers"] < 1:
        return (f"the fused kernels support per-parameter MLPs of at most {MAX_HIDDEN} units "
                f"and at least one hidden layer")
    return None


@dataclass
class PhaseA:
    """``velo_accumulate``'s results for a step's tensors."""

    #: The kernels' argument lists of the tensors ``live`` (``None``: none has local elements).
    lists: tuple[list, ...] | None
    #: ``[n, 2 + 3k]``: mean p^2, the k momentum means, their variances, the mean rms, the
    #: ``var_rms`` columns (of the whole tensors).
    stats: torch.Tensor
    #: ``[n, F]``: the feature sums of squares (of the whole tensors).
    sumsq: torch.Tensor
    #: The tensors the kernels run on (all but empty local shards).
    live: list[int]
    #: The whole tensors' element counts of ``live`` (empty: the tensors are whole).
    counts: list[int]


def phase_a(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, Any]], decays: torch.Tensor, grad_wd: Sequence[float]
            ) -> PhaseA:
    """Run ``velo_accumulate`` (FSDP2 parameters: on their local shards, the statistics and
    sums of squares completed over the ranks, :mod:`lopt_port.fused_shards`)."""
    if any_dtensor(params):
        return _sharded_phase_a(params, grads, states, decays, grad_wd)
    lists = state_lists(params, states, grads)
    stats, sumsq, _ = extension.ops().velo_accumulate(*lists, decays, list(grad_wd),
                                                      VELO_GRAD_CLIP, False)
    return PhaseA(lists, stats, sumsq, list(range(len(params))), [])


def _sharded_phase_a(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     states: Sequence[dict[str, Any]], decays: torch.Tensor,
                     grad_wd: Sequence[float]) -> PhaseA:
    """Phase A on this rank's shards in three rounds of batched collectives: the factored
    means, the row-column means, then the moments and the feature sums of squares."""
    ops = extension.ops()
    step = LocalStep.of(params, grads, states)
    live = step.live
    lists = (state_lists([step.params[i] for i in live], [step.states[i] for i in live],
                         [step.grads[i] for i in live]) if live else None)
    wd = [float(grad_wd[i]) for i in live]
    finish_factored(step, ops, lists, decays, wd, VELO_GRAD_CLIP)
    k = (decays.numel() - 1) // 2
    moments = 3 + 2 * k
    if live:
        _, _, sums = ops.velo_accumulate(*lists, decays, wd, VELO_GRAD_CLIP, True)
        partial = spread(sums, live, len(params))
    else:
        partial = torch.zeros(len(params), moments + 6 + 8 * k, dtype=torch.float64,
                              device=params[0].device)
    total = complete(partial, step.specs)
    stats = velo_stats(total[:, :moments], step.counts(range(len(params))), k)
    return PhaseA(lists, stats, total[:, moments:].to(torch.float32), live, step.counts(live))


def phase_b(a: PhaseA, decays: torch.Tensor, grad_wd: Sequence[float], weights: torch.Tensor,
            hparams: Mapping[str, Any], lr_mult: torch.Tensor, param_scale: torch.Tensor,
            lr: Sequence[float], decay_mult: Sequence[float]) -> None:
    """Run ``velo_apply``: features, normalization, each tensor's MLP, the parameter write
    (the arguments per tensor of the step; the tensors ``a.live`` run)."""
    if a.lists is None:
        return
    live = a.live

    def pick(t: torch.Tensor) -> torch.Tensor:
        return rows(t, live).contiguous()

    extension.ops().velo_apply(
        *a.lists, decays, [float(grad_wd[i]) for i in live], VELO_GRAD_CLIP, pick(a.sumsq),
        pick(weights), hparams["ff_hidden_size"], hparams["ff_hidden_layers"], pick(lr_mult),
        pick(param_scale), [float(lr[i]) for i in live], [float(decay_mult[i]) for i in live],
        hparams["exp_mult"], hparams["step_mult"], a.counts)
