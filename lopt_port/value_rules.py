"""The value rules of the hyperparameters and weights, written once.

Every path that brings hyperparameters in (``config.gin`` bindings, ``lopt-convert --set``,
converted files' metadata, the optimizers' ``hparams=`` overrides) ends in a config's
``normalize_hparams``, which applies :func:`check_hparams` after checking the types; so does
every kind. A value out of range is a ``ValueError`` naming the hyperparameter, the value and
the allowed range (the converters raise it as ``CheckpointError``, the optimizers as
``WeightsError``).

Weights tensors must be real and dense (:func:`check_real_dense`): a complex tensor would lose
its imaginary part in the float32 copy every optimizer makes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

Rule = Literal["decays", "positive", "finite", "size", "count"]

#: What each rule allows, as the error messages say it.
ALLOWED: dict[Rule, str] = {
    "decays": "each decay must be a finite float in [0, 1)",
    "positive": "must be a finite float > 0",
    "finite": "must be a finite float",
    "size": "must be an integer >= 1",
    "count": "must be an integer >= 0",
}

_DECAYS: dict[str, Rule] = {"initial_momentum_decays": "decays", "initial_rms_decays": "decays",
                            "initial_adafactor_decays": "decays"}
_SMALL_FC: dict[str, Rule] = {**_DECAYS, "exp_mult": "positive", "step_mult": "positive",
                              "hidden_size": "size", "hidden_layers": "count"}

#: Per kind, hyperparameter name -> rule. Hyperparameters not listed are flags or values a
#: config accepts for one value only.
RULES: dict[str, dict[str, Rule]] = {
    "small_fc_lopt": _SMALL_FC,
    "mulo": _SMALL_FC,
    "velo": {**_DECAYS, "exp_mult": "positive", "step_mult": "positive", "ff_mult": "positive",
             "reparam_decay": "finite", "lstm_hidden_size": "size", "ff_hidden_size": "size",
             "param_inits": "size", "ff_hidden_layers": "count"},
    "celo": {**_DECAYS, "exp_mult": "positive", "step_mult": "positive",
             "lstm_hidden_size": "size", "ff_hidden_size": "size", "param_inits": "size",
             "ff_hidden_layers": "size", "train_phase": "size"},
    "celo_adam": {"initial_momentum_decays": "decays", "initial_rms_decays": "decays",
                  "initial_epsilon": "positive", "step_mult": "positive",
                  "lstm_hidden_size": "size"},
}

#: How the error messages name each kind.
DISPLAY = {"small_fc_lopt": "small_fc_lopt", "mulo": "μLO", "velo": "VeLO", "celo": "Celo",
           "celo_adam": "Celo-Adam"}


def as_float(name: str, value: int | float) -> float:
    """``float(value)`` for a hyperparameter; an integer too large for a float (``--set
    step_mult=111...1``) is a ``ValueError`` naming it, not an ``OverflowError``."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: an integer of {int(value).bit_length()} bits is out of "
                         f"range (too large for a float)") from None


def _fits(rule: Rule, value: Any) -> bool:
    if rule == "decays":
        values = value if isinstance(value, (list, tuple)) else (value,)
        return all(_is_number(v) and math.isfinite(v) and 0 <= v < 1 for v in values)
    if rule in ("size", "count"):
        return (isinstance(value, int) and not isinstance(value, bool)
                and value >= (1 if rule == "size" else 0))
    return _is_number(value) and math.isfinite(value) and (rule == "finite" or value > 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_hparams(kind: str, hparams: Mapping[str, Any]) -> None:
    """Check ``hparams`` of ``kind`` against :data:`RULES`; ``ValueError`` naming every value
    out of range with its allowed range. Names without a rule are not checked here."""
    rules = RULES[kind]
    problems = [f"{name}={hparams[name]!r} ({ALLOWED[rule]})"
                for name, rule in rules.items()
                if name in hparams and not _fits(rule, hparams[name])]
    if problems:
        raise ValueError(f"{DISPLAY[kind]} hyperparameters out of range: "
                         + "; ".join(problems))


def check_real_dense(tensors: Mapping[str, Any], origin: str) -> None:
    """Refuse complex and sparse tensors in weights, naming their keys (``ValueError``)."""
    problems = []
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout != torch.strided:
            problems.append(f"{key!r} is a sparse tensor ({t.layout})")
        elif t.is_complex():
            problems.append(f"{key!r} is complex ({t.dtype}: the imaginary part would be lost)")
    if problems:
        raise ValueError(f"{origin}: the weights must be real, dense tensors: "
                         + "; ".join(problems))
