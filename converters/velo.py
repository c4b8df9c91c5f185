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

:class:`HyperV2Tree` holds this mapping for any kind with HyperV2's tree (a :class:`Schema`
says which leaves and hyperparameters); :data:`VELO` is VeLO's, :mod:`converters.celo` has
Celo's and Celo-Adam's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.flax_msgpack import flatten
from converters.tree_check import Chain, join_problems, leaf_problems
from lopt_port import velo_config as cfg

_LSTM = "lstm_init_state"
_RNN = "rnn_params"
_FF = ("ff_mod_stack", "~")
_LSTM_FIELDS = ("hidden", "cell")
_ENVELOPE_FIELDS = {"0": "hidden", "1": "cell"}

#: Older encodings of ``lstm_init_state`` -> the canonical ``{hidden, cell}`` key chain, and
#: the LSTM gate linear's ``rnn/~/linear`` spelling (upstream-spec 3.8; every file examined,
#: and current haiku, write ``rnn/linear``, mulo-celo-spec 0) -> ``rnn/linear``.
CHAIN_ALIASES: dict[Chain, Chain] = {
    **{(_LSTM, str(i)): (_LSTM, f) for i, f in enumerate(_LSTM_FIELDS)},
    **{(_LSTM, "values", str(i)): (_LSTM, f) for i, f in enumerate(_LSTM_FIELDS)},
    **{(_RNN, "rnn/~/linear", leaf): (_RNN, "rnn/linear", leaf) for leaf in ("w", "b")},
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




@dataclass(frozen=True)
class Schema:
    """What a HyperV2-family mapping needs to know of one optimizer kind."""

    kind: str
    upstream_class: str
    #: ``(hparams) -> {torch name: shape}`` in canonical order.
    shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]
    #: ``(given, torch shapes, upstream_defaults) -> hparams``; raises ``ValueError``.
    resolve: Callable[[Mapping[str, Any], Mapping[str, tuple[int, ...]], bool], dict[str, Any]]
    #: ``(hparams) -> str``: the shape-determining values, for messages.
    describe: Callable[[Mapping[str, Any]], str]
    #: ``(state dict, hparams, origin) -> None``: the strict name and shape check of the
    #: kind's config; raises ``ValueError``.
    check: Callable[[Mapping[str, Any], Mapping[str, Any], str], None]
    #: ``(theta) -> bool``: whether a theta tree is of this kind.
    matches: Callable[[Mapping[str, Any]], bool]
    #: What an unbound gin argument means, and which hparams are constructor arguments.
    defaults: Mapping[str, Any]
    no_config_defaults: Mapping[str, Any] = field(default_factory=dict)
    #: Name of the theta file in a checkpoint folder, and whether theta may sit at the root
    #: of the msgpack document (the Celo authors' ``checkpoints.save_state(path, theta)``).
    upstream_file: str = "params"
    raw_root: bool = False
    #: Whether the upstream folder carries a ``config.gin``.
    writes_gin: bool = True


class HyperV2Tree:
    """The mapping (see :data:`converters.upstream.MAPPINGS`) of one HyperV2-family kind."""

    CHAIN_ALIASES = CHAIN_ALIASES

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.KIND = schema.kind
        self.UPSTREAM_CLASS = schema.upstream_class
        self.NO_CONFIG_DEFAULTS = dict(schema.no_config_defaults)
        self.UPSTREAM_FILE = schema.upstream_file
        self.RAW_ROOT = schema.raw_root
        self.WRITES_GIN = schema.writes_gin

    def matches(self, theta: Mapping[str, Any]) -> bool:
        """True when a theta tree is of this kind."""
        return self.schema.matches(theta)

    def _pairs(self, hparams: Mapping[str, Any]) -> list[tuple[str, Chain, bool]]:
        """``(torch name, upstream chain, transposed)`` for every leaf, in state-dict order."""
        return [(name, *_upstream_chain(name)) for name in self.schema.shapes(hparams)]

    def _upstream_leaves(self, hparams: Mapping[str, Any]) -> dict[Chain, tuple[int, ...]]:
        """Every canonical upstream leaf with its shape, in the order flax writes them."""
        shapes = self.schema.shapes(hparams)
        leaves = {chain: (shapes[name][::-1] if transposed else shapes[name])
                  for name, chain, transposed in self._pairs(hparams)}
        return {chain: leaves[chain] for chain in sorted(leaves, key=_file_order)}

    def config_defaults(self) -> dict[str, Any]:
        """What an unbound gin argument means (upstream's constructor defaults)."""
        return dict(self.schema.defaults)

    def resolve_hparams(self, given: Mapping[str, Any], theta: Mapping[str, Any],
                        upstream_defaults: bool) -> dict[str, Any]:
        """Complete and validate hyperparameters against the theta tree's shapes."""
        return self.schema.resolve(given, leaf_shapes_as_torch(theta), upstream_defaults)

    def theta_to_state_dict(self, theta: Mapping[str, Any], hparams: Mapping[str, Any],
                            file: str, root: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Map every theta leaf to the PyTorch state dict; strict on names, shapes, dtypes."""
        if _LSTM in theta and _lstm_encoding(theta[_LSTM]) is None:
            node = theta[_LSTM]
            found = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise CheckpointError(
                f"{_LSTM} is {found}; expected the map {{hidden, cell}}, the tuple form "
                f"{{0, 1}} or the flax envelope {{name, fields: {{0: hidden, 1: cell}}, "
                f"values: {{0, 1}}}}", file=file, key_path=(*root, _LSTM))
        flat, shown = _canonical_leaves(theta)
        problems = leaf_problems(flat, self._upstream_leaves(hparams), shown)
        if problems:
            raise CheckpointError(f"{self.KIND} theta does not match "
                                  f"{self.schema.describe(hparams)}: " + join_problems(problems),
                                  file=file, key_path=root)
        return {name: np.ascontiguousarray(flat[chain].T) if transposed else flat[chain]
                for name, chain, transposed in self._pairs(hparams)}

    def state_dict_to_leaves(self, sd: Mapping[str, np.ndarray], hparams: Mapping[str, Any]
                             ) -> dict[Chain, np.ndarray]:
        """Inverse of :meth:`theta_to_state_dict`: canonical upstream key chain -> array."""
        leaves = {chain: np.ascontiguousarray(np.asarray(sd[name]).T) if transposed
                  else np.asarray(sd[name]) for name, chain, transposed in self._pairs(hparams)}
        return {chain: leaves[chain] for chain in self._upstream_leaves(hparams)}

    def resolve_torch_hparams(self, given: Mapping[str, Any],
                              shapes: Mapping[str, tuple[int, ...]],
                              upstream_defaults: bool) -> dict[str, Any]:
        """Hyperparameters for a PyTorch state dict (names as in the table above)."""
        return self.schema.resolve(given, shapes, upstream_defaults)

    def check_state_dict(self, sd: Mapping[str, Any], hparams: Mapping[str, Any],
                         origin: str) -> None:
        """Strict name/shape check of a PyTorch state dict (the kind's config's);
        ``ValueError`` lists every mismatch."""
        self.schema.check(sd, hparams, origin)

    def gin_bindings(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments for a generated ``config.gin``."""
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()
                if k in self.schema.defaults}


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


def lstm_input_width(theta: Mapping[str, Any]) -> int | None:
    """``F`` of a HyperV2-family theta (the input projection's fan-in), None if absent."""
    rnn = theta.get(_RNN)
    layer = rnn.get("linear_2") if isinstance(rnn, dict) else None
    w = layer.get("w") if isinstance(layer, dict) else None
    return int(w.shape[0]) if isinstance(w, np.ndarray) and w.ndim == 2 else None


def _is_velo(theta: Mapping[str, Any]) -> bool:
    """HyperV2's three top-level entries and an LSTM input that is not the step-wide inputs
    alone (VeLO's reads per-tensor statistics too; a learned schedule's, such as Celo's, does
    not)."""
    return (set(theta) == {_LSTM, _RNN, _FF[0]}
            and lstm_input_width(theta) != cfg.NUM_STEP_INPUTS)


VELO = HyperV2Tree(Schema(
    kind=cfg.KIND, upstream_class=cfg.UPSTREAM_CLASS, shapes=cfg.state_dict_shapes,
    resolve=lambda given, shapes, defaults: cfg.resolve_hparams(
        given, shapes, upstream_defaults=defaults),
    describe=cfg.describe, check=cfg.check_state_dict, matches=_is_velo,
    defaults=cfg.UPSTREAM_DEFAULTS, no_config_defaults=cfg.NO_CONFIG_DEFAULTS))
