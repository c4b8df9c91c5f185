"""The CUDA kernels under emulation against the CPU backend, bit for bit.

With ``LOPT_PORT_FUSED_BACKEND=cuda-emulated`` fused steps on CPU tensors run the ``.cu``
kernels (every CUDA thread a fiber, see ``csrc/cuda_emulation``); with ``cpu`` the CPU
backend. Both run the same per-element math (``csrc/small_fc_lopt_math.h``) and are meant to
give the same bits. The agreement matrix (optimizer and MLP width x parameter dtype x shape
class, 20 free-running steps from identical inputs) is defined once, in
``scripts/emulated_bitwise_table.py``, which also prints it as the table of
``docs/cuda-emulation.md``; here every case is one test, and a failure names the optimizer,
dtype, shape class, tensor, quantity, step and distance.

Both backends form every sum in one order (``csrc/reduction_order.h``) with one exp
(``exp_poly``), so every case must give identical bits, params and state, after every step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from lopt_port import extension, velo_fused
from parity.tasks import make_task
from tests.conftest import ROOT, slow_except

pytestmark = pytest.mark.emulated


def _load_table() -> ModuleType:
    """``scripts/emulated_bitwise_table.py`` as a module (the matrix and the runner)."""
    name = "emulated_bitwise_table"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "scripts", f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


table = _load_table()

# Kinds whose backends do not give identical bits yet, with the bounds their 20-step runs meet


@pytest.fixture(scope="module", autouse=True)
def _both_backends_one_thread() -> Iterator[None]:
    """Build (cached) and load both extensions first (a machine that cannot build them fails
    here, with the compiler's message); run the CPU backend on one thread. Its results do not
    depend on the thread count (tests/test_small_fc_fused.py::test_bitwise_deterministic,
    tests/test_velo_fused.py::test_fused_kernels_are_bitwise_independent_of_thread_count), and
    on a shared 2-core machine OpenMP threads waiting between the emulator's launches double
    this file's time (measured: 173 s with 2 threads, 65 s with 1)."""
    extension.load()
    extension.load_emulated()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _context(case: Any) -> str:
    shapes = ", ".join(str(s) for s in table.SHAPE_CLASSES[case.shapes])
    return f"{case.optimizer} {case.dtype}, shape class {case.shapes!r} [{shapes}]"


@pytest.mark.parametrize("case", slow_except(table.matrix(), lambda c: c.shapes == "small"),
                         ids=lambda c: c.id)
def test_emulated_cuda_matches_cpu_backend(case: Any) -> None:
    """20 free-running steps on each backend from identical inputs: identical params and
    state."""
    result = table.run_case(case, table.STEPS)
    where = f"{_context(case)}, {result.steps} steps"
    for quantity in ("params", "state"):
        diff = getattr(result, quantity)
        assert diff.ulps == 0, f"{where}: {quantity} differ: {diff.describe()}"


def _clone(x: Any) -> Any:
    """A deep copy of tensors inside dicts, lists and tuples (other values as they are)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _clone(getattr(x, f.name))
                                         for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _tensors(lists: Any) -> list[torch.Tensor]:
    """The float tensors of the kernels' argument lists, in order."""
    return [t for group in lists if isinstance(group, list) for t in group
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


_VELO_CASES = [c for c in table.matrix() if c.kind in ("velo", "celo")]


@pytest.mark.parametrize("case", _VELO_CASES, ids=lambda c: c.id)
def test_velo_phases_agree(case: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """VeLO's two kernel ops, each run by both backends on identical inputs (those of the
    third step of a CPU-backend run, so that every accumulator is non-zero): phase A's state,
    factored scratch, statistics and per-feature sums of squares and phase B's parameters are
    identical bits (a failure names the phase and quantity that differ first)."""
    captured: dict[str, Any] = {}
    real_a, real_b = velo_fused.phase_a, velo_fused.phase_b

    def capture_a(params: list, states: list, *rest: Any) -> Any:
        captured["a"] = ([(p.detach().clone(), p.grad.clone()) for p in params],
                         _clone(list(states)), _clone(rest))
        return real_a(params, states, *rest)

    def capture_b(phase: Any, *rest: Any) -> None:
        captured["b"] = (_clone(phase), _clone(rest))
        real_b(phase, *rest)

    monkeypatch.setattr(velo_fused, "phase_a", capture_a)
    monkeypatch.setattr(velo_fused, "phase_b", capture_b)
    dtype = table.DTYPES[case.dtype]
    task = make_task(7, 3, list(table.SHAPE_CLASSES[case.shapes]))
    params = [torch.tensor(v).to(dtype) for v in task.params.values()]
    opt = table.make_optimizer(case, params)
    with table.fused_backend("cpu"):
        for t in range(task.steps):
            for p, g in zip(params, task.grads[t].values(), strict=True):
                p.grad = torch.tensor(g).to(dtype)
            opt.step(loss=float(task.losses[t]))

    outputs: dict[str, dict[str, list[torch.Tensor]]] = {}
    for backend in table.BACKENDS:
        with table.fused_backend(backend):
            a_params, a_states, a_rest = captured["a"]
            ps = [p.clone() for p, _ in a_params]
            for p, (_, g) in zip(ps, a_params, strict=True):
                p.grad = g.clone()
            a = real_a(ps, _clone(a_states), *_clone(a_rest))
            lists, stats, sumsq = a.lists, a.stats, a.sumsq
            b_phase, b_rest = _clone(captured["b"])
            real_b(b_phase, *b_rest)
        outputs[backend] = {"phase A state and scratch": _tensors(lists),
                            "phase A statistics": [stats], "phase A sums of squares": [sumsq],
                            "phase B params and state": _tensors(b_phase.lists)}
    cpu, emulated = (outputs[b] for b in table.BACKENDS)
    for what, tensors in cpu.items():
        for i, (a, b) in enumerate(zip(tensors, emulated[what], strict=True)):
            ulps = table.max_ulps(a, b)
            if ulps > 0:
                worst = tuple(int(j) for j in torch.unravel_index(
                    table.ulp_distance(a, b).argmax(), a.shape))
                pytest.fail(f"{_context(case)}: {what}, tensor {i} {tuple(a.shape)} {a.dtype}: "
                            f"{ulps} ulps at index {worst} ({a[worst].item()!r} "
                            f"vs {b[worst].item()!r})")


def test_the_runner_switches_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each side of a run calls its own backend's ops: the comparison is not the CPU backend
    against itself."""
    seen: list[tuple[str, str]] = []
    real_ops: Callable[[], Any] = extension.ops

    def recording_ops() -> Any:
        ops = real_ops()
        seen.append((extension.fused_backend(), ops.name))
        return ops

    monkeypatch.setattr(extension, "ops", recording_ops)
    for kind in ("small_fc_lopt", "velo"):
        seen.clear()
        table.run_case(table.Case(kind, table.CHECKPOINTS[kind][1], "fp32", "small"), 1)
        assert set(seen) == {("cpu", "lopt_port"), ("cuda-emulated", "lopt_port_emulated")}, (
            kind, seen)


def test_ulp_distance() -> None:
    """The measure the matrix reports: neighbours are 1 apart in each dtype, across zero too;
    NaN matches NaN only."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.tensor([1.0, -3.0, 0.0, 5e-3, -0.0], dtype=dtype)
        up = torch.nextafter(x, torch.full_like(x, float("inf")))
        up[-1] = 0.0  # -0.0 and +0.0: different bits, neighbours on the ordered line
        assert table.ulp_distance(x, up).tolist() == [1, 1, 1, 1, 1], dtype
        assert table.ulp_distance(x, x).tolist() == [0] * 5
        tiny = torch.tensor([torch.finfo(dtype).tiny], dtype=dtype)
        # -tiny, ..., -0.0, +0.0, ..., +tiny: the 2^mantissa subnormal steps twice, and -0/+0
        subnormals = round(1 / torch.finfo(dtype).eps)  # 2^(mantissa bits)
        assert table.ulp_distance(-tiny, tiny).item() == 2 * subnormals + 1
        nan = torch.tensor([float("nan"), float("nan")], dtype=dtype)
        assert table.ulp_distance(nan, torch.tensor([float("nan"), 1.0], dtype=dtype)).tolist(
        ) == [0, table.NAN_MISMATCH]
    a = torch.tensor([1000.0, 1e-30])
    b = torch.tensor([1000.0, 2e-30])
    # 1e-30 apart: a binade (2^23 ulps) of the small element, a vanishing fraction of the scale's
    assert table.max_ulps(a, b) == 2**23 and table.ulps_of_scale(a, b) < 1e-20
