"""JAX reference of small_fc_lopt (upstream ``AdafacMLPLOpt``), written from the spec.

Pure ``jax.numpy``, operation for operation as upstream HEAD computes it (spec section 2):
the same float32 order of operations, the same state pytree as upstream's
``AdafacMLPLOptState`` (without ``params``/``state``), the same ``numpy.argsort`` rule for the
factored dims. ``variant="pypi-0.0.1"`` switches the non-factored ``fac_mom_mult`` feature to
the 2022 wheel's ``m * v**-0.5``.

Two interfaces:

* :meth:`SmallFCLOptReference.step` ``(state, params, grads) -> (params', state', inter)``,
  jitted per tree structure and shapes, where ``inter`` holds per tensor ``fac_g``,
  ``features_raw``, ``mlp_input``, ``mlp_pre{i}``, ``mlp_output``, ``update``, and
  ``time_features``: the names :class:`lopt_port.SmallFCLOpt` records;
* :meth:`SmallFCLOptReference.optax` an ``optax.GradientTransformationExtraArgs``
  (``update(grads, state, params, loss=...)`` returns ``-step`` as the updates).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as onp
import optax

import converters
from converters import small_fc_lopt as small_fc_mapping
from parity.reference.upstream_rules import (
    TIME_FEATURE_TIMESCALES,
    TieBreak,
    factored_dims,
    require,
)

# Parity needs true float32 matmuls: JAX defaults to TF32 on Ampere/Hopper GPUs.
jax.config.update("jax_default_matmul_precision", "highest")

F32 = jnp.float32


def converted_theta(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(theta, hparams)`` of a checkpoint of ``kind``, read by the converters: an upstream
    folder (theta under the root's ``params``, or ``0`` in the tuple form) or a converted
    weights file; ``ValueError`` for another kind."""
    converted = converters.convert(path)
    if converted.kind != kind:
        raise ValueError(f"{path} is a {converted.kind} checkpoint, not {kind}")
    root = converted.upstream_tree()
    return root["params"] if "params" in root else root["0"], converted.hparams


def _decays(initial: Any, offsets: jnp.ndarray) -> jnp.ndarray:
    param = jnp.log(1 - jnp.asarray(initial, dtype=F32)) / 10.0 + offsets
    return 1 - jnp.exp(param * 10.0)


def _safe_rsqrt(x: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.rsqrt(jnp.maximum(x, 1e-9))


def _factored_update(v_row, v_col, v_diag, g, decays, dims):
    """Upstream ``factored_rolling`` for all decays at once (trailing decay axis)."""
    c = jnp.clip(decays, 0.0, 1.0)
    mix = 1.0 - c
    gs = (g * g + 1e-30)[..., None]
    if dims is None:
        v_diag = c * v_diag + mix * gs
        return v_row, v_col, v_diag, g[..., None] * _safe_rsqrt(v_diag + 1e-9), None, None
    d1, d0 = dims
    v_row = c * v_row + mix * jnp.mean(gs, axis=d0)
    v_col = c * v_col + mix * jnp.mean(gs, axis=d1)
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_col_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
    row_factor = _safe_rsqrt(v_row / (row_col_mean + 1e-9))
    col_factor = _safe_rsqrt(v_col)
    fac_g = g[..., None] * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
    return v_row, v_col, v_diag, fac_g, row_factor, col_factor


def factored_init(params: Mapping[str, jnp.ndarray], n_a: int,
                  tie_break: TieBreak = "numpy") -> dict[str, dict]:
    """Upstream's zero factored accumulators (``common.factored_rolling``'s ``init``, vmapped
    over ``A = n_a`` decays; upstream-spec 0): ``v_row`` (the shape without ``d0``) and
    ``v_col`` (without ``d1``) for factored tensors, ``v_diag`` (the full shape) otherwise, the
    unused ones ``(0, A)``; each with a trailing ``A`` axis."""
    v_row, v_col, v_diag = {}, {}, {}
    empty = jnp.zeros((0, n_a), F32)
    for name, p in params.items():
        dims = factored_dims(p.shape, tie_break)
        if dims is None:
            v_row[name], v_col[name] = empty, empty
            v_diag[name] = jnp.zeros((*p.shape, n_a), F32)
        else:
            d1, d0 = dims
            v_row[name] = jnp.zeros((*onp.delete(p.shape, d0), n_a), F32)
            v_col[name] = jnp.zeros((*onp.delete(p.shape, d1), n_a), F32)
            v_diag[name] = empty
    return {"v_col": v_col, "v_row": v_row, "v_diag": v_diag}


def _normalize(x: jnp.ndarray) -> jnp.ndarray:
    axes = tuple(range(x.ndim - 1))
    return x * jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def time_features(iteration: jnp.ndarray) -> jnp.ndarray:
    """``tanh(t / s - 1)`` with an int32 ``t``, as upstream's ``tanh_embedding``."""
    return jnp.tanh(iteration / jnp.asarray(TIME_FEATURE_TIMESCALES, dtype=F32) - 1.0)


#: Upstream's versions this reference computes: ``head`` (HEAD) and ``pypi-0.0.1`` (the 2022
#: wheel, non-factored ``fac_mom_mult = m * v**-0.5``; upstream-spec 5.2).
VARIANTS = ("head", "pypi-0.0.1")
#: The hyperparameters the update reads (``AdafacMLPLOpt``'s constructor arguments).
HPARAMS_READ = ("hidden_layers", "initial_momentum_decays", "initial_rms_decays",
                "initial_adafactor_decays", "exp_mult", "step_mult")


class SmallFCLOptReference:
    """small_fc_lopt in JAX, from an upstream theta tree and its hyperparameters (the dict a
    converted checkpoint carries; ``variant``, when given, overrides its ``variant``)."""

    def __init__(self, theta: Mapping[str, Any], hparams: Mapping[str, Any], *,
                 variant: str | None = None, tie_break: TieBreak = "numpy") -> None:
        require(hparams, HPARAMS_READ, "small_fc_lopt")
        variant = variant or hparams.get("variant", "head")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.hparams = {**hparams, "variant": variant}
        self.tie_break = tie_break
        self.theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=F32), dict(theta))
        n = self.hparams["hidden_layers"] + 1
        net = self.theta["nn"]["~"]
        self.layers = [(net[f"w{i}"], net[f"b{i}"]) for i in range(n)]
        self.decays = {
            "momentum": _decays(self.hparams["initial_momentum_decays"],
                                self.theta["momentum_decays"]),
            "rms": _decays(self.hparams["initial_rms_decays"], self.theta["rms_decays"]),
            "adafactor": _decays(self.hparams["initial_adafactor_decays"],
                                 self.theta["adafactor_decays"]),
        }
        self._jit_step = jax.jit(self._step)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> SmallFCLOptReference:
        """Build from an upstream checkpoint folder or a converted weights file."""
        return cls(*converted_theta(path, small_fc_mapping.KIND), **kwargs)

    def init(self, params: Mapping[str, jnp.ndarray], num_steps: int = 1) -> dict[str, Any]:
        """Upstream's initial state (``num_steps`` is stored, unused by the math)."""
        m, r, a = (len(self.decays[k]) for k in ("momentum", "rms", "adafactor"))
        return {
            "mom_rolling": {"m": {k: jnp.zeros((*p.shape, m), F32) for k, p in params.items()},
                            "t": jnp.zeros((m,), jnp.int32)},
            "rms_rolling": {"rms": {k: jnp.zeros((*p.shape, r), F32)
                                    for k, p in params.items()},
                            "t": jnp.zeros((r,), jnp.int32)},
            "fac_rolling_features": factored_init(params, a, self.tie_break),
            "num_steps": jnp.asarray(num_steps, jnp.int32),
            "iteration": jnp.asarray(0, jnp.int32),
        }

    def step(self, state: Mapping[str, Any], params: Mapping[str, jnp.ndarray],
             grads: Mapping[str, jnp.ndarray], loss: Any = None) -> tuple[dict, dict, dict]:
        """One update: ``(new_params, new_state, intermediates)`` (jitted; the loss is
        accepted for a uniform interface and unused, as upstream)."""
        del loss
        return self._jit_step(dict(state), dict(params), dict(grads))

    def _step(self, state, params, grads):
        d = self.decays
        mom, rms_acc = state["mom_rolling"], state["rms_rolling"]
        fac = state["fac_rolling_features"]
        tfeat = time_features(state["iteration"])
        new_m, new_rms, new_fac = {}, {}, {"v_col": {}, "v_row": {}, "v_diag": {}}
        new_params, inter = {}, {"time_features": tfeat}
        for name in params:
            p, g = params[name].astype(F32), grads[name].astype(F32)
            m = d["momentum"] * mom["m"][name] + (1 - d["momentum"]) * g[..., None]
            c = jnp.clip(d["rms"], 0.0, 1.0)
            rms = c * rms_acc["rms"][name] + (1 - c) * (g * g)[..., None]
            dims = factored_dims(p.shape, self.tie_break)
            v_row, v_col, v_diag, fac_g, row_f, col_f = _factored_update(
                fac["v_row"][name], fac["v_col"][name], fac["v_diag"][name], g,
                d["adafactor"], dims)
            new_m[name], new_rms[name] = m, rms
            new_fac["v_row"][name], new_fac["v_col"][name] = v_row, v_col
            new_fac["v_diag"][name] = v_diag
            new_p, record = self._apply(p, g, m, rms, fac_g, v_row, v_col, v_diag, row_f, col_f,
                                        dims, tfeat, self._scale(state, name))
            record["fac_g"] = fac_g
            new_params[name] = new_p.astype(params[name].dtype)
            inter[name] = record
        new_state = {
            "mom_rolling": {"m": new_m, "t": mom["t"] + 1},
            "rms_rolling": {"rms": new_rms, "t": rms_acc["t"] + 1},
            "fac_rolling_features": new_fac,
            "num_steps": state["num_steps"],
            "iteration": state["iteration"] + 1,
        }
        return new_params, new_state, inter

    def _scale(self, state, name):
        """The step's per-tensor multiplier (``None``: none; μLO's scale)."""
        del state, name
        return None

    def _apply(self, p, g, m, rms, fac_g, v_row, v_col, v_diag, row_f, col_f, dims, tfeat,
               scale=None):
        """Upstream ``_mod``: features, normalization, MLP, step (scalars as shape (1,)),
        ``p - step`` (``p - step * scale`` with a scale, as μLO)."""
        scalar = p.ndim == 0
        if scalar:
            p, g, m, rms, fac_g, v_diag = (jnp.expand_dims(x, 0)
                                           for x in (p, g, m, rms, fac_g, v_diag))
        rsqrt = jax.lax.rsqrt(rms + 1e-6)
        inps = [g[..., None], p[..., None], m, rms, m * rsqrt, rsqrt, fac_g]
        if dims is not None:
            d1, d0 = dims
            k = fac_g.shape[-1]
            row = jnp.broadcast_to(jnp.expand_dims(v_row, d0), (*p.shape, k))
            col = jnp.broadcast_to(jnp.expand_dims(v_col, d1), (*p.shape, k))
            mom_mult = m * jnp.expand_dims(row_f, d0) * jnp.expand_dims(col_f, d1)
        else:
            row = col = v_diag
            if self.hparams["variant"] == "head":
                mom_mult = m * (v_diag + 1e-6) ** -0.5
            else:
                mom_mult = m * v_diag ** -0.5
        inps += [row, col, jax.lax.rsqrt(row + 1e-8), jax.lax.rsqrt(col + 1e-8), mom_mult]
        raw = jnp.concatenate(inps, axis=-1)
        x = _normalize(raw)
        x = jnp.concatenate([x, jnp.broadcast_to(tfeat, (*p.shape, tfeat.shape[-1]))], -1)
        record = {"features_raw": raw, "mlp_input": x}
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + jnp.broadcast_to(b, (*x.shape[:-1], w.shape[-1]))
            if i != last:
                record[f"mlp_pre{i}"] = x
                x = jax.nn.relu(x)
        record["mlp_output"] = x
        direction, magnitude = x[..., 0], x[..., 1]
        step = direction * jnp.exp(magnitude * self.hparams["exp_mult"]) * self.hparams[
            "step_mult"]
        step = step.reshape(p.shape)
        if scale is not None:
            step = step * scale
        new_p = p - step
        if scalar:
            new_p, step = jnp.squeeze(new_p, 0), jnp.squeeze(step, 0)
        record["update"] = step
        return new_p, record

    def optax(self, num_steps: int = 1) -> optax.GradientTransformationExtraArgs:
        """The reference as an optax transformation; ``loss`` goes in ``extra_args``."""

        def init_fn(params):
            return self.init(params, num_steps)

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args  # small_fc_lopt does not read the loss
            if params is None:
                raise ValueError("small_fc_lopt needs params in update()")
            _, new_state, inter = self.step(state, params, updates)
            # -step, so that optax.apply_updates gives p + (-step) == p - step exactly
            return {k: -inter[k]["update"] for k in params}, new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

