"""Conversion: mapping, strictness, provenance metadata, formats, byte-identical round trips."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import msgpack
import numpy as np
import pytest
import torch

import converters
from converters import CheckpointError, atomic, flax_msgpack
from lopt_port.weights import WeightsError, load_weights
from tests.conftest import SMALL_FC_CHECKPOINTS, checkpoint_dir


def _params_bytes(name: str) -> bytes:
    with open(os.path.join(checkpoint_dir(name), "params"), "rb") as f:
        return f.read()


def _write_ckpt(folder, root: dict, config: str | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params"), "wb") as f:
        f.write(flax_msgpack.encode(root))
    if config is not None:
        with open(os.path.join(folder, "config.gin"), "w") as f:
            f.write(config)
    return str(folder)


def _golden_root(name="small_fc_h32_sm0p01"):
    tree, _ = flax_msgpack.read_file(os.path.join(checkpoint_dir(name), "params"))
    return tree


def _golden_config(name="small_fc_h32_sm0p01"):
    with open(os.path.join(checkpoint_dir(name), "config.gin")) as f:
        return f.read()


@pytest.mark.parametrize("name", SMALL_FC_CHECKPOINTS)
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_is_byte_identical(tmp_path, name, fmt):
    c = converters.convert(checkpoint_dir(name))
    weights = tmp_path / f"w.{fmt}"
    c.save(weights, fmt)
    back = converters.convert(weights)
    back.save(tmp_path / "up", "upstream")
    assert (tmp_path / "up" / "params").read_bytes() == _params_bytes(name)
    assert (tmp_path / "up" / "config.gin").read_text() == _golden_config(name)


def test_load_upstream_api():
    ckpt = converters.load_upstream(checkpoint_dir("small_fc_h32_sm0p01"))
    assert ckpt.kind == "small_fc_lopt"
    assert ckpt.hparams["step_mult"] == 0.01 and ckpt.hparams["hidden_size"] == 32
    assert ckpt.gen_id == "f6ae9433d40c6180e9322da6fff5e930" and ckpt.step == 7
    assert ckpt.tree["nn"]["~"]["w0"].shape == (39, 32)
    assert ckpt.reencodes_exactly


def test_mapping_transposes_and_names(small_fc_weights):
    ckpt = converters.load_upstream(checkpoint_dir("small_fc_h32_sm0p01"))
    sd = small_fc_weights.state_dict
    net = ckpt.tree["nn"]["~"]
    for i in range(3):
        np.testing.assert_array_equal(sd[f"mlp.{i}.weight"].numpy(), net[f"w{i}"].T)
        np.testing.assert_array_equal(sd[f"mlp.{i}.bias"].numpy(), net[f"b{i}"])
    np.testing.assert_array_equal(sd["momentum_decay_offsets"].numpy(),
                                  ckpt.tree["momentum_decays"])
    assert list(sd) == ["momentum_decay_offsets", "rms_decay_offsets", "adafactor_decay_offsets",
                        "mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias",
                        "mlp.2.weight", "mlp.2.bias"]


def test_safetensors_metadata(tmp_path):
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    c.save(tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    meta = loaded.metadata
    assert meta["format"] == "lopt-port-weights" and meta["format_version"] == "1"
    assert meta["kind"] == "small_fc_lopt" and loaded.kind == "small_fc_lopt"
    assert json.loads(meta["hparams"])["step_mult"] == 0.01
    assert meta["source_file"] == "params"
    assert meta["source_sha256"] == hashlib.sha256(_params_bytes("small_fc_h32_sm0p01")).hexdigest()
    assert json.loads(meta["upstream_gen_id"]) == "f6ae9433d40c6180e9322da6fff5e930"
    assert json.loads(meta["upstream_step"]) == 7
    assert meta["lopt_port_version"] == "0.1.0"
    assert "run_train.lopt = @AdafacMLPLOpt()" in meta["upstream_config_gin"]


def test_pt_loads_with_weights_only(tmp_path):
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    c.save(tmp_path / "w.pt", "pt")
    sd = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(sd) == set(c.state_dict)
    for k, v in sd.items():
        assert torch.equal(v, c.state_dict[k])
    assert sd._metadata["kind"] == "small_fc_lopt"


def test_tuple_root_and_array_step_round_trip(tmp_path):
    root = _golden_root()
    tup = {"0": root["params"], "1": "gen", "2": np.asarray(5620, dtype=np.int32)}
    folder = _write_ckpt(tmp_path / "ck", tup, _golden_config())
    c = converters.convert(folder)
    assert json.loads(c.metadata["upstream_step"]) == 5620
    c.save(tmp_path / "w.safetensors")
    converters.convert(tmp_path / "w.safetensors").save(tmp_path / "up", "upstream")
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "ck" / "params").read_bytes()


def test_separate_scalar_layout_matches_matrix_layout(tmp_path):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(39, 3)).astype(np.float32)
    b0 = rng.normal(size=(3,)).astype(np.float32)
    w1 = rng.normal(size=(3, 2)).astype(np.float32)
    b1 = rng.normal(size=(2,)).astype(np.float32)
    offsets = {k: rng.uniform(-0.2, 0.2, size=(n,)).astype(np.float32)
               for k, n in [("adafactor_decays", 3), ("momentum_decays", 3), ("rms_decays", 1)]}
    net = {}
    for i, (w, b) in enumerate([(w0, b0), (w1, b1)]):
        for a in range(w.shape[0]):
            for o in range(w.shape[1]):
                net[f"w{i}_{a}_{o}"] = np.asarray(w[a, o])
        for o in range(b.shape[0]):
            net[f"b{i}_{o}"] = np.asarray(b[o])
    theta = {**offsets, "nn": {"~": dict(sorted(net.items()))}}
    folder = _write_ckpt(tmp_path / "sep", {"params": dict(sorted(theta.items())),
                                            "gen_id": "", "step": 0})
    c = converters.convert(folder, upstream_defaults=True)
    assert c.hparams["make_separate_weights"] and not c.hparams["concat_weights"]
    assert c.hparams["hidden_size"] == 3 and c.hparams["hidden_layers"] == 1
    np.testing.assert_array_equal(c.state_dict["mlp.0.weight"].numpy(), w0.T)
    np.testing.assert_array_equal(c.state_dict["mlp.1.bias"].numpy(), b1)
    c.save(tmp_path / "w.safetensors")
    converters.convert(tmp_path / "w.safetensors").save(tmp_path / "up", "upstream")
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "sep" / "params").read_bytes()


def test_strict_missing_unexpected_and_shape(tmp_path):
    root = _golden_root()
    del root["params"]["nn"]["~"]["b1"]
    root["params"]["nn"]["~"]["extra"] = np.zeros(3, np.float32)
    root["params"]["nn"]["~"]["w1"] = np.zeros((32, 31), np.float32)
    folder = _write_ckpt(tmp_path / "bad", root, _golden_config())
    with pytest.raises(CheckpointError) as info:
        converters.convert(folder)
    msg = str(info.value)
    assert "missing nn > ~ > b1 (32,)" in msg
    assert "unexpected nn > ~ > extra" in msg
    assert "nn > ~ > w1: expected shape (32, 32), found (32, 31)" in msg
    assert os.path.join("bad", "params") in msg


def test_config_contradicting_shapes(tmp_path):
    folder = _write_ckpt(tmp_path / "c", _golden_root(),
                         _golden_config().replace("hidden_size = 32", "hidden_size = 16"))
    with pytest.raises(CheckpointError, match="hidden_size=16 contradicts"):
        converters.convert(folder)


def test_unsupported_class_and_unknown_binding(tmp_path):
    folder = _write_ckpt(tmp_path / "a", _golden_root(),
                         _golden_config().replace("@AdafacMLPLOpt()", "@MLPLOpt()"))
    with pytest.raises(CheckpointError, match="does not support"):
        converters.convert(folder)
    folder = _write_ckpt(tmp_path / "b", _golden_root(),
                         _golden_config() + "AdafacMLPLOpt.new_knob = 3\n")
    with pytest.raises(CheckpointError, match="unknown small_fc_lopt hyperparameters: new_knob"):
        converters.convert(folder)


def test_without_config(tmp_path):
    folder = _write_ckpt(tmp_path / "nc", _golden_root())
    with pytest.raises(CheckpointError, match=r"cannot be read off the weights.*step_mult"):
        converters.convert(folder)
    c = converters.convert(folder, upstream_defaults=True)
    assert c.kind == "small_fc_lopt" and c.hparams["step_mult"] == 0.001
    assert c.hparams["hidden_size"] == 32
    c = converters.convert(folder, kind="small_fc_lopt", upstream_defaults=True, step_mult=0.01)
    assert c.hparams["step_mult"] == 0.01
    assert "upstream_config_gin" not in c.metadata
    c.save(tmp_path / "up", "upstream")
    assert (tmp_path / "up" / "params").read_bytes() == (tmp_path / "nc" / "params").read_bytes()
    assert "AdafacMLPLOpt.step_mult = 0.01" in (tmp_path / "up" / "config.gin").read_text()


def test_unknown_root_layout(tmp_path):
    folder = _write_ckpt(tmp_path / "r", {"theta": _golden_root()["params"]})
    with pytest.raises(CheckpointError, match="root keys"):
        converters.convert(folder)


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    # The files are written in full under temporary names; the final rename fails.
    with monkeypatch.context() as m:
        m.setattr(atomic, "_move_noreplace", disk_full)
        with pytest.raises(CheckpointError, match="disk full"):
            c.save(tmp_path / "w.safetensors")
        with pytest.raises(CheckpointError, match="disk full"):
            c.save(tmp_path / "hf", "hf")
    monkeypatch.setattr(type(c), "upstream_config_text", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        c.save(tmp_path / "up", "upstream")
    assert os.listdir(tmp_path) == []


def test_overwrite_protection(tmp_path):
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    c.save(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="output exists"):
        c.save(tmp_path / "w.safetensors")
    c.save(tmp_path / "w.safetensors", overwrite=True)
    c.save(tmp_path / "up", "upstream")
    with pytest.raises(CheckpointError, match="output exists"):
        c.save(tmp_path / "up", "upstream")
    c.save(tmp_path / "up", "upstream", overwrite=True)
    assert sorted(os.listdir(tmp_path / "up")) == ["config.gin", "params"]


def test_weights_format_version_checked(tmp_path):
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    c.metadata["format_version"] = "99"
    c.save(tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="format_version '99' is not supported"):
        load_weights(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="format_version"):
        converters.convert(tmp_path / "w.safetensors")


def test_weights_kind_mismatch_and_corrupt_file(tmp_path):
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    c.save(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="not 'velo'"):
        converters.convert(tmp_path / "w.safetensors", kind="velo")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        converters.convert(tmp_path / "bad.safetensors")
    shutil.copy(tmp_path / "w.safetensors", tmp_path / "copy.safetensors")
    assert converters.convert(tmp_path / "copy.safetensors").kind == "small_fc_lopt"


def test_msgpack_not_even_a_checkpoint(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "params").write_bytes(msgpack.packb({"params": 3, "gen_id": "",
                                                           "step": 0}))
    with pytest.raises(CheckpointError, match="theta is not a map"):
        converters.convert(tmp_path / "x")
    with pytest.raises(CheckpointError, match="no such file"):
        converters.convert(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"no 'params' or 'theta\.state' file"):
        converters.convert(tmp_path)


def test_bundled_files_match_documented_sha256():
    readme = os.path.join(os.path.dirname(checkpoint_dir("x")), "README.md")
    with open(readme) as f:
        listed = [line.split() for line in f if len(line.split()) == 2
                  and len(line.split()[0]) == 64]
    root = os.path.dirname(readme)
    bundled = {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
               for f in files if f != "README.md"}
    assert {rel for _, rel in listed} == bundled  # every bundled file is listed, no more
    for digest, rel in listed:
        with open(os.path.join(os.path.dirname(readme), rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, rel
