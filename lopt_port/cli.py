"""``lopt-port``: project utilities (``lopt-port build`` prebuilds the fused kernels)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from lopt_port import extension


def main(argv: Sequence[str] | None = None) -> int:
    """0 on success, 1 when the kernels cannot be built (the reason is printed)."""
    parser = argparse.ArgumentParser(prog="lopt-port")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or find in the cache) the fused-kernel extension")
    parser.parse_args(argv)
    start = time.monotonic()
    try:
        path = extension.load()
    except extension.ExtensionUnavailable as e:
        print(f"lopt-port: the fused kernels are unavailable: {e}", file=sys.stderr)
        return 1
    launchers = extension.cuda_launchers()
    cuda = (f"CUDA kernels linked ({', '.join(extension.cuda_archs())})" if launchers else
            "CPU only: nvcc not found (set CUDA_HOME)")
    print(f"fused kernels ready ({path}) in {time.monotonic() - start:.1f}s; {cuda}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
