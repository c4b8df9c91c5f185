"""One test matrix of torch.optim conventions, run for every optimizer lopt-port ships.

Add an optimizer by adding a factory to ``OPTIMIZERS``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import torch

from lopt_port import Celo, CeloAdam, MuLO, SmallFCLOpt, VeLO
from lopt_port.weights import LoadedWeights
from tests.conftest import checkpoint_dir


def _weights(name):
    import converters
    from lopt_port.weights import LoadedWeights
    if name not in _WEIGHTS:
        c = converters.convert(checkpoint_dir(name))
        _WEIGHTS[name] = LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)
    return _WEIGHTS[name]


_WEIGHTS = {}


def small_fc(params, fused=False, **kw):
    return SmallFCLOpt(params, _weights("small_fc_h32_sm0p01"), fused=fused, **kw)


def small_fc_fused(params, **kw):
    """Fused kernels wherever they run (float32 CPU), eager elsewhere."""
    return small_fc(params, fused=None, **kw)


def velo(params, fused=False, **kw):
    return VeLO(params, _weights("velo_small"), num_steps=50, fused=fused, **kw)


def velo_fused(params, **kw):
    """Fused kernels wherever they run (CPU), eager elsewhere."""
    return velo(params, fused=None, **kw)


def mulo(params, fused=False, **kw):
    """μLO with hidden-like scales: s = 1/4 for 2-D tensors, 1 for the rest."""
    params = list(params)
    tensors = [p for x in params for p in (x["params"] if isinstance(x, dict) else [x])]
    w = _weights("small_fc_h32_sm0p01")
    return MuLO(params, LoadedWeights("mulo", w.hparams, w.state_dict),
                scales={p: 0.25 if p.dim() == 2 else 1.0 for p in tensors}, fused=fused, **kw)


def mulo_fused(params, **kw):
    """Fused kernels wherever they run (float32 CPU), eager elsewhere."""
    return mulo(params, fused=None, **kw)


def celo(params, fused=False, **kw):
    return Celo(params, _weights("celo"), num_steps=50, fused=fused, **kw)


def celo_fused(params, **kw):
    """VeLO's fused kernels wherever they run (CPU), eager elsewhere."""
    return celo(params, fused=None, **kw)


def celo_adam(params, fused=False, **kw):
    return CeloAdam(params, _weights("celo_adam"), num_steps=50, fused=fused, **kw)


def celo_adam_fused(params, **kw):
    """The multi-tensor path (``fused=True``: ``fused=None`` picks it on CUDA only)."""
    return celo_adam(params, fused=True, **kw)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "celo-eager": celo, "celo-fused": celo_fused, "celo_adam-eager": celo_adam,
    "celo_adam-fused": celo_adam_fused,
    "small_fc_lopt-eager": small_fc, "small_fc_lopt-fused": small_fc_fused,
    "velo-eager": velo, "velo-fused": velo_fused, "mulo-eager": mulo, "mulo-fused": mulo_fused}
SHAPES = [(), (5,), (1, 7), (7, 1), (8, 4), (10, 10), (4, 1, 1), (6, 6, 3, 3), (3, 3, 4, 6)]


@pytest.fixture(params=sorted(OPTIMIZERS))
def make(request):
    return OPTIMIZERS[request.param]


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    """The fused factory falls back to eager for bf16/fp16/meta; tested in test_fused.py."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SmallFCLOpt: using the eager path")
        warnings.filterwarnings("ignore", message="VeLO: using the eager path")
        warnings.filterwarnings("ignore", message="MuLO: using the eager path")
        warnings.filterwarnings("ignore", message="Celo: using the eager path")
        yield


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in params:
        scale = torch.logspace(-2, 1, p.numel() or 1)[: p.numel()].reshape(p.shape)
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


def _step(opt, closure=None):
    """``opt.step``, with a loss for optimizers that need one (``requires_loss``)."""
    if getattr(opt, "requires_loss", False) and closure is None:
        return opt.step(loss=torch.tensor(2.0))
    return opt.step(closure)


def _steps_taken(opt, p):
    return float(opt.global_state["iteration"] if opt.requires_loss
                 else opt.state[p]["step"])


def _run(make, params, steps, start=0, opt=None):
    opt = opt or make(params)
    for t in range(start, start + steps):
        _grads(params, t)
        _step(opt)
    return opt


def test_none_grads_are_skipped(make):
    params = _params()
    opt = make(params)
    _grads(params, 0)
    params[3].grad = None
    before = params[3].clone()
    _step(opt)
    assert torch.equal(params[3], before) and not _has_param_state(opt, params[3])
    assert all(not torch.equal(p, q) for p, q in zip(params, _params(), strict=True)
               if p is not params[3])


def _has_param_state(opt, p) -> bool:
    """Whether ``p`` has per-parameter state (VeLO's step-wide state rides with its first
    parameter, so that parameter's entry may exist without it)."""
    return "momentum" in opt.state.get(p, {})


def test_frozen_params_in_a_model(make):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = make(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        _step(opt)
    assert torch.equal(model[0].weight, frozen)
    assert not _has_param_state(opt, model[0].weight)
    assert _has_param_state(opt, model[1].weight)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2)])
def test_zero_size_tensors(make, shape):
    p = torch.zeros(shape)
    q = torch.randn(3, 2)
    opt = make([p, q])
    for _ in range(2):
        p.grad, q.grad = torch.zeros(shape), torch.randn(3, 2)
        _step(opt)
    assert p.shape == shape and torch.isfinite(q).all()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values()
               if isinstance(v, torch.Tensor))


def test_scalar_params_keep_their_shape(make):
    p = torch.tensor(1.5)
    opt = make([p])
    p.grad = torch.tensor(0.3)
    _step(opt)
    assert p.shape == () and p.item() != 1.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_fp32_state(make, dtype):
    low = _params(dtype)
    ref = [p.float() for p in low]
    opt_low, opt_ref = make(low), make(ref)
    for t in range(3):
        _grads(low, t)
        for p, q in zip(ref, low, strict=True):
            p.grad = q.grad.float()
            # the fp32 run starts each step from the low-precision values, as the low run does
            p.copy_(q.float())
        _step(opt_low)
        _step(opt_ref)
        for p, q in zip(ref, low, strict=True):
            assert q.dtype == dtype
            # identical fp32 math on identical inputs; only the final rounding differs
            assert torch.equal(q, p.to(dtype))
    for p in low:
        for v in opt_low.state[p].values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(make, dtype):
    straight = _params(dtype)
    _run(make, straight, 10)
    first = _params(dtype)
    opt = _run(make, first, 5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.detach().clone() for p in first]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    _run(make, resumed, 5, start=5, opt=opt2)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    for b in resumed:
        st = opt2.state[b]
        assert st["momentum"].dtype == torch.float32
        assert _steps_taken(opt2, b) == 10


def test_load_state_dict_rejects_mismatched_state(make):
    params = _params()
    opt = _run(make, params, 1)
    sd = opt.state_dict()
    other = [torch.randn(s) for s in reversed(SHAPES)]
    fresh = make(other)
    with pytest.raises(ValueError, match="not fit"):
        fresh.load_state_dict(sd)
    assert not fresh.state  # nothing half-loaded
    with pytest.raises(ValueError, match="parameters"):
        make(other[:2]).load_state_dict(sd)


def test_step_on_meta_device(make):
    params = [torch.empty(s, device="meta") for s in [*SHAPES, (100_000, 50_000)]]
    opt = make(params)
    for p in params:
        p.grad = torch.empty(p.shape, device="meta")
    _step(opt)
    _step(opt)
    assert all(v.device.type == "meta" for p in params for k, v in opt.state[p].items()
               if isinstance(v, torch.Tensor) and k != "step")


def test_closure_and_return_value(make):
    w = torch.randn(4, 3, requires_grad=True)
    opt = make([w])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = _step(opt, closure)
    assert calls == [True] and isinstance(loss, torch.Tensor) and loss.requires_grad


def test_param_groups_lr(make):
    a, b, c = torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 4)
    b.copy_(a)
    c.copy_(a)
    opt = make([{"params": [a]}, {"params": [b], "lr": 2.0}, {"params": [c], "lr": 0.0}])
    g = torch.randn(8, 4)
    a0 = a.clone()
    for p in (a, b, c):
        p.grad = g.clone()
    _step(opt)
    assert torch.equal(c, a0)
    # lr multiplies the step exactly (x2 is exact in floating point); only the rounding of
    # p - step differs, at most one ulp of |p| < 4 each (2.4e-7), hence 1e-6.
    torch.testing.assert_close(a0 - b, 2 * (a0 - a), rtol=0, atol=1e-6)


def test_sparse_grads_are_refused(make):
    p = torch.randn(3, 3)
    opt = make([p])
    p.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        _step(opt)


@pytest.mark.parametrize("kind", ["small_fc_lopt", "velo", "mulo", "celo"])
def test_refused_fused_step_creates_no_state(kind):
    """``fused=True`` refuses a parameter the kernels cannot take (float64) before any state
    exists: the refused step leaves the optimizer as it was."""
    params = _params()
    params[3] = params[3].double()
    opt = OPTIMIZERS[f"{kind}-eager"](params, fused=True)  # the factory that takes fused=
    _grads(params, 0)
    with pytest.raises(RuntimeError, match=r"fused=True, but .*float64"):
        _step(opt)
    assert not opt.state
