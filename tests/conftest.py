"""Shared fixtures: the bundled checkpoints, their golden cases and converted weights."""

from __future__ import annotations

import os

import pytest
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


@pytest.fixture(scope="session")
def small_fc_weights() -> LoadedWeights:
    """The sm0p01 checkpoint converted in memory (step_mult=0.01, hidden 32x2)."""
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    return LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)
