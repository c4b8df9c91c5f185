"""``lopt-port``: project utilities (``lopt-port build`` prebuilds the fused kernels)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from lopt_port import extension


def _build_one(label: str, load: Callable[[], str], detail: Callable[[], str]) -> bool:
    """Build (or find in the cache) one extension with ``load`` and print one line: what it
    is (``label``, ``detail()``), whether it was built or loaded from the cache, the time, its
    path. False, with the reason on stderr, when it cannot be built."""
    start = time.monotonic()
    before = set(extension.BUILD_TIMES)
    try:
        path = load()
    except extension.ExtensionUnavailable as e:
        print(f"lopt-port: cannot build the {label}: {e}", file=sys.stderr)
        return False
    how = "built" if set(extension.BUILD_TIMES) - before else "loaded from the cache"
    print(f"{label} ({detail()}) {how} in {time.monotonic() - start:.1f}s: {path}")
    return True


def _kernels_detail() -> str:
    cuda = (f"CUDA kernels linked (sm_{', sm_'.join(extension.cuda_archs())})"
            if extension.cuda_launchers() else "CPU only: nvcc not found (set CUDA_HOME)")
    return f"CPU backend for {extension.cpu_isa()}; {cuda}"


def main(argv: Sequence[str] | None = None) -> int:
    """0 on success, 1 when the kernels cannot be built (the reason is printed)."""
    parser = argparse.ArgumentParser(prog="lopt-port")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find in the cache) the fused-kernel extension")
    build.add_argument("--emulated", action="store_true",
                       help="also build the emulated CUDA backend (LOPT_PORT_FUSED_BACKEND="
                            "cuda-emulated; what `make test` runs)")
    build.add_argument("--lower-level", action="store_true",
                       help="on an AVX-512 CPU, also build the CPU backend without AVX-512 "
                            "(LOPT_CPU_ISA=avx2, what other CPUs run), in a second "
                            "process at the same time: ninja leaves a core idle during most of "
                            "a build (tests/test_build.py compares the two bit for bit)")
    args = parser.parse_args(argv)
    lower = extension.lower_isa() if args.lower_level else None
    second = None
    if lower is not None:
        second = subprocess.Popen([sys.executable, "-m", "lopt_port.cli", "build"],
                                  env={**os.environ, "LOPT_CPU_ISA": lower})
    ok = _build_one("fused kernels", extension.load, _kernels_detail)
    if args.emulated:
        ok &= _build_one("emulated CUDA backend", extension.load_emulated,
                         lambda: f"host code for {extension.cpu_isa()}")
    if second is not None:
        ok &= second.wait() == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
