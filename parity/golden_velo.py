"""Replay an upstream VeLO golden case through ``lopt_port.VeLO``, step by step.

The case layout is that of :mod:`parity.golden`, with HyperV2's state
(``mom_rolling/m``, ``rms_rolling/rms``, ``fac_rolling/{v_row,v_col,v_diag}``,
``lstm_hidden_state/{hidden,cell}`` with one row per tensor in sorted-name order,
``loss_buffer/{means,running_min,decays,iteration}``, ``iteration``, ``num_steps``) and VeLO's
intermediates (per step ``loss_features``, ``lstm_input``, ``lstm_state_out/*``, ``controls``,
``lr_mult``; per tensor ``ff_params/*``, ``g_clipped``, ``fac_g``, ``features_raw``,
``mlp_input``, ``mlp_pre{0,1}``, ``mlp_output``, ``param_scale``).

Errors (worst over tensors or leaves of the step): ``relative`` (``max|ours - upstream| /
max|upstream|``) for every quantity, per column for ``features_raw`` and the normalized
``mlp_input``, absolute for the bounded ``loss_features``/``lstm_input``; ``update`` is
:func:`velo_update_error` with ``output_scale = max|MLP output|`` of the tensor, against
upstream's step evaluated in float32 from its recorded MLP output, param scale and ``lr_mult``
(upstream's formula and order); ``params`` relative to the
larger of the params' scale before and after the step.

Needs numpy and torch only (no JAX).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from lopt_port.velo import VeLO
from lopt_port.weights import LoadedWeights
from parity.errors import relative, relative_per_column
from parity.golden import GoldenCase, StepReport

#: upstream per-tensor state path -> lopt_port state name
VELO_STATE_MAP = {
    "mom_rolling/m": "momentum",
    "rms_rolling/rms": "rms",
    "fac_rolling/v_row": "v_row",
    "fac_rolling/v_col": "v_col",
    "fac_rolling/v_diag": "v_diag",
}
#: upstream loss-buffer leaf -> lopt_port global state name
VELO_GLOBAL_MAP = {
    "loss_buffer/means": "loss_means",
    "loss_buffer/running_min": "loss_running_min",
    "loss_buffer/decays": "loss_decays",
}


def _f32(a: Any) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float32))


Leaf = Callable[[str], Any]


def golden_leaf(case: GoldenCase, t: int) -> Leaf:
    """``leaf(path)``: upstream's state leaf ``path`` after call ``t`` of a golden case."""
    return lambda path: case.data[f"state/step{t}/{path}"]


def tree_leaf(state: Mapping[str, Any]) -> Leaf:
    """``leaf(path)`` into a nested state dict (the JAX reference's), path ``a/b/c``."""
    def leaf(path: str) -> Any:
        node: Any = state
        for key in path.split("/"):
            node = node[key]
        return np.asarray(node)
    return leaf


def load_velo_state(opt: VeLO, params: Mapping[str, torch.Tensor], leaf: Leaf) -> None:
    """Put upstream's state (``leaf(path)``, HyperV2 paths; LSTM rows in ``params`` order)
    into ``opt``. Factored dims stay the optimizer's own, so a wrong rule shows up as a
    difference; a shape disagreement raises ``ValueError``."""
    for row, (name, p) in enumerate(params.items()):
        state = opt.initial_state(p)
        for upstream, ours in VELO_STATE_MAP.items():
            if ours in state:
                arr = _f32(leaf(f"{upstream}/{name}"))
                if tuple(arr.shape) != tuple(state[ours].shape):
                    raise ValueError(f"upstream {upstream}/{name} has shape "
                                     f"{tuple(arr.shape)}, lopt_port's {ours} "
                                     f"{tuple(state[ours].shape)}")
                state[ours] = arr.to(p.device)
        state["lstm_hidden"] = _f32(leaf("lstm_hidden_state/hidden")[row]).to(p.device)
        state["lstm_cell"] = _f32(leaf("lstm_hidden_state/cell")[row]).to(p.device)
        opt.state[p] = state
    glob = {ours: _f32(leaf(up)) for up, ours in VELO_GLOBAL_MAP.items()}
    glob["iteration"] = torch.tensor(int(leaf("iteration")), dtype=torch.int64)
    glob["num_steps"] = int(leaf("num_steps"))
    opt.global_state.clear()
    opt.global_state.update(glob)


def velo_state_errors(opt: VeLO, params: Mapping[str, torch.Tensor],
                      leaf: Leaf) -> dict[str, float]:
    """Relative error of every state leaf against upstream's (per tensor and global)."""
    errors: dict[str, float] = {}
    for row, (name, p) in enumerate(params.items()):
        state = opt.state[p]
        for upstream, ours in VELO_STATE_MAP.items():
            if ours in state:
                errors[f"{name}/{ours}"] = relative(state[ours].cpu().numpy(),
                                                    leaf(f"{upstream}/{name}"))
        for ours, up in (("lstm_hidden", "hidden"), ("lstm_cell", "cell")):
            errors[f"{name}/{ours}"] = relative(state[ours].cpu().numpy(),
                                                leaf(f"lstm_hidden_state/{up}")[row])
    glob = opt.global_state
    for up, ours in VELO_GLOBAL_MAP.items():
        errors[ours] = relative(glob[ours].cpu().numpy(), leaf(up))
    errors["iteration"] = abs(int(glob["iteration"]) - int(leaf("iteration")))
    return errors


def upstream_velo_update(mlp_output: np.ndarray, param_scale: Any, lr_mult: Any,
                         exp_mult: float, step_mult: float) -> np.ndarray:
    """``lr_mult * (direction * (param_scale * exp(magnitude * exp_mult)) * step_mult)`` in
    float32, upstream's order of operations."""
    f32 = np.float32
    direction, magnitude = mlp_output[..., 0], mlp_output[..., 1]
    scaled = (f32(param_scale) * np.exp(magnitude * f32(exp_mult))).astype(f32)
    return (f32(lr_mult) * ((direction * scaled).astype(f32) * f32(step_mult))).astype(f32)


def mlp_abs_scales(mlp_input: np.ndarray, ff_params: Mapping[str, Any]) -> list[float]:
    """What each layer of a tensor's MLP sums: ``max`` of the absolute forward pass.

    Layer by layer in float64, ``a_0 = sum_j |x_j| |W0_j| + |b0|``, ``a_i = a_{i-1} |W_i| +
    |b_i|`` (an upper bound through ReLU); one value per layer (``mlp_pre0``, ``mlp_pre1``,
    ..., the output). A float32 forward error, or one carried in by weights that are
    themselves computed (VeLO interpolates them), is bounded relative to these, however much
    the signed sums cancel: in a 4-wide hidden layer terms of O(3) can sum to 0.07.
    """
    x = np.abs(np.asarray(mlp_input, np.float64)).reshape(-1, np.shape(mlp_input)[-1])
    w = {k: np.abs(np.asarray(v, np.float64)) for k, v in ff_params.items()}
    a, start, j = np.zeros((x.shape[0], w["b0"].shape[-1])), 0, 0
    while f"w0__{j}" in w:
        width = w[f"w0__{j}"].shape[0]
        a = a + x[:, start:start + width] @ w[f"w0__{j}"]
        start, j = start + width, j + 1
    scales = [float((a + w["b0"]).max())]
    a, i = a + w["b0"], 1
    while f"w{i}" in w:
        a = a @ w[f"w{i}"] + w[f"b{i}"]
        scales.append(float(a.max()))
        i += 1
    return scales


def velo_update_error(ours: np.ndarray, ref_mlp_output: np.ndarray, param_scale: Any,
                      lr_mult: np.ndarray, row: int, exp_mult: float, step_mult: float,
                      output_scale: float) -> float:
    """``max|ours - upstream update|`` over the update's natural scale.

    The update is ``lr_mult * direction * param_scale * exp(magnitude * exp_mult) *
    step_mult``; its scale is that product with ``max_j |lr_mult_j|`` (over the step's
    tensors) and ``output_scale`` for the direction. ``lr_mult`` is one output of a linear head
    and can cancel to near zero for one tensor (terms of O(0.1) summing to 1e-3); its float32
    error is relative to the head's output scale. ``output_scale`` is ``max|MLP output|`` of
    the tensor (the golden acceptance, as :func:`parity.errors.update_error`) or, in the
    parity gate, what the output layer sums (:func:`mlp_abs_scales`), because there the MLP's
    weights differ by float32 noise too and its 4-wide sums can cancel.
    """
    ref = upstream_velo_update(ref_mlp_output, param_scale, lr_mult[row], exp_mult, step_mult)
    out = np.asarray(ref_mlp_output, np.float64)
    scale = (np.abs(np.asarray(lr_mult, np.float64)).max() * float(param_scale) * step_mult
             * np.exp(out[..., 1] * exp_mult).max() * output_scale)
    diff = float(np.abs(np.asarray(ours, np.float64).reshape(ref.shape) - ref).max())
    return diff / scale if scale > 0 else diff


def mlp_errors(got: Mapping[str, Any], ref_inter: Callable[[str], Any],
               ff_params: Mapping[str, Any]) -> dict[str, float]:
    """``mlp_pre{i}`` and ``mlp_output`` errors over :func:`mlp_abs_scales`."""
    scales = mlp_abs_scales(ref_inter("mlp_input"), ff_params)
    names = [f"mlp_pre{i}" for i in range(len(scales) - 1)] + ["mlp_output"]
    out = {}
    for name, scale in zip(names, scales, strict=True):
        ref = np.asarray(ref_inter(name), np.float64)
        mine = got[name]
        mine = (mine.detach().cpu().numpy() if isinstance(mine, torch.Tensor)
                else np.asarray(mine)).astype(np.float64).reshape(ref.shape)
        diff = float(np.abs(mine - ref).max()) if ref.size else 0.0
        out[name] = diff / scale if scale > 0 else diff
    return out


def _record(report: StepReport, quantity: str, ours: Any, ref: np.ndarray | None,
            where: str, kind: str = "relative") -> None:
    if ref is None:
        return
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ours = ours.reshape(ref.shape)
    if kind == "absolute":
        err = float(np.abs(ours.astype(np.float64) - ref).max()) if ref.size else 0.0
    elif kind == "column":
        err = relative_per_column(ours, ref)
    else:
        err = relative(ours, ref)
    report.record(quantity, err, where)


def replay_velo(weights: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights,
                case: GoldenCase, *, teacher_forced: bool = False,
                fused: bool = False, optimizer: type[VeLO] = VeLO) -> list[StepReport]:
    """Run ``optimizer`` (VeLO, or Celo / CeloAdam on the Celo authors' cases, whose state
    has HyperV2's layout) on the case's gradients and losses and compare per step.

    Free running (default) starts from the case's initial params and state; teacher forced
    loads upstream's params and state of the previous step before every call. ``fused``
    selects the fused kernels (params and state are compared; the intermediates stay in the
    kernels). Celo-Adam's per-tensor intermediates are ``m_hat``, ``v_hat`` and the step
    (``update``, upstream's ``step``).
    """
    params = {n: _f32(a) for n, a in case.tensors("params", 0).items()}
    num_steps = int(case.data["state/step0/num_steps"])
    opt = optimizer(list(params.values()), weights, num_steps=num_steps, fused=fused)
    reports = []
    for t in range(1, case.steps + 1):
        if teacher_forced or t == 1:
            for n, p in params.items():
                p.copy_(_f32(case.data[f"params/step{t - 1}/{n}"]))
            load_velo_state(opt, params, golden_leaf(case, t - 1))
        for n, p in params.items():
            p.grad = _f32(case.data[f"grads/step{t}/{n}"])
        if fused:
            opt.step(loss=float(case.data[f"losses/step{t}"]))
            report = StepReport(t)
            for n, p in params.items():
                report.record("params", relative(p.numpy(), case.data[f"params/step{t}/{n}"],
                                                 case.data[f"params/step{t - 1}/{n}"]), n)
            for key, err in velo_state_errors(opt, params, golden_leaf(case, t)).items():
                report.record("state", err, key)
            reports.append(report)
            continue
        with opt.capture_intermediates() as cap:
            opt.step(loss=float(case.data[f"losses/step{t}"]))
        report = StepReport(t)
        inter = f"inter/step{t}"
        d = case.data
        step = cap["step"]
        _record(report, "loss_features", step["loss_features"], d.get(f"{inter}/loss_features"),
                "loss", "absolute")
        _record(report, "lstm_input", step["lstm_input"], d.get(f"{inter}/lstm_input"),
                "lstm", "absolute")
        for q in ("controls", "lr_mult"):
            if step[q].numel():
                _record(report, q, step[q], d.get(f"{inter}/{q}"), q)
        for part in ("hidden", "cell"):
            _record(report, "lstm_state_out", step["lstm_state_out"][part],
                    d.get(f"{inter}/lstm_state_out/{part}"), part)
        for row, (n, p) in enumerate(params.items()):
            got = cap["tensors"][p]
            if "ff_params" not in got:  # Celo-Adam: no MLP
                for q in ("m_hat", "v_hat"):
                    _record(report, q, got[q], d.get(f"{inter}/{n}/{q}"), n)
                _record(report, "update", got["update"], d.get(f"{inter}/{n}/step"), n)
                report.record("params", relative(p.numpy(), d[f"params/step{t}/{n}"],
                                                 d[f"params/step{t - 1}/{n}"]), n)
                continue
            for leaf, value in got["ff_params"].items():
                _record(report, "ff_params", value, d.get(f"{inter}/{n}/ff_params/{leaf}"),
                        f"{n}/{leaf}")
            _record(report, "features_raw", got["features_raw"],
                    d.get(f"{inter}/{n}/features_raw"), n, "column")
            _record(report, "mlp_input", got["mlp_input"], d.get(f"{inter}/{n}/mlp_input"), n,
                    "column")
            for q in ("g_clipped", "fac_g", "mlp_pre0", "mlp_pre1", "mlp_output",
                      "param_scale"):
                _record(report, q, got[q], d.get(f"{inter}/{n}/{q}"), n)
            ref_out = d.get(f"{inter}/{n}/mlp_output")
            if ref_out is not None:
                report.record("update", velo_update_error(
                    got["update"].numpy(), ref_out, d[f"{inter}/{n}/param_scale"],
                    d[f"{inter}/lr_mult"], row, opt.hparams["exp_mult"],
                    opt.hparams["step_mult"], float(np.abs(ref_out).max())), n)
            ref_before = d[f"params/step{t - 1}/{n}"]
            report.record("params", relative(p.numpy(), d[f"params/step{t}/{n}"], ref_before), n)
        for key, err in velo_state_errors(opt, params, golden_leaf(case, t)).items():
            report.record("state", err, key)
        reports.append(report)
    return reports
