"""Upstream's rules about shapes, and the constants the JAX references share, read from upstream.

Written here from google/learned_optimization (``upstream-spec.md`` gives the places), never
taken from :mod:`lopt_port`: the reference is a second, independent reading of upstream, so no
mistake can be shared by the port and its check. Hyperparameters come in as data (the dict a
converted or loaded checkpoint carries); :func:`require` names what a reference needs of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as onp

#: How equal dims are ordered when choosing the factored dims: ``"numpy"`` is upstream's very
#: call (numpy's default sort kind, not stable on every build), ``"stable"`` a stable sort.
TieBreak = Literal["numpy", "stable"]
_SORT_KINDS: dict[str, str | None] = {"numpy": None, "stable": "stable"}

#: ``learned_optimizers/adafac_mlp_lopt.py``, ``AdafacMLPLOpt._mod``: the training-step
#: embedding ``tanh(t / s - 1)`` over these timescales ``s`` (upstream-spec 2.5, step 2).
TIME_FEATURE_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


def factored_dims(shape: Sequence[int], tie_break: TieBreak = "numpy") -> tuple[int, int] | None:
    """``learned_optimizers/common.py::factored_dims`` (HyperV2 keeps an identical copy).

    ``None`` below rank 2; otherwise, with ``order = numpy.argsort(shape)``,
    ``(d1, d0) = (order[-2], order[-1])``: ``d0`` the largest dim, ``d1`` the second largest
    (upstream-spec 0). ``tie_break="numpy"`` makes upstream's call as upstream makes it, so
    equal dims resolve as upstream's do on this machine (an AVX-512 numpy sorts ``(6, 6, 3, 3)``
    to ``[3, 2, 1, 0]``, giving ``(1, 0)``); ``"stable"`` sorts stably (``(0, 1)`` there).
    """
    if tie_break not in _SORT_KINDS:
        raise ValueError(f"tie_break must be one of {tuple(_SORT_KINDS)}, got {tie_break!r}")
    if len(shape) < 2:
        return None
    order = onp.argsort(tuple(shape), kind=_SORT_KINDS[tie_break])
    return int(order[-2]), int(order[-1])


def require(hparams: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` naming every key of ``keys`` that ``hparams`` lacks (``what``: the
    optimizer, for the message)."""
    missing = [k for k in keys if k not in hparams]
    if missing:
        raise ValueError(f"{what} hyperparameters lack {', '.join(missing)} (pass the full "
                         "dict a converted or loaded checkpoint carries)")
