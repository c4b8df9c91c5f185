"""SmallFCLOpt against upstream's golden vectors, step by step.

Tolerances (float32 eps = 1.19e-7). Upstream's own jitted and eager runs differ by up to
2.4e-7 in params and 5e-7 relative in state (golden README), so bounds of a few 1e-6 leave
room for reduction order (XLA vs ATen means, MKL vs XLA matmuls) and nothing more:

* ``update`` <= 1e-5 of the upstream update's scale and ``mlp_input`` (normalized features)
  <= 1e-5 absolute: the acceptance bounds of the issue. Measured worst: 5.4e-6 (a scalar
  tensor, whose direction is a near-cancelling sum) and 3.8e-6 (2 ulp of a feature of 17.8).
* ``mlp_output`` <= 1e-5 relative: same chain as ``update``; measured 2.3e-6.
* ``features_raw``, ``fac_g``, ``mlp_pre*``, ``state`` <= 4e-6 relative (~32 ulp): a handful
  of elementwise float32 roundings per step plus reductions; measured <= 7.7e-7.
* ``params`` <= 1e-6 relative to the tensor's scale: updates are 1e-3..1e-2 of it; measured
  6.8e-8 (below one ulp).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import converters
from lopt_port import SmallFCLOpt
from lopt_port.state_layout import factored_dims
from parity.golden import decay_errors, load_case, replay_small_fc
from tests.conftest import SMALL_FC_CHECKPOINTS, checkpoint_dir, golden_case_path

TOL = {"update": 1e-5, "mlp_input": 1e-5, "mlp_output": 1e-5, "features_raw": 4e-6,
       "fac_g": 4e-6, "mlp_pre0": 4e-6, "mlp_pre1": 4e-6, "state": 4e-6, "params": 1e-6}


@pytest.fixture(scope="module", params=SMALL_FC_CHECKPOINTS)
def weights_and_case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / f"{request.param}.safetensors"
    converters.convert(checkpoint_dir(request.param)).save(path)
    return str(path), load_case(golden_case_path(request.param))


@pytest.mark.golden
@pytest.mark.parametrize("teacher_forced", [False, True], ids=["free", "teacher_forced"])
def test_every_step_matches_upstream(weights_and_case, teacher_forced):
    weights, case = weights_and_case
    reports = replay_small_fc(weights, case, teacher_forced=teacher_forced)
    assert len(reports) == case.steps == 12
    for r in reports:
        # The golden files keep hidden activations (mlp_pre*) for steps 1-2 only.
        required = set(TOL) - ({"mlp_pre0", "mlp_pre1"} if r.step > 2 else set())
        assert required <= set(r.errors), r.errors.keys()
        assert "factored_dims" not in r.errors, f"factored dims differ at {r.worst}"
        for quantity in required:
            tol = TOL[quantity]
            assert r.errors[quantity] <= tol, (
                f"step {r.step}: {quantity} error {r.errors[quantity]:.3g} > {tol} "
                f"in {r.worst[quantity]}")


def test_decays_match_upstream_bits(weights_and_case):
    weights, case = weights_and_case
    errors = decay_errors(weights, case)
    # float32 log/exp of two libraries may differ by one ulp; decays lie in [0.5, 1),
    # where one ulp is 5.96e-8. Measured: 0.0 (bit-identical).
    assert max(errors.values()) <= 5.96e-8, errors


def test_factored_dims_match_upstream_on_this_machine(weights_and_case):
    _, case = weights_and_case
    for name in case.names:
        shape = case.data[f"params/step0/{name}"].shape
        expected = tuple(int(d) for d in case.data[f"meta/factored_dims/{name}"])
        ours = factored_dims(shape)
        assert (ours if ours is not None else (-1, -1)) == expected, name


def test_capture_shapes(small_fc_weights):
    p = torch.randn(6, 6, 3, 3)
    s = torch.randn(())
    opt = SmallFCLOpt([p, s], small_fc_weights)
    p.grad, s.grad = torch.randn_like(p), torch.randn_like(s)
    with opt.capture_intermediates() as cap:
        opt.step()
    assert cap[p]["features_raw"].shape == (6, 6, 3, 3, 28)
    assert cap[p]["mlp_input"].shape == (6, 6, 3, 3, 39)
    assert cap[p]["mlp_pre0"].shape == (6, 6, 3, 3, 32)
    assert cap[p]["mlp_output"].shape == (6, 6, 3, 3, 2)
    assert cap[p]["update"].shape == (6, 6, 3, 3)
    assert cap[p]["fac_g"].shape == (6, 6, 3, 3, 3)
    assert cap[s]["mlp_input"].shape == (1, 39) and cap[s]["fac_g"].shape == (3,)
    np.testing.assert_array_equal(cap[s]["time_features"].numpy(),
                                  np.tanh(np.float32(0) / np.array(
                                      [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000,
                                       100000], np.float32) - 1))
    assert opt._capture is None
