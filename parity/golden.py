"""Replay an upstream golden case through lopt_port and measure the differences per step.

A golden case (``<checkpoint>__<task>.npz``) was written by running the real upstream code:
per update call ``t`` (1-based) it holds the gradients and loss fed in, the parameters and
every optimizer-state leaf after the call, and the call's intermediates (teacher forced from
the stored state ``t-1``). Keys: ``params/step{t}/{name}``, ``grads/step{t}/{name}``,
``losses/step{t}``, ``state/step{t}/{path}``, ``inter/step{t}/{name}/{quantity}``,
``meta/factored_dims/{name}``, ``meta/decays/*``. Tensor order is sorted names.

Errors, each the worst over tensors (or state leaves) of the step:

=================  ==========================================================================
quantity           error
=================  ==========================================================================
``features_raw``   max over columns of ``max|ours - upstream| / max|upstream column|``
``mlp_input``      ``max|ours - upstream|`` (normalized features and time features, O(1))
``mlp_output``     ``max|ours - upstream| / max|upstream|`` (also ``mlp_pre{i}``, ``fac_g``)
``update``         ``max|ours - upstream| / max|upstream update|``, where the upstream update
                   is ``direction * exp(magnitude * exp_mult) * step_mult`` evaluated in float32
                   from upstream's recorded MLP output (upstream's formula and order)
``params``         ``max|ours - upstream| / max|upstream params|``
``state``          per leaf ``max|ours - upstream| / max|upstream leaf|``
=================  ==========================================================================

Needs numpy and torch only (no JAX): the main job runs it on a fresh install.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lopt_port.small_fc_lopt import SmallFCLOpt
from lopt_port.weights import LoadedWeights

#: Upstream AdafacMLPLOpt state paths (under ``state/step{t}/``) -> lopt_port state names.
SMALL_FC_STATE_MAP = {
    "mom_rolling/m": "momentum",
    "rms_rolling/rms": "rms",
    "fac_rolling_features/v_row": "v_row",
    "fac_rolling_features/v_col": "v_col",
    "fac_rolling_features/v_diag": "v_diag",
}


@dataclass
class GoldenCase:
    """One golden npz, loaded into memory."""

    path: str
    data: dict[str, np.ndarray]
    names: list[str]
    steps: int

    def tensors(self, prefix: str, t: int) -> dict[str, np.ndarray]:
        return {n: self.data[f"{prefix}/step{t}/{n}"] for n in self.names}

    def inter(self, t: int, name: str, quantity: str) -> np.ndarray | None:
        return self.data.get(f"inter/step{t}/{name}/{quantity}")


def load_case(path: str | os.PathLike) -> GoldenCase:
    """Load a golden ``.npz`` case."""
    with np.load(os.fspath(path)) as z:
        data = {k: z[k] for k in z.files}
    names = sorted(k.split("/", 2)[2] for k in data if k.startswith("params/step0/"))
    steps = max(int(k.split("/")[1][4:]) for k in data if k.startswith("params/step"))
    return GoldenCase(os.fspath(path), data, names, steps)


@dataclass
class StepReport:
    """Worst error per quantity for one update call, and where it occurred."""

    step: int
    errors: dict[str, float] = field(default_factory=dict)
    worst: dict[str, str] = field(default_factory=dict)

    def record(self, quantity: str, error: float, where: str) -> None:
        if quantity not in self.errors or error > self.errors[quantity]:
            self.errors[quantity] = error
            self.worst[quantity] = where


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    if diff.size == 0:
        return 0.0
    scale = np.abs(ref.astype(np.float64)).max()
    return float(diff.max() / scale) if scale > 0 else float(diff.max())


def _rel_per_column(ours: np.ndarray, ref: np.ndarray) -> float:
    ours2 = ours.reshape(-1, ours.shape[-1]).astype(np.float64)
    ref2 = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    scale = np.abs(ref2).max(axis=0)
    diff = np.abs(ours2 - ref2).max(axis=0)
    return float(np.max(np.where(scale > 0, diff / np.where(scale > 0, scale, 1), diff)))


def upstream_update(mlp_output: np.ndarray, exp_mult: float, step_mult: float) -> np.ndarray:
    """Upstream's step from its MLP output, in float32 and upstream's order of operations."""
    f32 = np.float32
    direction, magnitude = mlp_output[..., 0], mlp_output[..., 1]
    return (direction * np.exp(magnitude * f32(exp_mult))).astype(f32) * f32(step_mult)


def small_fc_state_from_case(case: GoldenCase, t: int, name: str) -> dict[str, Any]:
    """lopt_port per-parameter state equal to upstream's ``state/step{t}`` for one tensor."""
    dims = case.data[f"meta/factored_dims/{name}"]
    state: dict[str, Any] = {
        "step": torch.tensor(float(case.data[f"state/step{t}/iteration"]),
                             dtype=torch.float32),
        "factored_dims": () if int(dims[0]) < 0 else (int(dims[0]), int(dims[1])),
    }
    for upstream, ours in SMALL_FC_STATE_MAP.items():
        arr = case.data[f"state/step{t}/{upstream}/{name}"]
        if arr.shape[0] == 0 and arr.ndim == 2:
            continue  # upstream stores unused factored slots as (0, K)
        state[ours] = torch.tensor(arr)
    return state


def replay_small_fc(weights: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights,
                    case: GoldenCase, *, teacher_forced: bool = False,
                    variant: str | None = None) -> list[StepReport]:
    """Run ``SmallFCLOpt`` on the case's gradients and compare with upstream at every step.

    Free running (default): start from the case's initial params and let the optimizer run.
    Teacher forced: before each call load upstream's params and state of the previous step,
    so each step is compared from identical inputs.
    """
    params = {n: torch.tensor(a) for n, a in case.tensors("params", 0).items()}
    opt = SmallFCLOpt(list(params.values()), weights, variant=variant)
    hp = opt.hparams
    reports = []
    for t in range(1, case.steps + 1):
        if teacher_forced:
            for n, p in params.items():
                p.copy_(torch.tensor(case.data[f"params/step{t - 1}/{n}"]))
                opt.state[p] = small_fc_state_from_case(case, t - 1, n)
        for n, p in params.items():
            p.grad = torch.tensor(case.data[f"grads/step{t}/{n}"])
        with opt.capture_intermediates() as captured:
            opt.step()
        report = StepReport(t)
        for n, p in params.items():
            got = {k: v.numpy() for k, v in captured[p].items()}
            if (ref := case.inter(t, n, "features_raw")) is not None:
                report.record("features_raw", _rel_per_column(got["features_raw"], ref), n)
            if (ref := case.inter(t, n, "mlp_input")) is not None:
                report.record("mlp_input", float(np.abs(got["mlp_input"] - ref).max()), n)
            for q in ("fac_g", "mlp_pre0", "mlp_pre1", "mlp_output"):
                if (ref := case.inter(t, n, q)) is not None:
                    report.record(q, _rel(got[q], ref), n)
            if (ref := case.inter(t, n, "mlp_output")) is not None:
                ref_update = upstream_update(ref, hp["exp_mult"], hp["step_mult"])
                report.record("update", _rel(got["update"], ref_update.reshape(p.shape)), n)
            report.record("params", _rel(p.numpy(), case.data[f"params/step{t}/{n}"]), n)
            ours = small_fc_state_from_case(case, t, n)
            for key, ref_t in ours.items():
                if key == "factored_dims":
                    if tuple(opt.state[p][key]) != ref_t:
                        report.record("factored_dims", 1.0, n)
                    continue
                report.record("state", _rel(opt.state[p][key].numpy(), ref_t.numpy()),
                              f"{n}/{key}")
        reports.append(report)
    return reports


def decay_errors(weights: Any, case: GoldenCase) -> dict[str, float]:
    """``max|ours - upstream|`` of the effective decays after the learned offsets."""
    opt = SmallFCLOpt([torch.zeros(1)], weights)
    return {k: float(np.abs(v.numpy() - case.data[f"meta/decays/{k}_decays"]).max())
            for k, v in opt.decays.items()}
