"""The parity gate for VeLO: passes on the real code, fails on each known VeLO porting bug.

One set of sides (one compiled JAX reference) serves every run; the bugs are injected into
the PyTorch side only, so each negative control shows that the gate sees the difference.
"""

from __future__ import annotations

import os

import pytest
import torch

import converters
from lopt_port import VeLO
from lopt_port import lstm_inputs as torch_side
from parity import harness
from parity.tasks import make_task
from tests.conftest import checkpoint_dir
from tests.test_parity_gate import backend_spy

pytestmark = pytest.mark.gate

SRC = checkpoint_dir("velo_small")


@pytest.fixture(scope="module")
def sides():
    return harness.build_sides(SRC)


@pytest.fixture(scope="module")
def task():
    return make_task(11, 6)


def _violations(sides, task, num_steps=50):
    result = harness.ParityResult(sides.info, harness.lockstep(sides, task, num_steps))
    return result, result.violations()


@pytest.mark.slow
def test_clean_lockstep_passes(sides, task):
    result, violations = _violations(sides, task)
    assert violations == []
    assert {"loss_features", "lstm_input", "controls", "lr_mult", "lstm_state", "ff_params",
            "features_raw", "mlp_input", "mlp_output", "update", "params",
            "state/lstm_hidden", "state/loss_means", "state/momentum"} <= set(result.worst())


_features = torch_side.lstm_features


def _features_from_new_accumulators(p, state, frac_feat, loss_features):
    """pitfalls #10: the LSTM features from this step's updated momentum and rms."""
    g = torch.clamp(p.grad.float(), -1000, 1000).reshape(state["momentum"].shape[:-1])
    mom = torch.tensor([0.9, 0.99, 0.999])
    new = {**state,
           "momentum": mom * state["momentum"] + (1 - mom) * g.unsqueeze(-1),
           "rms": 0.999 * state["rms"] + 0.001 * (g * g).unsqueeze(-1)}
    return _features(p, new, frac_feat, loss_features)


def _var_rms_about_its_own_mean(p, state, frac_feat, loss_features):
    """pitfalls #11: var_rms centred on the rms mean (upstream subtracts the momentum mean)."""
    out = _features(p, state, frac_feat, loss_features)
    p32 = p.float()
    norm = torch.rsqrt(torch.clamp_min(torch.mean(p32 * p32), 1e-9))
    rms = state["rms"] * norm
    axes = tuple(range(p.dim()))
    mean = rms.mean(dim=axes, keepdim=True) if axes else rms
    var = torch.square(rms - mean).mean(dim=axes) if axes else torch.square(rms - mean)
    out[-3:] = torch_side.clip_log_abs(var).expand(3)
    return out


@pytest.mark.parametrize("bug, patch", [
    ("LSTM features from the new accumulators", _features_from_new_accumulators),
    ("var_rms without the momentum-mean quirk", _var_rms_about_its_own_mean),
])
def test_gate_catches_lstm_feature_bugs(sides, task, monkeypatch, bug, patch):
    monkeypatch.setattr(torch_side, "lstm_features", patch)
    _, violations = _violations(sides, task)
    assert any("lstm_input" in v for v in violations), bug
    assert any(" update:" in v or " params:" in v for v in violations), bug


def test_gate_catches_wrong_bugged_loss_features(sides, task, monkeypatch):
    """pitfalls #14: the loss buffer with use_bugged_loss_features flipped."""
    weights = harness.LoadedWeights(*_loaded())
    flipped = not weights.hparams["use_bugged_loss_features"]
    monkeypatch.setattr(sides, "make_torch", lambda params, num_steps: VeLO(
        params, weights, num_steps=num_steps,
        hparams={"use_bugged_loss_features": flipped}))
    _, violations = _violations(sides, task)
    # the horizon-dependent decays of the fresh buffer differ, and so does the first average
    assert any("state/loss_decays" in v for v in violations), violations
    assert any("state/loss_means" in v for v in violations), violations


def _loaded():
    import converters
    c = converters.convert(SRC)
    return c.kind, c.hparams, c.state_dict, c.metadata


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_ff_mult_passes_the_gate(tmp_path, task, impl):
    """ff_mult=1 (the Celo authors' velo_s convention) on both sides of the gate."""
    path = str(tmp_path / "velo_ff1.safetensors")
    converters.convert(SRC, ff_mult=1.0).save(path)
    sides = harness.build_sides(path, impl=impl)
    assert sides.info["hparams"]["ff_mult"] == 1.0
    _, violations = _violations(sides, task)
    assert violations == []


@pytest.mark.slow
@pytest.mark.emulated
def test_cuda_emulated_lockstep_passes(task, monkeypatch):
    """VeLO's .cu kernels under emulation pass the gate with the fused tolerances; lockstep
    selects the emulated backend by itself (sides built outside :func:`harness.run`)."""
    monkeypatch.delenv(harness.BACKEND_ENV, raising=False)
    sides = harness.build_sides(SRC, impl="cuda-emulated")
    assert sides.info["impl"] == sides.info["fused_backend"] == "cuda-emulated"
    seen = backend_spy(monkeypatch)
    result, violations = _violations(sides, task)
    assert violations == []
    # two fused ops (accumulate, apply) per step, every one on the emulated backend
    assert len(seen) == 2 * task.steps and set(seen) == {"cuda-emulated"}, seen
    assert {"params", "state/momentum", "state/rms", "state/v_row", "state/lstm_hidden",
            "state/loss_means"} <= set(result.worst())
    assert harness.BACKEND_ENV not in os.environ
