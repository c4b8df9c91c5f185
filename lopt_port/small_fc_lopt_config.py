"""small_fc_lopt (upstream ``AdafacMLPLOpt``): hyperparameters and the weights schema.

The PyTorch state dict of a converted small_fc_lopt (``L = hidden_layers``,
``h = hidden_size``, ``F`` = MLP input width, 39 for the default decays):

==============================  ==============  =============================================
name                            shape           upstream leaf
==============================  ==============  =============================================
``momentum_decay_offsets``      ``(M,)``        ``momentum_decays`` (learned offsets)
``rms_decay_offsets``           ``(R,)``        ``rms_decays``
``adafactor_decay_offsets``     ``(A,)``        ``adafactor_decays``
``mlp.0.weight``                ``(h, F)``      ``nn/~/w0`` transposed (haiku is ``[in, out]``)
``mlp.{i}.weight``, 0<i<L       ``(h, h)``      ``nn/~/w{i}`` transposed
``mlp.{L}.weight``              ``(2, h)``      ``nn/~/w{L}`` transposed
``mlp.{i}.bias``                ``(out_i,)``    ``nn/~/b{i}``
==============================  ==============  =============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lopt_port.constants import UPSTREAM_DECAYS
from lopt_port.value_rules import DISPLAY, as_float, check_hparams
from lopt_port.weights_schema import check_shapes

KIND = "small_fc_lopt"
UPSTREAM_CLASS = "AdafacMLPLOpt"

#: Constructor defaults of upstream ``AdafacMLPLOpt`` (HEAD and the 2022 wheel agree).
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "exp_mult": 0.001, "step_mult": 0.001,
    "hidden_size": 4, "hidden_layers": 2,
    **UPSTREAM_DECAYS,
    "concat_weights": True, "make_separate_weights": False, "split_weights": False,
}

#: ``head``: upstream HEAD; ``pypi-0.0.1``: the 2022 wheel, whose non-factored ``fac_mom_mult``
#: feature is ``m * v**-0.5`` instead of ``m * (v + 1e-6)**-0.5``.
VARIANTS = ("head", "pypi-0.0.1")

#: Hyperparameters that change the math but cannot be read off the weights' shapes.
NOT_INFERABLE = ("exp_mult", "step_mult", "initial_momentum_decays", "initial_rms_decays",
                 "initial_adafactor_decays")

_DECAY_KEYS = {
    "momentum_decay_offsets": "initial_momentum_decays",
    "rms_decay_offsets": "initial_rms_decays",
    "adafactor_decay_offsets": "initial_adafactor_decays",
}

NUM_TIME_FEATURES = 11


def _as_decay_tuple(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty sequence of floats, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must contain floats, got {value!r}")
        out.append(as_float(name, v))
    return tuple(out)


def normalize_hparams(hparams: Mapping[str, Any], *, kind: str = KIND) -> dict[str, Any]:
    """Validate and canonicalize a full small_fc_lopt hyperparameter dict (JSON-friendly);
    ``kind`` (``small_fc_lopt`` or ``mulo``, whose hyperparameters these are too) names the
    optimizer in the errors and picks its value rules (:mod:`lopt_port.value_rules`)."""
    known = {*UPSTREAM_DEFAULTS, "variant"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(f"unknown {DISPLAY[kind]} hyperparameters: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    missing = sorted(k for k in UPSTREAM_DEFAULTS if k not in hparams)
    if missing:
        raise ValueError(f"missing {DISPLAY[kind]} hyperparameters: {', '.join(missing)}")
    out: dict[str, Any] = {}
    for key in ("exp_mult", "step_mult"):
        v = hparams[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key} must be a float, got {v!r}")
        out[key] = as_float(key, v)
    for key in ("hidden_size", "hidden_layers"):
        v = hparams[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "hidden_size" else 0):
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
        out[key] = v
    for key in ("initial_momentum_decays", "initial_rms_decays", "initial_adafactor_decays"):
        out[key] = list(_as_decay_tuple(key, hparams[key]))
    for key in ("concat_weights", "make_separate_weights", "split_weights"):
        v = hparams[key]
        if not isinstance(v, bool):
            raise ValueError(f"{key} must be a bool, got {v!r}")
        out[key] = v
    variant = hparams.get("variant", "head")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out["variant"] = variant
    check_hparams(kind, out)
    m, r, a = (len(out[k]) for k in ("initial_momentum_decays", "initial_rms_decays",
                                     "initial_adafactor_decays"))
    try:
        np.broadcast_shapes((m,), (r,))
        np.broadcast_shapes((m,), (a,))
    except ValueError:
        raise ValueError(f"decay counts M={m}, R={r}, A={a} do not broadcast: upstream needs "
                         f"R in (1, M) and A in (1, M)") from None
    return out


def raw_feature_width(m: int, r: int, a: int) -> int:
    """Columns before the time features: g, p, m, rms, m*rsqrt(rms), rsqrt(rms), fac_g,
    row, col, rsqrt(row), rsqrt(col), fac_mom_mult."""
    return 2 + m + r + max(m, r) + r + 5 * a + max(m, a)


def state_dict_shapes(hparams: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the converted state dict with its shape, in canonical order."""
    m = len(hparams["initial_momentum_decays"])
    r = len(hparams["initial_rms_decays"])
    a = len(hparams["initial_adafactor_decays"])
    shapes: dict[str, tuple[int, ...]] = {
        "momentum_decay_offsets": (m,),
        "rms_decay_offsets": (r,),
        "adafactor_decay_offsets": (a,),
    }
    sizes = [hparams["hidden_size"]] * hparams["hidden_layers"] + [2]
    last = raw_feature_width(m, r, a) + NUM_TIME_FEATURES
    for i, out in enumerate(sizes):
        shapes[f"mlp.{i}.weight"] = (out, last)
        shapes[f"mlp.{i}.bias"] = (out,)
        last = out
    return shapes


def infer_architecture(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """``hidden_size``/``hidden_layers`` read off a state dict's shapes (unambiguous)."""
    layers = sorted(int(k.split(".")[1]) for k in shapes
                    if k.startswith("mlp.") and k.endswith(".weight"))
    if not layers or layers != list(range(len(layers))):
        raise ValueError("cannot infer the MLP depth: expected mlp.0.weight ... mlp.L.weight")
    out = {"hidden_layers": len(layers) - 1}
    if len(layers) > 1:
        out["hidden_size"] = int(shapes["mlp.0.weight"][0])
    return out


def infer_decay_counts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Number of momentum, rms and adafactor decays, from the offset vectors' lengths."""
    out = {}
    for key, hp in _DECAY_KEYS.items():
        if key in shapes and len(shapes[key]) == 1:
            out[hp] = int(shapes[key][0])
    return out


def resolve_hparams(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *,
                    upstream_defaults: bool = False, kind: str = KIND) -> dict[str, Any]:
    """Complete ``given`` hyperparameters from the weights' shapes (architecture only);
    ``kind`` as in :func:`normalize_hparams`.

    Hyperparameters that cannot be read off the shapes (:data:`NOT_INFERABLE`) must be given,
    unless ``upstream_defaults`` is set, in which case upstream's constructor defaults fill
    them. A given value that contradicts the shapes is an error.
    """
    merged = dict(given)
    for key, value in infer_architecture(shapes).items():
        if key in merged and merged[key] != value:
            raise ValueError(f"{key}={merged[key]!r} contradicts the weights' shapes, which "
                             f"imply {key}={value}")
        merged[key] = value
    counts = infer_decay_counts(shapes)
    missing = [k for k in NOT_INFERABLE if k not in merged]
    if missing and not upstream_defaults:
        raise ValueError(
            f"these {DISPLAY[kind]} hyperparameters cannot be read off the weights and were "
            f"not given: {', '.join(missing)}; pass them (upstream defaults: "
            + ", ".join(f"{k}={UPSTREAM_DEFAULTS[k]!r}" for k in missing)
            + ") or opt in to upstream's defaults explicitly")
    for key in UPSTREAM_DEFAULTS:
        merged.setdefault(key, UPSTREAM_DEFAULTS[key])
    for key, n in counts.items():
        given = len(_as_decay_tuple(key, merged[key]))
        if given != n:
            raise ValueError(f"{key}={merged[key]!r} has {given} value(s) but the weights "
                             f"have {n} decay offsets")
    return normalize_hparams(merged, kind=kind)


def check_state_dict(state_dict: Mapping[str, Any], hparams: Mapping[str, Any],
                     origin: str, *, kind: str = KIND) -> None:
    """Strict match of names and shapes; raises ``ValueError`` naming every mismatch."""
    check_shapes(state_dict_shapes(hparams), state_dict,
                 f"{origin}: {DISPLAY[kind]} weights do not match hyperparameters "
                 f"(hidden_size={hparams['hidden_size']}, "
                 f"hidden_layers={hparams['hidden_layers']})")
