"""The step preamble every optimizer shares (``LearnedOptimizer._begin_step``): the loss given
positionally is the loss given by keyword, and the ways to get it wrong are refused by name."""

from __future__ import annotations

import pytest
import torch

from lopt_port.optimizer import LearnedOptimizer
from tests.test_optimizer_conventions import OPTIMIZERS, _grads, _params


@pytest.fixture(params=sorted(OPTIMIZERS))
def make(request):
    return OPTIMIZERS[request.param]


def test_every_optimizer_shares_the_base_and_none_derives_from_another():
    import lopt_port
    classes = [lopt_port.SmallFCLOpt, lopt_port.MuLO, lopt_port.VeLO, lopt_port.Celo,
               lopt_port.CeloAdam]
    for cls in classes:
        assert issubclass(cls, LearnedOptimizer)
        assert not any(issubclass(cls, other) for other in classes if other is not cls), cls


@pytest.mark.parametrize("loss", [torch.tensor(1.5), 1.5], ids=["tensor", "float"])
def test_positional_loss_is_the_keyword_loss(make, loss):
    runs = []
    for positional in (True, False):
        params = _params()
        opt = make(params)
        for t in range(3):
            _grads(params, t)
            returned = opt.step(loss) if positional else opt.step(loss=loss)
            assert returned is None  # the closure's value; there is no closure
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_loss_given_twice_or_of_a_wrong_type_is_refused(make):
    params = _params()
    opt = make(params)
    _grads(params, 0)
    with pytest.raises(TypeError, match="given twice"):
        opt.step(1.0, loss=1.0)
    with pytest.raises(TypeError, match="closure, or the loss"):
        opt.step("1.0")
    assert all(not opt.state[p] for p in params)  # refused before any state was made


def test_closure_value_is_the_loss_and_is_returned(make):
    params = _params()
    opt = make(params)
    _grads(params, 0)
    assert opt.step(lambda: torch.tensor(0.75)).item() == 0.75
