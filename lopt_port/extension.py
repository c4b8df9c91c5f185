"""Build (just in time, cached by ninja) and load the fused-kernel extension from ``csrc/``.

The extension registers ``torch.ops.lopt_port.*``. Building needs a C++ compiler and ninja;
the first build takes about half a minute, later imports reuse the cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import functools
import os

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SOURCES = ("bind.cpp", "small_fc_lopt_cpu.cpp")


class ExtensionUnavailable(RuntimeError):
    """The fused kernels cannot be built or loaded here; the message says why."""


@functools.cache
def load() -> object:
    """Build if needed and load the extension; raises :class:`ExtensionUnavailable`."""
    missing = [s for s in SOURCES if not os.path.isfile(os.path.join(CSRC, s))]
    if missing:
        raise ExtensionUnavailable(f"kernel sources not found in {CSRC}: {missing}")
    from torch.utils import cpp_extension
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise ExtensionUnavailable("ninja is not installed (pip install ninja)") from None
    try:
        return cpp_extension.load(
            name="lopt_port_kernels",
            sources=[os.path.join(CSRC, s) for s in SOURCES],
            extra_include_paths=[CSRC],
            # -march=native: the build is local and just in time. -ffp-contract=off: only
            # the fused multiply-adds the sources spell out (fmaf, FMA intrinsics), so the
            # rounding is the documented one.
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-Wall",
                          "-Werror"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler missing or failing: report, never crash the caller
        raise ExtensionUnavailable(f"building the fused kernels failed: "
                                   f"{str(e).strip().splitlines()[-1][:300]}") from None


def ops() -> object:
    """``torch.ops.lopt_port`` after loading the extension."""
    load()
    return torch.ops.lopt_port
