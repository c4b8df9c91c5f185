"""The GPU performance model (``lopt_port/gpu_model.py``) held against the CUDA kernels.

Under the emulated CUDA backend every launch is logged (``torch.ops.lopt_port_emulated.
launch_log``): the model's launches per step, grids, block sizes and dynamic shared memory must
equal the logged ones, in order; and, with the log probing buffers, the arrays each kernel
declares beside its launcher (the ``// traffic`` lines of ``csrc/*_cuda.cu``, from which the
model's bytes per parameter follow) must be exactly those each launch reads (its results
depend on them) and writes. Nothing here is timed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from lopt_port import extension, gpu_model
from tests.conftest import ROOT
from tests.test_cuda_emulated import table

#: Each kind with a per-element MLP width: its bundled checkpoint's (the specialized apply
#: kernels) and one other (the generic ones).
KINDS = [("small_fc_lopt", 32), ("small_fc_lopt", 16), ("mulo", 32), ("velo", 4), ("velo", 8),
         ("celo", 4)]

#: 22 tensors in two chunks of 16: the first without a factored tensor (no reduce launch for
#: it), the second with factored tensors of rank 2-3, several reduction tiles (4,097 and 6,147
#: elements) and apply blocks.
SHAPES: list[tuple[int, ...]] = [(5,), (), (9,), (1,)] * 4 + [
    (70, 65), (3,), (4, 2, 3), (4097,), (9, 4), (3, 2049)]

#: The emulator's buffer names (csrc/bind.cpp) as the declarations' arrays.
ARRAYS = {"params": "p", "grads": "g", "momentum": "m", "rms": "rms", "v_row": "v_row",
          "v_col": "v_col", "v_diag": "v_diag", "row factors": "row_factor",
          "column factors": "col_factor", "sumsq": "sumsq", "partials": "partials",
          "stats": "stats", "mlp weight": "mlp", "mlp bias": "mlp", "weights": "weights",
          "lr_mult": "lr_mult", "param_scale": "param_scale"}
#: Arrays held per parameter, and those only factored (or only non-factored) tensors have.
PER_TENSOR = {"p", "g", "m", "rms", "v_row", "v_col", "v_diag", "row_factor", "col_factor",
              "sumsq"}
FACTORED_ONLY = {"v_row", "v_col", "row_factor", "col_factor"}


@pytest.fixture(scope="module")
def emulated() -> Iterator[Any]:
    """Both extensions built (cached) and loaded; the emulated ops; one CPU thread."""
    extension.load()
    extension.load_emulated()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield torch.ops.lopt_port_emulated
    finally:
        torch.set_num_threads(threads)


def _model(kind: str, hidden: int) -> gpu_model.Optimizer:
    """The model's optimizer for a kind and width, the bundled checkpoints' 2 hidden layers
    and 3 decays."""
    if kind in ("small_fc_lopt", "mulo"):
        return gpu_model.small_fc_like(kind, hidden)
    return gpu_model.velo_like(kind, hidden)


def _logged_step(ops: Any, kind: str, hidden: int, shapes: Sequence[tuple[int, ...]],
                 mode: int, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """One fused step on the emulated CUDA backend with the launch log in ``mode``; the log."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in shapes]
    if weight_decay:
        from lopt_port import VeLO
        opt = VeLO(params, table.synthesized_weights(kind, hidden), num_steps=table.NUM_STEPS,
                   weight_decay=weight_decay, fused=True)
    else:
        opt = table.make_optimizer(table.Case(kind, hidden, "fp32", "matrix"), params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    ops.launch_log(mode)
    try:
        with table.fused_backend("cuda-emulated"):
            opt.step(loss=1.0) if kind in ("velo", "celo") else opt.step()
    finally:
        log = json.loads(ops.launch_log(0))
    return log


def _configs(log: Sequence[dict[str, Any]]) -> list[tuple[str, int, int, int]]:
    out = []
    for e in log:
        assert e["grid"][1:] == [1, 1] and e["block"][1:] == [1, 1], e
        out.append((e["kernel"].split("<")[0], e["grid"][0], e["block"][0], e["smem"]))
    return out


@pytest.mark.emulated
@pytest.mark.parametrize(("kind", "hidden"), KINDS, ids=[f"{k}-h{h}" for k, h in KINDS])
def test_launches_and_grids_are_the_models(emulated: Any, kind: str, hidden: int) -> None:
    """The step's launches (kernel, grid, block, dynamic shared memory), in order, are the
    model's, exactly."""
    log = _logged_step(emulated, kind, hidden, SHAPES, 1)
    model = [(x.kernel, x.grid, x.block, x.smem) for x in _model(kind, hidden).launches(SHAPES)]
    assert _configs(log) == model


def _expected(decl: gpu_model.KernelTraffic, launch: gpu_model.Launch,
              infos: Sequence[gpu_model.TensorInfo], wd: bool, reads: bool
              ) -> set[tuple[str, int | None]]:
    """The (array, parameter) pairs a launch reads or writes by its declaration."""
    accesses = decl.element_reads if reads else decl.element_writes
    others = decl.other_reads if reads else decl.other_writes
    out: set[tuple[str, int | None]] = set()
    for i in launch.tensors:
        factored = infos[i].factored
        names = [a.array for a in accesses if a.condition != "wd" or wd]
        names += [a for a in others if a in PER_TENSOR]
        out |= {(a, i) for a in names
                if not (a in FACTORED_ONLY and not factored) and not (a == "v_diag" and factored)}
    return out | {(a, None) for a in others if a not in PER_TENSOR}


def _observed(names: Sequence[str]) -> set[tuple[str, int | None]]:
    out: set[tuple[str, int | None]] = set()
    for name in names:
        base, _, index = name.partition(" of parameter ")
        out.add((ARRAYS[base], int(index) if index else None))
    return out


#: The probe's shape lists: three tensors in one chunk (a factored matrix, a vector, a
#: factored rank-3 tensor), and :data:`SHAPES` (two chunks; 11 s per step: slow).
PROBE_SHAPES = {"three": [(6, 5), (7,), (2, 3, 4)], "two chunks": SHAPES}
PROBE_CASES = [("small_fc_lopt", 0.0, "three"), ("velo", 0.0, "three"), ("velo", 0.1, "three"),
               *(pytest.param(*c, marks=pytest.mark.slow)
                 for c in (("small_fc_lopt", 0.0, "two chunks"), ("velo", 0.1, "two chunks")))]


@pytest.mark.emulated
@pytest.mark.parametrize(("kind", "weight_decay", "shapes"), PROBE_CASES,
                         ids=lambda v: str(v).replace(" ", "-"))
def test_declared_traffic_is_what_each_launch_reads_and_writes(
        emulated: Any, kind: str, weight_decay: float, shapes: str) -> None:
    """Probing every buffer of every launch: the arrays each launch writes, and those it reads,
    are its kernel's declaration over the tensors it works on. VeLO with prefab weight decay
    reads the parameters in the reduce (``p*2[wd]``)."""
    hidden = 32 if kind == "small_fc_lopt" else 4
    model = _model(kind, hidden)
    log = _logged_step(emulated, kind, hidden, PROBE_SHAPES[shapes], 2, weight_decay)
    launches = model.launches(PROBE_SHAPES[shapes])
    assert [c[0] for c in _configs(log)] == [x.kernel for x in launches]
    traffic = gpu_model.kernel_traffic(model.family)
    infos = [gpu_model.tensor_info(s) for s in PROBE_SHAPES[shapes]]
    for entry, launch in zip(log, launches, strict=True):
        decl = traffic[launch.kernel]
        for reads, key in ((True, "reads"), (False, "writes")):
            expected = _expected(decl, launch, infos, weight_decay != 0.0, reads)
            assert _observed(entry[key]) == expected, (launch.kernel, key)


def test_every_kernel_declares_its_traffic() -> None:
    """Each ``__global__`` kernel of the CUDA sources has one ``// traffic`` line, and each
    line names a kernel of its file."""
    for name in ("small_fc_lopt_cuda.cu", "velo_cuda.cu"):
        with open(os.path.join(ROOT, "csrc", name), encoding="utf-8") as f:
            source = f.read()
        kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\(",
                                 source))
        assert kernels and set(gpu_model.parse_traffic(source, name)) == kernels, name


def test_traffic_parser_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="malformed"):
        gpu_model.parse_traffic("// traffic k: reads p g")
    with pytest.raises(ValueError, match="cannot read"):
        gpu_model.parse_traffic("// traffic k: reads p*3; writes p")


def test_bytes_per_parameter_follow_the_declarations() -> None:
    """float32, 3 decays: small_fc_lopt moves 76 bytes per element of a factored tensor (reduce
    8, accumulate 40, apply 28) and 104 of a non-factored one (accumulate 64, apply 40); a
    bfloat16 parameter saves 2 bytes on each p and g access (7 of them, 5 without the
    reduce)."""
    traffic = gpu_model.kernel_traffic("small_fc")

    def total(factored: bool, param_bytes: int) -> int:
        kernels = ["accumulate_kernel", "apply_kernel"] + (["rowcol_kernel"] if factored else [])
        return sum(sum(gpu_model.element_bytes(traffic[kn], factored=factored,
                                               param_bytes=param_bytes, k=3)) for kn in kernels)

    assert (total(True, 4), total(False, 4)) == (76, 104)
    assert (total(True, 2), total(False, 2)) == (62, 94)
    shapes = gpu_model.MODELS["GPT-2 small"]
    n = sum(math.prod(s) for s in shapes)
    assert (len(shapes), n) == (148, 124_439_808)
    step = gpu_model.kernel_step(gpu_model.OPTIMIZERS["small_fc_lopt"], shapes,
                                 gpu_model.GPUS["H100"])
    assert 76 <= step.bytes / n < 76.5   # the factored entries add a little


def test_torch_multi_tensor_launches() -> None:
    """torch's chunking: a launch per 320 chunks of 65,536 elements or per tensor limit."""
    assert gpu_model.torch_multi_tensor_launches([10] * 36, 4) == 1
    assert gpu_model.torch_multi_tensor_launches([10] * 37, 4) == 2
    assert gpu_model.torch_multi_tensor_launches([65536 * 320], 4) == 1
    assert gpu_model.torch_multi_tensor_launches([65536 * 320 + 1], 4) == 2


def test_readme_and_docs_tables_are_the_models() -> None:
    """The README's GPU model table is what ``python -m lopt_port.gpu_model --markdown``
    prints, and docs/benchmarks.md's per-model tables what it prints without ``--markdown``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert gpu_model.markdown_table() in f.read()
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
        docs = f.read()
    for model in gpu_model.MODELS:
        assert gpu_model.detail_table(model) in docs, model


def _bench() -> Any:
    """``scripts/bench_gpu.py`` as a module."""
    spec = importlib.util.spec_from_file_location("bench_gpu",
                                                  os.path.join(ROOT, "scripts", "bench_gpu.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA GPU is present: bench_gpu.py measures instead of skipping")
def test_bench_gpu_skips_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench().main([]) == 0
    assert capsys.readouterr().out.startswith("bench_gpu: SKIPPED: no CUDA GPU")


@pytest.mark.parametrize("name", ["small_fc_lopt", "MuLO", "VeLO", "Celo", "Celo-Adam"])
def test_bench_gpu_builds_and_steps_each_optimizer(name: str) -> None:
    """The benchmark's optimizers, built as it builds them, take a fused step (on the CPU here),
    and the model has a row under the same name."""
    bench = _bench()
    params = bench._params(bench.CHECK_SHAPES, "cpu")
    before = [p.detach().clone() for p in params]
    bench._stepper(name, bench._optimizer(name, params), torch.device("cpu"))()
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    models = gpu_model.step_models(gpu_model.MODELS["GPT-2 small"], gpu_model.GPUS["A100"])
    assert name in {m.optimizer for m in models}
