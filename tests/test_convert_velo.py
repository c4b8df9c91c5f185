"""VeLO (HyperV2) conversion: mapping, config, encodings of lstm_init_state, no-config files."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import converters
from converters import CheckpointError, cli, flax_msgpack
from converters.velo import VELO as velo_mapping
from lopt_port import velo_config
from tests.conftest import SHARED_GOLDEN, checkpoint_dir

GOLDEN = os.path.join(SHARED_GOLDEN, "checkpoints")
needs_golden = pytest.mark.skipif(not os.path.isdir(GOLDEN),
                                  reason=f"golden checkpoints not present ({GOLDEN})")
SMALL = checkpoint_dir("velo_small")
FULL_PARAMS_BYTES = 9_282_564
NO_CONFIG_FLAGS = {"use_bugged_next_lstm_state": True, "use_bugged_loss_features": True}


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _root(folder=SMALL) -> dict:
    return flax_msgpack.read_file(os.path.join(folder, "params"))[0]


def _config(folder=SMALL) -> str:
    with open(os.path.join(folder, "config.gin")) as f:
        return f.read()


def _write_ckpt(folder, root: dict, config: str | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params"), "wb") as f:
        f.write(flax_msgpack.encode(root))
    if config is not None:
        with open(os.path.join(folder, "config.gin"), "w") as f:
            f.write(config)
    return str(folder)


def _round_trip(tmp_path, src: str, fmt: str = "safetensors") -> converters.Converted:
    """src -> weights file -> upstream folder; returns the weights-side conversion."""
    c = converters.convert(src, upstream_defaults=True)
    weights = tmp_path / f"w.{fmt}"
    c.save(weights, fmt)
    back = converters.convert(weights)
    back.save(tmp_path / "up", "upstream")
    return back


@needs_golden
@pytest.mark.parametrize("name", ["velo_small", "velo_full"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_golden_round_trip_is_byte_identical(tmp_path, name, fmt):
    src = os.path.join(GOLDEN, name)
    original = _read(os.path.join(src, "params"))
    if name == "velo_full":
        assert len(original) == FULL_PARAMS_BYTES
    c = converters.convert(src)
    assert c.kind == "velo" and c.metadata["upstream_roundtrip"] == "exact"
    c.save(tmp_path / f"w.{fmt}", fmt)
    back = converters.convert(tmp_path / f"w.{fmt}")
    assert back.hparams == c.hparams
    back.save(tmp_path / "up", "upstream")
    assert (tmp_path / "up" / "params").read_bytes() == original
    assert (tmp_path / "up" / "config.gin").read_text() == _config(src)


@needs_golden
def test_golden_full_hparams_and_size():
    ckpt = converters.load_upstream(os.path.join(GOLDEN, "velo_full"))
    hp = ckpt.hparams
    assert ckpt.kind == "velo" and ckpt.step == 5620
    assert (hp["lstm_hidden_size"], hp["param_inits"]) == (512, 256)
    assert hp["use_bugged_loss_features"] is False and hp["use_bugged_next_lstm_state"] is False
    shapes = velo_config.state_dict_shapes(hp)
    assert sum(math.prod(s) for s in shapes.values()) == 2_320_385
    assert shapes["rnn.lstm.weight"] == (2048, 1024) and shapes["ff.w0__13"] == (256, 3, 4)


def test_bundled_copy_matches_golden():
    if os.path.isdir(GOLDEN):
        assert _read(os.path.join(SMALL, "params")) == _read(
            os.path.join(GOLDEN, "velo_small", "params"))
    assert len(_read(os.path.join(SMALL, "params"))) == 52_632


def test_hparams_from_config_gin():
    ckpt = converters.load_upstream(SMALL)
    hp = ckpt.hparams
    assert ckpt.kind == "velo" and ckpt.gen_id == "da805cbfb99a9a1631040f317fea6561"
    assert ckpt.step == 7 and ckpt.reencodes_exactly
    assert list(hp) == [*velo_config.UPSTREAM_DEFAULTS, *velo_config.EXTENSION_DEFAULTS]
    assert hp["ff_mult"] == 100.0  # upstream's hard-coded interpolation multiplier
    assert hp["lstm_hidden_size"] == 32 and hp["param_inits"] == 8
    assert hp["ff_hidden_size"] == 4 and hp["ff_hidden_layers"] == 2
    assert hp["use_bugged_loss_features"] is False
    assert hp["use_bugged_next_lstm_state"] is False
    assert hp["initial_momentum_decays"] == [0.9, 0.99, 0.999]
    assert hp["initial_rms_decays"] == [0.999]
    assert hp["exp_mult"] == 0.001 and hp["step_mult"] == 0.001
    assert hp["clip_param_scale_amount"] is None and hp["rnn_state_decay"] == 0.0


def test_upstream_defaults_table():
    d = velo_config.UPSTREAM_DEFAULTS
    assert (d["lstm_hidden_size"], d["ff_hidden_size"], d["ff_hidden_layers"],
            d["param_inits"]) == (128, 4, 2, 64)
    assert d["use_bugged_loss_features"] is True and d["use_bugged_next_lstm_state"] is False
    assert d["initial_rms_decays"] == (0.999,) and d["reparam_decay"] == 10.0
    assert len(d) == 37
    assert velo_config.lstm_input_width(3, 1) == 30
    assert sum(velo_config.ff_input_widths(3, 1, 3)) == 30


def test_mapping_names_and_transposes():
    ckpt = converters.load_upstream(SMALL)
    sd = converters.convert(SMALL).state_dict
    theta = ckpt.tree
    assert list(sd) == list(velo_config.state_dict_shapes(ckpt.hparams))
    rnn = theta["rnn_params"]
    for module, name in [("linear", "dead_linear"), ("linear_1", "mix"), ("linear_2", "input"),
                         ("rnn/linear", "lstm"), ("rnn_to_controls", "controls"),
                         ("step_size", "step_size")]:
        np.testing.assert_array_equal(sd[f"rnn.{name}.weight"].numpy(), rnn[module]["w"].T)
        np.testing.assert_array_equal(sd[f"rnn.{name}.bias"].numpy(), rnn[module]["b"])
    for field in ("hidden", "cell"):
        np.testing.assert_array_equal(sd[f"lstm_init_state.{field}"].numpy(),
                                      theta["lstm_init_state"][field])
    for key, value in theta["ff_mod_stack"]["~"].items():
        np.testing.assert_array_equal(sd[f"ff.{key}"].numpy(), value)
    assert sd["rnn.lstm.weight"].shape == (128, 64) and sd["ff.w0__3"].shape == (8, 3, 4)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in sd.values())


def test_kind_told_apart_from_small_fc():
    small_fc = _root(checkpoint_dir("small_fc_h32_sm0p01"))["params"]
    assert velo_mapping.matches(_root()["params"]) and not velo_mapping.matches(small_fc)


def test_without_layout_rebuilds_the_same_bytes():
    c = converters.convert(SMALL)
    del c.metadata["upstream_layout"]
    assert c.upstream_bytes() == _read(os.path.join(SMALL, "params"))


def _with_lstm_state(node) -> dict:
    root = _root()
    theta = root["params"]
    theta["lstm_init_state"] = node(theta["lstm_init_state"])
    return root


def test_tuple_lstm_init_state_round_trips(tmp_path):
    root = _with_lstm_state(lambda s: {"0": s["hidden"], "1": s["cell"]})
    folder = _write_ckpt(tmp_path / "ck", root, _config())
    reference = converters.convert(SMALL).state_dict
    back = _round_trip(tmp_path, folder)
    for k, v in reference.items():
        assert torch.equal(back.state_dict[k], v), k
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "ck" / "params").read_bytes()


def test_flax_envelope_lstm_init_state_round_trips(tmp_path):
    root = _with_lstm_state(lambda s: {"name": "LSTMState",
                                       "fields": {"0": "hidden", "1": "cell"},
                                       "values": {"0": s["hidden"], "1": s["cell"]}})
    folder = _write_ckpt(tmp_path / "ck", root, _config())
    back = _round_trip(tmp_path, folder, "pt")
    np.testing.assert_array_equal(back.state_dict["lstm_init_state.cell"].numpy(),
                                  _root()["params"]["lstm_init_state"]["cell"])
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "ck" / "params").read_bytes()


def test_tilde_spelling_of_the_lstm_linear_round_trips(tmp_path):
    """upstream-spec 3.8 wrote the gate linear as ``rnn/~/linear``; every file examined (and
    current haiku) says ``rnn/linear`` (mulo-celo-spec 0). Both are read; the spelling read is
    written back."""
    root = _root()
    rnn = root["params"]["rnn_params"]
    rnn["rnn/~/linear"] = rnn.pop("rnn/linear")
    folder = _write_ckpt(tmp_path / "ck", root, _config())
    reference = converters.convert(SMALL).state_dict
    back = _round_trip(tmp_path, folder)
    for k, v in reference.items():
        assert torch.equal(back.state_dict[k], v), k
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "ck" / "params").read_bytes()


@pytest.mark.parametrize("node", [
    lambda s: {"hidden": s["hidden"], "1": s["cell"]},
    lambda s: {"name": "LSTMState", "fields": {"0": "cell", "1": "hidden"},
               "values": {"0": s["hidden"], "1": s["cell"]}},
    lambda s: s["hidden"],
], ids=["mixed", "envelope-fields", "array"])
def test_other_lstm_init_state_encodings_refused(tmp_path, node):
    folder = _write_ckpt(tmp_path / "ck", _with_lstm_state(node), _config())
    with pytest.raises(CheckpointError, match=r"expected the map \{hidden, cell\}") as info:
        converters.convert(folder)
    assert info.value.key_path == ("params", "lstm_init_state")
    assert info.value.file.endswith(os.path.join("ck", "params"))


def test_tuple_form_shape_error_names_the_key_read(tmp_path):
    root = _with_lstm_state(lambda s: {"0": s["hidden"][:, :31], "1": s["cell"]})
    folder = _write_ckpt(tmp_path / "ck", root, _config())
    with pytest.raises(CheckpointError,
                       match=r"lstm_init_state > 0: expected shape \(1, 32\), found \(1, 31\)"):
        converters.convert(folder)


def test_truncated_ff_leaf_is_named(tmp_path):
    root = _root()
    bank = root["params"]["ff_mod_stack"]["~"]
    bank["w0__5"] = bank["w0__5"][:, :2]
    del bank["b2"]
    folder = _write_ckpt(tmp_path / "ck", root, _config())
    with pytest.raises(CheckpointError) as info:
        converters.convert(folder)
    msg = str(info.value)
    assert "ff_mod_stack > ~ > w0__5: expected shape (8, 3, 4), found (8, 2, 4)" in msg
    assert "missing ff_mod_stack > ~ > b2 (8, 3)" in msg
    assert info.value.file.endswith(os.path.join("ck", "params"))
    assert info.value.key_path == ("params",)


def test_wrong_lstm_width_is_named(tmp_path):
    root = _root()
    root["params"]["rnn_params"]["linear_1"]["w"] = np.zeros((31, 32), np.float32)
    folder = _write_ckpt(tmp_path / "ck", root, _config())
    with pytest.raises(CheckpointError,
                       match=r"rnn_params > linear_1 > w: expected shape \(30, 32\), "
                             r"found \(31, 32\)"):
        converters.convert(folder)


def test_config_contradicting_shapes(tmp_path):
    folder = _write_ckpt(tmp_path / "h", _root(),
                         _config().replace("lstm_hidden_size = 32", "lstm_hidden_size = 16"))
    with pytest.raises(CheckpointError) as info:
        converters.convert(folder)
    assert ("lstm_hidden_size=16 contradicts the weights: rnn.input.bias has shape (32,), "
            "lstm_hidden_size=16 needs (16,)") in str(info.value)
    assert info.value.file.endswith("config.gin")
    folder = _write_ckpt(tmp_path / "k", _root(),
                         _config().replace("param_inits = 8", "param_inits = 16"))
    with pytest.raises(CheckpointError, match=r"param_inits=16 contradicts the weights: "
                                              r"rnn.controls.bias has shape \(8,\)"):
        converters.convert(folder)
    folder = _write_ckpt(tmp_path / "m", _root(), _config().replace(
        "initial_momentum_decays = (0.9, 0.99, 0.999)", "initial_momentum_decays = (0.9,)"))
    with pytest.raises(CheckpointError, match=r"ff.w0__3 has shape \(8, 3, 4\), "
                                              r"initial_momentum_decays=\[0.9\] needs \(8, 1, 4\)"):
        converters.convert(folder)
    folder = _write_ckpt(tmp_path / "l", _root(), _config().replace(
        "ff_hidden_layers = 2", "ff_hidden_layers = 3"))
    with pytest.raises(CheckpointError, match=r"has layers 0..2 .*, i.e. ff_hidden_layers=2"):
        converters.convert(folder)


@pytest.mark.parametrize("binding", [
    "with_g = False", "with_grad_clip_feat = False", "precondition_output = True",
    "constant_loss = True", "with_validation_feature_dim = True",
    "clip_param_scale_amount = 1.0", "param_scale_mult = False",
    "adafactor_accumulator = False", "mix_layers = False", "rnn_state_decay = 0.1",
])
def test_unsupported_flag_in_config_refused(tmp_path, binding):
    key, value = (s.strip() for s in binding.split("="))
    text = _config()
    default = velo_config.UPSTREAM_DEFAULTS[key]
    text = text.replace(f"HyperV2.{key} = {default!r}", f"HyperV2.{binding}")
    assert f"HyperV2.{binding}" in text
    folder = _write_ckpt(tmp_path / "ck", _root(), text)
    with pytest.raises(CheckpointError, match=f"HyperV2.{key}={value}.* is not supported") as info:
        converters.convert(folder)
    assert info.value.file.endswith("config.gin")


def test_unknown_binding_and_no_op_flags(tmp_path):
    folder = _write_ckpt(tmp_path / "a", _root(), _config() + "HyperV2.new_knob = 3\n")
    with pytest.raises(CheckpointError, match="unknown velo hyperparameters: new_knob"):
        converters.convert(folder)
    text = (_config().replace("HyperV2.validation_mode = False", "HyperV2.validation_mode = True")
            .replace("HyperV2.reparam_decay = 10.0", "HyperV2.reparam_decay = 3"))
    c = converters.convert(_write_ckpt(tmp_path / "b", _root(), text))
    assert c.hparams["validation_mode"] is True and c.hparams["reparam_decay"] == 3.0


def _tuple_ckpt(tmp_path, name="nc") -> str:
    root = _root()
    return _write_ckpt(tmp_path / name, {"0": root["params"], "1": "", "2": 0})


def test_no_config_tuple_root_needs_flags_or_opt_in(tmp_path):
    folder = _tuple_ckpt(tmp_path)
    with pytest.raises(CheckpointError) as info:
        converters.convert(folder)
    msg = str(info.value)
    assert "cannot be read off the weights" in msg and "use_bugged_next_lstm_state" in msg
    assert "use_bugged_loss_features" in msg and "opt in to upstream's defaults" in msg
    c = converters.convert(folder, upstream_defaults=True)
    assert c.kind == "velo"
    assert {k: c.hparams[k] for k in NO_CONFIG_FLAGS} == NO_CONFIG_FLAGS
    assert (c.hparams["lstm_hidden_size"], c.hparams["param_inits"]) == (32, 8)
    assert "upstream_config_gin" not in c.metadata
    c.save(tmp_path / "w.safetensors")
    back = converters.convert(tmp_path / "w.safetensors")
    assert back.hparams == c.hparams
    back.save(tmp_path / "up", "upstream")
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "nc" / "params").read_bytes()
    config = (tmp_path / "up" / "config.gin").read_text()
    assert "run_train.lopt = @HyperV2()" in config
    assert "HyperV2.use_bugged_next_lstm_state = True" in config
    assert "HyperV2.clip_param_scale_amount = None" in config
    assert converters.convert(tmp_path / "up").hparams == c.hparams


def test_no_config_explicit_flags(tmp_path):
    folder = _tuple_ckpt(tmp_path)
    c = converters.convert(folder, upstream_defaults=True, use_bugged_next_lstm_state=False)
    assert c.hparams["use_bugged_next_lstm_state"] is False
    assert c.hparams["use_bugged_loss_features"] is True
    explicit = {"exp_mult": 0.001, "step_mult": 0.001,
                "initial_momentum_decays": (0.9, 0.99, 0.999), "initial_rms_decays": (0.999,),
                "initial_adafactor_decays": (0.9, 0.99, 0.999),
                "use_bugged_next_lstm_state": True, "use_bugged_loss_features": False}
    c = converters.convert(folder, **explicit)
    assert c.hparams["use_bugged_loss_features"] is False
    with pytest.raises(CheckpointError, match="not given: step_mult"):
        converters.convert(folder, **{k: v for k, v in explicit.items() if k != "step_mult"})


def test_no_config_wrapper_root_takes_constructor_defaults(tmp_path):
    folder = _write_ckpt(tmp_path / "w", _root())
    c = converters.convert(folder, upstream_defaults=True)
    assert c.hparams["use_bugged_next_lstm_state"] is False
    assert c.hparams["use_bugged_loss_features"] is True


@pytest.mark.parametrize("depth, width, decays", [(1, 6, (2, 1, 2)), (3, 5, (3, 3, 1)),
                                                  (0, 4, (1, 1, 1))])
def test_generic_architecture_from_shapes(tmp_path, depth, width, decays):
    m, r, a = decays
    hp = velo_config.normalize_hparams({
        **velo_config.UPSTREAM_DEFAULTS, "lstm_hidden_size": 12, "param_inits": 5,
        "ff_hidden_size": width, "ff_hidden_layers": depth,
        "initial_momentum_decays": [0.9, 0.99, 0.999][:m],
        "initial_rms_decays": [0.999, 0.9999, 0.99999][:r],
        "initial_adafactor_decays": [0.9, 0.99, 0.999][:a]})
    rng = np.random.default_rng(depth)
    sd = {k: rng.normal(size=s).astype(np.float32)
          for k, s in velo_config.state_dict_shapes(hp).items()}
    assert sd["rnn.input.weight"].shape[1] == velo_config.lstm_input_width(m, r)
    theta: dict = {}
    for chain, value in velo_mapping.state_dict_to_leaves(sd, hp).items():
        node = theta
        for key in chain[:-1]:
            node = node.setdefault(key, {})
        node[chain[-1]] = value
    folder = _write_ckpt(tmp_path / "g", {"0": theta, "1": "", "2": 0})
    given = {k: hp[k] for k in ("initial_momentum_decays", "initial_rms_decays",
                                "initial_adafactor_decays")}
    c = converters.convert(folder, upstream_defaults=True, **given)
    assert (c.hparams["lstm_hidden_size"], c.hparams["param_inits"],
            c.hparams["ff_hidden_layers"]) == (12, 5, depth)
    if depth:
        assert c.hparams["ff_hidden_size"] == width
    for k, v in sd.items():
        np.testing.assert_array_equal(c.state_dict[k].numpy(), v)
    c.save(tmp_path / "up", "upstream")
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "g" / "params").read_bytes()
    if decays != (3, 1, 3):
        with pytest.raises(CheckpointError, match=r"contradicts the weights: ff\.w0__"):
            converters.convert(folder, upstream_defaults=True)


def test_state_dict_checks():
    c = converters.convert(SMALL)
    sd = dict(c.state_dict)
    velo_config.check_state_dict(sd, c.hparams, "sd")
    sd["rnn.mix.weight"] = torch.zeros(32, 29)
    sd["extra"] = torch.zeros(2)
    del sd["ff.b1"]
    with pytest.raises(ValueError) as info:
        velo_config.check_state_dict(sd, c.hparams, "sd")
    msg = str(info.value)
    assert "rnn.mix.weight: expected shape (32, 30), found (32, 29)" in msg
    assert "missing ff.b1 (8, 4)" in msg and "unexpected extra (2,)" in msg
    shapes = {k: tuple(v.shape) for k, v in c.state_dict.items()}
    assert velo_config.resolve_hparams({}, shapes, upstream_defaults=True)["param_inits"] == 8
    with pytest.raises(ValueError, match="not given: exp_mult"):
        velo_config.resolve_hparams({}, shapes)


def test_weights_without_metadata(tmp_path):
    from safetensors.torch import save_file
    c = converters.convert(SMALL)
    save_file(dict(c.state_dict), tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="no metadata"):
        converters.convert(tmp_path / "bare.safetensors")
    bare = converters.convert(tmp_path / "bare.safetensors", kind="velo",
                              upstream_defaults=True, use_bugged_loss_features=False)
    assert bare.hparams == c.hparams
    assert bare.upstream_tree()["params"].keys() == _root()["params"].keys()


def test_cli_converts_velo_small(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert cli.main([SMALL, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kind      velo" in text and "use_bugged_loss_features=False" in text
    assert "rnn.lstm.weight         (128, 64)" in text
    assert "33 tensors" in text
    assert max(len(line) for line in text.splitlines() if not line.startswith(
        ("source", "          from", "wrote"))) <= 100
    meta = json.loads(converters.convert(out).metadata["hparams"])
    assert meta["lstm_hidden_size"] == 32
    assert cli.main([str(out), "--format", "upstream", "-o", str(tmp_path / "up")]) == 0
    assert (tmp_path / "up" / "params").read_bytes() == _read(os.path.join(SMALL, "params"))


def test_cli_no_config_velo(tmp_path, capsys):
    folder = _tuple_ckpt(tmp_path)
    out = tmp_path / "w.safetensors"
    assert cli.main([folder, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "use_bugged_next_lstm_state" in err and err.count("\n") == 1
    assert not out.exists()
    assert cli.main([folder, "-o", str(out), "--upstream-defaults",
                     "--set", "use_bugged_loss_features=False"]) == 0
    text = capsys.readouterr().out
    assert "use_bugged_next_lstm_state=True" in text and "use_bugged_loss_features=False" in text
