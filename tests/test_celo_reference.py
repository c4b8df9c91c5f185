"""The JAX reference of Celo's and Celo-Adam's learned schedule, on the authors' real weights:
the spec's B.8 golden values, and every step of the authors' own runs (golden vectors)."""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity.errors import relative, relative_per_column
from parity.reference.celo import CeloScheduler, load_theta
from tests.conftest import CHECKPOINTS, SHARED_GOLDEN

pytestmark = pytest.mark.reference

THETA = {kind: os.path.join(CHECKPOINTS, kind, "theta.state") for kind in ("celo", "celo_adam")}
SHARED_REAL = os.path.join(os.path.dirname(SHARED_GOLDEN), "real")
SHA256 = {"celo": "35683c6123069c101d62ec1f8b2e6d70d50a43e67ebe09953b27620a7dcb836b",
          "celo_adam": "99c65fa0218a739c32eac4e8a99523b6fed92e2926d0c5d64e83835637b75d38"}

# mulo-celo-spec B.8: lr_mult at updates 0, 1, 2 (num_steps=100, losses 2.0, 1.9, 1.8), eager,
# printed to 8 significant digits; the authors' check allows 2e-9 + 2e-6 |value|.
B8 = {"celo": (0.44360137, 0.9128601, 1.2983159),
      "celo_adam": (0.15356147, 0.19165897, 0.35957763)}
B8_ATOL, B8_RTOL = 2e-9, 2e-6
# Teacher-forced steps from the recorded state before each update, as for VeLO's golden
# replay. Eager against the authors' eager intermediates (both dispatch the same float32
# operations one by one): 1e-6 relative (~8 ulps) for lr_mult and the LSTM inputs (per
# column), 1e-6 absolute for the loss features, which lie in [-1, 1]. Jitted against the
# state and lr_mult of the authors' jitted run: 4e-6 for the LSTM state and lr_mult (the
# authors' own jit-vs-eager spread through the gate matmul and sigmoid/tanh chain; XLA may
# tile the matmuls differently here), 5e-7 for the loss buffer (a few roundings of a moving
# average and its pow-based bias correction).
INTER_TOL, LOSS_FEATURES_TOL = 1e-6, 1e-6
LSTM_STATE_TOL, STATE_TOL = 4e-6, 5e-7


@pytest.mark.parametrize("kind", sorted(THETA))
def test_bundled_weights_are_the_released_ones(kind):
    with open(THETA[kind], "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == SHA256[kind]
    shared = os.path.join(SHARED_REAL, kind, "theta.state")
    if os.path.isfile(shared):
        with open(shared, "rb") as f:
            assert f.read() == data
    found, theta = load_theta(THETA[kind])
    assert found == kind
    n = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(theta))
    assert n == {"celo": 37_089, "celo_adam": 36_865}[kind]  # spec B.5


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(THETA))
def test_schedule_reproduces_the_spec_golden_values(kind):
    sched = CeloScheduler.from_file(THETA[kind])
    with jax.disable_jit():
        for num_steps in (10, 100, 1000):  # step 0 does not depend on the horizon
            lr, _, _ = sched.step(sched.init(2, num_steps), 2.0)
            np.testing.assert_allclose(np.asarray(lr), B8[kind][0], rtol=B8_RTOL,
                                       atol=B8_ATOL)
        state = sched.init(3, 100)
        for t, loss in enumerate((2.0, 1.9, 1.8)):
            lr, state, inter = sched.step(state, loss)
            np.testing.assert_allclose(np.asarray(lr), B8[kind][t], rtol=B8_RTOL,
                                       atol=B8_ATOL)
    if kind == "celo":  # the softmax over the K = 1 bank is exactly 1
        assert np.all(np.asarray(inter["controls"]) == 1.0)
    else:
        assert "controls" not in inter


def _golden(kind):
    path = os.path.join(SHARED_GOLDEN, f"{kind}__taskA.npz")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present (the golden vectors live beside the clone)")
    return np.load(path)


def _state(data, t):
    pre = f"state/step{t}/"
    return {"lstm_hidden_state": {k: jnp.asarray(data[f"{pre}lstm_hidden_state/{k}"])
                                  for k in ("hidden", "cell")},
            "loss_buffer": {k: jnp.asarray(data[f"{pre}loss_buffer/{k}"])
                            for k in ("decays", "iteration", "means", "running_min")},
            "iteration": jnp.asarray(data[f"{pre}iteration"]),
            "num_steps": jnp.asarray(data[f"{pre}num_steps"])}


@pytest.mark.slow
@pytest.mark.golden
@pytest.mark.parametrize("kind", sorted(THETA))
def test_schedule_matches_the_authors_run_step_by_step(kind):
    data = _golden(kind)
    sched = CeloScheduler.from_file(THETA[kind])
    steps = max(int(k.split("/")[1][4:]) for k in data.files if k.startswith("losses/"))
    jitted = jax.jit(sched.step)
    for t in range(1, steps + 1):
        loss = float(data[f"losses/step{t}"])
        with jax.disable_jit():
            lr, _, inter = sched.step(_state(data, t - 1), loss)
        pre = f"inter/step{t}"
        assert relative(lr, data[f"{pre}/lr_mult"]) <= INTER_TOL, t
        assert relative_per_column(inter["lstm_input"], data[f"{pre}/lstm_input"]) <= INTER_TOL
        assert np.max(np.abs(np.asarray(inter["loss_features"])
                             - data[f"{pre}/loss_features"])) <= LOSS_FEATURES_TOL, t
        lr_jit, state, _ = jitted(_state(data, t - 1), loss)
        assert relative(lr_jit, data[f"jit/step{t}/lr_mult"]) <= LSTM_STATE_TOL, t
        for part in ("hidden", "cell"):
            want = data[f"state/step{t}/lstm_hidden_state/{part}"]
            assert relative(state["lstm_hidden_state"][part], want) <= LSTM_STATE_TOL, (t, part)
        for key in ("means", "running_min"):
            want = data[f"state/step{t}/loss_buffer/{key}"]
            assert relative(state["loss_buffer"][key], want) <= STATE_TOL, (t, key)
