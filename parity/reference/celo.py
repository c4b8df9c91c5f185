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
``params``/``gen_id``/``step`` wrapper).

:class:`CeloReference` is the whole update of either optimizer (the authors' ``update``), with
their state pytree (``State`` without ``params``/``state``; Celo-Adam's factored accumulator,
updated but never read, is left out). After the schedule:

* ``g = clip(grad, -1000, 1000)``; the moving averages of VeLO (Celo: 3 momentum, 1 rms,
  3 factored decays; Celo-Adam: ``m`` with 0.9, ``rms`` with 0.999);
* Celo: VeLO's ``_ff_mod`` with the weights ``mean_k(controls_k * bank_k)`` (no x100) and
  ``step <- lr_mult * step`` only when ``train_phase > 1``;
* Celo-Adam, ``t = iteration + 1``: ``m_hat = m / (1 - b1^t)``, ``v_hat = rms / (1 - b2^t)``,
  ``step = (m_hat * ((lr_mult * step_mult) / (eps + sqrt(v_hat + 1e-10))))[..., -1]``;
* ``p' = p - step``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from converters import flax_msgpack
from parity.reference.small_fc_lopt import _factored_update, factored_init
from parity.reference.upstream_rules import factored_dims, require
from parity.reference.velo import (
    F32,
    FRACTION_CENTRES,
    GRAD_CLIP,
    _ff_mod,
    _linear,
    _lstm_init_state,
    _StepConfig,
    interpolate,
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


@dataclass(frozen=True)
class _CeloConfig:
    kind: str
    momentum_decays: tuple[float, ...]
    rms_decays: tuple[float, ...]
    adafactor_decays: tuple[float, ...]
    train_phase: int
    epsilon: float
    step_mult: float
    mlp: _StepConfig | None


def _adam_step(cfg: _CeloConfig, iteration, lr_mult, p, m, rms):
    """The authors' Celo-Adam ``_ff_mod`` (``mom_decay=True``, ``param_scale_mult=False``)."""
    t = iteration + 1
    m_hat = m / (1 - cfg.momentum_decays[0] ** t)
    v_hat = rms / (1 - cfg.rms_decays[0] ** t)
    lr = lr_mult * cfg.step_mult
    step = (m_hat * (lr * 1.0 / (cfg.epsilon + jnp.sqrt(v_hat + 1e-10))))[..., -1]
    return p - step, {"m_hat": m_hat, "v_hat": v_hat, "update": step}


def _celo_step(cfg: _CeloConfig, theta, state, params, grads, loss):
    """One update of Celo or Celo-Adam (module docstring): params, state, intermediates."""
    names = sorted(params)
    buffer = loss_buffer_update(state["loss_buffer"], loss)
    x = lstm_inputs(state["iteration"], state["num_steps"], buffer)
    g = {n: jnp.clip(grads[n].astype(F32), -GRAD_CLIP, GRAD_CLIP) for n in names}
    p = {n: params[n].astype(F32) for n in names}
    d_m = jnp.asarray(cfg.momentum_decays, F32)
    d_r = jnp.clip(jnp.asarray(cfg.rms_decays, F32), 0.0, 1.0)
    mom, rms_acc = state["mom_rolling"], state["rms_rolling"]
    new_m = {n: d_m * mom["m"][n] + (1 - d_m) * g[n][..., None] for n in names}
    new_rms = {n: d_r * rms_acc["rms"][n] + (1 - d_r) * (g[n] * g[n])[..., None]
               for n in names}

    stack = jnp.tile(x[None], (len(names), 1))
    rnn = theta["rnn_params"]
    state_in = state["lstm_hidden_state"]
    hidden, state_out = lstm_forward(rnn, stack, state_in)
    lr_mult = LR_MULT_SCALE * jnp.exp(jnp.squeeze(_linear(hidden, rnn["step_size"]), -1))
    inter: dict[str, Any] = {"loss_features": x[len(FRACTION_CENTRES):], "lstm_input": stack,
                             "lstm_state_in": state_in, "lstm_state_out": state_out,
                             "lr_mult": lr_mult, "tensors": {}}
    new_state: dict[str, Any] = {
        "mom_rolling": {"m": new_m, "t": mom["t"] + 1},
        "rms_rolling": {"rms": new_rms, "t": rms_acc["t"] + 1},
        "num_steps": state["num_steps"], "iteration": state["iteration"] + 1,
        "lstm_hidden_state": state_out, "loss_buffer": buffer}
    new_params = {}
    if cfg.kind == "celo_adam":
        for i, n in enumerate(names):
            new_p, record = _adam_step(cfg, state["iteration"], lr_mult[i], p[n], new_m[n],
                                       new_rms[n])
            new_params[n] = new_p.astype(params[n].dtype)
            inter["tensors"][n] = {"g_clipped": g[n], **record}
    else:
        controls = jax.nn.softmax(_linear(hidden, rnn["rnn_to_controls"]), axis=-1)
        inter["controls"] = controls
        applied = lr_mult if cfg.train_phase > 1 else jnp.ones_like(lr_mult)
        fac = state["fac_rolling"]
        d_a = jnp.asarray(cfg.adafactor_decays, F32)
        new_fac: dict[str, dict] = {"v_col": {}, "v_row": {}, "v_diag": {}}
        for i, n in enumerate(names):
            v_row, v_col, v_diag, fac_g, row_f, col_f = _factored_update(
                fac["v_row"][n], fac["v_col"][n], fac["v_diag"][n], g[n], d_a,
                factored_dims(p[n].shape))
            new_fac["v_row"][n], new_fac["v_col"][n], new_fac["v_diag"][n] = (v_row, v_col,
                                                                                v_diag)
            w = interpolate(theta["ff_mod_stack"]["~"], controls[i], 1.0)
            new_p, record = _ff_mod(cfg.mlp, w, applied[i], p[n], g[n], new_m[n], new_rms[n],
                                    fac_g, v_row, v_col, v_diag, (row_f, col_f))
            new_params[n] = new_p.astype(params[n].dtype)
            inter["tensors"][n] = {"g_clipped": g[n], "fac_g": fac_g, **record}
        new_state["fac_rolling"] = new_fac
    new_state = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), new_state,
                                       dict(state))
    return new_params, new_state, inter


#: The hyperparameters each kind's update reads (the authors' constructor arguments).
HPARAMS_READ = {
    "celo": ("initial_momentum_decays", "initial_rms_decays", "initial_adafactor_decays",
             "ff_hidden_layers", "exp_mult", "step_mult", "train_phase"),
    "celo_adam": ("initial_momentum_decays", "initial_rms_decays", "initial_epsilon",
                  "step_mult"),
}


class CeloReference:
    """Celo (``kind="celo"``) or Celo-Adam (``"celo_adam"``) in JAX: the authors' update.

    ``hparams``: the dict a converted or loaded checkpoint carries (a ``theta.state`` has no
    configuration; the converters fill in the authors' factory settings, mulo-celo-spec B.3).
    """

    def __init__(self, theta: Mapping[str, Any], kind: str,
                 hparams: Mapping[str, Any]) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        require(hparams, HPARAMS_READ[kind], kind)
        self.kind = kind
        self.hparams = hp = dict(hparams)
        as_f32 = lambda a: jnp.asarray(a, dtype=F32)  # noqa: E731
        self.theta: dict[str, Any] = {
            "lstm_init_state": jax.tree_util.tree_map(
                as_f32, _lstm_init_state(theta["lstm_init_state"])),
            "rnn_params": jax.tree_util.tree_map(as_f32, dict(theta["rnn_params"]))}
        mlp = None
        if kind == "celo":
            self.theta["ff_mod_stack"] = {"~": jax.tree_util.tree_map(
                as_f32, dict(theta["ff_mod_stack"]["~"]))}
            mlp = _StepConfig(tuple(hp["initial_momentum_decays"]),
                              tuple(hp["initial_rms_decays"]),
                              tuple(hp["initial_adafactor_decays"]), hp["ff_hidden_layers"],
                              hp["exp_mult"], hp["step_mult"], False, 0.0, None, 1.0)
        self._config = _CeloConfig(
            kind, tuple(hp["initial_momentum_decays"]), tuple(hp["initial_rms_decays"]),
            tuple(hp.get("initial_adafactor_decays", ())), hp.get("train_phase", 2),
            hp.get("initial_epsilon", 0.0), hp["step_mult"], mlp)
        self._jit_init = jax.jit(self._init)
        self._jit_step = jax.jit(functools.partial(_celo_step, self._config, self.theta))

    @classmethod
    def from_file(cls, path: str | os.PathLike,
                  hparams: Mapping[str, Any] | None = None) -> CeloReference:
        """From a ``theta.state``, loaded as the converters load it: the kind told by its tree,
        the hyperparameters the given ``hparams`` completed with the factory settings and
        checked against theta's shapes."""
        from converters import load_upstream
        ckpt = load_upstream(path, **(hparams or {}))
        return cls(ckpt.tree, ckpt.kind, ckpt.hparams)

    def init(self, params: Mapping[str, jnp.ndarray], num_steps: int) -> dict[str, Any]:
        """The authors' initial state (jitted, ``num_steps`` traced)."""
        return self._jit_init(dict(params), jnp.asarray(num_steps, jnp.int32))

    def _init(self, params, num_steps):
        cfg = self._config
        n = len(params)
        state: dict[str, Any] = {
            "mom_rolling": {"m": {k: jnp.zeros((*p.shape, len(cfg.momentum_decays)), p.dtype)
                                  for k, p in params.items()},
                            "t": jnp.zeros((len(cfg.momentum_decays),), jnp.int32)},
            "rms_rolling": {"rms": {k: jnp.zeros((*p.shape, len(cfg.rms_decays)), p.dtype)
                                    for k, p in params.items()},
                            "t": jnp.zeros((len(cfg.rms_decays),), jnp.int32)},
            "num_steps": num_steps,
            "iteration": jnp.asarray(0, jnp.int32),
            "lstm_hidden_state": {k: jnp.tile(v, (n, 1))
                                  for k, v in self.theta["lstm_init_state"].items()},
            "loss_buffer": loss_buffer_init(num_steps),
        }
        if cfg.kind == "celo":
            state["fac_rolling"] = factored_init(params, len(cfg.adafactor_decays))
        return state

    def step(self, state: Mapping[str, Any], params: Mapping[str, jnp.ndarray],
             grads: Mapping[str, jnp.ndarray], loss: Any) -> tuple[dict, dict, dict]:
        """One jitted update: ``(new_params, new_state, intermediates)``; intermediates as
        :meth:`parity.reference.VeLOReference.step` (Celo-Adam per tensor: ``g_clipped``,
        ``m_hat``, ``v_hat``, ``update``)."""
        if loss is None:
            raise ValueError(f"{self.kind} needs the loss in every update")
        return self._jit_step(dict(state), dict(params), dict(grads), jnp.asarray(loss, F32))
