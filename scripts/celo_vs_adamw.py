"""Train one small model with the real, meta-trained Celo and Celo-Adam weights beside AdamW.

The model is an MLP (64 -> 128 -> 128 -> 10, ReLU) on a seeded teacher-student classification
task: inputs ~ N(0, 1), labels from a fixed random teacher MLP, 10% of them flipped. Every
optimizer starts from the same weights and sees the same batches (128 examples per step);
Celo and Celo-Adam get ``num_steps`` = the run's length, as their schedule needs. AdamW runs
at torch's defaults (lr 1e-3, weight decay 1e-2) and at lr 3e-3. Training loss (mean over the
last 20 steps) and the loss on 4,096 held-out examples are reported; the curves are plotted.

    python scripts/celo_vs_adamw.py --steps 1000 --out out/celo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN, HIDDEN, CLASSES, BATCH, HELD_OUT, NOISE = 64, 128, 10, 128, 4096, 0.1


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, CLASSES))


class Task:
    """The seeded teacher-student data: ``batch(t)`` is the same for every optimizer."""

    def __init__(self, seed: int) -> None:
        self.teacher = _mlp(seed + 1000)
        self.seed = seed
        self.held_out = self._sample(torch.Generator().manual_seed(seed + 1), HELD_OUT)

    @torch.no_grad()
    def _sample(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, IN, generator=gen)
        y = self.teacher(x).argmax(dim=1)
        flip = torch.rand(n, generator=gen) < NOISE
        y[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=gen)
        return x, y

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(torch.Generator().manual_seed(self.seed * 1_000_003 + 7 + t), BATCH)


def _optimizers(steps: int) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    import converters
    from lopt_port import Celo, CeloAdam
    from lopt_port.weights import LoadedWeights

    def weights(kind: str) -> LoadedWeights:
        c = converters.convert(os.path.join(ROOT, "checkpoints", kind))
        return LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)

    celo, celo_adam = weights("celo"), weights("celo_adam")
    return {
        "Celo": lambda ps: Celo(ps, celo, num_steps=steps),
        "Celo-Adam": lambda ps: CeloAdam(ps, celo_adam, num_steps=steps),
        "AdamW lr=1e-3": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "AdamW lr=3e-3": lambda ps: torch.optim.AdamW(ps, lr=3e-3),
    }


def train(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], task: Task,
          steps: int, seed: int) -> dict[str, object]:
    """One run: per-step training loss, held-out loss at the end, seconds."""
    model = _mlp(seed)
    opt = make(list(model.parameters()))
    losses = []
    start = time.perf_counter()
    for t in range(steps):
        x, y = task.batch(t)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if getattr(opt, "requires_loss", False):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        x, y = task.held_out
        held_out = float(torch.nn.functional.cross_entropy(model(x), y))
    return {"losses": losses, "held_out": held_out, "seconds": seconds}


def _plot(runs: dict[str, dict], path: str, steps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, steps // 50)
    for name, run in runs.items():
        losses = torch.tensor(run["losses"])
        smooth = losses.unfold(0, window, 1).mean(dim=1) if len(losses) >= window else losses
        ax.plot(range(window - 1, window - 1 + len(smooth)), smooth.numpy(),
                label=f"{name} (held-out {run['held_out']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean of {window})")
    ax.set_yscale("log")
    ax.set_title("MLP 64-128-128-10, teacher-student task: real Celo weights vs AdamW")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(steps: int, seed: int, out: str) -> dict[str, dict]:
    """Train every optimizer, write ``results.json``, ``loss_curves.png``, ``report.md``."""
    os.makedirs(out, exist_ok=True)
    task = Task(seed)
    runs = {name: train(make, task, steps, seed) for name, make in _optimizers(steps).items()}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": steps, "seed": seed, "runs": runs}, f)
    _plot(runs, os.path.join(out, "loss_curves.png"), steps)
    tail = max(1, min(20, steps))
    lines = [f"# Celo (real weights) vs AdamW, {steps} steps, seed {seed}", "",
             "| optimizer | training loss (last 20 steps) | held-out loss | seconds |",
             "|---|---|---|---|"]
    for name, r in runs.items():
        last = sum(r["losses"][-tail:]) / tail
        lines.append(f"| {name} | {last:.4f} | {r['held_out']:.4f} | {r['seconds']:.1f} |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[2:-3]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "celo"))
    args = parser.parse_args(argv)
    run(args.steps, args.seed, args.out)
    print(f"wrote {os.path.join(args.out, 'report.md')} and loss_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
