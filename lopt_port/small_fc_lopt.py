"""``SmallFCLOpt``: upstream's small_fc_lopt (``AdafacMLPLOpt``) as a ``torch.optim.Optimizer``.

One step for a parameter ``p`` with gradient ``g`` (all float32; spec section 2):

1. accumulators (:mod:`lopt_port.accumulators`) with learned decays
   ``d = 1 - exp(10 * (log(1 - d0) / 10 + theta))``: momentum ``m`` (M decays), ``rms`` (R),
   factored ``v_row``/``v_col`` or ``v_diag`` (A), and the preconditioned gradient ``fac_g``;
2. 28 feature columns per element (scalars are treated as shape ``(1,)``):
   ``g, p, m, rms, m*rsqrt(rms+1e-6), rsqrt(rms+1e-6), fac_g, row, col, rsqrt(row+1e-8),
   rsqrt(col+1e-8), fac_mom_mult``, where for factored tensors ``row``/``col`` are
   ``v_row``/``v_col`` broadcast back and ``fac_mom_mult = m * row_factor * col_factor``, and
   otherwise ``row = col = v_diag`` and ``fac_mom_mult = m * (v_diag + 1e-6)**-0.5``
   (``m * v_diag**-0.5`` for ``variant="pypi-0.0.1"``);
3. each column normalized by ``rsqrt(1e-5 + mean(x^2))`` over all elements of the tensor, then
   the 11 time features ``tanh(t / s - 1)`` appended (``t`` = updates done before this one);
4. ``[direction, magnitude] = MLP(features)`` (ReLU between layers);
5. ``p <- p - lr * direction * exp(magnitude * exp_mult) * step_mult``.

The step, in torch.optim's shape: :meth:`SmallFCLOpt.step` gathers each param group's lists
and calls :func:`small_fc_lopt`, which sends each parameter to :func:`_eager_small_fc_lopt`
or :func:`_fused_small_fc_lopt` (the kernels of ``csrc/``); both take the same arguments.
The meta-trained parts (learned decays, MLP) are a :class:`SmallFCLOptNetwork`, which μLO
(:mod:`lopt_port.mulo`) shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lopt_port import small_fc_lopt_config as cfg
from lopt_port import small_fc_lopt_fused as fused_path
from lopt_port.accumulators import FactoredResult, learned_decays, update_accumulators_rounds
from lopt_port.constants import (
    FAC_MOM_MULT_EPS,
    MLP_CHUNK_ROWS,
    RMS_FEATURE_EPS,
    ROW_COL_FEATURE_EPS,
)
from lopt_port.features import mlp_forward, second_moment_normalize, time_features, timescales
from lopt_port.optimizer import (
    FusedPath,
    LearnedOptimizer,
    ParamsArg,
    WeightsArg,
    WeightsKind,
    check_non_negative,
    counter_value,
)
from lopt_port.sharding import (
    Mean,
    Rounds,
    local,
    run_local,
    run_rounds,
    shard_spec,
    state_zeros,
)
from lopt_port.state_layout import TieBreak, factored_dims, factored_state_shapes

KIND = WeightsKind(cfg.KIND, cfg.resolve_hparams, cfg.check_state_dict)


class SmallFCLOptNetwork:
    """small_fc_lopt's meta-trained parts: the learned decays and the per-parameter MLP, with
    their copies on each device, and the state a parameter starts with."""

    def __init__(self, hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                 tie_break: TieBreak) -> None:
        self.hparams = hparams
        self.tie_break: TieBreak = tie_break
        self.decays = {
            "momentum": learned_decays(hparams["initial_momentum_decays"],
                                       weights["momentum_decay_offsets"]),
            "rms": learned_decays(hparams["initial_rms_decays"], weights["rms_decay_offsets"]),
            "adafactor": learned_decays(hparams["initial_adafactor_decays"],
                                        weights["adafactor_decay_offsets"]),
        }
        #: The decays as the kernels take them (CPU): momentum, rms, adafactor.
        self.decay_vector = torch.cat([self.decays["momentum"], self.decays["rms"],
                                       self.decays["adafactor"]])
        n_layers = hparams["hidden_layers"] + 1
        self.layers = [(weights[f"mlp.{i}.weight"], weights[f"mlp.{i}.bias"])
                       for i in range(n_layers)]
        self._device_cache: dict[torch.device, tuple[dict[str, torch.Tensor], list]] = {}

    def on_device(self, device: torch.device) -> tuple[dict[str, torch.Tensor], list]:
        """``(decays and time-feature timescales, MLP layers)`` on ``device``."""
        if device not in self._device_cache:
            decays = {k: v.to(device) for k, v in self.decays.items()}
            decays["timescales"] = timescales(device)
            layers = [(w.to(device), b.to(device)) for w, b in self.layers]
            self._device_cache[device] = (decays, layers)
        return self._device_cache[device]

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zeros, step 0, and the parameter's factored dims."""
        dims = factored_dims(p.shape, self.tie_break)
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        state["momentum"] = state_zeros(p, (*p.shape, len(self.decays["momentum"])))
        state["rms"] = state_zeros(p, (*p.shape, len(self.decays["rms"])))
        k = len(self.decays["adafactor"])
        for name, fshape in factored_state_shapes(p.shape, dims, k).items():
            # v_row lost axis d0, v_col axis d1: split like p unless that was axis 0
            lost = None if dims is None else dims[1] if name == "v_row" else dims[0]
            state[name] = state_zeros(p, fshape, split=lost != 0)
        state["factored_dims"] = dims if dims is not None else ()
        return state


def fused_path_of(hparams: Mapping[str, Any]) -> FusedPath:
    """The kernels decide per parameter (:mod:`lopt_port.small_fc_lopt_fused`)."""
    return FusedPath(config_reason=fused_path.config_unsupported_reason(hparams),
                     param_reason=fused_path.param_unsupported_reason)


class SmallFCLOpt(LearnedOptimizer):
    """small_fc_lopt with upstream HEAD semantics.

    Args:
        params: iterable of tensors or param-group dicts (per-group option: ``lr``).
        weights: converted weights (``.safetensors`` or ``.pt`` path written by
            ``lopt-convert``, a state dict, or :class:`~lopt_port.weights.LoadedWeights`).
        lr: multiplies upstream's step; ``1.0`` is upstream exactly.
        hparams: hyperparameters that override or complete the file's metadata; a bare
            state dict without metadata needs ``exp_mult``, ``step_mult`` and the three
            ``initial_*_decays`` here.
        variant: ``"head"`` or ``"pypi-0.0.1"`` (the 2022 wheel's non-factored
            ``fac_mom_mult``); default: the weights' metadata, else ``"head"``.
        tie_break: how equal dims pick the factored axes: ``"numpy"`` (upstream's own
            ``numpy.argsort`` call, machine dependent for some ties) or ``"stable"``.
        fused: ``True`` runs the fused kernels of ``csrc/`` (built on first use) and raises
            when they cannot run; ``False`` runs the eager PyTorch path; ``None`` (default)
            uses the kernels where they can run and otherwise falls back to eager with one
            warning naming the reason. The kernels take float32, bfloat16 and float16
            parameters on the CPU and CUDA; other parameters take the eager path.
            ``capture_intermediates`` always runs eager.

    State per parameter (float32 whatever the parameter dtype; trailing axis = decays):
    ``step`` (0-d float32 CPU tensor, updates applied to this parameter), ``momentum``
    ``(*S, M)``, ``rms`` ``(*S, R)``, ``v_row``/``v_col`` (factored) or ``v_diag`` with a
    trailing ``A``, and ``factored_dims`` (``(d1, d0)`` or ``()``), fixed at the first step
    so a resumed run keeps the axes it started with.

    :meth:`capture_intermediates` records per parameter (``S`` = param shape, scalars as
    ``(1,)``): ``fac_g`` ``(*shape, A)``; ``features_raw`` ``(*S, 28)`` before normalization;
    ``mlp_input`` ``(*S, 39)`` = normalized features + time features; ``mlp_pre{i}``
    ``(*S, h)`` pre-ReLU hidden activations; ``mlp_output`` ``(*S, 2)`` =
    ``[direction, magnitude]``; ``update`` ``(shape)`` = the amount subtracted from the
    parameter; ``time_features`` ``(11,)``.
    """

    def __init__(self, params: ParamsArg, weights: WeightsArg, *, lr: float = 1.0,
                 hparams: Mapping[str, Any] | None = None, variant: str | None = None,
                 tie_break: TieBreak = "numpy", fused: bool | None = None) -> None:
        lr = check_non_negative("lr", lr)
        overrides = {**(hparams or {}), **({"variant": variant} if variant is not None else {})}
        sd = self._load_weights(weights, KIND, overrides)
        self.parts = SmallFCLOptNetwork(self.hparams, sd, tie_break)
        super().__init__(params, {"lr": lr}, fused=fused, tie_break=tie_break,
                         fused_path=fused_path_of(self.hparams))

    @property
    def decays(self) -> dict[str, torch.Tensor]:
        """Effective float32 decays after the learned offsets (``momentum``, ``rms``,
        ``adafactor``)."""
        return {k: v.clone() for k, v in self.parts.decays.items()}

    @torch.no_grad()
    def step(self, closure: Any = None, *, loss: Any = None) -> Any:
        """One update of every parameter that has a gradient; returns the closure's loss (the
        loss, which small_fc_lopt does not use, may be given and is ignored)."""
        inputs = self._begin_step(closure, loss)
        for lists in inputs.groups:
            small_fc_lopt(lists.params, lists.grads, lists.states, network=self.parts,
                          lr=lists.group["lr"], scales=None,
                          fused=self._fused_flags(lists.params), capture=self._capture)
        return self._end_step(inputs)


def small_fc_lopt(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  states: Sequence[dict[str, Any]], *, network: SmallFCLOptNetwork, lr: float,
                  scales: Sequence[float] | None, fused: Sequence[bool],
                  capture: dict[torch.Tensor, dict[str, torch.Tensor]] | None) -> None:
    """One small_fc_lopt update of ``params`` (one param group) from ``grads``: each
    parameter whose ``fused`` flag is set through the kernels, the others eagerly.

    ``p <- p - lr * ((step * s) if scales else step)``, ``s`` = the parameter's entry of
    ``scales`` (μLO's per-tensor scale; ``None``: no factor, which is exact)."""
    for path, wanted in ((_fused_small_fc_lopt, True), (_eager_small_fc_lopt, False)):
        index = [i for i, f in enumerate(fused) if f == wanted]
        if index:
            path([params[i] for i in index], [grads[i] for i in index],
                 [states[i] for i in index], network=network, lr=lr,
                 scales=None if scales is None else [scales[i] for i in index],
                 capture=capture)


def _fused_small_fc_lopt(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         states: Sequence[dict[str, Any]], *, network: SmallFCLOptNetwork,
                         lr: float, scales: Sequence[float] | None,
                         capture: dict[torch.Tensor, dict[str, torch.Tensor]] | None) -> None:
    """The kernels, one call per phase for every tensor of a device (``capture``: unused,
    a capturing step is eager)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    cpu_consts, _ = network.on_device(torch.device("cpu"))
    for device, index in by_device.items():
        _, layers = network.on_device(device)
        fused_path.group_step([params[i] for i in index], [states[i] for i in index],
                              network.decay_vector, layers, cpu_consts["timescales"],
                              network.hparams, lr, grads=[grads[i] for i in index],
                              step_scales=() if scales is None else [scales[i] for i in index])


def _eager_small_fc_lopt(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         states: Sequence[dict[str, Any]], *, network: SmallFCLOptNetwork,
                         lr: float, scales: Sequence[float] | None,
                         capture: dict[torch.Tensor, dict[str, torch.Tensor]] | None) -> None:
    """PyTorch ops, parameter by parameter; sharded (FSDP2) parameters complete their
    whole-tensor reductions in a few batched rounds (:mod:`lopt_port.sharding`)."""
    run_rounds([(_update_rounds(p, s, g, network, lr, None if scales is None else scales[i],
                                capture), shard_spec(p))
                for i, (p, g, s) in enumerate(zip(params, grads, states, strict=True))])


def _update_rounds(p: torch.Tensor, state: dict[str, Any], grad: torch.Tensor,
                   network: SmallFCLOptNetwork, lr: float, scale: float | None,
                   capture: dict[torch.Tensor, dict[str, torch.Tensor]] | None) -> Rounds:
    """One parameter's update from ``grad``, yielding its whole-tensor reductions (a
    sharded parameter's are completed over the other ranks; see :mod:`lopt_port.sharding`).
    The step is ``((direction * exp(magnitude * exp_mult)) * step_mult) * scale) * lr``,
    without the ``scale`` factor when it is ``None``."""
    if p.numel() == 0:
        # Nothing to update. Upstream would fill the non-empty factored statistic of a
        # shape like (0, 5) with NaN (a mean over zero elements); the state stays zero.
        state["step"].add_(1)
        return
    hparams = network.hparams
    spec = shard_spec(p)
    decays, layers = network.on_device(p.device)
    p_local = local(p)
    # Upstream treats a scalar parameter as shape (1,) with all its state; views keep the
    # in-place accumulator updates pointed at the stored state.
    shape = tuple(p_local.shape) or (1,)
    g = local(grad).to(torch.float32).reshape(shape)
    dims = tuple(state["factored_dims"]) or None
    accumulate = update_accumulators_rounds(
        state, g, decays, None if spec is None else spec.global_shape[0])
    acc, fac = run_local(accumulate) if spec is None else (yield from accumulate)
    # ``step`` lives on the CPU (torch.optim's convention): reading it is no device sync.
    tfeat = time_features(counter_value(state["step"]), decays["timescales"])
    state["step"].add_(1)
    p32 = p_local.to(torch.float32).reshape(shape)
    raw = raw_features(p32, g, acc, fac, dims, hparams["variant"])
    flat = raw.reshape(-1, raw.shape[-1])
    mean_sq = None
    if spec is not None:
        (mean_sq,) = yield [Mean(flat * flat, (0,), keepdim=True, rows=p.numel())]
    normalized = second_moment_normalize(flat, mean_sq)
    record = {} if capture is not None else None
    direction, magnitude = _mlp(normalized, tfeat, layers, record)
    step = direction * torch.exp(magnitude * hparams["exp_mult"])
    step = step * hparams["step_mult"]
    if scale is not None:
        step = step * scale
    step = (step * lr).reshape(p_local.shape)
    p_local.copy_(p32.reshape(p_local.shape) - step)
    if record is not None:
        record["fac_g"] = fac.fac_g.reshape(*p.shape, -1)
        record["features_raw"] = raw
        record["mlp_input"] = torch.cat(
            [normalized, tfeat.expand(normalized.shape[0], -1)], dim=-1).reshape(*shape, -1)
        for key in [k for k in record if k.startswith("mlp_pre")]:
            record[key] = record[key].reshape(*shape, -1)
        record["mlp_output"] = torch.stack([direction, magnitude], -1).reshape(*shape, 2)
        record["update"] = step
        record["time_features"] = tfeat
        capture[p] = {k: v.detach().clone() for k, v in record.items()}


def raw_features(p: torch.Tensor, g: torch.Tensor, acc: dict[str, torch.Tensor],
                 fac: FactoredResult, dims: tuple[int, int] | None,
                 variant: str) -> torch.Tensor:
    """The 28 (for default decays) feature columns, ``(*S, 28)``, in upstream order."""
    m, rms = acc["momentum"], acc["rms"]
    rsqrt_rms = torch.rsqrt(rms + RMS_FEATURE_EPS)
    cols = [g.unsqueeze(-1), p.unsqueeze(-1), m, rms, m * rsqrt_rms, rsqrt_rms, fac.fac_g]
    full = (*p.shape, fac.fac_g.shape[-1])
    if dims is not None:
        d1, d0 = dims
        row = acc["v_row"].unsqueeze(d0).expand(full)
        col = acc["v_col"].unsqueeze(d1).expand(full)
        mom_mult = m * fac.row_factor.unsqueeze(d0) * fac.col_factor.unsqueeze(d1)
    else:
        v = acc["v_diag"]
        row = col = v
        if variant == "head":
            mom_mult = m * torch.pow(v + FAC_MOM_MULT_EPS, -0.5)
        else:
            mom_mult = m * torch.pow(v, -0.5)
    cols += [row, col, torch.rsqrt(row + ROW_COL_FEATURE_EPS),
             torch.rsqrt(col + ROW_COL_FEATURE_EPS), mom_mult]
    lead = p.shape
    return torch.cat([c.expand(*lead, c.shape[-1]) for c in cols], dim=-1)


def _mlp(x: torch.Tensor, tfeat: torch.Tensor, layers: list,
         record: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP over rows of normalized features (chunked to bound activation memory)."""
    outs, pres = [], []
    # Meta tensors hold no data, so there is no memory to bound: one chunk.
    rows = max(x.shape[0], 1) if x.device.type == "meta" else MLP_CHUNK_ROWS
    for start in range(0, max(x.shape[0], 1), rows):  # an empty shard: one empty chunk
        chunk = x[start:start + rows]
        inp = torch.cat([chunk, tfeat.expand(chunk.shape[0], -1)], dim=-1)
        rec: dict[str, torch.Tensor] | None = {} if record is not None else None
        outs.append(mlp_forward(inp, layers, rec))
        if rec is not None:
            pres.append(rec)
    out = torch.cat(outs) if len(outs) != 1 else outs[0]
    if record is not None and pres:
        for key in pres[0]:
            record[key] = torch.cat([r[key] for r in pres])
    return out[:, 0], out[:, 1]
