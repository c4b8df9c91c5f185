"""Values (issue 19, item 2): hyperparameter ranges on every path in, complex and sparse
tensors, and diagnostics that name the file and the optimizer the user chose."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import converters
from converters.cli import main
from converters.errors import CheckpointError
from lopt_port import Celo, CeloAdam, MuLO, SmallFCLOpt, VeLO, celo_config, velo_config
from lopt_port import small_fc_lopt_config as small_fc_config
from lopt_port.optimizer import COMPLEX_REASON, KIND_KEY
from lopt_port.small_fc_lopt_fused import layout_unsupported_reason
from lopt_port.value_rules import RULES, check_hparams
from lopt_port.weights import LoadedWeights, WeightsError, state_dict_with_metadata
from tests.conftest import CHECKPOINTS, checkpoint_dir
from tests.test_optimizer_conventions import OPTIMIZERS, _weights

SMALL_FC = checkpoint_dir("small_fc_h32_default")


def _params() -> list[torch.Tensor]:
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def _mulo_weights(**hparams: object) -> LoadedWeights:
    w = _weights("small_fc_h32_sm0p01")
    return LoadedWeights("mulo", {**w.hparams, **hparams}, w.state_dict)


# ------------------------------------------------------------------------ hyperparameters
def test_rules_name_only_known_hyperparameters() -> None:
    known = {
        "small_fc_lopt": set(small_fc_config.UPSTREAM_DEFAULTS),
        "mulo": set(small_fc_config.UPSTREAM_DEFAULTS),
        "velo": {*velo_config.UPSTREAM_DEFAULTS, *velo_config.EXTENSION_DEFAULTS},
        "celo": set(celo_config.DEFAULTS["celo"]),
        "celo_adam": set(celo_config.DEFAULTS["celo_adam"]),
    }
    assert set(RULES) == set(known)
    for kind, rules in RULES.items():
        assert set(rules) <= known[kind], kind


@pytest.mark.parametrize(("setting", "allowed"), [
    ("initial_rms_decays=(1.5,)", "in [0, 1)"),
    ("initial_momentum_decays=(-0.5, 0.5, 0.9)", "in [0, 1)"),
    ("initial_adafactor_decays=(0.1, 1.0, 0.9)", "in [0, 1)"),
    ("step_mult=1e999", "finite float > 0"),
    ("step_mult=-0.01", "finite float > 0"),
    ("exp_mult=0", "finite float > 0"),
    # an integer beyond float's range was an OverflowError, "internal error", exit 1
    # (found by tests/test_fuzz_inputs.py)
    (f"step_mult={'1' * 400}", "too large for a float"),
    (f"initial_rms_decays=({'9' * 400},)", "too large for a float"),
    # one number where the weights have three offsets was a TypeError, exit 1 (fuzzing)
    ("initial_momentum_decays=0.9", "has 1 value(s) but the weights have 3"),
])
def test_cli_refuses_out_of_range_set(tmp_path, capsys, setting: str, allowed: str) -> None:
    out = tmp_path / "w.safetensors"
    assert main([SMALL_FC, "--set", setting, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert setting.split("=")[0] in err and allowed in err
    assert not out.exists()


@pytest.mark.parametrize(("binding", "bad", "message"), [
    ("AdafacMLPLOpt.exp_mult = 0.001", "AdafacMLPLOpt.exp_mult = -0.001",
     r"exp_mult=-0.001 \(must be a finite float > 0\)"),
    ("AdafacMLPLOpt.initial_adafactor_decays = (0.9, 0.99, 0.999)",
     "AdafacMLPLOpt.initial_adafactor_decays = (0.9, 0.99, 1.5)",
     r"initial_adafactor_decays=\[0.9, 0.99, 1.5\] \(each decay"),
])
def test_config_gin_bindings_are_checked(tmp_path, binding: str, bad: str,
                                         message: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "params").write_bytes(Path(SMALL_FC, "params").read_bytes())
    text = Path(SMALL_FC, "config.gin").read_text(encoding="utf-8")
    assert binding in text
    (folder / "config.gin").write_text(text.replace(binding, bad), encoding="utf-8")
    with pytest.raises(CheckpointError, match=message) as info:
        converters.convert(folder)
    assert info.value.file is not None and info.value.file.endswith("config.gin")


@pytest.mark.parametrize(("folder", "kind", "hparams", "names"), [
    ("velo_small", "velo", {"step_mult": math.inf}, ("VeLO", "step_mult=inf")),
    ("velo_small", "velo", {"ff_mult": -1.0}, ("VeLO", "ff_mult")),
    ("celo", "celo", {"exp_mult": math.nan}, ("Celo", "exp_mult=nan")),
    ("celo_adam", "celo_adam", {"initial_epsilon": 0.0}, ("Celo-Adam", "initial_epsilon")),
    ("mulo_h32_sm0p01", "mulo", {"step_mult": math.nan}, ("μLO", "step_mult=nan")),
])
def test_conversion_refuses_out_of_range(folder: str, kind: str, hparams: dict,
                                         names: tuple[str, ...]) -> None:
    with pytest.raises(CheckpointError) as info:
        converters.convert(checkpoint_dir(folder), kind, **hparams)
    assert all(name in str(info.value) for name in names)


@pytest.mark.parametrize("folder", sorted(
    f for f in os.listdir(CHECKPOINTS)
    if os.path.isdir(os.path.join(CHECKPOINTS, f)) and f != "golden"))
def test_bundled_checkpoints_pass_the_rules(folder: str) -> None:
    converted = converters.convert(checkpoint_dir(folder))
    check_hparams(converted.kind, converted.hparams)  # raises where a rule is broken
    assert converted.state_dict


def test_nan_in_file_metadata_is_refused(tmp_path) -> None:
    w = _weights("small_fc_h32_sm0p01")
    meta = {**w.metadata, "hparams": json.dumps({**w.hparams, "step_mult": math.nan})}
    path = tmp_path / "nan.pt"
    torch.save(state_dict_with_metadata(w.state_dict, meta), path)
    with pytest.raises(WeightsError, match=r"step_mult=nan \(must be a finite float > 0\)"):
        SmallFCLOpt(_params(), str(path))
    assert main([str(path), "-o", str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("build", "message"), [
    (lambda p: SmallFCLOpt(p, _weights("small_fc_h32_sm0p01"),
                           hparams={"initial_momentum_decays": [-0.5, 0.5, 0.9]}),
     r"initial_momentum_decays=\[-0.5, 0.5, 0.9\] \(each decay"),
    (lambda p: MuLO(p, _mulo_weights(), hparams={"step_mult": 1e999}), r"μLO .*step_mult=inf"),
    (lambda p: VeLO(p, _weights("velo_small"), num_steps=10, hparams={"exp_mult": 0.0}),
     r"VeLO .*exp_mult=0.0"),
    (lambda p: Celo(p, _weights("celo"), num_steps=10, hparams={"initial_rms_decays": [1.0]}),
     r"Celo .*initial_rms_decays=\[1.0\]"),
    (lambda p: CeloAdam(p, _weights("celo_adam"), num_steps=10,
                        hparams={"initial_epsilon": -1e-8}),
     r"Celo-Adam .*initial_epsilon=-1e-08"),
])
def test_constructor_overrides_are_checked(build, message: str) -> None:
    with pytest.raises(WeightsError, match=message):
        build(_params())


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
@pytest.mark.parametrize("option", ["lr", "weight_decay"])
def test_options_must_be_finite_and_non_negative(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{option} must be a finite, non-negative float"):
        VeLO(_params(), _weights("velo_small"), num_steps=10, **{option: value})


# ------------------------------------------------------------------- complex and sparse
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_complex_parameters_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="complex parameters are not supported") as info:
        OPTIMIZERS[name]([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    assert "complex64" in str(info.value)


def test_add_param_group_refuses_complex_and_sparse_and_changes_nothing() -> None:
    opt = SmallFCLOpt(_params(), _weights("small_fc_h32_sm0p01"))
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex128)]})
    assert COMPLEX_REASON in str(info.value)
    with pytest.raises(ValueError, match="sparse parameters"):
        opt.add_param_group({"params": iter([torch.zeros(2, 2).to_sparse()])})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.complex64),
                                 torch.zeros(3).to_sparse()])
def test_weights_with_complex_or_sparse_tensors_are_refused(tmp_path, bad) -> None:
    w = _weights("small_fc_h32_sm0p01")
    sd = {**w.state_dict, "momentum_decay_offsets": bad}
    with pytest.raises(WeightsError, match="'momentum_decay_offsets' is"):
        SmallFCLOpt(_params(), LoadedWeights(w.kind, w.hparams, sd))
    path = tmp_path / "bad.pt"
    torch.save(state_dict_with_metadata(sd, w.metadata), path)
    with pytest.raises(CheckpointError, match="'momentum_decay_offsets' is"):
        converters.convert(path)


def test_fused_dtype_reason_names_the_dtype() -> None:
    reason = layout_unsupported_reason(torch.zeros(2, dtype=torch.float64))
    assert reason is not None and "torch.float64" in reason


# ---------------------------------------------------------------------------- diagnostics
def test_pickle_errors_name_the_file(tmp_path) -> None:
    # FlatMap({1: 2}): a haiku mapping with a non-string key, refused by the unpickler.
    path = tmp_path / "global_step1.pickle"
    path.write_bytes(b"chaiku._src.data_structures\nFlatMap\n(}(I1\nI2\nutR.")
    with pytest.raises(CheckpointError) as info:
        converters.convert(path, "mulo", step_mult=0.01)
    assert info.value.file == str(path)
    assert str(path) in str(info.value) and "non-string keys" in str(info.value)


def test_mulo_errors_name_mulo() -> None:
    with pytest.raises(WeightsError, match="unknown μLO hyperparameters: bogus"):
        MuLO(_params(), _mulo_weights(), hparams={"bogus": 1})
    w = _mulo_weights()
    partial = {k: v for k, v in w.state_dict.items() if k != "mlp.0.bias"}
    with pytest.raises(WeightsError, match="μLO weights do not match") as info:
        MuLO(_params(), LoadedWeights("mulo", w.hparams, partial))
    assert "small_fc" not in str(info.value)


def _stepped(opt: torch.optim.Optimizer) -> dict:
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def test_state_dict_loads_only_into_its_kind() -> None:
    w = _weights("small_fc_h32_sm0p01")
    mulo_state = _stepped(MuLO(_params(), _mulo_weights(), default_scale=1.0))
    small_state = _stepped(SmallFCLOpt(_params(), w))
    assert {g[KIND_KEY] for g in mulo_state["param_groups"]} == {"mulo"}
    with pytest.raises(ValueError, match=r"saved by μLO \(kind 'mulo'\); SmallFCLOpt"):
        SmallFCLOpt(_params(), w).load_state_dict(mulo_state)
    with pytest.raises(ValueError, match=r"saved by small_fc_lopt .*; MuLO"):
        MuLO(_params(), _mulo_weights(), default_scale=1.0).load_state_dict(small_state)
    same = SmallFCLOpt(_params(), w)
    same.load_state_dict(small_state)
    assert KIND_KEY not in same.param_groups[0]
    assert same.state_dict()["param_groups"][0][KIND_KEY] == "small_fc_lopt"


def test_state_dict_without_kind_still_loads() -> None:
    w = _weights("small_fc_h32_sm0p01")
    state = _stepped(SmallFCLOpt(_params(), w))
    old = {**state, "param_groups": [{k: v for k, v in g.items() if k != KIND_KEY}
                                     for g in state["param_groups"]]}
    fresh = SmallFCLOpt(_params(), w)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.state_dict()["state"][0]["step"], state["state"][0]["step"])
