"""The per-parameter rule of Celo-Adam: bias-corrected Adam scaled by the learned schedule.

For each tensor with the clipped gradient ``g`` and its ``lr_mult``, at update ``t + 1``:
``m, rms`` moving averages (decays ``b1 = 0.9``, ``b2 = 0.999``, as upstream's ``common``
accumulators), ``m_hat = m / (1 - b1^(t+1))``, ``v_hat = rms / (1 - b2^(t+1))``,
``step = m_hat * ((lr_mult * step_mult) / (eps + sqrt(v_hat + 1e-10)))``, ``p <- p - lr * step``
(decoupled weight decay: ``p <- p * (1 - lr * wd) - lr * step``).

The eager form runs per tensor; the multi-tensor form (:meth:`AdamRule.fused_begin` /
:meth:`AdamRule.fused_finish`) runs ``torch._foreach`` operations over all tensors of one device
(one kernel launch per operation on CUDA), with the same values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lopt_port.accumulators import fixed_decays, update_momentum, update_rms
from lopt_port.constants import CELO_ADAM_SQRT_EPS, DECAY_KEYS, VELO_GRAD_CLIP
from lopt_port.fused_shards import complete_each
from lopt_port.optimizer import FusedPath
from lopt_port.sharding import Rounds, is_dtensor, local, shard_spec, state_zeros
from lopt_port.velo_mlp_rule import apply_step

#: Adam's two decays: b1 (momentum) and b2 (rms).
_DECAY_KEYS = DECAY_KEYS[:2]


def param_unsupported_reason(p: torch.Tensor) -> str | None:
    """Why a parameter cannot take the multi-tensor path (``None`` when it can): FSDP2's
    layouts run on their local shards; other ``DTensor`` layouts do not."""
    if is_dtensor(p):
        try:
            shard_spec(p)
        except ValueError as e:
            return f"{e}: only FSDP2's layouts run (no tensor parallelism)"
    return None


@dataclass
class AdamFusedStep:
    """The clipped gradients (with prefab weight decay), for the update after the network."""

    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    grads: list[torch.Tensor]
    means: dict[int, torch.Tensor]

    def mean_p2(self, index: Sequence[int]) -> torch.Tensor:
        """``mean(p^2)`` of the weight-decayed tensors ``index``."""
        return torch.stack([self.means[i] for i in index])


class AdamRule:
    """Celo-Adam's per-parameter rule (module docstring)."""

    #: ``fused=True`` runs the multi-tensor path anywhere; ``fused=None`` on CUDA only: on the
    #: CPU, where each operation over all tensors streams every parameter through memory once
    #: more, the per-parameter path is faster (GPT-2 small on 2 cores, two runs of
    #: ``scripts/bench_step.py --optimizer celo_adam``: 0.39 and 0.52 s per step against 2.3
    #: and 1.6 s).
    fused_path = FusedPath(config_reason=None, param_reason=param_unsupported_reason,
                           uses_extension=False, all_or_none=True, auto_devices=("cuda",))

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        self.hparams = hparams
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def on_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The decays (``momentum``: b1, ``rms``: b2) on ``device``."""
        if device not in self._device_cache:
            self._device_cache[device] = fixed_decays(self.hparams, device, ("momentum", "rms"))
        return self._device_cache[device]

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zero moments ``(*S, 1)``."""
        shape = tuple(p.shape)
        return {"momentum": state_zeros(p, (*shape, 1)), "rms": state_zeros(p, (*shape, 1))}

    def tensor_weights(self, controls: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """No per-tensor network weights: one empty mapping per tensor."""
        return [{} for _ in range(controls.shape[0])]

    def bias_corrections(self, iteration: int | torch.Tensor
                         ) -> tuple[float, float] | tuple[torch.Tensor, torch.Tensor]:
        """``1 / (1 - b1^t)`` and ``1 / (1 - b2^t)`` for ``t = iteration + 1``, float32.

        ``b^t`` is computed in float64 and rounded once (what XLA's float32 ``pow`` returns in
        all but a few cases, mulo-celo-spec B.9.4); the authors' jitted update then multiplies
        by the reciprocal, as here. ``iteration`` a number: numpy on the host, Python floats
        out; a 0-d tensor (the count under ``torch.compile``): the same operations in torch,
        0-d float32 tensors out."""
        t = iteration + 1
        out = []
        for key in _DECAY_KEYS:
            beta = np.float32(self.hparams[key][0])
            if isinstance(t, torch.Tensor):
                power = torch.full((), float(beta), dtype=torch.float64) ** t.double()
                out.append(1 / (1 - power.float()))
            else:
                correction = np.float32(1) - np.float32(np.float64(beta) ** t)
                out.append(float(np.float32(1) / correction))
        return out[0], out[1]

    def step_factor(self, lr_mult: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
        """``(lr_mult * step_mult) / (eps + sqrt(v_hat + 1e-10))``."""
        lr = lr_mult * self.hparams["step_mult"]
        return lr / (self.hparams["initial_epsilon"] + torch.sqrt(v_hat + CELO_ADAM_SQRT_EPS))

    # --------------------------------------------------------------------------- eager
    def update_rounds(self, p: torch.Tensor, state: dict[str, Any], g: torch.Tensor,
                      ff: Mapping[str, torch.Tensor], lr_mult: torch.Tensor,
                      group: Mapping[str, Any], mean_p2: torch.Tensor | None, *,
                      decoupled_weight_decay: bool, iteration: int | torch.Tensor,
                      capture: dict[str, Any] | None) -> Rounds:
        """One parameter's Adam step (elementwise: no reductions to share between ranks;
        ``ff`` and ``mean_p2`` are not read)."""
        yield from ()
        p_local = local(p)
        consts = self.on_device(p.device)
        m, rms = local(state["momentum"]), local(state["rms"])
        g = g.reshape(tuple(p_local.shape))
        update_momentum(m, g, consts["momentum"])
        update_rms(rms, g, consts["rms"])
        inv1, inv2 = self.bias_corrections(iteration)
        m_hat = m * inv1
        v_hat = rms * inv2
        step = (m_hat * self.step_factor(lr_mult.to(p.device), v_hat))[..., 0]
        apply_step(p_local, step, group, decoupled_weight_decay)
        if capture is not None:
            capture["tensors"][p] = {"g_clipped": g.clone(), "m_hat": m_hat.clone(),
                                     "v_hat": v_hat.clone(), "update": step.clone()}

    # --------------------------------------------------------------------- multi-tensor
    def fused_begin(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    states: Sequence[dict[str, Any]], grad_wd: Sequence[float]
                    ) -> AdamFusedStep:
        """Prefab weight decay (``g + wd * p``, and ``mean(p^2)`` in float64 for the loss term)
        and the clip, before the network. FSDP2 parameters work on their local shards; the
        sums of ``p^2`` of the sharded ones are completed in one ``all_reduce``."""
        clipped, means, sums, specs = [], {}, {}, {}
        for i, (p, g, wd) in enumerate(zip(params, grads, grad_wd, strict=True)):
            p_local = local(p)
            g = local(g).to(torch.float32)
            if wd:
                g = g + wd * p_local.to(torch.float32)
                if (spec := shard_spec(p)) is None:
                    means[i] = torch.mean(p_local.double() ** 2).float()
                else:
                    sums[i], specs[i] = torch.sum(p_local.double() ** 2), spec
            clipped.append(torch.clamp(g, -VELO_GRAD_CLIP, VELO_GRAD_CLIP).unsqueeze(-1))
        totals = complete_each(list(sums.values()), list(specs.values()))
        means.update({i: (total / params[i].numel()).float()
                      for i, total in zip(sums, totals, strict=True)})
        return AdamFusedStep([local(p) for p in params],
                             [{k: local(v) for k, v in s.items()} for s in states], clipped,
                             means)

    def fused_finish(self, prep: AdamFusedStep, controls: torch.Tensor, lr_mult: torch.Tensor,
                     groups: Sequence[Mapping[str, Any]], *, decoupled_weight_decay: bool,
                     iteration: int) -> None:
        """The moving averages and the step for all tensors with multi-tensor operations."""
        grads = prep.grads
        ms = [s["momentum"] for s in prep.states]
        vs = [s["rms"] for s in prep.states]
        consts = self.on_device(ms[0].device)
        b1 = consts["momentum"][0]
        c = torch.clamp(consts["rms"][0], 0.0, 1.0)
        # fma(d, m, (1 - d) g) and fma(c, v, (1 - c) g^2), as lopt_port.accumulators does
        inc_m = torch._foreach_mul(grads, 1 - b1)
        inc_v = torch._foreach_mul(torch._foreach_mul(grads, grads), 1 - c)
        torch._foreach_copy_(ms, torch._foreach_addcmul(inc_m, ms, [b1.expand_as(m) for m in ms]))
        torch._foreach_copy_(vs, torch._foreach_addcmul(inc_v, vs, [c.expand_as(v) for v in vs]))
        inv1, inv2 = self.bias_corrections(iteration)
        m_hat = torch._foreach_mul(ms, inv1)
        v_hat = torch._foreach_mul(vs, inv2)
        denom = torch._foreach_add(
            torch._foreach_sqrt(torch._foreach_add(v_hat, CELO_ADAM_SQRT_EPS)),
            self.hparams["initial_epsilon"])
        lr_vec = (lr_mult * self.hparams["step_mult"]).unbind(0)
        factors = torch._foreach_div([x.reshape(1) for x in lr_vec], denom)
        steps = [s[..., 0] for s in torch._foreach_mul(m_hat, factors)]
        for p, step, group in zip(prep.params, steps, groups, strict=True):
            apply_step(p, step, group, decoupled_weight_decay)
