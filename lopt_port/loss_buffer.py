"""The training loss and horizon as VeLO, Celo and Celo-Adam see them (upstream ``HyperV2``).

- The loss buffer: 10 moving averages of the loss with half-lives log-spaced from 10 to
  ``num_steps`` (``use_bugged_loss_features``: every decay ``exp(-0.1)``). Each step the loss
  is clipped from above to ``2 * |max bias-corrected mean|``, the averages and their running
  minima advance, and 9 loss features are read from the new buffer.
- The fraction of training done, ``t / T``, embedded as ``tanh(10 (t / T - c))`` for 9 centres.
- Prefab weight decay's loss term ``sum_tensors wd * sum(p^2)``.

The buffer lives in the optimizer's step-wide state (:meth:`LossHorizon.new_state`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lopt_port.constants import (
    VELO_FRACTION_SHARPNESS,
    VELO_FRACTION_TIMESCALES,
    VELO_LOSS_BUFFER_SIZE,
    VELO_LOSS_DEN_FLOOR,
    VELO_LOSS_RUNNING_MIN_INIT,
)


def loss_buffer_decays(num_steps: int, bugged: bool) -> np.ndarray:
    """``exp(-1 / halflife)`` for 10 half-lives ``logspace(1, log10(N), 10)``, float32.

    ``N = num_steps``, or 10 with ``use_bugged_loss_features`` (then every decay is
    ``exp(-0.1)``). Computed in float64 and rounded once: XLA's float32 ``log``/``pow``/``exp``
    are not correctly rounded, so upstream's values can differ from these by one float32 ulp.
    """
    n = 10 if bugged else num_steps
    f32 = np.float32
    stop = f32(np.log10(np.float64(n)))
    step = (np.arange(VELO_LOSS_BUFFER_SIZE - 1, dtype=f32) / f32(VELO_LOSS_BUFFER_SIZE - 1))
    lin = np.concatenate([f32(1) * (f32(1) - step) + stop * step, [stop]]).astype(f32)
    halflife = np.power(10.0, lin.astype(np.float64)).astype(f32)
    return np.exp(-1.0 / halflife.astype(np.float64)).astype(f32)


def weight_decay_loss(wd_n: list[float], mean_p2: torch.Tensor) -> torch.Tensor:
    """Prefab's ``sum_tensors wd * sum(p^2)``, as ``sum_i (wd_i * n_i) * mean(p_i^2)`` with the
    means of squares accumulated in float64 and rounded once (both paths alike)."""
    return torch.sum(torch.tensor(wd_n, dtype=torch.float32, device=mean_p2.device) * mean_p2)


def as_loss_tensor(loss: Any, device: torch.device) -> torch.Tensor:
    """The loss as a 0-d float32 tensor on ``device`` (a tensor stays where it is computed
    until then: no host sync)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
        return loss.detach().to(device=device, dtype=torch.float32).reshape(())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.full((), float(loss), dtype=torch.float32, device=device)
    raise TypeError(f"the loss must be a tensor or a float, got {type(loss).__name__}")


class LossHorizon:
    """The loss buffer and the training fraction of one optimizer (module docstring)."""

    def __init__(self, num_steps: int, bugged: bool) -> None:
        self.num_steps = num_steps
        self.decays = torch.from_numpy(loss_buffer_decays(num_steps, bugged))
        self._offsets: dict[torch.device, torch.Tensor] = {}

    def new_state(self, device: torch.device) -> dict[str, Any]:
        """The step-wide state a run starts with: ``iteration`` (a CPU tensor: reading it is
        no device sync), ``num_steps``, and the buffer's ``loss_means``, ``loss_running_min``
        and ``loss_decays`` on ``device``."""
        return {
            "iteration": torch.zeros((), dtype=torch.int64),
            "num_steps": self.num_steps,
            "loss_means": torch.zeros(VELO_LOSS_BUFFER_SIZE, dtype=torch.float32,
                                      device=device),
            "loss_running_min": torch.full((VELO_LOSS_BUFFER_SIZE,), VELO_LOSS_RUNNING_MIN_INIT,
                                           dtype=torch.float32, device=device),
            "loss_decays": self.decays.to(device)}

    def fraction(self, iteration: int) -> float:
        """``t / T`` in float32, as upstream computes it."""
        return float(np.float32(iteration) / np.float32(self.num_steps))

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The 9 centres ``c`` on ``device`` (copied once)."""
        if device not in self._offsets:
            self._offsets[device] = torch.tensor(VELO_FRACTION_TIMESCALES, dtype=torch.float32,
                                                 device=device)
        return self._offsets[device]

    def fraction_features(self, iteration: int | torch.Tensor,
                          device: torch.device) -> torch.Tensor:
        """``tanh(10 (t / T - c))`` for the 9 centres ``c``. ``t`` a number: ``t / T`` as
        :meth:`fraction`; a 0-d tensor (the count under ``torch.compile``): the same float32
        division, on the device."""
        offsets = self.on_device(device)
        if isinstance(iteration, torch.Tensor):
            t = iteration.to(device=device, dtype=torch.float32)
            fraction = t / float(np.float32(self.num_steps))
        else:
            fraction = torch.full_like(offsets, self.fraction(iteration))
        return torch.tanh((fraction - offsets) * VELO_FRACTION_SHARPNESS)

    @staticmethod
    def advance(glob: dict[str, Any], loss: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
        """Advance the buffer in ``glob`` (in place) with ``loss`` (``k`` updates so far); the
        9 loss features.

        ``k`` a number: Python branches on it. A 0-d tensor (the count under
        ``torch.compile``): the same values selected with ``torch.where`` (both branches
        computed; the one not taken is finite), and ``decays^(k+1)`` by a tensor power."""
        decays, means = glob["loss_decays"], glob["loss_means"]
        dynamic = isinstance(k, torch.Tensor)
        if dynamic:
            k = k.to(means.device)
        # decays^(k+1) rounded once from float64: what XLA's float32 pow returns here.
        power = (k + 1).to(torch.float64) if dynamic else k + 1
        corr = 1 - (decays.double() ** power).float()
        if dynamic:
            approx_max = torch.where(k == 0, loss, torch.max(means / corr))
        else:
            approx_max = loss if k == 0 else torch.max(means / corr)
        clipped = torch.minimum(torch.abs(approx_max) * 2, loss)
        # means*decays + clipped*(1-decays) as XLA fuses it: one fma.
        means = torch.addcmul(clipped * (1.0 - decays), means, decays)
        running_min = torch.minimum(glob["loss_running_min"], means / corr)
        glob["loss_means"].copy_(means)
        glob["loss_running_min"].copy_(running_min)
        if not dynamic and k + 1 <= 2:
            return torch.zeros(VELO_LOSS_BUFFER_SIZE - 1, dtype=torch.float32,
                               device=means.device)
        cor_mean = means / corr
        den = torch.clamp_min(cor_mean[1:] - running_min[:-1], VELO_LOSS_DEN_FLOOR)
        features = torch.clamp((cor_mean[:-1] - running_min[:-1]) / den - 1.0, -1.0, 1.0)
        if dynamic:
            return torch.where(k + 1 <= 2, torch.zeros_like(features), features)
        return features
