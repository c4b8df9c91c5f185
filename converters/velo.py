"""VeLO (``HyperV2``): upstream theta tree <-> PyTorch state dict.

Renames and transposes, in one place (``H = lstm_hidden_size``, ``K = param_inits``,
``F`` = LSTM input width, 30 for the default decays):

===========================================  ================================  =================
upstream key chain (under theta)             PyTorch name (shape)              transform
===========================================  ================================  =================
``lstm_init_state > hidden`` (or ``> 0``)    ``lstm_init_state.hidden`` (1,H)  none
``lstm_init_state > cell`` (or ``> 1``)      ``lstm_init_state.cell`` (1,H)    none
``rnn_params > linear > w``, ``b``           ``rnn.dead_linear.weight`` (H,F)  transpose ``w``
``rnn_params > linear_1 > w``, ``b``         ``rnn.mix.weight`` (H,F)          transpose ``w``
``rnn_params > linear_2 > w``, ``b``         ``rnn.input.weight`` (H,F)        transpose ``w``
``rnn_params > rnn/linear > w``, ``b``       ``rnn.lstm.weight`` (4H,2H)       transpose ``w``
``rnn_params > rnn_to_controls > w``, ``b``  ``rnn.controls.weight`` (K,H)     transpose ``w``
``rnn_params > step_size > w``, ``b``        ``rnn.step_size.weight`` (1,H)    transpose ``w``
``ff_mod_stack > ~ > w0__0`` .. ``w0__13``   ``ff.w0__0`` .. ``ff.w0__13``     none ([K,in,out])
``ff_mod_stack > ~ > b0, w1, b1, w2, b2``    ``ff.b0``, ``ff.w1``, ...         none
===========================================  ================================  =================

Each ``b`` maps to the module's ``.bias`` unchanged. ``rnn/linear`` is one msgpack key that
contains a slash, not two levels (haiku names the gate linear that ``hk.LSTM`` creates inside
``__call__`` that way). Haiku's ``[in, out]`` kernels become ``nn.Linear``'s
``[out, in]``; the per-parameter MLP bank keeps upstream's ``[K, in, out]`` layout.

``lstm_init_state`` is accepted in all three encodings flax has written for haiku's
``LSTMState`` namedtuple: ``{hidden, cell}`` (flax since July 2021), ``{0, 1}`` (old haiku,
where the state was a plain tuple) and the pre-July-2021 flax envelope
``{name, fields: {0: "hidden", 1: "cell"}, values: {0, 1}}`` (the envelope is simple to
support: only its ``values`` are arrays). The state dict always uses ``hidden``/``cell``; the
converted file's ``upstream_layout`` records the encoding that was read, so writing back to
upstream reproduces it byte for byte (:data:`CHAIN_ALIASES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.flax_msgpack import flatten
from converters.tree_check import Chain, join_problems, leaf_problems
from lopt_port import velo_config as cfg

KIND = cfg.KIND
UPSTREAM_CLASS = cfg.UPSTREAM_CLASS

#: Choices of upstream's loader for tuple-rooted ``no_config`` checkpoints; they fill what the
#: caller leaves unset when the caller opts in to upstream's defaults.
NO_CONFIG_DEFAULTS: dict[str, Any] = dict(cfg.NO_CONFIG_DEFAULTS)

_LSTM = "lstm_init_state"
_RNN = "rnn_params"
_FF = ("ff_mod_stack", "~")
_LSTM_FIELDS = ("hidden", "cell")
_ENVELOPE_FIELDS = {"0": "hidden", "1": "cell"}

#: Older encodings of ``lstm_init_state`` -> the canonical ``{hidden, cell}`` key chain.
CHAIN_ALIASES: dict[Chain, Chain] = {
    **{(_LSTM, str(i)): (_LSTM, f) for i, f in enumerate(_LSTM_FIELDS)},
    **{(_LSTM, "values", str(i)): (_LSTM, f) for i, f in enumerate(_LSTM_FIELDS)},
}

#: haiku module under ``rnn_params`` -> PyTorch module prefix.
_RNN_MODULES = {
    "linear": "rnn.dead_linear",
    "linear_1": "rnn.mix",
    "linear_2": "rnn.input",
    "rnn/linear": "rnn.lstm",
    "rnn_to_controls": "rnn.controls",
    "step_size": "rnn.step_size",
}
_RNN_PREFIXES = {v: k for k, v in _RNN_MODULES.items()}


def matches(theta: Mapping[str, Any]) -> bool:
    """True when a theta tree has HyperV2's top-level entries."""
    return set(theta) == {_LSTM, _RNN, _FF[0]}


def _upstream_chain(name: str) -> tuple[Chain, bool]:
    """Canonical upstream key chain of a PyTorch name, and whether it is transposed."""
    prefix, _, last = name.rpartition(".")
    if prefix == _LSTM:
        return (_LSTM, last), False
    if prefix in _RNN_PREFIXES:
        return (_RNN, _RNN_PREFIXES[prefix], "w" if last == "weight" else "b"), last == "weight"
    return (*_FF, last), False


def _torch_name(chain: Chain) -> tuple[str, bool] | None:
    """Inverse of :func:`_upstream_chain` for a canonical chain; None if it is not a leaf."""
    if len(chain) == 2 and chain[0] == _LSTM and chain[1] in _LSTM_FIELDS:
        return f"{_LSTM}.{chain[1]}", False
    if len(chain) == 3 and chain[0] == _RNN and chain[1] in _RNN_MODULES and chain[2] in ("w", "b"):
        weight = chain[2] == "w"
        return f"{_RNN_MODULES[chain[1]]}.{'weight' if weight else 'bias'}", weight
    if len(chain) == 3 and chain[:2] == _FF:
        return f"ff.{chain[2]}", False
    return None


def _file_order(chain: Chain) -> Chain:
    """Sort key giving flax's key order: sorted maps, namedtuple fields in field order."""
    if chain[0] == _LSTM and len(chain) == 2 and chain[1] in _LSTM_FIELDS:
        return (_LSTM, str(_LSTM_FIELDS.index(chain[1])))
    return chain


def _pairs(hparams: Mapping[str, Any]) -> list[tuple[str, Chain, bool]]:
    """``(torch name, upstream chain, transposed)`` for every leaf, in state-dict order."""
    return [(name, *_upstream_chain(name)) for name in cfg.state_dict_shapes(hparams)]


def _upstream_leaves(hparams: Mapping[str, Any]) -> dict[Chain, tuple[int, ...]]:
    """Every canonical upstream leaf with its shape, in the order flax writes them."""
    shapes = cfg.state_dict_shapes(hparams)
    leaves = {chain: (shapes[name][::-1] if transposed else shapes[name])
              for name, chain, transposed in _pairs(hparams)}
    return {chain: leaves[chain] for chain in sorted(leaves, key=_file_order)}


def _lstm_encoding(node: Any) -> str | None:
    """``named``, ``tuple`` or ``envelope`` for a valid ``lstm_init_state`` map, else None."""
    if not isinstance(node, dict):
        return None
    if set(node) == set(_LSTM_FIELDS):
        return "named"
    if set(node) == set(_ENVELOPE_FIELDS):
        return "tuple"
    if (set(node) == {"name", "fields", "values"} and isinstance(node["name"], str)
            and node["fields"] == _ENVELOPE_FIELDS and isinstance(node["values"], dict)
            and set(node["values"]) == set(_ENVELOPE_FIELDS)):
        return "envelope"
    return None


def _canonical_leaves(theta: Mapping[str, Any]) -> tuple[dict[Chain, Any], dict[Chain, Chain]]:
    """Theta's leaves under canonical chains, and the chain each was read from.

    The envelope's ``name`` and ``fields`` strings are structure, not leaves, and are dropped
    (the caller has checked them with :func:`_lstm_encoding`).
    """
    flat: dict[Chain, Any] = {}
    shown: dict[Chain, Chain] = {}
    for chain, value in flatten(theta).items():
        if chain[0] == _LSTM and len(chain) > 1 and chain[1] in ("name", "fields"):
            continue
        canonical = CHAIN_ALIASES.get(chain, chain)
        flat[canonical] = value
        shown[canonical] = chain
    return flat, shown


def leaf_shapes_as_torch(theta: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Torch-side names and shapes implied by a theta tree (to infer the architecture)."""
    flat, _ = _canonical_leaves(theta)
    shapes: dict[str, tuple[int, ...]] = {}
    for chain, value in flat.items():
        mapped = _torch_name(chain)
        if mapped is not None and isinstance(value, np.ndarray):
            name, transposed = mapped
            shapes[name] = tuple(value.shape)[::-1] if transposed else tuple(value.shape)
    return shapes


def config_defaults() -> dict[str, Any]:
    """Upstream's constructor defaults: what an unbound gin argument means."""
    return dict(cfg.UPSTREAM_DEFAULTS)


def resolve_hparams(given: Mapping[str, Any], theta: Mapping[str, Any],
                    upstream_defaults: bool) -> dict[str, Any]:
    """Complete and validate hyperparameters against the theta tree's shapes."""
    return cfg.resolve_hparams(given, leaf_shapes_as_torch(theta),
                               upstream_defaults=upstream_defaults)


def theta_to_state_dict(theta: Mapping[str, Any], hparams: Mapping[str, Any], file: str,
                        root: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Map every theta leaf to the PyTorch state dict; strict on names, shapes and dtypes."""
    if _LSTM in theta and _lstm_encoding(theta[_LSTM]) is None:
        node = theta[_LSTM]
        found = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise CheckpointError(
            f"{_LSTM} is {found}; expected the map {{hidden, cell}}, the tuple form {{0, 1}} "
            f"or the flax envelope {{name, fields: {{0: hidden, 1: cell}}, values: {{0, 1}}}}",
            file=file, key_path=(*root, _LSTM))
    flat, shown = _canonical_leaves(theta)
    problems = leaf_problems(flat, _upstream_leaves(hparams), shown)
    if problems:
        raise CheckpointError(f"velo theta does not match {cfg.describe(hparams)}: "
                              + join_problems(problems), file=file, key_path=root)
    return {name: np.ascontiguousarray(flat[chain].T) if transposed else flat[chain]
            for name, chain, transposed in _pairs(hparams)}


def state_dict_to_leaves(sd: Mapping[str, np.ndarray], hparams: Mapping[str, Any]
                         ) -> dict[Chain, np.ndarray]:
    """Inverse of :func:`theta_to_state_dict`: canonical upstream key chain -> array."""
    leaves = {chain: np.ascontiguousarray(np.asarray(sd[name]).T) if transposed
              else np.asarray(sd[name]) for name, chain, transposed in _pairs(hparams)}
    return {chain: leaves[chain] for chain in _upstream_leaves(hparams)}


def resolve_torch_hparams(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                          upstream_defaults: bool) -> dict[str, Any]:
    """Hyperparameters for a PyTorch state dict (names as in the table above)."""
    return cfg.resolve_hparams(given, shapes, upstream_defaults=upstream_defaults)


def check_state_dict(sd: Mapping[str, Any], hparams: Mapping[str, Any], origin: str) -> None:
    """Strict name/shape check of a PyTorch state dict; ``ValueError`` lists every mismatch."""
    cfg.check_state_dict(sd, hparams, origin)


def gin_bindings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``HyperV2`` for a generated ``config.gin``."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()
            if k in cfg.UPSTREAM_DEFAULTS}
