"""The per-tensor network of VeLO, Celo and Celo-Adam: mixing layers and a Haiku LSTM, run for
all tensors of a step at once (upstream ``HyperV2``'s ``rnn_params``).

For the inputs ``x`` (one row per tensor) and each tensor's previous state ``(h, c)``:
``x' = W2 x + b2 + max_tensors relu(W1 x + b1)`` (the max over all tensors mixes them), then
gates ``[i, g, f, o] = W [x', h] + b``, ``c' = sigmoid(f + 1) c + sigmoid(i) tanh(g)``,
``h' = sigmoid(o) tanh(c')``. What the output ``h'`` becomes (the heads) is the optimizer's
(:mod:`lopt_port.lstm_heads`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


class TensorLSTM:
    """The network's weights (``rnn.*`` and ``lstm_init_state.*`` of a converted state dict),
    their copies per device, and each parameter's LSTM state.

    ``carries_state``: whether a step keeps the new state (upstream's
    ``use_bugged_next_lstm_state`` keeps the old one forever).
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], carries_state: bool) -> None:
        self.weights = {k: v for k, v in weights.items()
                        if k.startswith(("rnn.", "lstm_init_state."))}
        self.carries_state = carries_state
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def on_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The weights on ``device`` (the heads read theirs from here)."""
        if device not in self._device_cache:
            self._device_cache[device] = {k: v.to(device) for k, v in self.weights.items()}
        return self._device_cache[device]

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """``lstm_hidden``/``lstm_cell`` ``(H,)``: copies, so that each parameter owns its LSTM
        state (in-place loaders such as torch.distributed.checkpoint write into it)."""
        return {name: self.weights[f"lstm_init_state.{part}"].reshape(-1).to(p.device,
                                                                            copy=True)
                for name, part in (("lstm_hidden", "hidden"), ("lstm_cell", "cell"))}

    def previous(self, states: Sequence[dict[str, Any]],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every tensor's ``(h, c)`` stacked on ``device``."""
        return (torch.stack([s["lstm_hidden"].to(device) for s in states]),
                torch.stack([s["lstm_cell"].to(device) for s in states]))

    def __call__(self, x: torch.Tensor, h_prev: torch.Tensor,
                 c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h', c')`` for all tensors at once (module docstring)."""
        t = self.on_device(x.device)
        mix = torch.relu(x @ t["rnn.mix.weight"].T + t["rnn.mix.bias"])
        v = torch.max(mix, dim=0, keepdim=True).values
        x2 = x @ t["rnn.input.weight"].T + t["rnn.input.bias"] + v
        gates = torch.cat([x2, h_prev], dim=-1) @ t["rnn.lstm.weight"].T + t["rnn.lstm.bias"]
        i, g, f, o = torch.chunk(gates, 4, dim=-1)
        c = torch.sigmoid(f + 1.0) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def carry(self, states: Sequence[dict[str, Any]], h: torch.Tensor,
              c: torch.Tensor) -> None:
        """Keep the new state in each parameter's state, in place (unless it is not
        carried)."""
        if not self.carries_state:
            return
        for i, s in enumerate(states):
            s["lstm_hidden"].copy_(h[i])
            s["lstm_cell"].copy_(c[i])
