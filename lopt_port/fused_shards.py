"""The fused steps on the local shards of FSDP2 parameters.

A parameter sharded by ``fully_shard`` (a ``DTensor`` with ``Shard(0)`` on a 1-D mesh, uneven
and empty local shards included) or replicated (``Replicate()``) takes the fused path on its
local tensor (:func:`~lopt_port.sharding.local`): the kernels run on this rank's rows, and
whatever reduces over the sharded axis 0 leaves them as float64 partial sums, completed with
**one batched** ``all_reduce`` per process group and round
(:func:`~lopt_port.sharding.all_reduce_batched`), whatever the number of tensors:

1. the factored statistics' per-entry sums of ``g^2 + 1e-30`` (op ``factored_sums``) whose
   mean runs over axis 0 (``d0 == 0``: ``v_row``'s, ``d1 == 0``: ``v_col``'s). The moving
   averages then follow here, with the kernels' arithmetic: ``mean = float(sum / n_axis)``,
   ``v <- fma(c, v, (1 - c) * mean)`` (O(rows + columns) work; :func:`finish_factored`);
2. the row-column mean of ``v_row`` where it runs over axis 0 (``d1 == 0``), then
   ``row_factor = safe_rsqrt(v_row / (mean + 1e-9))`` and ``col_factor = safe_rsqrt(v_col)``
   with ``safe_rsqrt(x) = 1 / sqrt(max(x, 1e-9))`` correctly rounded (the kernels'
   ``rsqrt_ieee``);
3. the accumulate phase's per-tensor sums (small_fc_lopt: the feature sums of squares; VeLO:
   also the moments of the old state behind its per-tensor statistics).

The apply phase is local: each tensor's normalizers ``rsqrt(1e-5 + sumsq / n)`` divide by
the whole tensor's element count ``n`` (the ops' ``counts``). A round with nothing sharded
issues no collective, and nothing is read to the host. A rank whose shard of a tensor is
empty takes part with zero partial sums and updates its copy of the replicated statistics
like every other rank. Whole tensors (``Replicate()``, plain) in the same step take the
same path with no collective.

The sums of a sharded tensor are added in another order than one process adds them (each
rank's share in the kernels' order, then the ranks), so a sharded step matches the
single-process fused step to float32 rounding, not bit for bit (``tests/test_fsdp.py``
states the bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lopt_port.constants import ROW_COL_MEAN_EPS, SAFE_RSQRT_FLOOR
from lopt_port.sharding import ShardSpec, all_reduce_batched, is_dtensor, local, shard_spec

#: The state entries a kernel reads or writes, as this rank's local tensors.
_STATE_KEYS = ("momentum", "rms", "v_row", "v_col", "v_diag")


def any_dtensor(params: Sequence[torch.Tensor]) -> bool:
    """Whether a step's parameters include a ``DTensor`` (the step then runs on the shards)."""
    return any(is_dtensor(p) for p in params)


@dataclass
class LocalStep:
    """One step's tensors as this rank holds them."""

    #: Each parameter's :class:`~lopt_port.sharding.ShardSpec` (``None``: whole on this rank).
    specs: list[ShardSpec | None]
    #: The whole tensors' shapes (a DTensor's global shape).
    shapes: list[tuple[int, ...]]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    #: The state with local tensors (and ``factored_dims``).
    states: list[dict[str, Any]]
    #: The tensors with elements on this rank, which the kernels run on.
    live: list[int]

    @classmethod
    def of(cls, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
           states: Sequence[Mapping[str, Any]]) -> LocalStep:
        """Raises ``ValueError`` for a layout other than a 1-D mesh's ``Shard(0)`` or
        ``Replicate()`` (tensor parallelism)."""
        specs = [shard_spec(p) for p in params]
        local_params = [local(p) for p in params]
        local_states = [{**{k: local(s[k]) for k in _STATE_KEYS if k in s},
                         "factored_dims": s["factored_dims"]} for s in states]
        return cls(specs, [tuple(p.shape) for p in params], local_params,
                   [local(g) for g in grads], local_states,
                   [i for i, p in enumerate(local_params) if p.numel() > 0])

    def counts(self, index: Sequence[int]) -> list[int]:
        """The whole tensors' element counts."""
        return [math.prod(self.shapes[i]) for i in index]


def rows(t: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
    """Rows ``index`` of ``t`` (ascending), by slices: an index tensor would be copied to the
    device, and that copy waits for the device."""
    if list(index) == list(range(t.shape[0])):
        return t
    return torch.cat([t[i:i + 1] for i in index])


def spread(t: torch.Tensor, index: Sequence[int], n: int) -> torch.Tensor:
    """``n`` rows: row ``index[j]`` is ``t[j]``, the others zero (the partial sums of the
    tensors with no local elements)."""
    if list(index) == list(range(n)):
        return t
    at = {i: j for j, i in enumerate(index)}
    zero = t.new_zeros((1, *t.shape[1:]))
    return torch.cat([t[at[i]:at[i] + 1] if i in at else zero for i in range(n)])


def complete(partials: torch.Tensor, specs: Sequence[ShardSpec | None]) -> torch.Tensor:
    """Rows of ``partials`` (one per tensor) summed over the ranks for the sharded tensors:
    one ``all_reduce`` per process group; the other rows as they are."""
    by_group: dict[Any, list[int]] = {}
    for i, spec in enumerate(specs):
        if spec is not None:
            by_group.setdefault(spec.group, []).append(i)
    if not by_group:
        return partials
    done: dict[int, torch.Tensor] = {}
    for group, index in by_group.items():
        (total,) = all_reduce_batched([rows(partials, index)], group)
        if len(index) == len(specs):
            return total
        done.update({i: total[j:j + 1] for j, i in enumerate(index)})
    return torch.cat([done.get(i, partials[i:i + 1]) for i in range(len(specs))])


def complete_each(partials: Sequence[torch.Tensor | None], specs: Sequence[ShardSpec | None]
                  ) -> list[torch.Tensor | None]:
    """Each given tensor summed over its ranks where its spec is sharded (one ``all_reduce``
    per process group for all of them), the others as they are."""
    out = list(partials)
    by_group: dict[Any, list[int]] = {}
    for i, (t, spec) in enumerate(zip(partials, specs, strict=True)):
        if t is not None and spec is not None:
            by_group.setdefault(spec.group, []).append(i)
    for group, index in by_group.items():
        for i, total in zip(index, all_reduce_batched([partials[i] for i in index], group),
                            strict=True):
            out[i] = total
    return out


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(max(x, 1e-9))`` correctly rounded, NaN passing through (the kernels'
    ``safe_rsqrt``). On the CPU that is ``torch.rsqrt`` (torch's CPU ``sqrt`` is not correctly
    rounded: 674 of 100,000 values differ from IEEE's, which its ``rsqrt`` and division match);
    on CUDA, whose ``torch.rsqrt`` is the approximate intrinsic, ``1 / sqrt``."""
    x = torch.clamp_min(x, SAFE_RSQRT_FLOOR)
    return torch.rsqrt(x) if x.device.type == "cpu" else 1.0 / torch.sqrt(x)


def finish_factored(step: LocalStep, ops: Any, lists: tuple[list, ...] | None,
                    decays: torch.Tensor, grad_wd: Sequence[float], grad_clip: float
                    ) -> None:
    """Rounds 1 and 2 (module docstring): this step's ``v_row``/``v_col`` of every factored
    tensor, in place, and the row and column factors of the live ones written into ``lists``'
    scratch (``lists``: the kernels' argument lists of ``step.live``, or ``None`` when no
    tensor has local elements). ``decays``: the kernels' decay vector (momentum k, rms 1,
    adafactor k); ``grad_wd``/``grad_clip``: the gradient transform (per live tensor)."""
    k = (decays.numel() - 1) // 2
    factored = [i for i, s in enumerate(step.states) if s["factored_dims"]]
    if not factored:
        return
    device = step.params[0].device
    position = {i: j for j, i in enumerate(step.live)}
    sums: dict[int, torch.Tensor] = {}
    if lists is not None and any(step.states[i]["factored_dims"] for i in step.live):
        flat = ops.factored_sums(*lists, decays, list(grad_wd), grad_clip)
        start = 0
        for i in step.live:
            s = step.states[i]
            if s["factored_dims"]:
                size = (s["v_row"].numel() + s["v_col"].numel()) // k
                sums[i] = flat[start:start + size]
                start += size
    rows, cols, row_specs, col_specs = [], [], [], []
    for i in factored:
        s, spec = step.states[i], step.specs[i]
        n_row = s["v_row"].numel() // k
        both = sums.get(i)
        if both is None:  # an empty shard: its share of every sum is zero
            both = torch.zeros(n_row + s["v_col"].numel() // k, dtype=torch.float64,
                               device=device)
        d1, d0 = s["factored_dims"]
        rows.append(both[:n_row])
        cols.append(both[n_row:])
        row_specs.append(spec if d0 == 0 else None)
        col_specs.append(spec if d1 == 0 else None)
    completed = complete_each(rows + cols, row_specs + col_specs)
    c = _on_device(decays[k + 1:].clamp(0.0, 1.0), device)
    mix = 1.0 - c
    rcm, rcm_specs = [], []
    for j, i in enumerate(factored):
        s, shape = step.states[i], step.shapes[i]
        d1, d0 = s["factored_dims"]
        v_row, v_col = s["v_row"], s["v_col"]
        for v, total, n_axis in ((v_row, completed[j], shape[d0]),
                                 (v_col, completed[len(factored) + j], shape[d1])):
            mean = (total / n_axis).to(torch.float32).reshape(v.shape[:-1])
            torch.addcmul(mix * mean.unsqueeze(-1), v, c, out=v)
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        rcm.append(v_row.double().sum(dim=reduced_d1, keepdim=True))
        rcm_specs.append(step.specs[i] if d1 == 0 else None)
    rcm = complete_each(rcm, rcm_specs)
    for j, i in enumerate(factored):
        if i not in position:
            continue
        s, shape = step.states[i], step.shapes[i]
        d1, _ = s["factored_dims"]
        mean = (rcm[j] / shape[d1]).to(torch.float32)
        lists[7][position[i]].copy_(_safe_rsqrt(s["v_row"] / (mean + ROW_COL_MEAN_EPS)))
        lists[8][position[i]].copy_(_safe_rsqrt(s["v_col"]))


_ON_DEVICE: dict[tuple[Any, ...], torch.Tensor] = {}


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy on ``device`` of the small CPU tensor ``t``, made once per value (a copy to the
    device in every step would wait for the device)."""
    key = (t.dtype, tuple(t.shape), tuple(t.reshape(-1).tolist()), device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = t.to(device)
    return _ON_DEVICE[key]


def velo_stats(moments: torch.Tensor, counts: Sequence[int], k: int) -> torch.Tensor:
    """VeLO's per-tensor statistics ``[n, 2 + 3k]`` (float32) from the moment sums
    ``[n, 3 + 2k]`` (float64: sum p^2, sum m (k), sum m^2 (k), sum rms, sum rms^2) over
    ``counts`` elements: mean p^2, mean m, ``E[m^2] - mean m^2``, mean rms, and upstream's
    ``var_rms = E[rms^2] - 2 mean_m mean_rms + mean_m^2``, variances clamped at 0 (NaN to 0),
    each cast once: the kernels' ``velo_stats``, operation for operation, in float64."""
    count = torch.tensor(counts, dtype=torch.float64)[:, None]
    mo = moments / _on_device(count, moments.device)
    mean, mean2 = mo[:, 1:1 + k], mo[:, 1 + k:1 + 2 * k]
    mean_rms, mean_rms2 = mo[:, 1 + 2 * k:2 + 2 * k], mo[:, 2 + 2 * k:3 + 2 * k]
    var_m = mean2 - mean * mean
    var_rms = mean_rms2 - 2.0 * mean * mean_rms + mean * mean
    zero = torch.zeros((), dtype=torch.float64, device=moments.device)
    return torch.cat([mo[:, :1], mean, torch.where(var_m > 0, var_m, zero), mean_rms,
                      torch.where(var_rms > 0, var_rms, zero)], dim=1).to(torch.float32)
