"""The fused small_fc_lopt kernels (CPU backend) against the eager path and upstream."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lopt_port import SmallFCLOpt, extension
from parity.errors import relative
from parity.golden import load_case, replay_small_fc
from parity.tasks import make_task, task_strategy
from tests.conftest import SMALL_FC_CHECKPOINTS, golden_case_path

STATE = ("momentum", "rms", "v_row", "v_col", "v_diag")
# Fused vs eager, per step from identical inputs: the same float32 operations, except that
# the kernels accumulate reductions (means, sums of squares) in another order (the means in
# float64) and the MLP as one FMA chain per output where the eager path calls MKL's sgemm.
# State: <= 1e-6 relative (measured <= 2.2e-7). Params: the step may differ by the MLP's
# summation order, bounded like the parity gate's update (1e-5 of the step's scale,
# step_mult * max|MLP output|), plus one rounding of the parameter to its dtype (DTYPE_ULP
# of its scale: 2^-23 float32, 2^-7 bfloat16, 2^-10 float16). The float32 acceptance figure,
# params within 1e-6 relative, is relative to the larger of the tensor's scale and its step's:
# a parameter smaller than its own step (a scalar at -0.00063 taking a 0.0097 step, found by
# hypothesis) measures the step's summation-order difference, which the update bound covers.
# Overflow (a float16 gradient of 1e5 is inf) must give NaN in the same elements on both paths.
TOL = 1e-6
UPDATE_TOL = 1e-5


DTYPE_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return relative(a.float().cpu().numpy(), b.float().cpu().numpy())


def _tensors(arrays, dtype=torch.float32, device="cpu"):
    return {k: torch.tensor(v).to(device=device, dtype=dtype) for k, v in arrays.items()}


def _lockstep(weights, task, dtype=torch.float32, device="cpu"):
    """Per step: copy eager's params and state into the fused optimizer, step both.

    Params and grads are ``dtype`` (state float32). The step may differ by the MLP's summation
    order (UPDATE_TOL of the step's scale) and then by one rounding to ``dtype``.
    """
    pe, pf = _tensors(task.params, dtype, device), _tensors(task.params, dtype, device)
    oe = SmallFCLOpt(list(pe.values()), weights, fused=False)
    of = SmallFCLOpt(list(pf.values()), weights, fused=True)
    for t in range(task.steps):
        start = {k: v.clone() for k, v in pe.items()}
        for k in pe:
            pf[k].copy_(pe[k])
            if pe[k] in oe.state:
                of.state[pf[k]] = {n: (v.clone() if isinstance(v, torch.Tensor) else v)
                                   for n, v in oe.state[pe[k]].items()}
            g = torch.tensor(task.grads[t][k]).to(device=device, dtype=dtype)
            pe[k].grad, pf[k].grad = g.clone(), g.clone()
        with oe.capture_intermediates() as captured:
            oe.step()
        of.step()
        for k in pe:
            out = captured[pe[k]]["mlp_output"]
            step_scale = (oe.hparams["step_mult"] * out.abs().max() *
                          torch.exp(out[..., 1] * oe.hparams["exp_mult"]).max()).item()
            finite = ~torch.isnan(pe[k])
            assert torch.equal(torch.isnan(pf[k]), ~finite), (t, k, "NaN elements")
            if not finite.any():
                continue
            p_scale = max(pe[k][finite].float().abs().max().item(),
                          start[k][finite].float().abs().max().item())
            bound = UPDATE_TOL * step_scale + DTYPE_ULP[dtype] * p_scale
            diff = (pf[k][finite].float() - pe[k][finite].float()).abs().max().item()
            assert diff <= bound, (t, k, "params")
            if dtype == torch.float32:  # the acceptance figure: per step, relative, fp32
                assert diff <= TOL * max(p_scale, step_scale), (t, k, "params relative",
                                                                diff / p_scale)
            for n in STATE:
                if n in oe.state[pe[k]]:
                    assert _rel(of.state[pf[k]][n], oe.state[pe[k]][n]) <= TOL, (t, k, n)
            assert float(of.state[pf[k]]["step"]) == float(oe.state[pe[k]]["step"])


def test_extension_builds_and_registers_ops():
    extension.load()
    for op in ("small_fc_reduce", "small_fc_accumulate", "small_fc_apply"):
        assert hasattr(torch.ops.lopt_port, op), op


@pytest.mark.cuda_build
@pytest.mark.skipif(extension.find_nvcc() is None, reason="nvcc not found")
def test_cuda_launchers_are_linked():
    assert extension.cuda_launchers() == extension.CUDA_LAUNCHERS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_matches_eager_each_step(small_fc_weights, seed, device):
    _lockstep(small_fc_weights, make_task(seed, 8), device=device)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(task=task_strategy(steps=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
@example(task=make_task(614739, 3, [(2, 2, 5, 8), (), (4, 6, 8), (), ()]), dtype=torch.float32)
@example(task=make_task(8175, 3, [(3,), (3, 3, 6, 8), (159, 9)]), dtype=torch.float16)
def test_fused_matches_eager_hypothesis(small_fc_weights, task, dtype):
    _lockstep(small_fc_weights, task, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_matches_eager(small_fc_weights, dtype):
    for seed in range(3):
        _lockstep(small_fc_weights, make_task(seed, 4), dtype, "cuda")


def _values_over_the_range(dtype) -> torch.Tensor:
    """Finite values of ``dtype`` from subnormals to near the largest, both signs."""
    info = torch.finfo(dtype)
    mags = torch.logspace(np.log10(info.smallest_normal) - 2, np.log10(info.max) - 0.5, 997,
                          dtype=torch.float64)
    return torch.cat([mags, -mags, torch.zeros(1)]).to(dtype).reshape(-1, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounds_like_torch(small_fc_weights, dtype, device):
    """A bf16/fp16 step is the float32 step rounded by torch's own conversion, bit for bit.

    The kernels load bf16/fp16 exactly, run the float32 math and round to nearest even; the
    same inputs in float32 give the unrounded result, which torch then converts.
    """
    p0 = _values_over_the_range(dtype).to(device)
    g = (torch.linspace(-3, 3, p0.numel()).reshape(p0.shape) * p0.float().abs().clamp(
        max=1.0)).to(dtype).to(device)
    low, full = p0.clone(), p0.float()
    opts = [SmallFCLOpt([x], small_fc_weights, fused=True) for x in (low, full)]
    for x, opt in zip((low, full), opts, strict=True):
        x.grad = g.to(x.dtype)
        opt.step()
    assert not torch.equal(full, p0.float())  # the step moved the params
    assert torch.equal(low.view(torch.int16), full.to(dtype).view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_zero_step_keeps_every_value(small_fc_weights, dtype, device):
    """lr=0: every finite bf16/fp16 bit pattern loads and stores back unchanged."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    p = bits.view(dtype).to(device)
    p = p[torch.isfinite(p.float())].clone()
    before = p.clone()
    opt = SmallFCLOpt([p], small_fc_weights, lr=0.0, fused=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.view(torch.int16), before.view(torch.int16))


@pytest.mark.golden
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda-emulated",
                                                         marks=pytest.mark.emulated)])
@pytest.mark.parametrize("name", SMALL_FC_CHECKPOINTS)
def test_golden_vectors_with_fused(tmp_path, name, backend, monkeypatch):
    monkeypatch.setenv("LOPT_PORT_FUSED_BACKEND", backend)  # the CUDA kernels, emulated, too
    import converters
    from tests.conftest import checkpoint_dir
    path = tmp_path / "w.safetensors"
    converters.convert(checkpoint_dir(name)).save(path)
    reports = replay_small_fc(path, load_case(golden_case_path(name)), fused=True)
    for r in reports:
        # the golden test's bounds for params (1e-6) and state (4e-6), see
        # test_small_fc_golden.py
        assert r.errors["params"] <= 1e-6 and r.errors["state"] <= 4e-6, (r.step, r.errors)
        assert "factored_dims" not in r.errors


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(small_fc_weights, device):
    """Two runs give identical bits, on the CPU also with 1 thread against 2."""
    task = make_task(5, 6)
    finals = []
    threads = torch.get_num_threads()
    for run in range(2):
        if device == "cpu":
            torch.set_num_threads(1 if run == 0 else max(2, threads))
        params = _tensors(task.params, device=device)
        opt = SmallFCLOpt(list(params.values()), small_fc_weights, fused=True)
        for t in range(task.steps):
            for k, p in params.items():
                p.grad = torch.tensor(task.grads[t][k]).to(device)
            opt.step()
        finals.append({k: p.clone() for k, p in params.items()})
    torch.set_num_threads(threads)
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_resume_across_implementations(small_fc_weights, first, second):
    task = make_task(7, 10)

    def run(flags):
        params = {k: torch.tensor(v) for k, v in task.params.items()}
        opt = SmallFCLOpt(list(params.values()), small_fc_weights, fused=flags[0])
        for t in range(task.steps):
            if t == 5:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt = SmallFCLOpt(list(params.values()), small_fc_weights, fused=flags[1])
                opt.load_state_dict(torch.load(buffer, weights_only=True))
            for k, p in params.items():
                p.grad = torch.tensor(task.grads[t][k])
            opt.step()
        return params

    switched, straight = run((first, second)), run((first, first))
    for k in straight:
        # five steps on another implementation: float32 noise of both, as in TOL
        assert _rel(switched[k], straight[k]) <= TOL, k


def test_fused_true_refuses_what_it_cannot_run(small_fc_weights):
    p = torch.zeros(4, 3, dtype=torch.float64)
    opt = SmallFCLOpt([p], small_fc_weights, fused=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 parameters"):
        opt.step()


def test_fused_none_falls_back_with_one_warning(small_fc_weights):
    low = torch.zeros(4, 3, dtype=torch.float64)
    full = torch.zeros(4, 3)
    opt = SmallFCLOpt([low, full], small_fc_weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            low.grad, full.grad = torch.ones_like(low), torch.ones_like(full)
            opt.step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "float64" in messages[0], messages
    assert caught[0].filename == __file__  # points at the caller's step()
    # The eager float64 run computes in float32 (the state's dtype) like the fused run: they
    # differ by the MLP's summation order only, UPDATE_TOL of the step per step.
    np.testing.assert_allclose(low.float().numpy(), full.numpy(), rtol=3 * UPDATE_TOL)


def test_unavailable_extension(small_fc_weights, monkeypatch):
    def broken():
        raise extension.ExtensionUnavailable("no compiler (test)")

    monkeypatch.setattr(extension, "load", broken)
    with pytest.raises(RuntimeError, match="fused=True, but no compiler"):
        SmallFCLOpt([torch.zeros(2)], small_fc_weights, fused=True)
    p = torch.zeros(3, 2)
    opt = SmallFCLOpt([p], small_fc_weights)
    p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="using the eager path: no compiler"):
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7,), (6, 5)])
def test_non_finite_gradients_propagate_like_eager(small_fc_weights, shape, device):
    """A NaN or inf gradient poisons exactly the state and params it poisons in the eager
    path (as upstream, nothing clamps a NaN away)."""
    pe = torch.linspace(-1, 1, int(np.prod(shape))).reshape(shape).to(device)
    pf = pe.clone()
    oe = SmallFCLOpt([pe], small_fc_weights, fused=False)
    of = SmallFCLOpt([pf], small_fc_weights, fused=True)
    g = torch.ones(shape, device=device)
    g.view(-1)[1], g.view(-1)[-1] = float("nan"), float("inf")
    for _ in range(2):
        pe.grad, pf.grad = g.clone(), g.clone()
        oe.step()
        of.step()
    for name in ("momentum", "rms", "v_row", "v_col", "v_diag"):
        if name in oe.state[pe]:
            assert torch.equal(torch.isnan(of.state[pf][name]), torch.isnan(oe.state[pe][name]))
    assert torch.equal(torch.isnan(pf), torch.isnan(pe))
    assert torch.isnan(pf).any()
