"""A performance model of the fused GPU step: every figure it gives is modeled, not measured.

Per optimizer and model (a list of parameter shapes), per step:

* **launches and grids** of the fused CUDA kernels, from the launchers' own rules
  (``csrc/multi_tensor_cuda.cuh``: chunks of 16 tensors, work units numbered across a chunk,
  a chunk without units launches nothing). ``tests/test_gpu_model.py`` holds them, exactly,
  against what the emulated CUDA backend launches.
* **bytes** moved: each kernel declares, beside its launcher in ``csrc/*_cuda.cu`` (the
  ``// traffic`` lines), the arrays it reads and writes per element; the bytes of a tensor of
  ``n`` elements are ``n * sum(count * width)`` over the arrays of the kernels that run over
  it (``p`` and ``g`` in the parameter's dtype, state in float32, ``k`` floats for ``x*k``),
  plus the factored entries (``v_row``, ``v_col`` and their factors: ``k`` floats per row or
  column). The test holds the declarations against the buffers each launch reads and writes
  under the emulator's probe.
* **FLOPs** per element: ``2 * MACs`` of the per-element MLP (from its sizes) plus a stated
  estimate for the features, normalization and update; float64 sums of squares apart.
* **time**, a roofline: ``max(bytes / bandwidth, FLOP32 / peak32 + FLOP64 / peak64)`` plus
  ``launches * LAUNCH_US``. No occupancy, cache or tail effects: a floor, not a forecast.

Celo-Adam runs torch's multi-tensor ops (``lopt_port/adam_rule.py``), and the reference,
``torch.optim.AdamW(fused=True)``, torch's fused kernel: their bytes and launches are
estimated from the op sequence and torch's multi-tensor chunking, and are not checked by the
emulator. The per-tensor networks (VeLO's and Celo's LSTM, run by torch) are not modeled.

``python -m lopt_port.gpu_model`` prints the table of the README (``--markdown``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lopt_port.state_layout import factored_dims

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# The launchers' constants (csrc/multi_tensor_cuda.cuh, csrc/reduction_order.h).
CHUNK = 16
THREADS = 256
WARPS = THREADS // 32
APPLY_TILE = 2048
MIN_TILE = 4096
MAX_TILES_PER_TENSOR = 1024
TIME_FEATURES = 11          # small_fc_lopt's time features (kNumTimeFeatures)
VELO_OUTPUTS = 3            # VeLO's MLP outputs (kVeloOutputs)

#: Microseconds per kernel launch added to the roofline (launch and tail of a small kernel on
#: one stream; an assumption, not a measurement).
LAUNCH_US = 4.0


@dataclass(frozen=True)
class Gpu:
    """A GPU's roofline: memory bandwidth (bytes/s), fp32 and fp64 non-tensor-core peaks
    (FLOP/s), as published by the vendor."""

    name: str
    bandwidth: float
    fp32: float
    fp64: float


GPUS = {
    "H100": Gpu("H100 SXM", 3.35e12, 67e12, 34e12),
    "A100": Gpu("A100 SXM 80GB", 2.039e12, 19.5e12, 9.7e12),
}


# ------------------------------------------------------------------ the kernels' declarations
@dataclass(frozen=True)
class Access:
    """One array a kernel reads or writes per element: ``count`` values (``per_k``: times k),
    ``condition`` ``"wd"`` when only with a nonzero grad_wd."""

    array: str
    count: int
    per_k: bool
    condition: str | None


@dataclass(frozen=True)
class KernelTraffic:
    """A kernel's ``// traffic`` line: per-element accesses, and the arrays it reads or writes
    per factored entry or per tensor."""

    kernel: str
    element_reads: tuple[Access, ...]
    element_writes: tuple[Access, ...]
    other_reads: tuple[str, ...]
    other_writes: tuple[str, ...]


_LINE = re.compile(r"^// traffic (\w+): reads (.*); writes (.*)$")
_ACCESS = re.compile(r"^([a-z_]+)(?:\*(k|2))?(?:\[(wd)\])?$")
#: Arrays stored in the parameter's dtype; all others are float32.
PARAM_DTYPE_ARRAYS = ("p", "g")


def _accesses(text: str, where: str) -> tuple[tuple[Access, ...], tuple[str, ...]]:
    element, _, other = text.partition("|")
    out = []
    for token in element.split():
        m = _ACCESS.match(token)
        if m is None:
            raise ValueError(f"{where}: cannot read {token!r} (expected name, name*k, name*2, "
                             "optionally [wd])")
        out.append(Access(m[1], 2 if m[2] == "2" else 1, m[2] == "k", m[3]))
    return tuple(out), tuple(other.split())


def parse_traffic(source: str, where: str = "source") -> dict[str, KernelTraffic]:
    """The ``// traffic`` declarations of a ``.cu`` source, by kernel name."""
    table = {}
    for line in source.splitlines():
        if not line.startswith("// traffic "):
            continue
        m = _LINE.match(line.strip())
        if m is None:
            raise ValueError(f"{where}: malformed traffic line {line!r}")
        reads, other_reads = _accesses(m[2], where)
        writes, other_writes = _accesses(m[3], where)
        table[m[1]] = KernelTraffic(m[1], reads, writes, other_reads, other_writes)
    return table


def kernel_traffic(family: str) -> dict[str, KernelTraffic]:
    """The declarations of ``csrc/small_fc_lopt_cuda.cu`` (``family="small_fc"``), or those
    with ``csrc/velo_cuda.cu``'s over them (``"velo"``: its phase A starts with small_fc's
    reduce launchers)."""
    table: dict[str, KernelTraffic] = {}
    for name in ("small_fc_lopt_cuda.cu", *(("velo_cuda.cu",) if family == "velo" else ())):
        path = os.path.join(CSRC, name)
        with open(path, encoding="utf-8") as f:
            table.update(parse_traffic(f.read(), path))
    return table


def element_bytes(t: KernelTraffic, *, factored: bool, param_bytes: int, k: int,
                  grad_wd: bool = False) -> tuple[int, int]:
    """Bytes ``(read, written)`` per element of a tensor the kernel runs over: the declared
    accesses of the arrays the tensor has (``v_diag`` only when not factored)."""
    def total(accesses: Sequence[Access]) -> int:
        b = 0
        for a in accesses:
            if (a.array == "v_diag" and factored) or (a.condition == "wd" and not grad_wd):
                continue
            width = param_bytes if a.array in PARAM_DTYPE_ARRAYS else 4
            b += a.count * (k if a.per_k else 1) * width
        return b
    return total(t.element_reads), total(t.element_writes)


# ------------------------------------------------------------------------------ the tensors
@dataclass(frozen=True)
class TensorInfo:
    """What the launchers read of a tensor: elements, factored entries (``bind.cpp``)."""

    n: int
    factored: bool
    n_row: int
    n_col: int
    n_rcm: int


def tensor_info(shape: Sequence[int]) -> TensorInfo:
    """``n`` of a non-empty tensor and, when factored (upstream's rule, ``factored_dims``), the
    row, column and row-column-mean entries: ``n / size[d0]``, ``n / size[d1]``,
    ``n / (size[d0] size[d1])``."""
    n = math.prod(shape)
    dims = factored_dims(shape)
    if dims is None:
        return TensorInfo(n, False, 0, 0, 0)
    d1, d0 = dims
    return TensorInfo(n, True, n // shape[d0], n // shape[d1], n // (shape[d0] * shape[d1]))


def accumulate_tiles(n: int) -> int:
    """Reduction tiles of a tensor (``reduction_order.h``: tiles of at least 4,096 elements,
    at most 1,024 per tensor)."""
    per = -(-n // MAX_TILES_PER_TENSOR)
    tile = MIN_TILE if per <= MIN_TILE else -(-per // MIN_TILE) * MIN_TILE
    return -(-n // tile)


# ----------------------------------------------------------------------------- the launches
@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel's name (template arguments dropped), its grid (blocks in
    x), threads per block, dynamic shared memory in bytes, and the tensors (indices into the
    group) it works on: those with work units, or every tensor of the chunk for the kernels
    with a thread or block per tensor."""

    kernel: str
    grid: int
    block: int
    smem: int
    tensors: tuple[int, ...]


def _chunked(infos: Sequence[TensorInfo], kernel: str, units: Callable[[TensorInfo], int],
             per_block: int, smem: int = 0) -> list[Launch]:
    """``for_each_chunk``: one launch per chunk of 16 tensors that has work units, with
    ``ceil(units / per_block)`` blocks."""
    out = []
    for start in range(0, len(infos), CHUNK):
        idx = range(start, min(start + CHUNK, len(infos)))
        total = sum(units(infos[i]) for i in idx)
        if total:
            out.append(Launch(kernel, -(-total // per_block), THREADS, smem,
                              tuple(i for i in idx if units(infos[i]))))
    return out


def _reduce_launches(infos: Sequence[TensorInfo], k: int) -> list[Launch]:
    """``lopt_small_fc_reduce_cuda``: a warp per row and column entry, then a warp per
    row-column mean entry and per 32 column-factor values."""
    return (_chunked(infos, "rowcol_kernel",
                     lambda t: t.n_row + t.n_col if t.factored else 0, WARPS)
            + _chunked(infos, "factor_kernel",
                       lambda t: t.n_rcm + -(-t.n_col * k // 32) if t.factored else 0, WARPS))


def small_fc_launches(shapes: Sequence[Sequence[int]], k: int, mlp_sizes: Sequence[int]
                      ) -> list[Launch]:
    """The launches of one small_fc_lopt (or MuLO) step of one parameter group, in order:
    reduce, accumulate (a warp per tile, then one thread per tensor and feature), apply (a
    block per 2,048 elements, the MLP's ``sum((in + 1) * out)`` floats in shared memory)."""
    infos = [tensor_info(s) for s in shapes]
    features = 4 + 8 * k
    mlp_floats = sum((a + 1) * b for a, b in itertools.pairwise(mlp_sizes))
    out = _reduce_launches(infos, k)
    for start in range(0, len(infos), CHUNK):
        chunk = infos[start:start + CHUNK]
        tiles = sum(accumulate_tiles(t.n) for t in chunk)
        if tiles:
            idx = tuple(range(start, start + len(chunk)))
            out += [Launch("accumulate_kernel", -(-tiles // WARPS), THREADS, 0, idx),
                    Launch("sumsq_kernel", -(-len(chunk) * features // THREADS), THREADS, 0, idx)]
    return out + _chunked(infos, "apply_kernel", lambda t: -(-t.n // APPLY_TILE), 1,
                          4 * mlp_floats)


def velo_mlp_size(k: int, hidden: int, layers: int) -> int:
    """Floats of one tensor's VeLO MLP (``velo_mlp_size``)."""
    return ((6 + 8 * k) * hidden + hidden + (layers - 1) * (hidden * hidden + hidden)
            + hidden * VELO_OUTPUTS + VELO_OUTPUTS)


def velo_launches(shapes: Sequence[Sequence[int]], k: int, hidden: int, layers: int
                  ) -> list[Launch]:
    """The launches of one VeLO (or Celo) step of one parameter group, in order: phase A
    (reduce; per chunk a warp per tile, a warp per side column of each factored tensor when
    the chunk has one, a block per tensor), phase B (a block per 2,048 elements)."""
    infos = [tensor_info(s) for s in shapes]
    out = _reduce_launches(infos, k)
    for start in range(0, len(infos), CHUNK):
        chunk = infos[start:start + CHUNK]
        tiles = sum(accumulate_tiles(t.n) for t in chunk)
        if not tiles:
            continue
        idx = tuple(range(start, start + len(chunk)))
        out.append(Launch("update_kernel", -(-tiles // WARPS), THREADS, 0, idx))
        factored = tuple(i for i in idx if infos[i].factored)
        if factored:
            out.append(Launch("side_kernel", -(-4 * k * len(factored) // WARPS), THREADS, 0,
                              factored))
        out.append(Launch("stats_kernel", len(chunk), THREADS, 0, idx))
    return out + _chunked(infos, "apply_kernel", lambda t: -(-t.n // APPLY_TILE), 1,
                          4 * velo_mlp_size(k, hidden, layers))


# ------------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class Optimizer:
    """A fused optimizer as the model sees it: its kernel family, decays ``k``, per-element
    MLP sizes (inputs, hidden..., outputs) and the FLOPs per element besides the MLP (an
    estimate: features, normalization, update)."""

    name: str
    family: str
    k: int
    mlp: tuple[int, ...]
    other_flops: int

    def launches(self, shapes: Sequence[Sequence[int]]) -> list[Launch]:
        """The step's kernel launches for one parameter group of ``shapes``."""
        if self.family == "small_fc":
            return small_fc_launches(shapes, self.k, self.mlp)
        return velo_launches(shapes, self.k, self.mlp[1], len(self.mlp) - 2)

    @property
    def flops32(self) -> int:
        """fp32 FLOPs per element: ``2 * MACs`` of the MLP plus :attr:`other_flops`."""
        return 2 * sum(a * b for a, b in itertools.pairwise(self.mlp)) \
            + self.other_flops

    @property
    def flops64(self) -> int:
        """fp64 FLOPs per element: a multiply and an add per float64 sum (the features'
        squares; VeLO also the moments of p, m (k) and rms: ``3 + 2k``)."""
        features = 4 + 8 * self.k if self.family == "small_fc" else 6 + 8 * self.k
        moments = 0 if self.family == "small_fc" else 3 + 2 * self.k
        return 2 * (features + moments)


def small_fc_like(name: str, hidden: int = 32, layers: int = 2, k: int = 3) -> Optimizer:
    """An optimizer on small_fc_lopt's kernels: ``4 + 8k`` features and 11 time features into
    ``layers`` hidden layers of ``hidden``, 2 outputs; ~230 other FLOPs per element (the
    features twice, normalization, update)."""
    return Optimizer(name, "small_fc", k, (4 + 8 * k + TIME_FEATURES, *[hidden] * layers, 2), 230)


def velo_like(name: str, hidden: int = 4, layers: int = 2, k: int = 3) -> Optimizer:
    """An optimizer on VeLO's kernels: ``6 + 8k`` features into ``layers`` hidden layers of
    ``hidden``, 3 outputs; ~150 other FLOPs per element."""
    return Optimizer(name, "velo", k, (6 + 8 * k, *[hidden] * layers, VELO_OUTPUTS), 150)


#: The kernel optimizers with their released (bundled) MLP sizes: small_fc_lopt and MuLO
#: (hidden 32 x 2), VeLO and Celo (VeLO's kernels, 4 x 2).
OPTIMIZERS = {o.name: o for o in (small_fc_like("small_fc_lopt"), small_fc_like("MuLO"),
                                  velo_like("VeLO"), velo_like("Celo"))}


def torch_multi_tensor_launches(numels: Sequence[int], depth: int) -> int:
    """Launches of one torch multi-tensor op (``multi_tensor_apply``) over tensors of
    ``numels``: chunks of 65,536 elements, a launch when 320 chunks or the depth's tensor limit
    (110, 64, 48, 36, 30 tensors for 1-5 lists) is reached, and at the end."""
    max_tensors = (110, 64, 48, 36, 30)[depth - 1]
    launches = tensors = blocks = 0
    for n in numels:
        tensors += 1
        chunks = -(-n // 65536)
        for c in range(chunks):
            blocks += 1
            if blocks == 320 or (c == chunks - 1 and tensors == max_tensors):
                launches += 1
                blocks = 0
                tensors = 0 if c == chunks - 1 else 1
    return launches + (blocks > 0)


#: Celo-Adam's step (``AdamRule.fused_begin`` / ``fused_finish``, float32, no weight decay):
#: (op, floats read, floats written per element, torch's multi-tensor depth or 0 for one launch
#: per tensor). The addcmul with expanded scalars and the division by a 1-element list take
#: torch's per-tensor path (its fast path needs dense tensors of one shape).
CELO_ADAM_OPS = (
    ("clamp(g)", 1, 1, 0), ("mul(g, 1-b1)", 1, 1, 2), ("mul(g, g)", 2, 1, 3),
    ("mul(g2, 1-c)", 1, 1, 2), ("addcmul(m)", 2, 1, 0), ("copy_(m)", 1, 1, 2),
    ("addcmul(v)", 2, 1, 0), ("copy_(v)", 1, 1, 2), ("mul(m, inv1)", 1, 1, 2),
    ("mul(v, inv2)", 1, 1, 2), ("add(v_hat, eps)", 1, 1, 2), ("sqrt", 1, 1, 2),
    ("add(eps)", 1, 1, 2), ("div(lr, denom)", 1, 1, 0), ("mul(m_hat, factor)", 2, 1, 3),
    ("lr * step", 1, 1, 0), ("p - lr * step", 2, 1, 0), ("copy_(p)", 1, 1, 0),
)


@dataclass(frozen=True)
class StepModel:
    """One optimizer step on one model and GPU: launches, bytes, FLOPs and the roofline time
    (all modeled)."""

    optimizer: str
    launches: int
    bytes: float
    flops32: float
    flops64: float
    seconds: float


def _roofline(gpu: Gpu, name: str, launches: int, nbytes: float, f32: float, f64: float
              ) -> StepModel:
    compute = f32 / gpu.fp32 + f64 / gpu.fp64
    return StepModel(name, launches, nbytes, f32, f64,
                     max(nbytes / gpu.bandwidth, compute) + launches * LAUNCH_US * 1e-6)


def kernel_step(opt: Optimizer, shapes: Sequence[Sequence[int]], gpu: Gpu,
                param_bytes: int = 4) -> StepModel:
    """The fused step of ``opt`` over one group of ``shapes``: bytes from the kernels'
    declarations over the tensors each launch covers, plus the factored entries."""
    traffic = kernel_traffic(opt.family)
    infos = [tensor_info(s) for s in shapes]
    launches = opt.launches(shapes)
    nbytes = 0.0
    for launch in launches:
        t = traffic[launch.kernel]
        for i in launch.tensors:
            r, w = element_bytes(t, factored=infos[i].factored, param_bytes=param_bytes, k=opt.k)
            nbytes += infos[i].n * (r + w)
    nbytes += sum(entry_bytes(traffic, launches, infos, opt.k))
    n = sum(t.n for t in infos)
    return _roofline(gpu, opt.name, len(launches), nbytes, n * opt.flops32, n * opt.flops64)


def entry_bytes(traffic: dict[str, KernelTraffic], launches: Sequence[Launch],
                infos: Sequence[TensorInfo], k: int) -> list[int]:
    """Per launch, the bytes of the factored entries it reads and writes: ``k`` floats per
    row (``v_row``, ``row_factor``) or column (``v_col``, ``col_factor``) of each factored
    tensor it works on (per-tensor arrays, a few hundred bytes, are left out)."""
    rows = {"v_row": "n_row", "row_factor": "n_row", "v_col": "n_col", "col_factor": "n_col"}
    out = []
    for launch in launches:
        t = traffic[launch.kernel]
        out.append(sum(4 * k * getattr(infos[i], rows[a])
                       for a in (*t.other_reads, *t.other_writes) if a in rows
                       for i in launch.tensors if infos[i].factored))
    return out


def celo_adam_step(shapes: Sequence[Sequence[int]], gpu: Gpu) -> StepModel:
    """Celo-Adam's multi-tensor update (:data:`CELO_ADAM_OPS`, float32): bytes and launches
    estimated from the op sequence; ~20 FLOPs per element."""
    numels = [math.prod(s) for s in shapes]
    n = sum(numels)
    launches = sum(torch_multi_tensor_launches(numels, d) if d else len(numels)
                   for _, _, _, d in CELO_ADAM_OPS)
    nbytes = 4.0 * n * sum(r + w for _, r, w, _ in CELO_ADAM_OPS)
    return _roofline(gpu, "Celo-Adam", launches, nbytes, 20.0 * n, 0.0)


def adamw_fused_step(shapes: Sequence[Sequence[int]], gpu: Gpu) -> StepModel:
    """``torch.optim.AdamW(fused=True)``, float32: one multi-tensor kernel over (p, g, m, v),
    reading 16 and writing 12 bytes per parameter, ~16 FLOPs per parameter."""
    numels = [math.prod(s) for s in shapes]
    n = sum(numels)
    return _roofline(gpu, "AdamW(fused=True)", torch_multi_tensor_launches(numels, 4),
                     28.0 * n, 16.0 * n, 0.0)


def step_models(shapes: Sequence[Sequence[int]], gpu: Gpu) -> list[StepModel]:
    """Every optimizer's modeled step over ``shapes`` (one group, float32), AdamW(fused) last."""
    return ([kernel_step(o, shapes, gpu) for o in OPTIMIZERS.values()]
            + [celo_adam_step(shapes, gpu), adamw_fused_step(shapes, gpu)])


# ----------------------------------------------------------------------------------- models
def gpt_shapes(layers: int, width: int, vocab: int = 50257, context: int = 1024
               ) -> list[tuple[int, ...]]:
    """A GPT-2-style decoder's parameter shapes (tied embeddings): ``wte``, ``wpe``, per block
    two LayerNorms, qkv and output projections, the 4x MLP (weights and biases), ``ln_f``."""
    d = width
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    return [(vocab, d), (context, d), *block * layers, (d,), (d,)]


def vit_shapes(layers: int = 12, width: int = 768, patch: int = 16, image: int = 224,
               classes: int = 1000) -> list[tuple[int, ...]]:
    """ViT-B/16's parameter shapes (timm's layout): patch embedding, class token, position
    embedding, the blocks, the final norm and the head."""
    d, tokens = width, (image // patch) ** 2 + 1
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
             (d, 4 * d), (d,)]
    return [(d, 3, patch, patch), (d,), (1, 1, d), (1, tokens, d), *block * layers, (d,), (d,),
            (classes, d), (classes,)]


MODELS: dict[str, list[tuple[int, ...]]] = {
    "GPT-2 small": gpt_shapes(12, 768),
    "GPT 1.3B": gpt_shapes(24, 2048, context=2048),
    "ViT-B/16": vit_shapes(),
}

#: pylo's published A100 figures: whole ViT-B/16 training steps (forward, backward and the
#: optimizer), in ms. Only the optimizer's share is comparable with this model.
PYLO_A100_VIT_STEP_MS = {"small_fc_lopt": 99.6, "VeLO": 113.6}


def markdown_table(models: Sequence[str] = ("GPT-2 small", "GPT 1.3B")) -> str:
    """The README's table: modeled ms per step (and x AdamW(fused)) per optimizer, model and
    GPU, and the launches per step."""
    head = ["optimizer (modeled)"]
    cols: list[list[StepModel]] = []
    for m in models:
        n = sum(math.prod(s) for s in MODELS[m])
        for g in GPUS:
            head.append(f"{m} ({n / 1e6:,.0f}M), {g}")
            cols.append(step_models(MODELS[m], GPUS[g]))
    head += [f"launches ({m})" for m in models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in range(len(cols[0])):
        cells = [cols[0][row].optimizer]
        for col in cols:
            s, adamw = col[row], col[-1]
            ratio = "" if s is adamw else f" ({s.seconds / adamw.seconds:.1f}x)"
            cells.append(f"{s.seconds * 1e3:.2f} ms{ratio}")
        cells += [str(cols[i * len(GPUS)][row].launches) for i in range(len(models))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(model: str) -> str:
    """Per optimizer on ``model``: bytes per parameter, GB, GFLOP fp32/fp64 and the modeled
    ms on each GPU."""
    shapes = MODELS[model]
    n = sum(math.prod(s) for s in shapes)
    rows = {g: step_models(shapes, GPUS[g]) for g in GPUS}
    lines = ["| optimizer (modeled) | launches | bytes/param | GB | GFLOP fp32 | GFLOP fp64 | "
             + " | ".join(f"{g} ms" for g in GPUS) + " |", "|" + "---|" * (6 + len(GPUS))]
    for i, s in enumerate(rows["H100"]):
        lines.append(f"| {s.optimizer} | {s.launches} | {s.bytes / n:.1f} | {s.bytes / 1e9:.2f} "
                     f"| {s.flops32 / 1e9:.0f} | {s.flops64 / 1e9:.1f} | "
                     + " | ".join(f"{rows[g][i].seconds * 1e3:.2f}" for g in GPUS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the modeled tables (``--markdown``: the README's only)."""
    parser = argparse.ArgumentParser(prog="python -m lopt_port.gpu_model", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="the README's table only")
    args = parser.parse_args(argv)
    print(markdown_table())
    if args.markdown:
        return 0
    for model in MODELS:
        n = sum(math.prod(s) for s in MODELS[model])
        print(f"\n{model}: {len(MODELS[model])} tensors, {n:,} parameters, float32 (modeled)\n")
        print(detail_table(model))
    vit = {s.optimizer: s for s in step_models(MODELS["ViT-B/16"], GPUS["A100"])}
    print("\npylo's A100 figures are whole ViT-B/16 training steps; only the optimizer's share "
          "compares:")
    for name, ms in PYLO_A100_VIT_STEP_MS.items():
        print(f"  {name}: pylo {ms} ms per training step; this model's optimizer step "
              f"{vit[name].seconds * 1e3:.2f} ms (modeled)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
