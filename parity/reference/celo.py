"""JAX reference of the learned schedule that Celo and Celo-Adam share (mulo-celo-spec B.6-B.7).

Both optimizers run VeLO's per-tensor LSTM on **global** inputs only, so every tensor's row is
the same and the network is a learned learning-rate schedule. Per update, with ``t`` the
updates done before it:

1. the loss buffer (VeLO's, always the non-bugged ``init(num_steps)``) takes the loss;
2. 18 inputs in sorted key order: ``fraction_left = tanh(10 (t / num_steps - c))`` for the 9
   centres ``c``, then the 9 loss features of the **updated** buffer;
3. VeLO's mixing layers and Haiku LSTM (the new state is always carried);
4. heads: ``lr_mult = 0.1 * exp(h W_s + b_s)`` (strictly positive; VeLO's is raw) and, for
   Celo, ``controls = softmax(h W_c + b_c)`` over the K = 1 bank (exactly 1).

The theta files are the authors' raw flax msgpack (``theta.state``: theta at the root, no
``params``/``gen_id``/``step`` wrapper). This module covers the schedule; the per-parameter
rules (Celo: VeLO's MLP with K = 1; Celo-Adam: bias-corrected Adam) build on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from converters import flax_msgpack
from parity.reference.velo import (
    F32,
    FRACTION_CENTRES,
    _linear,
    _lstm_init_state,
    loss_buffer_init,
    loss_buffer_update,
    loss_features,
    lstm_forward,
)

KINDS = ("celo", "celo_adam")
LR_MULT_SCALE = 0.1


def load_theta(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(kind, theta)`` of a Celo or Celo-Adam ``theta.state`` (a ``{params, gen_id, step}``
    wrapper, if present, is unwrapped); the kind is told by the per-parameter MLP bank."""
    root, _ = flax_msgpack.read_file(path)
    theta = root["params"] if {"params", "gen_id"} <= set(root) else root
    if set(theta) not in ({"lstm_init_state", "rnn_params", "ff_mod_stack"},
                          {"lstm_init_state", "rnn_params"}):
        raise ValueError(f"{os.fspath(path)}: not a Celo theta (root keys {sorted(theta)})")
    kind = "celo" if "ff_mod_stack" in theta else "celo_adam"
    tree = jax.tree_util.tree_map(lambda a: jnp.asarray(a, F32), theta)
    tree["lstm_init_state"] = _lstm_init_state(tree["lstm_init_state"])
    return kind, tree


def lstm_inputs(iteration: jnp.ndarray, num_steps: jnp.ndarray,
                buffer: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """The 18 inputs of one update: ``fraction_left`` (9) then ``loss_features`` (9)."""
    fraction = iteration / jnp.asarray(num_steps, F32)
    fraction_left = jnp.tanh((fraction - jnp.asarray(FRACTION_CENTRES, F32)) * 10)
    return jnp.concatenate([fraction_left, loss_features(buffer)], axis=0)


class CeloScheduler:
    """The schedule of Celo (``kind="celo"``) or Celo-Adam (``"celo_adam"``)."""

    def __init__(self, theta: Mapping[str, Any], kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.theta, self.kind = dict(theta), kind

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CeloScheduler:
        kind, theta = load_theta(path)
        return cls(theta, kind)

    def init(self, n_tensors: int, num_steps: int) -> dict[str, Any]:
        """The initial state: the LSTM's initial state on every row, an empty loss buffer."""
        lstm = {k: jnp.tile(v, (n_tensors, 1)) for k, v in self.theta["lstm_init_state"].items()}
        return {"lstm_hidden_state": lstm, "loss_buffer": loss_buffer_init(num_steps),
                "iteration": jnp.asarray(0, jnp.int32),
                "num_steps": jnp.asarray(num_steps, jnp.int32)}

    def step(self, state: Mapping[str, Any], loss: Any
             ) -> tuple[jnp.ndarray, dict[str, Any], dict[str, Any]]:
        """One update: ``(lr_mult (n,), new state, intermediates)``."""
        buffer = loss_buffer_update(state["loss_buffer"], jnp.asarray(loss, F32))
        x = lstm_inputs(state["iteration"], state["num_steps"], buffer)
        n = state["lstm_hidden_state"]["hidden"].shape[0]
        stack = jnp.tile(x[None], (n, 1))
        rnn = self.theta["rnn_params"]
        hidden, lstm = lstm_forward(rnn, stack, state["lstm_hidden_state"])
        lr_mult = LR_MULT_SCALE * jnp.exp(jnp.squeeze(_linear(hidden, rnn["step_size"]), -1))
        inter: dict[str, Any] = {"lstm_input": stack, "lr_mult": lr_mult,
                                 "loss_features": x[len(FRACTION_CENTRES):]}
        if self.kind == "celo":
            inter["controls"] = jax.nn.softmax(_linear(hidden, rnn["rnn_to_controls"]), axis=-1)
        new = {"lstm_hidden_state": lstm, "loss_buffer": buffer,
               "iteration": state["iteration"] + 1, "num_steps": state["num_steps"]}
        return lr_mult, new, inter
