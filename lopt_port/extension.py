"""Build (just in time, cached) and load the fused-kernel extension from ``csrc/``.

The extension registers ``torch.ops.lopt_port.*``: three multi-tensor ops per optimizer,
dispatched by device. It is built in two parts:

- when ``nvcc`` is found (``$CUDA_HOME/bin/nvcc``, else ``/usr/local/cuda/bin/nvcc``), the
  pure-CUDA kernels (``*.cu``, no torch headers) are compiled into one object for the
  architectures of ``LOPT_CUDA_ARCHS`` (default ``80;90``: sm_80 and sm_90 code plus
  compute_90 PTX) with warnings as errors; ``LOPT_NO_CUDA=1`` skips them;
- the C++ binding and CPU backend are built by ``torch.utils.cpp_extension.load`` (ninja)
  and linked with that object and the static CUDA runtime.

This works with the CPU-only torch wheel as well as a CUDA build (the binding reaches the
current stream and device guard through c10's device-generic interfaces). Builds are cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); the first build takes
about half a minute.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SOURCES = ("bind.cpp", "small_fc_lopt_cpu.cpp", "velo_cpu.cpp")
CUDA_SOURCES = ("small_fc_lopt_cuda.cu", "velo_cuda.cu")
HEADERS = ("small_fc_lopt_math.h", "small_fc_lopt_args.h", "small_fc_lopt_cpu.h",
           "small_fc_lopt_cuda.h", "cpu_lanes.h", "velo_cpu.h", "velo_cuda.h",
           "multi_tensor_cuda.cuh")
CUDA_LAUNCHERS = ("lopt_small_fc_reduce_cuda", "lopt_small_fc_accumulate_cuda",
                  "lopt_small_fc_apply_cuda", "lopt_small_fc_partials",
                  "lopt_velo_accumulate_cuda", "lopt_velo_apply_cuda", "lopt_velo_partials",
                  "lopt_cuda_error_string")
NAME = "lopt_port_kernels"


class ExtensionUnavailable(RuntimeError):
    """The fused kernels cannot be built or loaded here; the message says why."""


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` or ``/usr/local/cuda/bin/nvcc`` if executable, else ``None``."""
    if os.environ.get("LOPT_NO_CUDA") == "1":
        return None
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            nvcc = os.path.join(root, "bin", "nvcc")
            if os.access(nvcc, os.X_OK):
                return nvcc
    return None


def cuda_archs() -> list[str]:
    """Compute capabilities to compile for, e.g. ``["80", "90"]`` (``LOPT_CUDA_ARCHS``)."""
    raw = os.environ.get("LOPT_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ExtensionUnavailable(f"LOPT_CUDA_ARCHS must list compute capabilities like "
                                   f"'80;90', got {raw!r}")
    return archs


def nvcc_flags(archs: list[str]) -> list[str]:
    """nvcc flags: no contraction (the header's FMAs only), warnings are errors."""
    flags = ["-O3", "-std=c++17", "-fmad=false", "-Werror", "all-warnings",
             "-Xcompiler", "-fPIC,-Wall,-Werror", f"-I{CSRC}"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return [*flags, "-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _build_dir() -> str:
    from torch.utils.cpp_extension import _get_build_directory
    return _get_build_directory(NAME, verbose=False)


def _compile_cuda(nvcc: str) -> str:
    """Compile the CUDA sources into one object (cached by content and flags); its path."""
    flags = nvcc_flags(cuda_archs())
    digest = hashlib.sha256()
    for name in (*CUDA_SOURCES, *HEADERS):
        with open(os.path.join(CSRC, name), "rb") as f:
            digest.update(f.read())
    digest.update(" ".join([nvcc, *flags]).encode())
    out_dir = os.path.join(_build_dir(), "cuda")
    os.makedirs(out_dir, exist_ok=True)
    obj = os.path.join(out_dir, f"kernels_{digest.hexdigest()[:16]}.o")
    if os.path.isfile(obj):
        return obj
    objects = []
    for name in CUDA_SOURCES:
        target = os.path.join(out_dir, f"{name}.{os.getpid()}.o")
        result = subprocess.run([nvcc, *flags, "-c", os.path.join(CSRC, name), "-o", target],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ExtensionUnavailable(f"nvcc failed on {name}: "
                                       f"{(result.stderr or result.stdout).strip()[:2000]}")
        objects.append(target)
    tmp = f"{obj}.{os.getpid()}.tmp"
    # One relocatable object for the linker line (ld -r), renamed into place atomically.
    result = subprocess.run(["ld", "-r", "-o", tmp, *objects], capture_output=True, text=True)
    for o in objects:
        os.remove(o)
    if result.returncode != 0:
        raise ExtensionUnavailable(f"linking the CUDA objects failed: {result.stderr.strip()}")
    os.replace(tmp, obj)
    return obj


@functools.cache
def load() -> str:
    """Build if needed and load the extension; its path. Raises :class:`ExtensionUnavailable`."""
    missing = [s for s in (*SOURCES, *HEADERS) if not os.path.isfile(os.path.join(CSRC, s))]
    if missing:
        raise ExtensionUnavailable(f"kernel sources not found in {CSRC}: {missing}")
    from torch.utils import cpp_extension
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise ExtensionUnavailable("ninja is not installed (pip install ninja)") from None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise ExtensionUnavailable("no C++ compiler found (install g++ or set CXX)")
    # -march=native: the build is local and just in time. -ffp-contract=off: only the fused
    # multiply-adds the sources spell out (fmaf, FMA intrinsics), so the rounding is the
    # documented one. -fno-math-errno lets sqrt vectorize; it changes no result.
    cflags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
              "-Wall", "-Werror"]
    ldflags = ["-fopenmp"]
    nvcc = find_nvcc()
    if nvcc is not None:
        obj = _compile_cuda(nvcc)
        cuda_lib = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "lib64")
        cflags.append("-DLOPT_WITH_CUDA")
        ldflags += [obj, f"-L{cuda_lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    try:
        path = cpp_extension.load(
            name=NAME,
            sources=[os.path.join(CSRC, s) for s in SOURCES],
            extra_include_paths=[CSRC],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler missing or failing: report, never crash the caller
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first_error = next((ln for ln in lines if "error:" in ln), lines[-1])
        raise ExtensionUnavailable(f"building the fused kernels failed: "
                                   f"{first_error.strip()[:500]}") from None
    return str(path)


@functools.cache
def cuda_launchers() -> tuple[str, ...]:
    """The CUDA launcher symbols exported by the built extension (empty without nvcc)."""
    lib = ctypes.CDLL(load())
    return tuple(name for name in CUDA_LAUNCHERS if hasattr(lib, name))


def ops() -> object:
    """``torch.ops.lopt_port`` after loading the extension."""
    load()
    return torch.ops.lopt_port
