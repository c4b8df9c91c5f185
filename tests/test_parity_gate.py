"""The parity gate passes on the real code and fails on each known class of porting bug."""

from __future__ import annotations

import json
import os

import jsonschema
import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import converters.small_fc_lopt as mapping
import lopt_port.small_fc_lopt as torch_side
from lopt_port import accumulators, extension
from lopt_port.accumulators import FactoredResult, safe_rsqrt
from lopt_port.state_layout import factored_dims
from parity import cli, harness, report
from parity.tasks import task_strategy
from tests.conftest import checkpoint_dir

pytestmark = pytest.mark.gate

SRC = checkpoint_dir("small_fc_h32_sm0p01")


def _run(**kw):
    return harness.run(SRC, **{"tasks": 3, "steps": 4, "free_steps": 0, **kw})


@pytest.mark.slow
def test_clean_run_passes():
    result = _run(free_steps=30)
    assert result.violations() == []
    assert {"update", "params", "mlp_input", "features_raw", "state/momentum"} <= set(
        result.worst())


def _row_col_mean_over_decay_axis(state, g, decays, dims):
    """pitfalls #8: the row/column normalizer averaged over the decay axis."""
    result = torch_side_update_factored(state, g, decays, dims)
    if dims is None:
        return result
    d1, d0 = dims
    v_row = state["v_row"]
    row_factor = safe_rsqrt(v_row / (v_row.mean(dim=-1, keepdim=True) + 1e-9))
    fac_g = g.unsqueeze(-1) * row_factor.unsqueeze(d0) * result.col_factor.unsqueeze(d1)
    return FactoredResult(fac_g, row_factor, result.col_factor)


torch_side_update_factored = accumulators.update_factored
_raw = torch_side.raw_features


def _swapped_columns(*args):
    raw = _raw(*args)
    return raw[..., [0, 1, 3, 2, *range(4, raw.shape[-1])]]


def _square_tie_swapped(shape, tie_break="numpy"):
    dims = factored_dims(shape, tie_break)
    if len(shape) == 2 and shape[0] == shape[1]:
        return dims[1], dims[0]
    return dims


_to_sd, _to_leaves = mapping.theta_to_state_dict, mapping.state_dict_to_leaves


def _w1_not_transposed_to_torch(theta, hparams, file, root):
    sd = _to_sd(theta, hparams, file, root)
    sd["mlp.1.weight"] = np.ascontiguousarray(sd["mlp.1.weight"].T)
    return sd


def _w1_not_transposed_to_upstream(sd, hparams):
    sd = dict(sd)
    sd["mlp.1.weight"] = np.ascontiguousarray(np.asarray(sd["mlp.1.weight"]).T)
    return _to_leaves(sd, hparams)


BUGS = {
    "row_col_mean over the decay axis": [(accumulators, "update_factored",
                                          _row_col_mean_over_decay_axis)],
    "two feature columns swapped": [(torch_side, "raw_features", _swapped_columns)],
    "dropped rsqrt(rms + 1e-6) epsilon": [(torch_side, "RMS_FEATURE_EPS", 0.0)],
    "square tensor with swapped factored dims": [(torch_side, "factored_dims",
                                                  _square_tie_swapped)],
    "hidden weight not transposed in conversion": [
        (mapping, "theta_to_state_dict", _w1_not_transposed_to_torch),
        (mapping, "state_dict_to_leaves", _w1_not_transposed_to_upstream)],
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_gate_catches_injected_bug(monkeypatch, bug):
    for target, name, value in BUGS[bug]:
        monkeypatch.setattr(target, name, value)
    result = _run()
    assert result.violations(), f"the gate missed: {bug}"
    # Each of these bugs changes the applied step, not only an intermediate.
    flagged = {r.quantity for r in result.records if r.violates}
    assert {"update", "params"} <= flagged, flagged


@pytest.mark.slow
def test_cli_exit_codes_and_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    assert cli.main([SRC, "--tasks", "2", "--steps", "3", "--free-steps", "20", "--report",
                     str(out), "--gate"]) == 0
    text = capsys.readouterr().out
    assert "parity gate: passed" in text and "update" in text
    data = json.loads((out / "report.json").read_text())
    jsonschema.validate(data, report.schema())
    assert data["passed"] and data["info"]["tasks"] == 2
    for png in ("errors_vs_step.png", "loss_curves.png"):
        image = plt.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # not a blank canvas
    assert "![errors_vs_step](errors_vs_step.png)" in (out / "report.md").read_text()

    assert cli.main([str(tmp_path / "missing"), "--gate"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main([SRC, "--impl", "fused", "--tasks", "2", "--steps", "3", "--free-steps",
                     "10", "--gate"]) == 0
    assert "eager" not in capsys.readouterr().out.splitlines()[0].split(" vs ")[0]

    monkeypatch.setattr(torch_side, "RMS_FEATURE_EPS", 0.0)
    assert cli.main([SRC, "--tasks", "1", "--steps", "2", "--free-steps", "0", "--gate",
                     "--report", str(tmp_path / "bad")]) == 1
    text = capsys.readouterr().out
    assert "tolerance violation(s):" in text and "task0 step 1" in text
    data = json.loads((tmp_path / "bad" / "report.json").read_text())
    jsonschema.validate(data, report.schema())
    assert not data["passed"] and data["violations"]


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=task_strategy(steps=3))
def test_lockstep_on_hypothesis_tasks(task):
    sides = harness.build_sides(SRC)
    records = harness.lockstep(sides, task)
    bad = [r for r in records if r.violates]
    assert not bad, bad[:3]
    assert {r.tensor for r in records} == set(task.params)


def test_harness_bad_input():
    with pytest.raises(harness.HarnessError, match="--tasks"):
        harness.run(SRC, tasks=-1)
    with pytest.raises(harness.HarnessError, match="free-running task"):
        harness.run(SRC, free_task="transformer")


@pytest.mark.slow
def test_free_running_conv_net():
    from parity.tasks import conv_task
    sides = harness.build_sides(SRC)
    result = harness.free_running(sides, conv_task(3), 30)
    assert len(result.loss_torch) == len(result.loss_reference) == 30
    assert not result.violates, result.final_loss_error
    # both sides' losses track each other at every step, not only the last
    rel = np.abs(np.subtract(result.loss_torch, result.loss_reference)) / np.abs(
        result.loss_reference)
    assert rel.max() <= 1e-3, rel.max()  # the gate's free-running bound, at every step
    # Measured 3.0e-7 after 30 steps; 1e-4 leaves room for float32 drift amplified by the
    # training dynamics, while the injected bugs above move params by >= 9e-4 in one step.
    assert result.final_params_error <= 1e-4, result.final_params_error


def backend_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The backend selected at each fused-op lookup (every fused step asks ``extension.ops``)."""
    seen: list[str] = []
    real = extension.ops

    def spy() -> object:
        seen.append(extension.fused_backend())
        return real()

    monkeypatch.setattr(extension, "ops", spy)
    return seen


@pytest.mark.slow
@pytest.mark.emulated
def test_cuda_emulated_gate_passes(tmp_path, monkeypatch, capsys):
    """--impl cuda-emulated: the .cu kernels, run under emulation, pass the fused gate; the
    backend is selected for the run only."""
    monkeypatch.setenv(harness.BACKEND_ENV, "auto")
    seen = backend_spy(monkeypatch)
    out = tmp_path / "rep"
    assert cli.main([SRC, "--impl", "cuda-emulated", "--tasks", "1", "--steps", "3",
                     "--free-task", "conv", "--free-steps", "4", "--gate", "--report",
                     str(out)]) == 0
    text = capsys.readouterr().out
    assert "cuda-emulated vs builtin" in text.splitlines()[0]
    assert "parity gate: passed" in text
    assert len(seen) == 1 * 3 + 4 and set(seen) == {"cuda-emulated"}, seen
    assert os.environ[harness.BACKEND_ENV] == "auto"
    data = json.loads((out / "report.json").read_text())
    jsonschema.validate(data, report.schema())
    assert data["info"]["impl"] == data["info"]["fused_backend"] == "cuda-emulated"
    assert {"params", "state/momentum", "state/v_row", "state/v_col"} <= set(data["worst"])


def test_cuda_emulated_backend_restored_on_error(monkeypatch):
    def failing_lockstep(*args, **kwargs):
        if os.environ.get(harness.BACKEND_ENV) != "cuda-emulated":
            raise AssertionError("the emulated backend is not selected during the run")
        raise RuntimeError("lockstep failed")

    monkeypatch.setattr(harness, "lockstep", failing_lockstep)
    for before in (None, "cpu"):
        if before is None:
            monkeypatch.delenv(harness.BACKEND_ENV, raising=False)
        else:
            monkeypatch.setenv(harness.BACKEND_ENV, before)
        with pytest.raises(RuntimeError, match="lockstep failed"):
            harness.run(SRC, impl="cuda-emulated", tasks=1, steps=1, free_steps=0)
        assert os.environ.get(harness.BACKEND_ENV) == before
