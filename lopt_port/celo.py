"""Celo and Celo-Adam (Moudgil et al., TMLR 2025; ``amoudgl/celo``) as torch optimizers.

Both are VeLO (:mod:`lopt_port.velo`) with a different per-tensor network input and heads: each
class gives :func:`lopt_port.velo.velo` its own parts (:class:`~lopt_port.velo.VeloParts`).
Celo-Adam is in :mod:`lopt_port.celo_adam`. One step (``lr = 1``, ``weight_decay = 0`` reproduce the
authors' code):

1. Loss buffer: VeLO's, always the non-bugged ``init(num_steps)``; 9 loss features.
2. ``g <- clip(g, -1000, 1000)``.
3. 18 LSTM inputs, the same for every tensor: ``tanh(10 (t / T - c))`` for the 9 centres ``c``
   (``t`` = updates done before this one), then the loss features. VeLO's mixing layers and
   LSTM (the new state is always carried) give per tensor
   ``lr_mult = 0.1 * exp(h W_s + b_s)`` (> 0) and, for Celo, ``controls = softmax(h W_c + b_c)``
   over the ``K`` banks. Every tensor sees the same inputs: it is a learned schedule.
4. Per parameter:

   * **Celo**: VeLO's accumulators, 30 features and MLP with weights
     ``mean_k(controls_k * bank_k)`` (no x100; the released ``K = 1`` makes this the bank),
     ``step = direction * (param_scale * exp(exp_mult * magnitude)) * step_mult``, then
     ``step <- lr_mult * step`` if ``train_phase > 1`` (the released weights: 2).
   * **Celo-Adam**: ``m``, ``rms`` moving averages (decays 0.9, 0.999, as upstream's
     ``common`` accumulators), ``m_hat = m / (1 - b1^(t+1))``, ``v_hat = rms / (1 - b2^(t+1))``,
     ``step = m_hat * ((lr_mult * step_mult) / (eps + sqrt(v_hat + 1e-10)))``.

   ``p <- p - lr * step``.

The authors' Celo-Adam also updates a factored accumulator that nothing reads; it is not kept
(the parameters are unaffected, only that state leaf is absent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from lopt_port import celo_config as cfg
from lopt_port.constants import CELO_FF_MULT
from lopt_port.loss_buffer import LossHorizon
from lopt_port.lstm_heads import CeloHeads
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
from lopt_port.velo_mlp_rule import MLPRule

KIND = WeightsKind(
    "celo", lambda given, shapes: cfg.resolve_hparams("celo", given, shapes),
    lambda sd, hparams, origin: cfg.check_state_dict("celo", sd, hparams, origin))


class Celo(LearnedOptimizer):
    """Celo: VeLO's per-parameter MLP driven by a learned schedule (module docstring).

    Args:
        params: parameters or param groups (``lr`` and ``weight_decay`` per group).
        weights: converted weights (``lopt-convert checkpoints/celo``), a state dict with
            ``hparams``, or :class:`~lopt_port.LoadedWeights`.
        num_steps: the training horizon T (required): the schedule sees ``t / T`` and the loss
            half-lives reach T.
        lr: multiplies the step (``1.0`` = the authors' optimizer).
        weight_decay: the authors' ``WeightDecayWrapper`` (upstream's): ``g += wd * p`` and
            ``loss += wd * sum(p^2)``; with ``decoupled_weight_decay=True`` instead
            ``p <- p * (1 - lr * wd) - lr * step``.
        hparams: overrides of the weights' hyperparameters (e.g. ``train_phase=1``, the
            authors' ``celo_phase1``: the schedule is computed but not applied).
        tie_break: factored-dims rule for tied sizes (see
            :func:`~lopt_port.state_layout.factored_dims`).
        fused: as :class:`~lopt_port.VeLO` (the per-parameter kernels are VeLO's).

    State: as :class:`~lopt_port.VeLO` (per parameter accumulators and LSTM state, all rows of
    which are equal; globally ``iteration``, ``num_steps`` and the loss buffer). No horizon
    limit: the authors' optimizers do not average gradients for long runs.
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
            lstm=TensorLSTM(theta, carries_state=True),
            inputs=TrainingProgress(),
            heads=CeloHeads(self.hparams["train_phase"]),
            rule=MLPRule(self.hparams, theta, ff_mult=CELO_FF_MULT, tie_break=tie_break),
            decoupled_weight_decay=self.decoupled_weight_decay)
        super().__init__(params, defaults, fused=fused, tie_break=tie_break,
                         fused_path=self.parts.rule.fused_path,
                         global_state=self.parts.horizon.new_state)

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zero accumulators and the LSTM's initial state."""
        return self.parts.initial_state(p)

    def capture_intermediates(self) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """As :meth:`lopt_port.VeLO.capture_intermediates`."""
        return self._capturing({"step": {}, "tensors": {}})

    @torch.no_grad()
    def step(self, closure: Any = None, *, loss: Any = None) -> Any:
        """One Celo update of every parameter with a gradient; returns the closure's loss."""
        inputs = self._begin_step(closure, loss, skip_empty=True)
        if inputs.groups:
            velo(inputs, self.global_state, self.parts,
                 fused=all(self._fused_flags(inputs.params)), capture=self._capture)
        return inputs.returned
