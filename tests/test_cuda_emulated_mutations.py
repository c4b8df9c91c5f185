"""Mutation controls of the emulated CUDA backend: its comparison with the CPU backend
(``tests/emulated_check.py``) must fail on each planted kernel bug of :data:`MUTATIONS` and pass
on an unmutated copy of ``csrc/``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

import pytest

from tests.conftest import ROOT, needs_emulation, slow_except


class Mutation(NamedTuple):
    """A planted bug: in ``csrc/<file>``, ``old`` (which must occur exactly once) becomes
    ``new``. The check's output must match every pattern of ``expect`` and none of ``absent``
    (multiline regular expressions): the reason it fails."""

    name: str
    file: str
    old: str
    new: str
    expect: tuple[str, ...]
    absent: tuple[str, ...] = ()


#: The mutation controls, all in CUDA-only code (the .cu files and multi_tensor_cuda.cuh; the
#: shared header would break the CPU backend alike, and the comparison could not see it).
MUTATIONS: list[Mutation] = [
    # VeLO's stats_kernel without its barrier: thread 0 forms the tensor's statistics from the
    # column totals in shared memory before the other threads have written them (shuffled
    # order), reading the poison (NaN), so VeLO's statistics and everything after them are
    # NaN; small_fc_lopt is untouched.
    Mutation("no-barrier-in-velo-stats", "velo_cuda.cu",
             "    total[threadIdx.x] = s;\n  }\n  __syncthreads();\n",
             "    total[threadIdx.x] = s;\n  }\n",
             (r"^ok SmallFCLOpt float32", r"^FAIL VeLO float32: max inf ulps",
              r"param 0 \(130, 70\): .* vs emulated nan$")),
    # The warp butterfly starts at offset 8: each lane sums only its half-warp, so every
    # row/column mean and sum of squares (and every step) is wrong.
    Mutation("warp-butterfly-from-8", "multi_tensor_cuda.cuh",
             "for (int off = 16; off > 0; off >>= 1)",
             "for (int off = 8; off > 0; off >>= 1)",
             (r"^FAIL SmallFCLOpt float32: max", r"param 1 \(9001,\): \S+ ulps apart",
              r"state /state/0/v_row")),
    # small_fc_lopt's accumulate tiles one element too long: the first element of every tile
    # after the first is updated twice (momentum element 4096 * K = 12288 of tensor 0).
    Mutation("accumulate-tile-one-too-long", "small_fc_lopt_cuda.cu",
             "const int64_t end = begin + tile < t.n ? begin + tile : t.n;",
             "const int64_t end = begin + tile + 1 < t.n ? begin + tile + 1 : t.n;",
             (r"^FAIL SmallFCLOpt float32: max",
              r"state /state/0/momentum: .* first at flat index 12288:")),
    # The row/column reduction's grid one block short: the last 8 row/column entries of each
    # chunk of 16 tensors keep their old values (v_col of tensors 15 and 19).
    Mutation("rowcol-grid-one-block-short", "small_fc_lopt_cuda.cu",
             "LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.offset[c.count], kWarps)), kThreads, "
             "0,\n                    s, rowcol_kernel)",
             "LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.offset[c.count], kWarps) - 1), "
             "kThreads, 0,\n                    s, rowcol_kernel)",
             (r"^FAIL SmallFCLOpt float32: max", r"state /state/15/v_col",
              r"state /state/19/v_col")),
    # Row and column of the factored statistics swapped in the kernels' per-element state: the
    # factored tensors read the wrong entries (past v_row's end: guard NaN); the unfactored
    # ones (param 1, a vector) are unaffected.
    Mutation("factored-row-column-swapped", "multi_tensor_cuda.cuh",
             "factored_indices(t.ix, i, &r, &c, &q);",
             "factored_indices(t.ix, i, &c, &r, &q);",
             (r"^FAIL SmallFCLOpt float32: max", r"param 0 \(130, 70\): inf ulps"),
             absent=(r"param 1 \(9001,\)",)),
    # The per-tensor sums of squares written one float too far: the guard after the buffer
    # changes, and the op names it.
    Mutation("sumsq-index-one-too-far", "small_fc_lopt_cuda.cu",
             "  t.sumsq[f] = static_cast<float>(total);",
             "  t.sumsq[f + 1] = static_cast<float>(total);",
             (r"^FAIL SmallFCLOpt float32: the run raised RuntimeError: lopt_port emulated CUDA "
              r"accumulate: a kernel wrote past the end of sumsq of parameter 0 \(112 bytes\), "
              r"at byte offset 112$",)),
]

CSRC = os.path.join(ROOT, "csrc")
CHECK = os.path.join(ROOT, "tests", "emulated_check.py")
pytestmark = [needs_emulation, pytest.mark.emulated, pytest.mark.usefixtures("faults_on")]
#: The control that ``make quick`` runs (each takes 7 to 10 s: a build of the mutated kernels
#: and a run of the check).
QUICK = "rowcol-grid-one-block-short"


def run_check(kernel_dir: str) -> tuple[int, str, float]:
    """``tests/emulated_check.py --fail-fast kernel_dir`` in a new process with this one's
    environment and faults on; (exit status, output, seconds)."""
    env = dict(os.environ, LOPT_PORT_EMULATION_FAULTS="1")
    env.pop("LOPT_PORT_FUSED_BACKEND", None)
    start = time.perf_counter()
    # 900 s: in a fresh extension cache the first run also builds the CPU backend and both
    # bindings (minutes on two cores); a mutated run rebuilds only the .cu files (~10 s).
    result = subprocess.run([sys.executable, CHECK, "--fail-fast", kernel_dir], env=env,
                            capture_output=True, text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - start


def mutate(kernel_dir: str, m: Mutation) -> None:
    """Apply `m` to the copy of csrc/ in kernel_dir; fails the test if `m` is stale."""
    path = os.path.join(kernel_dir, m.file)
    with open(path) as f:
        text = f.read()
    count = text.count(m.old)
    assert count == 1, (f"mutation {m.name} is stale: its old text occurs {count} times in "
                        f"csrc/{m.file} (exactly once expected); update MUTATIONS")
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


@pytest.mark.parametrize("mutation", slow_except([None, *MUTATIONS],
                                                 lambda m: m is not None and m.name == QUICK),
                         ids=["unmutated", *(m.name for m in MUTATIONS)])
def test_mutation_controls(tmp_path, mutation):
    """On a copy of csrc/: unmutated, the emulated backend matches the CPU backend (exit 0);
    with each mutation the check fails (exit 1, not 2: it built) for the intended reason."""
    kernel_dir = str(tmp_path / "csrc")
    shutil.copytree(CSRC, kernel_dir)
    if mutation is not None:
        mutate(kernel_dir, mutation)
    code, output, seconds = run_check(kernel_dir)
    print(f"{mutation.name if mutation else 'unmutated'}: exit {code} in {seconds:.1f} s\n"
          f"{output}")
    if mutation is None:
        assert code == 0, output
        return
    assert code == 1, f"expected the check to fail (exit 1), got {code}:\n{output}"
    for pattern in mutation.expect:
        assert re.search(pattern, output, re.MULTILINE), (
            f"{mutation.name}: no match for {pattern!r} in\n{output}")
    for pattern in mutation.absent:
        assert not re.search(pattern, output, re.MULTILINE), (
            f"{mutation.name}: {pattern!r} should not match\n{output}")
