"""Per-step diagnostics a researcher logs (:meth:`~lopt_port.optimizer.LearnedOptimizer.
last_step_stats`), computed only on the steps that ask for them and never read to the host.

For each param group, one entry per parameter of the group (``group["params"]`` order):

- ``update_rms``: ``||p_after - p_before||_2 / sqrt(max(numel, 1))`` in float32, the RMS of
  what the step changed (``lr``, weight decay and the parameter's dtype rounding included;
  0 for a parameter the step did not update);
- VeLO, Celo, Celo-Adam: ``step_scale``, the learned per-tensor factor of the step (VeLO's
  and Celo-Adam's ``lr_mult``; Celo's schedule output after its first phase, else 1), NaN
  for a parameter the step did not update; and ``loss_features``, the loss features the
  per-tensor LSTM saw this step (one vector, the same for every group).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def _full(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a sharded ``DTensor``'s value gathered (a scalar here)."""
    full = getattr(x, "full_tensor", None)
    return full() if full is not None else x


def update_rms(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``||after - before||_2 / sqrt(max(numel, 1))`` in float32, a 0-d tensor on the
    parameter's device."""
    diff = after.detach().to(torch.float32) - before.to(torch.float32)
    return _full(torch.linalg.vector_norm(diff)) / math.sqrt(max(after.numel(), 1))


def group_stats(param_groups: Sequence[dict[str, Any]], stepped: Sequence[torch.Tensor],
                before: Sequence[torch.Tensor],
                step_scale: torch.Tensor | None = None,
                loss_features: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """The stats of one step, per param group. ``stepped`` are the parameters the step
    updated, ``before`` their values before it (same order), ``step_scale`` one factor per
    ``stepped`` parameter."""
    rms = {p: update_rms(b, p) for p, b in zip(stepped, before, strict=True)}
    scale = ({p: step_scale[i] for i, p in enumerate(stepped)}
             if step_scale is not None else None)
    stats = []
    for group in param_groups:
        params = group["params"]
        device = params[0].device if params else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float32, device=device)
        entry = {"update_rms": torch.stack([rms[p].to(device) if p in rms else zero
                                            for p in params]) if params else zero[None][:0]}
        if scale is not None:
            nan = torch.full((), math.nan, dtype=torch.float32, device=device)
            entry["step_scale"] = torch.stack(
                [scale[p].to(device, torch.float32) if p in scale else nan for p in params]
            ) if params else nan[None][:0]
        if loss_features is not None:
            entry["loss_features"] = loss_features.detach().to(torch.float32).clone()
        stats.append(entry)
    return stats
