"""Converted weights files: the metadata schema and a loader that needs torch only.

A converted file is a PyTorch state dict of the optimizer's own network (names per optimizer,
documented in docs/conversion.md) plus string metadata:

=====================  ==================================================================
key                    value
=====================  ==================================================================
format                 ``lopt-port-weights``
format_version         ``1``
kind                   optimizer kind, e.g. ``small_fc_lopt``
hparams                JSON object of the optimizer's hyperparameters
lopt_port_version      version of lopt-port that wrote the file
source_file            file name of the upstream checkpoint (when converted from one)
source_sha256          sha256 of that file
upstream_gen_id        upstream ``gen_id`` (JSON)
upstream_step          upstream ``step`` (JSON)
upstream_layout        JSON skeleton that lets the converter rebuild the upstream bytes
upstream_config_gin    the upstream ``config.gin`` text, verbatim
weights_origin         ``fixture``, ``release``, ``pylo-copy`` or ``unknown``
                       (:mod:`lopt_port.provenance`; optional: older files lack it)
weights_origin_note    how the origin was established, in words
pylo_files             JSON ``{file: sha256}`` of a pylo folder read (:func:`load_pylo`)
=====================  ==================================================================

``.safetensors`` files carry it as the safetensors header metadata; ``.pt`` files are an
``OrderedDict`` of tensors whose ``_metadata`` attribute holds the same dict, so both load
with ``torch.load(weights_only=True)`` semantics and no pickle of arbitrary objects.

A *pretrained folder* (the Hugging Face convention) holds ``config.json``, the same metadata
as one JSON object with ``hparams`` as a nested object rather than a string, and
``model.safetensors``, the tensors (its header carries the metadata too, so the file alone
also loads). ``config.json`` is what the folder's metadata is read from.

Safetensors files are written by :func:`safetensors_bytes`, deterministically (the
``safetensors`` package orders header keys by a randomly seeded hash map, so the same weights
would give different bytes and checksums from one save to the next).
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lopt_port import pylo_layout
from lopt_port.limits import MAX_CONFIG_BYTES, json_depth_problem
from lopt_port.provenance import origin_of

FORMAT_NAME = "lopt-port-weights"
FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class WeightsError(ValueError):
    """A weights file or state dict does not fit the optimizer it is given to."""


@dataclass
class LoadedWeights:
    """A converted optimizer: its kind, hyperparameters, tensors and raw metadata."""

    kind: str | None
    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        """``fixture``, ``release``, ``pylo-copy`` or ``unknown``
        (:func:`lopt_port.provenance.origin_of`)."""
        return origin_of(self.metadata)[0]

    @property
    def origin_note(self) -> str:
        """How :attr:`origin` was established, in words (empty when unknown)."""
        return origin_of(self.metadata)[1]


def loads_json(text: Any, origin: str, what: str) -> Any:
    """``json.loads(text)`` once ``text`` is a string within the JSON limits
    (:mod:`lopt_port.limits`); :class:`WeightsError` naming ``origin`` and ``what`` (a metadata
    key, say) otherwise."""
    if not isinstance(text, str):
        raise WeightsError(f"{origin}: {what} must be a string of JSON, found "
                           f"{type(text).__name__}")
    problem = json_depth_problem(text)
    if problem is not None:
        raise WeightsError(f"{origin}: {what}: {problem}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{origin}: {what} is not valid JSON ({e})") from None


def read_json_file(path: str) -> Any:
    """The JSON document in the file ``path``, within MAX_CONFIG_BYTES and the JSON limits;
    :class:`WeightsError` naming the file otherwise."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise WeightsError(f"{path}: file is {size:,} bytes, more than MAX_CONFIG_BYTES = "
                               f"{MAX_CONFIG_BYTES:,}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        problem = json_depth_problem(text)
        if problem is not None:
            raise WeightsError(f"{path}: {problem}")
        return json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a readable JSON file ({e})") from None


def _parse_metadata(meta: Mapping[str, str], origin: str) -> tuple[str | None, dict[str, Any]]:
    if not meta:
        return None, {}
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise WeightsError(f"{origin}: metadata 'format' is {fmt!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise WeightsError(f"{origin}: metadata format_version {version!r} is not supported by "
                           f"this lopt-port (supported: {', '.join(SUPPORTED_FORMAT_VERSIONS)})")
    hparams = loads_json(meta.get("hparams", "{}"), origin, "metadata 'hparams'")
    if not isinstance(hparams, dict):
        raise WeightsError(f"{origin}: metadata 'hparams' must be a JSON object")
    try:
        origin_of(meta)
    except ValueError as e:
        raise WeightsError(f"{origin}: {e}") from None
    return meta.get("kind"), hparams


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file, byte for byte determined by its inputs.

    Layout (the safetensors format): the header length as a little-endian u64, the JSON header
    (``__metadata__`` first, its keys sorted, then the tensors sorted by name, each with
    ``dtype``, ``shape`` and ``data_offsets``; compact separators; space-padded to a multiple of
    8 bytes), then the tensors' little-endian data in the same order.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors_bytes writes the host's byte order, which must be "
                           "little-endian")
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str: {bad[:5]}")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``config.json`` (a pretrained folder)."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_NAME))


def metadata_to_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ``config.json`` object of a pretrained folder: the metadata, ``hparams`` parsed."""
    config: dict[str, Any] = dict(metadata)
    if "hparams" in config:
        config["hparams"] = loads_json(config["hparams"], "metadata", "'hparams'")
    return config


def config_to_metadata(config: Any, origin: str) -> dict[str, str]:
    """The string metadata of a ``config.json`` object (``hparams`` re-serialized with sorted
    keys, as the converters write it); inverse of :func:`metadata_to_config`."""
    if not isinstance(config, dict):
        raise WeightsError(f"{origin}: expected a JSON object")
    meta: dict[str, str] = {}
    for key, value in config.items():
        if key == "hparams":
            if not isinstance(value, dict):
                raise WeightsError(f"{origin}: 'hparams' must be a JSON object")
            meta[key] = json.dumps(value, sort_keys=True)
        elif isinstance(value, str):
            meta[key] = value
        else:
            raise WeightsError(f"{origin}: {key!r} must be a string, found "
                               f"{type(value).__name__}")
    return meta


def _load_folder(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    meta = config_to_metadata(read_json_file(config_path), config_path)
    if not os.path.isfile(weights_path):
        raise WeightsError(f"{path}: a pretrained folder needs {WEIGHTS_NAME} beside "
                           f"{CONFIG_NAME}")
    tensors, _ = _load_file(weights_path)
    return tensors, meta


def _load_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        hint = (" (an upstream checkpoint folder? convert it first: lopt-convert "
                f"{path})" if os.path.isdir(path) else "")
        raise WeightsError(f"{path}: no such weights file{hint}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(path), meta
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickles of arbitrary objects
        raise WeightsError(f"{path}: not a readable weights file ({e})") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor)
                                               for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    meta = dict(getattr(obj, "_metadata", None) or {})
    return dict(obj), meta


def load_weights(source: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights
                 ) -> LoadedWeights:
    """Load converted weights from a ``.safetensors``/``.pt`` file or a pretrained folder
    (``config.json`` + ``model.safetensors``), or pylo's VeLO folders (:func:`load_pylo`), or
    take a state dict.

    A plain state dict carries no metadata unless it has a ``_metadata`` attribute written
    by lopt-port; its kind and hyperparameters then come from the caller.
    """
    if isinstance(source, LoadedWeights):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        layout = pylo_layout.layout_of(path)
        if layout == "velo":
            return load_pylo(path)
        if layout == "meta_mlp":
            raise WeightsError(
                f"{path}: a pylo MetaMLP folder stores neither its optimizer nor its learned "
                f"decay offsets: load it with lopt_port.load_pylo(path, kind='small_fc_lopt' or "
                f"'mulo', decay_offsets={{...}} or 'pylo'), or convert it with lopt-convert "
                f"--kind K --pylo-decay-offsets pylo|JSON")
        tensors, meta = _load_folder(path) if is_pretrained_folder(path) else _load_file(path)
        origin = os.path.join(path, CONFIG_NAME) if is_pretrained_folder(path) else path
    elif isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsError(f"state dict entries are not tensors: {bad[:5]}")
        tensors = dict(source)
        meta = dict(getattr(source, "_metadata", None) or {})
        origin = "state dict"
    else:
        raise TypeError(f"weights must be a path, a state dict or LoadedWeights, "
                        f"not {type(source).__name__}")
    kind, hparams = _parse_metadata(meta, origin)
    return LoadedWeights(kind, hparams, tensors, meta)


def load_pylo(path: str | os.PathLike, *, kind: str | None = None,
              decay_offsets: Mapping[str, Any] | str | None = None) -> LoadedWeights:
    """pylo's published weights folder as lopt-port weights (:mod:`lopt_port.pylo_layout`:
    the name mapping, what is assumed, origin ``pylo-copy``). A VeLO folder needs nothing
    more; a MetaMLP folder needs ``kind`` (``small_fc_lopt`` or ``mulo``) and
    ``decay_offsets`` (the three offsets by lopt-port name, or ``"pylo"`` for pylo's
    hard-coded ones). Raises :class:`WeightsError` where the folder is not pylo's or the
    information is missing."""
    try:
        tensors, meta = pylo_layout.read_pylo_folder(path, kind=kind,
                                                     decay_offsets=decay_offsets)
    except pylo_layout.PyloLayoutError as e:
        raise WeightsError(str(e)) from None
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta}
    kind_found, hparams = _parse_metadata(meta, os.fspath(path))
    return LoadedWeights(kind_found, hparams, tensors, meta)


def state_dict_with_metadata(tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str]) -> OrderedDict[str, torch.Tensor]:
    """An ``OrderedDict`` of tensors carrying ``metadata`` as its ``_metadata`` attribute."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
    out._metadata = dict(metadata)  # type: ignore[attr-defined]
    return out
