"""The flax msgpack reader/writer: exact round trips and hostile input."""

from __future__ import annotations

import contextlib
import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters import CheckpointError, flax_msgpack
from tests.conftest import DATA, SMALL_FC_CHECKPOINTS, checkpoint_dir

ALL_PARAMS = [os.path.join(checkpoint_dir(n), "params") for n in SMALL_FC_CHECKPOINTS] + [
    os.path.join(DATA, "velo_small.params")]
with open(ALL_PARAMS[0], "rb") as _f:
    GOOD = _f.read()


def _ext(shape, dtype, payload, code=1):
    return msgpack.ExtType(code, msgpack.packb((list(shape), dtype, payload)))


@pytest.mark.parametrize("path", ALL_PARAMS, ids=os.path.basename)
def test_reencode_is_byte_identical(path):
    tree, raw = flax_msgpack.read_file(path)
    assert flax_msgpack.encode(tree) == raw


def test_decodes_arrays_scalars_and_natives():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    doc = msgpack.packb({"a": {"w": _ext((2, 3), "float32", arr.tobytes())},
                         "s": _ext((), "int32", np.int32(7).tobytes(), code=3),
                         "gen_id": "x", "step": 5})
    tree = flax_msgpack.decode_bytes(doc)
    np.testing.assert_array_equal(tree["a"]["w"], arr)
    assert isinstance(tree["s"], flax_msgpack.ScalarLeaf) and tree["s"].value == 7
    assert tree["gen_id"] == "x" and tree["step"] == 5
    assert flax_msgpack.encode(tree) == doc


@pytest.mark.parametrize("doc, needle", [
    (msgpack.packb([1, 2]), "root is a msgpack"),
    (msgpack.packb({1: 2}), "not a string"),
    (msgpack.packb({"a": _ext((2,), "float32", b"\0" * 4)}), "needs 8 bytes"),
    (msgpack.packb({"a": _ext((2,), "object", b"\0" * 16)}), "not allowed"),
    (msgpack.packb({"a": _ext((-1,), "float32", b"")}), "negative"),
    (msgpack.packb({"a": _ext((2**40, 2**40), "float32", b"")}), "needs"),
    (msgpack.packb({"a": msgpack.ExtType(2, b"\x92\x01\x02")}), "ExtType code 2"),
    (msgpack.packb({"a": msgpack.ExtType(1, b"\xc1")}), "corrupt array payload"),
    (msgpack.packb({"a": [1, 2]}), "unexpected msgpack"),
    (GOOD[:-10], "not a valid msgpack"),
    (GOOD + b"\x00", "not a valid msgpack"),
])
def test_bad_documents_raise_checkpoint_error_with_key_path(doc, needle):
    with pytest.raises(CheckpointError, match=needle) as info:
        flax_msgpack.decode_bytes(doc, "f.msgpack")
    assert "f.msgpack" in str(info.value)


def test_error_names_key_path():
    doc = msgpack.packb({"params": {"nn/~": {"w0": _ext((3,), "float32", b"")}}})
    with pytest.raises(CheckpointError) as info:
        flax_msgpack.decode_bytes(doc, "x")
    assert info.value.key_path == ("params", "nn/~", "w0")
    assert "params > nn/~ > w0" in str(info.value)


def test_deep_nesting_is_refused():
    doc = {"leaf": 1}
    for _ in range(200):
        doc = {"k": doc}
    with pytest.raises(CheckpointError, match="nesting deeper"):
        flax_msgpack.decode_bytes(msgpack.packb(doc))
    nested = b"\x81\xa1k" * 100_000 + b"\xc0"  # deeper than msgpack's own stack limit
    with pytest.raises(CheckpointError):
        flax_msgpack.decode_bytes(nested)


def test_file_size_limit_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="more than the limit"):
        flax_msgpack.read_file(ALL_PARAMS[0], max_bytes=100)
    with pytest.raises(CheckpointError, match="cannot read"):
        flax_msgpack.read_file(tmp_path / "nope")


def _only_checkpoint_error(data: bytes) -> None:
    """Decoding either succeeds or raises CheckpointError; anything else fails the test."""
    with contextlib.suppress(CheckpointError):
        flax_msgpack.decode_bytes(data, "fuzz")


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(cut=st.integers(0, len(GOOD)))
def test_fuzz_truncated(cut):
    _only_checkpoint_error(GOOD[:cut])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)),
                      min_size=1, max_size=8))
def test_fuzz_flipped_bytes(flips):
    data = bytearray(GOOD)
    for pos, mask in flips:
        data[pos] ^= mask
    _only_checkpoint_error(bytes(data))


_dtypes = st.sampled_from(["float32", "float64", "int32", "bool", "float16", "complex64",
                           "object", "<f4", "V8", "S3", "", "bfloat16"])
_shapes = st.lists(st.integers(-3, 2**62), max_size=20)
_leaf = st.builds(lambda code, shape, dt, n: msgpack.ExtType(
    code, msgpack.packb((shape, dt, b"\x01" * n))),
    st.integers(0, 5), _shapes, _dtypes, st.integers(0, 64))
_junk_leaf = st.one_of(_leaf, st.binary(max_size=16).map(lambda b: msgpack.ExtType(1, b)),
                       st.integers(), st.floats(), st.text(max_size=5), st.none(),
                       st.lists(st.integers(), max_size=3))
_key = st.one_of(st.text(max_size=6), st.integers(), st.binary(max_size=3))
_tree = st.recursive(_junk_leaf, lambda kids: st.dictionaries(_key, kids, max_size=4),
                     max_leaves=20)


@FUZZ
@given(tree=_tree)
def test_fuzz_structured_garbage(tree):
    try:
        data = msgpack.packb(tree)
    except (TypeError, ValueError, OverflowError):
        return
    _only_checkpoint_error(data)


@FUZZ
@given(data=st.binary(max_size=256))
def test_fuzz_random_bytes(data):
    _only_checkpoint_error(data)
