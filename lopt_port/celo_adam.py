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

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from lopt_port import celo_config as cfg
from lopt_port.adam_rule import AdamRule
from lopt_port.loss_buffer import LossHorizon
from lopt_port.lstm_heads import CeloAdamHeads
from lopt_port.lstm_inputs import TrainingProgress
from lopt_port.optimizer import (
    LearnedOptimizer,
    ParamsArg,
    WeightsArg,
    WeightsKind,
    check_num_steps,
)
from lopt_port.state_layout import TieBreak
from lopt_port.tensor_lstm import TensorLSTM
from lopt_port.velo import VeloParts, velo, velo_defaults

KIND = WeightsKind(
    "celo_adam", lambda given, shapes: cfg.resolve_hparams("celo_adam", given, shapes),
    lambda sd, hparams, origin: cfg.check_state_dict("celo_adam", sd, hparams, origin))


class CeloAdam(LearnedOptimizer):
    """Celo-Adam: bias-corrected Adam whose learning rate is Celo's learned schedule.

    Arguments as :class:`~lopt_port.Celo` (``hparams``: ``initial_momentum_decays`` = (beta1,),
    ``initial_rms_decays`` = (beta2,), ``initial_epsilon``, ``step_mult`` = the base learning
    rate; ``tie_break`` is accepted for symmetry and unused: no factored state).
    ``fused=True`` updates all parameters with multi-tensor ``torch._foreach`` operations (one
    kernel launch per operation for the whole list; float32 state whatever the parameters'
    dtype) where every parameter is a plain tensor on one device, and raises otherwise
    (FSDP2's DTensors take the per-parameter path); ``fused=None`` does so on CUDA devices
    only (on the CPU the per-parameter path is faster, see
    :attr:`lopt_port.adam_rule.AdamRule.fused_path`); ``False`` always runs per parameter.
    Both paths give the same values.

    State per parameter: ``momentum`` ``(*S, 1)``, ``rms`` ``(*S, 1)``, ``lstm_hidden``,
    ``lstm_cell`` ``(H,)``; globally as :class:`~lopt_port.Celo`.
    """

    requires_loss = True

    def __init__(self, params: ParamsArg, weights: WeightsArg, *, num_steps: int,
                 lr: float = 1.0, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False,
                 hparams: Mapping[str, Any] | None = None, tie_break: TieBreak = "numpy",
                 fused: bool | None = None) -> None:
        self.num_steps = check_num_steps(num_steps)
        defaults = velo_defaults(lr, weight_decay)
        theta = self._load_weights(weights, KIND, hparams)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.parts = VeloParts(
            horizon=LossHorizon(num_steps, bugged=False),
            lstm=TensorLSTM(theta, carries_state=True), inputs=TrainingProgress(),
            heads=CeloAdamHeads(), rule=AdamRule(self.hparams),
            decoupled_weight_decay=self.decoupled_weight_decay)
        super().__init__(params, defaults, fused=fused, tie_break=tie_break,
                         fused_path=self.parts.rule.fused_path,
                         global_state=self.parts.horizon.new_state)

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zero moments and the LSTM's initial state."""
        return self.parts.initial_state(p)

    def capture_intermediates(self) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """As :meth:`lopt_port.VeLO.capture_intermediates`; per tensor ``g_clipped``,
        ``m_hat``, ``v_hat``, ``update``."""
        return self._capturing({"step": {}, "tensors": {}})

    @torch.no_grad()
    def step(self, closure: Any = None, *, loss: Any = None) -> Any:
        """One Celo-Adam update of every parameter with a gradient; returns the closure's
        loss."""
        inputs = self._begin_step(closure, loss, skip_empty=True)
        if inputs.groups:
            velo(inputs, self.global_state, self.parts,
                 fused=all(self._fused_flags(inputs.params)), capture=self._capture)
        return inputs.returned
