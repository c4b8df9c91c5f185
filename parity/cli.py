"""``lopt-parity``: run the harness, print the worst errors, write a report, gate CI."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Sequence
from typing import TextIO

from parity import harness, report


class _Progress:
    """A progress bar on a terminal, one line per phase otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr  # sys.stderr as of now
        self.tty = self.stream.isatty()
        self.start = time.monotonic()

    def __call__(self, phase: str, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.start
        if self.tty:
            width = 30
            filled = int(width * done / max(total, 1))
            self.stream.write(f"\r{phase:<12} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{done}/{total} {elapsed:5.1f}s")
            if done == total:
                self.stream.write("\n")
        elif done == total or done % 4 == 0:
            self.stream.write(f"{phase}: {done}/{total} ({elapsed:.1f}s)\n")
        self.stream.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lopt-parity",
        description="Compare lopt-port's PyTorch optimizer with a JAX reference step by step "
                    "on seeded random tasks (lockstep) and on a small model (free running).")
    p.add_argument("src", help="upstream checkpoint folder or converted weights file")
    p.add_argument("--tasks", type=int, default=16, help="lockstep tasks (default 16)")
    p.add_argument("--steps", type=int, default=20, help="steps per lockstep task (20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=list(harness.IMPLS), default="eager",
                   help="eager: the torch path; fused: the fused path (on the backend "
                        "LOPT_PORT_FUSED_BACKEND selects: the CPU kernels by default); "
                        "cuda-emulated: the CUDA kernels run on the CPU under emulation "
                        "(small_fc_lopt, VeLO, MuLO, Celo; same tolerances as fused)")
    p.add_argument("--reference", choices=["builtin", "upstream"], default="builtin",
                   help="builtin: parity.reference; upstream: the real learned_optimization")
    p.add_argument("--variant", choices=["head", "pypi-0.0.1"],
                   help="force the small_fc_lopt variant (builtin reference only); the "
                        "upstream reference always uses its own code's variant")
    p.add_argument("--free-steps", type=int, default=200,
                   help="free-running steps (0 turns free running off; default 200)")
    p.add_argument("--free-task", choices=["mlp", "conv"], default="mlp")
    p.add_argument("--num-steps", type=int, default=50,
                   help="training horizon of the lockstep tasks for optimizers that use one "
                        "(VeLO: fraction-trained and loss features; default 50)")
    p.add_argument("--report", metavar="DIR", help="write report.json, report.md and plots")
    p.add_argument("--gate", action="store_true",
                   help="exit 1 on any tolerance violation, listing every one")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """0: pass (or no --gate); 1: gate violation; 2: bad input."""
    args = build_parser().parse_args(argv)
    try:
        result = harness.run(args.src, tasks=args.tasks, steps=args.steps, seed=args.seed,
                             reference=args.reference, impl=args.impl, variant=args.variant,
                             free_steps=args.free_steps, free_task=args.free_task,
                             num_steps=args.num_steps, progress=_Progress())
    except harness.HarnessError as e:
        if args.debug:
            traceback.print_exc()
        print(f"lopt-parity: error: {e}", file=sys.stderr)
        return 2
    info = result.info
    variant = f" ({info['variant']})" if info.get("variant") else ""
    backend = info.get("fused_backend")
    impl = (f"{info['impl']} ({backend} backend)"
            if info["impl"] == "fused" and backend not in (None, "auto") else info["impl"])
    print(f"{info['kind']}{variant} from {info['source']}: {impl} vs "
          f"{info['reference']}" + (f" [{info['upstream']}]" if info.get("upstream") else "")
          + f"; {info['tasks']} tasks x {info['steps']} steps"
          + (f" (horizon {info['num_steps']})"
             if info["kind"] in ("velo", "celo", "celo_adam") else "")
          + (f", free running {info['free_steps']} steps ({info['free_task']})"
             if info["free_steps"] else ""))
    print(report.table(result))
    if args.report:
        paths = report.write(result, args.report)
        print(f"report: {', '.join(paths)}")
    violations = result.violations()
    if violations:
        print(f"{len(violations)} tolerance violation(s):")
        for line in violations:
            print(f"  {line}")
        if args.gate:
            return 1
    elif args.gate:
        print("parity gate: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
