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
``params``         ``max|ours - upstream|`` over the larger of the params' scale before and
                   after the step
``state``          per leaf ``max|ours - upstream| / max|upstream leaf|``
=================  ==========================================================================

Needs numpy and torch only (no JAX): the main job runs it on a fresh install.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lopt_port.small_fc_lopt import SmallFCLOpt
from lopt_port.weights import LoadedWeights
from parity.errors import relative, relative_per_column
from parity.state_map import small_fc_state_errors, small_fc_state_from_upstream


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


def upstream_update(mlp_output: np.ndarray, exp_mult: float, step_mult: float) -> np.ndarray:
    """Upstream's step from its MLP output, in float32 and upstream's order of operations."""
    f32 = np.float32
    direction, magnitude = mlp_output[..., 0], mlp_output[..., 1]
    return (direction * np.exp(magnitude * f32(exp_mult))).astype(f32) * f32(step_mult)


def _leaf(case: GoldenCase, t: int, name: str) -> Callable[[str], np.ndarray]:
    return lambda path: case.data[f"state/step{t}/{path}/{name}"]


def _record_intermediates(report: StepReport, got: Mapping[str, np.ndarray],
                          case: GoldenCase, t: int, n: str, shape: tuple[int, ...],
                          hp: Mapping[str, Any]) -> None:
    if (ref := case.inter(t, n, "features_raw")) is not None:
        report.record("features_raw", relative_per_column(got["features_raw"], ref), n)
    if (ref := case.inter(t, n, "mlp_input")) is not None:
        report.record("mlp_input", float(np.abs(got["mlp_input"] - ref).max()), n)
    for q in ("fac_g", "mlp_pre0", "mlp_pre1", "mlp_output"):
        if (ref := case.inter(t, n, q)) is not None:
            report.record(q, relative(got[q], ref), n)
    if (ref := case.inter(t, n, "mlp_output")) is not None:
        ref_update = upstream_update(ref, hp["exp_mult"], hp["step_mult"])
        report.record("update", relative(got["update"], ref_update.reshape(shape)), n)


def replay_small_fc(weights: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights,
                    case: GoldenCase, *, teacher_forced: bool = False,
                    variant: str | None = None, fused: bool = False) -> list[StepReport]:
    """Run ``SmallFCLOpt`` on the case's gradients and compare with upstream at every step.

    Free running (default): start from the case's initial params and let the optimizer run.
    Teacher forced: before each call load upstream's params and state of the previous step,
    so each step is compared from identical inputs. ``fused`` selects the fused kernels (the
    intermediates are then not recorded: the fused path computes them in registers).
    """
    params = {n: torch.tensor(a) for n, a in case.tensors("params", 0).items()}
    opt = SmallFCLOpt(list(params.values()), weights, variant=variant, fused=fused)
    hp = opt.hparams
    reports = []
    for t in range(1, case.steps + 1):
        if teacher_forced:
            iteration = int(case.data[f"state/step{t - 1}/iteration"])
            for n, p in params.items():
                p.copy_(torch.tensor(case.data[f"params/step{t - 1}/{n}"]))
                opt.state[p] = small_fc_state_from_upstream(
                    opt, p, _leaf(case, t - 1, n), iteration)
        for n, p in params.items():
            p.grad = torch.tensor(case.data[f"grads/step{t}/{n}"])
        with contextlib.nullcontext({}) if fused else opt.capture_intermediates() as captured:
            opt.step()
        report = StepReport(t)
        for n, p in params.items():
            if not fused:
                got = {k: v.numpy() for k, v in captured[p].items()}
                _record_intermediates(report, got, case, t, n, p.shape, hp)
            report.record("params", relative(p.numpy(), case.data[f"params/step{t}/{n}"],
                                             case.data[f"params/step{t - 1}/{n}"]), n)
            dims = tuple(int(d) for d in case.data[f"meta/factored_dims/{n}"])
            if (opt.state[p]["factored_dims"] or (-1, -1)) != dims:
                report.record("factored_dims", 1.0, n)
            iteration = int(case.data[f"state/step{t}/iteration"])
            for key, err in small_fc_state_errors(opt.state[p], _leaf(case, t, n),
                                                  iteration).items():
                report.record("state", err, f"{n}/{key.removeprefix('state/')}")
        reports.append(report)
    return reports


def decay_errors(weights: Any, case: GoldenCase) -> dict[str, float]:
    """``max|ours - upstream|`` of the effective decays after the learned offsets."""
    opt = SmallFCLOpt([torch.zeros(1)], weights)
    return {k: float(np.abs(v.numpy() - case.data[f"meta/decays/{k}_decays"]).max())
            for k, v in opt.decays.items()}
