"""The per-parameter rule of VeLO and Celo: accumulators, 30 features, the interpolated MLP.

For each tensor, given its ``controls`` (K per tensor) and its applied ``lr_mult``:

1. momentum, rms and factored accumulators from the clipped gradient (fixed decays);
2. MLP weights ``ff_mult * mean_k(controls_k * bank_k)`` (VeLO: ``ff_mult`` = 100; Celo: 1);
3. 30 per-parameter features from the **new** accumulators (14 groups: g, clip(g, 0.1), p, m,
   rms, m*rsqrt(rms), rsqrt(rms), fac_g, g*rsqrt(rms), row, col, rsqrt(row), rsqrt(col),
   fac_mom_mult), each column normalized by ``rsqrt(1e-5 + mean(x^2))`` over the tensor;
4. the MLP (first layer summed group by group, ReLU, ..., 3 outputs), then
   ``step = lr_mult * (direction * (param_scale * exp(exp_mult * magnitude)) * step_mult)``
   with ``param_scale = sqrt(mean(p^2) + 1e-9)``; ``p <- p - lr * step`` (decoupled weight
   decay: ``p <- p * (1 - lr * wd) - lr * step``).

The eager form runs per tensor (:meth:`MLPRule.update_rounds`); the fused form runs the kernels
of ``csrc/`` for all tensors (:mod:`lopt_port.velo_fused`: phase A before the per-tensor
network, phase B after it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lopt_port import velo_fused
from lopt_port.accumulators import FactoredResult, fixed_decays, update_accumulators_rounds
from lopt_port.constants import (
    DECAY_KEYS,
    NORMALIZER_EPS,
    RMS_FEATURE_EPS,
    ROW_COL_FEATURE_EPS,
    VELO_CHUNK_ELEMENTS,
    VELO_GRAD_CLIP_FEATURE,
    VELO_PARAM_SCALE_EPS,
)
from lopt_port.optimizer import FusedPath
from lopt_port.sharding import Mean, Rounds, Total, local, run_local, shard_spec, state_zeros
from lopt_port.state_layout import TieBreak, factored_dims, factored_state_shapes
from lopt_port.velo_config import NUM_FF_GROUPS


@dataclass
class MLPFusedStep:
    """Phase A's outputs, for the per-tensor network and phase B."""

    params: list[torch.Tensor]
    phase: velo_fused.PhaseA
    grad_wd: list[float]

    @property
    def stats(self) -> torch.Tensor:
        """``[n, 2 + 3M]``: mean p^2, then the statistics the LSTM inputs read."""
        return self.phase.stats

    def mean_p2(self, index: Sequence[int]) -> torch.Tensor:
        """``mean(p^2)`` of the tensors ``index``."""
        return self.stats[list(index), 0]


class MLPRule:
    """VeLO's per-parameter MLP rule (module docstring) with the weights' bank."""

    def __init__(self, hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *,
                 ff_mult: float, tie_break: TieBreak) -> None:
        self.hparams = hparams
        self.ff_mult = ff_mult
        self.tie_break: TieBreak = tie_break
        self.decay_vector = torch.tensor([d for key in DECAY_KEYS for d in hparams[key]],
                                         dtype=torch.float32)
        groups = [weights[f"ff.w0__{j}"] for j in range(NUM_FF_GROUPS)]
        self.bank: dict[str, Any] = {"w0": groups, "b0": weights["ff.b0"]}
        for i in range(1, hparams["ff_hidden_layers"] + 1):
            self.bank[f"w{i}"], self.bank[f"b{i}"] = weights[f"ff.w{i}"], weights[f"ff.b{i}"]
        self.fused_path = FusedPath(
            config_reason=velo_fused.config_unsupported_reason(hparams),
            param_reason=velo_fused.param_unsupported_reason, all_or_none=True)
        self._device_cache: dict[torch.device, dict[str, Any]] = {}

    def on_device(self, device: torch.device) -> dict[str, Any]:
        """The decays (``momentum``, ``rms``, ``adafactor``) and the bank, flattened
        (``bank_flat``, ``[K, weights]``), on ``device``."""
        if device not in self._device_cache:
            entry: dict[str, Any] = fixed_decays(self.hparams, device)
            k_bank = self.hparams["param_inits"]
            entry["bank_flat"] = torch.cat([leaf.reshape(k_bank, -1).to(device)
                                            for _, leaf in named_bank_leaves(self.bank)], dim=1)
            self._device_cache[device] = entry
        return self._device_cache[device]

    def initial_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zero accumulators and the parameter's factored dims."""
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
        return state

    # ------------------------------------------------------------------ per-tensor weights
    def mixed(self, controls: torch.Tensor) -> torch.Tensor:
        """Every tensor's MLP weights, ``ff_mult * mean_k(controls[i, k] * bank[k])``, as one
        batched product over the flattened bank: ``[tensors, weights]``, leaves in the order
        ``w0__0`` .. ``w0__13``, ``b0``, ``w1``, ``b1``, ... each flattened row-major."""
        flat = self.on_device(controls.device)["bank_flat"]
        return self.ff_mult * torch.mean(controls[:, :, None] * flat[None], dim=1)

    def tensor_weights(self, controls: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """:meth:`mixed`, split into each tensor's named leaves."""
        mixed = self.mixed(controls)
        out, start = {}, 0
        for name, leaf in named_bank_leaves(self.bank):
            size = leaf[0].numel()
            out[name] = mixed[:, start:start + size].reshape(-1, *leaf.shape[1:])
            start += size
        return [{k: v[i] for k, v in out.items()} for i in range(controls.shape[0])]

    # --------------------------------------------------------------------------- eager
    def update_rounds(self, p: torch.Tensor, state: dict[str, Any], g: torch.Tensor,
                      ff: Mapping[str, torch.Tensor], lr_mult: torch.Tensor,
                      group: Mapping[str, Any], mean_p2: torch.Tensor | None, *,
                      decoupled_weight_decay: bool, iteration: int | torch.Tensor,
                      capture: dict[str, Any] | None) -> Rounds:
        """One parameter's update, yielding its whole-tensor reductions (completed over the
        other ranks for a sharded parameter, whose ``mean_p2`` the LSTM inputs may have
        computed); ``iteration``: unused (the rule keeps no step count)."""
        spec = shard_spec(p)
        p_local = local(p)
        consts = self.on_device(p.device)
        shape = tuple(p_local.shape) or (1,)
        g = g.reshape(shape)
        dims = tuple(state["factored_dims"]) or None
        accumulate = update_accumulators_rounds(
            state, g, consts, None if spec is None else spec.global_shape[0])
        acc, fac = run_local(accumulate) if spec is None else (yield from accumulate)
        p32 = p_local.to(torch.float32).reshape(shape)
        record: dict[str, Any] | None = {} if capture is not None else None
        mlp = self._mlp_rounds(p32, g, acc, fac, dims, ff, record,
                               p.numel() if spec is not None else None)
        out = run_local(mlp) if spec is None else (yield from mlp)
        h = self.hparams
        if mean_p2 is None and spec is not None:
            (mean_p2,) = yield [Mean(p32 * p32, rows=spec.global_shape[0])]
        elif mean_p2 is None:
            mean_p2 = torch.mean(p32 * p32)
        param_scale = torch.sqrt(mean_p2 + VELO_PARAM_SCALE_EPS)
        magnitude = torch.exp(out[..., 1] * h["exp_mult"])
        step = out[..., 0] * (param_scale * magnitude) * h["step_mult"]
        step = (lr_mult.to(p.device) * step).reshape(p_local.shape)
        apply_step(p_local, step, group, decoupled_weight_decay)
        if record is not None and capture is not None:
            record.update({"ff_params": dict(ff), "g_clipped": g.clone(),
                           "fac_g": fac.fac_g.clone(), "param_scale": param_scale,
                           "mlp_output": out, "update": step.clone()})
            capture["tensors"][p] = record

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
            raw = torch.cat(feature_groups(p32, g, acc, fac, dims, chunks[0]), dim=-1)
            mean_sq = torch.mean((raw * raw).reshape(-1, raw.shape[-1]), dim=0)
        else:
            sums = None
            for rows in chunks:
                raw = torch.cat(feature_groups(p32, g, acc, fac, dims, rows), dim=-1)
                s = torch.sum((raw * raw).reshape(-1, raw.shape[-1]), dim=0, dtype=torch.float64)
                sums = s if sums is None else sums + s
            if numel is not None:
                (sums,) = yield [Total(sums)]
            mean_sq = (sums / n).to(torch.float32)
        inv = torch.rsqrt(NORMALIZER_EPS + mean_sq)
        outs = []
        for rows in chunks:
            if len(chunks) != 1:
                raw = torch.cat(feature_groups(p32, g, acc, fac, dims, rows), dim=-1)
            outs.append(self._mlp(raw, raw * inv, ff, record))
        if record is not None:
            for key in [k for k in record if isinstance(record[k], list)]:
                record[key] = torch.cat(record[key]) if len(record[key]) > 1 else record[key][0]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _mlp(self, raw: torch.Tensor, x: torch.Tensor, ff: Mapping[str, torch.Tensor],
             record: dict[str, Any] | None) -> torch.Tensor:
        """The MLP on normalized features ``x``: the first layer summed group by group."""
        o = torch.zeros((*x.shape[:-1], ff["b0"].shape[-1]), dtype=torch.float32,
                        device=x.device)
        start = 0
        for j in range(NUM_FF_GROUPS):
            w = ff[f"w0__{j}"]
            o = o + x[..., start:start + w.shape[0]] @ w
            start += w.shape[0]
        o = o + ff["b0"]
        pres = [o]
        o = torch.relu(o)
        layers = self.hparams["ff_hidden_layers"]
        for i in range(1, layers + 1):
            o = o @ ff[f"w{i}"] + ff[f"b{i}"]
            if i != layers:
                pres.append(o)
                o = torch.relu(o)
        if record is not None:
            record.setdefault("features_raw", []).append(raw)
            record.setdefault("mlp_input", []).append(x)
            for i, pre in enumerate(pres):
                record.setdefault(f"mlp_pre{i}", []).append(pre)
        return o

    # --------------------------------------------------------------------------- fused
    def fused_begin(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    states: Sequence[dict[str, Any]], grad_wd: Sequence[float]
                    ) -> MLPFusedStep:
        """Phase A for every tensor: prefab weight decay, the clip, the statistics, the moving
        averages, the features' sums of squares."""
        phase = velo_fused.phase_a(params, grads, states, self.decay_vector, grad_wd)
        return MLPFusedStep(list(params), phase, list(grad_wd))

    def fused_finish(self, prep: MLPFusedStep, controls: torch.Tensor, lr_mult: torch.Tensor,
                     groups: Sequence[Mapping[str, Any]], *, decoupled_weight_decay: bool,
                     iteration: int) -> None:
        """Phase B: features, normalization, each tensor's MLP, the parameter write."""
        param_scale = torch.sqrt(prep.stats[:, 0] + VELO_PARAM_SCALE_EPS)
        lr = [float(g["lr"]) for g in groups]
        decay = [1.0 - g["lr"] * g["weight_decay"] if decoupled_weight_decay else 1.0
                 for g in groups]
        velo_fused.phase_b(prep.phase, self.decay_vector, prep.grad_wd, self.mixed(controls),
                           self.hparams, lr_mult, param_scale, lr, decay)


def apply_step(p: torch.Tensor, step: torch.Tensor, group: Mapping[str, Any],
               decoupled_weight_decay: bool) -> None:
    """``p <- p - lr * step``, or with decoupled weight decay ``p * (1 - lr * wd) - lr * step``
    (the step computed from the undecayed ``p``), in float32, written in ``p``'s dtype."""
    lr, wd = group["lr"], group["weight_decay"]
    new = p.to(torch.float32).reshape(p.shape)
    if wd and decoupled_weight_decay:
        new = new * (1.0 - lr * wd)
    p.copy_(new - lr * step)


def feature_groups(p32: torch.Tensor, g: torch.Tensor, acc: Mapping[str, Any],
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


def named_bank_leaves(bank: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The bank's leaves in a fixed order: ``w0__0`` .. ``w0__13``, ``b0``, ``w1``, ``b1``, ..."""
    leaves = [(f"w0__{j}", w) for j, w in enumerate(bank["w0"])]
    leaves.append(("b0", bank["b0"]))
    i = 1
    while f"w{i}" in bank:
        leaves += [(f"w{i}", bank[f"w{i}"]), (f"b{i}", bank[f"b{i}"])]
        i += 1
    return leaves
