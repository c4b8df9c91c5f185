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
from converters.flax_msgpack import flatten
from converters.tree_check import join_problems, leaf_problems
from lopt_port import small_fc_lopt_config as cfg

KIND = cfg.KIND
UPSTREAM_CLASS = cfg.UPSTREAM_CLASS

_OFFSETS = {
    "momentum_decays": "momentum_decay_offsets",
    "rms_decays": "rms_decay_offsets",
    "adafactor_decays": "adafactor_decay_offsets",
}
_NET = ("nn", "~")

#: Upstream loads AdafacMLPLOpt only through ``config.gin``: no no-config loader choices.
NO_CONFIG_DEFAULTS: dict[str, Any] = {}

#: Every theta leaf has one key chain (no alternative encodings to canonicalize).
CHAIN_ALIASES: dict[tuple[str, ...], tuple[str, ...]] = {}


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


def is_separate_layout(theta: Mapping[str, Any]) -> bool:
    """True when the MLP is stored as scalar leaves (``make_separate_weights``)."""
    net = flatten(theta)
    return any(chain[:2] == _NET and "_" in chain[-1] for chain in net)


def leaf_shapes_as_torch(theta: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Torch-side names and shapes implied by a theta tree (to infer the architecture)."""
    flat = flatten(theta)
    shapes: dict[str, tuple[int, ...]] = {}
    for up, name in _OFFSETS.items():
        if isinstance(flat.get((up,)), np.ndarray):
            shapes[name] = tuple(flat[(up,)].shape)
    extent: dict[str, list[int]] = {}
    for chain, value in flat.items():
        if chain[:2] != _NET or len(chain) != 3 or not isinstance(value, np.ndarray):
            continue
        head, *idx = chain[2].split("_")
        if head[:1] not in ("w", "b") or not head[1:].isdigit() or not all(
                i.isdigit() for i in idx):
            continue
        name = f"mlp.{head[1:]}.{'weight' if head[0] == 'w' else 'bias'}"
        if not idx:
            shapes[name] = tuple(value.shape)[::-1]
        else:
            dims = [int(i) + 1 for i in idx][::-1]
            extent[name] = [max(a, b) for a, b in zip(extent.get(name, dims), dims, strict=False)]
    shapes.update({k: tuple(v) for k, v in extent.items()})
    return shapes


def config_defaults() -> dict[str, Any]:
    """Upstream's constructor defaults: what an unbound gin argument means."""
    return dict(cfg.UPSTREAM_DEFAULTS)


def resolve_hparams(given: Mapping[str, Any], theta: Mapping[str, Any],
                    upstream_defaults: bool) -> dict[str, Any]:
    """Complete and validate hyperparameters against the theta tree's shapes."""
    given = dict(given)
    if is_separate_layout(theta):
        given.setdefault("make_separate_weights", True)
        given.setdefault("concat_weights", False)
    return cfg.resolve_hparams(given, leaf_shapes_as_torch(theta),
                               upstream_defaults=upstream_defaults)


def theta_to_state_dict(theta: Mapping[str, Any], hparams: Mapping[str, Any], file: str,
                        root: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Map every theta leaf to the PyTorch state dict; strict on names, shapes and dtypes."""
    expected = _upstream_leaves(hparams)
    flat = flatten(theta)
    problems = leaf_problems(flat, expected)
    if problems:
        raise CheckpointError(
            f"small_fc_lopt theta does not match hidden_size={hparams['hidden_size']}, "
            f"hidden_layers={hparams['hidden_layers']}: " + join_problems(problems),
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


def resolve_torch_hparams(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                          upstream_defaults: bool) -> dict[str, Any]:
    """Hyperparameters for a PyTorch state dict (names as in the table above)."""
    return cfg.resolve_hparams(given, shapes, upstream_defaults=upstream_defaults)


#: Strict name/shape check of a PyTorch state dict, ``(sd, hparams, origin)``; ``ValueError``
#: lists every mismatch.
check_state_dict = cfg.check_state_dict


def gin_bindings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``AdafacMLPLOpt`` for a generated ``config.gin``."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()
            if k in cfg.UPSTREAM_DEFAULTS}
