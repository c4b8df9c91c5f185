"""The fused small_fc_lopt step: the kernels of ``csrc/`` driven for a whole param group.

Per group and step, one call per phase covers every tensor: ``small_fc_reduce`` (factored
row/column statistics), ``small_fc_accumulate`` (moving averages, per-feature sums of squares)
and ``small_fc_apply`` (features, normalization, MLP, parameter write). The state is the eager
path's, tensor for tensor, so a run can switch between ``fused=True`` and ``fused=False`` at
any step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lopt_port import extension
from lopt_port.features import time_features
from lopt_port.fused_shards import (
    LocalStep,
    any_dtensor,
    complete,
    finish_factored,
    rows,
    spread,
)
from lopt_port.sharding import is_dtensor, local, shard_spec

MAX_DECAYS = 4
MAX_HIDDEN = 64
MAX_LAYERS = 8
MAX_RANK = 8


def decays_unsupported_reason(hparams: Mapping[str, Any]) -> str | None:
    """Why the kernels cannot take these decays (``None`` when they can): they need one rms
    decay and K <= MAX_DECAYS momentum and adafactor decays each (both optimizers' layout)."""
    m = len(hparams["initial_momentum_decays"])
    r = len(hparams["initial_rms_decays"])
    a = len(hparams["initial_adafactor_decays"])
    if r != 1 or m != a or m > MAX_DECAYS:
        return (f"the fused kernels need 1 rms decay and equal momentum/adafactor decay "
                f"counts <= {MAX_DECAYS} (got M={m}, R={r}, A={a})")
    return None


def config_unsupported_reason(hparams: Mapping[str, Any]) -> str | None:
    """Why these hyperparameters cannot run fused (``None`` when they can)."""
    if (reason := decays_unsupported_reason(hparams)) is not None:
        return reason
    if hparams["hidden_layers"] + 1 > MAX_LAYERS or hparams["hidden_size"] > MAX_HIDDEN:
        return (f"the fused kernels support up to {MAX_LAYERS - 1} hidden layers of at most "
                f"{MAX_HIDDEN} units")
    return None


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def param_unsupported_reason(p: torch.Tensor) -> str | None:
    """Why this parameter cannot take the fused path (``None`` when it can)."""
    return extension.backend_unsupported_reason(p.device) or layout_unsupported_reason(p)


def layout_unsupported_reason(p: torch.Tensor) -> str | None:
    """The device-independent checks every fused kernel makes: dtype, layout, rank."""
    if is_dtensor(p):
        try:
            shard_spec(p)
        except ValueError as e:
            return f"{e}: only FSDP2's layouts run (no tensor parallelism)"
    if p.dtype not in FUSED_DTYPES:
        return f"the fused kernels take float32, bfloat16 or float16 parameters (got {p.dtype})"
    if not local(p).is_contiguous():
        return "the parameter is not contiguous"
    if p.grad is not None and p.grad.dtype != p.dtype:
        return f"the gradient is {p.grad.dtype}, the parameter {p.dtype}"
    if p.dim() > MAX_RANK:
        return f"rank above {MAX_RANK}"
    return None


def state_lists(params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                grads: Sequence[torch.Tensor] | None = None) -> tuple[list, ...]:
    """The kernels' per-tensor argument lists: params, grads (``p.grad`` unless given),
    momentum, rms, v_row, v_col, v_diag, row-factor and column-factor scratch, and the flat
    factored dims (``-1, -1`` for non-factored tensors, whose factored slots are empty
    tensors, as is v_diag otherwise)."""
    empty = torch.empty(0, device=params[0].device)
    dims: list[int] = []
    v_row, v_col, v_diag, row_factor, col_factor = [], [], [], [], []
    for s in states:
        d = s["factored_dims"]
        dims += list(d) if d else [-1, -1]
        if d:
            v_row.append(s["v_row"])
            v_col.append(s["v_col"])
            row_factor.append(torch.empty_like(s["v_row"]))
            col_factor.append(torch.empty_like(s["v_col"]))
            v_diag.append(empty)
        else:
            v_row.append(empty)
            v_col.append(empty)
            row_factor.append(empty)
            col_factor.append(empty)
            v_diag.append(s["v_diag"])
    grads = [p.grad for p in params] if grads is None else grads
    return (list(params), [g.contiguous() for g in grads],
            [s["momentum"] for s in states], [s["rms"] for s in states], v_row, v_col,
            v_diag, row_factor, col_factor, dims)


def group_step(params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
               decays: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
               scales: torch.Tensor, hparams: Mapping[str, Any], lr: float, *,
               grads: Sequence[torch.Tensor] | None = None,
               step_scales: Sequence[float] = ()) -> None:
    """Update ``params`` (one device, contiguous, non-empty, with grads) in place.

    ``decays``, ``scales`` (the time-feature timescales) and the step counts stay on the CPU;
    ``layers`` are on the parameters' device. ``grads`` replace ``p.grad`` (MuLO's scrubbed
    gradients); ``step_scales`` are per-tensor step multipliers ``s`` (MuLO:
    ``p <- p - lr * (step * s)``; none given: ``s = 1``, which is exact). FSDP2 parameters
    (``DTensor``) run on their local shards (:mod:`lopt_port.fused_shards`).
    """
    if any_dtensor(params):
        _sharded_group_step(params, states, decays, layers, scales, hparams, lr,
                            grads=list(grads) if grads is not None else [p.grad for p in params],
                            step_scales=step_scales)
        return
    ops = extension.ops()
    head = hparams["variant"] == "head"
    tensors = (*state_lists(params, states, grads), decays)
    ops.small_fc_reduce(*tensors)
    sumsq, _ = ops.small_fc_accumulate(*tensors, head, False)
    mlp = [t for pair in layers for t in pair]
    ops.small_fc_apply(*tensors, head, sumsq, _time_features(states, scales), mlp,
                       hparams["exp_mult"], hparams["step_mult"], lr,
                       [float(x) for x in step_scales], [])
    torch._foreach_add_([s["step"] for s in states], 1.0)


def _time_features(states: Sequence[dict[str, Any]], scales: torch.Tensor) -> torch.Tensor:
    """``[n, 11]``: each tensor's time features, computed once per distinct step count
    (usually one for the whole group) as the eager path computes them, so both paths see the
    same bits."""
    steps = [float(s["step"]) for s in states]
    by_step = {t: time_features(t, scales) for t in set(steps)}
    return torch.stack([by_step[t] for t in steps])


def _sharded_group_step(params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                        decays: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        scales: torch.Tensor, hparams: Mapping[str, Any], lr: float, *,
                        grads: Sequence[torch.Tensor], step_scales: Sequence[float]) -> None:
    """:func:`group_step` on this rank's shards, in three rounds of batched collectives
    (:mod:`lopt_port.fused_shards`): the factored means, the row-column means, the feature
    sums of squares."""
    ops = extension.ops()
    head = hparams["variant"] == "head"
    step = LocalStep.of(params, grads, states)
    live = step.live
    lists = (state_lists([step.params[i] for i in live], [step.states[i] for i in live],
                         [step.grads[i] for i in live]) if live else None)
    finish_factored(step, ops, lists, decays, [0.0] * len(live), math.inf)
    if live:
        _, sums = ops.small_fc_accumulate(*lists, decays, head, True)
        partial = spread(sums, live, len(params))
    else:
        features = 4 + 8 * ((decays.numel() - 1) // 2)
        partial = torch.zeros(len(params), features, dtype=torch.float64,
                              device=params[0].device)
    sumsq = complete(partial, step.specs).to(torch.float32)
    if live:
        mlp = [t for pair in layers for t in pair]
        ops.small_fc_apply(*lists, decays, head, rows(sumsq, live).contiguous(),
                           _time_features([states[i] for i in live], scales), mlp,
                           hparams["exp_mult"], hparams["step_mult"], lr,
                           [float(step_scales[i]) for i in live] if step_scales else [],
                           step.counts(live))
    torch._foreach_add_([s["step"] for s in states], 1.0)
