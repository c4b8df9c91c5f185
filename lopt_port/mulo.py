"""``MuLO``: μLO (upstream ``MuAdafacMLPLOpt``, arXiv 2406.00153) as a ``torch.optim.Optimizer``.

μLO is small_fc_lopt (:class:`~lopt_port.SmallFCLOpt`, upstream HEAD) meta-trained on μP
tasks, with three changes to the update (spec A.4). For the gradients ``g`` of all parameters
and each parameter ``p`` with its μP scale ``s``:

1. optional global-norm clipping (``clip_grad``; off at meta-test, as upstream's
   ``optax.clip_by_global_norm(1.0)``): ``n = sqrt(sum over all tensors of sum(g**2))``, then
   ``g <- g`` if ``n < 1`` else ``g <- g / n``, for every tensor;
2. ``g <- nan_to_num(g)`` always (NaN -> 0, +-inf -> the largest finite value of g's dtype),
   before the accumulators;
3. small_fc_lopt's step ``step = (direction * exp(magnitude * exp_mult)) * step_mult``
   (unchanged: features, accumulators, MLP), applied as ``p <- p - lr * (step * s)``; ``lr``
   is ``1`` upstream, and the products are evaluated in exactly this order (spec A.10.1).

Which tensors get which ``s`` is the model's business (μP): upstream reads it from the task's
model state (``mup_lrs_to_use``). Here every parameter's ``s`` is explicit:
:func:`mup_scales` derives it with μLO's rule, or any ``{param: s}`` mapping, a param group's
``"scale"`` or ``default_scale`` gives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lopt_port import mulo_config
from lopt_port.fused_shards import complete_each
from lopt_port.optimizer import (
    LearnedOptimizer,
    ParamsArg,
    WeightsArg,
    WeightsKind,
    check_non_negative,
)
from lopt_port.sharding import local, shard_spec
from lopt_port.small_fc_lopt import SmallFCLOptNetwork, fused_path_of, small_fc_lopt
from lopt_port.state_layout import TieBreak

KIND = WeightsKind(mulo_config.KIND, mulo_config.resolve_hparams, mulo_config.check_state_dict)

HiddenSelector = Iterable[str] | Callable[[str, torch.Tensor], bool]


def _as_scale(value: Any, what: str) -> float:
    """A scale as the float32 value the update uses (upstream's 0-d float32 arrays)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: a scale must be a float, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}: a scale must be finite and non-negative, got {value!r}")
    return float(np.float32(value))


def mup_scales(named_params: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
               hidden: HiddenSelector, *, hidden_lr_mult: float = 1.0
               ) -> dict[torch.Tensor, float]:
    """μLO's per-tensor scales (spec A.6): ``hidden_lr_mult / fan_in`` for hidden matrices,
    ``1`` for every other tensor.

    Args:
        named_params: ``model.named_parameters()`` or a ``{name: tensor}`` mapping.
        hidden: the hidden ("matrix-like", width -> width) weight matrices, as a collection
            of names (each must exist) or a predicate ``(name, tensor) -> bool``. A hidden
            tensor must be 2-D in the ``nn.Linear`` layout ``[out, in]``: ``fan_in =
            shape[1]``.
        hidden_lr_mult: μLO's ``--mup_hidden_lr_mult`` (default 1). The scale is absolute
            (``1 / fan_in``), not relative to a base width.

    Returns:
        ``{tensor: s}``, ready for ``MuLO(..., scales=...)``.

    The classification μLO's meta-training tasks used, in PyTorch terms (``d = d_model``):

    ==============  ==========================================  ============================
    task            hidden (``s = hidden_lr_mult / fan_in``)    ``s = 1``
    ==============  ==========================================  ============================
    MuMLP           the weights of ``linear_1 .. linear_{L-1}``  the input layer
                    (width -> width)                            ``linear_0``, the readout
                                                                ``linear_L``, all biases
    MuTransformer   attention query, key, value and output      token embedding, output
                    projections (``fan_in = d``), MLP           (``linear_out``), LayerNorm
                    up-projection (``d``), MLP down-projection  scales and offsets, all
                    (``4 d``)                                   biases
    ==============  ==========================================  ============================

    (MuViT's attention output uses ``1 / head_dim``, a quirk of flax's kernel layout; pass
    an explicit scale to reproduce it.) The forward-pass multipliers of μP (input and output
    multipliers, zero-initialized readout, ``1/key_size`` attention) belong to the model.
    """
    items = list(named_params.items() if isinstance(named_params, Mapping) else named_params)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("named_params repeats a name")
    if callable(hidden):
        is_hidden = {n: bool(hidden(n, t)) for n, t in items}
    else:
        wanted = {hidden} if isinstance(hidden, str) else set(hidden)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise ValueError(f"hidden names no parameter: {unknown[:5]}")
        is_hidden = {n: n in wanted for n in names}
    mult = _as_scale(hidden_lr_mult, "hidden_lr_mult")
    out: dict[torch.Tensor, float] = {}
    for name, t in items:
        if not is_hidden[name]:
            out[t] = 1.0
            continue
        if t.dim() != 2 or t.shape[1] == 0:
            raise ValueError(f"hidden tensor {name!r} has shape {tuple(t.shape)}: the rule "
                             f"needs a non-empty 2-D nn.Linear weight [out, in] (fan_in = "
                             f"shape[1]); give other tensors an explicit scale")
        out[t] = float(np.float32(mult) / np.float32(t.shape[1]))
    return out


class MuLO(LearnedOptimizer):
    """μLO with upstream ``MuAdafacMLPLOpt`` semantics (eager and fused paths).

    Args:
        params: iterable of tensors or param-group dicts (per-group options: ``lr``, and
            ``scale``, the ``s`` of every tensor of the group that ``scales`` does not name).
        weights: converted μLO weights (kind ``mulo``; a bare state dict needs
            ``hparams``).
        scales: ``{parameter: s}``, e.g. from :func:`mup_scales`. Every parameter needs an
            ``s``: from here, else its group's ``scale``, else ``default_scale``; a parameter
            with none raises ``ValueError`` naming it. Scales are rounded to float32.
        lr: multiplies the step: ``p - lr * (step * s)``; ``1.0`` is upstream exactly.
        hparams: hyperparameters that override or complete the file's metadata.
            ``step_mult`` must be known (no default, see :mod:`lopt_port.mulo_config`).
        clip_grad: upstream's ``clip_grad``: clip the gradients of all parameters to global
            norm 1 before everything (False, as in μLO's meta-test). Not supported for
            sharded (DTensor) parameters.
        default_scale: the ``s`` of parameters that neither ``scales`` nor their group give
            one (``None``: such a parameter is an error).
        tie_break, fused: as :class:`~lopt_port.SmallFCLOpt`.

    :attr:`scales` and :meth:`scale_of` show every parameter's ``s``; the param groups record
    them (``"scales"``, in ``params`` order), so :meth:`state_dict` carries them and
    :meth:`load_state_dict` refuses a state trained with other scales. The per-parameter
    state and :meth:`capture_intermediates`' records are small_fc_lopt's (``update`` includes
    ``s``); the step is :func:`lopt_port.small_fc_lopt.small_fc_lopt`'s with the scales, on the
    gradients of :func:`mulo_grads`.
    """

    def __init__(self, params: ParamsArg, weights: WeightsArg, *,
                 scales: Mapping[torch.Tensor, float] | None = None, lr: float = 1.0,
                 hparams: Mapping[str, Any] | None = None, clip_grad: bool = False,
                 default_scale: float | None = None, tie_break: TieBreak = "numpy",
                 fused: bool | None = None) -> None:
        lr = check_non_negative("lr", lr)
        if not isinstance(clip_grad, bool):
            raise ValueError(f"clip_grad must be a bool, got {clip_grad!r}")
        self.clip_grad = clip_grad
        self._default_scale = (None if default_scale is None
                               else _as_scale(default_scale, "default_scale"))
        self._explicit: dict[torch.Tensor, float] = {}
        for p, s in (scales or {}).items():
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"scales must be keyed by parameter tensors, got "
                                 f"{type(p).__name__}")
            self._explicit[p] = _as_scale(s, f"scale of a tensor of shape {tuple(p.shape)}")
        sd = self._load_weights(weights, KIND, hparams)
        self.parts = SmallFCLOptNetwork(self.hparams, sd, tie_break)
        super().__init__(params, {"lr": lr}, fused=fused, tie_break=tie_break,
                         fused_path=fused_path_of(self.hparams))
        unused = [p for p in self._explicit if p not in self.scales]
        if unused:
            raise ValueError(f"scales names {len(unused)} tensor(s) that are not parameters "
                             f"of this optimizer (first: shape {tuple(unused[0].shape)})")

    @torch.no_grad()
    def step(self, closure: Any = None, *, loss: Any = None) -> Any:
        """One μLO update of every parameter that has a gradient; returns the closure's loss
        (a loss given is ignored: μLO does not use it)."""
        inputs = self._begin_step(closure, loss)
        grads = iter(mulo_grads(inputs.grads, self.clip_grad))
        for lists in inputs.groups:
            scale_of = dict(zip(lists.group["params"], lists.group["scales"], strict=True))
            small_fc_lopt(lists.params, [next(grads) for _ in lists.params], lists.states,
                          network=self.parts, lr=lists.group["lr"],
                          scales=[scale_of[p] for p in lists.params],
                          fused=self._fused_flags(lists.params), capture=self._capture)
        return self._end_step(inputs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, plus each parameter's scale (see the class doc)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        group_scale = group.get("scale")
        if group_scale is not None:
            group_scale = _as_scale(group_scale, f"param group {index}: scale")
            group["scale"] = group_scale
        resolved, missing = [], []
        for i, p in enumerate(group["params"]):
            s = self._explicit.get(p, group_scale if group_scale is not None
                                   else self._default_scale)
            if s is None:
                missing.append(f"param group {index}, parameter {i} (shape {tuple(p.shape)})")
            resolved.append(s)
        if missing:
            raise ValueError(f"MuLO needs a scale for every parameter (μP's s: "
                             f"hidden_lr_mult / fan_in for hidden matrices, 1 otherwise; see "
                             f"lopt_port.mup_scales); none for: {'; '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                             + ". Pass scales=, a group 'scale' or default_scale=.")
        group["scales"] = resolved

    @property
    def scales(self) -> dict[torch.Tensor, float]:
        """Every parameter's scale ``s`` (float32 values), in param-group order."""
        return {p: s for g in self.param_groups for p, s in zip(g["params"], g["scales"],
                                                                strict=True)}

    def scale_of(self, p: torch.Tensor) -> float:
        """The scale ``s`` of parameter ``p``; ``KeyError`` if ``p`` is not a parameter."""
        scales = self.scales
        if p not in scales:
            raise KeyError(f"not a parameter of this optimizer (shape {tuple(p.shape)})")
        return scales[p]

    @property
    def decays(self) -> dict[str, torch.Tensor]:
        """Effective float32 decays after the learned offsets (``momentum``, ``rms``,
        ``adafactor``)."""
        return {k: v.clone() for k, v in self.parts.decays.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; refuses one whose recorded scales differ
        from this optimizer's (its accumulators were built for other steps), or that
        another kind of optimizer saved."""
        self._check_saved_kind(state_dict)
        saved_groups = state_dict["param_groups"]
        n_saved = sum(len(g["params"]) for g in saved_groups)
        n_ours = sum(len(g["params"]) for g in self.param_groups)
        if n_saved != n_ours:
            raise ValueError(f"state dict has {n_saved} parameters, the optimizer {n_ours}")
        problems = []
        if len(saved_groups) == len(self.param_groups):
            for gi, (saved, ours) in enumerate(zip(saved_groups, self.param_groups,
                                                   strict=True)):
                if "scales" not in saved:
                    raise ValueError(f"param group {gi} of the state dict records no scales: "
                                     f"not a MuLO state")
                for i, (a, b) in enumerate(zip(saved["scales"], ours["scales"], strict=False)):
                    if a != b:
                        problems.append(f"param group {gi}, parameter {i} (shape "
                                        f"{tuple(ours['params'][i].shape)}): saved s={a!r}, "
                                        f"this optimizer's s={b!r}")
        if problems:
            raise ValueError("the state does not fit this optimizer's scales: "
                             + "; ".join(problems[:5]))
        super().load_state_dict(state_dict)


def mulo_grads(grads: Sequence[torch.Tensor], clip_grad: bool) -> list[torch.Tensor]:
    """The gradients μLO's update reads: after the optional global-norm clip
    (``g / n`` when ``n = sqrt(sum of all g^2) >= 1``) and ``nan_to_num``, in the gradient's
    dtype as upstream (``p.grad`` itself is left as it is). FSDP2 gradients (``DTensor``)
    come back as this rank's local tensors; their sums of squares are completed over the
    shards in float64 (one ``all_reduce``)."""
    specs = [shard_spec(g) for g in grads]
    grads = [local(g) for g in grads]
    if clip_grad and grads:
        device = grads[0].device
        sums = [g.to(torch.float32).square().sum() if spec is None
                else g.to(torch.float64).square().sum() for g, spec in zip(grads, specs,
                                                                         strict=True)]
        # A sharded gradient's sum of squares over its shards: one all_reduce for all.
        sums = complete_each(sums, specs)
        total = torch.stack([t.to(device=device, dtype=torch.float32) for t in sums]).sum()
        norm = total.sqrt()
        grads = [torch.where(norm.to(g.device) < 1.0, g, g / norm.to(g.device, g.dtype))
                 for g in grads]
    return [torch.nan_to_num(g) for g in grads]
