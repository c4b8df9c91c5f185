"""μLO in the parity harness: both sides built with the same per-tensor scales.

Lockstep and free running are small_fc_lopt's (:func:`parity.harness.lockstep`,
:func:`parity.harness.free_running`): μLO's state and intermediates are small_fc_lopt's. What
μLO adds is the scale ``s`` of each tensor, which both sides derive from the tensor's shape by
:func:`shape_scale`, a deterministic μP-like mix:

* 2-D tensors with both dims >= 2 are "hidden" matrices in the ``nn.Linear`` layout: ``s =
  HIDDEN_LR_MULT / shape[1]`` (float32), so uneven fan-ins give uneven scales; the random
  tasks' fan-ins (2 to 23) put ``s`` between 0.17 and 2, steps as large as small_fc_lopt's;
* every other tensor (scalars, vectors, ``(1, N)``/``(N, 1)``, rank >= 3) has ``s = 1``.

The reference gets them as upstream's model state ``mup_lrs_to_use`` (0-d float32 arrays).
The ``update`` error is measured against ``step_mult * s * max|MLP output|``
(:func:`parity.errors.update_error` with ``step_mult * s``), the size of what the scaled step
is made from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

from lopt_port import MuLO
from lopt_port.weights import LoadedWeights

#: μLO's ``hidden_lr_mult`` in the harness's tasks (see the module docstring).
HIDDEN_LR_MULT = 4.0


def shape_scale(shape: tuple[int, ...]) -> float:
    """The harness's scale of a tensor of ``shape`` (float32 value)."""
    if len(shape) == 2 and min(shape) >= 2:
        return float(np.float32(HIDDEN_LR_MULT) / np.float32(shape[1]))
    return 1.0


class ScaledReference:
    """A :class:`~parity.reference.MuLOReference` whose ``init`` takes the scales from the
    params' shapes (the harness's ``init(params, num_steps)`` / ``step`` interface)."""

    def __init__(self, reference: Any) -> None:
        self.reference = reference

    def init(self, params: Mapping[str, jnp.ndarray], num_steps: int = 1) -> dict[str, Any]:
        scales = {k: shape_scale(tuple(v.shape)) for k, v in params.items()}
        return self.reference.init(params, num_steps, scales=scales)

    def step(self, state: Mapping[str, Any], params: Mapping[str, jnp.ndarray],
             grads: Mapping[str, jnp.ndarray], loss: Any = None) -> tuple[dict, dict, dict]:
        return self.reference.step(state, params, grads, loss)


def mulo_sides(theta: dict[str, Any], weights: LoadedWeights, reference: str, impl: str,
               info: dict[str, Any], *, clip_grad: bool = False) -> tuple[Any, Any]:
    """``(reference, make_torch)`` for :class:`parity.harness.Sides`; ``ValueError`` for a
    reference other than ``builtin`` (upstream's 0.0.1 wheel has no μLO)."""
    if reference != "builtin":
        raise ValueError("reference 'upstream': the 0.0.1 wheel has no MuAdafacMLPLOpt; μLO "
                         "is compared with the builtin JAX reference (parity.reference.mulo)")
    from parity.reference import MuLOReference
    ref = ScaledReference(MuLOReference(theta, weights.hparams, clip_grad=clip_grad))
    info.update(variant="head", clip_grad=clip_grad, hidden_lr_mult=HIDDEN_LR_MULT,
                scales="2-D tensors with both dims >= 2: hidden_lr_mult / shape[1]; others 1")

    def make_torch(params: list[torch.Tensor], num_steps: int = 1) -> MuLO:
        del num_steps  # μLO does not use the horizon
        scales = {p: shape_scale(tuple(p.shape)) for p in params}
        return MuLO(params, weights, scales=scales, clip_grad=clip_grad,
                    fused=impl != "eager")

    return ref, make_torch
