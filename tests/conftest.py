"""Shared fixtures and helpers: the bundled checkpoints, their golden cases and converted
weights; the VeLO test files' parameters and gradients; the quick loop's ``slow_except``; the
CUDA emulation's requirements and fault settings."""

from __future__ import annotations

import os
import platform
import shutil

import pytest
import torch
from hypothesis import settings

import converters
from lopt_port.weights import LoadedWeights

# Property tests draw the same examples on every run (``derandomize``), so that a run's result
# depends on the code alone: CI cannot fail on a newly drawn example unrelated to a change.
# ``HYPOTHESIS_PROFILE=explore`` draws fresh examples (what to run when hunting for new cases;
# the tests' ``@example`` lines keep the cases found that way).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINTS = os.path.join(ROOT, "checkpoints")
SMALL_FC_CHECKPOINTS = ("small_fc_h32_sm0p01", "small_fc_h32_default")
DATA = os.path.join(ROOT, "tests", "data")
#: Upstream's golden vectors beside the clone (CI has them; a user's clone may not).
SHARED_GOLDEN = os.path.normpath(os.path.join(ROOT, "..", "shared", "golden"))


def checkpoint_dir(name: str) -> str:
    return os.path.join(CHECKPOINTS, name)


def golden_case_path(name: str) -> str:
    return os.path.join(CHECKPOINTS, "golden", f"{name}__taskA.npz")


def _weights(folder: str) -> LoadedWeights:
    c = converters.convert(folder)
    return LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)


@pytest.fixture(scope="session")
def small_fc_weights() -> LoadedWeights:
    """The sm0p01 checkpoint converted in memory (step_mult=0.01, hidden 32x2)."""
    return _weights(checkpoint_dir("small_fc_h32_sm0p01"))


@pytest.fixture(scope="module")
def weights() -> LoadedWeights:
    """velo_small converted in memory (the test_velo_*.py files; test files of other optimizers
    define their own ``weights``)."""
    return _weights(checkpoint_dir("velo_small"))


def _model_params(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device) for s in [(6, 5), (5,), (3, 4, 2)]]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def slow_except(values, quick):
    """``values`` for ``pytest.mark.parametrize``, each one for which ``quick(value)`` is false
    marked ``slow``: the quick loop (``make quick``) keeps the cheap cases of a slow matrix."""
    return [v if quick(v) else pytest.param(v, marks=pytest.mark.slow) for v in values]


CXX = os.environ.get("CXX", "c++")
#: The tests of the CUDA emulation itself (its semantics and the mutation controls).
needs_emulation = pytest.mark.skipif(
    shutil.which(CXX) is None or platform.machine() != "x86_64",
    reason="the CUDA emulation needs a C++ compiler and x86-64 (its fibers switch stacks in "
           "x86-64 assembly)")


@pytest.fixture
def faults_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault exposure on (the default) with seed 0, whatever the caller's environment; a test
    that wants otherwise sets the variables itself (the emulator reads them at every launch).
    The CUDA emulation's test files use it for every test."""
    monkeypatch.setenv("LOPT_PORT_EMULATION_FAULTS", "1")
    monkeypatch.setenv("LOPT_PORT_EMULATION_SEED", "0")
