"""Feature math shared by the MLP-style learned optimizers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lopt_port.constants import NORMALIZER_EPS, TIME_FEATURE_TIMESCALES


def second_moment_normalize(x: torch.Tensor, mean_sq: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """``x * rsqrt(1e-5 + mean(x^2))`` per feature column (last axis), mean over all other axes.

    The mean runs over every element of the tensor (all leading axes), never over the feature
    axis. ``mean_sq`` (keepdim shape) supplies that mean when it was completed elsewhere (the
    other shards of a sharded tensor).
    """
    if mean_sq is None:
        mean_sq = torch.mean(x * x, dim=tuple(range(x.dim() - 1)), keepdim=True)
    return x * torch.rsqrt(NORMALIZER_EPS + mean_sq)


def timescales(device: torch.device | str) -> torch.Tensor:
    """The 11 timescales ``s`` of the training-step embedding, float32 on ``device``."""
    return torch.tensor(TIME_FEATURE_TIMESCALES, dtype=torch.float32, device=device)


def time_features(iteration: float | torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``tanh(t / s - 1)`` in float32; ``t`` is the number of updates before this one.

    A number ``t`` enters as a fill value, so nothing is copied from the host to the device;
    a 0-d float32 tensor (the step counter under ``torch.compile``) gives the same values.
    """
    t = (iteration.to(scales.device) if isinstance(iteration, torch.Tensor)
         else torch.full_like(scales, iteration))
    return torch.tanh(t / scales - 1.0)


def mlp_forward(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``x @ W.T + b`` per layer with ReLU between layers and none after the last.

    ``x`` is ``[rows, in]``; weights use the ``nn.Linear`` layout ``[out, in]``. When ``record``
    is given, the pre-ReLU activations of hidden layer ``i`` are stored under ``mlp_pre{i}``.
    """
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        x = torch.addmm(b, x, w.t())
        if i != last:
            if record is not None:
                record[f"mlp_pre{i}"] = x
            x = torch.relu(x)
    return x
