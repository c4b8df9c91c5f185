"""MuLO (μLO): the optimizer, its scales, and parity with the JAX reference (MuLOReference).

The weights are the bundled ``mulo_h32_sm0p01`` fixture: small_fc_h32_sm0p01's theta (μLO's
architecture, h = 32, step_mult 0.01) under ``MuAdafacMLPLOpt``.
"""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from lopt_port import MuLO, SmallFCLOpt, WeightsError, mup_scales
from lopt_port.mulo import mulo_grads
from lopt_port.optimizer import KIND_KEY
from lopt_port.weights import LoadedWeights
from parity import harness
from parity.harness_mulo import HIDDEN_LR_MULT, shape_scale
from parity.tasks import make_task
from tests.conftest import checkpoint_dir

SRC = checkpoint_dir("mulo_h32_sm0p01")
# The eager path, then the fused path on each backend of the kernels (LOPT_PORT_FUSED_BACKEND):
# the CPU backend and the CUDA kernels under emulation, at the same tolerances.
IMPLS_AND_BACKENDS = [("eager", "cpu"), ("fused", "cpu"),
                      pytest.param("fused", "cuda-emulated", marks=pytest.mark.emulated)]
BACKEND_IDS = ["eager", "fused", "fused-emulated"]


@pytest.fixture(scope="module")
def weights() -> LoadedWeights:
    c = converters.convert(SRC)
    return LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in [(8, 4), (5,), (), (6, 6, 3, 3), (7, 13)]]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3.0


@pytest.mark.parametrize("fused", [False, True])
def test_unit_scales_are_small_fc_lopt_bit_for_bit(weights, fused):
    """s = 1 multiplies exactly, and finite gradients pass nan_to_num unchanged."""
    a, b = _params(), _params()
    small = SmallFCLOpt(a, weights.state_dict, hparams=weights.hparams, fused=fused)
    mu = MuLO(b, weights, default_scale=1.0, fused=fused)
    for t in range(3):
        _set_grads(a, t)
        _set_grads(b, t)
        small.step()
        mu.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _sides(impl, clip_grad=False):
    sides = harness.build_sides(SRC, impl=impl)
    if clip_grad:
        conv = converters.convert(SRC)
        theta = conv.upstream_tree()["params"]
        sides = harness._mulo_sides(theta, LoadedWeights(conv.kind, conv.hparams,
                                                         conv.state_dict, conv.metadata),
                                    "builtin", impl, dict(sides.info), clip_grad=True)
    return sides


def _violations(records):
    return [f"{r.tensor} {r.quantity} {r.error:.3g}" for r in records if r.violates]


@pytest.mark.slow
@pytest.mark.gate
@pytest.mark.parametrize("impl, backend", IMPLS_AND_BACKENDS, ids=BACKEND_IDS)
def test_lockstep_with_mixed_scales(impl, backend, monkeypatch):
    monkeypatch.setenv("LOPT_PORT_FUSED_BACKEND", backend)
    """The harness's tolerances (parity/tolerances.py, each justified there) hold, on a task
    where hidden matrices of uneven fan-in get s = 4 / fan_in and the rest s = 1."""
    task = make_task(7, 4)
    scales = {tuple(v.shape): shape_scale(v.shape) for v in task.params.values()}
    assert len(set(scales.values())) >= 3  # several distinct hidden scales, and s = 1
    records = harness.lockstep(_sides(impl), task)
    assert records and _violations(records) == []


@pytest.mark.slow
@pytest.mark.gate
def test_a_wrong_scale_fails_the_gate():
    """s off by 0.1% moves a hidden tensor's update by 1e-3 of its scale: 100x the tolerance."""
    sides = _sides("eager")
    make = sides.make_torch

    def off(params, num_steps=1):
        opt = make(params, num_steps)
        for group in opt.param_groups:
            group["scales"] = [s * 1.001 for s in group["scales"]]
        return opt

    records = harness.lockstep(harness.Sides(sides.reference, off, sides.info),
                               make_task(7, 2))
    assert any(r.quantity == "update" for r in records if r.violates)


def _with_nonfinite(task, values):
    for t, grads in enumerate(task.grads):
        for i, g in enumerate(grads.values()):
            if g.size > 1:
                g.reshape(-1)[(t + i) % g.size] = values[(t + i) % len(values)]
    return task


@pytest.mark.slow
@pytest.mark.gate
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_nan_gradients_are_scrubbed_as_upstream(impl):
    """NaN -> 0 before the accumulators, on both sides: the same tolerances hold."""
    task = _with_nonfinite(make_task(3, 3), [np.nan])
    records = harness.lockstep(_sides(impl), task)
    assert _violations(records) == []


def test_nan_to_num_matches_jax_bit_for_bit(weights):
    """Both sides map NaN -> 0 and +-inf -> +-max of the gradient's dtype."""
    raw = np.array([np.nan, np.inf, -np.inf, 1.5, -0.0, 3e38], dtype=np.float32)
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.zeros(6, dtype=dtype)
        p.grad = torch.from_numpy(raw).to(dtype)
        (ours,) = mulo_grads([p.grad], clip_grad=False)
        theirs = jnp.nan_to_num(jnp.asarray(p.grad.float().numpy()).astype(
            jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32))
        assert np.array_equal(ours.float().numpy(), np.asarray(theirs, np.float32))


@pytest.mark.slow
@pytest.mark.gate
@pytest.mark.parametrize("impl, backend", IMPLS_AND_BACKENDS, ids=BACKEND_IDS)
def test_infinite_gradients_follow_the_reference(impl, backend, monkeypatch):
    monkeypatch.setenv("LOPT_PORT_FUSED_BACKEND", backend)
    """inf -> float32 max, whose square overflows the rms accumulator: both sides then agree
    on which elements become NaN and on every finite value (the same tolerances)."""
    task = _with_nonfinite(make_task(5, 2), [np.inf, -np.inf])
    sides = _sides(impl)
    names = list(task.params)
    params = {n: torch.tensor(task.params[n]) for n in names}
    opt = sides.make_torch(list(params.values()))
    ref_params = {n: jnp.asarray(v) for n, v in task.params.items()}
    ref_state = sides.reference.init(ref_params)
    for t in range(task.steps):
        for n, p in params.items():
            p.grad = torch.tensor(task.grads[t][n])
        opt.step()
        ref_params, ref_state, _ = sides.reference.step(
            ref_state, ref_params, {n: jnp.asarray(g) for n, g in task.grads[t].items()})
    for n, p in params.items():
        ours, theirs = p.numpy(), np.asarray(ref_params[n])
        assert np.array_equal(np.isnan(ours), np.isnan(theirs))
        finite = ~np.isnan(theirs)
        # 1e-5 relative: the gate's params tolerance (parity/tolerances.py)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=0,
                                   atol=1e-5 * max(1.0, np.abs(theirs[finite]).max(initial=0)))


@pytest.mark.slow
@pytest.mark.gate
@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("grad_mult", [1.0, 1e-4])
def test_clip_grad_matches_the_reference(impl, grad_mult):
    """Global-norm clipping to 1 (the task's gradients have norm >> 1, and << 1 at 1e-4)."""
    task = make_task(11, 3)
    for grads in task.grads:
        for n in grads:
            grads[n] = (grads[n] * np.float32(grad_mult)).astype(np.float32)
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in task.grads[1].values()))
    assert (norm > 1) == (grad_mult == 1.0)
    records = harness.lockstep(_sides(impl, clip_grad=True), task)
    assert _violations(records) == []


def test_clip_grad_changes_large_gradients_only(weights):
    for mult, same in ((10.0, False), (1e-4, True)):
        a, b = _params(), _params()
        clip = MuLO(a, weights, default_scale=0.5, clip_grad=True)
        plain = MuLO(b, weights, default_scale=0.5)
        for p, q in zip(a, b, strict=True):
            p.grad = torch.ones(p.shape) * mult
            q.grad = p.grad.clone()
        clip.step()
        plain.step()
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) == same


def test_every_parameter_needs_a_scale(weights):
    a, b = torch.zeros(3, 4), torch.zeros(5)
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(5,\)\)"):
        MuLO([a, b], weights, scales={a: 0.25})
    opt = MuLO([{"params": [a]}, {"params": [b], "scale": 0.5}], weights, scales={a: 0.1})
    assert opt.scale_of(a) == np.float32(0.1) and opt.scale_of(b) == 0.5
    assert list(opt.scales.values()) == [float(np.float32(0.1)), 0.5]
    assert opt.param_groups[0]["scales"] == [float(np.float32(0.1))]
    opt = MuLO([a, b], weights, scales={a: 0.25}, default_scale=1.0)
    assert opt.scales == {a: 0.25, b: 1.0}
    with pytest.raises(ValueError, match="not parameters"):
        MuLO([a], weights, scales={a: 1.0, b: 1.0})
    with pytest.raises(ValueError, match="finite and non-negative"):
        MuLO([a], weights, scales={a: -1.0})
    with pytest.raises(KeyError):
        opt.scale_of(torch.zeros(2))


def test_state_dict_records_scales_and_refuses_others(weights):
    params = _params()
    opt = MuLO(params, weights, scales={params[0]: 0.25}, default_scale=1.0)
    _set_grads(params, 0)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["param_groups"][0]["scales"][:2] == [0.25, 1.0]
    same = _params()
    MuLO(same, weights, scales={same[0]: 0.25}, default_scale=1.0).load_state_dict(saved)
    other = _params()
    fresh = MuLO(other, weights, default_scale=1.0)
    with pytest.raises(ValueError, match=r"saved s=0.25, this optimizer's s=1.0"):
        fresh.load_state_dict(saved)
    assert not fresh.state
    small = SmallFCLOpt(_params(), weights.state_dict, hparams=weights.hparams).state_dict()
    with pytest.raises(ValueError, match=r"saved by small_fc_lopt .*; MuLO \(kind 'mulo'\)"):
        fresh.load_state_dict(small)
    # A state saved before the kind was recorded (no lopt_kind) is told by its missing scales.
    unrecorded = {**small, "param_groups": [{k: v for k, v in g.items() if k != KIND_KEY}
                                            for g in small["param_groups"]]}
    with pytest.raises(ValueError, match="no scales"):
        fresh.load_state_dict(unrecorded)


def test_weights_and_hparams_are_checked(weights, small_fc_weights):
    p = torch.zeros(3)
    with pytest.raises(WeightsError, match="'small_fc_lopt', not 'mulo'"):
        MuLO([p], small_fc_weights, default_scale=1.0)
    hp = {k: v for k, v in weights.hparams.items() if k != "step_mult"}
    with pytest.raises(WeightsError, match=r"0\.01"):
        MuLO([p], LoadedWeights(None, {}, weights.state_dict), hparams=hp, default_scale=1.0)
    with pytest.raises(WeightsError, match="variant"):
        MuLO([p], weights, hparams={"variant": "pypi-0.0.1"}, default_scale=1.0)
    with pytest.raises(WeightsError, match="clip_grad"):
        MuLO([p], weights, hparams={"clip_grad": True}, default_scale=1.0)


def test_mup_scales_rule():
    """MuMLP([in, 16, 24, out]): hidden linear_1 and linear_2 weights get hidden_lr_mult /
    fan_in; input, readout and biases 1."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 24),
                                torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.Linear(24, 3))
    named = dict(model.named_parameters())
    s = mup_scales(model.named_parameters(), ["2.weight", "4.weight"], hidden_lr_mult=3.0)
    assert s[named["2.weight"]] == float(np.float32(3.0) / np.float32(16))
    assert s[named["4.weight"]] == float(np.float32(3.0) / np.float32(24))
    assert all(v == 1.0 for k, v in s.items()
               if k is not named["2.weight"] and k is not named["4.weight"])
    by_rule = mup_scales(named, lambda n, t: t.dim() == 2 and n not in ("0.weight", "5.weight"))
    assert by_rule[named["4.weight"]] == float(np.float32(1) / np.float32(24))
    with pytest.raises(ValueError, match="names no parameter"):
        mup_scales(named, ["2.wieght"])
    with pytest.raises(ValueError, match="2-D"):
        mup_scales(named, ["2.bias"])
    opt_scales = MuLO(model.parameters(), converters.convert(SRC).state_dict,
                      hparams=converters.convert(SRC).hparams, scales=s).scales
    assert opt_scales == s


def test_harness_scale_rule():
    assert shape_scale((7, 13)) == float(np.float32(HIDDEN_LR_MULT) / np.float32(13))
    assert shape_scale((1, 13)) == shape_scale((13,)) == shape_scale(()) == 1.0
    assert shape_scale((3, 3, 4, 4)) == 1.0
