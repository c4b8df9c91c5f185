"""SmallFCLOpt behaviour beyond the golden cases: variants, layouts, architectures, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lopt_port import SmallFCLOpt, WeightsError
from lopt_port import small_fc_lopt_config as cfg
from lopt_port.state_layout import factored_dims

# (d1, d0) measured on the project's machine (upstream-spec section 0 and golden README);
# only non-tie shapes and ties whose result does not depend on the sort's stability.
SPEC_TABLE = {(10, 10): (0, 1), (784, 32): (1, 0), (32, 784): (0, 1), (3, 3, 64, 32): (3, 2),
              (1, 7): (0, 1), (7, 1): (1, 0), (4, 1, 1): (2, 0)}


@pytest.mark.parametrize("shape, dims", SPEC_TABLE.items())
def test_factored_dims_table(shape, dims):
    assert factored_dims(shape) == dims


@pytest.mark.parametrize("shape", [(6, 6, 3, 3), (64, 64, 3, 3), (3, 3, 64, 64), (5, 5, 1, 1)])
def test_tie_break_modes(shape):
    order = np.argsort(shape)
    assert factored_dims(shape) == (int(order[-2]), int(order[-1]))
    stable = np.argsort(shape, kind="stable")
    assert factored_dims(shape, "stable") == (int(stable[-2]), int(stable[-1]))
    assert factored_dims((5,)) is None and factored_dims(()) is None


def test_tie_break_is_kept_in_state(small_fc_weights):
    p = torch.randn(6, 6, 3, 3)
    opt = SmallFCLOpt([p], small_fc_weights, tie_break="stable")
    p.grad = torch.randn_like(p)
    opt.step()
    stable = np.argsort(p.shape, kind="stable")
    assert opt.state[p]["factored_dims"] == (int(stable[-2]), int(stable[-1]))


def _one_step(weights, p, g, **kw):
    p = p.clone()
    opt = SmallFCLOpt([p], weights, **kw)
    p.grad = g.clone()
    with opt.capture_intermediates() as cap:
        opt.step()
    return p, cap[p]


def test_variant_changes_only_nonfactored_fac_mom_mult(small_fc_weights):
    g = torch.Generator().manual_seed(0)
    vec, gv = torch.randn(9, generator=g), torch.randn(9, generator=g)
    _, head = _one_step(small_fc_weights, vec, gv)
    _, wheel = _one_step(small_fc_weights, vec, gv, variant="pypi-0.0.1")
    diff = (head["features_raw"] - wheel["features_raw"]).abs().amax(dim=0)
    assert torch.all(diff[:25] == 0) and torch.all(diff[25:] > 0)
    # the wheel's column: m * v**-0.5 recomputed from the recorded m (cols 2-4) and v (13-15);
    # pow(v, -0.5) and the multiply may each round differently by an ulp: 1e-6 relative.
    raw = wheel["features_raw"]
    torch.testing.assert_close(raw[:, 25:28], raw[:, 2:5] * raw[:, 13:16] ** -0.5,
                               rtol=1e-6, atol=0)
    mat, gm = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    a, _ = _one_step(small_fc_weights, mat, gm)
    b, _ = _one_step(small_fc_weights, mat, gm, variant="pypi-0.0.1")
    assert torch.equal(a, b)


def test_layout_policy_transpose(small_fc_weights):
    """Factored dims come from the tensor as stored: a non-square matrix and its transpose get
    transposed updates; a square one does not (row and column roles swap)."""
    g = torch.Generator().manual_seed(1)
    w, gw = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    _, a = _one_step(small_fc_weights, w, gw)
    _, b = _one_step(small_fc_weights, w.t().contiguous(), gw.t().contiguous())
    # identical math, only reduction order differs: a few float32 ulps of the update scale
    torch.testing.assert_close(b["update"], a["update"].t(), rtol=0,
                               atol=1e-5 * a["update"].abs().max().item())
    s, gs = torch.randn(6, 6, generator=g) * torch.logspace(-2, 2, 6), torch.randn(6, 6,
                                                                                generator=g)
    gs = gs * torch.logspace(-2, 2, 6)
    _, c = _one_step(small_fc_weights, s, gs)
    _, d = _one_step(small_fc_weights, s.t().contiguous(), gs.t().contiguous())
    assert (d["update"] - c["update"].t()).abs().max() > 1e-3 * c["update"].abs().max()


def _random_weights(hidden_size, hidden_layers, seed=0):
    hp = cfg.normalize_hparams({**cfg.UPSTREAM_DEFAULTS, "hidden_size": hidden_size,
                                "hidden_layers": hidden_layers, "step_mult": 0.01})
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) * 0.3
          for k, shape in cfg.state_dict_shapes(hp).items()}
    return sd, hp


@pytest.mark.parametrize("hidden_size, hidden_layers", [(8, 0), (8, 1), (5, 3), (32, 2)])
def test_any_architecture_mlp(hidden_size, hidden_layers):
    sd, hp = _random_weights(hidden_size, hidden_layers)
    p, g = torch.randn(7, 3), torch.randn(7, 3)
    new_p, cap = _one_step(sd, p, g, hparams=hp)
    x = cap["mlp_input"].reshape(-1, 39).double()
    for i in range(hidden_layers + 1):
        x = x @ sd[f"mlp.{i}.weight"].double().t() + sd[f"mlp.{i}.bias"].double()
        if i < hidden_layers:
            x = x.clamp_min(0)
    # float32 MLP vs a float64 recomputation from the same inputs: float32 accumulation over
    # at most 39 terms of O(1), ~1e-6 relative; 1e-5 both ways.
    torch.testing.assert_close(cap["mlp_output"].reshape(-1, 2).double(), x, rtol=1e-5,
                               atol=1e-5)
    step = x[:, 0] * torch.exp(x[:, 1] * hp["exp_mult"]) * hp["step_mult"]
    # The applied step p - new_p carries the rounding of new_p (an ulp of |p| ~ 1, 1.2e-7)
    # on steps of ~1e-3: 1e-4 relative plus 1e-7 absolute.
    torch.testing.assert_close((p - new_p).double().reshape(-1), step, rtol=1e-4, atol=1e-7)


def test_normalized_features_have_unit_second_moment(small_fc_weights):
    p, g = torch.randn(9, 11), torch.randn(9, 11)
    _, cap = _one_step(small_fc_weights, p, g)
    ms = cap["mlp_input"][..., :28].square().mean(dim=(0, 1))
    raw_ms = cap["features_raw"].square().mean(dim=(0, 1))
    # mean(x^2 / (eps + m)) = m / (eps + m) exactly; float32 means over 99 elements: 1e-5.
    torch.testing.assert_close(ms, raw_ms / (raw_ms + 1e-5), rtol=1e-5, atol=0)


def test_bare_state_dict_needs_hparams():
    sd, hp = _random_weights(8, 1)
    with pytest.raises(WeightsError, match="exp_mult, step_mult"):
        SmallFCLOpt([torch.zeros(2)], sd)
    with pytest.raises(WeightsError, match="hidden_size=4 contradicts"):
        SmallFCLOpt([torch.zeros(2)], sd, hparams={**hp, "hidden_size": 4})
    bad = dict(sd)
    bad["mlp.1.weight"] = torch.zeros(2, 7)
    with pytest.raises(WeightsError, match=r"mlp.1.weight: expected shape \(2, 8\), found"):
        SmallFCLOpt([torch.zeros(2)], bad, hparams=hp)
    extra = {**sd, "surprise": torch.zeros(1)}
    with pytest.raises(WeightsError, match="unexpected surprise"):
        SmallFCLOpt([torch.zeros(2)], extra, hparams=hp)


def test_argument_errors(small_fc_weights, tmp_path):
    with pytest.raises(ValueError, match="lr"):
        SmallFCLOpt([torch.zeros(2)], small_fc_weights, lr=-1.0)
    with pytest.raises(ValueError, match="tie_break"):
        SmallFCLOpt([torch.zeros(2)], small_fc_weights, tie_break="random")
    with pytest.raises(WeightsError, match="variant"):
        SmallFCLOpt([torch.zeros(2)], small_fc_weights, variant="2019")
    with pytest.raises(WeightsError, match="convert it first"):
        SmallFCLOpt([torch.zeros(2)], tmp_path)


def test_pt_and_safetensors_weights_give_identical_steps(tmp_path):
    import converters
    from tests.conftest import checkpoint_dir
    c = converters.convert(checkpoint_dir("small_fc_h32_default"))
    c.save(tmp_path / "w.pt", "pt")
    c.save(tmp_path / "w.safetensors")
    p, g = torch.randn(5, 4), torch.randn(5, 4)
    a, _ = _one_step(str(tmp_path / "w.pt"), p, g)
    b, _ = _one_step(tmp_path / "w.safetensors", p, g)
    assert torch.equal(a, b)
    opt = SmallFCLOpt([torch.zeros(1)], tmp_path / "w.pt")
    assert opt.hparams["step_mult"] == 0.001 and opt.hparams["hidden_size"] == 32
