"""Check that the fused-kernel extension builds and imports against the CUDA build of torch.

A GPU user installs torch's CUDA build, not the CPU wheel the main venv pins. This script runs
inside such a venv (``make check-cuda-torch`` creates ``.venv-cuda`` and runs it there) and
does what a user's first fused step does, on a machine without a GPU:

1. checks that torch is a CUDA build (``torch.version.cuda``) and prints its versions;
2. builds the extension with :func:`lopt_port.extension.load` (nvcc compiles the ``.cu``
   kernels, ``cpp_extension.load`` the binding) in a build folder of its own inside the venv,
   so that the CPU torch's cached build is never overwritten;
3. checks that every ``torch.ops.lopt_port`` op has a CPU and a CUDA kernel registered and
   that the CUDA launchers are linked (:func:`lopt_port.extension.cuda_launchers`).

Nothing runs on a device. Any failure prints the reason and exits 1::

    .venv-cuda/bin/python scripts/check_cuda_torch_build.py
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The ops the binding registers (csrc/bind.cpp); each needs a CPU and a CUDA kernel.
EXPECTED_OPS = ("factored_sums", "small_fc_reduce", "small_fc_accumulate", "small_fc_apply",
                "velo_accumulate", "velo_apply")


class CheckFailed(RuntimeError):
    """One of the checks failed; the message says which and why."""


def registered_ops(namespace: str = "lopt_port") -> list[str]:
    """Names of the ops registered under ``namespace`` (without the namespace)."""
    import torch
    prefix = f"{namespace}::"
    return sorted(name[len(prefix):] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith(prefix))


def check(build_dir: str) -> list[str]:
    """Run every check; the lines of a summary. Raises :class:`CheckFailed`."""
    os.environ["TORCH_EXTENSIONS_DIR"] = build_dir
    sys.path.insert(0, ROOT)
    import torch

    import lopt_port
    from lopt_port import extension

    lines = [f"python {sys.version.split()[0]} at {sys.prefix}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"archs {','.join(torch.cuda.get_arch_list()) or '-'}, "
             f"GPU available: {torch.cuda.is_available()}"]
    if torch.version.cuda is None:
        raise CheckFailed(f"torch {torch.__version__} is a CPU build (torch.version.cuda is "
                          f"None); this check needs torch's CUDA build")
    package_dir = os.path.dirname(os.path.abspath(lopt_port.__file__))
    if os.path.dirname(package_dir) != ROOT:
        raise CheckFailed(f"lopt_port was imported from {package_dir}, not from {ROOT}")
    nvcc = extension.find_nvcc()
    if nvcc is None:
        raise CheckFailed("nvcc not found ($CUDA_HOME/bin/nvcc or /usr/local/cuda/bin/nvcc): "
                          "the extension would build without its CUDA kernels")
    lines.append(f"nvcc {nvcc}, archs {';'.join(extension.cuda_archs())}; "
                 f"build folder {build_dir}")

    start = time.monotonic()
    try:
        path = extension.load()
    except extension.ExtensionUnavailable as e:
        raise CheckFailed(f"building or loading the extension failed: {e}") from None
    lines.append(f"extension.load() {time.monotonic() - start:.1f}s: {path}")

    ops = registered_ops()
    missing = sorted(set(EXPECTED_OPS) - set(ops))
    if missing:
        raise CheckFailed(f"ops not registered: {missing} (registered: {ops})")
    for op in ops:
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lopt_port::{op}", key):
                raise CheckFailed(f"lopt_port::{op} has no {key} kernel")
        getattr(torch.ops.lopt_port, op)  # resolvable from Python
    lines.append(f"ops with CPU and CUDA kernels: {', '.join(ops)}")

    launchers = extension.cuda_launchers()
    absent = sorted(set(extension.CUDA_LAUNCHERS) - set(launchers))
    if absent:
        raise CheckFailed(f"CUDA launchers not linked into {path}: {absent}")
    lines.append(f"CUDA launchers linked: {len(launchers)} ({', '.join(launchers)})")
    return lines


def main() -> int:
    """0: every check passed; 1: one failed (the reason is printed)."""
    start = time.monotonic()
    build_dir = os.path.join(sys.prefix, "torch_extensions")
    try:
        lines = check(build_dir)
    except CheckFailed as e:
        print(f"check_cuda_torch_build: FAILED: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"check_cuda_torch_build: {line}")
    print(f"check_cuda_torch_build: passed in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
