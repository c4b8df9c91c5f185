"""Converted weights files: the metadata schema and a loader that needs torch only.

A converted file is a PyTorch state dict of the optimizer's own network (names per optimizer,
documented in the README) plus string metadata:

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
=====================  ==================================================================

``.safetensors`` files carry it as the safetensors header metadata; ``.pt`` files are an
``OrderedDict`` of tensors whose ``_metadata`` attribute holds the same dict, so both load
with ``torch.load(weights_only=True)`` semantics and no pickle of arbitrary objects.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_NAME = "lopt-port-weights"
FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)


class WeightsError(ValueError):
    """A weights file or state dict does not fit the optimizer it is given to."""


@dataclass
class LoadedWeights:
    """A converted optimizer: its kind, hyperparameters, tensors and raw metadata."""

    kind: str | None
    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


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
    try:
        hparams = json.loads(meta.get("hparams", "{}"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{origin}: metadata 'hparams' is not valid JSON ({e})") from None
    if not isinstance(hparams, dict):
        raise WeightsError(f"{origin}: metadata 'hparams' must be a JSON object")
    return meta.get("kind"), hparams


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
    """Load converted weights from a ``.safetensors``/``.pt`` file or take a state dict.

    A plain state dict carries no metadata unless it has a ``_metadata`` attribute written
    by lopt-port; its kind and hyperparameters then come from the caller.
    """
    if isinstance(source, LoadedWeights):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        tensors, meta = _load_file(path)
        origin = path
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


def state_dict_with_metadata(tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str]) -> OrderedDict[str, torch.Tensor]:
    """An ``OrderedDict`` of tensors carrying ``metadata`` as its ``_metadata`` attribute."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
    out._metadata = dict(metadata)  # type: ignore[attr-defined]
    return out
