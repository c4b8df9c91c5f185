"""The parts a step of VeLO's family is given (:func:`lopt_port.velo.velo`), and what each
part must provide.

=============  ============================================  ==================================
part           VeLO                                          Celo / Celo-Adam
=============  ============================================  ==================================
``horizon``    :class:`~lopt_port.loss_buffer.LossHorizon`   the same, never bugged
``lstm``       :class:`~lopt_port.tensor_lstm.TensorLSTM`    the same, always carries its state
``inputs``     :class:`~lopt_port.lstm_inputs.               :class:`~lopt_port.lstm_inputs.
               TensorStatistics`                             TrainingProgress`
``heads``      :class:`~lopt_port.lstm_heads.VeloHeads`      ``CeloHeads`` / ``CeloAdamHeads``
``rule``       :class:`~lopt_port.velo_mlp_rule.MLPRule`     ``MLPRule`` (no x100) /
                                                             :class:`~lopt_port.adam_rule.
                                                             AdamRule`
=============  ============================================  ==================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lopt_port.loss_buffer import LossHorizon
from lopt_port.optimizer import FusedPath
from lopt_port.sharding import Rounds, ShardSpec
from lopt_port.tensor_lstm import TensorLSTM


class LSTMInputs(Protocol):
    """The per-tensor LSTM's inputs, one row per tensor."""

    def eager(self, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
              specs: Sequence[ShardSpec | None], frac_feat: torch.Tensor,
              loss_features: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The rows, and ``mean(p^2)`` of the sharded tensors computed on the way."""
        ...

    def fused(self, params: Sequence[torch.Tensor], stats: Any, frac_feat: torch.Tensor,
              loss_features: torch.Tensor) -> torch.Tensor:
        """The rows from the fused rule's per-tensor statistics (if it has them)."""
        ...


class StepHeads(Protocol):
    """What the LSTM's output becomes."""

    def __call__(self, h: torch.Tensor, t: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(controls, lr_mult)`` for all tensors."""
        ...

    def applied(self, lr_mult: torch.Tensor) -> torch.Tensor:
        """The per-tensor factor the learned step is multiplied by."""
        ...


class ParameterRule(Protocol):
    """The per-parameter update, eager (per tensor) and fused (all tensors)."""

    fused_path: FusedPath

    def on_device(self, device: torch.device) -> Any:
        """The rule's constants on ``device`` (copied once)."""
        ...

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The rule's state of a parameter."""
        ...

    def tensor_weights(self, controls: torch.Tensor) -> list[Any]:
        """Each tensor's network weights from its controls (eager path)."""
        ...

    def update_rounds(self, p: torch.Tensor, state: dict[str, Any], g: torch.Tensor,
                      ff: Any, lr_mult: torch.Tensor, group: Mapping[str, Any],
                      mean_p2: torch.Tensor | None, *, decoupled_weight_decay: bool,
                      iteration: int | torch.Tensor,
                      capture: dict[str, Any] | None) -> Rounds:
        """One parameter's eager update, yielding its whole-tensor reductions; ``iteration``
        (updates before this one) is a tensor under ``torch.compile``."""
        ...

    def fused_begin(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    states: Sequence[dict[str, Any]], grad_wd: Sequence[float]) -> Any:
        """The fused work before the network; has ``mean_p2(index)`` for weight decay."""
        ...

    def fused_finish(self, prep: Any, controls: torch.Tensor, lr_mult: torch.Tensor,
                     groups: Sequence[Mapping[str, Any]], *, decoupled_weight_decay: bool,
                     iteration: int) -> None:
        """The fused work after the network: the parameter writes."""
        ...


@dataclass
class VeloParts:
    """One optimizer of VeLO's family: the parts its step is given (module docstring)."""

    horizon: LossHorizon
    lstm: TensorLSTM
    inputs: LSTMInputs
    heads: StepHeads
    rule: ParameterRule
    #: AdamW's convention (``p * (1 - lr * wd)``) instead of prefab's ``g += wd * p``.
    decoupled_weight_decay: bool

    def on_device(self, device: torch.device) -> None:
        """Copy every part's constants to ``device`` (each keeps its copies per device)."""
        self.horizon.on_device(device)
        self.lstm.on_device(device)
        self.rule.on_device(device)

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The rule's state, then the LSTM's."""
        return {**self.rule.initial_state(p), **self.lstm.initial_state(p)}
