"""A state saved before the optimizers shared one base class loads into today's optimizers and
continues to the same bits.

``tests/data/legacy_states.pt`` holds, per optimizer, the ``state_dict()`` after two eager steps
and the parameters the third step gives, computed by the code of commit 992ff35
(``tests/data/make_legacy_states.py``). Loading must restore every state tensor exactly, and
the third step taken now must give the same parameters bit for bit: the refactoring changed
the code's shape, not one operation.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.data import make_legacy_states as legacy

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_states.pt")


@pytest.fixture(scope="module")
def saved():
    return torch.load(PATH, weights_only=True)


def _flat(state_dict: dict) -> dict[str, object]:
    """Every leaf of a state dict's ``state``, by path."""
    out = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        else:
            out[prefix] = value

    walk("", state_dict["state"])
    return out


@pytest.mark.parametrize("name", sorted(legacy.CASES))
def test_legacy_state_loads_and_continues_bit_for_bit(saved, name):
    import converters
    import lopt_port
    from lopt_port.weights import LoadedWeights

    case = saved[name]
    cls_name, folder, options = legacy.CASES[name]
    c = converters.convert(os.path.join(legacy.CHECKPOINTS, folder))
    weights = LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)
    params = [p.clone() for p in case["params"]]
    opt = getattr(lopt_port, cls_name)(params, weights, fused=False, **options)
    opt.load_state_dict(case["state_dict"])
    before, now = _flat(case["state_dict"]), _flat(opt.state_dict())
    assert sorted(before) == sorted(now)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == now[key].dtype and torch.equal(value, now[key]), key
        else:
            assert tuple(value) == tuple(now[key]) if isinstance(value, (list, tuple)) \
                else value == now[key], key
    for p, g in zip(params, legacy.tensors(102), strict=True):
        p.grad = g
    opt.step(loss=1.0)
    for i, (ours, theirs) in enumerate(zip(params, case["after"], strict=True)):
        assert torch.equal(ours, theirs), (name, i, (ours - theirs).abs().max())
