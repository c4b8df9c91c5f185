"""Celo and Celo-Adam (Moudgil et al., ``amoudgl/celo``): hyperparameters and weights schemas.

Both run VeLO's per-tensor LSTM on 18 **global** inputs (9 training-fraction, 9 loss features),
so it is a learned learning-rate schedule. Celo's per-parameter rule is VeLO's MLP with one
bank (``K = param_inits = 1``); Celo-Adam's is bias-corrected Adam and its weights have no
``rnn.controls`` head and no ``ff`` bank.

State dict (``H = lstm_hidden_size``, ``K = param_inits``, ``h = ff_hidden_size``; names as
:mod:`lopt_port.velo_config`, with the LSTM input width ``F = 18``):

===========================  ============  ====================================  ===========
name                         shape         upstream leaf (theta at the file root)  kinds
===========================  ============  ====================================  ===========
``lstm_init_state.hidden``   ``(1, H)``    ``lstm_init_state > hidden``            both
``lstm_init_state.cell``     ``(1, H)``    ``lstm_init_state > cell``              both
``rnn.dead_linear.*``        ``(H, 18)``   ``rnn_params > linear``; unused         both
``rnn.mix.*``                ``(H, 18)``   ``rnn_params > linear_1``               both
``rnn.input.*``              ``(H, 18)``   ``rnn_params > linear_2``               both
``rnn.lstm.*``               ``(4H, 2H)``  ``rnn_params > rnn/linear``             both
``rnn.step_size.*``          ``(1, H)``    ``rnn_params > step_size``              both
``rnn.controls.*``           ``(K, H)``    ``rnn_params > rnn_to_controls``        celo
``ff.*``                     as VeLO's     ``ff_mod_stack > ~ > ...``              celo
===========================  ============  ====================================  ===========

A ``theta.state`` carries no configuration: the authors' factory (``celo/factory.py``) is what
defines each checkpoint, so its settings are the defaults here (:data:`DEFAULTS`; Celo's class
default ``train_phase=1`` is the factory's ``celo_phase1``). Shape-determining values are read
off the weights and must agree with any given value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lopt_port import velo_config
from lopt_port.constants import DECAY_KEYS, UPSTREAM_DECAYS
from lopt_port.value_rules import as_float, check_hparams
from lopt_port.weights_schema import check_shapes

KINDS = ("celo", "celo_adam")
#: Both of the authors' files name their class ``Celo``.
UPSTREAM_CLASS = "Celo"
#: The LSTM's inputs: ``fraction_left`` (9) then ``loss_features`` (9), sorted key order; the
#: step-wide ones of VeLO's, and nothing per tensor.
LSTM_INPUT_WIDTH = velo_config.NUM_STEP_INPUTS

#: The factory settings of each released checkpoint (mulo-celo-spec B.3).
DEFAULTS: dict[str, dict[str, Any]] = {
    "celo": {
        "lstm_hidden_size": 64,
        "param_inits": 1,
        "ff_hidden_size": 4,
        "ff_hidden_layers": 2,
        **{k: list(v) for k, v in UPSTREAM_DECAYS.items()},
        "exp_mult": 0.001,
        "step_mult": 0.001,
        "train_phase": 2,
    },
    "celo_adam": {
        "lstm_hidden_size": 64,
        "initial_momentum_decays": [0.9],
        "initial_rms_decays": [0.999],
        "initial_epsilon": 1e-8,
        "step_mult": 0.001,
    },
}

_INTS = {"lstm_hidden_size": 1, "param_inits": 1, "ff_hidden_size": 1, "ff_hidden_layers": 1,
         "train_phase": 1}
_FLOATS = ("exp_mult", "step_mult", "initial_epsilon")
_DECAYS = DECAY_KEYS


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown Celo kind {kind!r} (one of {', '.join(KINDS)})")


def _check_value(kind: str, key: str, value: Any) -> Any:
    """Canonical (JSON-friendly) form of one hyperparameter; ``ValueError`` if unusable."""
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
            raise ValueError(f"{key} must be an integer >= {_INTS[key]}, got {value!r}")
        return value
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a float, got {value!r}")
        return as_float(key, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{key} must be a non-empty sequence of floats, got {value!r}")
    if kind == "celo_adam" and len(value) != 1:
        raise ValueError(f"{key}={value!r}: Celo-Adam is implemented for one momentum and one "
                         f"rms decay (the released weights' beta1 and beta2)")
    return [as_float(key, v) for v in value]


def normalize_hparams(kind: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and canonicalize a full hyperparameter dict of ``kind``."""
    _check_kind(kind)
    known = DEFAULTS[kind]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"unknown {kind} hyperparameters: {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    missing = [k for k in known if k not in hparams]
    if missing:
        raise ValueError(f"missing {kind} hyperparameters: {', '.join(missing)}")
    out = {k: _check_value(kind, k, hparams[k]) for k in known}
    check_hparams(kind, out)
    if kind == "celo":
        m, r, a = decay_counts(out)
        if r not in (1, m) or a not in (1, m):
            raise ValueError(f"decay counts M={m}, R={r}, A={a} do not broadcast: Celo needs "
                             f"R in (1, M) and A in (1, M)")
    return out


def decay_counts(hparams: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(M, R, A)``: how many momentum, rms and adafactor decays (Celo)."""
    m, r, a = (len(hparams[k]) for k in _DECAYS)
    return m, r, a


def state_dict_shapes(kind: str, hparams: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the converted state dict with its shape, in canonical order."""
    _check_kind(kind)
    hid, f = hparams["lstm_hidden_size"], LSTM_INPUT_WIDTH
    shapes: dict[str, tuple[int, ...]] = {
        "lstm_init_state.hidden": (1, hid),
        "lstm_init_state.cell": (1, hid),
    }
    modules = [("dead_linear", hid, f), ("mix", hid, f), ("input", hid, f),
               ("lstm", velo_config.NUM_GATES * hid, 2 * hid)]
    if kind == "celo":
        modules.append(("controls", hparams["param_inits"], hid))
    modules.append(("step_size", 1, hid))
    for module, out, inp in modules:
        shapes[f"rnn.{module}.weight"] = (out, inp)
        shapes[f"rnn.{module}.bias"] = (out,)
    if kind == "celo":
        shapes.update(velo_config.ff_bank_shapes(hparams, hparams["param_inits"],
                                                 decay_counts(hparams)))
    return shapes


def _infer(kind: str, merged: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Fill the shape-determining values from the weights, in place; given ones must agree."""

    def take(key: str, leaf: str, axis: int, ndim: int) -> None:
        found = shapes.get(leaf)
        if found is None or len(found) != ndim:
            return
        given = merged.setdefault(key, found[axis])
        size = len(given) if key in _DECAYS else given
        if size != found[axis]:
            raise ValueError(f"{key}={given!r} contradicts the weights: {leaf} has shape "
                             f"{found}")

    take("lstm_hidden_size", "rnn.input.bias", 0, 1)
    if kind == "celo":
        take("param_inits", "rnn.controls.bias", 0, 1)
        depth = len({n for n in shapes if n.startswith("ff.b")}) - 1
        if depth >= 1:
            if merged.setdefault("ff_hidden_layers", depth) != depth:
                raise ValueError(f"ff_hidden_layers={merged['ff_hidden_layers']!r} contradicts "
                                 f"the weights: the bank has layers 0..{depth}")
            take("ff_hidden_size", "ff.b0", 1, 2)
        for key, leaf in zip(_DECAYS, ("ff.w0__3", "ff.w0__4", "ff.w0__7"), strict=True):
            if key in merged:
                take(key, leaf, 1, 3)


def resolve_hparams(kind: str, given: Mapping[str, Any],
                    shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Complete ``given`` with the shapes' architecture and the factory's settings."""
    _check_kind(kind)
    unknown = sorted(set(given) - set(DEFAULTS[kind]))
    if unknown:
        raise ValueError(f"unknown {kind} hyperparameters: {', '.join(unknown)} "
                         f"(known: {', '.join(DEFAULTS[kind])})")
    merged = {k: _check_value(kind, k, v) for k, v in given.items()}
    _infer(kind, merged, shapes)
    for key, value in DEFAULTS[kind].items():
        merged.setdefault(key, value)
    hparams = normalize_hparams(kind, merged)
    _infer(kind, dict(hparams), shapes)
    return hparams


def describe(kind: str, hparams: Mapping[str, Any]) -> str:
    """The shape-determining hyperparameters, for error messages."""
    text = f"{kind}: lstm_hidden_size={hparams['lstm_hidden_size']}"
    if kind == "celo":
        m, r, a = decay_counts(hparams)
        text += (f", param_inits={hparams['param_inits']}, "
                 f"ff_hidden_size={hparams['ff_hidden_size']}, "
                 f"ff_hidden_layers={hparams['ff_hidden_layers']}, decays M={m} R={r} A={a}")
    return text


def check_state_dict(kind: str, state_dict: Mapping[str, Any], hparams: Mapping[str, Any],
                     origin: str) -> None:
    """Strict match of names and shapes; raises ``ValueError`` naming every mismatch."""
    check_shapes(state_dict_shapes(kind, hparams), state_dict,
                 f"{origin}: weights do not match ({describe(kind, hparams)})")
