"""Upstream optimizer state (AdafacMLPLOptState layout) <-> lopt_port per-parameter state.

Upstream keeps one pytree per state field (``mom_rolling/m/<tensor>``, ...); lopt_port keeps
one dict per parameter. Both use the same per-tensor array layout (trailing decay axis), so
the mapping is by name only. Unused upstream factored slots (shape ``(0, K)``) have no
lopt_port counterpart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lopt_port import SmallFCLOpt
from parity.errors import relative

#: upstream state path -> lopt_port state name
SMALL_FC_STATE_MAP = {
    "mom_rolling/m": "momentum",
    "rms_rolling/rms": "rms",
    "fac_rolling_features/v_row": "v_row",
    "fac_rolling_features/v_col": "v_col",
    "fac_rolling_features/v_diag": "v_diag",
}

Leaf = Callable[[str], Any]


def small_fc_state_from_upstream(opt: SmallFCLOpt, p: torch.Tensor, leaf: Leaf,
                                 iteration: int) -> dict[str, Any]:
    """lopt_port state for ``p`` holding upstream's values; ``leaf(path)`` gives the array.

    The factored dims stay the optimizer's own (so a wrong rule on the PyTorch side shows up
    as a numerical difference, not a silently corrected one). A shape disagreement raises
    ``ValueError``.
    """
    state = opt.initial_state(p)
    state["step"] = torch.tensor(float(iteration), dtype=torch.float32)
    for upstream, ours in SMALL_FC_STATE_MAP.items():
        if ours not in state:
            continue
        arr = np.asarray(leaf(upstream), dtype=np.float32)
        if tuple(arr.shape) != tuple(state[ours].shape):
            raise ValueError(f"upstream {upstream} has shape {arr.shape}, lopt_port's "
                             f"{ours} {tuple(state[ours].shape)}")
        state[ours] = torch.tensor(arr, device=p.device)
    return state


def small_fc_state_errors(state: dict[str, Any], leaf: Leaf, iteration: int
                          ) -> dict[str, float]:
    """Relative error of every lopt_port state leaf against upstream's (``state/<name>``)."""
    errors = {"state/step": abs(float(state["step"]) - iteration)}
    for upstream, ours in SMALL_FC_STATE_MAP.items():
        if ours in state:
            errors[f"state/{ours}"] = relative(state[ours].cpu().numpy(), leaf(upstream))
    return errors
