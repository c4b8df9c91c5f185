"""Seeded random tasks for parity runs, and two small real models defined in JAX and PyTorch.

A lockstep :class:`Task` is a set of named float32 parameter tensors with a precomputed
gradient and loss per step (fed identically to both sides, whatever the params become):

* shapes of rank 0-4: scalars, odd-length vectors, ``(1, N)``/``(N, 1)``, size-1 dims in the
  middle, square matrices, tie shapes such as ``(a, a, b, b)``, conv-like kernels in both
  ``(k, k, in, out)`` and ``(out, in, k, k)`` layouts, odd sizes;
* gradients ``gscale * row_scale[axis 0] * col_scale[last axis] * (drift_t + N(0, 1))`` with
  each scale ``10**U[-1.5, 1.5]`` (3 decades per axis), 6% exact zeros, 1.5% outliers
  multiplied by ``10**U[1, 2]``, a mean that drifts from step to step, and now and then an
  all-zero gradient;
* a noisy decreasing loss ``3 exp(-t / 0.4T) + 0.5 + noise``.

:class:`RealTask` is a model (an MLP, or a small conv net) with one set of initial weights
and a seeded batch stream, whose loss is written in both frameworks so that each side
computes its own gradients in free-running mode. Both use PyTorch layouts (``[out, in]``,
``OIHW``) on both sides, so the tensors are identical.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Shape families; sizes stay small so a 20-step task runs in well under a second.
_FAMILIES: tuple[Callable[[np.random.Generator], tuple[int, ...]], ...] = (
    lambda r: (),
    lambda r: (int(r.integers(1, 12)),),
    lambda r: (1, int(r.integers(2, 20))),
    lambda r: (int(r.integers(2, 20)), 1),
    lambda r: (int(r.integers(2, 9)), 1, int(r.integers(2, 9))),
    lambda r: (lambda n: (n, n))(int(r.integers(2, 14))),
    lambda r: (int(r.integers(2, 24)), int(r.integers(2, 24))),
    lambda r: (lambda a, b: (a, a, b, b))(int(r.integers(2, 7)), int(r.integers(1, 4))),
    lambda r: (3, 3, int(r.integers(2, 7)), int(r.integers(2, 7))),
    lambda r: (int(r.integers(2, 7)), int(r.integers(2, 7)), 3, 3),
    lambda r: (int(r.integers(2, 6)), int(r.integers(1, 4)), int(r.integers(2, 6))),
    lambda r: (7, 13),
)


@dataclass
class Task:
    """Parameters, per-step gradients and losses for a lockstep run (all float32)."""

    name: str
    params: dict[str, np.ndarray]
    grads: list[dict[str, np.ndarray]]
    losses: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.grads)


def random_shapes(rng: np.random.Generator, n_min: int = 6, n_max: int = 10
                  ) -> list[tuple[int, ...]]:
    """A mix of shape families; always one scalar, one square and one tie shape."""
    n = int(rng.integers(n_min, n_max + 1))
    picks = [0, 5, 7, *list(rng.integers(0, len(_FAMILIES), size=max(n - 3, 0)))]
    return [_FAMILIES[i](rng) for i in picks]


def structured_grads(rng: np.random.Generator, shape: tuple[int, ...], steps: int
                     ) -> list[np.ndarray]:
    """Gradients with per-row/column scales over 3 decades, zeros, outliers and drift."""
    if len(shape) == 0:
        scale = np.asarray(10 ** rng.uniform(-1.5, 1.5))
    elif len(shape) == 1:
        scale = 10 ** rng.uniform(-1.5, 1.5, size=shape)
    else:
        rows = 10 ** rng.uniform(-1.5, 1.5, size=shape[0])
        cols = 10 ** rng.uniform(-1.5, 1.5, size=shape[-1])
        scale = rows.reshape((-1,) + (1,) * (len(shape) - 1)) * cols
    gscale = 10 ** rng.uniform(-2, 0)
    drift = rng.normal(scale=0.5)
    zero_step = int(rng.integers(0, steps)) if rng.uniform() < 0.3 else -1
    out = []
    for t in range(steps):
        g = gscale * scale * (drift * (1 + t / steps) + rng.normal(size=shape))
        g = np.where(rng.uniform(size=shape) < 0.06, 0.0, g)
        g = np.where(rng.uniform(size=shape) < 0.015, g * 10 ** rng.uniform(1, 2, size=shape), g)
        if t == zero_step:
            g = np.zeros(shape)
        out.append(np.asarray(g, dtype=np.float32))
    return out


def loss_sequence(rng: np.random.Generator, steps: int) -> np.ndarray:
    """A noisy decreasing loss."""
    t = np.arange(steps)
    loss = 3 * np.exp(-t / (0.4 * steps)) + 0.5 + rng.normal(scale=0.05, size=steps)
    return loss.astype(np.float32)


def make_task(seed: int, steps: int, shapes: list[tuple[int, ...]] | None = None) -> Task:
    """A seeded lockstep task (same seed, same task)."""
    rng = np.random.default_rng(seed)
    shapes = shapes if shapes is not None else random_shapes(rng)
    names = [f"t{i:02d}_{'x'.join(map(str, s)) or 'scalar'}" for i, s in enumerate(shapes)]
    params = {n: rng.normal(size=s).astype(np.float32) for n, s in zip(names, shapes,
                                                                       strict=True)}
    per_tensor = {n: structured_grads(rng, s, steps) for n, s in zip(names, shapes,
                                                                      strict=True)}
    grads = [{n: per_tensor[n][t] for n in names} for t in range(steps)]
    return Task(f"task{seed}", params, grads, loss_sequence(rng, steps))


def task_strategy(steps: int = 5) -> Any:
    """Hypothesis strategy of lockstep tasks: drawn shape families and a seed."""
    from hypothesis import strategies as st

    dim = st.integers(1, 9)
    # wide: an axis past one 16-lane group of the CPU kernels (their run and tail paths)
    wide = st.integers(16, 300)
    shape = st.one_of(st.just(()), st.tuples(dim), st.tuples(dim, dim),
                      st.tuples(dim, dim, dim), st.tuples(dim, dim, dim, dim),
                      dim.map(lambda n: (n, n)),
                      st.tuples(dim, st.integers(1, 3)).map(lambda ab: (ab[0], ab[0], ab[1],
                                                                        ab[1])),
                      st.tuples(wide), st.tuples(dim, wide), st.tuples(wide, dim),
                      st.tuples(dim, dim, wide))
    return st.builds(lambda shapes, seed: make_task(seed, steps, shapes),
                     st.lists(shape, min_size=1, max_size=6), st.integers(0, 2**31 - 1))


@dataclass
class RealTask:
    """A model with one set of initial weights, a batch stream and a loss in both frameworks.

    ``torch_loss(params, x, y)`` and ``jax_loss(params, x, y)`` take dicts of tensors named
    as ``init_params``; ``batch(t)`` is the step-``t`` batch as numpy arrays.
    """

    name: str
    init_params: dict[str, np.ndarray]
    seed: int
    batch_size: int
    make_batch: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    torch_loss: Callable[..., Any]
    jax_loss: Callable[..., Any]
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        if t not in self._cache:
            self._cache[t] = self.make_batch(np.random.default_rng([self.seed, t]),
                                             self.batch_size)
        return self._cache[t]


def _init_linear(rng, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    w = rng.normal(scale=1 / np.sqrt(fan_in), size=(fan_out, fan_in)).astype(np.float32)
    return w, np.zeros(fan_out, np.float32)


def _torch_xent(logits, y):
    import torch
    return torch.nn.functional.cross_entropy(logits, torch.as_tensor(y))


def _jax_xent(logits, y):
    import jax
    import jax.numpy as jnp
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=-1))


def mlp_task(seed: int = 0, sizes: tuple[int, ...] = (16, 24, 12, 4),
             batch_size: int = 32) -> RealTask:
    """A ReLU MLP classifying inputs labelled by a fixed random teacher network."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"l{i}.weight"], params[f"l{i}.bias"] = _init_linear(rng, a, b)
    teacher = rng.normal(size=(sizes[0], sizes[-1])).astype(np.float32)
    n = len(sizes) - 1

    def make_batch(r, bs):
        x = r.normal(size=(bs, sizes[0])).astype(np.float32)
        return x, np.argmax(x @ teacher, axis=-1).astype(np.int64)

    def torch_loss(p, x, y):
        import torch
        h = torch.as_tensor(x)
        for i in range(n):
            h = torch.nn.functional.linear(h, p[f"l{i}.weight"], p[f"l{i}.bias"])
            h = torch.relu(h) if i < n - 1 else h
        return _torch_xent(h, y)

    def jax_loss(p, x, y):
        import jax
        h = x
        for i in range(n):
            h = h @ p[f"l{i}.weight"].T + p[f"l{i}.bias"]
            h = jax.nn.relu(h) if i < n - 1 else h
        return _jax_xent(h, y)

    return RealTask("mlp", params, seed, batch_size, make_batch, torch_loss, jax_loss)


def conv_task(seed: int = 0, batch_size: int = 16) -> RealTask:
    """Two 3x3 convolutions (OIHW), global average pooling and a linear classifier."""
    rng = np.random.default_rng(seed)
    params = {
        "c0.weight": rng.normal(scale=1 / 3, size=(6, 1, 3, 3)).astype(np.float32),
        "c0.bias": np.zeros(6, np.float32),
        "c1.weight": rng.normal(scale=1 / np.sqrt(54), size=(8, 6, 3, 3)).astype(np.float32),
        "c1.bias": np.zeros(8, np.float32),
    }
    params["fc.weight"], params["fc.bias"] = _init_linear(rng, 8, 3)
    protos = rng.normal(size=(3, 1, 8, 8)).astype(np.float32)

    def make_batch(r, bs):
        y = r.integers(0, 3, size=bs)
        x = protos[y] + r.normal(scale=0.8, size=(bs, 1, 8, 8))
        return x.astype(np.float32), y.astype(np.int64)

    def torch_loss(p, x, y):
        import torch
        f = torch.nn.functional
        h = torch.relu(f.conv2d(torch.as_tensor(x), p["c0.weight"], p["c0.bias"]))
        h = torch.relu(f.conv2d(h, p["c1.weight"], p["c1.bias"]))
        return _torch_xent(f.linear(h.mean(dim=(2, 3)), p["fc.weight"], p["fc.bias"]), y)

    def jax_loss(p, x, y):
        import jax

        def conv(h, w, b):
            out = jax.lax.conv_general_dilated(h, w, (1, 1), "VALID",
                                               dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return jax.nn.relu(out + b[None, :, None, None])

        h = conv(conv(x, p["c0.weight"], p["c0.bias"]), p["c1.weight"], p["c1.bias"])
        return _jax_xent(h.mean(axis=(2, 3)) @ p["fc.weight"].T + p["fc.bias"], y)

    return RealTask("conv", params, seed, batch_size, make_batch, torch_loss, jax_loss)


REAL_TASKS: dict[str, Callable[..., RealTask]] = {"mlp": mlp_task, "conv": conv_task}
