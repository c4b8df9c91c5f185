"""Gradient accumulators shared by the learned optimizers (upstream ``common.py``).

All state is float32 and carries a trailing axis of size K (one slice per decay), exactly as
upstream's ``vmap(..., out_axes=-1)`` lays it out. Every function updates state in place and
follows upstream's order of operations.

Every moving average ``c*v + (1-c)*x`` is evaluated as ``fma(c, v, round((1-c)*x))``: that is
how XLA compiles upstream's expression under ``jit`` (measured: bit-identical on 200k random
values, where separate roundings differ in 23% of elements), and ``torch.addcmul`` is a fused
multiply-add on CPU and CUDA. It matters where the two terms cancel (a momentum whose
gradient changed sign), where one rounding more is a large relative error.

* momentum: ``m' = d*m + (1-d)*g`` (``d`` not clipped)
* rms: ``v' = c*v + (1-c)*g^2`` with ``c = clip(d, 0, 1)``
* factored (Adafactor-style), ``gs = g^2 + 1e-30``, ``c = clip(d, 0, 1)``:

  - factored tensors (rank >= 2, dims ``(d1, d0)`` from
    :func:`lopt_port.state_layout.factored_dims`):
    ``v_row' = c*v_row + (1-c)*mean(gs, d0)``, ``v_col' = c*v_col + (1-c)*mean(gs, d1)``,
    ``row_factor = safe_rsqrt(v_row' / (mean(v_row', rd1) + 1e-9))`` with
    ``rd1 = d1 - 1 if d1 > d0 else d1``, ``col_factor = safe_rsqrt(v_col')``,
    ``fac_g = g * expand(row_factor, d0) * expand(col_factor, d1)``
  - other tensors: ``v' = c*v + (1-c)*gs``, ``fac_g = g * safe_rsqrt(v' + 1e-9)``
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lopt_port.constants import (
    DECAY_KEYS,
    DIAG_PRECOND_EPS,
    FACTORED_GRAD_SQ_EPS,
    ROW_COL_MEAN_EPS,
    SAFE_RSQRT_FLOOR,
)
from lopt_port.sharding import Mean, local, run_local


def learned_decays(initial: Sequence[float], offsets: torch.Tensor) -> torch.Tensor:
    """Effective decays ``1 - exp(10 * (log(1 - d0) / 10 + theta))`` in float32, upstream order."""
    d0 = torch.tensor(tuple(initial), dtype=torch.float32)
    param = torch.log(1 - d0) / 10.0 + offsets.to(torch.float32)
    return 1 - torch.exp(param * 10.0)


def safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """``rsqrt(max(x, 1e-9))``."""
    return torch.rsqrt(torch.clamp_min(x, SAFE_RSQRT_FLOOR))


def ema_(v: torch.Tensor, decay: torch.Tensor, increment: torch.Tensor) -> None:
    """``v <- fma(decay, v, increment)`` in place, where ``increment = (1-decay)*x``."""
    torch.addcmul(increment, v, decay, out=v)


def update_momentum(m: torch.Tensor, g: torch.Tensor, decays: torch.Tensor) -> None:
    """``m <- d*m + (1-d)*g`` for every decay (trailing axis of ``m``)."""
    ema_(m, decays, g.unsqueeze(-1) * (1 - decays))


def update_rms(v: torch.Tensor, g: torch.Tensor, decays: torch.Tensor) -> None:
    """``v <- c*v + (1-c)*g^2`` with ``c = clip(d, 0, 1)``."""
    c = decays.clamp(0.0, 1.0)
    ema_(v, c, (g * g).unsqueeze(-1) * (1 - c))


@dataclass
class FactoredResult:
    """Outputs of one factored-accumulator update, reused by the feature builders."""

    fac_g: torch.Tensor
    row_factor: torch.Tensor | None
    col_factor: torch.Tensor | None


def update_factored(state: dict[str, torch.Tensor], g: torch.Tensor, decays: torch.Tensor,
                    dims: tuple[int, int] | None) -> FactoredResult:
    """Update ``v_row``/``v_col`` (factored) or ``v_diag`` in ``state``; return ``fac_g``.

    ``g`` has the tensor's shape (rank >= 1); the state tensors carry the trailing decay axis.
    """
    return run_local(update_factored_rounds(state, g, decays, dims))


def update_factored_rounds(state: dict[str, torch.Tensor], g: torch.Tensor,
                           decays: torch.Tensor, dims: tuple[int, int] | None,
                           rows: int | None = None
                           ) -> Generator[list[Mean], list[torch.Tensor], FactoredResult]:
    """:func:`update_factored` as rounds of reductions (:mod:`lopt_port.sharding`): ``g`` and
    the state may be this rank's rows of tensors whose axis 0 has ``rows`` elements in all."""
    c = decays.clamp(0.0, 1.0)
    mix = 1.0 - c
    gs = g * g + FACTORED_GRAD_SQ_EPS
    if dims is None:
        v = state["v_diag"]
        ema_(v, c, mix * gs.unsqueeze(-1))
        fac_g = g.unsqueeze(-1) * safe_rsqrt(v + DIAG_PRECOND_EPS)
        return FactoredResult(fac_g, None, None)
    d1, d0 = dims
    v_row, v_col = state["v_row"], state["v_col"]
    row_mean, col_mean = yield [Mean(gs, (d0,), rows=rows), Mean(gs, (d1,), rows=rows)]
    ema_(v_row, c, mix * row_mean.unsqueeze(-1))
    ema_(v_col, c, mix * col_mean.unsqueeze(-1))
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    # v_row lost axis d0: its axis 0 is the tensor's axis 0 (split over ranks) unless d0 == 0.
    (row_col_mean,) = yield [Mean(v_row, (reduced_d1,), keepdim=True,
                                  rows=rows if d0 != 0 else None)]
    row_factor = safe_rsqrt(v_row / (row_col_mean + ROW_COL_MEAN_EPS))
    col_factor = safe_rsqrt(v_col)
    fac_g = g.unsqueeze(-1) * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
    return FactoredResult(fac_g, row_factor, col_factor)


#: The state entries updated per element; their views take the tensor's (scalar: ``(1,)``)
#: shape with the trailing decay axis.
_PER_ELEMENT = ("momentum", "rms", "v_diag")


def update_accumulators_rounds(state: dict[str, torch.Tensor], g: torch.Tensor,
                               decays: dict[str, torch.Tensor], rows: int | None
                               ) -> Generator[list[Mean], list[torch.Tensor],
                                              tuple[dict[str, torch.Tensor], FactoredResult]]:
    """Momentum, rms and the factored statistics of one parameter's ``state`` from ``g``
    (its local rows, shaped as the parameter, scalars as ``(1,)``), in place; returns the
    accumulators as views in ``g``'s shape and :class:`FactoredResult`. ``decays``: the
    ``momentum``, ``rms`` and ``adafactor`` decays. ``rows``: the whole tensor's axis-0 size
    when ``g`` holds only this rank's rows (its factored reductions are then completed over
    the ranks), ``None`` for a whole tensor."""
    shape = tuple(g.shape)
    acc = {k: local(state[k]).view(*shape, state[k].shape[-1]) if k in _PER_ELEMENT
           else local(state[k]) for k in ("momentum", "rms", "v_row", "v_col", "v_diag")
           if k in state}
    dims = tuple(state["factored_dims"]) or None
    update_momentum(acc["momentum"], g, decays["momentum"])
    update_rms(acc["rms"], g, decays["rms"])
    if rows is None:
        fac = update_factored(acc, g, decays["adafactor"], dims)
    else:
        fac = yield from update_factored_rounds(acc, g, decays["adafactor"], dims, rows=rows)
    return acc, fac


def fixed_decays(hparams: Mapping[str, Any], device: torch.device,
                 names: Sequence[str] = ("momentum", "rms", "adafactor")
                 ) -> dict[str, torch.Tensor]:
    """The fixed (not learned) decays of VeLO's family, ``initial_*_decays`` as float32
    tensors on ``device``, by accumulator name (the first ``len(names)`` of them)."""
    return {name: torch.tensor(hparams[key], dtype=torch.float32, device=device)
            for name, key in zip(names, DECAY_KEYS, strict=False)}
