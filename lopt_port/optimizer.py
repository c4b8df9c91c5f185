"""``LearnedOptimizer``: what the five optimizers share, written once.

Each optimizer is a subclass that holds only its math, in torch.optim's shape (``adam.py``):
its ``step()`` gathers the parameters, gradients and state once (:meth:`LearnedOptimizer.
_begin_step`) and calls module-level functions, ``_eager_<kind>`` and ``_fused_<kind>`` (or
``_foreach_<kind>``), which take the same arguments. The base class owns:

- the weights: loading, the kind check, completing and checking the hyperparameters against
  the weights' names and shapes (:class:`~lopt_port.weights.WeightsError` when they do not fit);
- validation of the options every optimizer shares (``lr``, ``weight_decay``, ``tie_break``,
  ``num_steps``);
- the step preamble: the closure (run with gradients enabled), the loss (``step(loss=...)``, or
  a tensor or float given positionally), and per param group the parameters that have a
  gradient, their gradients and their state (created on first use);
- the fused-path decision (:class:`FusedPath`): ``fused=True`` raises where the fused path
  cannot run, ``None`` falls back to the eager path with one warning per reason, ``False`` is
  always eager, and capturing intermediates is always eager;
- ``load_state_dict``: everything is checked against the state a parameter would start with
  (names, shapes, factored axes) before anything changes, and the state stays float32 on each
  parameter's device (torch.optim would cast it to the parameter's dtype, and bf16 would lose
  the accumulators' precision);
- the step-wide state of the optimizers that have one (VeLO, Celo, Celo-Adam): kept under the
  key :data:`~lopt_port.state_layout.GLOBAL_STATE` in the first parameter's state, so that
  every key of ``state_dict()["state"]`` is a parameter (``torch.distributed.checkpoint``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from lopt_port import extension
from lopt_port.provenance import fixture_warning
from lopt_port.state_layout import GLOBAL_STATE, TieBreak, factored_state_shapes
from lopt_port.step_stats import group_stats
from lopt_port.value_rules import DISPLAY, check_real_dense
from lopt_port.weights import LoadedWeights, WeightsError, load_weights

WeightsArg = str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights
ParamsArg = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
_FACTORED = ("v_row", "v_col", "v_diag")
#: An initial ``lr`` below this (and above 0) warns: ``lr`` multiplies the learned step.
LOW_LR = 0.05
#: How :meth:`LearnedOptimizer.observe_loss` combines several losses before one step.
LossCombine = Literal["mean", "sum"]
#: The lines that hand the loss over, by training loop (the missing-loss error lists them).
LOSS_HANDOFF = (
    "plain loop: opt.step(loss); "
    "GradScaler, timm's NativeScaler, accelerate: opt.observe_loss(loss) before the step; "
    "Hugging Face Trainer: lopt_port.integrations.track_loss(model, opt) before train(); "
    "Lightning: Trainer(callbacks=[lopt_port.integrations.LightningLossCallback()])")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: The param-group key of :meth:`LearnedOptimizer.state_dict` that records the weights kind
#: (``small_fc_lopt``, ``mulo``, ...): a state loads only into an optimizer of its kind. State
#: dicts written before it existed lack it and load as before.
KIND_KEY = "lopt_kind"
#: Why complex parameters are refused.
COMPLEX_REASON = ("complex parameters are not supported: the learned optimizers are "
                  "real-valued (the imaginary part would be lost)")


@dataclass(frozen=True)
class WeightsKind:
    """A weights kind as an optimizer reads it: its name, and its config's two rules."""

    kind: str
    #: ``(given hparams, {name: shape}) -> complete hparams``; ``ValueError`` if they do not fit.
    resolve_hparams: Callable[[Mapping[str, Any], Mapping[str, tuple[int, ...]]], dict[str, Any]]
    #: ``(state dict, hparams, origin)``; ``ValueError`` naming every mismatch.
    check_state_dict: Callable[[Mapping[str, Any], Mapping[str, Any], str], None]


@dataclass(frozen=True)
class FusedPath:
    """How an optimizer decides whether a step's parameters take its fused path."""

    #: Why these hyperparameters cannot run fused (``None``: they can).
    config_reason: str | None
    #: Why one parameter cannot (``None``: it can).
    param_reason: Callable[[torch.Tensor], str | None]
    #: The fused path runs the compiled kernels (:mod:`lopt_port.extension`), loaded up front.
    uses_extension: bool = True
    #: Every parameter of a step takes the fused path, or none does (the per-tensor network of
    #: VeLO's family sees all tensors at once); otherwise each parameter decides alone.
    all_or_none: bool = False
    #: ``fused=None`` takes the fused path only on these device types (``None``: on any).
    auto_devices: tuple[str, ...] | None = None


@dataclass
class GroupLists:
    """One param group's parameters that have a gradient, with their gradients and state."""

    group: dict[str, Any]
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepInputs:
    """What :meth:`LearnedOptimizer._begin_step` gathered for one step."""

    #: What ``step()`` returns: the closure's value.
    returned: Any
    #: The training loss (a tensor or float), ``None`` if none was given.
    loss: Any
    groups: list[GroupLists]
    #: With :attr:`LearnedOptimizer.track_step_stats`: each parameter's value before the step.
    before: list[torch.Tensor] | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g.params]

    @property
    def grads(self) -> list[torch.Tensor]:
        return [x for g in self.groups for x in g.grads]

    @property
    def states(self) -> list[dict[str, Any]]:
        return [s for g in self.groups for s in g.states]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Each parameter's group, in :attr:`params` order."""
        return [g.group for g in self.groups for _ in g.params]


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` that makes a warning given by the caller point at the first frame
    outside lopt_port (the user's line, however many of the package's frames lie between)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def counter_value(counter: torch.Tensor) -> int | float | torch.Tensor:
    """A step counter (a CPU tensor in the state) as a step reads it: its Python number in
    eager mode (reading a CPU tensor is no device sync), the tensor itself under
    ``torch.compile``, where a number would be a constant of the graph and every step a
    recompilation (torch.optim's ``_get_value`` does the same)."""
    if torch.compiler.is_compiling():
        return counter
    return counter.item()


def check_non_negative(name: str, value: Any) -> float:
    """A finite, non-negative float option (``lr``, ``weight_decay``)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite, non-negative float, got {value!r}")
    return float(value)


def check_num_steps(num_steps: Any) -> int:
    """The training horizon: a positive int."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int (the training horizon), got "
                         f"{num_steps!r}")
    return num_steps


class LearnedOptimizer(torch.optim.Optimizer):
    """The base of every lopt-port optimizer (module docstring).

    Subclasses call ``super().__init__`` with their weights kind, their param-group defaults
    and their :class:`FusedPath`, after setting :attr:`hparams` through :meth:`_load_weights`
    (which the fused-path rules read), and implement :meth:`initial_state` and ``step()``.
    """

    #: ``step()`` needs the training loss (``step(loss=...)``, positionally, or a closure).
    requires_loss: ClassVar[bool] = False
    #: What :meth:`capture_intermediates` yields: ``{param: record}`` (``False``) or
    #: ``{"step": {...}, "tensors": {param: record}}`` (``True``, a step-wide network).
    captures_step: ClassVar[bool] = False

    hparams: dict[str, Any]
    #: What the weights are: ``fixture``, ``release``, ``pylo-copy`` or ``unknown``.
    weights_origin: str
    #: The optimizer's composed parts; they give :meth:`initial_state`, and ``on_device``
    #: (their constants copied to a device, once).
    parts: Any

    def _load_weights(self, weights: WeightsArg, kind: WeightsKind,
                      overrides: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """Load ``weights`` of ``kind``, complete :attr:`hparams` (the weights' metadata, then
        ``overrides``) and check the state dict against them; the weights as float32 CPU
        tensors. Raises :class:`~lopt_port.weights.WeightsError`.

        Sets :attr:`weights_origin` (:mod:`lopt_port.provenance`). Weights that are a test
        fixture (not meta-trained) give one ``UserWarning`` per optimizer built, saying so;
        ``release``, ``pylo-copy`` and ``unknown`` weights give none (most weights converted by
        users are ``unknown``: only what lopt-port can recognise is classified)."""
        loaded = load_weights(weights)
        if loaded.kind not in (None, kind.kind):
            raise WeightsError(f"weights are for {loaded.kind!r}, not {kind.kind!r}")
        self._kind = kind.kind
        self.weights_origin = loaded.origin
        if self.weights_origin == "fixture":
            warnings.warn(fixture_warning(type(self).__name__, loaded.origin_note), UserWarning,
                          stacklevel=_stacklevel_outside_package())
        given = {**loaded.hparams, **(overrides or {})}
        shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
        try:
            check_real_dense(loaded.state_dict, "weights")
            self.hparams = kind.resolve_hparams(given, shapes)
            kind.check_state_dict(loaded.state_dict, self.hparams, "weights")
        except ValueError as e:
            raise WeightsError(str(e)) from None
        return {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
                for k, v in loaded.state_dict.items()}

    def __init__(self, params: ParamsArg, defaults: dict[str, Any], *, fused: bool | None,
                 fused_path: FusedPath, tie_break: TieBreak = "numpy",
                 global_state: Callable[[torch.device], dict[str, Any]] | None = None) -> None:
        if tie_break not in ("numpy", "stable"):
            raise ValueError(f"tie_break must be 'numpy' or 'stable', got {tie_break!r}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.tie_break: TieBreak = tie_break
        self.fused = fused
        self._fused_path = fused_path
        self._fused_reason = fused_path.config_reason
        if self._fused_reason is None and fused is not False and fused_path.uses_extension:
            try:
                extension.load_backend()
            except extension.ExtensionUnavailable as e:
                self._fused_reason = str(e)
        if fused is True and self._fused_reason is not None:
            raise RuntimeError(f"fused=True, but {self._fused_reason}")
        self._warned: set[str] = set()
        self._capture: Any = None
        #: Record :meth:`last_step_stats` in the coming steps (it costs a copy of the
        #: parameters per step: turn it on for the steps you log).
        self.track_step_stats = False
        self._last_stats: list[dict[str, torch.Tensor]] | None = None
        self._observed: list[torch.Tensor] = []
        self._combine: LossCombine = "mean"
        self._grads_cleared = False
        self._new_global_state = global_state
        super().__init__(params, defaults)
        # The step-wide state lives in the first parameter's state (see global_state).
        self._anchor = self.param_groups[0]["params"][0]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; warns once when a group starts with an ``lr`` far below
        the meta-trained scale (``0 < lr < 0.05``): here ``lr`` multiplies the learned step
        (``1.0`` = as meta-trained), it is not AdamW's step size. Values set later
        (schedulers, warm-up) and ``lr = 0`` never warn.

        Complex and sparse parameters are refused (``ValueError``) before the group is added.
        """
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets: its error stays
            params = list(params)  # a generator is read once, here
        param_group = {**param_group, "params": params}
        for p in params:
            if not isinstance(p, torch.Tensor):
                continue  # torch's TypeError names it
            where = f"{type(self).__name__}: parameter of shape {tuple(p.shape)} ({p.dtype})"
            if p.is_complex():
                raise ValueError(f"{where}: {COMPLEX_REASON}")
            if p.layout != torch.strided:
                raise ValueError(f"{where}: sparse parameters ({p.layout}) are not supported: "
                                 f"the learned optimizers' state and features are dense")
        super().add_param_group(param_group)
        lr = self.param_groups[-1]["lr"]
        if 0 < lr < LOW_LR and "low lr" not in self._warned:
            self._warned.add("low lr")
            warnings.warn(
                f"{type(self).__name__}: lr={lr!r} multiplies the learned step, whose scale "
                f"the optimizer learned in meta-training (lr=1.0 is the step as meta-trained); "
                f"an AdamW-style lr of {lr!r} makes every step {1 / lr:.0f}x smaller and "
                f"training all but stops. Use lr=1.0, or a scheduler that starts from it.",
                UserWarning, stacklevel=3)

    def observe_loss(self, loss: torch.Tensor | float, *,
                     combine: LossCombine = "mean") -> None:
        """Record the training loss for the next :meth:`step` (for loops that call ``step()``
        without it, such as ``GradScaler.step(opt)``). A tensor stays on its device (no host
        sync).

        Several calls before one step (gradient accumulation) are combined in float32, in call
        order: ``combine="mean"`` (each value is one micro-batch's loss) hands the step
        ``((l1 + l2) + ...) / n``; ``combine="sum"`` (each value is a micro-batch's share of the
        window's loss, as when a loss is normalized by the whole window's token count) hands
        it ``(l1 + l2) + ...``. One step's values must all use the same rule.

        Losses observed before :meth:`zero_grad` belong to the gradients it cleared: the first
        observation after it discards them (so a step that ``GradScaler`` skipped does not
        leak its loss into the next one), while a ``zero_grad()`` between the forward pass and
        ``backward()`` keeps the forward's loss for the coming step.
        """
        if isinstance(loss, bool) or not isinstance(loss, (torch.Tensor, int, float)):
            raise TypeError(f"observe_loss takes a tensor or a float, got "
                            f"{type(loss).__name__}")
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got {combine!r}")
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            value = loss.detach().to(torch.float32).reshape(())
        else:
            value = torch.tensor(float(loss), dtype=torch.float32)
        if self._grads_cleared:
            self._observed.clear()
            self._grads_cleared = False
        if self._observed and combine != self._combine:
            raise ValueError(f"observe_loss(combine={combine!r}) after combine="
                             f"{self._combine!r} in the same step: one step's losses are all "
                             f"means or all shares of a sum")
        self._combine = combine
        self._observed.append(value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; losses observed so far are discarded by the next
        :meth:`observe_loss` (they belong to the cleared gradients), not by this call."""
        super().zero_grad(set_to_none=set_to_none)
        self._grads_cleared = bool(self._observed)

    def _observed_loss(self) -> torch.Tensor | None:
        """The observed losses combined (:meth:`observe_loss`; ``None``: none)."""
        if not self._observed:
            return None
        total = self._observed[0]
        for value in self._observed[1:]:
            total = total + value.to(total.device)
        return total / len(self._observed) if self._combine == "mean" else total

    # ----------------------------------------------------------------------------- state
    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The state a parameter starts with (its parts' ``initial_state``)."""
        return self.parts.initial_state(p)

    @property
    def global_state(self) -> dict[str, Any]:
        """The step-wide state (optimizers that have one), created on first use and kept
        under :data:`~lopt_port.state_layout.GLOBAL_STATE` in the first parameter's state."""
        if self._new_global_state is None:
            raise AttributeError(f"{type(self).__name__} has no step-wide state")
        st = self.state[self._anchor]
        if GLOBAL_STATE not in st:
            st[GLOBAL_STATE] = self._new_global_state(self._anchor.device)
        return st[GLOBAL_STATE]

    # ------------------------------------------------------------------------------ step
    def _begin_step(self, closure: Any, loss: Any, *, skip_empty: bool = False) -> StepInputs:
        """The step preamble: run the closure, take the loss, and gather per param group the
        parameters with a gradient (not the zero-size ones with ``skip_empty``), their
        gradients and their state (created on first use).

        ``closure`` may be the loss itself (a tensor or a float) instead of a callable. An
        optimizer that :attr:`requires_loss` and gets none raises, except in a step where
        every group's ``lr`` is 0: that is how ``torch.distributed.checkpoint`` creates an
        optimizer's state, so the state is created and nothing else happens (no groups)."""
        returned = None
        if isinstance(closure, (torch.Tensor, int, float)) and not isinstance(closure, bool):
            if loss is not None:
                raise TypeError("the loss was given twice (positionally and as loss=)")
            closure, loss = None, closure
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"step() takes a closure, or the loss as a tensor or float; "
                                f"got {type(closure).__name__}")
            with torch.enable_grad():
                returned = closure()
        explicit = loss
        if loss is None:
            loss = returned
        # Observed losses come first: a closure's value is then only what the loop returns
        # (Lightning's closure returns the last micro-batch's loss divided for accumulation).
        observed = self._observed_loss()
        if observed is not None:
            if explicit is not None:
                raise TypeError("the loss was given to step() and also observed with "
                                "observe_loss(); use one of the two")
            loss = observed
        # Everything is checked before any state is created: a refused step changes nothing.
        groups = [GroupLists(group, [p for p in group["params"] if p.grad is not None
                                     and not (skip_empty and p.numel() == 0)])
                  for group in self.param_groups]
        groups = [lists for lists in groups if lists.params]
        if any(p.grad.is_sparse for lists in groups for p in lists.params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        lr_zero = all(float(g["lr"]) == 0.0 for g in self.param_groups)
        if groups and self.requires_loss and loss is None and not lr_zero:
            raise RuntimeError(f"{type(self).__name__} needs the training loss; add the one "
                               f"line for your loop: {LOSS_HANDOFF}")
        if self.fused is True and groups:  # refused before any state is created
            self._fused_flags([p for lists in groups for p in lists.params])
        for lists in groups:
            self._init_group(lists.group, skip_empty)
            for p in lists.params:
                lists.grads.append(p.grad)
                lists.states.append(self.state[p])
        self._observed.clear()  # handed to this step, final now (in place: torch.compile)
        self._grads_cleared = False
        if groups and self.requires_loss and loss is None:
            return StepInputs(returned, None, [])
        before = ([p.detach().clone() for lists in groups for p in lists.params]
                  if self.track_step_stats else None)
        return StepInputs(returned, loss, groups, before)

    def _end_step(self, inputs: StepInputs, *, step_scale: torch.Tensor | None = None,
                  loss_features: torch.Tensor | None = None) -> Any:
        """The step's epilogue: records :meth:`last_step_stats` when tracked (``step_scale``:
        one per parameter of ``inputs``); returns what ``step()`` returns."""
        if inputs.before is not None:
            self._last_stats = group_stats(self.param_groups, inputs.params, inputs.before,
                                           step_scale, loss_features)
        return inputs.returned

    def last_step_stats(self) -> list[dict[str, torch.Tensor]]:
        """Diagnostics of the last step taken with ``track_step_stats = True``, one dict of
        float32 tensors per param group (:mod:`lopt_port.step_stats`: ``update_rms``, and for
        VeLO's family ``step_scale`` and ``loss_features``). They stay on the parameters'
        device: nothing is read to the host until you read them."""
        if self._last_stats is None:
            raise RuntimeError(f"{type(self).__name__}: no step stats recorded; set "
                               f"opt.track_step_stats = True before the steps you log")
        return self._last_stats

    def _init_group(self, group: dict[str, Any], skip_empty: bool) -> None:
        """Create the state of ``group``'s parameters that have a gradient (not the zero-size
        ones with ``skip_empty``) and have none yet, and the step-wide state (optimizers that
        have one).

        Named as torch.optim's optimizers name theirs: under ``torch.compile`` dynamo runs
        this method eagerly instead of tracing it (``torch/_dynamo/variables/optimizer.py``)
        and guards on the state it leaves, so the first compiled step does not trace the state
        creation (host-side numpy in :func:`~lopt_port.state_layout.factored_dims`) nor the
        copies of the weights to the parameters' devices (:attr:`parts`' ``on_device``,
        made here), and the later steps reuse its graph. Dynamo then guards on the identity
        of every state tensor: the steps update the state in place."""
        for p in group["params"]:
            if p.grad is None or (skip_empty and p.numel() == 0):
                continue
            self.parts.on_device(p.device)
            state = self.state[p]
            if not state.keys() - {GLOBAL_STATE}:
                state.update(self.initial_state(p))
        if self._new_global_state is not None:
            self.global_state  # noqa: B018 (creates it)

    def _fused_flags(self, params: list[torch.Tensor]) -> list[bool]:
        """Per parameter, whether it takes the fused path (:class:`FusedPath`): ``fused=True``
        raises where it cannot; ``None`` warns once per reason and runs those eagerly."""
        path = self._fused_path
        if torch.compiler.is_compiling():
            # The kernels are opaque to dynamo: a compiled step is the eager path, traced.
            if self.fused is True:
                raise RuntimeError("fused=True cannot run under torch.compile (the kernels "
                                   "are opaque to dynamo); use fused=False or None")
            return [False] * len(params)
        if self.fused is False or self._capture is not None or not params:
            return [False] * len(params)
        if (self.fused is None and path.auto_devices is not None
                and any(p.device.type not in path.auto_devices for p in params)):
            return [False] * len(params)
        # A zero-size parameter has nothing to compute: it takes the eager path, no reason.
        reasons = [self._fused_reason or path.param_reason(p) if p.numel() else None
                   for p in params]
        if path.all_or_none:
            if len({p.device for p in params}) > 1:
                reasons.append("the parameters are on several devices")
            first = next((r for r in reasons if r is not None), None)
            reasons = [first] * len(params)
        for p, reason in zip(params, reasons, strict=True):
            if reason is None:
                continue
            if self.fused is True:
                where = "" if path.all_or_none else f" (parameter of shape {tuple(p.shape)})"
                raise RuntimeError(f"fused=True, but {reason}{where}")
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"{type(self).__name__}: using the eager path: {reason}",
                              stacklevel=5)
        return [r is None and p.numel() > 0 for p, r in zip(params, reasons, strict=True)]

    @contextlib.contextmanager
    def capture_intermediates(self) -> Iterator[dict[Any, Any]]:
        """Record every intermediate of the steps taken inside the ``with`` block (they run
        eagerly), under upstream's golden-vector names; the last step wins.

        Yields ``{param: {name: tensor}}``, or for optimizers with a step-wide network
        (:attr:`captures_step`) ``{"step": {name: value}, "tensors": {param: {name: tensor}}}``.
        Each optimizer's docstring lists its names.
        """
        container: dict[Any, Any] = {"step": {}, "tensors": {}} if self.captures_step else {}
        previous, self._capture = self._capture, container
        try:
            yield container
        finally:
            self._capture = previous

    # ------------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, each param group recording the weights kind
        (:data:`KIND_KEY`)."""
        out = super().state_dict()
        for group in out["param_groups"]:
            group[KIND_KEY] = self._kind
        return out

    def _check_saved_kind(self, state_dict: Mapping[str, Any]) -> None:
        """``ValueError`` where ``state_dict`` records (:data:`KIND_KEY`) another kind than
        this optimizer's; a state that records none (saved before the key existed) passes."""
        saved_kinds = {g[KIND_KEY] for g in state_dict["param_groups"] if KIND_KEY in g}
        if saved_kinds - {self._kind}:
            saved = ", ".join(f"{DISPLAY.get(k, k)} (kind {k!r})" for k in sorted(saved_kinds))
            raise ValueError(f"the state dict was saved by {saved}; {type(self).__name__} "
                             f"(kind {self._kind!r}) loads only its own kind's state")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: validates everything before changing anything, and keeps
        the state float32 on each parameter's device (the step count on the CPU). A state saved
        by an optimizer of another kind (:data:`KIND_KEY`) is refused."""
        self._check_saved_kind(state_dict)
        state_dict = {**state_dict, "param_groups": [
            {k: v for k, v in g.items() if k != KIND_KEY} for g in state_dict["param_groups"]]}
        saved_state = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(params) != len(saved_ids):
            raise ValueError(f"state dict has {len(saved_ids)} parameters, the optimizer "
                             f"{len(params)}")
        # The step-wide state sits in one parameter's entry (state dicts of earlier lopt-port
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
        glob = None
        if saved_global is not None:
            if self._new_global_state is None:
                raise ValueError(f"the state dict has a step-wide state ({GLOBAL_STATE!r}), "
                                 f"which {type(self).__name__} does not keep")
            glob = _restore_like(saved_global, self._new_global_state(self._anchor.device),
                                 f"the step-wide state ({GLOBAL_STATE!r})")
        super().load_state_dict({**state_dict, "state": {}})
        self.state.update(restored)
        if glob is not None:
            self.state[self._anchor][GLOBAL_STATE] = glob

    def _restore_param_state(self, saved: Mapping[str, Any], p: torch.Tensor,
                             index: int) -> dict[str, Any]:
        """``saved`` checked against :meth:`initial_state` (names and shapes; the factored
        statistics against the saved factored axes, which a resumed run keeps)."""
        where = f"state of parameter {index} (shape {tuple(p.shape)})"
        template = self.initial_state(p)
        expected = {k: v for k, v in template.items() if k not in _FACTORED}
        if "factored_dims" in template:
            shape = tuple(p.shape)
            dims = tuple(saved.get("factored_dims", (None,)))
            valid = (dims == () and len(shape) < 2) or (
                len(dims) == 2 and len(shape) >= 2 and dims[0] != dims[1]
                and all(isinstance(d, int) and 0 <= d < len(shape) for d in dims))
            if not valid:
                raise ValueError(f"{where}: factored_dims {dims!r} do not fit the parameter")
            k = next(template[n].shape[-1] for n in _FACTORED if n in template)
            for name, fshape in factored_state_shapes(shape, dims or None, k).items():
                expected[name] = torch.empty(fshape, device="meta")
            expected["factored_dims"] = dims
        return _restore_like(saved, expected, where, p.device,
                             problem_suffix=" does not fit these weights")


def _restore_like(saved: Mapping[str, Any], template: Mapping[str, Any], where: str,
                  device: torch.device | None = None, *,
                  problem_suffix: str = " does not fit") -> dict[str, Any]:
    """``saved`` as ``template``'s names, shapes, dtypes and devices (a ``meta`` template
    tensor: ``device``), or ``ValueError`` listing every problem. A non-tensor entry of the
    template must be equal in ``saved``, except ``factored_dims``, which the caller checked."""
    problems = [f"missing {name}" for name in template if name not in saved]
    problems += [f"unexpected {name}" for name in saved if name not in template]
    out: dict[str, Any] = {}
    for name, want in template.items():
        if name not in saved:
            continue
        value = saved[name]
        if not isinstance(want, torch.Tensor):
            if name != "factored_dims" and value != want:
                problems.append(f"the state was saved with {name}={value!r}, this optimizer "
                                f"has {name}={want!r}")
            out[name] = want
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(want.shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else repr(value)
            problems.append(f"{name}: expected {tuple(want.shape)}, found {found}")
            continue
        target = device if want.device.type == "meta" else want.device
        out[name] = value.detach().to(device=target, dtype=want.dtype).clone()
    if problems:
        raise ValueError(f"{where}{problem_suffix}: {'; '.join(problems)}")
    return out
