"""small_fc_lopt (``AdafacMLPLOpt``): upstream theta tree <-> PyTorch state dict.

Renames and transposes, in one place (``L = hidden_layers``):

====================================  ===========================  ==========================
upstream leaf (msgpack key chain)     PyTorch name                 transform
====================================  ===========================  ==========================
``momentum_decays``                   ``momentum_decay_offsets``   none
``rms_decays``                        ``rms_decay_offsets``        none
``adafactor_decays``                  ``adafactor_decay_offsets``  none
``nn > ~ > w{i}``  (i = 0..L)         ``mlp.{i}.weight``           transpose ``[in,out]->[out,in]``
``nn > ~ > b{i}``                     ``mlp.{i}.bias``             none
``nn > ~ > w{i}_{a}_{b}`` (scalars)   ``mlp.{i}.weight[b, a]``     ``make_separate_weights``
``nn > ~ > b{i}_{b}`` (scalars)       ``mlp.{i}.bias[b]``          ``make_separate_weights``
====================================  ===========================  ==========================

The scalar layout is upstream's ``make_separate_weights=True, concat_weights=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from lopt_port import small_fc_lopt_config as cfg

KIND = cfg.KIND
UPSTREAM_CLASS = cfg.UPSTREAM_CLASS

_OFFSETS = {
    "momentum_decays": "momentum_decay_offsets",
    "rms_decays": "rms_decay_offsets",
    "adafactor_decays": "adafactor_decay_offsets",
}
_NET = ("nn", "~")


def matches(theta: Mapping[str, Any]) -> bool:
    """True when a theta tree has small_fc_lopt's top-level leaves."""
    return set(theta) == {*_OFFSETS, "nn"}


def _separate(hparams: Mapping[str, Any]) -> bool:
    return bool(hparams["make_separate_weights"]) and not hparams["concat_weights"]


def _upstream_leaves(hparams: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every upstream leaf (key chain) with its shape, in haiku's (sorted) order."""
    shapes = cfg.state_dict_shapes(hparams)
    leaves: dict[tuple[str, ...], tuple[int, ...]] = {}
    for up, name in _OFFSETS.items():
        leaves[(up,)] = shapes[name]
    net: dict[str, tuple[int, ...]] = {}
    for i in range(hparams["hidden_layers"] + 1):
        out, inp = shapes[f"mlp.{i}.weight"]
        if _separate(hparams):
            for a in range(inp):
                for b in range(out):
                    net[f"w{i}_{a}_{b}"] = ()
            for b in range(out):
                net[f"b{i}_{b}"] = ()
        else:
            net[f"w{i}"] = (inp, out)
            net[f"b{i}"] = (out,)
    for key in sorted(net):
        leaves[(*_NET, key)] = net[key]
    return dict(sorted(leaves.items()))


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaves of a nested dict keyed by their key chain, in tree order."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def leaf_shapes_as_torch(theta: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Torch-side names and shapes implied by a theta tree (for inferring the architecture)."""
    flat = flatten(theta)
    shapes: dict[str, tuple[int, ...]] = {}
    for up, name in _OFFSETS.items():
        if (up,) in flat and isinstance(flat[(up,)], np.ndarray):
            shapes[name] = tuple(flat[(up,)].shape)
    for chain, value in flat.items():
        if chain[:2] == _NET and len(chain) == 3 and isinstance(value, np.ndarray):
            key = chain[2]
            if key[:1] in "wb" and key[1:].isdigit():
                kind = "weight" if key[0] == "w" else "bias"
                shape = tuple(value.shape)
                shapes[f"mlp.{key[1:]}.{kind}"] = shape[::-1] if kind == "weight" else shape
    return shapes


def is_separate_layout(theta: Mapping[str, Any]) -> bool:
    """True when the MLP is stored as scalar leaves (``make_separate_weights``)."""
    net = theta.get("nn", {}).get("~", {}) if isinstance(theta.get("nn"), dict) else {}
    return isinstance(net, dict) and any("_" in k for k in net)


def theta_to_state_dict(theta: Mapping[str, Any], hparams: Mapping[str, Any], file: str,
                        root: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Map every theta leaf to the PyTorch state dict; strict on names, shapes and dtypes."""
    expected = _upstream_leaves(hparams)
    flat = flatten(theta)
    problems = []
    for chain, shape in expected.items():
        if chain not in flat:
            problems.append(f"missing {' > '.join(chain)} {shape}")
        elif not isinstance(flat[chain], np.ndarray):
            problems.append(f"{' > '.join(chain)} is a {type(flat[chain]).__name__}, "
                            f"not an array")
        elif tuple(flat[chain].shape) != shape:
            problems.append(f"{' > '.join(chain)}: expected shape {shape}, found "
                            f"{tuple(flat[chain].shape)}")
        elif flat[chain].dtype.kind != "f":
            problems.append(f"{' > '.join(chain)}: expected a float array, found "
                            f"{flat[chain].dtype.name}")
    for chain, value in flat.items():
        if chain not in expected:
            problems.append(f"unexpected {' > '.join(chain)} {getattr(value, 'shape', value)!r}")
    if problems:
        raise CheckpointError(
            f"small_fc_lopt theta does not match hidden_size={hparams['hidden_size']}, "
            f"hidden_layers={hparams['hidden_layers']}: " + "; ".join(problems[:12])
            + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else ""),
            file=file, key_path=root)
    sd: dict[str, np.ndarray] = {}
    for up, name in _OFFSETS.items():
        sd[name] = flat[(up,)]
    shapes = cfg.state_dict_shapes(hparams)
    for i in range(hparams["hidden_layers"] + 1):
        out, inp = shapes[f"mlp.{i}.weight"]
        if _separate(hparams):
            w = np.array([[flat[(*_NET, f"w{i}_{a}_{b}")] for a in range(inp)]
                          for b in range(out)])
            bias = np.array([flat[(*_NET, f"b{i}_{b}")] for b in range(out)])
        else:
            w = np.ascontiguousarray(flat[(*_NET, f"w{i}")].T)
            bias = flat[(*_NET, f"b{i}")]
        sd[f"mlp.{i}.weight"] = w
        sd[f"mlp.{i}.bias"] = bias
    return sd


def state_dict_to_leaves(sd: Mapping[str, np.ndarray], hparams: Mapping[str, Any]
                         ) -> dict[tuple[str, ...], np.ndarray]:
    """Inverse of :func:`theta_to_state_dict`: upstream key chain -> array, haiku order."""
    leaves: dict[tuple[str, ...], np.ndarray] = {}
    for up, name in _OFFSETS.items():
        leaves[(up,)] = np.asarray(sd[name])
    for i in range(hparams["hidden_layers"] + 1):
        w = np.asarray(sd[f"mlp.{i}.weight"])
        b = np.asarray(sd[f"mlp.{i}.bias"])
        if _separate(hparams):
            out, inp = w.shape
            for a in range(inp):
                for o in range(out):
                    leaves[(*_NET, f"w{i}_{a}_{o}")] = np.asarray(w[o, a])
            for o in range(out):
                leaves[(*_NET, f"b{i}_{o}")] = np.asarray(b[o])
        else:
            leaves[(*_NET, f"w{i}")] = np.ascontiguousarray(w.T)
            leaves[(*_NET, f"b{i}")] = b
    return {chain: leaves[chain] for chain in _upstream_leaves(hparams)}
