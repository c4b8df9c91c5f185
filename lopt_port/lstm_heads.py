"""What the per-tensor LSTM's output ``h`` becomes: the step heads of VeLO, Celo and Celo-Adam.

Each head object returns ``(controls, lr_mult)`` for all tensors at once, and says how
``lr_mult`` is applied to the learned step (:meth:`applied`):

========== ===================================  ==================================  ==========
optimizer  controls (K per tensor)              lr_mult                             applied
========== ===================================  ==================================  ==========
VeLO       ``h W_c + b_c`` (raw)                ``h W_s + b_s`` (raw, unbounded)    always
Celo       ``softmax(h W_c + b_c)``             ``0.1 * exp(h W_s + b_s)`` (> 0)    phase > 1
Celo-Adam  none (``(n, 0)``)                    ``0.1 * exp(h W_s + b_s)``          always
========== ===================================  ==================================  ==========
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lopt_port.constants import CELO_LR_MULT_SCALE


def _linear(h: torch.Tensor, t: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return h @ t[f"rnn.{name}.weight"].T + t[f"rnn.{name}.bias"]


def schedule_lr_mult(h: torch.Tensor, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Celo's learned schedule, ``0.1 * exp(h W_s + b_s)``."""
    return CELO_LR_MULT_SCALE * torch.exp(_linear(h, t, "step_size")[:, 0])


class VeloHeads:
    """VeLO's two raw linear heads."""

    def __call__(self, h: torch.Tensor, t: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return _linear(h, t, "controls"), _linear(h, t, "step_size")[:, 0]

    def applied(self, lr_mult: torch.Tensor) -> torch.Tensor:
        """The per-tensor factor of the step: ``lr_mult`` itself."""
        return lr_mult


class CeloHeads:
    """Celo's heads: softmax controls and the learned schedule, which multiplies the step only
    after phase 1 (``train_phase > 1``; the released weights: 2)."""

    def __init__(self, train_phase: int) -> None:
        self.train_phase = train_phase

    def __call__(self, h: torch.Tensor, t: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(_linear(h, t, "controls"), dim=-1), schedule_lr_mult(h, t)

    def applied(self, lr_mult: torch.Tensor) -> torch.Tensor:
        """``lr_mult`` after phase 1, else ones (``1 * step`` is exact)."""
        return lr_mult if self.train_phase > 1 else torch.ones_like(lr_mult)


class CeloAdamHeads:
    """Celo-Adam's one head: the learned schedule (its weights have no controls head)."""

    def __call__(self, h: torch.Tensor, t: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return h.new_zeros((h.shape[0], 0)), schedule_lr_mult(h, t)

    def applied(self, lr_mult: torch.Tensor) -> torch.Tensor:
        """The per-tensor factor of the step: ``lr_mult`` itself."""
        return lr_mult
