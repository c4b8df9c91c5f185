"""``opt.last_step_stats()``: per-group diagnostics of the last tracked step, for every
optimizer and path (``lopt_port.step_stats``)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_optimizer_conventions import (
    OPTIMIZERS,
    _grads,
    _params,
    _quiet_fallback_warnings,  # noqa: F401 (autouse fixture)
    _step,
    velo,
)


def _groups(params):
    """Two groups; the last parameter of each gets no gradient."""
    return [{"params": params[:5]}, {"params": params[5:], "lr": 0.5}]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_stats_describe_the_step_and_change_nothing(name):
    make = OPTIMIZERS[name]
    runs = []
    for tracked in (False, True):
        params = _params()
        opt = make(_groups(params))
        opt.track_step_stats = tracked
        for t in range(3):
            _grads(params, t)
            params[4].grad = params[-1].grad = None
            before = [p.detach().clone() for p in params]
            _step(opt)
        runs.append(params)
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)  # tracking adds copies, never arithmetic to the step
    stats = opt.last_step_stats()
    assert len(stats) == 2
    for group, entry in zip(opt.param_groups, stats, strict=True):
        rms = entry["update_rms"]
        assert rms.dtype == torch.float32 and rms.shape == (len(group["params"]),)
        for i, p in enumerate(group["params"]):
            b = before[next(j for j, q in enumerate(params) if q is p)]
            # float64 reference: float32's norm accumulates in its own order, which moves
            # the RMS by a few ulps of float32 (2e-7 relative each); 1e-5 is ample and still
            # catches a wrong parameter, group or scaling (those are off by orders more).
            expect = (p.double() - b.double()).norm() / math.sqrt(max(p.numel(), 1))
            assert float(rms[i]) == pytest.approx(float(expect), rel=1e-5, abs=1e-12)
        assert float(rms[-1]) == 0.0  # no gradient: not updated
        if opt.requires_loss:
            scale = entry["step_scale"]
            assert scale.shape == (len(group["params"]),)
            assert math.isnan(float(scale[-1])) and not torch.isnan(scale[:-1]).any()
            assert entry["loss_features"].dim() == 1 and entry["loss_features"].numel() > 0
        else:
            assert set(entry) == {"update_rms"}


def test_velo_stats_are_the_networks_own_values():
    """``step_scale`` is the ``lr_mult`` and ``loss_features`` the features that the step's
    own intermediates hold, bit for bit."""
    params = _params()
    opt = velo(params)
    opt.track_step_stats = True
    for t in range(2):
        _grads(params, t)
        with opt.capture_intermediates() as cap:
            _step(opt)
    (entry,) = opt.last_step_stats()
    assert torch.equal(entry["step_scale"], cap["step"]["lr_mult"])
    assert torch.equal(entry["loss_features"], cap["step"]["loss_features"])


def test_untracked_optimizer_says_how_to_track():
    params = _params()
    opt = velo(params)
    _grads(params, 0)
    _step(opt)
    with pytest.raises(RuntimeError, match="track_step_stats = True"):
        opt.last_step_stats()
    opt.track_step_stats = True
    _grads(params, 1)
    _step(opt)
    first = opt.last_step_stats()
    opt.track_step_stats = False
    _grads(params, 2)
    _step(opt)
    assert opt.last_step_stats() is first  # the last tracked step's, kept
