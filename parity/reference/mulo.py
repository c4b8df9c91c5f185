"""JAX reference of μLO (upstream ``MuAdafacMLPLOpt``), written from the spec (part A.4).

:class:`~parity.reference.SmallFCLOptReference` (upstream HEAD) with μLO's three changes:

1. with ``clip_grad``, ``optax.clip_by_global_norm(1.0)`` over all gradients, first;
2. ``jnp.nan_to_num`` of every gradient, before the accumulators;
3. ``new_p = p - step * s``, with ``s`` the tensor's leaf of the model state's
   ``mup_lrs_to_use``: a pytree with the params' structure and one 0-d float32 array per
   leaf, as upstream's ``MuTask.get_mup_state`` builds it (spec A.5). The state keeps it
   under ``state["state"]["mup_lrs_to_use"]``, where upstream keeps the model state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from converters import mulo as mulo_mapping
from parity.reference.small_fc_lopt import F32, SmallFCLOptReference, converted_theta
from parity.reference.upstream_rules import TieBreak


class MuLOReference(SmallFCLOptReference):
    """μLO in JAX, from an upstream theta tree and its hyperparameters."""

    def __init__(self, theta: Mapping[str, Any], hparams: Mapping[str, Any], *,
                 clip_grad: bool = False, tie_break: TieBreak = "numpy") -> None:
        if hparams.get("variant", "head") != "head":
            raise ValueError("μLO is upstream HEAD's AdafacMLPLOpt: variant must be 'head'")
        super().__init__(theta, {**hparams, "variant": "head"}, tie_break=tie_break)
        self.clip_grad = clip_grad

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> MuLOReference:
        """Build from a μLO checkpoint or converted weights file (kind ``mulo``)."""
        return cls(*converted_theta(path, mulo_mapping.KIND), **kwargs)

    def init(self, params: Mapping[str, jnp.ndarray], num_steps: int = 1, *,
             scales: Mapping[str, float]) -> dict[str, Any]:
        """Upstream's initial state with ``scales`` (one per parameter name) as the model
        state's ``mup_lrs_to_use``."""
        if set(scales) != set(params):
            raise ValueError(f"scales must name exactly the params: missing "
                             f"{sorted(set(params) - set(scales))[:5]}, extra "
                             f"{sorted(set(scales) - set(params))[:5]}")
        state = super().init(params, num_steps)
        state["state"] = {"mup_lrs_to_use": {k: jnp.asarray(scales[k], F32) for k in params}}
        return state

    def _scale(self, state, name):
        return state["state"]["mup_lrs_to_use"][name]

    def _step(self, state, params, grads):
        if self.clip_grad:
            grads, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
        grads = jax.tree_util.tree_map(jnp.nan_to_num, grads)
        new_params, new_state, inter = super()._step(state, params, grads)
        new_state["state"] = state["state"]
        return new_params, new_state, inter

    def optax(self, num_steps: int = 1, *, scales: Mapping[str, float] | None = None
              ) -> optax.GradientTransformationExtraArgs:
        """The reference as an optax transformation (``-step * s`` as the updates)."""
        if scales is None:
            raise ValueError("μLO's optax transformation needs scales (one per parameter)")
        inner = super().optax(num_steps)

        def init_fn(params):
            return self.init(params, num_steps, scales=scales)

        return optax.GradientTransformationExtraArgs(init_fn, inner.update)
