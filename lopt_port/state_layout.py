"""The layout of the optimizers' state: which axes a tensor's factored statistics keep, their
shapes, and where the step-wide state is kept. Data about shapes, shared by the optimizers and
the converters (``converters/state.py``); no math.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

#: Key of the step-wide state (VeLO, Celo, Celo-Adam) inside the first parameter's state.
GLOBAL_STATE = "velo"

TieBreak = Literal["numpy", "stable"]


def factored_dims(shape: Sequence[int], tie_break: TieBreak = "numpy") -> tuple[int, int] | None:
    """Upstream's rule: ``None`` below rank 2, else ``(d1, d0)`` = the two largest dims.

    ``d0`` is the largest dim and ``d1`` the second largest, as ordered by
    ``numpy.argsort(shape)``. With ``tie_break="numpy"`` this is the very call upstream makes
    (default sort kind), so equal dims resolve exactly as upstream resolves them on this machine;
    numpy's default sort is not stable for some tie shapes on AVX-512 builds (e.g. ``(6,6,3,3)``
    gives ``(1, 0)``). ``tie_break="stable"`` uses a stable sort, as older numpy builds did.
    """
    if len(shape) < 2:
        return None
    kind = "stable" if tie_break == "stable" else None
    order = np.argsort(np.asarray(tuple(shape), dtype=np.int64), kind=kind)
    return int(order[-2]), int(order[-1])


def factored_state_shapes(shape: Sequence[int], dims: tuple[int, int] | None,
                          k: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the factored accumulators for a tensor: ``v_row``/``v_col`` or ``v_diag``."""
    shape = tuple(shape)
    if dims is None:
        return {"v_diag": (*shape, k)}
    d1, d0 = dims
    return {
        "v_row": (*(s for i, s in enumerate(shape) if i != d0), k),
        "v_col": (*(s for i, s in enumerate(shape) if i != d1), k),
    }
