"""VeLO (upstream ``HyperV2``): hyperparameters and the weights schema.

The PyTorch state dict of a converted VeLO (``H = lstm_hidden_size``, ``K = param_inits``,
``h = ff_hidden_size``, ``L = ff_hidden_layers``, ``F`` = LSTM input width, 30 for the
default decays; ``M``, ``R``, ``A`` = number of momentum, rms and adafactor decays):

===========================  ================  ==================================================
name                         shape             upstream leaf (under theta)
===========================  ================  ==================================================
``lstm_init_state.hidden``   ``(1, H)``        ``lstm_init_state > hidden`` (or ``> 0``)
``lstm_init_state.cell``     ``(1, H)``        ``lstm_init_state > cell`` (or ``> 1``)
``rnn.dead_linear.weight``   ``(H, F)``        ``rnn_params > linear > w`` transposed; unused
``rnn.mix.weight``           ``(H, F)``        ``rnn_params > linear_1 > w`` transposed
``rnn.input.weight``         ``(H, F)``        ``rnn_params > linear_2 > w`` transposed
``rnn.lstm.weight``          ``(4H, 2H)``      ``rnn_params > rnn/linear > w`` transposed (gates
                                               ``[i, g, f, o]`` as rows, ``[x, h]`` as columns)
``rnn.controls.weight``      ``(K, H)``        ``rnn_params > rnn_to_controls > w`` transposed
``rnn.step_size.weight``     ``(1, H)``        ``rnn_params > step_size > w`` transposed
``rnn.<module>.bias``        ``(out,)``        ``rnn_params > <module> > b``
``ff.w0__{j}``, j = 0..13    ``(K, n_j, h)``   ``ff_mod_stack > ~ > w0__{j}``, kept as upstream's
                                               ``[K, in, out]``; ``n_j``: :func:`ff_input_widths`
``ff.b0``                    ``(K, h)``        ``ff_mod_stack > ~ > b0``
``ff.w{i}``, 0 < i < L       ``(K, h, h)``     ``ff_mod_stack > ~ > w{i}``; ``b{i}`` is ``(K, h)``
``ff.w{L}`` / ``ff.b{L}``    ``(K, h, 3)``     ``ff_mod_stack > ~ > w{L}`` / ``b{L}`` ``(K, 3)``;
                                               outputs: direction, magnitude, one never read
===========================  ================  ==================================================

With ``L = 0`` the bank is ``ff.w0__{j}`` of ``(K, n_j, 3)`` and ``ff.b0`` of ``(K, 3)``.

Hyperparameters are ``HyperV2``'s constructor arguments under their upstream names
(:data:`UPSTREAM_DEFAULTS`); decays are stored as lists. Values whose math lopt-port does not
implement are refused (:data:`SUPPORTED_ONLY`): the ablation flags (``with_*``,
``adafactor_accumulator``, ``param_scale_mult``, ``mix_layers``) must be True,
``precondition_output``, ``constant_loss`` and ``with_validation_feature_dim`` False,
``clip_param_scale_amount`` None and ``rnn_state_decay`` 0.0. ``validation_mode``,
``reparam_decay`` and ``summarize_*`` change nothing in the update (upstream reads
``validation_mode`` only for the refused validation feature, ``reparam_decay`` only in an
unused code path) and are recorded as given. ``use_bugged_loss_features`` and
``use_bugged_next_lstm_state`` change the math and must be known.

No-config checkpoints: upstream's loader for its tuple-rooted ``no_config`` files builds
``HyperV2(lstm_hidden_size=512, param_inits=256, use_bugged_next_lstm_state=True)`` and so keeps
``use_bugged_loss_features=True``. H and K are always read off the weights; the two flags are
:data:`NO_CONFIG_DEFAULTS`, used only when the caller opts in to upstream's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lopt_port.constants import DECAY_KEYS, UPSTREAM_DECAYS, VELO_FF_MULT
from lopt_port.value_rules import as_float, check_hparams
from lopt_port.weights_schema import check_shapes

KIND = "velo"
UPSTREAM_CLASS = "HyperV2"

#: Every argument of upstream ``HyperV2.__init__`` with its default, in signature order.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "lstm_hidden_size": 128,
    "ff_hidden_size": 4,
    "ff_hidden_layers": 2,
    **UPSTREAM_DECAYS,
    "param_inits": 64,
    "mix_layers": True,
    "exp_mult": 0.001,
    "step_mult": 0.001,
    "validation_mode": False,
    "with_validation_feature_dim": False,
    "with_g": True,
    "with_m": True,
    "with_m_feat": True,
    "with_rms": True,
    "with_rms_feat": True,
    "with_rms_norm_g": True,
    "with_rsqrt_rms": True,
    "with_p": True,
    "with_fac_norm_g": True,
    "with_fac_rms": True,
    "with_fac_rsqrt": True,
    "with_grad_clip_feat": True,
    "with_fac_mom_mult": True,
    "with_rms_only_norm_g": True,
    "adafactor_accumulator": True,
    "param_scale_mult": True,
    "use_bugged_next_lstm_state": False,
    "use_bugged_loss_features": True,
    "precondition_output": False,
    "reparam_decay": 10.0,
    "rnn_state_decay": 0.0,
    "summarize_each_layer": False,
    "summarize_all_control": False,
    "constant_loss": False,
    "clip_param_scale_amount": None,
}

#: Arguments of the Celo authors' ``HyperV2`` (``celo/optimizers/velo.py``) that upstream's
#: lacks: ``ff_mult`` multiplies the interpolated per-parameter MLP weights,
#: ``ff_mult * mean_k(controls_k * bank_k)``. Upstream hard-codes 100 (``100 * mean_k(...)``,
#: the same product); the Celo authors' ``velo_s`` and ``velo`` were meta-trained with 1.
EXTENSION_DEFAULTS: dict[str, Any] = {"ff_mult": VELO_FF_MULT}

#: The choices of upstream's loader for tuple-rooted ``no_config`` checkpoints
#: (``pretrained_optimizers.py``) that the weights cannot tell; its H=512 and K=256 are
#: read off the weights.
NO_CONFIG_DEFAULTS: dict[str, Any] = {
    "use_bugged_next_lstm_state": True,
    "use_bugged_loss_features": True,
}

#: Arguments lopt-port implements for one value only (upstream's default).
SUPPORTED_ONLY: dict[str, Any] = {
    **{k: True for k in UPSTREAM_DEFAULTS if k.startswith("with_")
       and k != "with_validation_feature_dim"},
    "adafactor_accumulator": True,
    "param_scale_mult": True,
    "mix_layers": True,
    "with_validation_feature_dim": False,
    "precondition_output": False,
    "constant_loss": False,
    "clip_param_scale_amount": None,
    "rnn_state_decay": 0.0,
}

#: Hyperparameters that change the math but cannot be read off the weights' shapes.
NOT_INFERABLE = ("exp_mult", "step_mult", "initial_momentum_decays", "initial_rms_decays",
                 "initial_adafactor_decays", "use_bugged_loss_features",
                 "use_bugged_next_lstm_state")

_INTS = {"lstm_hidden_size": 1, "ff_hidden_size": 1, "param_inits": 1, "ff_hidden_layers": 0}
_FLOATS = ("exp_mult", "step_mult", "reparam_decay", "rnn_state_decay", "ff_mult")
_DECAYS = DECAY_KEYS

#: ``tanh`` embeddings of the fraction of training done, loss features, rank one-hot.
NUM_TIME_FEATURES = 9
NUM_LOSS_FEATURES = 9
NUM_RANK_FEATURES = 5
#: The LSTM inputs that are the same for every tensor (fraction of training, loss features);
#: VeLO's LSTM reads per-tensor statistics besides, a learned schedule (Celo) these only.
NUM_STEP_INPUTS = NUM_TIME_FEATURES + NUM_LOSS_FEATURES
#: Outputs of the per-parameter MLP: direction, magnitude, and one upstream never reads.
NUM_FF_OUTPUTS = 3
#: Feature groups of the per-parameter MLP's first layer (``ff.w0__0`` .. ``ff.w0__13``).
NUM_FF_GROUPS = 14
#: The LSTM's gate linear stacks the four gates i, g, f, o.
NUM_GATES = 4


def _check_value(key: str, value: Any) -> Any:
    """Canonical (JSON-friendly) form of one hyperparameter; ``ValueError`` if unusable."""
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
            raise ValueError(f"{key} must be an integer >= {_INTS[key]}, got {value!r}")
    elif key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a float, got {value!r}")
        value = as_float(key, value)
    elif key in _DECAYS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)
        if (not isinstance(value, (list, tuple)) or not value
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"{key} must be a non-empty sequence of floats, got {value!r}")
        value = [as_float(key, v) for v in value]
    elif key == "clip_param_scale_amount":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} must be None or a float, got {value!r}")
        value = None if value is None else as_float(key, value)
    elif not isinstance(value, bool):
        raise ValueError(f"{key} must be a bool, got {value!r}")
    if key in SUPPORTED_ONLY and value != SUPPORTED_ONLY[key]:
        raise ValueError(f"{UPSTREAM_CLASS}.{key}={value!r} is not supported: lopt-port's VeLO "
                         f"implements only {key}={SUPPORTED_ONLY[key]!r} (upstream's default)")
    return value


def _check_known(hparams: Mapping[str, Any]) -> None:
    unknown = sorted(set(hparams) - set(UPSTREAM_DEFAULTS) - set(EXTENSION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown velo hyperparameters: {', '.join(unknown)} "
                         f"(known: the {UPSTREAM_CLASS} constructor arguments, "
                         f"{', '.join(UPSTREAM_DEFAULTS)}, and {', '.join(EXTENSION_DEFAULTS)})")


def decay_counts(hparams: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(M, R, A)``: how many momentum, rms and adafactor decays."""
    m, r, a = (len(hparams[k]) for k in _DECAYS)
    return m, r, a


def normalize_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and canonicalize a full VeLO hyperparameter dict (JSON-friendly).

    Refuses unknown or missing keys, wrong types, values lopt-port does not implement
    (:data:`SUPPORTED_ONLY`) and decay counts that do not broadcast the way upstream needs.
    """
    _check_known(hparams)
    missing = [k for k in UPSTREAM_DEFAULTS if k not in hparams]
    if missing:
        raise ValueError(f"missing velo hyperparameters: {', '.join(missing)}")
    out = {k: _check_value(k, hparams[k]) for k in UPSTREAM_DEFAULTS}
    out.update({k: _check_value(k, hparams.get(k, v)) for k, v in EXTENSION_DEFAULTS.items()})
    check_hparams(KIND, out)
    m, r, a = decay_counts(out)
    if r not in (1, m) or a not in (1, m):
        raise ValueError(f"decay counts M={m}, R={r}, A={a} do not broadcast: upstream needs "
                         f"R in (1, M) and A in (1, M)")
    return out


def lstm_input_width(m: int, r: int) -> int:
    """``F``: fraction_left 9, loss_features 9, mean_rms R, rank 5, var_m M, var_rms max(M, R)
    (upstream subtracts the momentum mean from rms), concatenated in sorted key order."""
    return NUM_STEP_INPUTS + r + NUM_RANK_FEATURES + m + max(m, r)


def ff_input_widths(m: int, r: int, a: int) -> tuple[int, ...]:
    """Widths of the 14 per-parameter input groups ``w0__0 .. w0__13``: g, clip(g), p, m, rms,
    m*rsqrt(rms), rsqrt(rms), fac_g, g*rsqrt(rms), row, col, rsqrt(row), rsqrt(col),
    fac_mom_mult."""
    return (1, 1, 1, m, r, max(m, r), r, a, r, a, a, a, a, max(m, a))


def state_dict_shapes(hparams: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the converted state dict with its shape, in canonical order."""
    hid, k = hparams["lstm_hidden_size"], hparams["param_inits"]
    m, r, a = decay_counts(hparams)
    f = lstm_input_width(m, r)
    shapes: dict[str, tuple[int, ...]] = {
        "lstm_init_state.hidden": (1, hid),
        "lstm_init_state.cell": (1, hid),
    }
    for module, out, inp in (("dead_linear", hid, f), ("mix", hid, f), ("input", hid, f),
                             ("lstm", NUM_GATES * hid, 2 * hid), ("controls", k, hid),
                             ("step_size", 1, hid)):
        shapes[f"rnn.{module}.weight"] = (out, inp)
        shapes[f"rnn.{module}.bias"] = (out,)
    shapes.update(ff_bank_shapes(hparams, k, (m, r, a)))
    return shapes


def ff_bank_shapes(hparams: Mapping[str, Any], k: int,
                   counts: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """The per-parameter MLP bank's ``ff.*`` names and shapes, ``K = k`` banks, decay counts
    ``(M, R, A)``."""
    sizes = [hparams["ff_hidden_size"]] * hparams["ff_hidden_layers"] + [NUM_FF_OUTPUTS]
    shapes = {f"ff.w0__{j}": (k, width, sizes[0])
              for j, width in enumerate(ff_input_widths(*counts))}
    shapes["ff.b0"] = (k, sizes[0])
    for i in range(1, len(sizes)):
        shapes[f"ff.w{i}"] = (k, sizes[i - 1], sizes[i])
        shapes[f"ff.b{i}"] = (k, sizes[i])
    return shapes


def _infer(merged: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Fill the architecture from the shapes, in place; a given value must agree."""

    def take(key: str, leaf: str, axis: int, ndim: int) -> None:
        found = shapes.get(leaf)
        if found is None or len(found) != ndim:
            return
        if key not in merged:
            merged[key] = found[axis]
            return
        given = merged[key]
        size = len(given) if key in _DECAYS else given
        if size != found[axis]:
            needed = (*found[:axis], size, *found[axis + 1:])
            raise ValueError(f"{key}={given!r} contradicts the weights: {leaf} has shape "
                             f"{found}, {key}={given!r} needs {needed}")

    take("lstm_hidden_size", "rnn.input.bias", 0, 1)
    take("param_inits", "rnn.controls.bias", 0, 1)
    layers = sorted({int(n[4:]) for n in shapes if n[:4] in ("ff.b", "ff.w") and n[4:].isdigit()}
                    | ({0} if "ff.w0__0" in shapes else set()))
    if layers and layers == list(range(len(layers))):
        depth = len(layers) - 1
        if merged.setdefault("ff_hidden_layers", depth) != depth:
            raise ValueError(f"ff_hidden_layers={merged['ff_hidden_layers']!r} contradicts the "
                             f"weights: the per-parameter bank has layers 0..{depth} "
                             f"(ff.w0__*/ff.b0 .. ff.w{depth}/ff.b{depth}), i.e. "
                             f"ff_hidden_layers={depth}")
        if depth:
            take("ff_hidden_size", "ff.b0", 1, 2)
    for key, leaf in zip(_DECAYS, ("ff.w0__3", "ff.w0__4", "ff.w0__7"), strict=True):
        if key in merged:
            take(key, leaf, 1, 3)


def resolve_hparams(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *,
                    upstream_defaults: bool = False) -> dict[str, Any]:
    """Complete ``given`` hyperparameters, reading the architecture off the weights' shapes.

    ``lstm_hidden_size``, ``param_inits``, ``ff_hidden_size`` and ``ff_hidden_layers`` are
    inferred when not given; a given value (e.g. from ``config.gin``) that contradicts a
    weight's shape is an error naming that weight and both shapes, as is a given decay tuple
    whose length does not match its ``ff.w0__*`` group. Values lopt-port does not implement
    are refused naming the argument. Hyperparameters that cannot be read off the shapes
    (:data:`NOT_INFERABLE`) must be given, unless ``upstream_defaults`` is set, in which case
    upstream's constructor defaults fill them.
    """
    _check_known(given)
    merged = {k: _check_value(k, v) for k, v in given.items()}
    _infer(merged, shapes)
    missing = [k for k in NOT_INFERABLE if k not in merged]
    if missing and not upstream_defaults:
        raise ValueError(
            "these velo hyperparameters cannot be read off the weights and were not given: "
            f"{', '.join(missing)}; pass them or opt in to upstream's defaults explicitly "
            f"({UPSTREAM_CLASS}'s defaults: "
            + ", ".join(f"{k}={UPSTREAM_DEFAULTS[k]!r}" for k in missing)
            + "; upstream's loader for tuple-rooted no-config checkpoints uses "
            + ", ".join(f"{k}={v!r}" for k, v in NO_CONFIG_DEFAULTS.items()) + ")")
    for key, value in {**UPSTREAM_DEFAULTS, **EXTENSION_DEFAULTS}.items():
        merged.setdefault(key, value)
    hparams = normalize_hparams(merged)
    _infer(dict(hparams), shapes)  # decay counts taken from the defaults must fit, too
    return hparams


def describe(hparams: Mapping[str, Any]) -> str:
    """The shape-determining hyperparameters, for error messages."""
    m, r, a = decay_counts(hparams)
    return (f"lstm_hidden_size={hparams['lstm_hidden_size']}, "
            f"param_inits={hparams['param_inits']}, ff_hidden_size={hparams['ff_hidden_size']}, "
            f"ff_hidden_layers={hparams['ff_hidden_layers']}, decays M={m} R={r} A={a}")


def check_state_dict(state_dict: Mapping[str, Any], hparams: Mapping[str, Any],
                     origin: str) -> None:
    """Strict match of names and shapes; raises ``ValueError`` naming every mismatch."""
    check_shapes(state_dict_shapes(hparams), state_dict,
                 f"{origin}: velo weights do not match hyperparameters ({describe(hparams)})")
