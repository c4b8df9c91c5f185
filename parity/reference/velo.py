"""JAX reference of VeLO (upstream ``HyperV2``, ``research/general_lopt/hyper_v2.py``).

Written from the spec (``upstream-spec.md`` section 3) in pure ``jax.numpy``, operation for
operation as upstream HEAD computes it, with upstream's state pytree (``hyper_v2.State``
without ``params``/``state``). One update, in upstream's order:

1. Loss buffer (10 EMAs, ``BufferLossAccumulators``), ``k`` = iteration before the update:
   ``cm = means / (1 - decays^(k+1))``, ``amax = max(cm)`` (``loss`` when ``k == 0``),
   ``loss_c = min(2|amax|, loss)``, ``means' = means*decays + loss_c*(1 - decays)``,
   ``running_min' = min(running_min, means' / (1 - decays^(k+1)))``. The 9 loss features come
   from the *new* buffer (``k' = k + 1``): ``cm = means' / (1 - decays^k')``,
   ``clip((cm[:-1] - rmin[:-1]) / max(1e-8, cm[1:] - rmin[:-1]) - 1, -1, 1)``, zeros while
   ``k' <= 2``. The decays are ``exp(-1/logspace(1, log10(N), 10))`` with ``N = num_steps``,
   or ``N = 10`` (all ``exp(-0.1)``) with ``use_bugged_loss_features``.
2. ``g = clip(grad, -1000, 1000)``, used everywhere below.
3. Per tensor LSTM input (30 columns, sorted feature names), from the params and the *old*
   momentum ``m`` and rms ``v``: ``nm = rsqrt(max(1e-9, mean(p^2)))``,
   ``fraction_left = tanh((t/N - c) * 10)`` for 9 ``c``, the 9 loss features,
   ``mean_rms = L(mean(nm*v))``, ``rank = one_hot(#dims > 1, 5)``,
   ``var_m = L(mean((nm*m - mean(nm*m))^2))`` (3) and ``var_rms = L(mean((nm*v -
   mean(nm*m))^2))`` (3: upstream subtracts the *momentum* mean), with
   ``L(x) = 0.5 * clip(log(1e-8 + |10 x|), -5, 5)``.
4. Per tensor network over the ``(n, 30)`` stack ``x`` (rows = sorted tensor names):
   ``v = max_rows relu(x W1 + b1)``, ``x' = x W2 + b2 + v`` (the first mixing layer ``linear``
   is computed and discarded upstream, so it is not computed here); Haiku LSTM
   ``[i, g, f, o] = [x', h] Wr + br``, ``c' = sigmoid(f + 1) c + sigmoid(i) tanh(g)``,
   ``h' = sigmoid(o) tanh(c')``; ``controls = h' Wc + bc`` (n, K) and
   ``lr_mult = h' Ws + bs`` (n,), raw. The LSTM state carried forward is ``(h', c')`` (the
   incoming one with ``use_bugged_next_lstm_state``), times ``1 - rnn_state_decay`` when that
   is positive.
5. Accumulators from ``g`` with the fixed float32 decays: ``m' = d m + (1-d) g``,
   ``v' = c v + (1-c) g^2``, factored Adafactor statistics (spec section 0).
6. Per tensor MLP weights ``W_i = 100 * mean_k(controls[i, k] * stack[k])`` and the step from
   the *new* accumulators: 14 feature groups (30 columns), each normalized by
   ``x * rsqrt(1e-5 + mean(x^2))`` over all parameter axes; layer 0 is the sequential sum
   ``0 + sum_j group_j @ w0__j`` then ``+ b0``; ReLU hidden layers; output ``o`` (3 columns,
   the third unused). ``step = lr_mult * (o0 * (param_scale * exp(o1 * exp_mult)) *
   step_mult)`` with ``param_scale = sqrt(mean(p^2) + 1e-9)``; ``p' = p - step``.

:meth:`VeLOReference.step` is jitted with theta closed over, as upstream's ``opt_fn(theta)``
update is, so that XLA sees the same constant weights: on the golden cases the jitted state
is bit-identical to upstream's (with theta passed as jit arguments the LSTM state differs by
up to 9e-7 relative), and the eager (``jax.disable_jit()``) intermediates are bit-identical
to upstream's eager ones.

Scalars are handled as shape ``(1,)`` inside the MLP, as upstream does. Factored dims use
``numpy.argsort`` as upstream (:func:`parity.reference.upstream_rules.factored_dims`).
Parameters are computed in float32 and cast back to their dtype (upstream would compute a
bfloat16 parameter's features in bfloat16; only float32 is checked against upstream).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as onp
import optax

from converters import flax_msgpack
from converters.gin_config import read_gin
from parity.reference.small_fc_lopt import _factored_update, _normalize, factored_init
from parity.reference.upstream_rules import factored_dims

# Parity needs true float32 matmuls: JAX defaults to TF32 on Ampere/Hopper GPUs.
jax.config.update("jax_default_matmul_precision", "highest")

F32 = jnp.float32
UPSTREAM_CLASS = "HyperV2"

#: Flags whose non-default value changes the math in ways this reference does not implement.
ABLATION_FLAGS = (
    "with_g", "with_m", "with_m_feat", "with_rms", "with_rms_feat", "with_rms_norm_g",
    "with_rsqrt_rms", "with_p", "with_fac_norm_g", "with_fac_rms", "with_fac_rsqrt",
    "with_grad_clip_feat", "with_fac_mom_mult", "with_rms_only_norm_g",
    "adafactor_accumulator", "param_scale_mult", "mix_layers",
)
_MUST_BE_FALSE = ("precondition_output", "constant_loss", "with_validation_feature_dim")

#: Upstream ``HyperV2.__init__`` defaults (spec section 3.1).
HPARAM_DEFAULTS: dict[str, Any] = {
    "lstm_hidden_size": 128, "ff_hidden_size": 4, "ff_hidden_layers": 2,
    "initial_momentum_decays": (0.9, 0.99, 0.999), "initial_rms_decays": (0.999,),
    "initial_adafactor_decays": (0.9, 0.99, 0.999), "param_inits": 64,
    "exp_mult": 0.001, "step_mult": 0.001, "validation_mode": False,
    **{flag: True for flag in ABLATION_FLAGS},
    **{flag: False for flag in _MUST_BE_FALSE},
    "use_bugged_next_lstm_state": False, "use_bugged_loss_features": True,
    "reparam_decay": 10.0, "rnn_state_decay": 0.0,
    "summarize_each_layer": False, "summarize_all_control": False,
    "clip_param_scale_amount": None,
    "ff_mult": 100.0,  # the Celo authors' HyperV2 argument; upstream hard-codes 100
}

#: Centres of the ``fraction_left`` embedding ``tanh((t/N - c) * 10)``.
FRACTION_CENTRES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
LOSS_BUFFER_SIZE = 10
GRAD_CLIP = 1000.0

#: Private switches that reproduce known porting mistakes, for negative-control tests only.
NEGATIVE_CONTROLS = (
    "lstm_new_accumulators",  # LSTM features from this step's updated m and rms
    "var_rms_own_mean",  # var_rms centred on the rms mean (broadcast to the 3 m columns)
)


def normalize_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream defaults filled in; raises ``ValueError`` naming an unknown or unsupported
    argument (one whose math this reference does not implement)."""
    unknown = sorted(set(hparams) - set(HPARAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown HyperV2 argument(s): {', '.join(unknown)}")
    hp = {**HPARAM_DEFAULTS, **hparams}
    for flag in ABLATION_FLAGS:
        if hp[flag] is not True:
            raise ValueError(f"{flag}={hp[flag]!r} is not implemented (only True)")
    for flag in _MUST_BE_FALSE:
        if hp[flag] is not False:
            raise ValueError(f"{flag}={hp[flag]!r} is not implemented (only False)")
    if hp["clip_param_scale_amount"] is not None:
        raise ValueError(f"clip_param_scale_amount={hp['clip_param_scale_amount']!r} is not "
                         "implemented (only None)")
    for key in ("initial_momentum_decays", "initial_rms_decays", "initial_adafactor_decays"):
        hp[key] = tuple(float(d) for d in hp[key])
    for key in ("lstm_hidden_size", "ff_hidden_size", "ff_hidden_layers", "param_inits"):
        hp[key] = int(hp[key])
    for key in ("exp_mult", "step_mult", "rnn_state_decay", "ff_mult"):
        hp[key] = float(hp[key])
    return hp


def _lstm_init_state(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{hidden, cell}`` from a Haiku ``LSTMState`` as any flax version serialized it."""
    if "values" in tree:  # pre-July-2021 flax namedtuple envelope
        tree = tree["values"]
    if "hidden" in tree:
        return {"hidden": tree["hidden"], "cell": tree["cell"]}
    return {"hidden": tree["0"], "cell": tree["1"]}


def _check_theta(theta: Mapping[str, Any], hp: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` when theta's shapes disagree with the hyperparameters."""
    h, k, ff = hp["lstm_hidden_size"], hp["param_inits"], hp["ff_hidden_size"]
    n_layers = hp["ff_hidden_layers"]
    n_m, n_r, n_a = (len(hp[f"initial_{x}_decays"]) for x in ("momentum", "rms", "adafactor"))
    n_in = 2 * len(FRACTION_CENTRES) + n_r + 5 + n_m + max(n_m, n_r)
    expected = {("rnn_params", "linear_1", "w"): (n_in, h),
                ("rnn_params", "linear_2", "w"): (n_in, h),
                ("rnn_params", "rnn/linear", "w"): (2 * h, 4 * h),
                ("rnn_params", "rnn_to_controls", "w"): (h, k),
                ("rnn_params", "step_size", "w"): (h, 1)}
    widths = (1, 1, 1, n_m, n_r, max(n_m, n_r), n_r, n_a, n_r, n_a, n_a, n_a, n_a, max(n_m, n_a))
    for j, width in enumerate(widths):
        expected[("ff_mod_stack", "~", f"w0__{j}")] = (k, width, 3 if n_layers == 0 else ff)
    for i in range(1, n_layers + 1):
        expected[("ff_mod_stack", "~", f"w{i}")] = (k, ff, 3 if i == n_layers else ff)
    got = {path: onp.shape(v) for path, v in flax_msgpack.flatten(dict(theta)).items()}
    init_state = _lstm_init_state(theta["lstm_init_state"])
    got.update({("lstm_init_state", key): onp.shape(v) for key, v in init_state.items()})
    expected.update({("lstm_init_state", key): (1, h) for key in ("hidden", "cell")})
    for path, shape in expected.items():
        if got.get(path) != shape:
            raise ValueError(f"theta {' > '.join(path)} has shape {got.get(path)}, expected "
                             f"{shape} for lstm_hidden_size={h}, param_inits={k}, "
                             f"ff_hidden_size={ff}, ff_hidden_layers={n_layers} and "
                             f"{n_m}/{n_r}/{n_a} momentum/rms/adafactor decays")


def _clip_log_abs(v: jnp.ndarray) -> jnp.ndarray:
    """``0.5 * clip(log(1e-8 + |10 v|), -5, 5)`` in upstream's order."""
    return jnp.clip(jnp.log(1e-8 + jnp.abs(v * 10.0)), -5, 5) * 0.5


def loss_buffer_init(num_steps: Any) -> dict[str, jnp.ndarray]:
    """Upstream ``BufferLossAccumulators.init``: 10 half-lives logspaced from 10 to N."""
    decays = jnp.exp(-1.0 / jnp.logspace(1, jnp.log10(num_steps), LOSS_BUFFER_SIZE))
    return {"means": jnp.zeros((LOSS_BUFFER_SIZE,), F32),
            "iteration": jnp.asarray(0, jnp.int32),
            "running_min": 999999999999.0 * jnp.ones((LOSS_BUFFER_SIZE,), F32),
            "decays": decays}


def loss_buffer_update(buf: Mapping[str, jnp.ndarray], loss: jnp.ndarray
                       ) -> dict[str, jnp.ndarray]:
    """Upstream ``BufferLossAccumulators.update`` (the loss is clipped from above only)."""
    decays, k = buf["decays"], buf["iteration"]
    approx_max = jnp.max(buf["means"] / (1 - decays ** (k + 1)))
    approx_max = jnp.where(k == 0, loss, approx_max)
    loss = jnp.minimum(jnp.abs(approx_max) * 2, loss)
    means = buf["means"] * decays + loss * (1.0 - decays)
    running_min = jnp.minimum(buf["running_min"], means / (1 - decays ** (k + 1)))
    return {"means": means, "iteration": k + 1, "running_min": running_min, "decays": decays}


def loss_features(buf: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """Upstream ``BufferLossAccumulators.features``: 9 values in [-1, 1]."""
    cor_mean = buf["means"] / (1 - buf["decays"] ** buf["iteration"])
    running_min = buf["running_min"][:-1]
    den = jnp.maximum(1e-8, cor_mean[1:] - running_min)
    feature = jnp.clip((cor_mean[:-1] - running_min) / den - 1.0, -1, 1)
    return jnp.where(buf["iteration"] <= 2, feature * 0, feature)


def lstm_features(p: jnp.ndarray, m: jnp.ndarray, rms: jnp.ndarray,
                  fraction_trained: jnp.ndarray, loss_feats: jnp.ndarray,
                  bug: str | None = None) -> jnp.ndarray:
    """Upstream ``lstm_features_for_tensor``: the tensor's 30 LSTM inputs (spec 3.4)."""
    norm_mult = jax.lax.rsqrt(jnp.maximum(1e-9, jnp.mean(jnp.square(p))))
    m, rms = m * norm_mult, rms * norm_mult
    axes = tuple(range(p.ndim))
    mean_m = jnp.mean(m, axis=axes, keepdims=True)
    var_m = jnp.mean(jnp.square(m - mean_m), axis=axes)
    mean_rms = jnp.mean(rms, axis=axes, keepdims=True)
    centre = mean_rms if bug == "var_rms_own_mean" else mean_m
    var_rms = jnp.mean(jnp.square(rms - centre), axis=axes)
    if bug == "var_rms_own_mean":
        var_rms = jnp.broadcast_to(var_rms, var_m.shape)
    centres = jnp.asarray(FRACTION_CENTRES, F32)
    features = {  # concatenated in sorted key order, as upstream does
        "fraction_left": jnp.tanh((fraction_trained - centres) * 10),
        "loss_features": loss_feats,
        "mean_rms": _clip_log_abs(jnp.reshape(mean_rms, (mean_rms.shape[-1],))),
        "rank": jax.nn.one_hot(sum(d > 1 for d in p.shape), 5, dtype=F32),
        "var_m": _clip_log_abs(var_m),
        "var_rms": _clip_log_abs(var_rms),
    }
    return jnp.concatenate([features[key] for key in sorted(features)], axis=0)


def _linear(x: jnp.ndarray, layer: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """``hk.Linear``: ``dot(x, w) + broadcast(b)``."""
    out = jnp.dot(x, layer["w"])
    return out + jnp.broadcast_to(layer["b"], out.shape)


def rnn_forward(rnn_params: Mapping[str, Any], x: jnp.ndarray,
                lstm_state: Mapping[str, jnp.ndarray]
                ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    """Upstream ``_rnn_forward``: ``(controls (n, K), lr_mult (n,), {hidden, cell})``.

    ``v = max_rows relu(x W1 + b1)``, ``x' = x W2 + b2 + v``, then the Haiku LSTM (gates
    ``[i, g, f, o]``, forget bias +1) and the two linear heads. Upstream's first mixing layer
    ``linear`` is overwritten before use; it is not computed here.
    """
    hidden, new_state = lstm_forward(rnn_params, x, lstm_state)
    controls = _linear(hidden, rnn_params["rnn_to_controls"])
    lr_mult = jnp.squeeze(_linear(hidden, rnn_params["step_size"]), -1)
    return controls, lr_mult, new_state


def lstm_forward(rnn_params: Mapping[str, Any], x: jnp.ndarray,
                 lstm_state: Mapping[str, jnp.ndarray]
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The mixing layers and the Haiku LSTM of ``_rnn_forward``: ``(hidden, {hidden, cell})``."""
    v = jnp.max(jax.nn.relu(_linear(x, rnn_params["linear_1"])), axis=0, keepdims=True)
    x = _linear(x, rnn_params["linear_2"]) + v
    gated = _linear(jnp.concatenate([x, lstm_state["hidden"]], axis=-1),
                    rnn_params["rnn/linear"])
    i, g, f, o = jnp.split(gated, 4, axis=-1)
    cell = jax.nn.sigmoid(f + 1) * lstm_state["cell"] + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
    return hidden, {"hidden": hidden, "cell": cell}


def interpolate(bank: Mapping[str, jnp.ndarray], control: jnp.ndarray,
                ff_mult: float = 100.0) -> dict[str, jnp.ndarray]:
    """``ff_mult * mean_k(control[k] * leaf[k])`` for every leaf of the ``(K, ...)`` MLP bank
    (upstream hard-codes ``ff_mult`` = 100; the Celo authors' HyperV2 exposes it)."""
    return {name: ff_mult * jnp.mean(leaf * control.reshape((-1,) + (1,) * (leaf.ndim - 1)),
                                   axis=0)
            for name, leaf in bank.items()}


@dataclass(frozen=True)
class _StepConfig:
    """The hyperparameters the update reads (static under ``jit``)."""

    momentum_decays: tuple[float, ...]
    rms_decays: tuple[float, ...]
    adafactor_decays: tuple[float, ...]
    ff_hidden_layers: int
    exp_mult: float
    step_mult: float
    use_bugged_next_lstm_state: bool
    rnn_state_decay: float
    bug: str | None
    ff_mult: float


def _ff_mod(cfg: _StepConfig, w: Mapping[str, jnp.ndarray], lr_mult, p, g, m, rms, fac_g,
            v_row, v_col, v_diag, factors):
    """Upstream ``_ff_mod`` with the interpolated weights ``w``: features, MLP, step."""
    shape = p.shape
    dims = factored_dims(shape)
    if p.ndim == 0:
        p, g, m, rms, fac_g, v_diag = (jnp.expand_dims(x, 0)
                                       for x in (p, g, m, rms, fac_g, v_diag))
    rsqrt = jax.lax.rsqrt(rms + 1e-6)
    groups = [g[..., None], jnp.clip(g, -0.1, 0.1)[..., None], p[..., None], m, rms,
              m * rsqrt, rsqrt, fac_g, g[..., None] * rsqrt]
    if dims is not None:
        d1, d0 = dims
        row_factor, col_factor = factors
        row = jnp.broadcast_to(jnp.expand_dims(v_row, d0), fac_g.shape)
        col = jnp.broadcast_to(jnp.expand_dims(v_col, d1), fac_g.shape)
        mom_mult = m * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
    else:
        row = col = v_diag
        mom_mult = m * v_diag ** -0.5  # no epsilon: HyperV2 never got the 2022 fix
    groups += [row, col, jax.lax.rsqrt(row + 1e-8), jax.lax.rsqrt(col + 1e-8), mom_mult]
    normalized = [_normalize(x) for x in groups]

    record = {"ff_params": w, "features_raw": jnp.concatenate(groups, axis=-1),
              "mlp_input": jnp.concatenate(normalized, axis=-1)}
    x = jnp.zeros((*p.shape, w["b0"].shape[-1]), F32)
    for j, group in enumerate(normalized):
        x = x + group @ w[f"w0__{j}"]
    last = cfg.ff_hidden_layers
    for i in range(last + 1):
        if i > 0:
            x = x @ w[f"w{i}"]
        x = x + jnp.broadcast_to(w[f"b{i}"], x.shape)
        if i != last:
            record[f"mlp_pre{i}"] = x
            x = jax.nn.relu(x)
    record["mlp_output"] = x
    magnitude = jnp.exp(x[..., 1] * cfg.exp_mult)
    param_scale = jnp.sqrt(jnp.mean(jnp.square(p)) + 1e-9)
    step = x[..., 0] * (param_scale * magnitude) * cfg.step_mult
    step = (lr_mult * step).reshape(p.shape)
    new_p = p - step
    record["param_scale"] = param_scale
    record["update"] = step.reshape(shape)
    return new_p.reshape(shape), record


def _step(cfg: _StepConfig, theta, state, params, grads, loss):
    """One upstream ``update`` (module docstring, steps 1-6): params, state, intermediates."""
    names = sorted(params)  # jax.tree_util.tree_leaves order of a dict: the LSTM rows
    buffer = loss_buffer_update(state["loss_buffer"], loss)
    loss_feats = loss_features(buffer)
    g = {n: jnp.clip(grads[n].astype(F32), -GRAD_CLIP, GRAD_CLIP) for n in names}
    p = {n: params[n].astype(F32) for n in names}
    fraction = state["iteration"] / jnp.asarray(state["num_steps"], F32)

    mom, rms_acc, fac = state["mom_rolling"], state["rms_rolling"], state["fac_rolling"]
    d_m = jnp.asarray(cfg.momentum_decays, F32)
    d_r = jnp.clip(jnp.asarray(cfg.rms_decays, F32), 0.0, 1.0)
    d_a = jnp.asarray(cfg.adafactor_decays, F32)
    new_m = {n: d_m * mom["m"][n] + (1 - d_m) * g[n][..., None] for n in names}
    new_rms = {n: d_r * rms_acc["rms"][n] + (1 - d_r) * (g[n] * g[n])[..., None]
               for n in names}
    new_fac, fac_g, factors = {"v_col": {}, "v_row": {}, "v_diag": {}}, {}, {}
    for n in names:
        v_row, v_col, v_diag, fac_g[n], row_f, col_f = _factored_update(
            fac["v_row"][n], fac["v_col"][n], fac["v_diag"][n], g[n], d_a,
            factored_dims(p[n].shape))
        new_fac["v_row"][n], new_fac["v_col"][n], new_fac["v_diag"][n] = v_row, v_col, v_diag
        factors[n] = (row_f, col_f)

    lstm_m, lstm_rms = ((new_m, new_rms) if cfg.bug == "lstm_new_accumulators"
                        else (mom["m"], rms_acc["rms"]))
    stack = jnp.stack([lstm_features(p[n], lstm_m[n], lstm_rms[n], fraction, loss_feats,
                                     cfg.bug) for n in names])
    state_in = state["lstm_hidden_state"]
    controls, lr_mult, state_out = rnn_forward(theta["rnn_params"], stack, state_in)
    next_lstm = state_in if cfg.use_bugged_next_lstm_state else state_out
    if cfg.rnn_state_decay > 0.0:
        next_lstm = {k: v * (1.0 - cfg.rnn_state_decay) for k, v in next_lstm.items()}

    new_params, tensors = {}, {}
    for i, n in enumerate(names):
        w = interpolate(theta["ff_mod_stack"]["~"], controls[i], cfg.ff_mult)
        new_p, record = _ff_mod(cfg, w, lr_mult[i], p[n], g[n], new_m[n], new_rms[n],
                                fac_g[n], new_fac["v_row"][n], new_fac["v_col"][n],
                                new_fac["v_diag"][n], factors[n])
        new_params[n] = new_p.astype(params[n].dtype)
        tensors[n] = {"g_clipped": g[n], "fac_g": fac_g[n], **record}
    new_state = {
        "mom_rolling": {"m": new_m, "t": mom["t"] + 1},
        "rms_rolling": {"rms": new_rms, "t": rms_acc["t"] + 1},
        "fac_rolling": new_fac,
        "num_steps": state["num_steps"],
        "iteration": state["iteration"] + 1,
        "lstm_hidden_state": next_lstm,
        "loss_buffer": buffer,
    }
    # upstream's tree_utils.match_type: every leaf back to the incoming state's dtype
    new_state = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), new_state, state)
    inter = {"loss_features": loss_feats, "fraction_trained": fraction, "lstm_input": stack,
             "lstm_state_in": state_in, "lstm_state_out": state_out, "controls": controls,
             "lr_mult": lr_mult, "tensors": tensors}
    return new_params, new_state, inter


class VeLOReference:
    """VeLO / HyperV2 in JAX, from an upstream theta tree and the constructor arguments.

    ``_bug`` (keyword, one of :data:`NEGATIVE_CONTROLS`) is for negative-control tests only:
    it reproduces a known porting mistake so that a test can show the comparison catches it.
    """

    def __init__(self, theta: Mapping[str, Any], hparams: Mapping[str, Any], *,
                 _bug: str | None = None) -> None:
        if _bug is not None and _bug not in NEGATIVE_CONTROLS:
            raise ValueError(f"unknown negative control {_bug!r}")
        self.hparams = hp = normalize_hparams(hparams)
        _check_theta(theta, hp)
        as_f32 = lambda a: jnp.asarray(a, dtype=F32)  # noqa: E731
        self.theta = {
            "lstm_init_state": jax.tree_util.tree_map(
                as_f32, _lstm_init_state(theta["lstm_init_state"])),
            "rnn_params": jax.tree_util.tree_map(as_f32, dict(theta["rnn_params"])),
            "ff_mod_stack": {"~": jax.tree_util.tree_map(as_f32,
                                                         dict(theta["ff_mod_stack"]["~"]))},
        }
        self._config = _StepConfig(
            hp["initial_momentum_decays"], hp["initial_rms_decays"],
            hp["initial_adafactor_decays"], hp["ff_hidden_layers"], hp["exp_mult"],
            hp["step_mult"], bool(hp["use_bugged_next_lstm_state"]), hp["rnn_state_decay"], _bug,
            hp["ff_mult"])
        self._jit_init = jax.jit(self._init)
        # theta is closed over, so XLA sees constant weights, as upstream's jitted update does
        # (its opt_fn closes over theta); weights passed as arguments round differently.
        self._jit_step = jax.jit(functools.partial(_step, self._config, self.theta))

    @classmethod
    def from_upstream(cls, folder: str | os.PathLike, **hparam_overrides: Any
                      ) -> VeLOReference:
        """Build from an upstream checkpoint folder: ``params`` (flax msgpack, root
        ``{params, gen_id, step}`` or the tuple form ``{0, 1, 2}``) and, when present,
        ``config.gin`` (its ``HyperV2`` bindings). Keyword arguments override the config."""
        folder = os.fspath(folder)
        root, _ = flax_msgpack.read_file(os.path.join(folder, "params"))
        if set(root) == {"params", "gen_id", "step"}:
            theta = root["params"]
        elif set(root) == {"0", "1", "2"}:
            theta = root["0"]
        else:
            raise ValueError(f"{folder}/params: root keys {sorted(root)} are neither "
                             "{params, gen_id, step} nor {0, 1, 2}")
        hparams: dict[str, Any] = {}
        config_file = os.path.join(folder, "config.gin")
        if os.path.isfile(config_file):
            config = read_gin(config_file)
            if config.lopt_class != UPSTREAM_CLASS:
                raise ValueError(f"{config_file}: run_train.lopt is @{config.lopt_class}(), "
                                 f"not @{UPSTREAM_CLASS}()")
            hparams.update(config.bindings)
        hparams.update(hparam_overrides)
        return cls(theta, hparams)

    def init(self, params: Mapping[str, jnp.ndarray], num_steps: int) -> dict[str, Any]:
        """Upstream's initial state (jitted with ``num_steps`` traced, as upstream)."""
        return self._jit_init(dict(params), jnp.asarray(num_steps, jnp.int32))

    def _init(self, params, num_steps):
        cfg = self._config
        n_m, n_r, n_a = (len(d) for d in (cfg.momentum_decays, cfg.rms_decays,
                                          cfg.adafactor_decays))
        bugged = self.hparams["use_bugged_loss_features"]
        n = len(params)
        return {
            "mom_rolling": {"m": {k: jnp.zeros((*p.shape, n_m), p.dtype)
                                  for k, p in params.items()},
                            "t": jnp.zeros((n_m,), jnp.int32)},
            "rms_rolling": {"rms": {k: jnp.zeros((*p.shape, n_r), p.dtype)
                                    for k, p in params.items()},
                            "t": jnp.zeros((n_r,), jnp.int32)},
            "fac_rolling": factored_init(params, n_a),
            "num_steps": num_steps,
            "iteration": jnp.asarray(0, jnp.int32),
            "lstm_hidden_state": {k: jnp.tile(v, (n, 1))
                                  for k, v in self.theta["lstm_init_state"].items()},
            "loss_buffer": loss_buffer_init(LOSS_BUFFER_SIZE if bugged else num_steps),
        }

    def step(self, state: Mapping[str, Any], params: Mapping[str, jnp.ndarray],
             grads: Mapping[str, jnp.ndarray], loss: Any) -> tuple[dict, dict, dict]:
        """One jitted update: ``(new_params, new_state, intermediates)``.

        Intermediates: per step ``loss_features``, ``fraction_trained``, ``lstm_input``,
        ``lstm_state_in``/``lstm_state_out`` (``{hidden, cell}``), ``controls``, ``lr_mult``;
        per tensor under ``tensors/<name>``: ``ff_params``, ``g_clipped``, ``fac_g``,
        ``features_raw``, ``mlp_input``, ``mlp_pre{i}``, ``mlp_output``, ``param_scale``,
        ``update`` (the step, ``p' = p - update``).
        """
        if loss is None:
            raise ValueError("VeLO needs the loss in every update")
        return self._jit_step(dict(state), dict(params), dict(grads), jnp.asarray(loss, F32))

    def optax(self, num_steps: int) -> optax.GradientTransformationExtraArgs:
        """The reference as an optax transformation, like upstream's ``opt_to_optax_opt``.

        ``update(grads, state, params, loss=...)`` (optax's extra args; upstream's
        ``extra_args={"loss": ...}`` is accepted too) returns ``new_params - params``.
        """

        def init_fn(params):
            return self.init(params, num_steps)

        def update_fn(updates, state, params=None, *, extra_args=None, **kwargs):
            loss = kwargs.get("loss", (extra_args or {}).get("loss"))
            if params is None:
                raise ValueError("VeLO needs params in update()")
            new_params, new_state, _ = self.step(state, params, updates, loss)
            return jax.tree_util.tree_map(jnp.subtract, new_params, dict(params)), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
