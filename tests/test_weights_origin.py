"""Weights that say what they are: fixtures, releases, the released VeLO's layout, unknown."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch

import converters
from converters import cli, flax_msgpack
from converters.origin import VELO_RELEASE_BYTES, VELO_RELEASE_NOTE, velo_release_hparams
from lopt_port import WeightsError, from_pretrained, load_pretrained, velo_config
from lopt_port.provenance import KNOWN_SOURCES, NOTE_KEY, ORIGIN_KEY
from lopt_port.weights import LoadedWeights, safetensors_bytes
from tests.conftest import CHECKPOINTS, SHARED_GOLDEN, checkpoint_dir

ORIGINS = {"velo_small": "fixture", "small_fc_h32_sm0p01": "fixture",
           "small_fc_h32_default": "fixture", "mulo_h32_sm0p01": "fixture",
           "celo": "release", "celo_adam": "release"}
KWARGS = {"velo_small": {"num_steps": 20}, "celo": {"num_steps": 20}}
FIXTURE_TEXT = "TEST FIXTURE, NOT META-TRAINED"


def test_known_sources_are_the_documented_files():
    with open(os.path.join(CHECKPOINTS, "README.md")) as f:
        listed = {rel: digest for digest, rel in (line.split() for line in f
                  if len(line.split()) == 2 and len(line.split()[0]) == 64)}
    thetas = {rel: digest for rel, digest in listed.items()
              if rel.endswith(("/params", "/theta.state"))}
    assert {rel.split("/")[0] for rel in thetas} == set(ORIGINS)
    for rel, digest in thetas.items():
        assert KNOWN_SOURCES[digest][0] == ORIGINS[rel.split("/")[0]], rel
    others = set(KNOWN_SOURCES) - set(thetas.values())
    assert len(others) == 1 and KNOWN_SOURCES[others.pop()][0] == "fixture"  # velo_full
    velo_full = os.path.join(SHARED_GOLDEN, "checkpoints", "velo_full", "params")
    if os.path.isfile(velo_full):
        with open(velo_full, "rb") as f:
            assert KNOWN_SOURCES[hashlib.sha256(f.read()).hexdigest()][0] == "fixture"


def _fixture_warnings(build) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [w for w in caught if FIXTURE_TEXT in str(w.message)]


def _params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 7, generator=gen), torch.randn(4, generator=gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("name", sorted(ORIGINS))
def test_converted_files_record_their_origin(name, tmp_path):
    converted = converters.convert(checkpoint_dir(name))
    assert converted.metadata[ORIGIN_KEY] == ORIGINS[name]
    assert ("not meta-trained" if ORIGINS[name] == "fixture" else "meta-trained and released"
            ) in converted.metadata[NOTE_KEY]
    converted.save(tmp_path / "w.safetensors")
    converted.save(tmp_path / "hf", "hf")
    for saved in (tmp_path / "w.safetensors", tmp_path / "hf"):
        assert load_pretrained(saved).origin == ORIGINS[name]
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)[ORIGIN_KEY] == ORIGINS[name]


def test_fixture_weights_warn_exactly_once_naming_what_they_are(tmp_path):
    converters.convert(checkpoint_dir("velo_small")).save(tmp_path / "velo.safetensors")
    params = _params()
    built = []
    caught = _fixture_warnings(lambda: built.append(
        from_pretrained(str(tmp_path / "velo.safetensors"), params, num_steps=20)))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("VeLO: these weights are a TEST FIXTURE, NOT META-TRAINED")
    assert "velo_small" in message and "training with them will not work" in message
    assert caught[0].category is UserWarning and caught[0].filename == __file__
    assert built[0].weights_origin == "fixture"
    # Steps do not repeat it.
    assert _fixture_warnings(lambda: [built[0].step(loss=1.0) for _ in range(3)]) == []


@pytest.mark.parametrize("name", ["celo", "celo_adam"])
def test_releases_do_not_warn(name, tmp_path):
    converters.convert(checkpoint_dir(name)).save(tmp_path / "w.safetensors")
    built = []
    assert _fixture_warnings(lambda: built.append(
        from_pretrained(str(tmp_path / "w.safetensors"), _params(), num_steps=20))) == []
    assert built[0].weights_origin == "release"


def _unknown_velo(folder) -> str:
    """velo_small with another upstream step: same weights, a file no table knows."""
    shutil.copytree(checkpoint_dir("velo_small"), folder)
    root, _ = flax_msgpack.read_file(os.path.join(folder, "params"))
    root["step"] = 8
    with open(os.path.join(folder, "params"), "wb") as f:
        f.write(flax_msgpack.encode(root))
    return str(folder)


def test_unknown_weights_do_not_warn_and_a_declared_fixture_does(tmp_path, capsys):
    src = _unknown_velo(tmp_path / "ckpt")
    unknown = converters.convert(src)
    assert unknown.metadata[ORIGIN_KEY] == "unknown"
    built = []
    assert _fixture_warnings(lambda: built.append(from_pretrained(
        LoadedWeights(unknown.kind, unknown.hparams, unknown.state_dict, unknown.metadata),
        _params(), num_steps=20))) == []
    assert built[0].weights_origin == "unknown"
    out = tmp_path / "declared.safetensors"
    assert cli.main([src, "-o", str(out), "--origin", "fixture"]) == 0
    assert "origin    fixture: declared by the user" in capsys.readouterr().out
    assert len(_fixture_warnings(lambda: from_pretrained(str(out), _params(),
                                                         num_steps=20))) == 1
    # A declaration that contradicts a known sha256 is refused, naming what the file is.
    assert cli.main([checkpoint_dir("velo_small"), "-o", str(tmp_path / "x.safetensors"),
                     "--origin", "release"]) == 2
    assert "known fixture" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_files_written_before_the_field_still_load(tmp_path):
    converted = converters.convert(checkpoint_dir("velo_small"))
    old = {k: v for k, v in converted.metadata.items() if k not in (ORIGIN_KEY, NOTE_KEY)}
    old_file = tmp_path / "old.safetensors"
    old_file.write_bytes(safetensors_bytes(converted.state_dict, old))
    loaded = load_pretrained(str(old_file))
    assert ORIGIN_KEY not in loaded.metadata and loaded.kind == "velo"
    assert loaded.origin == "fixture"  # told from source_sha256
    assert len(_fixture_warnings(lambda: from_pretrained(loaded, _params(), num_steps=20))) == 1
    # Re-saving records the field; without a known source_sha256 the origin is unknown.
    assert converters.convert(old_file).metadata[ORIGIN_KEY] == "fixture"
    bare = {k: v for k, v in old.items() if k != "source_sha256"}
    bare_file = tmp_path / "bare.safetensors"
    bare_file.write_bytes(safetensors_bytes(converted.state_dict, bare))
    assert load_pretrained(str(bare_file)).origin == "unknown"


def test_an_origin_outside_the_list_is_refused(tmp_path):
    converted = converters.convert(checkpoint_dir("velo_small"))
    converted.metadata[ORIGIN_KEY] = "meta-trained-ish"
    converted.save(tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="weights_origin is 'meta-trained-ish'"):
        load_pretrained(str(tmp_path / "w.safetensors"))


def _release_like_folder(folder, step: int, config_edit: tuple[str, str] | None = None) -> str:
    """A synthetic upstream folder with the released VeLO's architecture and bindings: random
    values, a 32-character gen_id, ``step``, and velo_small's config.gin at H=512, K=256."""
    hparams = velo_release_hparams()
    gen = torch.Generator().manual_seed(0)
    state_dict = {name: torch.randn(shape, generator=gen)
                  for name, shape in velo_config.state_dict_shapes(hparams).items()}
    metadata = {"hparams": json.dumps(hparams), "upstream_gen_id": json.dumps("0" * 32),
                "upstream_step": json.dumps(step)}
    converters.Converted("velo", state_dict, {"kind": "velo", "hparams": hparams},
                         metadata).save(folder, "upstream")
    with open(os.path.join(checkpoint_dir("velo_small"), "config.gin")) as f:
        text = f.read()
    text = text.replace("HyperV2.lstm_hidden_size = 32", "HyperV2.lstm_hidden_size = 512")
    text = text.replace("HyperV2.param_inits = 8", "HyperV2.param_inits = 256")
    if config_edit is not None:
        text = text.replace(*config_edit)
    with open(os.path.join(folder, "config.gin"), "w") as f:
        f.write(text)
    return str(folder)


@pytest.mark.slow
def test_the_released_velo_layout_is_recognised(tmp_path, capsys):
    src = _release_like_folder(tmp_path / "velo", step=5620)
    # Our msgpack writer lays the tree out as upstream does: the released file's exact size.
    assert os.path.getsize(os.path.join(src, "params")) == VELO_RELEASE_BYTES
    out = tmp_path / "velo.safetensors"
    assert cli.main([src, "-o", str(out)]) == 0
    assert "origin    release: the released VeLO's layout" in capsys.readouterr().out
    meta = load_pretrained(str(out)).metadata
    assert meta[ORIGIN_KEY] == "release" and meta[NOTE_KEY] == VELO_RELEASE_NOTE
    assert "content hash is not known here" in meta[NOTE_KEY]
    # One byte off the size (a 1-byte step), or another binding: not the release's layout.
    near = _release_like_folder(tmp_path / "near", step=7)
    assert os.path.getsize(os.path.join(near, "params")) == VELO_RELEASE_BYTES - 2
    assert converters.convert(near).metadata[ORIGIN_KEY] == "unknown"
    bugged = _release_like_folder(tmp_path / "bugged", step=5620, config_edit=(
        "use_bugged_loss_features = False", "use_bugged_loss_features = True"))
    assert converters.convert(bugged).metadata[ORIGIN_KEY] == "unknown"
