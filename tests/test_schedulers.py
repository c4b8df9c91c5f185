"""torch's learning-rate schedulers drive every optimizer's ``lr`` (the multiplier of the
learned step): a step under a scheduler is the step of an optimizer whose ``lr`` was set to the
scheduler's value by hand. ``OneCycleLR`` needs ``cycle_momentum=False``: the optimizers have
no momentum hyperparameter to cycle (their momenta are learned)."""

from __future__ import annotations

import pytest
import torch

from tests.test_optimizer_conventions import OPTIMIZERS, _grads, _params

EAGER = sorted(name for name in OPTIMIZERS if name.endswith("-eager"))
SCHEDULERS = {
    "warmup": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1.0, total_steps=5, cycle_momentum=False),
}


def _step(opt):
    if opt.requires_loss:
        opt.step(loss=1.0)
    else:
        opt.step()


@pytest.mark.parametrize("schedule", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", EAGER)
def test_scheduled_lr_is_the_lr_of_each_step(name, schedule):
    make = OPTIMIZERS[name]
    scheduled, by_hand = _params(), _params()
    opt = make(scheduled)
    sched = SCHEDULERS[schedule](opt)
    manual = make(by_hand)
    for t in range(4):
        lr = opt.param_groups[0]["lr"]
        manual.param_groups[0]["lr"] = lr
        _grads(scheduled, t)
        _grads(by_hand, t)
        _step(opt)
        _step(manual)
        sched.step()
        for a, b in zip(scheduled, by_hand, strict=True):
            assert torch.equal(a, b), (t, lr)
    assert len({g["lr"] for g in manual.param_groups}) == 1


def test_one_cycle_with_momentum_cycling_names_the_option():
    opt = OPTIMIZERS["velo-eager"](_params())
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=5)


@pytest.mark.parametrize("name", EAGER)
def test_every_step_reads_the_scheduled_lr(name):
    """A schedule of 1, 0, 1: the zero step leaves every parameter exactly as it was (the
    state still advances), the others move it; an optimizer that kept its first lr would move
    it at every step."""
    params = _params()
    opt = OPTIMIZERS[name](params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t == 1 else 1.0)
    for t in range(3):
        before = [p.clone() for p in params]
        _grads(params, t)
        _step(opt)
        sched.step()
        moved = [not torch.equal(a, b) for a, b in zip(before, params, strict=True)]
        assert (not any(moved)) if t == 1 else any(moved), (t, moved)
