"""VeLO (upstream ``HyperV2``, ``research/general_lopt/hyper_v2.py``) as a torch optimizer.

One step, in upstream's order (``lr = 1`` and ``weight_decay = 0`` reproduce upstream exactly):

1. Loss buffer (10 moving averages of the loss with half-lives log-spaced from 10 to
   ``num_steps``): the loss is clipped from above to ``2 * |max bias-corrected mean|``, the
   averages and running minima advance, and 9 loss features are read from the new buffer.
2. ``g <- clip(g, -1000, 1000)``.
3. Per tensor, 30 LSTM inputs from ``p`` and the **old** momentum and rms (before this step's
   update): ``tanh(10 (t/T - c))`` for 9 offsets ``c``, the loss features, ``clip_log_abs`` of
   the mean rms, a one-hot rank, and of the variances of momentum and of rms about the
   *momentum* mean (upstream's ``var_rms`` quirk: 3 columns).
4. The per-tensor network over all tensors at once: ``x' = W2 x + b2 + max_tensors relu(W1 x +
   b1)``, a Haiku LSTM (gates i, g, f, o; forget bias +1), ``controls = Wc h + bc`` (K values)
   and ``lr_mult = Ws h + bs`` (raw, unbounded).
5. Momentum, rms and factored accumulators from the clipped gradient (fixed decays).
6. Per tensor: MLP weights ``100 * mean_k(controls_k * bank_k)``; 30 per-parameter features
   from the **new** accumulators, normalized per column over the whole tensor; the MLP
   (first layer summed group by group, ReLU, ..., 3 outputs); then
   ``step = lr_mult * (direction * (param_scale * exp(exp_mult * magnitude)) * step_mult)``
   with ``param_scale = sqrt(mean(p^2) + 1e-9)``, and ``p <- p - lr * step``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from lopt_port import extension
from lopt_port import velo_config as cfg
from lopt_port import velo_fused as fused_path
from lopt_port.accumulators import (
    FactoredResult,
    update_factored,
    update_factored_rounds,
    update_momentum,
    update_rms,
)
from lopt_port.constants import (
    NORMALIZER_EPS,
    RMS_FEATURE_EPS,
    ROW_COL_FEATURE_EPS,
    VELO_CHUNK_ELEMENTS,
    VELO_FRACTION_SHARPNESS,
    VELO_FRACTION_TIMESCALES,
    VELO_GRAD_CLIP,
    VELO_GRAD_CLIP_FEATURE,
    VELO_LOG_ABS_CLIP,
    VELO_LOG_ABS_EPS,
    VELO_LOG_ABS_SCALE,
    VELO_LOSS_BUFFER_SIZE,
    VELO_LOSS_DEN_FLOOR,
    VELO_LOSS_RUNNING_MIN_INIT,
    VELO_MAX_TRAINING_STEPS,
    VELO_NORM_MULT_FLOOR,
    VELO_PARAM_SCALE_EPS,
)
from lopt_port.sharding import (
    Mean,
    Rounds,
    Total,
    local,
    run_local,
    run_rounds,
    shard_spec,
    state_zeros,
)
from lopt_port.state_layout import GLOBAL_STATE, TieBreak, factored_dims, factored_state_shapes
from lopt_port.weights import LoadedWeights, WeightsError, load_weights

N_GROUPS = 14
_PER_ELEMENT = ("momentum", "rms", "v_diag")


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


def clip_log_abs(v: torch.Tensor) -> torch.Tensor:
    """``0.5 * clip(log(1e-8 + |10 v|), -5, 5)``."""
    mag = torch.log(VELO_LOG_ABS_EPS + torch.abs(v * VELO_LOG_ABS_SCALE))
    return torch.clamp(mag, -VELO_LOG_ABS_CLIP, VELO_LOG_ABS_CLIP) * 0.5


def _mean_square_rounds(p32: torch.Tensor, numel: int) -> Rounds:
    """``mean(p^2)`` in float64 over the whole tensor (``p32``: this rank's rows); prefab
    weight decay's loss term."""
    (total,) = yield [Total(torch.sum(torch.square(p32.double())))]
    return (total / numel).float()


class VeLO(torch.optim.Optimizer):
    """VeLO, the learned optimizer of Metz et al. 2022, as upstream's ``HyperV2`` computes it.

    Args:
        params: parameters or param groups (``lr`` and ``weight_decay`` per group).
        weights: converted weights (``lopt-convert`` output, a state dict with ``hparams``, or
            :class:`~lopt_port.LoadedWeights`).
        num_steps: the training horizon T (required): the LSTM sees ``t / T`` and, unless the
            weights use the bugged loss features, the loss half-lives reach T.
        weight_decay: upstream prefab's ``WeightDecayWrapper``: ``g += wd * p`` and
            ``loss += wd * sum(p^2)`` before VeLO sees them. With
            ``decoupled_weight_decay=True`` instead ``p <- p * (1 - lr * wd) - lr * step``
            (AdamW's convention; the step is computed from the undecayed ``p``).
        lr: multiplies upstream's step (``1.0`` = upstream).
        hparams: hyperparameters overriding those recorded in the weights.
        tie_break: factored-dims rule for tied sizes (see :func:`factored_dims`).
        max_training_steps: upstream's prefab averages gradients over ``ceil(T / 150000)``
            steps above this horizon; that accumulation is not reproduced, so a larger
            ``num_steps`` is refused (accumulate gradients yourself and pass the number of
            updates).
        fused: ``None`` (default) runs the fused kernels (:mod:`lopt_port.velo_fused`) when
            every parameter of the step can take them and otherwise the eager path, with one
            warning naming the reason; ``True`` raises instead; ``False`` is always eager.

    The loss enters through ``step(loss=...)`` (a tensor, kept on its device, or a float) or a
    closure. Parameters whose ``grad`` is ``None`` (frozen or unused) and zero-size parameters
    are skipped: the per-tensor network sees the non-empty tensors that have a gradient at this
    step, in param-group order, each with its own LSTM state.

    State: per parameter ``momentum`` ``(*S, 3)``, ``rms`` ``(*S, 1)``, ``v_row``/``v_col`` or
    ``v_diag``, ``factored_dims``, ``lstm_hidden``/``lstm_cell`` ``(H,)``, all float32; globally
    (key ``"velo"``) ``iteration`` (a CPU tensor: reading it is no device sync), ``num_steps``
    and the loss buffer's ``loss_means``, ``loss_running_min``, ``loss_decays``.
    """

    #: ``step`` needs the training loss (``step(loss=...)`` or a closure returning it).
    requires_loss = True
    #: The weights' ``kind``.
    KIND = cfg.KIND
    #: Whether the fused path runs the compiled kernels (:mod:`lopt_port.extension`).
    _USES_EXTENSION = True

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 weights: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights, *,
                 num_steps: int, weight_decay: float = 0.0, lr: float = 1.0,
                 decoupled_weight_decay: bool = False, hparams: Mapping[str, Any] | None = None,
                 tie_break: TieBreak = "numpy",
                 max_training_steps: int = VELO_MAX_TRAINING_STEPS,
                 fused: bool | None = None) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int (the training horizon), got "
                             f"{num_steps!r}")
        if num_steps > max_training_steps:
            raise ValueError(
                f"num_steps={num_steps} exceeds max_training_steps={max_training_steps}: "
                f"upstream's prefab would average gradients over "
                f"{math.ceil(num_steps / max_training_steps)} steps, which lopt_port does not "
                f"reproduce; accumulate gradients yourself and pass the number of updates")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative float, got {value!r}")
        if tie_break not in ("numpy", "stable"):
            raise ValueError(f"tie_break must be 'numpy' or 'stable', got {tie_break!r}")
        loaded = load_weights(weights)
        if loaded.kind not in (None, self.KIND):
            raise WeightsError(f"weights are for {loaded.kind!r}, not {self.KIND!r}")
        given = {**loaded.hparams, **(hparams or {})}
        shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
        try:
            self.hparams = self._resolve_hparams(given, shapes)
            self._check_weights(loaded.state_dict)
        except ValueError as e:
            raise WeightsError(str(e)) from None
        self.num_steps = num_steps
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.tie_break: TieBreak = tie_break
        self._theta = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
                       for k, v in loaded.state_dict.items()}
        self._loss_decays = torch.from_numpy(
            loss_buffer_decays(num_steps, self._bugged_loss_features))
        self._device_cache: dict[torch.device, dict[str, Any]] = {}
        self._capture: dict[str, Any] | None = None
        self.fused = fused
        self._fused_reason = self._config_unfused_reason()
        if self._fused_reason is None and fused is not False and self._USES_EXTENSION:
            try:
                extension.load_backend()
            except extension.ExtensionUnavailable as e:
                self._fused_reason = str(e)
        if fused is True and self._fused_reason is not None:
            raise RuntimeError(f"fused=True, but {self._fused_reason}")
        self._warned: set[str] = set()
        self._decay_vector = torch.tensor(
            [d for key in ("initial_momentum_decays", "initial_rms_decays",
                           "initial_adafactor_decays") for d in self.hparams.get(key, ())],
            dtype=torch.float32)
        super().__init__(params, {"lr": float(lr), "weight_decay": float(weight_decay)})
        # The step-wide state lives in the first parameter's state (see global_state).
        self._anchor = self.param_groups[0]["params"][0]

    # ------------------------------------------------------- what subclasses (Celo) change
    def _resolve_hparams(self, given: Mapping[str, Any],
                         shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Complete the weights' hyperparameters (``ValueError`` when they do not fit)."""
        return cfg.resolve_hparams(given, shapes, upstream_defaults=False)

    def _check_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        cfg.check_state_dict(state_dict, self.hparams, "weights")

    def _config_unfused_reason(self) -> str | None:
        """Why these hyperparameters cannot run fused (``None`` when they can)."""
        return fused_path.config_unsupported_reason(self.hparams)

    @property
    def _bugged_loss_features(self) -> bool:
        return bool(self.hparams["use_bugged_loss_features"])

    @property
    def _carries_lstm_state(self) -> bool:
        return not self.hparams["use_bugged_next_lstm_state"]

    @property
    def _ff_mult(self) -> float:
        return float(self.hparams["ff_mult"])

    def _heads(self, h: torch.Tensor, t: Mapping[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(controls, lr_mult)`` from the LSTM output: both raw linear heads."""
        controls = h @ t["rnn.controls.weight"].T + t["rnn.controls.bias"]
        lr_mult = (h @ t["rnn.step_size.weight"].T + t["rnn.step_size.bias"])[:, 0]
        return controls, lr_mult

    def _applied_lr_mult(self, lr_mult: torch.Tensor) -> torch.Tensor:
        """The per-tensor factor the step is multiplied by."""
        return lr_mult

    def _eager_lstm_inputs(self, entries: list, states: list[dict[str, Any]], specs: list,
                           frac_feat: torch.Tensor, loss_features: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The LSTM inputs of every tensor, and ``mean(p^2)`` of the sharded ones (computed
        on the way, over all ranks)."""
        sharded = [i for i, spec in enumerate(specs) if spec is not None]
        from_shards = dict(zip(sharded, run_rounds([
            (VeLO._lstm_feature_rounds(entries[i][0], states[i], frac_feat, loss_features),
             specs[i]) for i in sharded]), strict=True))
        lstm_in = torch.stack([
            from_shards[i][0] if i in from_shards
            else self._lstm_features(p, s, frac_feat, loss_features)
            for i, ((p, _), s) in enumerate(zip(entries, states, strict=True))])
        return lstm_in, {i: v[1] for i, v in from_shards.items()}

    def _fused_lstm_inputs(self, params: list[torch.Tensor], stats: torch.Tensor,
                           frac_feat: torch.Tensor, loss_features: torch.Tensor
                           ) -> torch.Tensor:
        """The LSTM inputs from the fused phase A's per-tensor statistics."""
        k = len(self.hparams["initial_momentum_decays"])
        n = len(params)
        norm = torch.rsqrt(torch.clamp_min(stats[:, 0], VELO_NORM_MULT_FLOOR))
        norm2 = (norm * norm)[:, None]
        rank = torch.zeros(n, 5, dtype=torch.float32)
        for i, p in enumerate(params):
            r = sum(1 for size in p.shape if size > 1)
            if r < 5:
                rank[i, r] = 1.0
        return torch.cat([
            frac_feat.expand(n, -1), loss_features.expand(n, -1),
            clip_log_abs(stats[:, 1 + 2 * k] * norm)[:, None], rank.to(stats.device),
            clip_log_abs(stats[:, 1 + k:1 + 2 * k] * norm2),
            clip_log_abs(stats[:, 2 + 2 * k:] * norm2)], dim=1)

    # ------------------------------------------------------------------ weights on a device
    def _on_device(self, device: torch.device) -> dict[str, Any]:
        if device not in self._device_cache:
            t = {k: v.to(device) for k, v in self._theta.items()}
            h = self.hparams
            entry: dict[str, Any] = {
                "theta": t,
                "fraction_offsets": torch.tensor(VELO_FRACTION_TIMESCALES, dtype=torch.float32,
                                                 device=device)}
            for name in ("momentum", "rms", "adafactor"):
                if f"initial_{name}_decays" in h:
                    entry[name] = torch.tensor(h[f"initial_{name}_decays"],
                                               dtype=torch.float32, device=device)
            if "ff.b0" in t:  # the per-parameter MLP bank (Celo-Adam has none)
                k_bank = h["param_inits"]
                groups = [t[f"ff.w0__{j}"] for j in range(N_GROUPS)]
                bank = {"w0": groups, "b0": t["ff.b0"]}
                for i in range(1, h["ff_hidden_layers"] + 1):
                    bank[f"w{i}"], bank[f"b{i}"] = t[f"ff.w{i}"], t[f"ff.b{i}"]
                entry["bank"] = bank
                entry["bank_flat"] = torch.cat([x.reshape(k_bank, -1)
                                                for x in _bank_leaves(bank)], dim=1)
            self._device_cache[device] = entry
        return self._device_cache[device]

    # ------------------------------------------------------------------------------- state
    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The state a parameter starts with: zero accumulators and the LSTM's initial state."""
        shape = tuple(p.shape)
        dims = factored_dims(shape, self.tie_break)
        h = self.hparams
        state: dict[str, Any] = {
            "momentum": state_zeros(p, (*shape, len(h["initial_momentum_decays"]))),
            "rms": state_zeros(p, (*shape, len(h["initial_rms_decays"]))),
            "factored_dims": tuple(dims) if dims else (),
        }
        k = len(h["initial_adafactor_decays"])
        for name, fshape in factored_state_shapes(shape, dims, k).items():
            # v_row lost axis d0, v_col axis d1: split like p unless that was axis 0
            lost = None if dims is None else dims[1] if name == "v_row" else dims[0]
            state[name] = state_zeros(p, fshape, split=lost != 0)
        # Copies: each parameter owns its LSTM state (in-place loaders such as
        # torch.distributed.checkpoint write into it), and theta stays untouched.
        state["lstm_hidden"] = self._theta["lstm_init_state.hidden"].reshape(-1).to(
            p.device, copy=True)
        state["lstm_cell"] = self._theta["lstm_init_state.cell"].reshape(-1).to(
            p.device, copy=True)
        return state

    @property
    def global_state(self) -> dict[str, Any]:
        """The step-wide state: ``iteration``, ``num_steps`` and the loss buffer
        (``loss_means``, ``loss_running_min``, ``loss_decays``).

        It is kept under the key ``"velo"`` in the state of the optimizer's first parameter,
        so that every key of :meth:`state_dict`'s ``state`` is a parameter (what
        ``torch.distributed.checkpoint`` needs).
        """
        st = self.state[self._anchor]
        if GLOBAL_STATE not in st:
            device = self._anchor.device
            st[GLOBAL_STATE] = {
                "iteration": torch.zeros((), dtype=torch.int64),
                "num_steps": self.num_steps,
                "loss_means": torch.zeros(VELO_LOSS_BUFFER_SIZE, dtype=torch.float32,
                                          device=device),
                "loss_running_min": torch.full((VELO_LOSS_BUFFER_SIZE,),
                                               VELO_LOSS_RUNNING_MIN_INIT, dtype=torch.float32,
                                               device=device),
                "loss_decays": self._loss_decays.to(device)}
        return st[GLOBAL_STATE]

    @contextmanager
    def capture_intermediates(self) -> Iterator[dict[str, Any]]:
        """Record the next steps' intermediates: ``out["step"]`` (loss_features,
        fraction_trained, lstm_input, lstm_state_in/out, controls, lr_mult) and
        ``out["tensors"][p]`` (ff_params, g_clipped, fac_g, features_raw, mlp_input, mlp_pre*,
        mlp_output, param_scale, update), named as upstream's golden vectors."""
        previous = self._capture
        self._capture = {"step": {}, "tensors": {}}
        try:
            yield self._capture
        finally:
            self._capture = previous

    # -------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             loss: torch.Tensor | float | None = None) -> Any:
        """One VeLO update of every parameter with a gradient; returns the closure's loss."""
        returned = None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
            if loss is None:
                loss = returned
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       f"gradients")
                entries.append((p, group))
        if not entries:
            return returned
        if loss is None:
            if all(float(g["lr"]) == 0.0 for g in self.param_groups):
                # torch.distributed.checkpoint initializes an optimizer's state with a step of
                # zero gradients at lr 0 and no loss: create the state, change nothing.
                for p, _ in entries:
                    if "momentum" not in self.state[p]:
                        self.state[p].update(self.initial_state(p))
                self.global_state  # noqa: B018 (creates it)
                return returned
            raise RuntimeError(f"{type(self).__name__} needs the training loss: call "
                               f"step(loss=loss) or pass a closure that returns it")
        device = entries[0][0].device
        consts = self._on_device(device)
        glob = self.global_state
        if glob["num_steps"] != self.num_steps:
            raise RuntimeError(f"the loaded state was trained with num_steps="
                               f"{glob['num_steps']}, this optimizer has {self.num_steps}")
        loss_t = self._loss_tensor(loss, device)
        states = []
        for p, _ in entries:
            state = self.state[p]
            if "momentum" not in state:
                state.update(self.initial_state(p))
            states.append(state)
        if self._takes_fused_path([p for p, _ in entries]):
            self._fused_step(entries, states, loss_t, glob, consts)
            glob["iteration"] = glob["iteration"] + 1
            return returned
        # Sharded (FSDP2) parameters work on their local rows; whole-tensor reductions run as
        # a few batched rounds of collectives (lopt_port.sharding).
        specs = [shard_spec(p) for p, _ in entries]
        grads, wd_n, wd_rounds = [], [], []
        for (p, group), spec in zip(entries, specs, strict=True):
            g = local(p.grad).to(torch.float32)
            wd = group["weight_decay"]
            if wd and not self.decoupled_weight_decay:
                p32 = local(p).to(torch.float32)
                g = g + wd * p32
                wd_n.append(wd * p.numel())
                wd_rounds.append((_mean_square_rounds(p32, p.numel()), spec))
            grads.append(torch.clamp(g, -VELO_GRAD_CLIP, VELO_GRAD_CLIP))
        if wd_n:
            loss_t = loss_t + weight_decay_loss(wd_n, torch.stack(run_rounds(wd_rounds)))
        iteration = int(glob["iteration"])
        loss_features = self._advance_loss_buffer(glob, loss_t, iteration)
        frac_feat = self._fraction_features(iteration, consts)
        lstm_in, shard_mean_p2 = self._eager_lstm_inputs(entries, states, specs, frac_feat,
                                                         loss_features)
        h_prev = torch.stack([s["lstm_hidden"].to(device) for s in states])
        c_prev = torch.stack([s["lstm_cell"].to(device) for s in states])
        controls, lr_mult, h_new, c_new = self._rnn(lstm_in, h_prev, c_prev, consts["theta"])
        self._carry_lstm_state(states, h_new, c_new)
        ff = self._interpolate(controls, consts)
        if self._capture is not None:
            self._capture["step"].update({
                "loss_features": loss_features.clone(),
                "fraction_trained": float(np.float32(iteration) / np.float32(self.num_steps)),
                "lstm_input": lstm_in.clone(), "controls": controls.clone(),
                "lr_mult": lr_mult.clone(),
                "lstm_state_in": {"hidden": h_prev.clone(), "cell": c_prev.clone()},
                "lstm_state_out": {"hidden": h_new.clone(), "cell": c_new.clone()}})
        applied = self._applied_lr_mult(lr_mult)
        run_rounds([
            (self._update_rounds(p, s, g, {k: v[i] for k, v in ff.items()}, applied[i], group,
                                 shard_mean_p2.get(i)), specs[i])
            for i, ((p, group), s, g) in enumerate(zip(entries, states, grads, strict=True))])
        glob["iteration"] = glob["iteration"] + 1
        return returned

    def _takes_fused_path(self, params: list[torch.Tensor]) -> bool:
        """Fused when enabled and possible for every parameter of the step; ``fused=True``
        raises where it is not."""
        if self.fused is False or self._capture is not None:
            return False
        reason = self._fused_reason or next(
            (r for p in params if (r := fused_path.param_unsupported_reason(p)) is not None),
            None)
        if reason is None:
            return True
        if self.fused is True:
            raise RuntimeError(f"fused=True, but {reason}")
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{type(self).__name__}: using the eager path: {reason}",
                          stacklevel=4)
        return False

    def _carry_lstm_state(self, states: list[dict[str, Any]], h: torch.Tensor,
                          c: torch.Tensor) -> None:
        """Keep the new LSTM state (never, with ``use_bugged_next_lstm_state``)."""
        if not self._carries_lstm_state:
            return
        for i, s in enumerate(states):
            s["lstm_hidden"] = h[i].to(s["lstm_hidden"].device)
            s["lstm_cell"] = c[i].to(s["lstm_cell"].device)

    def _fused_step(self, entries: list, states: list[dict[str, Any]], loss_t: torch.Tensor,
                    glob: dict[str, Any], consts: Mapping[str, Any]) -> None:
        """The step through the kernels (module docstring of :mod:`lopt_port.velo_fused`)."""
        params = [p for p, _ in entries]
        groups = [g for _, g in entries]
        prefab = not self.decoupled_weight_decay
        grad_wd = [float(g["weight_decay"]) if prefab else 0.0 for g in groups]
        lists, stats, sumsq = fused_path.phase_a(params, states, self._decay_vector, grad_wd)
        mean_p2 = stats[:, 0]
        if any(grad_wd):
            decayed = [i for i, w in enumerate(grad_wd) if w]
            loss_t = loss_t + weight_decay_loss([grad_wd[i] * params[i].numel() for i in decayed],
                                                mean_p2[decayed])
        iteration = int(glob["iteration"])
        loss_features = self._advance_loss_buffer(glob, loss_t, iteration)
        frac_feat = self._fraction_features(iteration, consts)
        lstm_in = self._fused_lstm_inputs(params, stats, frac_feat, loss_features)
        h_prev = torch.stack([s["lstm_hidden"] for s in states])
        c_prev = torch.stack([s["lstm_cell"] for s in states])
        controls, lr_mult, h_new, c_new = self._rnn(lstm_in, h_prev, c_prev, consts["theta"])
        self._carry_lstm_state(states, h_new, c_new)
        weights = self._mixed(controls, consts, self._ff_mult)
        param_scale = torch.sqrt(mean_p2 + VELO_PARAM_SCALE_EPS)
        lr = [float(g["lr"]) for g in groups]
        decay = [1.0 - g["lr"] * g["weight_decay"] if not prefab else 1.0 for g in groups]
        fused_path.phase_b(lists, self._decay_vector, grad_wd, sumsq, weights, self.hparams,
                           self._applied_lr_mult(lr_mult), param_scale, lr, decay)

    def _fraction_features(self, iteration: int, consts: Mapping[str, Any]) -> torch.Tensor:
        """``tanh(10 (t / T - c))`` for the 9 centres ``c`` (``t / T`` in float32)."""
        fraction = float(np.float32(iteration) / np.float32(self.num_steps))
        offsets = consts["fraction_offsets"]
        return torch.tanh((torch.full_like(offsets, fraction) - offsets)
                          * VELO_FRACTION_SHARPNESS)

    def _loss_tensor(self, loss: Any, device: torch.device) -> torch.Tensor:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            return loss.detach().to(device=device, dtype=torch.float32).reshape(())
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.full((), float(loss), dtype=torch.float32, device=device)
        raise TypeError(f"the loss must be a tensor or a float, got {type(loss).__name__}")

    # --------------------------------------------------------------------- loss features
    @staticmethod
    def _advance_loss_buffer(glob: dict[str, Any], loss: torch.Tensor,
                             k: int) -> torch.Tensor:
        """Advance the buffer with ``loss`` (``k`` updates so far); the 9 loss features."""
        decays, means = glob["loss_decays"], glob["loss_means"]
        # decays^(k+1) rounded once from float64: what XLA's float32 pow returns here.
        corr = 1 - (decays.double() ** (k + 1)).float()
        approx_max = loss if k == 0 else torch.max(means / corr)
        clipped = torch.minimum(torch.abs(approx_max) * 2, loss)
        # means*decays + clipped*(1-decays) as XLA fuses it: one fma.
        means = torch.addcmul(clipped * (1.0 - decays), means, decays)
        running_min = torch.minimum(glob["loss_running_min"], means / corr)
        glob["loss_means"], glob["loss_running_min"] = means, running_min
        if k + 1 <= 2:
            return torch.zeros(VELO_LOSS_BUFFER_SIZE - 1, dtype=torch.float32,
                               device=means.device)
        cor_mean = means / corr
        den = torch.clamp_min(cor_mean[1:] - running_min[:-1], VELO_LOSS_DEN_FLOOR)
        return torch.clamp((cor_mean[:-1] - running_min[:-1]) / den - 1.0, -1.0, 1.0)

    # ---------------------------------------------------------------------- LSTM features
    @staticmethod
    def _lstm_features(p: torch.Tensor, state: dict[str, Any], frac_feat: torch.Tensor,
                       loss_features: torch.Tensor) -> torch.Tensor:
        """The 30 per-tensor LSTM inputs from ``p`` and the old momentum and rms."""
        features, _ = run_local(VeLO._lstm_feature_rounds(p, state, frac_feat, loss_features))
        return features

    @staticmethod
    def _lstm_feature_rounds(p: torch.Tensor, state: dict[str, Any], frac_feat: torch.Tensor,
                             loss_features: torch.Tensor) -> Rounds:
        """:meth:`_lstm_features` as rounds of reductions (:mod:`lopt_port.sharding`); returns
        ``(features, mean(p^2))``."""
        spec = shard_spec(p)
        rows = spec.global_shape[0] if spec is not None else None
        p32 = local(p).to(torch.float32)
        (mean_p2,) = yield [Mean(p32 * p32, rows=rows)]
        norm = torch.rsqrt(torch.clamp_min(mean_p2, VELO_NORM_MULT_FLOOR))
        m = local(state["momentum"]) * norm
        rms = local(state["rms"]) * norm
        axes = tuple(range(p.dim()))
        mean_m, mean_rms = m, rms  # a scalar parameter: nothing to average
        if axes:
            mean_m, mean_rms = yield [Mean(m, axes, keepdim=True, rows=rows),
                                      Mean(rms, axes, keepdim=True, rows=rows)]
        mean_rms = mean_rms.reshape(-1)
        var_m, var_rms = torch.square(m - mean_m), torch.square(rms - mean_m)
        if axes:
            var_m, var_rms = yield [Mean(var_m, axes, rows=rows), Mean(var_rms, axes, rows=rows)]
        rank = sum(1 for s in p.shape if s > 1)
        one_hot = torch.zeros(5, dtype=torch.float32, device=m.device)
        if rank < 5:
            one_hot[rank] = 1.0
        return torch.cat([frac_feat, loss_features.to(m.device), clip_log_abs(mean_rms),
                          one_hot, clip_log_abs(var_m), clip_log_abs(var_rms)]), mean_p2

    # --------------------------------------------------------------------- per-tensor net
    def _rnn(self, x: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor,
             t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Mixing layers, the LSTM cell and the two heads, for all tensors at once."""
        mix = torch.relu(x @ t["rnn.mix.weight"].T + t["rnn.mix.bias"])
        v = torch.max(mix, dim=0, keepdim=True).values
        x2 = x @ t["rnn.input.weight"].T + t["rnn.input.bias"] + v
        gates = torch.cat([x2, h_prev], dim=-1) @ t["rnn.lstm.weight"].T + t["rnn.lstm.bias"]
        i, g, f, o = torch.chunk(gates, 4, dim=-1)
        c = torch.sigmoid(f + 1.0) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        controls, lr_mult = self._heads(h, t)
        return controls, lr_mult, h, c

    @staticmethod
    def _mixed(controls: torch.Tensor, consts: Mapping[str, Any],
               ff_mult: float) -> torch.Tensor:
        """Every tensor's MLP weights, ``ff_mult * mean_k(controls[i, k] * bank[k])`` (upstream:
        ``ff_mult`` = 100), as one batched product over the flattened bank:
        ``[tensors, weights]``, leaves in the order ``w0__0`` .. ``w0__13``, ``b0``, ``w1``,
        ``b1``, ... each flattened row-major."""
        flat = consts["bank_flat"]
        return ff_mult * torch.mean(controls[:, :, None] * flat[None], dim=1)

    def _interpolate(self, controls: torch.Tensor,
                     consts: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """:meth:`_mixed`, split into each tensor's named leaves."""
        mixed = self._mixed(controls, consts, self._ff_mult)
        out, start = {}, 0
        for name, leaf in _named_bank_leaves(consts["bank"]):
            size = leaf[0].numel()
            out[name] = mixed[:, start:start + size].reshape(-1, *leaf.shape[1:])
            start += size
        return out

    # -------------------------------------------------------------------- per-parameter
    def _update_rounds(self, p: torch.Tensor, state: dict[str, Any], g: torch.Tensor,
                       ff: Mapping[str, torch.Tensor], lr_mult: torch.Tensor,
                       group: Mapping[str, Any], mean_p2: torch.Tensor | None) -> Rounds:
        """One parameter's update, yielding its whole-tensor reductions (completed over the
        other ranks for a sharded parameter, whose ``mean_p2`` the LSTM features computed)."""
        spec = shard_spec(p)
        p_local = local(p)
        consts = self._on_device(p.device)
        shape = tuple(p_local.shape) or (1,)
        g = g.reshape(shape)
        acc = {k: local(state[k]).view(*shape, state[k].shape[-1]) if k in _PER_ELEMENT
               else local(state[k])
               for k in ("momentum", "rms", "v_row", "v_col", "v_diag") if k in state}
        dims = tuple(state["factored_dims"]) or None
        update_momentum(acc["momentum"], g, consts["momentum"])
        update_rms(acc["rms"], g, consts["rms"])
        if spec is None:
            fac = update_factored(acc, g, consts["adafactor"], dims)
        else:
            fac = yield from update_factored_rounds(acc, g, consts["adafactor"], dims,
                                                    rows=spec.global_shape[0])
        p32 = p_local.to(torch.float32).reshape(shape)
        record: dict[str, Any] | None = {} if self._capture is not None else None
        out = yield from self._mlp_rounds(p32, g, acc, fac, dims, ff, record,
                                          p.numel() if spec is not None else None)
        h = self.hparams
        if mean_p2 is None and spec is not None:
            (mean_p2,) = yield [Mean(p32 * p32, rows=spec.global_shape[0])]
        elif mean_p2 is None:
            mean_p2 = torch.mean(p32 * p32)
        param_scale = torch.sqrt(mean_p2 + VELO_PARAM_SCALE_EPS)
        magnitude = torch.exp(out[..., 1] * h["exp_mult"])
        step = out[..., 0] * (param_scale * magnitude) * h["step_mult"]
        step = (lr_mult.to(p.device) * step).reshape(p_local.shape)
        lr, wd = group["lr"], group["weight_decay"]
        new = p32.reshape(p_local.shape)
        if wd and self.decoupled_weight_decay:
            new = new * (1.0 - lr * wd)
        p_local.copy_(new - lr * step)
        if record is not None:
            record.update({"ff_params": dict(ff), "g_clipped": g.clone(),
                           "fac_g": fac.fac_g.clone(), "param_scale": param_scale,
                           "mlp_output": out, "update": step.clone()})
            self._capture["tensors"][p] = record

    def _feature_groups(self, p32: torch.Tensor, g: torch.Tensor, acc: Mapping[str, Any],
                        fac: FactoredResult, dims: tuple[int, int] | None,
                        rows: slice) -> list[torch.Tensor]:
        """The 14 feature groups (30 columns) for ``rows`` of the leading axis."""
        m, rms = acc["momentum"][rows], acc["rms"][rows]
        g_, p_ = g[rows], p32[rows]
        rsqrt = torch.rsqrt(rms + RMS_FEATURE_EPS)
        full = (*p32.shape, m.shape[-1])
        if dims is not None:
            d1, d0 = dims
            row = acc["v_row"].unsqueeze(d0).expand(full)[rows]
            col = acc["v_col"].unsqueeze(d1).expand(full)[rows]
            mom_mult = (m * fac.row_factor.unsqueeze(d0).expand(full)[rows]
                        * fac.col_factor.unsqueeze(d1).expand(full)[rows])
        else:
            row = col = acc["v_diag"][rows]
            mom_mult = m * torch.pow(row, -0.5)
        return [g_.unsqueeze(-1),
                torch.clamp(g_, -VELO_GRAD_CLIP_FEATURE, VELO_GRAD_CLIP_FEATURE).unsqueeze(-1),
                p_.unsqueeze(-1), m, rms, m * rsqrt, rsqrt, fac.fac_g[rows],
                g_.unsqueeze(-1) * rsqrt, row, col, torch.rsqrt(row + ROW_COL_FEATURE_EPS),
                torch.rsqrt(col + ROW_COL_FEATURE_EPS), mom_mult]

    def _mlp_rounds(self, p32: torch.Tensor, g: torch.Tensor, acc: Mapping[str, Any],
                    fac: FactoredResult, dims: tuple[int, int] | None,
                    ff: Mapping[str, torch.Tensor], record: dict[str, Any] | None,
                    numel: int | None) -> Rounds:
        """Normalized features through the per-tensor MLP; returns the ``(*S, 3)`` outputs.

        Two passes over chunks of the leading axis bound the memory: per-column sums of
        squares, then features, normalization and the MLP. ``numel``: the whole tensor's size
        when ``p32`` holds only this rank's rows (the sums are then completed over the ranks).
        """
        n0 = p32.shape[0]
        per_row = max(1, p32[0].numel()) if n0 else 1
        step = n0 if p32.device.type == "meta" else max(1, VELO_CHUNK_ELEMENTS // per_row)
        # An empty shard still takes part in the reductions: one empty chunk.
        chunks = [slice(a, min(n0, a + step)) for a in range(0, n0, step)] or [slice(0, 0)]
        n = p32.numel() if numel is None else numel
        if len(chunks) == 1 and numel is None:
            groups = self._feature_groups(p32, g, acc, fac, dims, chunks[0])
            raw = torch.cat(groups, dim=-1)
            mean_sq = torch.mean((raw * raw).reshape(-1, raw.shape[-1]), dim=0)
        else:
            sums = None
            for rows in chunks:
                raw = torch.cat(self._feature_groups(p32, g, acc, fac, dims, rows), dim=-1)
                s = torch.sum((raw * raw).reshape(-1, raw.shape[-1]), dim=0, dtype=torch.float64)
                sums = s if sums is None else sums + s
            if numel is not None:
                (sums,) = yield [Total(sums)]
            mean_sq = (sums / n).to(torch.float32)
        inv = torch.rsqrt(NORMALIZER_EPS + mean_sq)
        widths = [ff[f"w0__{j}"].shape[0] for j in range(N_GROUPS)]
        outs = []
        for rows in chunks:
            if len(chunks) != 1:
                raw = torch.cat(self._feature_groups(p32, g, acc, fac, dims, rows), dim=-1)
            x = raw * inv
            o = torch.zeros((*x.shape[:-1], ff["b0"].shape[-1]), dtype=torch.float32,
                            device=x.device)
            start = 0
            for j, w in enumerate(widths):
                o = o + x[..., start:start + w] @ ff[f"w0__{j}"]
                start += w
            o = o + ff["b0"]
            pres = [o]
            o = torch.relu(o)
            layers = self.hparams["ff_hidden_layers"]
            for i in range(1, layers + 1):
                o = o @ ff[f"w{i}"] + ff[f"b{i}"]
                if i != layers:
                    pres.append(o)
                    o = torch.relu(o)
            outs.append(o)
            if record is not None:
                record.setdefault("features_raw", []).append(raw)
                record.setdefault("mlp_input", []).append(x)
                for i, pre in enumerate(pres):
                    record.setdefault(f"mlp_pre{i}", []).append(pre)
        if record is not None:
            for key in [k for k in record if isinstance(record[k], list)]:
                record[key] = torch.cat(record[key]) if len(record[key]) > 1 else record[key][0]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    # ----------------------------------------------------------------------- state dicts
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; validates everything before changing anything and keeps
        the state float32 on each parameter's device (torch.optim would cast it to the
        parameter dtype)."""
        saved_state = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(params) != len(saved_ids):
            raise ValueError(f"state dict has {len(saved_ids)} parameters, the optimizer "
                             f"{len(params)}")
        # The global state sits in one parameter's entry (state dicts of earlier lopt-port
        # commits kept it under its own top-level key; they load too).
        saved_global = saved_state.get(GLOBAL_STATE)
        restored: dict[Any, Any] = {}
        for index, (pid, p) in enumerate(zip(saved_ids, params, strict=True)):
            if pid not in saved_state:
                continue
            entry = dict(saved_state[pid])
            if GLOBAL_STATE in entry:
                saved_global = entry.pop(GLOBAL_STATE)
            restored[p] = self._restore_param_state(entry, p, index) if entry else {}
        glob = (self._restore_global(saved_global, self._anchor.device)
                if saved_global is not None else None)
        super().load_state_dict({**state_dict, "state": {}})
        self.state.update(restored)
        if glob is not None:
            self.state[self._anchor][GLOBAL_STATE] = glob

    def _restore_global(self, saved: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        keys = {"iteration", "num_steps", "loss_means", "loss_running_min", "loss_decays"}
        if set(saved) != keys:
            raise ValueError(f"global VeLO state has keys {sorted(saved)}, expected "
                             f"{sorted(keys)}")
        if saved["num_steps"] != self.num_steps:
            raise ValueError(f"the state was saved with num_steps={saved['num_steps']}, this "
                             f"optimizer has num_steps={self.num_steps}")
        out: dict[str, Any] = {"num_steps": self.num_steps,
                               "iteration": saved["iteration"].detach().to("cpu",
                                                                            torch.int64).clone()}
        for name in ("loss_means", "loss_running_min", "loss_decays"):
            value = saved[name]
            if tuple(value.shape) != (VELO_LOSS_BUFFER_SIZE,):
                raise ValueError(f"global VeLO state {name}: expected shape "
                                 f"({VELO_LOSS_BUFFER_SIZE},), found {tuple(value.shape)}")
            out[name] = value.detach().to(device=device, dtype=torch.float32).clone()
        return out

    def _restore_param_state(self, saved: Mapping[str, Any], p: torch.Tensor,
                             index: int) -> dict[str, Any]:
        where = f"state of parameter {index} (shape {tuple(p.shape)})"
        template = self.initial_state(p)
        dims = tuple(saved.get("factored_dims", (None,)))
        shape = tuple(p.shape)
        valid_dims = (dims == () and len(shape) < 2) or (
            len(dims) == 2 and len(shape) >= 2 and dims[0] != dims[1]
            and all(isinstance(d, int) and 0 <= d < len(shape) for d in dims))
        if not valid_dims:
            raise ValueError(f"{where}: factored_dims {dims!r} do not fit the parameter")
        k = len(self.hparams["initial_adafactor_decays"])
        expected = {name: tuple(template[name].shape)
                    for name in ("momentum", "rms", "lstm_hidden", "lstm_cell")}
        expected.update(factored_state_shapes(shape, dims or None, k))
        problems = [f"missing {name}" for name in expected if name not in saved]
        problems += [f"{name}: expected {want}, found {tuple(saved[name].shape)}"
                     for name, want in expected.items()
                     if name in saved and tuple(saved[name].shape) != want]
        problems += [f"unexpected {name}" for name in saved
                     if name not in (*expected, "factored_dims")]
        if problems:
            raise ValueError(f"{where} does not fit these weights: {'; '.join(problems)}")
        out: dict[str, Any] = {"factored_dims": dims}
        for name in expected:
            out[name] = saved[name].detach().to(device=p.device, dtype=torch.float32).clone()
        return out


def _named_bank_leaves(bank: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The bank's leaves in a fixed order: ``w0__0`` .. ``w0__13``, ``b0``, ``w1``, ``b1``, ..."""
    leaves = [(f"w0__{j}", w) for j, w in enumerate(bank["w0"])]
    leaves.append(("b0", bank["b0"]))
    i = 1
    while f"w{i}" in bank:
        leaves += [(f"w{i}", bank[f"w{i}"]), (f"b{i}", bank[f"b{i}"])]
        i += 1
    return leaves


def _bank_leaves(bank: Mapping[str, Any]) -> list[torch.Tensor]:
    return [leaf for _, leaf in _named_bank_leaves(bank)]
