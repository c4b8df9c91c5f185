"""lopt_port.VeLO's state: the step-wide state (loss buffer and iteration) in the state dict,
and a resume with another horizon refused."""

from __future__ import annotations

import pytest
import torch

from lopt_port import VeLO
from lopt_port.state_layout import GLOBAL_STATE
from tests.conftest import _model_params, _set_grads


def test_resume_needs_the_same_horizon(weights):
    params = _model_params()
    opt = VeLO(params, weights, num_steps=20)
    _set_grads(params, 0)
    opt.step(loss=1.0)
    other = VeLO(params, weights, num_steps=30)
    with pytest.raises(ValueError, match="num_steps=20"):
        other.load_state_dict(opt.state_dict())
    assert not other.state  # untouched


def test_global_state_is_loss_buffer_and_iteration(weights):
    params = _model_params()
    opt = VeLO(params, weights, num_steps=20)
    for t in range(3):
        _set_grads(params, t)
        opt.step(loss=5.0)
    # kept in the first parameter's entry: every state key is a parameter
    assert set(opt.state_dict()["state"]) == set(range(len(params)))
    glob = opt.state_dict()["state"][0][GLOBAL_STATE]
    assert glob is not None and glob == opt.global_state
    assert int(glob["iteration"]) == 3 and glob["iteration"].device.type == "cpu"
    assert glob["num_steps"] == 20
    # a constant loss: every bias-corrected average equals that loss after 3 steps, up to the
    # float32 rounding of three moving-average updates (a few ulp: 1e-6 relative)
    corr = 1 - glob["loss_decays"].double() ** 3
    torch.testing.assert_close((glob["loss_means"].double() / corr).float(),
                               torch.full((10,), 5.0), rtol=1e-6, atol=0)
