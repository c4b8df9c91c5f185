"""The parity gate for Celo and Celo-Adam: passes on the real code with the released weights,
fails on each of the four scheduler details that tell Celo from VeLO (mulo-celo-spec B.9.1-2)
and on a wrong Adam bias correction.

The bugs are injected into the PyTorch side only, so each negative control shows that the gate
sees the difference.
"""

from __future__ import annotations

import os

import pytest
import torch

from lopt_port import celo as celo_module
from lopt_port.adam_rule import AdamRule
from lopt_port.loss_buffer import LossHorizon
from lopt_port.lstm_heads import CeloHeads, VeloHeads
from parity import cli, harness
from parity.tasks import make_task
from tests.conftest import checkpoint_dir

pytestmark = pytest.mark.gate


@pytest.fixture(scope="module")
def celo_sides():
    return harness.build_sides(checkpoint_dir("celo"))


@pytest.fixture(scope="module")
def adam_sides():
    return harness.build_sides(checkpoint_dir("celo_adam"))


@pytest.fixture(scope="module")
def task():
    return make_task(5, 5)


def _violations(sides, task):
    result = harness.ParityResult(sides.info, harness.lockstep(sides, task, 50))
    return result, result.violations()


@pytest.mark.slow
def test_clean_lockstep_passes(celo_sides, adam_sides, task):
    result, violations = _violations(celo_sides, task)
    assert violations == []
    assert {"loss_features", "lstm_input", "controls", "lr_mult", "lstm_state", "ff_params",
            "mlp_output", "update", "params", "state/lstm_hidden"} <= set(result.worst())
    result, violations = _violations(adam_sides, task)
    assert violations == []
    assert {"lr_mult", "m_hat", "v_hat", "update", "params", "state/rms"} <= set(
        result.worst())


def _no_schedule(self, lr_mult):
    """The phase-1 configuration on phase-2 weights (B.9.2): lr_mult computed, not applied."""
    return torch.ones_like(lr_mult)


def _bugged_horizon(num_steps, bugged):
    """VeLO's bugged loss features (every loss-buffer decay exp(-0.1))."""
    return LossHorizon(num_steps, bugged=True)


@pytest.mark.slow
@pytest.mark.parametrize("bug, target, attribute, patch, flagged", [
    ("VeLO's raw heads", CeloHeads, "__call__", VeloHeads.__call__, "lr_mult"),
    ("VeLO's x100 interpolation", celo_module, "CELO_FF_MULT", 100.0, "ff_params"),
    ("train_phase ignored", CeloHeads, "applied", _no_schedule, " update:"),
    # Teacher forcing hands both sides the reference's loss buffer after step 1, so this one
    # shows in the state the first step leaves behind (the buffer's decays).
    ("VeLO's bugged loss features", celo_module, "LossHorizon", _bugged_horizon,
     "state/loss_decays"),
])
def test_gate_catches_velo_details(celo_sides, task, monkeypatch, bug, target, attribute,
                                   patch, flagged):
    monkeypatch.setattr(target, attribute, patch)
    _, violations = _violations(celo_sides, task)
    assert any(flagged in v for v in violations), (bug, violations[:3])
    if flagged != "state/loss_decays":
        assert any(" update:" in v or " params:" in v for v in violations), bug


@pytest.mark.slow
def test_gate_catches_an_uncorrected_adam(adam_sides, task, monkeypatch):
    monkeypatch.setattr(AdamRule, "bias_corrections", lambda self, iteration: (1.0, 1.0))
    _, violations = _violations(adam_sides, task)
    assert any(" params:" in v for v in violations)
    assert any("m_hat" in v for v in violations)


def test_cuda_emulated_refused_for_celo_adam(monkeypatch, capsys):
    """Celo-Adam's fused path is torch ops, not kernels: nothing to emulate, a clear error."""
    monkeypatch.delenv(harness.BACKEND_ENV, raising=False)
    assert cli.main([checkpoint_dir("celo_adam"), "--impl", "cuda-emulated", "--gate"]) == 2
    err = capsys.readouterr().err
    assert "--impl cuda-emulated" in err and "Celo-Adam" in err and "--impl fused" in err
    assert harness.BACKEND_ENV not in os.environ
    with pytest.raises(harness.HarnessError, match="no CUDA kernels"):
        harness.build_sides(checkpoint_dir("celo_adam"), impl="cuda-emulated")
