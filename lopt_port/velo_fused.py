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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lopt_port import extension
from lopt_port.constants import VELO_GRAD_CLIP
from lopt_port.small_fc_lopt_fused import (
    decays_unsupported_reason,
    param_unsupported_reason,
    state_lists,
)

__all__ = ["config_unsupported_reason", "param_unsupported_reason", "phase_a", "phase_b"]

MAX_HIDDEN = 16


def config_unsupported_reason(hparams: Mapping[str, Any]) -> str | None:
    """Why these hyperparameters cannot run fused (``None`` when they can)."""
    if (reason := decays_unsupported_reason(hparams)) is not None:
        return reason
    if hparams["ff_hidden_size"] > MAX_HIDDEN or hparams["ff_hidden_layers"] < 1:
        return (f"the fused kernels support per-parameter MLPs of at most {MAX_HIDDEN} units "
                f"and at least one hidden layer")
    return None


def phase_a(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, Any]], decays: torch.Tensor, grad_wd: Sequence[float]
            ) -> tuple[tuple[list, ...], torch.Tensor, torch.Tensor]:
    """Run ``velo_accumulate``; ``(the op's tensor lists, stats [n, 2+3k], sumsq [n, F])``."""
    lists = state_lists(params, states, grads)
    stats, sumsq = extension.ops().velo_accumulate(*lists, decays, list(grad_wd),
                                                   VELO_GRAD_CLIP)
    return lists, stats, sumsq


def phase_b(lists: tuple[list, ...], decays: torch.Tensor, grad_wd: Sequence[float],
            sumsq: torch.Tensor, weights: torch.Tensor, hparams: Mapping[str, Any],
            lr_mult: torch.Tensor, param_scale: torch.Tensor, lr: Sequence[float],
            decay_mult: Sequence[float]) -> None:
    """Run ``velo_apply``: features, normalization, each tensor's MLP, the parameter write."""
    extension.ops().velo_apply(
        *lists, decays, list(grad_wd), VELO_GRAD_CLIP, sumsq, weights.contiguous(),
        hparams["ff_hidden_size"], hparams["ff_hidden_layers"], lr_mult.contiguous(),
        param_scale.contiguous(), list(lr), list(decay_mult), hparams["exp_mult"],
        hparams["step_mult"])
