"""The fused CUDA step on a real GPU: measured against AdamW(fused=True) and against the model.

One command (about a minute for GPT-2 small on an H100; the first run also builds the kernels)::

    .venv/bin/python scripts/bench_gpu.py [--model "GPT-2 small"|"GPT 1.3B"|ViT-B/16]

Per optimizer (small_fc_lopt, MuLO, VeLO, Celo on the fused CUDA kernels, Celo-Adam on torch's
multi-tensor ops) over the model's float32 parameters, with fixed random gradients:

* the median step time (CUDA events, after warm-up steps) and its ratio to
  ``torch.optim.AdamW(fused=True)`` on the same parameters;
* the same against ``lopt_port.gpu_model``'s prediction for this GPU (H100 and A100 rooflines;
  other GPUs get none), measured / modeled;
* CUDA against the CPU backend on the same inputs (a few tensors, factored and not, 3 steps):
  the largest difference of the parameters relative to their largest magnitude. The kernels
  share their per-element math and reduction orders with the CPU backend (and are bit-identical
  to it under emulation), so it should be 0; the check fails above ``TOLERANCE``.

Without a CUDA GPU it prints one line saying so and exits 0. Exit 1 when a CUDA vs CPU check
fails, 2 when a GPU is present but the fused CUDA step cannot run (kernels built without
nvcc). The optimizers use the bundled checkpoints (test fixtures: the timing does not depend
on the weights' values).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lopt_port import gpu_model  # noqa: E402

#: Bound on the CUDA vs CPU difference of the parameters, relative to their largest magnitude.
TOLERANCE = 1e-6
#: The bundled checkpoint of each optimizer.
CHECKPOINTS = {"small_fc_lopt": "small_fc_h32_sm0p01", "MuLO": "mulo_h32_sm0p01",
               "VeLO": "velo_small", "Celo": "celo", "Celo-Adam": "celo_adam"}
#: Shapes of the CUDA vs CPU check: factored matrices, a rank-3 tensor, vectors, and tensors
#: past one reduction tile and one apply block.
CHECK_SHAPES = [(64, 48), (48,), (3, 5, 7), (4097,), (70, 65), ()]
NUM_STEPS = 1000


@functools.cache
def _weights(name: str) -> Any:
    import converters
    from lopt_port.weights import LoadedWeights

    c = converters.convert(os.path.join(ROOT, "checkpoints", CHECKPOINTS[name]))
    return LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)


def _optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """``name``'s optimizer over ``params`` with its fused path (MuLO with muP scales)."""
    from lopt_port import Celo, CeloAdam, MuLO, SmallFCLOpt, VeLO

    weights = _weights(name)
    if name == "small_fc_lopt":
        return SmallFCLOpt(params, weights, fused=True)
    if name == "MuLO":
        scales = {p: (4.0 / p.shape[1] if p.dim() == 2 and min(p.shape) >= 2 else 1.0)
                  for p in params}
        return MuLO(params, weights, scales=scales, fused=True)
    cls = {"VeLO": VeLO, "Celo": Celo, "Celo-Adam": CeloAdam}[name]
    return cls(params, weights, num_steps=NUM_STEPS, fused=True)


def _stepper(name: str, opt: torch.optim.Optimizer, device: torch.device) -> Callable[[], None]:
    if name in ("small_fc_lopt", "MuLO"):
        return lambda: opt.step()
    loss = torch.tensor(1.0, device=device)
    return lambda: opt.step(loss=loss)


def _params(shapes: Sequence[Sequence[int]], device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        p = (torch.randn(tuple(s), generator=gen) * 0.02).to(device)
        p.grad = (torch.randn(tuple(s), generator=gen) * 1e-3).to(device)
        out.append(p)
    return out


def median_ms(step: Callable[[], None], warmup: int, repeats: int) -> float:
    """The median of ``repeats`` steps' times (CUDA events), after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_vs_cpu(name: str, steps: int = 3) -> float:
    """The largest parameter difference between the CUDA and CPU fused paths after ``steps``
    steps from identical inputs, relative to the largest parameter magnitude."""
    sides = []
    for device in ("cpu", "cuda"):
        params = _params(CHECK_SHAPES, device, seed=1)
        opt = _optimizer(name, params)
        step = _stepper(name, opt, torch.device(device))
        for _ in range(steps):
            step()
        sides.append([p.detach().cpu() for p in params])
    worst = 0.0
    for a, b in zip(*sides, strict=True):
        if a.numel():
            scale = max(float(a.abs().max()), 1e-30)
            worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def modeled_gpu() -> gpu_model.Gpu | None:
    """The model's roofline for this GPU (by its name), if it has one."""
    name = torch.cuda.get_device_name()
    for key, gpu in gpu_model.GPUS.items():
        if key in name:
            return gpu
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every CUDA vs CPU check passes or there is no GPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="GPT-2 small", choices=list(gpu_model.MODELS))
    parser.add_argument("--optimizers", nargs="+", default=list(CHECKPOINTS),
                        choices=list(CHECKPOINTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: SKIPPED: no CUDA GPU (torch.cuda.is_available() is False). The modeled "
              "figures need none: python -m lopt_port.gpu_model")
        return 0
    from lopt_port import extension

    extension.load()
    device = torch.device("cuda")
    reason = extension.backend_unsupported_reason(device)
    if reason is not None:
        print(f"bench_gpu: a GPU is here but the fused CUDA step cannot run: {reason}")
        return 2
    shapes = gpu_model.MODELS[args.model]
    n = sum(math.prod(s) for s in shapes)
    gpu = modeled_gpu()
    print(f"bench_gpu: {torch.cuda.get_device_name()}, {args.model}: {len(shapes)} tensors, "
          f"{n:,} float32 parameters; medians of {args.repeats} steps after {args.warmup}")
    if gpu is None:
        print("  no roofline for this GPU in lopt_port.gpu_model: measured / modeled left out")
    models = {s.optimizer: s for s in gpu_model.step_models(shapes, gpu)} if gpu else {}

    params = _params(shapes, "cuda")
    adamw = torch.optim.AdamW(params, lr=1e-3, fused=True)
    adamw_ms = median_ms(adamw.step, args.warmup, args.repeats)
    del adamw, params
    torch.cuda.empty_cache()
    rows = [("AdamW(fused=True)", adamw_ms, None)]
    failed = []
    for name in args.optimizers:
        params = _params(shapes, "cuda")
        opt = _optimizer(name, params)
        ms = median_ms(_stepper(name, opt, device), args.warmup, args.repeats)
        del opt, params
        torch.cuda.empty_cache()
        diff = cuda_vs_cpu(name)
        if not diff <= TOLERANCE:
            failed.append(name)
        rows.append((name, ms, diff))

    print(f"\n| optimizer | measured ms | x AdamW(fused) | modeled ms ({gpu.name if gpu else '-'}) "
          "| measured / modeled | CUDA vs CPU (max rel. diff of params) |")
    print("|---|---|---|---|---|---|")
    for name, ms, diff in rows:
        model = models.get(name)
        modeled = f"{model.seconds * 1e3:.2f}" if model else "-"
        ratio = f"{ms / (model.seconds * 1e3):.2f}" if model else "-"
        check = "-" if diff is None else (f"{diff:.1e} ({'ok' if diff <= TOLERANCE else 'FAIL'})")
        print(f"| {name} | {ms:.2f} | {ms / adamw_ms:.2f} | {modeled} | {ratio} | {check} |")
    print("\nModeled: the fused kernels' (or Celo-Adam's multi-tensor ops') roofline only; the "
          "measured step also runs the per-tensor network (VeLO's and Celo's LSTM) and the "
          "host's work.")
    if failed:
        print(f"\nbench_gpu: CUDA vs CPU above {TOLERANCE:g} for: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
