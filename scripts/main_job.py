"""The main job: convert the bundled checkpoints, prove the round trip, replay upstream's run.

For every checkpoint under ``checkpoints/`` (a folder with ``params`` and ``config.gin``:
small_fc_lopt, VeLO and MuLO; or the Celo authors' ``theta.state``: the real Celo and
Celo-Adam weights):

1. ``lopt-convert`` it to ``out/<name>.safetensors`` and back to ``out/<name>_upstream/``,
   and check that the written theta file is byte-identical to the original;
2. replay the bundled golden case (``checkpoints/golden/<name>__taskA.npz``, run by upstream
   or by the Celo authors' code) with the lopt_port optimizer built from the converted file,
   free running from the same initial parameters, gradients and losses, and print per step
   the largest difference from what upstream computed (definitions in :mod:`parity.golden`
   and :mod:`parity.golden_velo`);
3. run a short ``lopt-parity`` check of each optimizer (random lockstep tasks against the
   JAX reference and a free-running MLP) and write its report to ``out/parity/<name>/``;
4. train a small MLP with the real Celo and Celo-Adam weights beside AdamW
   (``scripts/celo_vs_adamw.py``) and write the loss curves to ``out/celo/``.

Exit status 0 when everything is within the acceptance tolerances, 1 otherwise.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys

from celo_vs_adamw import run as celo_vs_adamw

from converters import cli, convert
from lopt_port import Celo, CeloAdam, VeLO
from parity import cli as parity_cli
from parity.golden import StepReport, decay_errors, load_case, replay_small_fc
from parity.golden_velo import replay_velo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Acceptance tolerances, per step and tensor. small_fc_lopt (issue 2): the update within 1e-5
# of the upstream update's scale and the normalized features within 1e-5 absolute. VeLO
# (issue 5): update and params within 1e-5 relative.
# Celo and Celo-Adam (issue 8): params within 1e-5 relative (the authors recorded their
# intermediates eagerly and params jitted; tests/test_celo.py bounds the intermediates).
TOLERANCES = {"small_fc_lopt": {"update": 1e-5, "mlp_input": 1e-5},
              "velo": {"update": 1e-5, "params": 1e-5},
              "celo": {"update": 1e-5, "params": 1e-5},
              "celo_adam": {"params": 1e-5}}
COLUMNS = {"small_fc_lopt": ("update", "mlp_input", "features_raw", "mlp_output", "params",
                             "state"),
           "velo": ("update", "lstm_input", "lr_mult", "mlp_output", "params", "state"),
           "celo": ("update", "lstm_input", "lr_mult", "mlp_output", "params", "state"),
           "celo_adam": ("update", "lstm_input", "lr_mult", "v_hat", "params", "state")}
THETA_FILES = ("params", "theta.state")
CELO_OPTIMIZERS = {"celo": Celo, "celo_adam": CeloAdam}
#: (checkpoint, extra lopt-parity arguments) of the short parity checks.
PARITY_CHECKS = (("small_fc_h32_sm0p01", []), ("mulo_h32_sm0p01", []),
                 ("velo_small", ["--num-steps", "50"]),
                 ("celo", ["--num-steps", "50"]), ("celo_adam", ["--num-steps", "50"]))


def _table(reports: list[StepReport], columns: tuple[str, ...]) -> str:
    head = "step " + " ".join(f"{c:>12}" for c in columns) + "   worst update in"
    rows = [head, "-" * len(head)]
    for r in reports:
        cells = " ".join(f"{r.errors.get(c, float('nan')):>12.2e}" for c in columns)
        rows.append(f"{r.step:>4} {cells}   {r.worst.get('update', '')}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "out"))
    parser.add_argument("--celo-steps", type=int, default=1000,
                        help="length of the Celo vs AdamW training runs (default 1000)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    found = {d: f for d in os.listdir(os.path.join(ROOT, "checkpoints")) for f in THETA_FILES
             if os.path.isfile(os.path.join(ROOT, "checkpoints", d, f))}
    ok = True
    for name in sorted(found):
        theta_file = found[name]
        src = os.path.join(ROOT, "checkpoints", name)
        weights = os.path.join(args.out, f"{name}.safetensors")
        back = os.path.join(args.out, f"{name}_upstream")
        print(f"\n=== {name} ===")
        if cli.main([src, "-o", weights, "--force"]) != 0:
            return 1
        if cli.main([weights, "--format", "upstream", "-o", back, "--force"]) != 0:
            return 1
        same = filecmp.cmp(os.path.join(src, theta_file), os.path.join(back, theta_file),
                           shallow=False)
        print(f"round trip upstream -> safetensors -> upstream: "
              f"{'byte-identical' if same else 'DIFFERENT'}")
        ok &= same
        case_path = os.path.join(ROOT, "checkpoints", "golden", f"{name}__taskA.npz")
        if not os.path.isfile(case_path):
            print("no golden case bundled for this checkpoint")
            continue
        case = load_case(case_path)
        kind = convert(weights).kind
        print(f"\nreplay of {os.path.basename(case_path)} ({case.steps} steps, "
              f"{len(case.names)} tensors)", end="")
        if kind in ("velo", *CELO_OPTIMIZERS):
            print("\nmax difference from upstream per step (free running; definitions: "
                  "parity/golden_velo.py)")
            reports = replay_velo(weights, case,
                                  optimizer=CELO_OPTIMIZERS.get(kind, VeLO))
        else:
            decays = decay_errors(weights, case)
            print(f"; effective decays max |diff| = {max(decays.values()):.1e}")
            print("max difference from upstream per step (free running; definitions: "
                  "parity/golden.py)")
            reports = replay_small_fc(weights, case)
        print(_table(reports, COLUMNS[kind]))
        for quantity, tol in TOLERANCES[kind].items():
            worst = max(r.errors[quantity] for r in reports)
            verdict = "ok" if worst <= tol else "FAIL"
            print(f"{quantity:>10}: worst {worst:.2e} (tolerance {tol:.0e}) {verdict}")
            ok &= worst <= tol
    for name, extra in PARITY_CHECKS:
        print(f"\n=== short parity check of {name} (lopt-parity) ===")
        report_dir = os.path.join(args.out, "parity", name)
        ok &= parity_cli.main([os.path.join(ROOT, "checkpoints", name), "--tasks", "4",
                               "--steps", "10", "--free-steps", "100", *extra,
                               "--report", report_dir, "--gate"]) == 0
        print(f"open {os.path.join(report_dir, 'report.md')} for the tables and plots")
    print("\n=== training a small MLP: the real Celo weights beside AdamW ===")
    celo_dir = os.path.join(args.out, "celo")
    runs = celo_vs_adamw(args.celo_steps, 0, celo_dir)
    finite = all(all(x == x and abs(x) != float("inf") for x in r["losses"])
                 for r in runs.values())
    print(f"open {os.path.join(celo_dir, 'report.md')} for the loss curves"
          + ("" if finite else " (NON-FINITE LOSSES)"))
    ok &= finite
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
