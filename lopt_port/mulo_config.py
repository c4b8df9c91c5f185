"""μLO (upstream ``MuAdafacMLPLOpt``): hyperparameters and the weights schema.

μLO's meta-parameters are small_fc_lopt's (spec A.3): the converted state dict has the same
names and shapes (:mod:`lopt_port.small_fc_lopt_config`), and the hyperparameters are
``AdafacMLPLOpt``'s with two differences:

* ``variant`` is always ``"head"``: ``MuAdafacMLPLOpt`` copies upstream HEAD, including the
  non-factored ``fac_mom_mult = m * (v + 1e-6)**-0.5``;
* ``step_mult`` is never filled from a default, not even with ``upstream_defaults``: the
  class default is 0.001 but every μLO command of the μLO README passes 0.01, so a silent
  default would make every step 10x off in one of the two cases.

``clip_grad`` is a constructor argument of upstream's class that meta-testing never sets; it
is an option of :class:`lopt_port.MuLO`, not part of the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lopt_port import small_fc_lopt_config as base

KIND = "mulo"
UPSTREAM_CLASS = "MuAdafacMLPLOpt"

#: Constructor defaults of ``MuAdafacMLPLOpt`` that are weights hyperparameters (those of
#: ``AdafacMLPLOpt``; ``step_mult`` is listed but never used as a default, see above).
UPSTREAM_DEFAULTS: dict[str, Any] = dict(base.UPSTREAM_DEFAULTS)

#: Constructor arguments of ``MuAdafacMLPLOpt`` that are runtime options, not hyperparameters
#: of the weights.
RUNTIME_OPTIONS = ("clip_grad", "mup_lrs")

STEP_MULT_HINT = ("step_mult is required for μLO and never defaulted: MuAdafacMLPLOpt's "
                  "default is 0.001, but every μLO command of its README (and PyLO) uses 0.01")


def resolve_hparams(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *,
                    upstream_defaults: bool = False) -> dict[str, Any]:
    """small_fc_lopt's :func:`~lopt_port.small_fc_lopt_config.resolve_hparams` with
    ``variant="head"`` and a required ``step_mult``; raises ``ValueError``."""
    given = dict(given)
    options = sorted(set(given) & set(RUNTIME_OPTIONS))
    if options:
        raise ValueError(f"{', '.join(options)}: constructor options of MuLO (clip_grad is "
                         f"False at meta-test), not hyperparameters of the weights")
    variant = given.setdefault("variant", "head")
    if variant != "head":
        raise ValueError(f"μLO is upstream HEAD's AdafacMLPLOpt (with the +1e-6 fix): variant "
                         f"must be 'head', got {variant!r}")
    if "step_mult" not in given:
        raise ValueError(STEP_MULT_HINT)
    return base.resolve_hparams(given, shapes, upstream_defaults=upstream_defaults, kind=KIND)


def check_state_dict(state_dict: Mapping[str, Any], hparams: Mapping[str, Any],
                     origin: str) -> None:
    """Strict match of names and shapes (small_fc_lopt's schema); raises ``ValueError``."""
    base.check_state_dict(state_dict, hparams, origin, kind=KIND)
