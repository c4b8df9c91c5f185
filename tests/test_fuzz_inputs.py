"""Property-based fuzzing of every input lopt-port reads (issue 19, item 5): ``config.gin``
text, converted ``.safetensors`` (header and metadata), ``.pt`` files, pretrained folders'
``config.json``, μLO pickles and ``lopt-convert --set`` values.

The property is the error contract: each input either loads, or raises the project's own
error (``CheckpointError`` from the converters, ``WeightsError`` from ``load_weights``), and
``lopt-convert`` exits 0 or 2 and leaves an output only on 0. Any other exception is a hole.
The default run draws fixed examples (``derandomize``, tests/conftest.py);
``HYPOTHESIS_PROFILE=explore`` draws new ones. The msgpack reader's byte-level fuzzing is in
tests/test_flax_msgpack.py, the upstream folder's in tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converters
from converters import cli
from converters.errors import CheckpointError
from converters.gin_config import parse_gin
from converters.mulo import pickle_bytes
from lopt_port import from_pretrained
from lopt_port.weights import WeightsError, load_weights
from tests.conftest import checkpoint_dir

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
with open(os.path.join(checkpoint_dir("velo_small"), "config.gin")) as _f:
    GIN = _f.read()
GIN_ALPHABET = "()[]{}%@=,.:'\"\\\n #0123456789abcdefxyz_-+eE"


def _edits(text_len: int) -> st.SearchStrategy:
    """Up to 6 edits (position, deleted length, inserted text) of a text."""
    return st.lists(st.tuples(st.integers(0, text_len), st.integers(0, 4),
                              st.text(GIN_ALPHABET, max_size=12)), min_size=1, max_size=6)


def _apply(text: str, edits) -> str:
    for pos, cut, insert in edits:
        pos = min(pos, len(text))
        text = text[:pos] + insert + text[pos + cut:]
    return text


@FUZZ
@given(edits=_edits(len(GIN)))
def test_gin_text(edits):
    try:
        parse_gin(_apply(GIN, edits), "fuzzed.gin")
    except CheckpointError as e:
        assert "fuzzed.gin" in str(e)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The bundled small_fc_lopt checkpoint converted once: its tensors and metadata."""
    c = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    folder = tmp_path_factory.mktemp("converted")
    c.save(folder / "w.safetensors")
    c.save(folder / "w.pt", "pt")
    c.save(folder / "hf", "hf")
    return folder


def _damaged(raw: bytes, cut: int, flip: int) -> bytes:
    """``raw`` with byte ``cut`` (modulo its length) XORed with ``flip``, or cut off there
    when ``flip`` is 0."""
    data = bytearray(raw)
    cut %= len(data)
    if flip:
        data[cut] ^= flip
    else:
        del data[cut:]
    return bytes(data)


def _load(path):
    """``load_weights``: the weights, or ``WeightsError`` (nothing else may escape)."""
    try:
        return load_weights(path)
    except WeightsError:
        return None


@FUZZ
@given(data=st.data())
def test_safetensors_header_and_metadata(converted, tmp_path, data):
    raw = (converted / "w.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    field = data.draw(st.sampled_from(sorted(header)), label="field")
    replacement = data.draw(st.one_of(
        st.none(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
        st.text(max_size=20), st.lists(st.integers(-5, 2**40), max_size=4),
        st.dictionaries(st.text(max_size=8), st.text(max_size=40), max_size=4)),
        label="replacement")
    if field == "__metadata__" and isinstance(replacement, dict):
        key = data.draw(st.sampled_from(sorted(header[field])), label="metadata key")
        header[field] = {**header[field], key: data.draw(st.text(max_size=60), label="value")}
    elif data.draw(st.booleans(), label="whole entry"):
        header[field] = replacement
    elif isinstance(header[field], dict) and header[field]:
        sub = data.draw(st.sampled_from(sorted(header[field])), label="sub-field")
        header[field] = {**header[field], sub: replacement}
    body = json.dumps(header).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + size:])
    _load(path)


@FUZZ
@given(cut=st.integers(0, 4095), flip=st.integers(0, 255))
def test_pt_bytes(converted, tmp_path, cut, flip):
    path = tmp_path / "f.pt"
    path.write_bytes(_damaged((converted / "w.pt").read_bytes(), cut, flip))
    _load(path)


@FUZZ
@given(value=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                                    st.floats(allow_nan=True), st.text(max_size=12)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3)),
                          max_leaves=8),
       key=st.sampled_from(["kind", "hparams", "format", "format_version", "lopt_port",
                            "weights_origin", "new"]))
def test_pretrained_folder_config(converted, tmp_path, value, key):
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    config = json.loads((converted / "hf" / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((converted / "hf" / "model.safetensors")
                                               .read_bytes())
    _load(folder)


@pytest.fixture(scope="module")
def mulo_pickle():
    c = converters.convert(checkpoint_dir("mulo_h32_sm0p01"))
    return pickle_bytes(c.upstream_tree()["params"])


@FUZZ
@given(cut=st.integers(0, 1 << 20), flip=st.integers(0, 255))
def test_mulo_pickle(mulo_pickle, tmp_path, cut, flip):
    path = tmp_path / "global_step5.pickle"
    path.write_bytes(_damaged(mulo_pickle, cut, flip))
    try:
        converters.convert(path, step_mult=0.01)
    except CheckpointError as e:
        assert str(path) in str(e)


SET_NAMES = ["step_mult", "exp_mult", "hidden_size", "hidden_layers", "initial_momentum_decays",
             "initial_rms_decays", "initial_adafactor_decays", "concat_weights",
             "make_separate_weights", "split_weights", "clip_grad", "nonexistent"]


@FUZZ
@given(name=st.sampled_from(SET_NAMES),
       value=st.one_of(st.sampled_from(["1e999", "-1", "0", "nan", "inf", "(1.5,)", "(-0.5,)",
                                        "()", "[]", "True", "None", "'x'", "1" * 400,
                                        "(0.9, 0.99, 0.999)", "2**64", "{}", "(("]),
                       st.text(GIN_ALPHABET, max_size=16)))
def test_cli_set_values(tmp_path, name, value):
    out = tmp_path / "out.safetensors"
    if out.exists():
        out.unlink()
    code = cli.main([str(checkpoint_dir("small_fc_h32_sm0p01")), "-o", str(out),
                     "--set", f"{name}={value}"])
    assert code in (0, 2)
    assert out.exists() == (code == 0)
    if code == 0:  # what was accepted must build an optimizer
        with pytest.warns(UserWarning, match="NOT META-TRAINED"):
            assert from_pretrained(out, [torch.zeros(3, 2)]) is not None
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lopt-tmp")]

