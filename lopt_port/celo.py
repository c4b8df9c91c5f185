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

from collections.abc import Mapping
from typing import Any

import torch

from lopt_port import celo_config as cfg
from lopt_port.constants import CELO_FF_MULT
from lopt_port.loss_buffer import LossHorizon
from lopt_port.lstm_heads import CeloHeads
from lopt_port.lstm_inputs import TrainingProgress
from lopt_port.optimizer import WeightsKind
from lopt_port.state_layout import TieBreak
from lopt_port.tensor_lstm import TensorLSTM
from lopt_port.velo import VeloFamily
from lopt_port.velo_mlp_rule import MLPRule
from lopt_port.velo_parts import ParameterRule, StepHeads, VeloParts

KIND = WeightsKind(
    "celo", lambda given, shapes: cfg.resolve_hparams("celo", given, shapes),
    lambda sd, hparams, origin: cfg.check_state_dict("celo", sd, hparams, origin))


def schedule_parts(weights: Mapping[str, torch.Tensor], num_steps: int,
                   decoupled_weight_decay: bool, *, heads: StepHeads,
                   rule: ParameterRule) -> VeloParts:
    """The parts Celo and Celo-Adam share: the non-bugged loss buffer, an LSTM that always
    carries its state, the 18 global inputs (a learned schedule); with their heads and rule."""
    return VeloParts(horizon=LossHorizon(num_steps, bugged=False),
                     lstm=TensorLSTM(weights, carries_state=True), inputs=TrainingProgress(),
                     heads=heads, rule=rule, decoupled_weight_decay=decoupled_weight_decay)


def celo_parts(hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *,
               num_steps: int, decoupled_weight_decay: bool, tie_break: TieBreak) -> VeloParts:
    """Celo's parts: softmax controls and the schedule (applied after phase 1), VeLO's MLP rule
    without the x100."""
    return schedule_parts(
        weights, num_steps, decoupled_weight_decay, heads=CeloHeads(hparams["train_phase"]),
        rule=MLPRule(hparams, weights, ff_mult=CELO_FF_MULT, tie_break=tie_break))


class Celo(VeloFamily):
    """Celo: VeLO's per-parameter MLP driven by a learned schedule (module docstring).

    Args: as :class:`~lopt_port.velo.VeloFamily`; ``lr = 1.0`` is the authors' optimizer;
    ``weights``: e.g. ``lopt-convert checkpoints/celo``; ``hparams``: overrides of the
    weights' hyperparameters (e.g. ``train_phase=1``, the authors' ``celo_phase1``: the
    schedule is computed but not applied); ``fused`` runs VeLO's per-parameter kernels. No
    horizon limit: the authors' optimizers do not average gradients for long runs.

    State: as :class:`~lopt_port.VeLO` (per parameter accumulators and LSTM state, all rows of
    which are equal; globally ``iteration``, ``num_steps`` and the loss buffer), and so are
    :meth:`capture_intermediates`' records.
    """

    kind = KIND
    recipe = staticmethod(celo_parts)
