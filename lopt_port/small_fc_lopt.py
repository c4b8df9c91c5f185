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
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from lopt_port import extension
from lopt_port import small_fc_lopt_config as cfg
from lopt_port import small_fc_lopt_fused as fused_path
from lopt_port.accumulators import (
    FactoredResult,
    learned_decays,
    update_factored,
    update_factored_rounds,
    update_momentum,
    update_rms,
)
from lopt_port.constants import (
    FAC_MOM_MULT_EPS,
    MLP_CHUNK_ROWS,
    RMS_FEATURE_EPS,
    ROW_COL_FEATURE_EPS,
)
from lopt_port.features import mlp_forward, second_moment_normalize, time_features, timescales
from lopt_port.sharding import Mean, Rounds, local, run_rounds, shard_spec, state_zeros
from lopt_port.state_layout import TieBreak, factored_dims, factored_state_shapes
from lopt_port.weights import LoadedWeights, WeightsError, load_weights

_STATE_TENSORS = ("momentum", "rms", "v_row", "v_col", "v_diag")


class SmallFCLOpt(torch.optim.Optimizer):
    """small_fc_lopt with upstream HEAD semantics (eager path).

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
            warning naming the reason. So far the kernels take float32 CPU parameters;
            other parameters take the eager path. ``capture_intermediates`` always runs
            eager.

    State per parameter (float32 whatever the parameter dtype; trailing axis = decays):
    ``step`` (0-d float32 CPU tensor, updates applied to this parameter), ``momentum``
    ``(*S, M)``, ``rms`` ``(*S, R)``, ``v_row``/``v_col`` (factored) or ``v_diag`` with a
    trailing ``A``, and ``factored_dims`` (``(d1, d0)`` or ``()``), fixed at the first step
    so a resumed run keeps the axes it started with.
    """

    #: ``step`` takes no loss (small_fc_lopt does not use it).
    requires_loss = False
    #: The weights kind this class takes, and its hyperparameter rules.
    _config = cfg

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 weights: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights, *,
                 lr: float = 1.0, hparams: Mapping[str, Any] | None = None,
                 variant: str | None = None, tie_break: TieBreak = "numpy",
                 fused: bool | None = None) -> None:
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
            raise ValueError(f"lr must be a non-negative float, got {lr!r}")
        if tie_break not in ("numpy", "stable"):
            raise ValueError(f"tie_break must be 'numpy' or 'stable', got {tie_break!r}")
        loaded = load_weights(weights)
        kind = self._config.KIND
        if loaded.kind not in (None, kind):
            raise WeightsError(f"weights are for {loaded.kind!r}, not {kind!r}")
        given = {**loaded.hparams, **(hparams or {})}
        if variant is not None:
            given["variant"] = variant
        shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
        try:
            self.hparams = self._config.resolve_hparams(given, shapes)
            self._config.check_state_dict(loaded.state_dict, self.hparams, "weights")
        except ValueError as e:
            raise WeightsError(str(e)) from None
        self.tie_break: TieBreak = tie_break
        sd = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
              for k, v in loaded.state_dict.items()}
        self._decays = {
            "momentum": learned_decays(self.hparams["initial_momentum_decays"],
                                       sd["momentum_decay_offsets"]),
            "rms": learned_decays(self.hparams["initial_rms_decays"], sd["rms_decay_offsets"]),
            "adafactor": learned_decays(self.hparams["initial_adafactor_decays"],
                                        sd["adafactor_decay_offsets"]),
        }
        n_layers = self.hparams["hidden_layers"] + 1
        self._layers = [(sd[f"mlp.{i}.weight"], sd[f"mlp.{i}.bias"]) for i in range(n_layers)]
        self._device_cache: dict[torch.device, tuple[dict[str, torch.Tensor], list]] = {}
        self._capture: dict[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.fused = fused
        self._fused_reason = fused_path.config_unsupported_reason(self.hparams)
        if self._fused_reason is None and fused is not False:
            try:
                extension.load_backend()
            except extension.ExtensionUnavailable as e:
                self._fused_reason = str(e)
        if fused is True and self._fused_reason is not None:
            raise RuntimeError(f"fused=True, but {self._fused_reason}")
        self._warned: set[str] = set()
        self._decay_vector = torch.cat([self._decays["momentum"], self._decays["rms"],
                                        self._decays["adafactor"]])
        super().__init__(params, {"lr": float(lr)})

    @property
    def decays(self) -> dict[str, torch.Tensor]:
        """Effective float32 decays after the learned offsets (``momentum``, ``rms``,
        ``adafactor``)."""
        return {k: v.clone() for k, v in self._decays.items()}

    def _on_device(self, device: torch.device) -> tuple[dict[str, torch.Tensor], list]:
        if device not in self._device_cache:
            decays = {k: v.to(device) for k, v in self._decays.items()}
            decays["timescales"] = timescales(device)
            layers = [(w.to(device), b.to(device)) for w, b in self._layers]
            self._device_cache[device] = (decays, layers)
        return self._device_cache[device]

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The state a parameter starts with: zeros, step 0, and its factored dims."""
        state: dict[str, Any] = {}
        self._init_state(p, state)
        return state

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        dims = factored_dims(p.shape, self.tie_break)
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["momentum"] = state_zeros(p, (*p.shape, len(self._decays["momentum"])))
        state["rms"] = state_zeros(p, (*p.shape, len(self._decays["rms"])))
        k = len(self._decays["adafactor"])
        for name, fshape in factored_state_shapes(p.shape, dims, k).items():
            # v_row lost axis d0, v_col axis d1: split like p unless that was axis 0
            lost = None if dims is None else dims[1] if name == "v_row" else dims[0]
            state[name] = state_zeros(p, fshape, split=lost != 0)
        state["factored_dims"] = dims if dims is not None else ()

    @contextlib.contextmanager
    def capture_intermediates(self) -> Iterator[dict[torch.Tensor, dict[str, torch.Tensor]]]:
        """Record every intermediate of the steps taken inside the ``with`` block.

        Yields a dict ``param -> {name: tensor}`` filled by ``step()`` (the last step wins),
        with upstream's golden-vector names (``S`` = param shape, scalars as ``(1,)``):
        ``fac_g`` ``(*shape, A)``; ``features_raw`` ``(*S, 28)`` before normalization;
        ``mlp_input`` ``(*S, 39)`` = normalized features + time features;
        ``mlp_pre{i}`` ``(*S, h)`` pre-ReLU hidden activations; ``mlp_output`` ``(*S, 2)`` =
        ``[direction, magnitude]``; ``update`` ``(shape)`` = the amount subtracted from the
        parameter; ``time_features`` ``(11,)``.
        """
        captured: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        previous, self._capture = self._capture, captured
        try:
            yield captured
        finally:
            self._capture = previous

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._step_grads()
        for group in self.param_groups:
            fused_params: dict[torch.device, list[torch.Tensor]] = {}
            eager = []
            for p in group["params"]:
                if p not in grads:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                if p.numel() and self._takes_fused_path(p):
                    fused_params.setdefault(p.device, []).append(p)
                else:
                    eager.append(p)
            # Sharded (FSDP2) parameters complete their reductions in a few batched rounds.
            run_rounds([(self._update_rounds(p, self.state[p], group["lr"], grads[p],
                                             self._step_scale(p)), shard_spec(p))
                        for p in eager])
            for device, params in fused_params.items():
                cpu_consts, _ = self._on_device(torch.device("cpu"))
                _, layers = self._on_device(device)
                scales = [self._step_scale(p) for p in params]
                fused_path.group_step(params, [self.state[p] for p in params],
                                      self._decay_vector, layers, cpu_consts["timescales"],
                                      self.hparams, group["lr"],
                                      grads=[grads[p] for p in params],
                                      step_scales=() if None in scales else scales)
        return loss

    def _step_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """The gradient each update reads, for every parameter that has one: ``p.grad``
        (subclasses transform it, e.g. MuLO's clipping and NaN scrubbing)."""
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                           f"gradients")
                    grads[p] = p.grad
        return grads

    def _step_scale(self, p: torch.Tensor) -> float | None:
        """A per-tensor multiplier of the step (``None``: none; MuLO's mu-P scale)."""
        return None

    def _takes_fused_path(self, p: torch.Tensor) -> bool:
        """Fused when enabled and possible; ``fused=True`` raises where it is not."""
        if self.fused is False or self._capture is not None:
            return False
        reason = self._fused_reason or fused_path.param_unsupported_reason(p)
        if reason is None:
            return True
        if self.fused is True:
            raise RuntimeError(f"fused=True, but {reason} (parameter of shape "
                               f"{tuple(p.shape)})")
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{type(self).__name__}: using the eager path: {reason}",
                          stacklevel=5)
        return False

    def _update_rounds(self, p: torch.Tensor, state: dict[str, Any], lr: float,
                       grad: torch.Tensor, scale: float | None) -> Rounds:
        """One parameter's update from ``grad``, yielding its whole-tensor reductions (a
        sharded parameter's are completed over the other ranks; see
        :mod:`lopt_port.sharding`). The step is ``((direction * exp(magnitude * exp_mult))
        * step_mult) * scale) * lr``, without the ``scale`` factor when it is ``None``."""
        if p.numel() == 0:
            # Nothing to update. Upstream would fill the non-empty factored statistic of a
            # shape like (0, 5) with NaN (a mean over zero elements); the state stays zero.
            state["step"] = state["step"] + 1
            return
        spec = shard_spec(p)
        decays, layers = self._on_device(p.device)
        p_local = local(p)
        # Upstream treats a scalar parameter as shape (1,) with all its state; views keep the
        # in-place accumulator updates pointed at the stored state.
        shape = tuple(p_local.shape) or (1,)
        g = local(grad).to(torch.float32).reshape(shape)
        per_element = ("momentum", "rms", "v_diag")
        acc = {k: local(state[k]).view(*shape, state[k].shape[-1]) if k in per_element
               else local(state[k]) for k in _STATE_TENSORS if k in state}
        dims = state["factored_dims"] or None
        update_momentum(acc["momentum"], g, decays["momentum"])
        update_rms(acc["rms"], g, decays["rms"])
        if spec is None:
            fac = update_factored(acc, g, decays["adafactor"], dims)
        else:
            fac = yield from update_factored_rounds(acc, g, decays["adafactor"], dims,
                                                    rows=spec.global_shape[0])
        # ``step`` lives on the CPU (torch.optim's convention): reading it is no device sync.
        tfeat = time_features(float(state["step"]), decays["timescales"])
        state["step"] = state["step"] + 1
        p32 = p_local.to(torch.float32).reshape(shape)
        raw = self._raw_features(p32, g, acc, fac, dims)
        flat = raw.reshape(-1, raw.shape[-1])
        mean_sq = None
        if spec is not None:
            (mean_sq,) = yield [Mean(flat * flat, (0,), keepdim=True, rows=p.numel())]
        normalized = second_moment_normalize(flat, mean_sq)
        record = {} if self._capture is not None else None
        direction, magnitude = self._mlp(normalized, tfeat, layers, record)
        step = direction * torch.exp(magnitude * self.hparams["exp_mult"])
        step = step * self.hparams["step_mult"]
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
            self._capture[p] = {k: v.detach().clone() for k, v in record.items()}

    def _raw_features(self, p: torch.Tensor, g: torch.Tensor, acc: dict[str, torch.Tensor],
                      fac: FactoredResult, dims: tuple[int, int] | None) -> torch.Tensor:
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
            if self.hparams["variant"] == "head":
                mom_mult = m * torch.pow(v + FAC_MOM_MULT_EPS, -0.5)
            else:
                mom_mult = m * torch.pow(v, -0.5)
        cols += [row, col, torch.rsqrt(row + ROW_COL_FEATURE_EPS),
                 torch.rsqrt(col + ROW_COL_FEATURE_EPS), mom_mult]
        lead = p.shape
        return torch.cat([c.expand(*lead, c.shape[-1]) for c in cols], dim=-1)

    def _mlp(self, x: torch.Tensor, tfeat: torch.Tensor, layers: list,
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; accumulators stay float32 on the param's device.

        ``torch.optim.Optimizer`` would cast floating state to the parameter dtype (bf16 would
        lose the accumulators' precision), so the per-parameter state is restored here.
        """
        saved_state = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(params) != len(saved_ids):
            raise ValueError(f"state dict has {len(saved_ids)} parameters, the optimizer "
                             f"{len(params)}")
        # Validate and convert everything before changing anything: a bad state leaves the
        # optimizer as it was.
        restored = {p: self._restore_param_state(saved_state[pid], p, index)
                    for index, (pid, p) in enumerate(zip(saved_ids, params, strict=True))
                    if pid in saved_state}
        super().load_state_dict({**state_dict, "state": {}})
        self.state.update(restored)

    def _restore_param_state(self, saved: Mapping[str, Any], p: torch.Tensor,
                             index: int) -> dict[str, Any]:
        where = f"state of parameter {index} (shape {tuple(p.shape)})"
        shape = tuple(p.shape)
        dims = tuple(saved.get("factored_dims", (None,)))
        valid_dims = (dims == () and len(shape) < 2) or (
            len(dims) == 2 and len(shape) >= 2 and dims[0] != dims[1]
            and all(isinstance(d, int) and 0 <= d < len(shape) for d in dims))
        if not valid_dims:
            raise ValueError(f"{where}: factored_dims {dims!r} do not fit the parameter")
        expected = {
            "momentum": (*shape, len(self._decays["momentum"])),
            "rms": (*shape, len(self._decays["rms"])),
        }
        k = len(self._decays["adafactor"])
        expected.update(factored_state_shapes(shape, dims or None, k))
        problems = [f"missing {name}" for name in ("step", *expected) if name not in saved]
        problems += [f"{name}: expected {want}, found {tuple(saved[name].shape)}"
                     for name, want in expected.items()
                     if name in saved and tuple(saved[name].shape) != want]
        problems += [f"unexpected {name}" for name in saved
                     if name not in (*expected, "step", "factored_dims")]
        if problems:
            raise ValueError(f"{where} does not fit these weights: {'; '.join(problems)}")
        out: dict[str, Any] = {"step": saved["step"].detach().to("cpu", torch.float32).clone(),
                               "factored_dims": dims}
        for name in expected:
            out[name] = saved[name].detach().to(device=p.device, dtype=torch.float32).clone()
        return out
