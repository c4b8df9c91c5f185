"""Median optimizer-step time of learned-optimizer implementations, side by side in one run.

``--optimizer small_fc_lopt`` (default), ``velo``, ``mulo`` (every tensor at scale 1),
``celo`` or ``celo_adam`` (the released weights). Implementations: ``fused`` (lopt_port
kernels), ``eager`` (lopt_port PyTorch path), ``compiled`` (the eager path under
``torch.compile(opt.step, fullgraph=True)``, inductor), ``jax`` (parity.reference under
jit), ``adamw`` (``torch.optim.AdamW(fused=True)``, the hand-designed baseline) and
``adamw-compiled`` (``torch.compile`` of ``AdamW(foreach=True).step``). The warm-up step
before the timed ones compiles. Layouts: ``10m`` (one 10M tensor), ``100x100k`` (100 tensors
of 100k), ``gpt2`` (the parameter shapes of GPT-2 small, 124M) and ``mlp`` (a 784-1024-1024-10
MLP, 1.86M parameters in 6 tensors: a size that compiles in about a minute). Also measured in
the same run: the throughput of a 2048^3 float32 matmul, the machine's practical compute
ceiling, and the peak resident memory each implementation adds during one step
(``step_peak_mb``).

Run with ``OMP_WAIT_POLICY=PASSIVE`` on a shared machine; compare ratios, not times::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_step.py --json out/bench.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_step.py --optimizer velo \
        --layouts gpt2 --json out/bench_velo.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_step.py --optimizer velo \
        --layouts mlp --impls eager compiled adamw-compiled --no-memory
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP_FLOP_PER_PARAM = 2 * (39 * 32 + 32 * 32 + 32 * 2)  # 39-32-32-2 MLP: 4,672


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124,439,808 parameters)."""
    d, shapes = 768, [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d),
                   (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


LAYOUTS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "10m": lambda: [(10_000_000,)],
    "100x100k": lambda: [(100_000,)] * 100,
    "gpt2": gpt2_small_shapes,
    "mlp": lambda: [(1024, 784), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)],
}
IMPLS = ("fused", "eager", "compiled", "jax", "adamw", "adamw-compiled")


def median_ms(step: Callable[[], None], repeats: int) -> float:
    return timed_ms(step, repeats)[0]


def timed_ms(step: Callable[[], None], repeats: int) -> tuple[float, float]:
    """``(median of repeats, warm-up)`` times of ``step()`` in ms; the warm-up step builds,
    compiles and allocates the state."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), 1000 * first


def peak_memory_growth_mb(step: Callable[[], None]) -> float | None:
    """Peak resident memory added during one ``step()``, in MiB (Linux; else ``None``).

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5), runs the step and
    reads ``VmHWM``: every page touched by the step counts, torch allocations or not.
    """
    def status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith(key + ":"))
        return int(line.split()[1])

    try:
        before = status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    step()
    return max(0, status_kb("VmHWM") - before) / 1024


def count_every_large_allocation() -> None:
    """Have glibc map (and unmap) each allocation above 64 KiB instead of reusing freed heap,
    so every step's large buffers show in its peak (``M_MMAP_THRESHOLD``; glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)


def sgemm_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms = median_ms(lambda: a @ b, repeats)
    return 2 * 2048**3 / (ms / 1000) / 1e9


def torch_step(impl: str, shapes: list[tuple[int, ...]], weights: str,
               optimizer: str) -> Callable[[], None]:
    from lopt_port import Celo, CeloAdam, MuLO, SmallFCLOpt, VeLO
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    fused = impl == "fused"
    if impl == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    elif impl == "adamw-compiled":
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    elif optimizer in ("velo", "celo", "celo_adam"):
        cls = {"velo": VeLO, "celo": Celo, "celo_adam": CeloAdam}[optimizer]
        opt = cls(params, weights, num_steps=10_000, fused=fused)
    elif optimizer == "mulo":
        opt = MuLO(params, weights, default_scale=1.0, fused=fused)
    else:
        opt = SmallFCLOpt(params, weights, fused=fused)
    step = opt.step
    if impl in ("compiled", "adamw-compiled"):
        torch._dynamo.reset()  # every optimizer compiles afresh (dynamo's cache is bounded)
        step = torch.compile(opt.step, fullgraph=impl == "compiled")
    loss = torch.tensor(1.0)
    if getattr(opt, "requires_loss", False):
        return lambda: step(loss=loss)
    return lambda: step()


def jax_step(shapes: list[tuple[int, ...]], weights: str, optimizer: str,
             upstream: str) -> Callable[[], None]:
    import jax
    import jax.numpy as jnp

    from parity.reference import (
        CeloReference,
        MuLOReference,
        SmallFCLOptReference,
        VeLOReference,
    )
    rng = np.random.default_rng(0)
    params = {f"p{i}": jnp.asarray(rng.normal(size=s).astype(np.float32))
              for i, s in enumerate(shapes)}
    grads = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32))
             for k, v in params.items()}
    if optimizer == "velo":
        ref = VeLOReference.from_upstream(upstream)
    elif optimizer in ("celo", "celo_adam"):
        ref = CeloReference.from_file(os.path.join(upstream, "theta.state"))
    elif optimizer == "mulo":
        ref = MuLOReference.from_checkpoint(weights)
    else:
        ref = SmallFCLOptReference.from_checkpoint(weights)
    init = ({"scales": {k: 1.0 for k in params}} if optimizer == "mulo" else {})
    box = {"params": params, "state": ref.init(params, 10_000, **init)}

    def step() -> None:
        new_params, new_state, _ = ref.step(box["state"], box["params"], grads, 1.0)
        jax.block_until_ready(new_params)
        box["params"], box["state"] = new_params, new_state

    return step


def make_step(impl: str, shapes: list[tuple[int, ...]], weights: str, optimizer: str,
              upstream: str, warm: bool = False) -> Callable[[], None]:
    """One optimizer step of ``impl`` on fresh params; ``warm`` runs a first step now."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = (jax_step(shapes, weights, optimizer, upstream) if impl == "jax"
                else torch_step(impl, shapes, weights, optimizer))
        if warm:
            step()
    return step


def default_weights(optimizer: str) -> str:
    """The checkpoint folder benchmarked when ``--weights`` is not given."""
    if optimizer == "small_fc_lopt":
        return os.path.join(ROOT, "checkpoints", "small_fc_h32_sm0p01")
    if optimizer != "velo":
        return os.path.join(ROOT, "checkpoints", {"mulo": "mulo_h32_sm0p01"}.get(optimizer,
                                                                               optimizer))
    full = os.path.join(os.path.dirname(ROOT), "shared", "golden", "checkpoints", "velo_full")
    return full if os.path.isdir(full) else os.path.join(ROOT, "checkpoints", "velo_small")


def write_json(path: str, rows: list[dict]) -> None:
    """The measured rows to ``path`` (its folder made if missing), as indented JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=["small_fc_lopt", "velo", "mulo", "celo",
                                                "celo_adam"],
                        default="small_fc_lopt")
    parser.add_argument("--weights", help="upstream checkpoint folder (default: "
                        "checkpoints/small_fc_h32_sm0p01; for velo the released VeLO "
                        "architecture ../shared/golden/checkpoints/velo_full when present, "
                        "else checkpoints/velo_small)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--impls", nargs="+", default=["fused", "eager", "jax", "adamw"],
                        choices=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-materializing-params", type=int, default=30_000_000,
                        help="skip jax, and small_fc_lopt's eager path, above this size: they "
                             "materialize a per-element feature matrix (30-40 floats per "
                             "parameter; VeLO's eager path works in chunks)")
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the per-step peak-memory pass")
    args = parser.parse_args(argv)
    import converters
    upstream = args.weights or default_weights(args.optimizer)
    weights = os.path.join(ROOT, "out", f"bench_{args.optimizer}.safetensors")
    converted = converters.convert(upstream)
    converted.save(weights, overwrite=True)
    print(f"{args.optimizer} weights: {upstream} ({converted.hparams.get('lstm_hidden_size')} "
          f"LSTM units)" if args.optimizer == "velo" else f"weights: {upstream}")
    gflops = sgemm_gflops(args.repeats)
    print(f"sgemm 2048^3: {gflops:.1f} GFLOP/s (in-run compute ceiling)")
    rows = []
    cases = []
    for layout in args.layouts:
        shapes = LAYOUTS[layout]()
        n = sum(int(np.prod(s)) for s in shapes)
        for impl in args.impls:
            materializes = impl == "jax" or (impl in ("eager", "compiled") and args.optimizer
                                             in ("small_fc_lopt", "mulo"))
            if materializes and n > args.max_materializing_params:
                print(f"{layout:>9} {impl:>6}: skipped ({n:,} params > "
                      f"--max-materializing-params)")
                continue
            ms, first_ms = timed_ms(make_step(impl, shapes, weights, args.optimizer, upstream),
                                    args.repeats)
            row = {"optimizer": "adamw" if impl.startswith("adamw") else args.optimizer,
                   "impl": impl, "layout": layout, "params": n, "ms": ms,
                   "first_ms": first_ms, "sgemm_gflops": gflops}
            if impl == "fused" and args.optimizer in ("small_fc_lopt", "mulo"):
                row["mlp_gflops"] = MLP_FLOP_PER_PARAM * n / (ms / 1000) / 1e9
            rows.append(row)
            cases.append((row, shapes))
            extra = (f"  MLP at {row['mlp_gflops']:.1f} GFLOP/s = "
                     f"{row['mlp_gflops'] / gflops:.0%} of sgemm" if "mlp_gflops" in row else "")
            if impl.endswith("compiled"):
                extra += f"  (first step, compiling: {first_ms / 1000:.1f} s)"
            print(f"{layout:>9} {impl:>6}: {ms:10.1f} ms{extra}", flush=True)
    if not args.no_memory:
        # After all timings: the allocator setting below would slow the baselines down.
        count_every_large_allocation()
        print("\npeak resident memory added during one step (after a warm-up step):")
        for row, shapes in cases:
            row["step_peak_mb"] = peak_memory_growth_mb(make_step(
                row["impl"], shapes, weights, args.optimizer, upstream, warm=True))
            if row["step_peak_mb"] is not None:
                print(f"{row['layout']:>9} {row['impl']:>6}: {row['step_peak_mb']:10.1f} MiB",
                      flush=True)
    print("\nratios (same run):")
    by = {(r["layout"], r["impl"]): r["ms"] for r in rows}
    for layout in args.layouts:
        # Against the fused kernels where they ran, else against the eager path.
        base_impl = next((i for i in ("fused", "eager") if (layout, i) in by), None)
        if base_impl is None:
            continue
        base = by[(layout, base_impl)]
        parts = [f"{other} / {base_impl} = {by[(layout, other)] / base:.3g}x"
                 for other in IMPLS if other != base_impl and (layout, other) in by]
        if (layout, "compiled") in by and (layout, "adamw-compiled") in by:
            ratio = by[(layout, "compiled")] / by[(layout, "adamw-compiled")]
            parts.append(f"compiled / adamw-compiled = {ratio:.3g}x")
        print(f"{layout:>9}: " + ", ".join(parts))
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
