"""Whole-tensor reductions for parameters sharded by FSDP2, in a few batched collectives.

The eager optimizers write each tensor's update as a generator that yields, once per round,
the list of reductions it needs (:class:`Mean`, :class:`Total`) and receives their results.
:func:`run_rounds` drives every tensor's generator in lockstep: per round it resolves all
requests, completing those over a sharded axis with **one** ``all_reduce`` per process group
for all tensors together, so a step issues one collective per round (a handful), not one per
tensor. For a tensor that is not sharded every request is resolved locally with the very
torch op the single-process optimizer has always used (``x.mean(dims, keepdim)``; a
:class:`Total` is returned as is), so its results are bit for bit unchanged.

Sharding supported: a ``DTensor`` on a 1-D device mesh with placement ``Shard(0)`` (what
``torch.distributed.fsdp.fully_shard`` produces; uneven and empty local shards included) or
``Replicate()`` (each rank holds the whole tensor: DDP-like, no collectives). Sharded partial
sums travel in float64; the result is cast back to the request's dtype.

Under ``torch.compile`` (whole tensors only): dynamo (torch 2.13, Python 3.11) traces a
generator driven by ``next``/``send``, but not ``yield from`` a generator that returns a value
or is sent one. So a generator delegates to another one with ``yield from`` only for a sharded
tensor, and runs it with :func:`run_local` for a whole tensor, whose requests are resolved
locally either way, by the same ops.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch build without distributed support
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split: along axis 0 of ``global_shape`` over ``group``'s ranks."""

    group: Any
    global_shape: tuple[int, ...]


@dataclass
class Mean:
    """``x.mean(dims, keepdim)`` over the whole tensor (``dims=None``: every axis). ``rows``:
    the whole tensor's size along axis 0 when ``x`` holds only this rank's rows of it (axis 0
    follows the parameter's sharded axis 0, possibly merged with later axes); ``None`` when
    every rank holds ``x`` whole."""

    x: torch.Tensor
    dims: tuple[int, ...] | None = None
    keepdim: bool = False
    rows: int | None = None


@dataclass
class Total:
    """A partial sum over this rank's rows (any shape), completed over the shards."""

    partial: torch.Tensor


Request = Mean | Total
Rounds = Generator[list[Request], list[torch.Tensor], None]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def shard_spec(p: torch.Tensor) -> ShardSpec | None:
    """The parameter's :class:`ShardSpec`, ``None`` for a whole (or replicated) tensor.

    Raises ``ValueError`` for a layout the optimizers do not support."""
    if not is_dtensor(p):
        return None
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        raise ValueError(f"sharded parameters need a 1-D device mesh, found {mesh.ndim}-D "
                         f"(placements {placements})")
    if placements == (Replicate(),):
        return None
    if placements != (Shard(0),):
        raise ValueError(f"sharded parameters must be Shard(0) or Replicate() (what "
                         f"fully_shard makes), found {placements}")
    return ShardSpec(mesh.get_group(), tuple(p.shape))


def state_zeros(p: torch.Tensor, shape: Sequence[int], split: bool = True) -> torch.Tensor:
    """float32 zeros of ``shape`` for ``p``'s optimizer state: a plain tensor on ``p``'s device,
    or for a DTensor ``p`` a DTensor on its mesh, split along axis 0 like ``p`` when ``split``
    (axis 0 of the state is ``p``'s axis 0) and replicated otherwise."""
    if not is_dtensor(p):
        return torch.zeros(tuple(shape), dtype=torch.float32, device=p.device)
    import torch.distributed.tensor as dtensor
    sharded = tuple(p.placements) == (Shard(0),)
    placements = [Shard(0)] if split and sharded else [Replicate()]
    return dtensor.zeros(tuple(shape), dtype=torch.float32, device_mesh=p.device_mesh,
                         placements=placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not a DTensor); in-place updates of
    the result update ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _dims(x: torch.Tensor, dims: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(range(x.dim())) if dims is None else tuple(d % x.dim() for d in dims)


def _partial(req: Request, spec: ShardSpec | None) -> tuple[torch.Tensor, float] | None:
    """``(float64 partial sum, element count of the whole)`` when the request needs the other
    shards, else ``None``."""
    if spec is None:
        return None
    if isinstance(req, Total):
        return req.partial.to(torch.float64), 1.0
    dims = _dims(req.x, req.dims)
    if req.rows is None or 0 not in dims:
        return None
    count = float(req.rows)
    for d in dims:
        if d != 0:
            count *= req.x.shape[d]
    return req.x.to(torch.float64).sum(dim=dims, keepdim=req.keepdim), count


def _resolve_locally(req: Request) -> torch.Tensor:
    if isinstance(req, Total):
        return req.partial
    if req.dims is None and not req.keepdim:
        return torch.mean(req.x)
    return torch.mean(req.x, dim=_dims(req.x, req.dims), keepdim=req.keepdim)


def all_reduce_batched(partials: Sequence[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """Sum each tensor over ``group``'s ranks with one ``all_reduce`` of their concatenation."""
    flat = torch.cat([t.reshape(-1) for t in partials])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for t in partials:
        out.append(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def _returned(done: StopIteration) -> Any:
    """The value a generator returned (``done.value``), read as ``done.args``: the two are the
    same (``StopIteration(value)``; a bare ``return`` leaves ``args`` empty), and dynamo
    (torch 2.13) traces ``args`` but not ``value``."""
    return done.args[0] if done.args else None


def run_local(gen: Generator[list[Request], list[torch.Tensor], Any]) -> Any:
    """Run one generator with every request resolved locally; returns its return value."""
    try:
        requests = next(gen)
        while True:
            requests = gen.send([_resolve_locally(r) for r in requests])
    except StopIteration as done:
        return _returned(done)


def run_rounds(tasks: Sequence[tuple[Rounds, ShardSpec | None]]) -> list[Any]:
    """Drive every generator to its end, resolving each round's requests together; returns
    the generators' return values in order."""
    values: list[Any] = [None] * len(tasks)
    live: list[tuple[int, Rounds, ShardSpec | None, list[Request]]] = []
    for index, (gen, spec) in enumerate(tasks):
        try:
            live.append((index, gen, spec, next(gen)))
        except StopIteration as done:
            values[index] = _returned(done)
    while live:
        results: list[list[torch.Tensor | None]] = []
        pending: dict[Any, list[tuple[int, int, torch.Tensor, float, torch.dtype]]] = {}
        for t, (_, _, spec, requests) in enumerate(live):
            row: list[torch.Tensor | None] = []
            for r, req in enumerate(requests):
                part = _partial(req, spec)
                if part is None:
                    row.append(_resolve_locally(req))
                else:
                    dtype = req.partial.dtype if isinstance(req, Total) else req.x.dtype
                    pending.setdefault(spec.group, []).append((t, r, part[0], part[1], dtype))
                    row.append(None)
            results.append(row)
        for group, items in pending.items():
            sums = all_reduce_batched([item[2] for item in items], group)
            for (t, r, _, count, dtype), total in zip(items, sums, strict=True):
                results[t][r] = (total / count).to(dtype)
        nxt = []
        for (index, gen, spec, _), row in zip(live, results, strict=True):
            try:
                nxt.append((index, gen, spec, gen.send(row)))
            except StopIteration as done:
                values[index] = _returned(done)
        live = nxt
    return values
