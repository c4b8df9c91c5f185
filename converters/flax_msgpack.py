"""Read and write flax-serialized msgpack files without importing flax or jax.

Format (flax ``serialization.to_bytes``): a msgpack document whose maps have string keys;
arrays are ``ExtType(1, packb([shape, dtype_name, raw_c_order_bytes]))`` and numpy scalars
``ExtType(3, <same payload>)`` (decoded here as 0-d arrays). Everything is validated before it
is trusted: dtype whitelist, ``prod(shape) * itemsize == len(payload)``, nesting depth, file
size, string keys. Any failure raises :class:`CheckpointError` naming the file and key path.

Writing produces the bytes flax would produce for the same tree (same key order, same msgpack
encodings), so reading then writing an upstream file is byte-identical; :func:`reencodes_exactly`
checks that property for a given file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from converters.errors import CheckpointError
from lopt_port.limits import MAX_FILE_BYTES, MAX_NDIM, MAX_TREE_DEPTH

EXT_NDARRAY = 1
EXT_NPSCALAR = 3

_DTYPE_WHITELIST = (
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
)


def _bfloat16() -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class ScalarLeaf:
    """A numpy scalar stored as ExtType 3; kept distinct from 0-d arrays (ExtType 1)."""

    value: np.ndarray


Tree = dict[str, Any]


def _dtype_from_name(name: Any, file: str, path: list[str]) -> np.dtype:
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise CheckpointError("array dtype name is not ASCII", file=file,
                                  key_path=path) from None
    if not isinstance(name, str):
        raise CheckpointError(f"array dtype name must be a string, found {type(name).__name__}",
                              file=file, key_path=path)
    if name in _DTYPE_WHITELIST:
        return np.dtype(name).newbyteorder("<")
    if name == "bfloat16":
        dt = _bfloat16()
        if dt is None:
            raise CheckpointError("bfloat16 arrays need the ml_dtypes package", file=file,
                                  key_path=path)
        return dt
    raise CheckpointError(f"array dtype {name[:40]!r} is not allowed "
                          f"(allowed: {', '.join(_DTYPE_WHITELIST)}, bfloat16)",
                          file=file, key_path=path)


def _decode_ext(ext: msgpack.ExtType, file: str, path: list[str]) -> np.ndarray | ScalarLeaf:
    if ext.code not in (EXT_NDARRAY, EXT_NPSCALAR):
        raise CheckpointError(f"unsupported msgpack ExtType code {ext.code} "
                              f"(only 1 = array and 3 = numpy scalar)", file=file, key_path=path)
    try:
        payload = msgpack.unpackb(ext.data, raw=True, use_list=True, strict_map_key=False)
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, FormatError...)
        raise CheckpointError(f"corrupt array payload ({type(e).__name__})", file=file,
                              key_path=path) from None
    if not isinstance(payload, list) or len(payload) != 3:
        raise CheckpointError("array payload must be [shape, dtype, bytes]", file=file,
                              key_path=path)
    shape, dtype_name, buf = payload
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CheckpointError(f"array shape must be a list of at most MAX_NDIM = {MAX_NDIM} "
                              f"ints",
                              file=file, key_path=path)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"array shape {shape!r:.80} has a negative or non-integer dim",
                              file=file, key_path=path)
    dtype = _dtype_from_name(dtype_name, file, path)
    if not isinstance(buf, bytes):
        raise CheckpointError("array data must be msgpack bin", file=file, key_path=path)
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(buf):
        raise CheckpointError(f"array of shape {tuple(shape)} and dtype {dtype.name} needs "
                              f"{expected} bytes, payload has {len(buf)}", file=file,
                              key_path=path)
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if ext.code == EXT_NPSCALAR:
        if arr.ndim != 0:
            raise CheckpointError(f"numpy scalar (ExtType 3) with shape {tuple(shape)}",
                                  file=file, key_path=path)
        return ScalarLeaf(arr)
    return arr


def _decode_node(node: Any, file: str, path: list[str], depth: int) -> Any:
    if depth > MAX_TREE_DEPTH:
        raise CheckpointError(f"nesting deeper than MAX_TREE_DEPTH = {MAX_TREE_DEPTH} levels",
                              file=file,
                              key_path=path)
    if isinstance(node, dict):
        out: Tree = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise CheckpointError(f"map key {key!r:.40} is a {type(key).__name__}, "
                                      f"not a string", file=file, key_path=path)
            out[key] = _decode_node(value, file, [*path, key], depth + 1)
        return out
    if isinstance(node, msgpack.ExtType):
        return _decode_ext(node, file, path)
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise CheckpointError(f"unexpected msgpack {type(node).__name__} (flax writes maps, "
                          f"arrays as ExtType and native scalars only)", file=file,
                          key_path=path)


def decode_bytes(data: bytes, file: str = "<bytes>") -> Tree:
    """Decode flax msgpack bytes into a nested dict of numpy arrays and native scalars.

    The root must be a map. Raises :class:`CheckpointError` on any malformed input.
    """
    try:
        raw = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=False)
    except Exception as e:  # every msgpack failure mode becomes one typed error
        raise CheckpointError(f"not a valid msgpack document ({type(e).__name__}: "
                              f"{str(e)[:80]})", file=file) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"root is a msgpack {type(raw).__name__}, expected a map",
                              file=file)
    return _decode_node(raw, file, [], 0)


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> tuple[Tree, bytes]:
    """Read and decode a flax msgpack file; returns ``(tree, raw_bytes)``."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        if size > max_bytes:
            raise CheckpointError(f"file is {size:,} bytes, more than the limit of "
                                  f"{max_bytes:,} (max_bytes; by default MAX_FILE_BYTES)",
                                  file=name)
        with open(name, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=name) from None
    if len(data) > max_bytes:
        raise CheckpointError(f"file grew past the limit of {max_bytes:,} bytes "
                              f"(max_bytes; by default MAX_FILE_BYTES)",
                              file=name)
    return decode_bytes(data, name), data


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaves of a nested dict keyed by their key chain, in tree order."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _ext_default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, ScalarLeaf):
        return _pack_array(obj.value, EXT_NPSCALAR)
    if isinstance(obj, np.ndarray):
        return _pack_array(obj, EXT_NDARRAY)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _pack_array(arr: np.ndarray, code: int) -> msgpack.ExtType:
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    payload = msgpack.packb((list(arr.shape), arr.dtype.name, little.tobytes("C")))
    return msgpack.ExtType(code, payload)


def encode(tree: Mapping[str, Any]) -> bytes:
    """Encode a nested dict the way flax ``to_bytes`` does (insertion order is key order)."""
    return msgpack.packb(tree, default=_ext_default, strict_types=True)


def reencodes_exactly(tree: Tree, data: bytes) -> bool:
    """True when :func:`encode` of the decoded tree reproduces the original bytes."""
    try:
        return encode(tree) == data
    except (TypeError, ValueError, OverflowError):
        return False
