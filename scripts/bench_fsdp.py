"""Optimizer-step time, collectives and memory under FSDP2 (``fully_shard``) at 1, 2 and 4 ranks.

For each rank count the script spawns that many CPU processes (gloo on loopback, no torchrun)
holding the parameters of GPT-2 small (124,439,808 in 148 tensors: ``wte`` 50257 x 768,
``wpe`` 1024 x 768, 12 blocks of two LayerNorms, ``c_attn`` 768 x 2304, ``c_proj``
768 x 768, ``c_fc`` 768 x 3072 and ``c_proj`` 3072 x 768 with biases, in GPT-2's (in, out)
layout, and the final LayerNorm), sharded with ``fully_shard`` per block and on the root over
a 1-D mesh. Only ``opt.step()`` is timed: gradients are random ``DTensor``s sharded like
their parameters, refilled before each step (FSDP's own reduce-scatter of the backward pass
is not part of the step, nor of the counts below). Implementations, each on its own copy of
the parameters, every one built and stepped in the same processes:

- ``fused``: the learned optimizer with ``fused=True``; where that refuses sharded parameters
  (or the kernels are not built) the row says ``not available: <reason>``;
- ``eager``: the learned optimizer with ``fused=False``;
- ``adamw``: ``torch.optim.AdamW(fused=True)`` when it steps the sharded parameters, else
  ``foreach=True`` (the row's label says which, and why).

Per implementation and rank count: the median over ``--repeats`` steps (after ``--warmup``
steps) of the step's wall time, the slowest rank's, each step started together on every
rank (a barrier); its ratio to AdamW's median in the same processes (the implementations'
steps are interleaved, so load on the machine falls on all of them alike); the collectives
of one step (the last warm-up step, recorded below the ``DTensor`` layer, so ``DTensor``'s
own redistributions would count too): ``all_reduce`` calls and the bytes they reduce per
rank, and any other collective by name; and memory per rank: ``mem`` is the peak resident
memory the implementation added to its rank process while it was built and took its warm-up
steps (its parameters, gradients, optimizer state and the temporaries of a step; the kernel's
high-water mark, ``VmHWM``, reset before and compared with the resident size before), of
which ``state`` is the optimizer state's local tensors. ``rank peak`` is each rank process's
peak resident memory over the whole run (the runtime, every implementation together, and
those that failed while they were tried).

The default run (``--ranks 1 2 4 --optimizers velo --impls fused adamw``) takes a few
minutes; ``eager`` is not in it: VeLO's eager path takes one to two minutes per step of GPT-2
small here, so with ``--impls fused eager adamw`` each rank count takes 5 to 10 minutes.

The ranks share this machine's cores (each gets ``cores / ranks`` threads unless
``--threads`` says otherwise), so times across rank counts are not speedups: compare the
ratios to AdamW within a rank count. Run with ``OMP_WAIT_POLICY=PASSIVE`` on a shared
machine::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_fsdp.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_fsdp.py --ranks 2 \\
        --impls fused eager adamw --json out/bench_fsdp.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_fsdp.py --ranks 1 2 \\
        --optimizers velo small_fc_lopt --impls fused eager adamw --layers 2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OPTIMIZERS = ("small_fc_lopt", "velo", "mulo", "celo", "celo_adam")
IMPLS = ("fused", "eager", "adamw")
#: Optimizers whose eager path materializes a per-element feature matrix (30-40 floats per
#: element of a tensor: scripts/bench_step.py's --max-materializing-params).
MATERIALIZING = ("small_fc_lopt", "mulo")
MIB = 2**20


class Conv1D(nn.Module):
    """GPT-2's linear layer as parameters only: ``weight`` (in, out) and ``bias`` (out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))


class Block(nn.Module):
    """One GPT-2 block's parameters (12 tensors), under GPT-2's names."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.ModuleDict({"c_attn": Conv1D(width, 3 * width),
                                   "c_proj": Conv1D(width, width)})
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict({"c_fc": Conv1D(width, 4 * width),
                                  "c_proj": Conv1D(4 * width, width)})


class GPT2Params(nn.Module):
    """GPT-2's parameters without its forward (the benchmark sets the gradients itself): the
    defaults are GPT-2 small, 124,439,808 parameters in 148 tensors."""

    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768,
                 layers: int = 12) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)


@dataclass
class Config:
    """What every rank process needs to know."""

    optimizers: list[str]
    impls: list[str]
    weights: dict[str, str]
    vocab: int
    context: int
    width: int
    layers: int
    warmup: int
    repeats: int
    num_steps: int
    threads: int | None
    max_materializing_params: int
    folder: str


@dataclass
class Row:
    """One implementation at one rank count, as rank 0 reports it."""

    ranks: int
    optimizer: str
    impl: str
    label: str
    available: bool = True
    reason: str | None = None
    step_ms: list[float] = field(default_factory=list)
    all_reduce_calls: int | None = None
    all_reduce_bytes: int | None = None
    other_collectives: dict[str, int] = field(default_factory=dict)
    mem_mib: float | None = None
    state_mib: float | None = None

    @property
    def median_ms(self) -> float | None:
        """The median of the timed steps, ``None`` when there were none."""
        return statistics.median(self.step_ms) if self.step_ms else None


class CollectiveRecorder(TorchDispatchMode):
    """Records the collectives dispatched while it is active: the ``c10d`` ops of
    ``torch.distributed``'s functions and the functional collectives of ``DTensor``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = func.name()  # "c10d::allreduce_", "_c10d_functional::all_gather_into_tensor"
        if func.namespace == "c10d" or (func.namespace == "_c10d_functional" and name not in (
                "_c10d_functional::wait_tensor", "_c10d_functional::_wrap_tensor_autograd")):
            first = args[0] if args else None
            tensors = first if isinstance(first, list | tuple) else [first]
            size = sum(t.numel() * t.element_size() for t in tensors
                       if isinstance(t, torch.Tensor))
            self.calls.append((name, size))
        return func(*args, **(kwargs or {}))

    def all_reduces(self) -> tuple[int, int]:
        """``(calls, bytes)`` of the recorded all-reduces."""
        sizes = [size for name, size in self.calls if "allreduce" in name
                 or "all_reduce" in name]
        return len(sizes), sum(sizes)

    def others(self) -> dict[str, int]:
        """The other recorded collectives, by op name."""
        counts: dict[str, int] = {}
        for name, _ in self.calls:
            if "allreduce" not in name and "all_reduce" not in name:
                counts[name] = counts.get(name, 0) + 1
        return counts


def resident_kb(key: str = "VmRSS") -> int:
    """A line of ``/proc/self/status`` in KiB (``VmRSS``: resident now, ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key + ":")).split()[1])


class Peaks:
    """The kernel's high-water mark of this process's resident memory (``VmHWM``), reset at
    the start of each implementation's measurement, and the largest one over the whole run
    (``ru_maxrss`` cannot tell it: the reset lowers it too)."""

    def __init__(self) -> None:
        self.run_kb = 0

    def reset(self) -> int:
        """Free what can be freed, reset the high-water mark (``/proc/self/clear_refs`` = 5)
        and return the resident size in KiB."""
        self.run_kb = self.run()
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the kernel (glibc)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return resident_kb()

    def run(self) -> int:
        """The peak resident memory of the whole run so far, in KiB."""
        return max(self.run_kb, resident_kb("VmHWM"))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (``t`` itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def sharded_model(cfg: Config, mesh: Any) -> nn.Module:
    """The parameters, built on the meta device, sharded, then materialized shard by shard
    (GPT-2's initialization: N(0, 0.02) matrices, unit LayerNorm weights, zero biases), with
    zero gradients sharded like them."""
    from torch.distributed.fsdp import fully_shard
    with torch.device("meta"):
        model = GPT2Params(cfg.vocab, cfg.context, cfg.width, cfg.layers)
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            shard = local(p)
            if p.dim() == 2:
                shard.normal_(0.0, 0.02, generator=gen)
            else:
                shard.fill_(1.0 if name.endswith("weight") else 0.0)
            p.grad = torch.zeros_like(p)
    return model


def build(impl: str, optimizer: str, model: nn.Module, cfg: Config,
          adamw_fused: bool) -> torch.optim.Optimizer:
    """The optimizer of ``impl`` over ``model``'s parameters."""
    if impl == "adamw":
        kind = {"fused": True} if adamw_fused else {"foreach": True}
        return torch.optim.AdamW(model.parameters(), lr=1e-3, **kind)
    import lopt_port
    kwargs: dict[str, Any] = {"fused": impl == "fused"}
    if optimizer in ("velo", "celo", "celo_adam"):
        kwargs["num_steps"] = cfg.num_steps
    elif optimizer == "mulo":
        kwargs["default_scale"] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bundled fixtures say they are not meta-trained
        return lopt_port.from_pretrained(cfg.weights[optimizer], model.parameters(), **kwargs)


@dataclass
class Entry:
    """One implementation on this rank: its parameters, optimizer and measurements."""

    row: Row
    model: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    mem_kb: int = 0
    state_bytes: int = 0

    def step(self, gen: torch.Generator, recorder: CollectiveRecorder | None = None) -> float:
        """Refill the gradients, then time one step started together on every rank (s),
        recording its collectives in ``recorder`` if given."""
        for p in self.model.parameters():
            local(p.grad).normal_(0.0, 0.01, generator=gen)
        loss = torch.tensor(1.0)
        step: Callable[[], Any] = (lambda: self.opt.step(loss=loss)) if getattr(
            self.opt, "requires_loss", False) else self.opt.step
        dist.barrier()
        with recorder or contextlib.nullcontext():
            start = time.perf_counter()
            step()
            return time.perf_counter() - start


def agreed_failure(message: str | None) -> str | None:
    """The first rank's failure, if any rank failed (every rank then drops the entry)."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def prepare(entry: Entry, cfg: Config, mesh: Any, gen: torch.Generator, peaks: Peaks,
            adamw_fused: bool = False) -> str | None:
    """Build the entry and take its warm-up steps, the last one recording its collectives, and
    measure the memory it adds. Returns why it failed (on any rank), ``None`` if it did not."""
    row = entry.row
    before = peaks.reset()
    failure = None
    try:
        entry.model = sharded_model(cfg, mesh)
        entry.opt = build(row.impl, row.optimizer, entry.model, cfg, adamw_fused)
        for _ in range(cfg.warmup - 1):
            entry.step(gen)
        recorder = CollectiveRecorder()
        entry.step(gen, recorder)
        row.all_reduce_calls, row.all_reduce_bytes = recorder.all_reduces()
        row.other_collectives = recorder.others()
    except Exception as e:  # reported as "not available", whatever the reason
        failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if os.environ.get("LOPT_BENCH_TRACEBACK"):
            traceback.print_exc()
    entry.mem_kb = resident_kb("VmHWM") - before
    if entry.opt is not None:
        entry.state_bytes = sum(local(v).numel() * local(v).element_size()
                                for s in entry.opt.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor))
    failure = agreed_failure(failure)
    if failure is not None:
        entry.model = entry.opt = None
    return failure


def model_params(cfg: Config) -> int:
    """The number of parameters of :class:`GPT2Params` for ``cfg``."""
    w = cfg.width
    return (cfg.vocab + cfg.context) * w + cfg.layers * (12 * w * w + 13 * w) + 2 * w


def planned(cfg: Config, world: int) -> list[Entry]:
    """The learned optimizers' entries at ``world`` ranks, in report order; an eager path that
    would materialize too much is marked skipped."""
    entries = []
    per_rank = model_params(cfg) / world
    for optimizer in cfg.optimizers:
        for impl in cfg.impls:
            if impl == "adamw":
                continue
            row = Row(world, optimizer, impl, f"{optimizer} {impl}")
            if (impl == "eager" and optimizer in MATERIALIZING
                    and per_rank > cfg.max_materializing_params):
                row.available = False
                row.reason = (f"skipped: {per_rank:,.0f} parameters per rank > "
                              f"--max-materializing-params")
            entries.append(Entry(row))
    return entries


def prepare_adamw(world: int, cfg: Config, mesh: Any, gen: torch.Generator,
                  peaks: Peaks) -> Entry:
    """AdamW with ``fused=True``, or with ``foreach=True`` where that fails (the row says so)."""
    entry = Entry(Row(world, "adamw", "adamw", "AdamW(fused=True)"))
    failure = prepare(entry, cfg, mesh, gen, peaks, adamw_fused=True)
    if failure is None:
        return entry
    entry = Entry(Row(world, "adamw", "adamw", "AdamW(foreach=True)",
                      reason=f"fused=True failed: {failure}"))
    failure = prepare(entry, cfg, mesh, gen, peaks)
    if failure is not None:
        entry.row.available, entry.row.reason = False, f"not available: {failure}"
    return entry


def warm_runtime(cfg: Config, mesh: Any, gen: torch.Generator) -> None:
    """A tiny sharded model's AdamW step, so that the process's one-time allocations (thread
    pools, gloo's buffers, DTensor's caches) are not counted as the first implementation's."""
    tiny = Entry(Row(0, "adamw", "adamw", "warm-up"))
    tiny.model = sharded_model(replace(cfg, vocab=64, context=16, width=8, layers=1), mesh)
    tiny.opt = torch.optim.AdamW(tiny.model.parameters())
    tiny.step(gen, CollectiveRecorder())


def worker(rank: int, world: int, cfg: Config) -> None:
    """One rank: build every implementation, time their steps interleaved, and have rank 0
    write the rows to ``cfg.folder``/result-<world>.json."""
    from torch.distributed.device_mesh import init_device_mesh
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cfg.threads or max(1, cores // world))
    dist.init_process_group("gloo", init_method=f"file://{cfg.folder}/init-{world}",
                            rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(1000 + rank)
        peaks = Peaks()
        warm_runtime(cfg, mesh, gen)
        entries = planned(cfg, world)
        if "adamw" in cfg.impls:
            entries.insert(0, prepare_adamw(world, cfg, mesh, gen, peaks))
        for entry in entries:
            if entry.row.available and entry.opt is None:
                failure = prepare(entry, cfg, mesh, gen, peaks)
                if failure is not None:
                    entry.row.available, entry.row.reason = False, f"not available: {failure}"
        live = [e for e in entries if e.opt is not None]
        for _ in range(cfg.repeats):  # interleaved: the machine's load falls on all alike
            for entry in live:
                entry.times.append(entry.step(gen))
        mine = ([(e.times, e.mem_kb, e.state_bytes) for e in entries], peaks.run())
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            rows = []
            for i, entry in enumerate(entries):
                if entry.opt is not None:
                    per_rank = [measured[i] for measured, _ in everyone]
                    entry.row.step_ms = [1000 * max(ts) for ts in
                                         zip(*(m[0] for m in per_rank), strict=True)]
                    entry.row.mem_mib = max(m[1] for m in per_rank) / 1024
                    entry.row.state_mib = max(m[2] for m in per_rank) / MIB
                rows.append(asdict(entry.row))
            with open(os.path.join(cfg.folder, f"result-{world}.json"), "w") as f:
                json.dump({"rows": rows, "threads": torch.get_num_threads(),
                           "rank_peak_mib": [peak / 1024 for _, peak in everyone]}, f)
    finally:
        dist.destroy_process_group()


def convert_weights(optimizers: list[str], given: dict[str, str], folder: str) -> dict[str, str]:
    """Each optimizer's upstream checkpoint (``given``, else scripts/bench_step.py's default)
    converted into ``folder``; returns the converted files by optimizer."""
    from bench_step import default_weights

    import converters
    files = {}
    for optimizer in optimizers:
        source = given.get(optimizer) or default_weights(optimizer)
        files[optimizer] = os.path.join(folder, f"{optimizer}.safetensors")
        converters.convert(source).save(files[optimizer])
        print(f"{optimizer} weights: {os.path.relpath(source, ROOT)}")
    return files


def table(rows: list[Row]) -> list[str]:
    """The report's lines for one rank count."""
    base = next((r.median_ms for r in rows if r.impl == "adamw" and r.median_ms), None)
    lines = []
    for r in rows:
        if r.median_ms is None:
            lines.append(f"{r.ranks:>5}  {r.label:<22} {r.reason}")
            continue
        ratio = f"{r.median_ms / base:8.2f}x" if base else f"{'':>9}"
        others = ", ".join(f"{n} x{c}" for n, c in sorted(r.other_collectives.items()))
        lines.append(
            f"{r.ranks:>5}  {r.label:<22} {r.median_ms:10.1f} {ratio} {r.all_reduce_calls:>5} "
            f"{r.all_reduce_bytes / 1024:11.1f} {r.mem_mib:9.0f} {r.state_mib:9.0f}"
            + (f"  other collectives: {others}" if others else "")
            + (f"  ({r.reason})" if r.reason else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=["velo"])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=["fused", "adamw"],
                        help="implementations (default: fused adamw; eager takes one to two "
                             "minutes per step of VeLO on GPT-2 small)")
    parser.add_argument("--weights", action="append", default=[], metavar="OPTIMIZER=FOLDER",
                        help="an upstream checkpoint folder for one optimizer (default: those "
                             "of scripts/bench_step.py: for velo the released architecture "
                             "../shared/golden/checkpoints/velo_full when present)")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12: GPT-2 small)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first (at least 1: the last one counts the "
                             "collectives)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (the median)")
    parser.add_argument("--num-steps", type=int, default=10_000,
                        help="the training length VeLO, Celo and Celo-Adam are told")
    parser.add_argument("--threads", type=int,
                        help="torch threads per rank (default: the cores over the ranks)")
    parser.add_argument("--max-materializing-params", type=int, default=30_000_000,
                        help="skip small_fc_lopt's and MuLO's eager path above this many "
                             "parameters per rank (it materializes 30-40 floats per element)")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1 or min(args.ranks) < 1:
        parser.error("--warmup, --repeats and --ranks must be at least 1")
    given = dict(w.split("=", 1) for w in args.weights)
    with tempfile.TemporaryDirectory(prefix="lopt-bench-fsdp-") as folder:
        cfg = Config(args.optimizers, args.impls, convert_weights(args.optimizers, given, folder),
                     args.vocab, args.context, args.width, args.layers, args.warmup,
                     args.repeats, args.num_steps, args.threads, args.max_materializing_params,
                     folder)
        if "fused" in args.impls:  # built once here, not by every rank at once
            from lopt_port import extension
            with contextlib.suppress(Exception):  # the fused rows then say why
                extension.load()
        n = model_params(cfg)
        print(f"{n:,} parameters in {2 + 12 * args.layers + 2} tensors "
              f"({args.layers} GPT-2 blocks, vocab {args.vocab}); median of {args.repeats} "
              f"steps after {args.warmup}; load average {os.getloadavg()[0]:.2f}")
        print(f"{'ranks':>5}  {'implementation':<22} {'step ms':>10} {'/ AdamW':>9} "
              f"{'all_reduce':>5} {'KiB reduced':>11} {'mem MiB':>9} {'state MiB':>9}")
        rows: list[dict[str, Any]] = []
        for world in args.ranks:
            mp.spawn(worker, args=(world, cfg), nprocs=world, join=True)
            with open(os.path.join(folder, f"result-{world}.json")) as f:
                result = json.load(f)
            for line in table([Row(**r) for r in result["rows"]]):
                print(line, flush=True)
            peaks = ", ".join(f"{p:,.0f}" for p in result["rank_peak_mib"])
            print(f"{'':>5}  rank peak RSS (MiB, the whole run): {peaks}; "
                  f"{result['threads']} threads per rank", flush=True)
            rows += [{**r, "median_ms": Row(**r).median_ms, "threads": result["threads"]}
                     for r in result["rows"]]
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        from bench_step import write_json
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
