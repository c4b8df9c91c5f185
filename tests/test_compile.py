"""``torch.compile(opt.step, fullgraph=True)`` for every optimizer's eager path (issue 18,
item 5): one compilation for all steps, and parameters within a stated bound of the uncompiled
eager run (docs/optimizers.md, "torch.compile").

Each case compiles one step with inductor (5-30 s on this 2-core machine with an empty
inductor cache): those are ``slow``; the refusal of ``fused=True`` is not.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import converters
from lopt_port import Celo, CeloAdam, MuLO, SmallFCLOpt, VeLO, extension
from lopt_port.optimizer import LearnedOptimizer
from lopt_port.weights import LoadedWeights
from tests.conftest import checkpoint_dir

#: A scalar, a vector, a matrix (factored statistics) and a conv weight (rank 4, factored).
SHAPES = ((), (7,), (6, 5), (4, 3, 3, 3))
STEPS = 6
#: ``|compiled - eager| <= BOUND * |eager - initial|`` per tensor (max norms). Inductor sums
#: the whole-tensor reductions (the features' second moments, the factored row and column
#: means, the LSTM inputs' means) in another order and fuses elementwise chains, so the
#: float32 results differ in the last bits; through the MLP and the LSTM that is a relative
#: error of the step, not of the parameter. Measured over 6 steps (torch 2.13, this 2-core
#: AVX-512 CPU): at most 1.9e-5 of the distance moved (VeLO's conv weight; small_fc_lopt 6e-6,
#: Celo 3e-6, μLO 7e-6, Celo-Adam 8e-7), each tensor's parameters equal bit for bit in most
#: steps. 1e-4 leaves 5x that; a real fault (a step count off by one, a stale state, a
#: skipped update) is of the order of the distance moved itself.
BOUND = 1e-4


@functools.cache
def _weights(name: str) -> LoadedWeights:
    c = converters.convert(checkpoint_dir(name))
    return LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


#: name -> (builder of the optimizer for ``(params, fused)``, how a step of the optimizer is
#: taken with the loss tensor (``(optimizer, its step, loss)``), the compiled copy's
#: ``fused``). The calls cover ``step()`` (no loss: small_fc_lopt and μLO do not use it), the
#: loss positionally, as ``loss=``, and handed over by ``observe_loss`` before ``step()``. The
#: compiled small_fc_lopt has ``fused=None``, which under compilation takes the eager path.
CASES: dict[str, tuple[Callable[[list[torch.Tensor], bool | None], LearnedOptimizer],
                       Callable[[LearnedOptimizer, Callable[..., Any], torch.Tensor], Any],
                       bool | None]] = {
    "small_fc_lopt": (lambda ps, fused: SmallFCLOpt(ps, _weights("small_fc_h32_sm0p01"),
                                                     fused=fused),
                      lambda opt, step, loss: step(), None),
    "mulo": (lambda ps, fused: MuLO(ps, _weights("mulo_h32_sm0p01"), default_scale=0.5,
                                    fused=fused),
             lambda opt, step, loss: step(), False),
    # num_steps below STEPS: the eager run warns past the horizon, the compiled one does not.
    "velo": (lambda ps, fused: VeLO(ps, _weights("velo_small"), num_steps=4, fused=fused),
             lambda opt, step, loss: step(loss), False),
    "celo": (lambda ps, fused: Celo(ps, _weights("celo"), num_steps=10, fused=fused),
             lambda opt, step, loss: step(loss=loss), False),
    "celo_adam": (lambda ps, fused: CeloAdam(ps, _weights("celo_adam"), num_steps=10,
                                             fused=fused),
                  lambda opt, step, loss: (opt.observe_loss(loss), step())[1], False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_matches_eager_and_compiles_once(name: str) -> None:
    build, call, compiled_fused = CASES[name]
    torch._dynamo.reset()
    eager_params, compiled_params = _params(), _params()
    initial = [p.clone() for p in eager_params]
    eager = build(eager_params, False)
    compiled = build(compiled_params, compiled_fused)
    counter = CompileCounterWithBackend("inductor")
    cstep = torch.compile(compiled.step, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as eager_warnings:
        warnings.simplefilter("always")
        for i in range(STEPS):
            for pe, pc in zip(eager_params, compiled_params, strict=True):
                pe.grad = torch.randn(pe.shape, generator=g)
                pc.grad = pe.grad.clone()
            loss = torch.tensor(2.0 / (i + 1))
            call(eager, eager.step, loss)
            with warnings.catch_warnings(record=True) as compiled_warnings:
                warnings.simplefilter("always")
                assert call(compiled, cstep, loss) is None
            assert not [w for w in compiled_warnings if "past num_steps" in str(w.message)]
            assert counter.frame_count == 1, f"recompiled at step {i + 1}"
    past = [w for w in eager_warnings if "past num_steps" in str(w.message)]
    assert len(past) == (1 if name == "velo" else 0)
    for shape, p0, pe, pc in zip(SHAPES, initial, eager_params, compiled_params, strict=True):
        moved = (pe - p0).abs().max().item()
        assert moved > 0, shape
        assert (pc - pe).abs().max().item() <= BOUND * moved, shape
    if compiled.requires_loss:
        assert compiled.global_state["iteration"].item() == STEPS
    else:
        assert all(compiled.state[p]["step"].item() == STEPS for p in compiled_params)


def test_compiled_step_refuses_fused_true() -> None:
    """The kernels cannot be traced: ``fused=True`` under compilation fails with the step's
    message (dynamo reports it as ``Unsupported``), it does not fall back silently."""
    try:
        extension.load_backend()
    except extension.ExtensionUnavailable as e:
        pytest.skip(f"no fused kernels to refuse here (they cannot be built: {e})")
    torch._dynamo.reset()
    params = _params()
    opt = SmallFCLOpt(params, _weights("small_fc_h32_sm0p01"), fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(torch._dynamo.exc.Unsupported,
                       match=r"fused=True cannot run under torch\.compile"):
        torch.compile(opt.step, fullgraph=True)()
