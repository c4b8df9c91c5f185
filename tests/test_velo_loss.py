"""lopt_port.VeLO and the training loss: the forms ``step`` takes it in, the loss buffer's
decays against upstream's bits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lopt_port import VeLO
from lopt_port.loss_buffer import loss_buffer_decays
from parity.golden import load_case
from tests.conftest import CHECKPOINTS, _model_params, _set_grads


def test_loss_buffer_decays_match_upstream_bitwise():
    case = load_case(os.path.join(CHECKPOINTS, "golden", "velo_small__taskA.npz"))
    ours = loss_buffer_decays(int(case.data["state/step0/num_steps"]), bugged=False)
    assert np.array_equal(ours, case.data["state/step0/loss_buffer/decays"])
    assert np.array_equal(loss_buffer_decays(12345, bugged=True),
                          np.full(10, np.exp(np.float32(-0.1)), np.float32))


def test_loss_is_required_and_accepted_as_tensor_float_or_closure(weights):
    runs = []
    for how in ("tensor", "float", "closure"):
        params = _model_params()
        opt = VeLO(params, weights, num_steps=20)
        for t in range(3):
            _set_grads(params, t)
            loss = 3.0 - 0.5 * t
            if how == "tensor":
                opt.step(loss=torch.tensor(loss))
            elif how == "float":
                opt.step(loss=loss)
            else:
                assert opt.step(lambda loss=loss: torch.tensor(loss)) == loss
        runs.append(params)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
    params = _model_params()
    opt = VeLO(params, weights, num_steps=20)
    _set_grads(params, 0)
    with pytest.raises(RuntimeError, match="needs the training loss"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(2))
    # Every lr at 0 and no loss (torch.distributed.checkpoint's state initialization): the
    # state is created, nothing else changes.
    before = [p.clone() for p in params]
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all("momentum" in opt.state[p] for p in params)
    assert int(opt.global_state["iteration"]) == 0
    assert not opt.state[params[0]]["momentum"].any()
