"""Build (just in time, cached) and load the fused-kernel extension from ``csrc/``.

The extension registers ``torch.ops.lopt_port.*``: one multi-tensor op per fused phase
(small_fc_lopt three, VeLO two, and ``factored_sums`` for sharded parameters), dispatched by
device. It is built in two parts:

- when ``nvcc`` is found (``$CUDA_HOME/bin/nvcc``, else ``/usr/local/cuda/bin/nvcc``), the
  pure-CUDA kernels (``*.cu``, no torch headers) are compiled into one object for the
  architectures of ``LOPT_CUDA_ARCHS`` (default ``80;90``: sm_80 and sm_90 code plus
  compute_90 PTX) with warnings as errors; ``LOPT_NO_CUDA=1`` skips them;
- the C++ binding and CPU backend are built by ``torch.utils.cpp_extension.load`` (ninja)
  and linked with that object and the static CUDA runtime.

This works with the CPU-only torch wheel as well as a CUDA build (the binding reaches the
current stream and device guard through c10's device-generic interfaces). Builds are cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). The first build takes
about 3 minutes on a 2-core machine (:data:`EXPECTED_BUILD_S`); it prints its steps to stderr
(:class:`BuildReport`; ``LOPT_PORT_QUIET_BUILD=1`` silences them), a load from the cache
prints nothing.

**The CPU instruction set** (:func:`cpu_isa`): the CPU backend is compiled for one x86-64
level, ``LOPT_CPU_ISA`` = ``auto`` (default: the best this CPU runs), ``avx512``
(x86-64-v4: the 16 lanes in one AVX-512 register), ``avx2`` (x86-64-v3) or ``generic``
(x86-64). Each level is a build of its own (the extension's name ends with it), so a cache
shared by machines never hands one a library for instructions it lacks, and a level this CPU
lacks is refused (:class:`ExtensionUnavailable`: the eager path runs) instead of crashing. The
lane count (16) and every sum's order (``csrc/reduction_order.h``) are the same at every
level, so are the results, bit for bit.

**The emulated CUDA backend** (:func:`load_emulated`) is a second extension, built only when
first selected: the very ``*.cu`` sources compiled by the host C++ compiler against
``csrc/cuda_emulation/cuda_runtime.h`` (threads as fibers, barriers, warp shuffles, launch
limits, shuffled thread order and NaN-filled shared memory), linked with the binding built a
second time as ``torch.ops.lopt_port_emulated``, whose ops take CPU tensors and run the CUDA
launchers on guarded copies of every buffer. ``LOPT_PORT_FUSED_BACKEND`` picks what fused
steps on CPU tensors run (:func:`fused_backend`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SOURCES = ("bind.cpp", "small_fc_lopt_cpu.cpp", "velo_cpu.cpp")
CUDA_SOURCES = ("small_fc_lopt_cuda.cu", "velo_cuda.cu")
HEADERS = ("scalar_math.h", "factored_index.h", "reduction_order.h", "small_fc_lopt_math.h",
           "velo_math.h", "tensor_args.h", "small_fc_lopt_cpu.h", "small_fc_lopt_cuda.h",
           "cpu_lanes.h", "velo_cpu.h", "velo_cuda.h", "multi_tensor_cuda.cuh")
CUDA_LAUNCHERS = ("lopt_factored_sums_cuda", "lopt_small_fc_reduce_cuda",
                  "lopt_small_fc_accumulate_cuda",
                  "lopt_small_fc_apply_cuda", "lopt_small_fc_partials",
                  "lopt_velo_accumulate_cuda", "lopt_velo_apply_cuda", "lopt_velo_partials",
                  "lopt_cuda_error_string")
#: The extension's name; each build's name ends with its CPU level (:func:`binding_name`),
#: and the nvcc objects are cached in this name's build folder.
NAME = "lopt_port_kernels"
EMULATION_SOURCES = ("emulator.cpp",)
EMULATION_HEADERS = ("cuda_runtime.h", "device_memory.h")
EMULATED_NAME = "lopt_port_kernels_emulated"
#: Values of ``LOPT_PORT_FUSED_BACKEND``: ``auto`` (CPU tensors take the CPU backend, CUDA
#: tensors the CUDA kernels), ``cpu`` (CPU tensors only, the CPU backend) and
#: ``cuda-emulated`` (CPU tensors only, the CUDA kernels under emulation).
BACKENDS = ("auto", "cpu", "cuda-emulated")
#: Values of ``LOPT_CPU_ISA`` (:func:`cpu_isa`).
CPU_ISAS = ("auto", "avx512", "avx2", "generic")
# The /proc/cpuinfo flags of the x86-64 levels: v2 (SSE3 is ``pni``), v3 (AVX2, FMA, BMI1/2,
# F16C, LZCNT is ``abm``, MOVBE, XSAVE) and v4 (AVX-512 F, BW, CD, DQ, VL).
_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
#: Each x86-64 level of ``LOPT_CPU_ISA``, best first: its ``-march`` and the CPU flags it needs.
X86_LEVELS = {"avx512": ("x86-64-v4", _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq",
                                            "avx512vl"}),
              "avx2": ("x86-64-v3", _V3),
              "generic": ("x86-64", frozenset())}
#: A first build's time, measured on this project's 2-core machine (x86-64 with AVX-512,
#: g++ 12, nvcc 13; one other job running), in seconds: the default extension with the CUDA
#: kernels (173 s: nvcc 20 s, then velo_cpu.cpp 153 s) and the emulated CUDA backend
#: (:func:`load_emulated`, 16 s). Printed as the expected time.
EXPECTED_BUILD_S = {"kernels": 170, "emulated": 20}
#: Seconds each extension took to build in this process, by name; a loaded cached build is
#: absent (what ``lopt-port build`` reports).
BUILD_TIMES: dict[str, float] = {}


class ExtensionUnavailable(RuntimeError):
    """The fused kernels cannot be built or loaded here; the message says why."""


def emit(line: str) -> None:
    """Print one build progress line to stderr, ``lopt-port: line`` (seen by default in a
    script, a terminal and a notebook), unless ``LOPT_PORT_QUIET_BUILD=1``."""
    if os.environ.get("LOPT_PORT_QUIET_BUILD") != "1":
        print(f"lopt-port: {line}", file=sys.stderr, flush=True)


class BuildReport:
    """The progress lines of one extension's build (:func:`emit`): at its first compile step a
    header (what is built, the expected time, the cache folder, the quiet switch), then one
    line per step, and at the end the time taken. A build whose every part comes from the
    cache prints nothing."""

    def __init__(self, what: str, expected_s: int, cache_dir: str, name: str) -> None:
        self.what, self.expected_s, self.cache_dir, self.name = what, expected_s, cache_dir, name
        self.start: float | None = None

    def step(self, message: str) -> None:
        """Report one compile step (the header first, at the first step)."""
        if self.start is None:
            self.start = time.monotonic()
            emit(f"building {self.what}, once (about {self.expected_s} s on 2 cores; "
                 f"cached in {self.cache_dir}; LOPT_PORT_QUIET_BUILD=1 hides these lines)")
        emit(message)

    def done(self) -> None:
        """Report the time taken, if anything was built, and record it in :data:`BUILD_TIMES`."""
        if self.start is not None:
            BUILD_TIMES[self.name] = time.monotonic() - self.start
            emit(f"{self.what} built in {BUILD_TIMES[self.name]:.0f} s")


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def host_cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (the ``flags`` line of ``/proc/cpuinfo``); ``None`` where that
    cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def host_isa() -> str:
    """The best level of :data:`X86_LEVELS` this CPU runs; ``native`` on a CPU that is not
    x86-64 (built with ``-march=native``). Without ``/proc/cpuinfo``, torch's own detection
    (``torch.backends.cpu.get_cpu_capability``)."""
    if not _is_x86_64():
        return "native"
    flags = host_cpu_flags()
    if flags is None:
        capability = torch.backends.cpu.get_cpu_capability()
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "generic")
    return next(isa for isa, (_, needs) in X86_LEVELS.items() if needs <= flags)


def cpu_isa() -> str:
    """The level the CPU code is built for: ``LOPT_CPU_ISA`` (:data:`CPU_ISAS`; default
    ``auto``, :func:`host_isa`). Raises :class:`ExtensionUnavailable` for an unknown value or a
    level this CPU cannot run: such a library would stop the process with an illegal
    instruction."""
    value = os.environ.get("LOPT_CPU_ISA", "auto")
    if value not in CPU_ISAS:
        raise ExtensionUnavailable(f"LOPT_CPU_ISA must be one of {', '.join(CPU_ISAS)}; "
                                   f"got {value!r}")
    host = host_isa()
    if value == "auto" or value == host:
        return host
    if host == "native":
        if value == "generic":
            return value
        raise ExtensionUnavailable(f"LOPT_CPU_ISA={value} is an x86-64 level; this CPU is "
                                   f"{platform.machine()} (use auto or generic)")
    levels = list(X86_LEVELS)
    if levels.index(value) < levels.index(host):
        raise ExtensionUnavailable(f"LOPT_CPU_ISA={value}: this CPU runs {host} at most; a "
                                   f"{value} build would crash on an illegal instruction")
    return value


def lower_isa() -> str | None:
    """``avx2`` on a CPU with AVX-512: what a CPU without AVX-512 runs (``lopt-port build
    --lower-level`` builds it beside the default build, ``tests/test_build.py`` compares its
    results); ``None`` on other CPUs (below ``avx2`` is ``generic``, whose 16-float arrays
    took GCC 12 about 9 CPU minutes to compile: built only when asked for)."""
    return "avx2" if host_isa() == "avx512" else None


#: At ``avx512``: GCC's own vectorized loops (``omp simd``: loads, features, state updates, the
#: step) in the 16-float registers the intrinsics use, not the 256-bit halves its tuning for
#: recent Xeons prefers.
WIDE_VECTORS = ("-mprefer-vector-width=512",)
#: At ``avx512``, where the compiler takes them (GCC 12 and later): its inline copies of the
#: 64-byte lane arrays in whole registers too. Copied in 32-byte halves, a lane array read back
#: at once straight after cannot take its value from the two stores in flight, and the read
#: stalls until they reach the cache.
WIDE_MOVES = ("-mmove-max=512", "-mstore-max=512")


@functools.cache
def _compiler_accepts(cxx: str, flags: tuple[str, ...]) -> bool:
    done = subprocess.run([cxx, *flags, "-fsyntax-only", "-x", "c++", os.devnull],
                          capture_output=True)
    return done.returncode == 0


def compiler_accepts(flags: tuple[str, ...]) -> bool:
    """Whether the host C++ compiler (``CXX``, default ``c++``) compiles an empty file with
    ``flags``; ``False`` without a compiler."""
    try:
        cxx = _host_compiler()
    except ExtensionUnavailable:
        return False
    return _compiler_accepts(cxx, flags)


def isa_flags(isa: str) -> list[str]:
    """The compiler flags of level ``isa`` (:func:`cpu_isa`): its ``-march`` and, on x86-64,
    ``-mtune=native`` (tuning picks no instruction); at ``avx512`` also :data:`WIDE_VECTORS`
    and, where the compiler takes them, :data:`WIDE_MOVES`. Neither changes a result (lanes
    are independent; a copy is a copy); together they make VeLO's fused step on GPT-2 small
    shapes about 20% faster on one thread (docs/kernels.md)."""
    if isa == "native":
        return ["-march=native"]
    if not _is_x86_64():
        return []
    flags = [f"-march={X86_LEVELS[isa][0]}", "-mtune=native"]
    if isa == "avx512":
        flags += [*WIDE_VECTORS, *(WIDE_MOVES if compiler_accepts(WIDE_MOVES) else ())]
    return flags


def binding_name(isa: str, base: str = NAME) -> str:
    """The extension's name for level ``isa``, e.g. ``lopt_port_kernels_avx512``."""
    return f"{base}_{isa}"


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


def emulation_flags(isa: str, kernel_dir: str = CSRC) -> list[str]:
    """Host compiler flags of the emulated CUDA backend: the ``.cu`` files compile as C++ with
    ``cuda_emulation/`` first on the include path (its ``cuda_runtime.h``), and, as the CPU
    backend, no floating-point contraction (the header's FMAs only) and level ``isa``'s
    instructions. ``LOPT_CUDA_EMULATION`` is defined before any header (``cuda_runtime.h``
    defines it too, but the kernels' own headers come first)."""
    return ["-O2", *isa_flags(isa), "-std=c++17", "-fPIC", "-ffp-contract=off",
            "-fno-math-errno", "-Wall", "-Werror", "-DLOPT_CUDA_EMULATION=1",
            f"-I{os.path.join(kernel_dir, 'cuda_emulation')}", f"-I{kernel_dir}", f"-I{CSRC}"]


def _build_dir(name: str = NAME) -> str:
    from torch.utils.cpp_extension import _get_build_directory
    return _get_build_directory(name, verbose=False)


def _compile_objects(compiler: list[str], sources: list[str], hashed: list[str],
                     out_dir: str, what: str, report: BuildReport) -> str:
    """Compile ``sources`` with ``compiler`` (the command and its flags, ``-c`` appended)
    into one relocatable object, cached under ``out_dir`` by the content of ``hashed`` files
    and the command; its path. Each source compiled is a step of ``report``."""
    digest = hashlib.sha256()
    for path in hashed:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(compiler).encode())
    os.makedirs(out_dir, exist_ok=True)
    obj = os.path.join(out_dir, f"kernels_{digest.hexdigest()[:16]}.o")
    if os.path.isfile(obj):
        return obj
    objects = []
    for i, source in enumerate(sources, 1):
        report.step(f"[{i}/{len(sources)}] {what}: {os.path.basename(source)}")
        target = os.path.join(out_dir, f"{os.path.basename(source)}.{os.getpid()}.o")
        result = subprocess.run([*compiler, "-c", source, "-o", target],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ExtensionUnavailable(f"{what} failed on {os.path.basename(source)}: "
                                       f"{(result.stderr or result.stdout).strip()[:2000]}")
        objects.append(target)
    tmp = f"{obj}.{os.getpid()}.tmp"
    # One relocatable object for the linker line (ld -r), renamed into place atomically.
    result = subprocess.run(["ld", "-r", "-o", tmp, *objects], capture_output=True, text=True)
    for o in objects:
        os.remove(o)
    if result.returncode != 0:
        raise ExtensionUnavailable(f"linking the {what} objects failed: {result.stderr.strip()}")
    os.replace(tmp, obj)
    return obj


def _compile_cuda(nvcc: str, report: BuildReport) -> str:
    """Compile the CUDA sources into one object (cached by content and flags); its path."""
    archs = cuda_archs()
    return _compile_objects(
        [nvcc, *nvcc_flags(archs)], [os.path.join(CSRC, n) for n in CUDA_SOURCES],
        [os.path.join(CSRC, n) for n in (*CUDA_SOURCES, *HEADERS)],
        os.path.join(_build_dir(), "cuda"), f"CUDA kernels (nvcc, sm_{', sm_'.join(archs)})",
        report)


def _host_compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionUnavailable("no C++ compiler found (install g++ or set CXX)")
    return cxx


def _check_toolchain() -> None:
    from torch.utils import cpp_extension
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise ExtensionUnavailable("ninja is not installed (pip install ninja)") from None
    _host_compiler()


def binding_is_built(build_dir: str, name: str, cflags: list[str], ldflags: list[str]) -> bool:
    """Whether ``cpp_extension.load`` will find the binding ``name`` built and up to date in
    ``build_dir``: its library and ``build.ninja`` exist, the ninja file holds these flags,
    and ninja's dry run (``ninja -n``: sources, headers by their depfiles, commands) has no
    work to do. Decides whether the build is reported; it builds nothing."""
    ninja_file = os.path.join(build_dir, "build.ninja")
    if not (os.path.isfile(ninja_file) and os.path.isfile(os.path.join(build_dir, f"{name}.so"))):
        return False
    with open(ninja_file) as f:
        text = f.read()
    if " ".join(cflags) not in text or " ".join(ldflags) not in text:
        return False
    dry = subprocess.run(["ninja", "-n", "-C", build_dir], capture_output=True, text=True)
    return dry.returncode == 0 and "no work to do" in dry.stdout


def _load_binding(name: str, cflags: list[str], ldflags: list[str], sources: list[str],
                  report: BuildReport, what: str) -> str:
    """Build (ninja, cached) and load a binding extension; its path. The build, if any, is one
    step of ``report``."""
    from torch.utils import cpp_extension
    if not binding_is_built(_build_dir(name), name, cflags, ldflags):
        report.step(f"{what}: {', '.join(sources)} (ninja)")
    try:
        path = cpp_extension.load(
            name=name,
            sources=[os.path.join(CSRC, s) for s in sources],
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
def load() -> str:
    """Build if needed and load the extension; its path. Raises :class:`ExtensionUnavailable`."""
    missing = [s for s in (*SOURCES, *HEADERS) if not os.path.isfile(os.path.join(CSRC, s))]
    if missing:
        raise ExtensionUnavailable(f"kernel sources not found in {CSRC}: {missing}")
    _check_toolchain()
    isa = cpu_isa()
    name = binding_name(isa)
    # Level isa's instructions (cpu_isa). -ffp-contract=off: only the fused multiply-adds the
    # sources spell out (fmaf, FMA intrinsics), so the rounding is the documented one.
    # -fno-math-errno lets sqrt vectorize; it changes no result.
    cflags = ["-O3", *isa_flags(isa), "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
              "-Wall", "-Werror"]
    ldflags = ["-fopenmp"]
    report = BuildReport("the fused kernels", EXPECTED_BUILD_S["kernels"], _build_dir(name),
                         name)
    nvcc = find_nvcc()
    if nvcc is not None:
        obj = _compile_cuda(nvcc, report)
        cuda_lib = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "lib64")
        cflags.append("-DLOPT_WITH_CUDA")
        ldflags += [obj, f"-L{cuda_lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    path = _load_binding(name, cflags, ldflags, list(SOURCES), report,
                         f"C++ binding and CPU backend ({isa})")
    report.done()
    return path


_emulated: dict[str, str] = {}


def load_emulated(kernel_dir: str | None = None) -> str:
    """Build if needed and load the emulated CUDA backend; its path.

    ``kernel_dir`` (default ``csrc/``) holds the ``.cu`` sources and ``cuda_emulation/``
    to compile (the mutation tests point it at a mutated copy; the binding and the headers it
    shares with the CPU backend always come from ``csrc/``). One emulated backend per process:
    without ``kernel_dir``, the one loaded (else ``csrc/``'s); asking for a second
    ``kernel_dir`` raises :class:`ExtensionUnavailable`.
    """
    if _emulated and kernel_dir is None:
        return _emulated["path"]
    kernel_dir = os.path.abspath(kernel_dir or CSRC)
    if _emulated:
        if _emulated["kernel_dir"] != kernel_dir:
            raise ExtensionUnavailable(f"the emulated backend of {_emulated['kernel_dir']} is "
                                       f"loaded; one per process")
        return _emulated["path"]
    emu_dir = os.path.join(kernel_dir, "cuda_emulation")
    sources = [os.path.join(kernel_dir, n) for n in CUDA_SOURCES]
    sources += [os.path.join(emu_dir, n) for n in EMULATION_SOURCES]
    headers = [os.path.join(kernel_dir, n) for n in HEADERS]
    headers += [os.path.join(emu_dir, n) for n in EMULATION_HEADERS]
    missing = [p for p in (*sources, *headers) if not os.path.isfile(p)]
    if missing:
        raise ExtensionUnavailable(f"kernel sources not found: {missing}")
    _check_toolchain()
    isa = cpu_isa()
    name = binding_name(isa, EMULATED_NAME)
    build_dir = _build_dir(name)
    report = BuildReport("the emulated CUDA backend", EXPECTED_BUILD_S["emulated"], build_dir,
                         name)
    obj = _compile_objects([_host_compiler(), "-x", "c++", *emulation_flags(isa, kernel_dir)],
                           sources, [*sources, *headers], os.path.join(build_dir, "emu"),
                           "CUDA kernels under emulation (c++)", report)
    path = _load_binding(name, ["-O2", "-DLOPT_WITH_CUDA", "-DLOPT_CUDA_EMULATION", "-Wall",
                                "-Werror"], [obj], ["bind.cpp"], report,
                         "C++ binding of the emulated backend")
    report.done()
    _emulated.update(kernel_dir=kernel_dir, path=path)
    return path
def fused_backend() -> str:
    """``LOPT_PORT_FUSED_BACKEND`` (default ``auto``), one of :data:`BACKENDS`."""
    value = os.environ.get("LOPT_PORT_FUSED_BACKEND", "auto")
    if value not in BACKENDS:
        raise ExtensionUnavailable(f"LOPT_PORT_FUSED_BACKEND must be one of "
                                   f"{', '.join(BACKENDS)}; got {value!r}")
    return value


def load_backend() -> str:
    """Build if needed and load the extension of the selected backend; its path."""
    return load_emulated() if fused_backend() == "cuda-emulated" else load()


def backend_unsupported_reason(device: torch.device) -> str | None:
    """Why the selected backend cannot run fused steps on ``device`` (``None`` if it can)."""
    backend = fused_backend()
    if device.type == "cuda":
        if backend != "auto":
            return (f"LOPT_PORT_FUSED_BACKEND={backend} runs fused steps on CPU tensors only; "
                    f"the parameters are on {device}")
        if not cuda_launchers():
            return "the fused kernels were built without CUDA (nvcc was not found)"
        return None
    if device.type != "cpu":
        return f"no fused kernel for device {device.type}"
    return None


@functools.cache
def cuda_launchers() -> tuple[str, ...]:
    """The CUDA launcher symbols exported by the built extension (empty without nvcc)."""
    lib = ctypes.CDLL(load())
    return tuple(name for name in CUDA_LAUNCHERS if hasattr(lib, name))


def ops() -> object:
    """The fused ops of the selected backend, after loading its extension:
    ``torch.ops.lopt_port`` or, with ``LOPT_PORT_FUSED_BACKEND=cuda-emulated``,
    ``torch.ops.lopt_port_emulated`` (same schemas; CPU tensors run the CUDA kernels)."""
    if fused_backend() == "cuda-emulated":
        load_emulated()
        return torch.ops.lopt_port_emulated
    load()
    return torch.ops.lopt_port
