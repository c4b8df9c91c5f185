"""How the loss reaches the optimizer when ``step()`` cannot take it, and the warnings that
keep a new user out of silent traps (``LearnedOptimizer``): ``observe_loss`` (alone, averaged
over gradient accumulation, under ``GradScaler``), the error that names the line to add, the
low-``lr`` warning and VeLO's past-horizon warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_optimizer_conventions import OPTIMIZERS, _grads, _params, celo, velo

NEEDS_LOSS = {name: make for name, make in OPTIMIZERS.items()
              if name.startswith(("velo", "celo"))}


def _run(make, losses_per_step, explicit):
    """Three steps; each step observes its losses (or passes their mean to step())."""
    params = _params()
    opt = make(params)
    for t, losses in enumerate(losses_per_step):
        _grads(params, t)
        if explicit:
            total = torch.tensor(losses[0])
            for value in losses[1:]:
                total = total + value
            opt.step(loss=total / len(losses))
        else:
            for value in losses:
                opt.observe_loss(torch.tensor(value))
            opt.step()
    return params


@pytest.mark.parametrize("name", sorted(NEEDS_LOSS))
def test_observed_losses_are_the_explicit_mean_bit_for_bit(name):
    # 0.1 + 0.2 + 0.7 in float32 is not 1.0 exactly: the order and precision of the mean show
    losses = [[2.0], [0.1, 0.2, 0.7], [1.5, 0.25]]
    a = _run(NEEDS_LOSS[name], losses, explicit=False)
    b = _run(NEEDS_LOSS[name], losses, explicit=True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", sorted(NEEDS_LOSS))
def test_grad_scaler_steps_with_the_observed_loss(name):
    """``scaler.step(opt)`` unchanged, with one line added: ``opt.observe_loss(loss)``."""
    runs = []
    for observe in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        opt = NEEDS_LOSS[name](model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        data = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(8, 6, generator=data)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            if observe:
                opt.observe_loss(loss)
                scaler.step(opt)
            else:
                scaler.step(opt, loss=loss.detach())
            scaler.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


def test_missing_loss_names_the_line_to_add_and_a_double_loss_is_refused():
    params = _params()
    opt = velo(params)
    _grads(params, 0)
    with pytest.raises(RuntimeError, match="needs the training loss") as refused:
        opt.step()
    # one line per loop: plain, GradScaler (and its wrappers), Hugging Face, Lightning
    for line in ("opt.step(loss)", "opt.observe_loss(loss)", "track_loss(model, opt)",
                 "LightningLossCallback()"):
        assert line in str(refused.value)
    opt.observe_loss(1.0)
    with pytest.raises(TypeError, match="also observed"):
        opt.step(loss=1.0)
    opt.step()  # the observed loss was kept by the refused step, and is used now
    assert int(opt.global_state["iteration"]) == 1
    with pytest.raises(ValueError, match="scalar"):
        opt.observe_loss(torch.ones(2))
    with pytest.raises(TypeError, match="tensor or a float"):
        opt.observe_loss("1.0")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_low_initial_lr_warns_once_and_only_then(name):
    make = OPTIMIZERS[name]
    with pytest.warns(UserWarning, match="multiplies the learned step") as caught:
        opt = make([{"params": [torch.zeros(3)], "lr": 1e-3},
                    {"params": [torch.zeros(2)], "lr": 2e-3}])
    assert sum("multiplies the learned step" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*multiplies the learned step")
        make([torch.zeros(3)])  # lr = 1.0
        make([torch.zeros(3)], lr=0.0)  # the zero-lr state creation of checkpoint loaders
        opt = make([torch.zeros(3)])
        # a warm-up scheduler sets a small lr later: that never warns
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.001)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


@pytest.mark.parametrize("make", [velo, celo], ids=["velo", "celo"])
def test_past_the_horizon_warns_once(make):
    params = _params()
    opt = make(params)
    horizon = opt.num_steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(horizon + 3):
            _grads(params, t)
            opt.step(loss=1.0)
            past = [w for w in caught if "past num_steps" in str(w.message)]
            assert len(past) == (1 if t >= horizon else 0), t
    assert f"step {horizon + 1} is past num_steps={horizon}" in str(past[0].message)


def test_shares_of_a_window_loss_are_summed_and_rules_do_not_mix():
    """``combine="sum"``: each value is a share of the window's loss (a loss normalized by
    the whole window's token count); the step takes their float32 sum, in call order."""
    shares = [0.1, 0.2, 0.7]
    runs = []
    for explicit in (True, False):
        params = _params()
        opt = velo(params)
        _grads(params, 0)
        if explicit:
            total = torch.tensor(shares[0])
            for value in shares[1:]:
                total = total + value
            opt.step(loss=total)
        else:
            for value in shares:
                opt.observe_loss(torch.tensor(value), combine="sum")
            opt.step()
        runs.append(params)
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)
    opt.observe_loss(1.0)
    with pytest.raises(ValueError, match="same step"):
        opt.observe_loss(1.0, combine="sum")
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        opt.observe_loss(1.0, combine="max")


def test_zero_grad_retires_the_losses_of_a_skipped_step():
    """A step that GradScaler skipped leaves its loss observed; the gradients it belonged to
    are cleared by zero_grad, and the next observation starts afresh. A zero_grad between
    forward and backward (the loss observed before it) keeps that loss for the step."""
    runs = []
    for skipped in (True, False):
        params = _params()
        opt = velo(params)
        if skipped:
            opt.observe_loss(100.0)  # the skipped step's loss
            opt.zero_grad()
        opt.observe_loss(2.0)
        opt.zero_grad()  # the forward-then-zero_grad-then-backward order
        _grads(params, 0)
        opt.step()
        runs.append(params)
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)
    explicit = _params()
    opt = velo(explicit)
    _grads(explicit, 0)
    opt.step(loss=2.0)
    for x, y in zip(runs[0], explicit, strict=True):
        assert torch.equal(x, y)


def test_an_observed_loss_comes_before_the_closure_value():
    """Lightning's closure returns the last micro-batch's loss divided for accumulation; the
    observed losses are the step's loss, and the closure's value is still what step()
    returns."""
    runs = []
    for observed in (True, False):
        params = _params()
        opt = velo(params)
        _grads(params, 0)
        if observed:
            opt.observe_loss(3.0)
            returned = opt.step(lambda: torch.tensor(0.5))
            assert float(returned) == 0.5
        else:
            opt.step(loss=3.0)
        runs.append(params)
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)
