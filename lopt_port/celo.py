"""Celo and Celo-Adam (Moudgil et al., TMLR 2025; ``amoudgl/celo``) as torch optimizers.

Both are VeLO (:mod:`lopt_port.velo`) with a different per-tensor network input and heads, and
this module implements them as such. One step (``lr = 1``, ``weight_decay = 0`` reproduce the
authors' code):

1. Loss buffer: VeLO's, always the non-bugged ``init(num_steps)``; 9 loss features.
2. ``g <- clip(g, -1000, 1000)``.
3. 18 LSTM inputs, the same for every tensor: ``tanh(10 (t / T - c))`` for the 9 centres ``c``
   (``t`` = updates done before this one), then the loss features. VeLO's mixing layers and
   LSTM (the new state is always carried) give per tensor
   ``lr_mult = 0.1 * exp(h W_s + b_s)`` (> 0) and, for Celo, ``controls = softmax(h W_c + b_c)``
   over the ``K`` banks. Every tensor sees the same inputs: it is a learned schedule.
4. Per parameter:

   * **Celo**: VeLO's accumulators, 30 features and MLP with weights
     ``mean_k(controls_k * bank_k)`` (no x100; the released ``K = 1`` makes this the bank),
     ``step = direction * (param_scale * exp(exp_mult * magnitude)) * step_mult``, then
     ``step <- lr_mult * step`` if ``train_phase > 1`` (the released weights: 2).
   * **Celo-Adam**: ``m``, ``rms`` moving averages (decays 0.9, 0.999, as upstream's
     ``common`` accumulators), ``m_hat = m / (1 - b1^(t+1))``, ``v_hat = rms / (1 - b2^(t+1))``,
     ``step = m_hat * ((lr_mult * step_mult) / (eps + sqrt(v_hat + 1e-10)))``.

   ``p <- p - lr * step``.

The authors' Celo-Adam also updates a factored accumulator that nothing reads; it is not kept
(the parameters are unaffected, only that state leaf is absent).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from lopt_port import celo_config as cfg
from lopt_port.accumulators import update_momentum, update_rms
from lopt_port.constants import VELO_GRAD_CLIP
from lopt_port.sharding import Rounds, is_dtensor, local, state_zeros
from lopt_port.state_layout import TieBreak
from lopt_port.velo import VeLO, weight_decay_loss
from lopt_port.weights import LoadedWeights

#: ``lr_mult = 0.1 * exp(h W_s + b_s)``.
LR_MULT_SCALE = 0.1
#: Celo-Adam: ``sqrt(v_hat + 1e-10)`` under the epsilon.
ADAM_SQRT_EPS = 1e-10

WeightsArg = str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights
ParamsArg = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class Celo(VeLO):
    """Celo: VeLO's per-parameter MLP driven by a learned schedule (module docstring).

    Args:
        params: parameters or param groups (``lr`` and ``weight_decay`` per group).
        weights: converted weights (``lopt-convert checkpoints/celo``), a state dict with
            ``hparams``, or :class:`~lopt_port.LoadedWeights`.
        num_steps: the training horizon T (required): the schedule sees ``t / T`` and the loss
            half-lives reach T.
        lr: multiplies the step (``1.0`` = the authors' optimizer).
        weight_decay: the authors' ``WeightDecayWrapper`` (upstream's): ``g += wd * p`` and
            ``loss += wd * sum(p^2)``; with ``decoupled_weight_decay=True`` instead
            ``p <- p * (1 - lr * wd) - lr * step``.
        hparams: overrides of the weights' hyperparameters (e.g. ``train_phase=1``, the
            authors' ``celo_phase1``: the schedule is computed but not applied).
        tie_break: factored-dims rule for tied sizes (see :func:`~lopt_port.accumulators.
            factored_dims`).
        fused: as :class:`~lopt_port.VeLO` (the per-parameter kernels are VeLO's).

    State: as :class:`~lopt_port.VeLO` (per parameter accumulators and LSTM state, all rows of
    which are equal; globally ``iteration``, ``num_steps`` and the loss buffer).
    """

    KIND = "celo"

    def __init__(self, params: ParamsArg, weights: WeightsArg, *, num_steps: int,
                 lr: float = 1.0, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False,
                 hparams: Mapping[str, Any] | None = None, tie_break: TieBreak = "numpy",
                 fused: bool | None = None) -> None:
        # No horizon limit: the authors' optimizers do not average gradients for long runs.
        super().__init__(params, weights, num_steps=num_steps, weight_decay=weight_decay, lr=lr,
                         decoupled_weight_decay=decoupled_weight_decay, hparams=hparams,
                         tie_break=tie_break, max_training_steps=sys.maxsize, fused=fused)

    def _resolve_hparams(self, given: Mapping[str, Any],
                         shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        return cfg.resolve_hparams(self.KIND, given, shapes)

    def _check_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        cfg.check_state_dict(self.KIND, state_dict, self.hparams, "weights")

    @property
    def _bugged_loss_features(self) -> bool:
        return False

    @property
    def _carries_lstm_state(self) -> bool:
        return True

    @property
    def _ff_mult(self) -> float:
        return 1.0

    def _heads(self, h: torch.Tensor, t: Mapping[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(softmax(h W_c + b_c), 0.1 * exp(h W_s + b_s))``."""
        logits = h @ t["rnn.controls.weight"].T + t["rnn.controls.bias"]
        return torch.softmax(logits, dim=-1), self._lr_mult(h, t)

    @staticmethod
    def _lr_mult(h: torch.Tensor, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raw = (h @ t["rnn.step_size.weight"].T + t["rnn.step_size.bias"])[:, 0]
        return LR_MULT_SCALE * torch.exp(raw)

    def _applied_lr_mult(self, lr_mult: torch.Tensor) -> torch.Tensor:
        """The schedule multiplies the step only after phase 1 (``1 * step`` is exact)."""
        return lr_mult if self.hparams["train_phase"] > 1 else torch.ones_like(lr_mult)

    @staticmethod
    def _global_inputs(n: int, frac_feat: torch.Tensor,
                       loss_features: torch.Tensor) -> torch.Tensor:
        """The 18 inputs, one identical row per tensor."""
        row = torch.cat([frac_feat, loss_features.to(frac_feat.device)])
        return row.expand(n, -1).contiguous()

    def _eager_lstm_inputs(self, entries: list, states: list[dict[str, Any]], specs: list,
                           frac_feat: torch.Tensor, loss_features: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return self._global_inputs(len(entries), frac_feat, loss_features), {}

    def _fused_lstm_inputs(self, params: list[torch.Tensor], stats: torch.Tensor,
                           frac_feat: torch.Tensor, loss_features: torch.Tensor
                           ) -> torch.Tensor:
        return self._global_inputs(len(params), frac_feat.to(stats.device), loss_features)


class CeloAdam(Celo):
    """Celo-Adam: bias-corrected Adam whose learning rate is Celo's learned schedule.

    Arguments as :class:`Celo` (``hparams``: ``initial_momentum_decays`` = (beta1,),
    ``initial_rms_decays`` = (beta2,), ``initial_epsilon``, ``step_mult`` = the base learning
    rate). ``fused=True`` updates all parameters with multi-tensor ``torch._foreach``
    operations (one kernel launch per operation for the whole list; float32 state whatever
    the parameters' dtype) where every parameter is a plain tensor on one device, and raises
    otherwise (FSDP2's DTensors take the per-parameter path); ``fused=None`` does so on CUDA
    devices only (on the CPU the per-parameter path is faster, see
    :meth:`_takes_fused_path`); ``False`` always runs per parameter. Both paths give the same
    values.

    State per parameter: ``momentum`` ``(*S, 1)``, ``rms`` ``(*S, 1)``, ``lstm_hidden``,
    ``lstm_cell`` ``(H,)``; globally as :class:`Celo`.
    """

    KIND = "celo_adam"
    _USES_EXTENSION = False

    def _config_unfused_reason(self) -> str | None:
        return None

    def _param_unfused_reason(self, p: torch.Tensor) -> str | None:
        if is_dtensor(p):
            return "DTensor (sharded) parameters take the per-parameter path"
        return None

    def _applied_lr_mult(self, lr_mult: torch.Tensor) -> torch.Tensor:
        return lr_mult

    def _heads(self, h: torch.Tensor, t: Mapping[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """No controls head: ``(an empty (n, 0) tensor, lr_mult)``."""
        return h.new_zeros((h.shape[0], 0)), self._lr_mult(h, t)

    def _interpolate(self, controls: torch.Tensor,
                     consts: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {}

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zero moments and the LSTM's initial state."""
        shape = tuple(p.shape)
        return {
            "momentum": state_zeros(p, (*shape, 1)),
            "rms": state_zeros(p, (*shape, 1)),
            "lstm_hidden": self._theta["lstm_init_state.hidden"].reshape(-1).to(
                p.device, copy=True),
            "lstm_cell": self._theta["lstm_init_state.cell"].reshape(-1).to(
                p.device, copy=True),
        }

    def _restore_param_state(self, saved: Mapping[str, Any], p: torch.Tensor,
                             index: int) -> dict[str, Any]:
        """Check a saved parameter state against :meth:`initial_state`'s names and shapes."""
        expected = {k: tuple(v.shape) for k, v in self.initial_state(p).items()}
        problems = [f"missing {k}" for k in expected if k not in saved]
        problems += [f"{k}: expected {want}, found {tuple(saved[k].shape)}"
                     for k, want in expected.items()
                     if k in saved and tuple(saved[k].shape) != want]
        problems += [f"unexpected {k}" for k in saved if k not in expected]
        if problems:
            raise ValueError(f"state of parameter {index} (shape {tuple(p.shape)}) does not fit "
                             f"these weights: {'; '.join(problems)}")
        return {k: saved[k].detach().to(device=p.device, dtype=torch.float32).clone()
                for k in expected}

    def _bias_corrections(self, iteration: int) -> tuple[float, float]:
        """``1 / (1 - b1^t)`` and ``1 / (1 - b2^t)`` for ``t = iteration + 1``, float32.

        ``b^t`` is computed in float64 and rounded once (what XLA's float32 ``pow`` returns in
        all but a few cases, mulo-celo-spec B.9.4); the authors' jitted update then multiplies
        by the reciprocal, as here."""
        t = iteration + 1
        out = []
        for key in ("initial_momentum_decays", "initial_rms_decays"):
            beta = np.float32(self.hparams[key][0])
            correction = np.float32(1) - np.float32(np.float64(beta) ** t)
            out.append(float(np.float32(1) / correction))
        return out[0], out[1]

    def _step_factor(self, lr_mult: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
        """``(lr_mult * step_mult) / (eps + sqrt(v_hat + 1e-10))``."""
        lr = lr_mult * self.hparams["step_mult"]
        return lr / (self.hparams["initial_epsilon"] + torch.sqrt(v_hat + ADAM_SQRT_EPS))

    def _update_rounds(self, p: torch.Tensor, state: dict[str, Any], g: torch.Tensor,
                       ff: Mapping[str, torch.Tensor], lr_mult: torch.Tensor,
                       group: Mapping[str, Any], mean_p2: torch.Tensor | None) -> Rounds:
        """One parameter's Adam step (elementwise: no reductions to share between ranks)."""
        yield from ()
        p_local = local(p)
        consts = self._on_device(p.device)
        shape = tuple(p_local.shape)
        m, rms = local(state["momentum"]), local(state["rms"])
        g = g.reshape(shape)
        update_momentum(m, g, consts["momentum"])
        update_rms(rms, g, consts["rms"])
        inv1, inv2 = self._bias_corrections(int(self.global_state["iteration"]))
        m_hat = m * inv1
        v_hat = rms * inv2
        factor = self._step_factor(lr_mult.to(p.device), v_hat)
        step = (m_hat * factor)[..., 0]
        self._apply(p_local, step, group)
        if self._capture is not None:
            self._capture["tensors"][p] = {
                "g_clipped": g.clone(), "m_hat": m_hat.clone(), "v_hat": v_hat.clone(),
                "update": step.clone()}

    def _apply(self, p: torch.Tensor, step: torch.Tensor, group: Mapping[str, Any]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        new = p.to(torch.float32)
        if wd and self.decoupled_weight_decay:
            new = new * (1.0 - lr * wd)
        p.copy_(new - lr * step)

    def _takes_fused_path(self, params: list[torch.Tensor]) -> bool:
        """``fused=None`` takes the multi-tensor path on CUDA only: on the CPU, where each
        operation over all tensors streams every parameter through memory once more, the
        per-parameter path is faster (GPT-2 small on 2 cores, two runs of
        ``scripts/bench_step.py --optimizer celo_adam``: 0.39 and 0.52 s per step against 2.3
        and 1.6 s). ``fused=True`` takes it anywhere."""
        if self.fused is False or self._capture is not None:
            return False
        if self.fused is None and any(p.device.type == "cpu" for p in params):
            return False
        reasons = {r for p in params if (r := self._param_unfused_reason(p)) is not None}
        if len({p.device for p in params}) > 1:
            reasons.add("parameters on several devices")
        if not reasons:
            return True
        if self.fused is True:
            raise RuntimeError(f"fused=True, but {sorted(reasons)[0]}")
        return False

    def _fused_step(self, entries: list, states: list[dict[str, Any]], loss_t: torch.Tensor,
                    glob: dict[str, Any], consts: Mapping[str, Any]) -> None:
        """The whole step with multi-tensor operations (same values as the eager path)."""
        params = [p for p, _ in entries]
        groups = [g for _, g in entries]
        grads = []
        for p, group in entries:
            g = p.grad.to(torch.float32)
            wd = group["weight_decay"]
            if wd and not self.decoupled_weight_decay:
                g = g + wd * p.to(torch.float32)
            grads.append(g)
        decayed = [i for i, (_, group) in enumerate(entries)
                   if group["weight_decay"] and not self.decoupled_weight_decay]
        if decayed:
            mean_p2 = torch.stack([torch.mean(params[i].double() ** 2).float() for i in decayed])
            loss_t = loss_t + weight_decay_loss(
                [groups[i]["weight_decay"] * params[i].numel() for i in decayed], mean_p2)
        grads = [torch.clamp(g, -VELO_GRAD_CLIP, VELO_GRAD_CLIP).unsqueeze(-1) for g in grads]
        iteration = int(glob["iteration"])
        loss_features = self._advance_loss_buffer(glob, loss_t, iteration)
        frac_feat = self._fraction_features(iteration, consts)
        lstm_in = self._global_inputs(len(params), frac_feat, loss_features)
        h_prev = torch.stack([s["lstm_hidden"] for s in states])
        c_prev = torch.stack([s["lstm_cell"] for s in states])
        _, lr_mult, h_new, c_new = self._rnn(lstm_in, h_prev, c_prev, consts["theta"])
        self._carry_lstm_state(states, h_new, c_new)
        ms = [s["momentum"] for s in states]
        vs = [s["rms"] for s in states]
        b1 = consts["momentum"][0]
        c = torch.clamp(consts["rms"][0], 0.0, 1.0)
        # fma(d, m, (1 - d) g) and fma(c, v, (1 - c) g^2), as lopt_port.accumulators does
        inc_m = torch._foreach_mul(grads, 1 - b1)
        inc_v = torch._foreach_mul(torch._foreach_mul(grads, grads), 1 - c)
        torch._foreach_copy_(ms, torch._foreach_addcmul(inc_m, ms, [b1.expand_as(m) for m in ms]))
        torch._foreach_copy_(vs, torch._foreach_addcmul(inc_v, vs, [c.expand_as(v) for v in vs]))
        inv1, inv2 = self._bias_corrections(iteration)
        m_hat = torch._foreach_mul(ms, inv1)
        v_hat = torch._foreach_mul(vs, inv2)
        denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_add(v_hat, ADAM_SQRT_EPS)),
                                   self.hparams["initial_epsilon"])
        lr_vec = (lr_mult * self.hparams["step_mult"]).unbind(0)
        factors = torch._foreach_div([x.reshape(1) for x in lr_vec], denom)
        steps = [s[..., 0] for s in torch._foreach_mul(m_hat, factors)]
        for p, step, group in zip(params, steps, groups, strict=True):
            self._apply(p, step, group)
