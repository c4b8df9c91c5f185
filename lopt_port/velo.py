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

VeLO, Celo and Celo-Adam share this step and differ in its parts (:class:`VeloParts`): the
LSTM inputs (:mod:`lopt_port.lstm_inputs`), the heads (:mod:`lopt_port.lstm_heads`) and the
per-parameter rule (:mod:`lopt_port.velo_mlp_rule`, :mod:`lopt_port.adam_rule`); the loss
buffer (:mod:`lopt_port.loss_buffer`) and the per-tensor LSTM (:mod:`lopt_port.tensor_lstm`)
are common. :meth:`VeloFamily.step` gathers the lists once and calls :func:`velo`, which runs
:func:`_eager_velo` or :func:`_fused_velo` (same arguments), each the whole step top to bottom.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from lopt_port import velo_config as cfg
from lopt_port.constants import VELO_GRAD_CLIP, VELO_MAX_TRAINING_STEPS
from lopt_port.loss_buffer import LossHorizon, as_loss_tensor, weight_decay_loss
from lopt_port.lstm_heads import VeloHeads
from lopt_port.lstm_inputs import TensorStatistics
from lopt_port.optimizer import (
    LearnedOptimizer,
    ParamsArg,
    StepInputs,
    WeightsArg,
    WeightsKind,
    check_non_negative,
    check_num_steps,
    counter_value,
)
from lopt_port.sharding import Rounds, Total, local, run_rounds, shard_spec
from lopt_port.state_layout import TieBreak
from lopt_port.tensor_lstm import TensorLSTM
from lopt_port.velo_mlp_rule import MLPRule
from lopt_port.velo_parts import VeloParts

KIND = WeightsKind(cfg.KIND, cfg.resolve_hparams, cfg.check_state_dict)


class VeloFamily(LearnedOptimizer):
    """What VeLO, Celo and Celo-Adam share: a step given by :class:`VeloParts`.

    Not an optimizer itself: each subclass names its weights :attr:`kind` and the
    :attr:`recipe` that builds its parts, and adds nothing else to the step.

    Args (of every subclass):
        params: parameters or param groups (``lr`` and ``weight_decay`` per group).
        weights: converted weights (``lopt-convert`` output, a state dict with ``hparams``,
            or :class:`~lopt_port.LoadedWeights`).
        num_steps: the training horizon T (required): the LSTM sees ``t / T`` and, unless
            the weights use the bugged loss features, the loss half-lives reach T.
        lr: multiplies the learned step (``1.0`` = as meta-trained).
        weight_decay: upstream prefab's ``WeightDecayWrapper``: ``g += wd * p`` and
            ``loss += wd * sum(p^2)`` before the optimizer sees them. With
            ``decoupled_weight_decay=True`` instead ``p <- p * (1 - lr * wd) - lr * step``
            (AdamW's convention; the step is computed from the undecayed ``p``).
        hparams: hyperparameters overriding those recorded in the weights.
        tie_break: factored-dims rule for tied sizes (see
            :func:`~lopt_port.state_layout.factored_dims`).
        fused: ``None`` (default) takes the rule's fused path when every parameter of the
            step can, and otherwise the eager path, with one warning naming the reason;
            ``True`` raises instead; ``False`` is always eager.

    The loss enters through ``step(loss=...)`` or ``step(loss)`` (a tensor, kept on its
    device, or a float) or a closure. Parameters whose ``grad`` is ``None`` (frozen or unused)
    and zero-size parameters are skipped: the per-tensor network sees the non-empty tensors
    that have a gradient at this step, in param-group order, each with its own LSTM state.
    The step-wide state (:attr:`global_state`): ``iteration`` (a CPU tensor: reading it is no
    device sync), ``num_steps`` and the loss buffer's ``loss_means``, ``loss_running_min``,
    ``loss_decays``.
    """

    requires_loss = True
    captures_step = True
    #: The weights kind the subclass takes.
    kind: ClassVar[WeightsKind]
    #: ``(hparams, weights, num_steps=, decoupled_weight_decay=, tie_break=) -> VeloParts``.
    recipe: ClassVar[Callable[..., VeloParts]]

    def __init__(self, params: ParamsArg, weights: WeightsArg, *, num_steps: int,
                 lr: float = 1.0, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False,
                 hparams: Mapping[str, Any] | None = None, tie_break: TieBreak = "numpy",
                 fused: bool | None = None) -> None:
        num_steps = check_num_steps(num_steps)
        defaults = {"lr": check_non_negative("lr", lr),
                    "weight_decay": check_non_negative("weight_decay", weight_decay)}
        theta = self._load_weights(weights, self.kind, hparams)
        self.parts = type(self).recipe(self.hparams, theta, num_steps=num_steps,
                                       decoupled_weight_decay=bool(decoupled_weight_decay),
                                       tie_break=tie_break)
        super().__init__(params, defaults, fused=fused, tie_break=tie_break,
                         fused_path=self.parts.rule.fused_path,
                         global_state=self.parts.horizon.new_state)

    @property
    def num_steps(self) -> int:
        """The training horizon T."""
        return self.parts.horizon.num_steps

    @property
    def decoupled_weight_decay(self) -> bool:
        """Whether weight decay is AdamW's (decoupled) rather than prefab's."""
        return self.parts.decoupled_weight_decay

    @torch.no_grad()
    def step(self, closure: Any = None, *, loss: Any = None) -> Any:
        """One update of every parameter with a gradient (:func:`velo`); returns the
        closure's loss."""
        inputs = self._begin_step(closure, loss, skip_empty=True)
        if not inputs.groups:
            return self._end_step(inputs)
        if not torch.compiler.is_compiling():  # a compiled step does not warn
            self._warn_past_horizon(int(self.global_state["iteration"]))
        step_scale, loss_features = velo(inputs, self.global_state, self.parts,
                                         fused=all(self._fused_flags(inputs.params)),
                                         capture=self._capture)
        return self._end_step(inputs, step_scale=step_scale, loss_features=loss_features)


    def _warn_past_horizon(self, iteration: int) -> None:
        """Warn once when a step starts at or past ``num_steps`` (the horizon T)."""
        if iteration >= self.num_steps and "past horizon" not in self._warned:
            self._warned.add("past horizon")
            warnings.warn(
                f"{type(self).__name__}: step {iteration + 1} is past num_steps="
                f"{self.num_steps}: the training-fraction features tanh(10 (t/T - c)) (c up to "
                f"1.1) now run past what meta-training showed the network, and from t/T of "
                f"about 1.3 on they no longer change; set num_steps to the number of steps you "
                f"train for",
                UserWarning, stacklevel=3)


def velo_parts(hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *,
               num_steps: int, decoupled_weight_decay: bool, tie_break: TieBreak) -> VeloParts:
    """VeLO's parts: the loss buffer and LSTM state as the weights' flags say (bugged or
    not), per-tensor statistics as inputs, raw heads, the MLP rule with ``ff_mult`` (100)."""
    return VeloParts(
        horizon=LossHorizon(num_steps, bugged=hparams["use_bugged_loss_features"]),
        lstm=TensorLSTM(weights, carries_state=not hparams["use_bugged_next_lstm_state"]),
        inputs=TensorStatistics(len(hparams["initial_momentum_decays"])), heads=VeloHeads(),
        rule=MLPRule(hparams, weights, ff_mult=hparams["ff_mult"], tie_break=tie_break),
        decoupled_weight_decay=decoupled_weight_decay)


class VeLO(VeloFamily):
    """VeLO, the learned optimizer of Metz et al. 2022, as upstream's ``HyperV2`` computes it.

    Args: as :class:`VeloFamily` (``lr = 1.0`` is upstream), and ``max_training_steps``:
    upstream's prefab averages gradients over ``ceil(T / 150000)`` steps above this horizon;
    that accumulation is not reproduced, so a larger ``num_steps`` is refused (accumulate
    gradients yourself and pass the number of updates). ``fused`` runs the kernels of
    :mod:`lopt_port.velo_fused`.

    State: per parameter ``momentum`` ``(*S, 3)``, ``rms`` ``(*S, 1)``, ``v_row``/``v_col`` or
    ``v_diag``, ``factored_dims``, ``lstm_hidden``/``lstm_cell`` ``(H,)``, all float32; the
    step-wide state of :class:`VeloFamily`.

    :meth:`capture_intermediates` records ``out["step"]`` (loss_features, fraction_trained,
    lstm_input, lstm_state_in/out, controls, lr_mult) and ``out["tensors"][p]`` (ff_params,
    g_clipped, fac_g, features_raw, mlp_input, mlp_pre*, mlp_output, param_scale, update).
    """

    kind = KIND
    recipe = staticmethod(velo_parts)

    def __init__(self, params: ParamsArg, weights: WeightsArg, *, num_steps: int,
                 weight_decay: float = 0.0, lr: float = 1.0,
                 decoupled_weight_decay: bool = False, hparams: Mapping[str, Any] | None = None,
                 tie_break: TieBreak = "numpy",
                 max_training_steps: int = VELO_MAX_TRAINING_STEPS,
                 fused: bool | None = None) -> None:
        if check_num_steps(num_steps) > max_training_steps:
            raise ValueError(
                f"num_steps={num_steps} exceeds max_training_steps={max_training_steps}: "
                f"upstream's prefab would average gradients over "
                f"{math.ceil(num_steps / max_training_steps)} steps, which lopt_port does not "
                f"reproduce; accumulate gradients yourself and pass the number of updates")
        super().__init__(params, weights, num_steps=num_steps, lr=lr, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, hparams=hparams,
                         tie_break=tie_break, fused=fused)


def velo(inputs: StepInputs, glob: dict[str, Any], parts: VeloParts, *, fused: bool,
         capture: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of VeLO's family for the gathered ``inputs``, advancing ``glob`` (the
    step-wide state); :func:`_fused_velo` when ``fused``, else :func:`_eager_velo`. Returns
    the per-tensor factor applied to each step and the loss features (for
    :meth:`~lopt_port.optimizer.LearnedOptimizer.last_step_stats`)."""
    if glob["num_steps"] != parts.horizon.num_steps:
        raise RuntimeError(f"the loaded state was trained with num_steps={glob['num_steps']}, "
                           f"this optimizer has {parts.horizon.num_steps}")
    loss = as_loss_tensor(inputs.loss, inputs.params[0].device)
    step = _fused_velo if fused else _eager_velo
    taken = step(inputs.params, inputs.grads, inputs.states, inputs.param_groups, glob, loss,
                 parts=parts, capture=capture)
    glob["iteration"].add_(1)
    return taken


def _eager_velo(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                states: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]],
                glob: dict[str, Any], loss: torch.Tensor, *, parts: VeloParts,
                capture: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step in PyTorch ops. Sharded (FSDP2) parameters work on their local rows; their
    whole-tensor reductions run as a few batched rounds of collectives
    (:mod:`lopt_port.sharding`)."""
    device = params[0].device
    specs = [shard_spec(p) for p in params]
    # 1. prefab weight decay (g += wd p, loss += wd sum(p^2)), then the clip
    clipped, wd_n, wd_rounds = [], [], []
    for p, g, group, spec in zip(params, grads, groups, specs, strict=True):
        g = local(g).to(torch.float32)
        wd = group["weight_decay"]
        if wd and not parts.decoupled_weight_decay:
            p32 = local(p).to(torch.float32)
            g = g + wd * p32
            wd_n.append(wd * p.numel())
            wd_rounds.append((_mean_square_rounds(p32, p.numel()), spec))
        clipped.append(torch.clamp(g, -VELO_GRAD_CLIP, VELO_GRAD_CLIP))
    if wd_n:
        loss = loss + weight_decay_loss(wd_n, torch.stack(run_rounds(wd_rounds)))
    # 2. loss buffer and training fraction
    iteration = counter_value(glob["iteration"])
    loss_features = parts.horizon.advance(glob, loss, iteration)
    frac_feat = parts.horizon.fraction_features(iteration, device)
    # 3. the per-tensor network over all tensors at once
    lstm_in, shard_mean_p2 = parts.inputs.eager(params, states, specs, frac_feat,
                                                loss_features)
    h_prev, c_prev = parts.lstm.previous(states, device)
    h_new, c_new = parts.lstm(lstm_in, h_prev, c_prev)
    controls, lr_mult = parts.heads(h_new, parts.lstm.on_device(device))
    parts.lstm.carry(states, h_new, c_new)
    if capture is not None:
        capture["step"].update({
            "loss_features": loss_features.clone(),
            "fraction_trained": parts.horizon.fraction(iteration),
            "lstm_input": lstm_in.clone(), "controls": controls.clone(),
            "lr_mult": lr_mult.clone(),
            "lstm_state_in": {"hidden": h_prev.clone(), "cell": c_prev.clone()},
            "lstm_state_out": {"hidden": h_new.clone(), "cell": c_new.clone()}})
    # 4. the per-parameter rule
    applied = parts.heads.applied(lr_mult)
    weights = parts.rule.tensor_weights(controls)
    run_rounds([
        (parts.rule.update_rounds(p, s, g, weights[i], applied[i], group, shard_mean_p2.get(i),
                                  decoupled_weight_decay=parts.decoupled_weight_decay,
                                  iteration=iteration, capture=capture), specs[i])
        for i, (p, s, g, group) in enumerate(zip(params, states, clipped, groups, strict=True))])
    return applied, loss_features


def _fused_velo(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                states: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]],
                glob: dict[str, Any], loss: torch.Tensor, *, parts: VeloParts,
                capture: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step with the rule's multi-tensor form (VeLO, Celo: the kernels' phase A before
    the network and phase B after it, :mod:`lopt_port.velo_fused`; Celo-Adam: ``foreach``
    operations); ``capture``: unused, a capturing step is eager."""
    device = params[0].device
    # 1. prefab weight decay and the clip (and the rule's work before the network)
    grad_wd = [0.0 if parts.decoupled_weight_decay else float(g["weight_decay"])
               for g in groups]
    prep = parts.rule.fused_begin(params, grads, states, grad_wd)
    decayed = [i for i, w in enumerate(grad_wd) if w]
    if decayed:
        loss = loss + weight_decay_loss([grad_wd[i] * params[i].numel() for i in decayed],
                                        prep.mean_p2(decayed))
    # 2. loss buffer and training fraction
    iteration = int(glob["iteration"])
    loss_features = parts.horizon.advance(glob, loss, iteration)
    frac_feat = parts.horizon.fraction_features(iteration, device)
    # 3. the per-tensor network over all tensors at once
    lstm_in = parts.inputs.fused(params, getattr(prep, "stats", None), frac_feat,
                                 loss_features)
    h_prev, c_prev = parts.lstm.previous(states, device)
    h_new, c_new = parts.lstm(lstm_in, h_prev, c_prev)
    controls, lr_mult = parts.heads(h_new, parts.lstm.on_device(device))
    parts.lstm.carry(states, h_new, c_new)
    # 4. the per-parameter rule, for all tensors at once
    applied = parts.heads.applied(lr_mult)
    parts.rule.fused_finish(prep, controls, applied, groups,
                            decoupled_weight_decay=parts.decoupled_weight_decay,
                            iteration=iteration)
    return applied, loss_features


def _mean_square_rounds(p32: torch.Tensor, numel: int) -> Rounds:
    """``mean(p^2)`` in float64 over the whole tensor (``p32``: this rank's rows); prefab
    weight decay's loss term."""
    (total,) = yield [Total(torch.sum(torch.square(p32.double())))]
    return (total / numel).float()
