"""lopt_port.VeLO's options: weight decay (prefab and decoupled), the horizon's limit,
use_bugged_next_lstm_state and ff_mult."""

from __future__ import annotations

import pytest
import torch

from lopt_port import VeLO, WeightsError
from tests.conftest import _model_params, _set_grads


def test_prefab_weight_decay_is_gradient_and_loss_terms(weights):
    """weight_decay=wd equals feeding g + wd*p and loss + wd*sum(p^2) by hand."""
    wd = 0.1
    a, b = _model_params(), _model_params()
    opt_a = VeLO(a, weights, num_steps=20, weight_decay=wd)
    opt_b = VeLO(b, weights, num_steps=20)
    for t in range(4):
        _set_grads(a, t)
        _set_grads(b, t)
        loss = torch.tensor(2.0 / (t + 1))
        extra = sum(wd * torch.sum(p * p) for p in b)
        for p in b:
            p.grad = p.grad + wd * p
        opt_a.step(loss=loss)
        opt_b.step(loss=loss + extra)
        for p, q in zip(a, b, strict=True):
            # the same float32 operations in the same order (sum of per-tensor terms)
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_decoupled_weight_decay_scales_params_before_the_step(weights):
    wd, lr = 0.1, 0.5
    a, b = _model_params(), _model_params()
    opt_a = VeLO(a, weights, num_steps=20, weight_decay=wd, decoupled_weight_decay=True, lr=lr)
    opt_b = VeLO(b, weights, num_steps=20, lr=lr)
    _set_grads(a, 0)
    _set_grads(b, 0)
    before = [p.clone() for p in b]
    opt_a.step(loss=1.0)
    opt_b.step(loss=1.0)
    for p, q, p0 in zip(a, b, before, strict=True):
        # p0*(1 - lr*wd) - lr*step vs p0 - lr*step: the decay term alone, to one rounding
        torch.testing.assert_close(p, q - lr * wd * p0, rtol=0, atol=1e-6)


def test_horizon_above_prefab_limit_is_refused(weights):
    with pytest.raises(ValueError, match="average gradients over 2 steps"):
        VeLO(_model_params(), weights, num_steps=150_001)
    VeLO(_model_params(), weights, num_steps=150_001, max_training_steps=200_000)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            VeLO(_model_params(), weights, num_steps=bad)


def test_bugged_next_lstm_state_keeps_the_initial_state(weights):
    params = _model_params()
    opt = VeLO(params, weights, num_steps=20, hparams={"use_bugged_next_lstm_state": True})
    init = weights.state_dict["lstm_init_state.hidden"].reshape(-1)
    for t in range(2):
        _set_grads(params, t)
        opt.step(loss=1.0)
    assert all(torch.equal(opt.state[p]["lstm_hidden"], init) for p in params)
    normal = VeLO(params, weights, num_steps=20)
    _set_grads(params, 0)
    normal.step(loss=1.0)
    assert not torch.equal(normal.state[params[0]]["lstm_hidden"], init)


def test_ff_mult_scales_the_interpolated_weights(weights):
    """The Celo authors' HyperV2 argument: ``ff_mult * mean_k(...)``, upstream's 100 by
    default; the product is the same one, so 100 * (weights at ff_mult=1) is bit-identical."""
    assert VeLO(_model_params(), weights, num_steps=20).hparams["ff_mult"] == 100.0
    ff = {}
    for mult in (100.0, 1.0):
        params = _model_params()
        _set_grads(params, 0)
        opt = VeLO(params, weights, num_steps=20, hparams={"ff_mult": mult}, fused=False)
        with opt.capture_intermediates() as cap:
            opt.step(loss=1.0)
        ff[mult] = cap["tensors"][params[0]]["ff_params"]
    for name, value in ff[1.0].items():
        assert torch.equal(ff[100.0][name], 100.0 * value), name
    with pytest.raises(WeightsError, match="ff_mult must be a float"):
        VeLO(_model_params(), weights, num_steps=20, hparams={"ff_mult": "x"})
