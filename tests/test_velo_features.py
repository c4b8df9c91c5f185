"""lopt_port.VeLO's per-tensor features: only tensors with gradients enter them, and chunked
computation of large tensors matches one pass."""

from __future__ import annotations

import torch

from lopt_port import VeLO
from tests.conftest import _model_params, _set_grads


def test_lstm_sees_only_tensors_with_gradients(weights):
    """A parameter without a gradient changes nothing for the others (not even the max-mix
    across tensors) and keeps its own LSTM state for when it gets one."""
    params = _model_params()
    alone = [p.clone() for p in params[:2]]
    opt = VeLO(params, weights, num_steps=20)
    opt_alone = VeLO(alone, weights, num_steps=20)
    for t in range(3):
        _set_grads(params, t)
        params[2].grad = None
        for p, q in zip(alone, params[:2], strict=True):
            p.grad = q.grad.clone()
        opt.step(loss=1.0)
        opt_alone.step(loss=1.0)
    assert all(torch.equal(a, b) for a, b in zip(alone, params[:2], strict=True))
    assert params[2] not in opt.state


def test_chunked_features_match_one_pass(weights, monkeypatch):
    """Large tensors take two passes over chunks (sums of squares in float64, then features
    and MLP); the result equals the one-pass computation up to the normalizer's summation
    order."""
    import lopt_port.velo_mlp_rule as velo_module

    def run():
        params = _model_params()
        opt = VeLO(params, weights, num_steps=20)
        for t in range(3):
            _set_grads(params, t)
            opt.step(loss=2.0)
        return params

    one_pass = run()
    monkeypatch.setattr(velo_module, "VELO_CHUNK_ELEMENTS", 7)  # rows of 5..8 elements
    chunked = run()
    for a, b in zip(one_pass, chunked, strict=True):
        assert not torch.equal(a, torch.zeros_like(a))
        # mean of squares in float32 (one pass) vs float64 (chunks): a few ulp in each
        # normalizer, ~1e-7 relative in the step, far below one ulp of the params here
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
