"""The fused small_fc_lopt kernels (CPU backend) against the eager path and upstream."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

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
# step_mult * max|MLP output|), plus one rounding of the parameter (2^-23 of its scale).
TOL = 1e-6
UPDATE_TOL = 1e-5
ULP = 2.0**-23


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return relative(a.numpy(), b.numpy())


def _pair(weights, task):
    eager = {k: torch.tensor(v) for k, v in task.params.items()}
    fused = {k: torch.tensor(v) for k, v in task.params.items()}
    return (eager, SmallFCLOpt(list(eager.values()), weights, fused=False),
            fused, SmallFCLOpt(list(fused.values()), weights, fused=True))


def _lockstep(weights, task):
    """Per step: copy eager's params and state into the fused optimizer, step both."""
    pe, oe, pf, of = _pair(weights, task)
    for t in range(task.steps):
        start = {k: v.clone() for k, v in pe.items()}
        for k in pe:
            pf[k].copy_(pe[k])
            if pe[k] in oe.state:
                of.state[pf[k]] = {n: (v.clone() if isinstance(v, torch.Tensor) else v)
                                   for n, v in oe.state[pe[k]].items()}
            g = torch.tensor(task.grads[t][k])
            pe[k].grad, pf[k].grad = g.clone(), g.clone()
        with oe.capture_intermediates() as captured:
            oe.step()
        of.step()
        for k in pe:
            out = captured[pe[k]]["mlp_output"]
            step_scale = (oe.hparams["step_mult"] * out.abs().max() *
                          torch.exp(out[..., 1] * oe.hparams["exp_mult"]).max()).item()
            p_scale = max(pe[k].abs().max().item(), start[k].abs().max().item())
            bound = UPDATE_TOL * step_scale + ULP * p_scale
            assert (pf[k] - pe[k]).abs().max().item() <= bound, (t, k, "params")
            for n in STATE:
                if n in oe.state[pe[k]]:
                    assert _rel(of.state[pf[k]][n], oe.state[pe[k]][n]) <= TOL, (t, k, n)
            assert float(of.state[pf[k]]["step"]) == float(oe.state[pe[k]]["step"])


def test_extension_builds_and_registers_ops():
    extension.load()
    assert hasattr(torch.ops.lopt_port, "small_fc_accumulate")
    assert hasattr(torch.ops.lopt_port, "small_fc_apply")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_matches_eager_each_step(small_fc_weights, seed):
    _lockstep(small_fc_weights, make_task(seed, 8))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(task=task_strategy(steps=3))
def test_fused_matches_eager_hypothesis(small_fc_weights, task):
    _lockstep(small_fc_weights, task)


@pytest.mark.parametrize("name", SMALL_FC_CHECKPOINTS)
def test_golden_vectors_with_fused(tmp_path, name):
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


def test_bitwise_deterministic(small_fc_weights):
    task = make_task(5, 6)
    finals = []
    for _ in range(2):
        params = {k: torch.tensor(v) for k, v in task.params.items()}
        opt = SmallFCLOpt(list(params.values()), small_fc_weights, fused=True)
        for t in range(task.steps):
            for k, p in params.items():
                p.grad = torch.tensor(task.grads[t][k])
            opt.step()
        finals.append({k: p.clone() for k, p in params.items()})
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
    p = torch.zeros(4, 3, dtype=torch.bfloat16)
    opt = SmallFCLOpt([p], small_fc_weights, fused=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="float32 parameters only"):
        opt.step()


def test_fused_none_falls_back_with_one_warning(small_fc_weights):
    low = torch.zeros(4, 3, dtype=torch.float16)
    full = torch.zeros(4, 3)
    opt = SmallFCLOpt([low, full], small_fc_weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            low.grad, full.grad = torch.ones_like(low), torch.ones_like(full)
            opt.step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "float16" in messages[0], messages
    assert caught[0].filename == __file__  # points at the caller's step()
    # fp16 keeps 11 significant bits (relative spacing 1e-3): the fp16 run follows the fp32
    # run to within a few of its roundings.
    np.testing.assert_allclose(low.float().numpy(), full.numpy(), rtol=1e-2)


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


def test_build_command(capsys):
    from lopt_port import cli
    assert cli.main(["build"]) == 0
    assert "fused kernels ready" in capsys.readouterr().out
