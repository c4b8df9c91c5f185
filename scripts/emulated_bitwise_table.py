"""The emulated CUDA backend against the CPU backend, bit for bit: the agreement matrix.

Every optimizer with fused kernels (small_fc_lopt, MuLO, VeLO, Celo; Celo-Adam's fused path is
torch multi-tensor operations, no kernel) runs ``--steps`` (default 20) steps twice in lockstep
on CPU tensors, from identical parameters, gradients and losses: once on the CPU backend
(``LOPT_PORT_FUSED_BACKEND=cpu``) and once on the ``.cu`` kernels under the CUDA emulator
(``LOPT_PORT_FUSED_BACKEND=cuda-emulated``). After every step the parameters and every
floating-point state tensor (accumulators, factored statistics, LSTM state, the loss buffer)
are compared bit for bit; a difference is measured in units in the last place of the tensor's
dtype (:func:`ulp_distance`). Each run is free-running: a difference at one step carries into
the next, as in training.

The matrix (:func:`matrix`), also run by ``tests/test_cuda_emulated.py``:

* optimizer x per-element MLP width: each kind at its bundled checkpoint's width (small_fc_lopt
  and MuLO 32, VeLO and Celo 4), plus small_fc_lopt and MuLO at 16 and 64 and VeLO at 8 with
  seeded random weights of the checkpoint's structure and scale (:func:`synthesized_weights`):
  the CUDA kernels specialize the released widths (32; VeLO's 4) and run every other width
  through their generic MLP loop;
* parameter dtype: float32, bfloat16, float16 (state is float32 in all three);
* shape class (:data:`SHAPE_CLASSES`): ranks 0-4, sizes that do and do not divide the kernels'
  tiles (CUDA: 16 tensors per launch, 256 threads per block, warps of 32, 2,048 elements per
  apply block, reduction tiles of at least 4,096 elements; CPU: 16 lanes, apply chunks of
  1,024), and more tensors than one launch holds.

small_fc_lopt and VeLO at their checkpoints' widths run every dtype x shape class; MuLO and
Celo (the same kernels with other inputs) every shape class in float32 and one in bfloat16 and
float16; the other widths (only the per-element MLP changes) one class in float32.

Usage (prints a Markdown table; ``--json`` also writes every case's numbers)::

    .venv/bin/python scripts/emulated_bitwise_table.py [--steps 20] [--json out/bitwise.json]
        [--kind velo] [--dtype bf16] [--shapes large] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_ENV = "LOPT_PORT_FUSED_BACKEND"
#: The two backends compared: the reference one first.
BACKENDS = ("cpu", "cuda-emulated")
STEPS = 20
#: VeLO/Celo's training horizon in the runs (>= any step count run here).
NUM_STEPS = 100

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}

#: The bundled checkpoint of each kind, and its per-element MLP width.
CHECKPOINTS = {"small_fc_lopt": ("small_fc_h32_sm0p01", 32), "mulo": ("mulo_h32_sm0p01", 32),
               "velo": ("velo_small", 4), "celo": ("celo", 4)}
#: Per-element MLP widths run per kind (the checkpoint's first). small_fc_lopt/MuLO: the
#: kernels take hidden_size <= 64; VeLO: ff_hidden_size <= 16. Celo's weights are the authors'
#: only (its fused path is VeLO's kernels, whose widths VeLO covers).
WIDTHS = {"small_fc_lopt": (32, 16, 64), "mulo": (32, 16, 64), "velo": (4, 8), "celo": (4,)}

#: Shape classes: each a list of parameter shapes stepped together by one optimizer.
SHAPE_CLASSES: dict[str, tuple[tuple[int, ...], ...]] = {
    # rank 0-1, not factored: a scalar, one element, sizes below, at and above a warp and a
    # 16-lane group, and an empty tensor (no work unit at all).
    "small": ((), (1,), (7,), (16,), (33,), (0,)),
    # rank 2, factored: size-1 rows and columns, square, rows and columns that do and do not
    # divide a warp of 32 and a 16-lane group, more rows than a warp, an empty matrix.
    "matrix": ((1, 17), (17, 1), (6, 5), (32, 32), (33, 31), (48, 70), (0, 5)),
    # rank 3-4 (conv-like): factored on the last two dims (k, k, in, out), on the first two
    # (out, in, k, k), on the first and middle (5, 40, 3), and a size-1 middle dim and a tie.
    "rank 3-4": ((3, 3, 6, 8), (8, 6, 3, 3), (5, 40, 3), (4, 1, 9), (4, 4, 2, 2)),
    # past one block and one reduction tile: 4,096 elements (exactly 2 apply blocks and one
    # reduction tile), one element more (a third block of one element, a second tile), 3 rows
    # of 2,049 (rows past an apply block, 65 warp strides), 70 x 65 (neither divides a warp).
    "large": ((4096,), (4097,), (3, 2049), (70, 65)),
    # 24 tensors, two launch chunks of 16: the first holds no factored tensor (its reduction
    # launch is skipped), the second mixes factored tensors of rank 2-4 and unfactored ones.
    "many": tuple([(5,), (), (9,), (1,)] * 4
                  + [(6, 5), (3,), (4, 2, 3), (7, 1), (), (3, 3, 2, 2), (9, 4), (2,)]),
}


@dataclass(frozen=True)
class Case:
    """One cell of the matrix: optimizer kind and MLP width, parameter dtype, shape class."""

    kind: str
    hidden: int
    dtype: str
    shapes: str

    @property
    def optimizer(self) -> str:
        """``kind hN``, e.g. ``small_fc_lopt h32``."""
        return f"{self.kind} h{self.hidden}"

    @property
    def id(self) -> str:
        """A pytest-style id, e.g. ``velo-h4-bf16-large``."""
        return f"{self.kind}-h{self.hidden}-{self.dtype}-{self.shapes.replace(' ', '')}"


#: The kinds whose kernels these are (small_fc_lopt's, VeLO's): every dtype x shape class.
#: MuLO runs small_fc_lopt's kernels with a per-tensor scale, Celo VeLO's with one weight set
#: and a wider LSTM: every shape class in float32, the other dtypes on :data:`SECONDARY`.
FULL_CROSS = ("small_fc_lopt", "velo")
#: The class run where the matrix is not a full cross (also by the other MLP widths, which
#: change the per-element MLP only): factored matrices, MuLO's scales differ from 1 there.
SECONDARY = "matrix"


def matrix() -> list[Case]:
    """The agreement matrix (see :data:`FULL_CROSS`, :data:`SECONDARY`)."""
    cases = []
    for kind, widths in WIDTHS.items():
        for hidden in widths:
            for dtype in DTYPES:
                if hidden == CHECKPOINTS[kind][1] and (kind in FULL_CROSS or dtype == "fp32"):
                    classes = list(SHAPE_CLASSES)
                elif hidden == CHECKPOINTS[kind][1] or dtype == "fp32":
                    classes = [SECONDARY]
                else:
                    classes = []
                cases += [Case(kind, hidden, dtype, c) for c in classes]
    return cases


# ----------------------------------------------------------------------------- comparison
#: :func:`ulp_distance` of NaN against a number (above any distance between numbers).
NAN_MISMATCH = 1 << 62
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance between ``a`` and ``b`` in units in the last place of their dtype
    (float32, bfloat16 or float16), as int64.

    The bit patterns are mapped onto one ordered integer line (negative values mirrored below
    zero, -0.0 one step below +0.0), so 0 means identical bits and 1 adjacent floats. NaN
    against NaN counts 0 (the payload is not compared); NaN against a number counts
    :data:`NAN_MISMATCH`, larger than any distance between numbers.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"cannot compare {a.dtype}{tuple(a.shape)} with "
                         f"{b.dtype}{tuple(b.shape)}")
    bits = torch.finfo(a.dtype).bits
    magnitude = (1 << (bits - 1)) - 1

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(_INT_VIEW[x.dtype]).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude) - 1, i)

    dist = (ordered(a) - ordered(b)).abs()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    dist = torch.where(nan_a & nan_b, torch.zeros_like(dist), dist)
    return torch.where(nan_a ^ nan_b, torch.full_like(dist, NAN_MISMATCH), dist)


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest :func:`ulp_distance` between ``a`` and ``b`` (0 when empty; identical
    bits are told without computing distances)."""
    if a.numel() == 0 or torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype])):
        return 0
    return int(ulp_distance(a, b).max())


def ulps_of_scale(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in ulps of the tensor's scale (the largest finite magnitude in ``a`` and
    ``b``; at least the dtype's smallest normal): a relative error in units of the dtype's
    epsilon, which an element near zero cannot inflate as it inflates :func:`ulp_distance`.
    Elements that are not finite on both sides are left out (:func:`ulp_distance` counts them).
    """
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not finite.any():
        return 0.0
    x, y = a[finite].double(), b[finite].double()
    info = torch.finfo(a.dtype)
    scale = max(float(x.abs().max()), float(y.abs().max()), info.tiny)
    ulp = 2.0 ** math.floor(math.log2(scale)) * info.eps
    return float((x - y).abs().max()) / ulp


def float_leaves(state: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every entry of a (nested) optimizer state."""
    for name, value in state.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            yield from float_leaves(value, f"{key}.")
        else:
            yield key, value


@dataclass
class Difference:
    """How far one quantity (params or state) of the two backends is apart over a run: the
    largest elementwise distance in ulps and where, the largest in ulps of the tensor's scale,
    and the first step that differed."""

    ulps: int = 0
    where: str = ""
    ulps_of_scale: float = 0.0
    where_of_scale: str = ""
    first_step: int | None = None
    first_where: str = ""

    def add(self, a: torch.Tensor, b: torch.Tensor, where: str, step: int) -> None:
        """Compare the two sides' tensor (``where`` names it) after ``step``."""
        ulps = max_ulps(a, b)
        if ulps == 0:
            return
        of_scale = ulps_of_scale(a, b)
        if self.first_step is None:
            self.first_step, self.first_where = step, f"{where} ({ulps} ulp)"
        if ulps > self.ulps:
            self.ulps, self.where = ulps, f"{where} at step {step}"
        if of_scale > self.ulps_of_scale:
            self.ulps_of_scale, self.where_of_scale = of_scale, f"{where} at step {step}"

    def mismatch(self, where: str, step: int) -> None:
        """Record a non-float entry (int tensor, dims, counter) that differs."""
        self.add(torch.zeros(1), torch.full((1,), math.nan), where, step)

    def cell(self) -> str:
        """``identical``, or ``max N ulps (M of scale)``, or ``mismatch`` (NaN on one side
        only, or a non-float entry that differs)."""
        if self.ulps == 0:
            return "identical"
        if self.ulps >= NAN_MISMATCH:
            return "mismatch (NaN on one side, or a non-float entry)"
        unit = "ulp" if self.ulps == 1 else "ulps"
        return f"max {self.ulps} {unit} ({self.ulps_of_scale:.2g} of scale)"

    def describe(self) -> str:
        """One line for a failure message."""
        if self.ulps == 0:
            return "identical"
        return (f"{self.cell()}; largest in ulps: {self.where}; largest of scale: "
                f"{self.where_of_scale}; first difference at step {self.first_step}: "
                f"{self.first_where}")


@dataclass
class CaseResult:
    """What one case measured: the largest parameter and state differences, and its time."""

    case: Case
    steps: int
    params: Difference = field(default_factory=Difference)
    state: Difference = field(default_factory=Difference)
    seconds: float = 0.0
    tensors: int = 0


# ------------------------------------------------------------------------------- the runs
@contextlib.contextmanager
def fused_backend(name: str) -> Iterator[None]:
    """``LOPT_PORT_FUSED_BACKEND=name`` inside the block (the variable is read at each op
    call), restored after it."""
    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = old


@functools.cache
def checkpoint_weights(kind: str) -> Any:
    """The kind's bundled checkpoint, converted in memory (``LoadedWeights``)."""
    import converters
    from lopt_port.weights import LoadedWeights

    c = converters.convert(os.path.join(ROOT, "checkpoints", CHECKPOINTS[kind][0]))
    return LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)


def _like(t: torch.Tensor, shape: tuple[int, ...], fan_in_was: int, fan_in: int,
          gen: torch.Generator) -> torch.Tensor:
    """Seeded normal values of ``shape`` with ``t``'s standard deviation, rescaled by
    ``sqrt(fan_in_was / fan_in)`` so that a layer's outputs keep their scale."""
    std = float(t.std()) * math.sqrt(fan_in_was / fan_in)
    return torch.randn(shape, generator=gen) * std


@functools.cache
def synthesized_weights(kind: str, hidden: int) -> Any:
    """The kind's weights with a per-element MLP ``hidden`` wide: the checkpoint itself at its
    own width; else seeded random weights of the checkpoint's structure (every key, the decay
    offsets kept) whose entries have the checkpoint's per-tensor standard deviation (weights
    rescaled by fan-in)."""
    from lopt_port.weights import LoadedWeights

    base = checkpoint_weights(kind)
    if hidden == CHECKPOINTS[kind][1]:
        return base
    gen = torch.Generator().manual_seed(1000 + hidden)
    sd = dict(base.state_dict)
    h0 = CHECKPOINTS[kind][1]
    if kind in ("small_fc_lopt", "mulo"):
        layers = base.hparams["hidden_layers"] + 1
        for i in range(layers):
            w, b = sd[f"mlp.{i}.weight"], sd[f"mlp.{i}.bias"]
            n_out = hidden if i < layers - 1 else w.shape[0]
            n_in = w.shape[1] if i == 0 else hidden
            sd[f"mlp.{i}.weight"] = _like(w, (n_out, n_in), w.shape[1], n_in, gen)
            sd[f"mlp.{i}.bias"] = _like(b, (n_out,), 1, 1, gen)
        hparams = {**base.hparams, "hidden_size": hidden}
    elif kind == "velo":
        if base.hparams["ff_hidden_layers"] != 2:
            raise ValueError("velo_small's bank is expected to have two hidden layers")
        for name, t in base.state_dict.items():
            if not name.startswith("ff."):
                continue
            k = t.shape[0]
            if name.startswith("ff.w0__"):
                shape, fan = (k, t.shape[1], hidden), (t.shape[1], t.shape[1])
            elif name in ("ff.b0", "ff.b1"):
                shape, fan = (k, hidden), (1, 1)
            elif name == "ff.w1":
                shape, fan = (k, hidden, hidden), (h0, hidden)
            elif name == "ff.w2":
                shape, fan = (k, hidden, t.shape[2]), (h0, hidden)
            else:  # ff.b2: the outputs' biases keep their shape
                shape, fan = tuple(t.shape), (1, 1)
            sd[name] = _like(t, shape, *fan, gen)
        hparams = {**base.hparams, "ff_hidden_size": hidden}
    else:
        raise ValueError(f"no synthesized widths for {kind}")
    return LoadedWeights(base.kind, hparams, sd, {})


def make_optimizer(case: Case, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The case's optimizer over ``params`` with ``fused=True``. MuLO gets μP scales as in the
    parity harness (``4 / fan_in`` for matrices with both dims >= 2, 1 for the rest), so the
    kernels' per-tensor scale is not always 1."""
    from lopt_port import Celo, MuLO, SmallFCLOpt, VeLO

    weights = synthesized_weights(case.kind, case.hidden)
    if case.kind == "small_fc_lopt":
        return SmallFCLOpt(params, weights, fused=True)
    if case.kind == "mulo":
        scales = {p: (4.0 / p.shape[1] if p.dim() == 2 and min(p.shape) >= 2 else 1.0)
                  for p in params}
        return MuLO(params, weights, scales=scales, fused=True)
    cls = {"velo": VeLO, "celo": Celo}[case.kind]
    return cls(params, weights, num_steps=NUM_STEPS, fused=True)


def _compare(case: Case, step: int, names: list[str], sides: list[tuple[list, Any]],
             result: CaseResult) -> None:
    """Compare the two sides' params and states after ``step`` into ``result``."""
    (pa, oa), (pb, ob) = sides
    for name, a, b in zip(names, pa, pb, strict=True):
        tensor = f"{name} {tuple(a.shape)}"
        result.params.add(a, b, f"params of {tensor}", step)
        sa, sb = dict(float_leaves(oa.state[a])), dict(float_leaves(ob.state[b]))
        if sa.keys() != sb.keys():
            raise AssertionError(f"{case.id}: state keys of {tensor} differ: "
                                 f"{sorted(sa)} vs {sorted(sb)}")
        for key, va in sa.items():
            vb, where = sb[key], f"state {key} of {tensor}"
            if isinstance(va, torch.Tensor) and va.is_floating_point():
                result.state.add(va, vb, where, step)
            elif not (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb):
                result.state.mismatch(f"{where} ({va!r} vs {vb!r})", step)


def run_case(case: Case, steps: int = STEPS) -> CaseResult:
    """Run ``case`` for ``steps`` steps on both backends in lockstep; the differences found."""
    from parity.tasks import make_task

    shapes = list(SHAPE_CLASSES[case.shapes])
    # One task per shape class (the same parameters and gradients for every kind and dtype).
    task = make_task(list(SHAPE_CLASSES).index(case.shapes), steps, shapes)
    dtype = DTYPES[case.dtype]
    names = list(task.params)
    sides = []
    for _ in BACKENDS:
        params = [torch.tensor(task.params[n]).to(dtype) for n in names]
        sides.append((params, make_optimizer(case, params)))
    result = CaseResult(case, steps, tensors=len(names))
    start = time.perf_counter()
    for t in range(steps):
        for backend, (params, opt) in zip(BACKENDS, sides, strict=True):
            for n, p in zip(names, params, strict=True):
                p.grad = torch.tensor(task.grads[t][n]).to(dtype)
            with fused_backend(backend):
                if case.kind in ("velo", "celo"):
                    opt.step(loss=float(task.losses[t]))
                else:
                    opt.step()
        _compare(case, t + 1, names, sides, result)
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------- the table
def markdown_table(results: list[CaseResult]) -> str:
    """One row per optimizer and dtype, one column per shape class; each cell ``identical``
    (params and state) or the params' and the state's :meth:`Difference.cell`, ``-`` where the
    matrix has no case."""
    classes = [c for c in SHAPE_CLASSES if any(r.case.shapes == c for r in results)]
    rows: dict[tuple[str, str], dict[str, CaseResult]] = {}
    for r in results:
        rows.setdefault((r.case.optimizer, r.case.dtype), {})[r.case.shapes] = r
    lines = ["| optimizer | dtype | " + " | ".join(classes) + " |",
             "|---|---|" + "---|" * len(classes)]
    for (optimizer, dtype), cells in rows.items():
        text = []
        for c in classes:
            r = cells.get(c)
            text.append("-" if r is None else
                        "identical" if r.params.ulps == 0 and r.state.ulps == 0 else
                        f"params {r.params.cell()}, state {r.state.cell()}")
        lines.append(f"| {optimizer} | {dtype} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def _describe_classes() -> str:
    lines = []
    for name, shapes in SHAPE_CLASSES.items():
        distinct = list(dict.fromkeys(shapes))
        of = "" if len(distinct) == len(shapes) else f" of {len(distinct)} shapes"
        lines.append(f"- {name} ({len(shapes)} tensors{of}): "
                     + ", ".join(str(s) for s in distinct))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the matrix (or the part selected) and print the table; 0 if every cell is
    identical, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--kind", choices=sorted(WIDTHS), action="append")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    parser.add_argument("--shapes", choices=sorted(SHAPE_CLASSES), action="append")
    parser.add_argument("--json", metavar="PATH", help="also write every case's numbers here")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU backend threads (default 1: its results do not depend on "
                             "the count, and idle OpenMP threads slow the emulator down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c for c in matrix() if (args.kind is None or c.kind in args.kind)
             and (args.dtype is None or c.dtype in args.dtype)
             and (args.shapes is None or c.shapes in args.shapes)]
    results = []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        r = run_case(case, args.steps)
        results.append(r)
        print(f"[{i + 1}/{len(cases)}] {case.id}: params {r.params.cell()}, state "
              f"{r.state.cell()} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    print(f"Emulated CUDA backend vs CPU backend, {args.steps} steps, bit for bit. Cells: "
          f"params, state; largest elementwise distance in ulps of the tensor's dtype (state "
          f"float32), and in ulps of the tensor's largest magnitude (\"of scale\").\n")
    print(markdown_table(results))
    print(f"\nShape classes:\n{_describe_classes()}\n\n{len(results)} cases in {total:.0f} s")
    if args.json:
        payload = {"steps": args.steps, "backends": BACKENDS, "seconds": total,
                   "threads": args.threads,
                   "shape_classes": {k: [list(s) for s in v] for k, v in SHAPE_CLASSES.items()},
                   "cases": [{**asdict(r.case), "id": r.case.id, "steps": r.steps,
                              "tensors": r.tensors, "seconds": r.seconds,
                              "params": asdict(r.params), "state": asdict(r.state)}
                             for r in results]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0 if all(r.params.ulps == 0 and r.state.ulps == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
