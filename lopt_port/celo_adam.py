"""Celo-Adam (Moudgil et al., TMLR 2025; ``amoudgl/celo``): bias-corrected Adam whose learning
rate is Celo's learned schedule, as a torch optimizer.

One step (``lr = 1``, ``weight_decay = 0`` reproduce the authors' code): VeLO's loss buffer
(non-bugged) and clip, Celo's 18 global LSTM inputs and LSTM, the schedule
``lr_mult = 0.1 * exp(h W_s + b_s)``, then per parameter Adam (:mod:`lopt_port.adam_rule`):
``m_hat = m / (1 - b1^(t+1))``, ``v_hat = rms / (1 - b2^(t+1))``,
``step = m_hat * ((lr_mult * step_mult) / (eps + sqrt(v_hat + 1e-10)))``, ``p <- p - lr * step``.
The step is :func:`lopt_port.velo.velo` with these parts.

The authors' Celo-Adam also updates a factored accumulator that nothing reads; it is not kept
(the parameters are unaffected, only that state leaf is absent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lopt_port import celo_config as cfg
from lopt_port.adam_rule import AdamRule
from lopt_port.celo import schedule_parts
from lopt_port.lstm_heads import CeloAdamHeads
from lopt_port.optimizer import WeightsKind
from lopt_port.state_layout import TieBreak
from lopt_port.velo import VeloFamily
from lopt_port.velo_parts import VeloParts

KIND = WeightsKind(
    "celo_adam", lambda given, shapes: cfg.resolve_hparams("celo_adam", given, shapes),
    lambda sd, hparams, origin: cfg.check_state_dict("celo_adam", sd, hparams, origin))


def celo_adam_parts(hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *,
                    num_steps: int, decoupled_weight_decay: bool,
                    tie_break: TieBreak) -> VeloParts:
    """Celo-Adam's parts: the schedule as the only head, Adam as the rule (``tie_break``:
    unused, no factored state)."""
    return schedule_parts(weights, num_steps, decoupled_weight_decay, heads=CeloAdamHeads(),
                          rule=AdamRule(hparams))


class CeloAdam(VeloFamily):
    """Celo-Adam: bias-corrected Adam whose learning rate is Celo's learned schedule.

    Arguments as :class:`~lopt_port.Celo` (``hparams``: ``initial_momentum_decays`` = (beta1,),
    ``initial_rms_decays`` = (beta2,), ``initial_epsilon``, ``step_mult`` = the base learning
    rate; ``tie_break`` is unused: no factored state). ``fused=True`` updates all parameters
    with multi-tensor ``torch._foreach`` operations (one kernel launch per operation for the
    whole list; float32 state whatever the parameters' dtype) where every parameter is a plain
    tensor on one device, and raises otherwise (FSDP2's DTensors take the per-parameter path);
    ``fused=None`` does so on CUDA devices only (on the CPU the per-parameter path is faster,
    see :attr:`lopt_port.adam_rule.AdamRule.fused_path`); ``False`` always runs per parameter.
    Both paths give the same values.

    State per parameter: ``momentum`` ``(*S, 1)``, ``rms`` ``(*S, 1)``, ``lstm_hidden``,
    ``lstm_cell`` ``(H,)``; globally as :class:`~lopt_port.Celo`. :meth:`capture_intermediates`
    records per tensor ``g_clipped``, ``m_hat``, ``v_hat`` and ``update``.
    """

    kind = KIND
    recipe = staticmethod(celo_adam_parts)
