"""Reports of a parity run: a terminal table, JSON, Markdown and matplotlib plots."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from importlib import resources
from typing import Any

from parity import tolerances
from parity.harness import ParityResult

#: Quantity groups plotted against the step (``state/*`` and ``mlp_pre*`` are merged).
PLOT_GROUPS = ("update", "params", "mlp_input", "features_raw", "fac_g", "mlp_pre",
               "mlp_output", "state")


def schema() -> dict[str, Any]:
    """The JSON schema of ``report.json``."""
    return json.loads(resources.files("parity").joinpath("report_schema.json").read_text())


def _group(quantity: str) -> str:
    head = quantity.split("/")[0]
    return "mlp_pre" if head.startswith("mlp_pre") else head


def table(result: ParityResult) -> str:
    """Worst error per quantity with its tolerance and where it occurred."""
    rows = [f"{'quantity':<18} {'worst':>10} {'tolerance':>10}  status  where",
            "-" * 78]
    for q, r in result.worst().items():
        status = "FAIL" if r.violates else "ok"
        rows.append(f"{q:<18} {r.error:>10.2e} {r.tolerance:>10.0e}  {status:<6}  "
                    f"{r.task} step {r.step} {r.tensor}")
    for f in result.free:
        status = "FAIL" if f.violates else "ok"
        rows.append(f"{'free ' + f.task + ' loss':<18} {f.final_loss_error:>10.2e} "
                    f"{tolerances.FREE['final_loss']:>10.0e}  {status:<6}  after "
                    f"{f.steps} steps (final params differ by {f.final_params_error:.2e})")
    return "\n".join(rows)


def _errors_by_step(result: ParityResult) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for r in result.records:
        g = _group(r.quantity)
        prev = out[g].get(r.step)
        out[g][r.step] = r.error if prev is None or not r.error <= prev else prev
    return out


def _plot_errors(result: ParityResult, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _errors_by_step(result)
    groups = [g for g in PLOT_GROUPS if g in data]
    cols = 4
    rows = max(1, -(-len(groups) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups, strict=False):
        steps = sorted(data[g])
        ax.semilogy(steps, [max(data[g][s], 1e-12) for s in steps], marker=".")
        ax.axhline(tolerances.LOCKSTEP[g], color="red", linestyle="--", label="tolerance")
        ax.set_title(g)
        ax.set_xlabel("step")
        ax.set_ylabel("worst error")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle("lockstep: worst error over tasks and tensors, per step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_losses(result: ParityResult, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result.free), figsize=(6 * len(result.free), 4),
                             squeeze=False)
    for ax, f in zip(axes.flat, result.free, strict=True):
        ax.plot(f.loss_reference, label="JAX reference", linewidth=2)
        ax.plot(f.loss_torch, label="PyTorch (lopt_port)", linestyle="--")
        ax.set_title(f"free running: {f.task}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(result: ParityResult, images: list[str]) -> str:
    """A Markdown report: setup, worst errors, free-running summary, violations, plots."""
    info = result.info
    lines = ["# lopt-parity report", "",
             f"- source: `{info['source']}` ({info['kind']}"
             + (f", variant {info['variant']})" if info.get("variant") else ")"),
             f"- PyTorch implementation: `{info['impl']}`; reference: `{info['reference']}`"
             + (f" ({info['upstream']})" if info.get("upstream") else ""),
             f"- lockstep: {info['tasks']} tasks x {info['steps']} steps, seed {info['seed']}",
             f"- free running: {info['free_steps']} steps of `{info['free_task']}`"
             if info.get("free_steps") else "- free running: off",
             f"- float32, JAX {info['jax']}, torch {info['torch']}, "
             f"matmul precision {info['matmul_precision']}",
             f"- result: **{'PASS' if not result.violations() else 'FAIL'}**", "",
             "| quantity | worst error | tolerance | where |", "|---|---|---|---|"]
    for q, r in result.worst().items():
        lines.append(f"| {q} | {r.error:.2e} | {r.tolerance:.0e} | {r.task} step {r.step} "
                     f"`{r.tensor}` |")
    for f in result.free:
        lines.append(f"| free {f.task}: final loss | {f.final_loss_error:.2e} | "
                     f"{tolerances.FREE['final_loss']:.0e} | after {f.steps} steps |")
    violations = result.violations()
    if violations:
        lines += ["", f"## Violations ({len(violations)})", ""]
        lines += [f"- {v}" for v in violations]
    lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in images]
    return "\n".join(lines) + "\n"


def write(result: ParityResult, directory: str) -> list[str]:
    """Write ``report.json``, ``report.md`` and the PNG plots; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    images = []
    if result.records:
        _plot_errors(result, os.path.join(directory, "errors_vs_step.png"))
        images.append("errors_vs_step.png")
    if result.free:
        _plot_losses(result, os.path.join(directory, "loss_curves.png"))
        images.append("loss_curves.png")
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(result.to_json(), f, indent=1, allow_nan=False)
    with open(os.path.join(directory, "report.md"), "w") as f:
        f.write(markdown(result, images))
    return [os.path.join(directory, n) for n in ("report.json", "report.md", *images)]
