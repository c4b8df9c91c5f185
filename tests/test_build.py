"""Building the fused kernels: the progress lines of a first build and the silence of a cached
load, the quiet switch, ``lopt-port build``, and the CPU instruction set (``LOPT_CPU_ISA``):
its choice, the refusal of a level the CPU lacks, and identical bits at another level."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lopt_port import SmallFCLOpt, VeLO, cli, extension
from parity.tasks import make_task
from tests.conftest import ROOT, _weights, checkpoint_dir

CXX = os.environ.get("CXX", "c++")
needs_cxx = pytest.mark.skipif(shutil.which(CXX) is None, reason="no C++ compiler")
needs_ninja = pytest.mark.skipif(shutil.which("ninja") is None, reason="ninja not installed")

# The /proc/cpuinfo flags of a CPU at each x86-64 level (the host's own are not used).
AVX512_HOST = extension.X86_LEVELS["avx512"][1] | {"avx512_fp16"}
AVX2_HOST = extension.X86_LEVELS["avx2"][1]


@pytest.fixture
def loud(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress lines on, whatever the caller's environment."""
    monkeypatch.delenv("LOPT_PORT_QUIET_BUILD", raising=False)


def _sources(folder, count: int, body: str = "") -> list[str]:
    paths = []
    for i in range(count):
        path = folder / f"part{i}.cpp"
        path.write_text(f"int part{i}() {{ return {i}; }}\n{body}")
        paths.append(str(path))
    return paths


@needs_cxx
def test_first_build_reports_each_source_then_a_cached_one_nothing(tmp_path, capsys, loud):
    """The build's header (the expected time, the cache folder, the quiet switch), one line per
    source compiled, the time taken; then the same build from the cache prints nothing."""
    sources = _sources(tmp_path, 2)
    out_dir = str(tmp_path / "objects")

    def build() -> str:
        report = extension.BuildReport("the test kernels", 42, out_dir, "test_kernels")
        obj = extension._compile_objects([CXX, "-fPIC"], sources, sources, out_dir,
                                         "test sources (c++)", report)
        report.done()
        return obj

    obj = build()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (f"lopt-port: building the test kernels, once (about 42 s on 2 cores; "
                        f"cached in {out_dir}; LOPT_PORT_QUIET_BUILD=1 hides these lines)")
    assert lines[1:3] == ["lopt-port: [1/2] test sources (c++): part0.cpp",
                          "lopt-port: [2/2] test sources (c++): part1.cpp"]
    assert lines[3].startswith("lopt-port: the test kernels built in ")
    assert len(lines) == 4
    assert os.path.isfile(obj)
    assert "test_kernels" in extension.BUILD_TIMES
    del extension.BUILD_TIMES["test_kernels"]
    assert build() == obj
    assert capsys.readouterr().err == ""
    assert "test_kernels" not in extension.BUILD_TIMES


@needs_cxx
def test_quiet_build_prints_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOPT_PORT_QUIET_BUILD", "1")
    sources = _sources(tmp_path, 1)
    report = extension.BuildReport("the test kernels", 1, str(tmp_path), "quiet_kernels")
    obj = extension._compile_objects([CXX, "-fPIC"], sources, sources, str(tmp_path / "o"),
                                     "test sources (c++)", report)
    report.done()
    assert os.path.isfile(obj)
    assert capsys.readouterr().err == ""
    assert extension.BUILD_TIMES.pop("quiet_kernels") >= 0.0


@needs_cxx
def test_failed_compile_names_the_source(tmp_path, loud):
    sources = _sources(tmp_path, 1, body="this is not C++;\n")
    report = extension.BuildReport("the test kernels", 1, str(tmp_path), "broken_kernels")
    with pytest.raises(extension.ExtensionUnavailable, match=r"test sources failed on part0\.cpp"):
        extension._compile_objects([CXX, "-fPIC"], sources, sources, str(tmp_path / "o"),
                                   "test sources", report)


@needs_ninja
def test_binding_is_built_follows_ninja(tmp_path):
    """The binding counts as built only when its library exists, its ninja file holds the
    flags, and ninja has no work: a touched source or other flags mean a build (reported)."""
    source = tmp_path / "bind.cpp"
    source.write_text("one\n")
    (tmp_path / "build.ninja").write_text(textwrap.dedent("""\
        cflags = -O3 -march=x86-64-v3 -Wall
        ldflags = -shared -fopenmp
        rule copy
          command = cp $in $out
        build k.so: copy bind.cpp
        default k.so
        """))
    flags = (["-O3", "-march=x86-64-v3"], ["-fopenmp"])
    assert not extension.binding_is_built(str(tmp_path), "k", *flags)  # no library yet
    subprocess.run(["ninja", "-C", str(tmp_path)], check=True, capture_output=True)
    assert extension.binding_is_built(str(tmp_path), "k", *flags)
    assert not extension.binding_is_built(str(tmp_path), "k", ["-O3", "-march=native"],
                                          ["-fopenmp"])
    os.utime(source, (os.path.getmtime(source) + 10,) * 2)
    assert not extension.binding_is_built(str(tmp_path), "k", *flags)


def test_cached_load_prints_nothing(capsys, monkeypatch, loud):
    """Both extensions built (or cached) once, a second load of each, its build steps and all,
    prints nothing and records no build."""
    kernels, emulated = extension.load(), extension.load_emulated()
    capsys.readouterr()
    builds = dict(extension.BUILD_TIMES)
    assert extension.load.__wrapped__() == kernels
    monkeypatch.setattr(extension, "_emulated", {})
    assert extension.load_emulated() == emulated
    assert capsys.readouterr().err == ""
    assert builds == extension.BUILD_TIMES


def test_build_command_reports_what_and_how(capsys):
    extension.load()
    extension.load_emulated()
    assert cli.main(["build", "--emulated"]) == 0
    out = capsys.readouterr().out.splitlines()
    isa = extension.cpu_isa()
    assert out[0].startswith(f"fused kernels (CPU backend for {isa}; ")
    assert out[1].startswith(f"emulated CUDA backend (host code for {isa}) ")
    for line, name in zip(out, (extension.NAME, extension.EMULATED_NAME), strict=True):
        assert ") loaded from the cache in " in line
        assert line.endswith(f"{name}_{isa}.so")


@pytest.mark.slow
def test_build_command_builds_the_lower_level_beside(capfd):
    """``--lower-level`` builds the avx2 level on an AVX-512 CPU, in a second process (slow
    where it is not cached yet: one more build; ``make test`` builds it first)."""
    lower = extension.lower_isa()
    if lower is None:
        pytest.skip(f"{extension.cpu_isa()}: not an AVX-512 CPU")
    assert cli.main(["build", "--lower-level"]) == 0
    out = capfd.readouterr().out.splitlines()
    assert len(out) == 2
    assert any(line.startswith(f"fused kernels (CPU backend for {lower}; ") for line in out)
    assert any(line.endswith(f"{extension.binding_name(lower)}.so") for line in out)


def test_build_command_fails_with_the_reason(capsys, monkeypatch):
    def broken() -> str:
        raise extension.ExtensionUnavailable("no compiler (test)")

    monkeypatch.setattr(extension, "load", broken)
    assert cli.main(["build"]) == 1
    assert "cannot build the fused kernels: no compiler (test)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The CPU instruction set.


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU seen by extension.py: ``host(flags, machine)``; LOPT_CPU_ISA unset."""
    monkeypatch.delenv("LOPT_CPU_ISA", raising=False)

    def set_host(flags: frozenset[str] | None, machine: str = "x86_64") -> None:
        monkeypatch.setattr(extension, "host_cpu_flags", lambda: flags)
        monkeypatch.setattr(extension.platform, "machine", lambda: machine)

    return set_host


@pytest.mark.parametrize("flags, isa", [(AVX512_HOST, "avx512"), (AVX2_HOST, "avx2"),
                                        (AVX2_HOST - {"fma"}, "generic"),
                                        (frozenset({"sse2"}), "generic")])
def test_auto_takes_the_best_level_of_the_cpu(host, flags, isa):
    host(flags)
    assert extension.cpu_isa() == isa


def test_this_cpu(monkeypatch):
    """This machine's level is the best one whose flags its /proc/cpuinfo lists."""
    monkeypatch.delenv("LOPT_CPU_ISA", raising=False)
    flags = extension.host_cpu_flags()
    assert flags is not None
    isa = extension.cpu_isa()
    assert extension.X86_LEVELS[isa][1] <= flags
    better = list(extension.X86_LEVELS)[:list(extension.X86_LEVELS).index(isa)]
    assert all(not extension.X86_LEVELS[b][1] <= flags for b in better)


@pytest.mark.parametrize("capability, isa", [("AVX512", "avx512"), ("AVX2", "avx2"),
                                             ("DEFAULT", "generic")])
def test_without_proc_cpuinfo_torch_detects(host, monkeypatch, capability, isa):
    host(None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert extension.cpu_isa() == isa


@pytest.mark.parametrize("flags, lower", [(AVX512_HOST, "avx2"), (AVX2_HOST, None),
                                          (frozenset({"sse2"}), None)])
def test_the_level_below(host, flags, lower):
    host(flags)
    assert extension.lower_isa() == lower


def test_a_lower_level_is_taken(host, monkeypatch):
    host(AVX512_HOST)
    for isa in ("avx2", "generic", "avx512"):
        monkeypatch.setenv("LOPT_CPU_ISA", isa)
        assert extension.cpu_isa() == isa
    monkeypatch.setattr(extension, "compiler_accepts", lambda flags: True)
    assert extension.isa_flags("avx512") == ["-march=x86-64-v4", "-mtune=native",
                                            "-mprefer-vector-width=512", "-mmove-max=512",
                                            "-mstore-max=512"]
    assert extension.isa_flags("avx2") == ["-march=x86-64-v3", "-mtune=native"]
    assert extension.isa_flags("generic") == ["-march=x86-64", "-mtune=native"]
    assert extension.binding_name("avx2") == "lopt_port_kernels_avx2"


def test_wide_moves_only_where_the_compiler_takes_them(host, monkeypatch):
    """GCC before 12 and clang do not know -mmove-max / -mstore-max: the avx512 build then
    goes without them rather than failing."""
    host(AVX512_HOST)
    asked = []
    monkeypatch.setattr(extension, "compiler_accepts", lambda flags: asked.append(flags) or False)
    assert extension.isa_flags("avx512") == ["-march=x86-64-v4", "-mtune=native",
                                            "-mprefer-vector-width=512"]
    assert asked == [extension.WIDE_MOVES]


def test_the_compiler_probe_tells_flags_apart():
    """The probe compiles: a flag the compiler knows passes, an invented one does not."""
    assert extension.compiler_accepts(("-O2",))
    assert not extension.compiler_accepts(("-mno-such-option-lopt",))


def test_a_level_the_cpu_lacks_is_refused_before_building(host, monkeypatch):
    """An AVX-512 build on an AVX2 CPU would die on an illegal instruction: refused (the fused
    path falls back to eager), before anything is compiled."""
    host(AVX2_HOST)
    monkeypatch.setenv("LOPT_CPU_ISA", "avx512")
    with pytest.raises(extension.ExtensionUnavailable, match="runs avx2 at most"):
        extension.cpu_isa()

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled")

    monkeypatch.setattr(extension, "_compile_objects", no_compiling)
    monkeypatch.setattr(extension, "_load_binding", no_compiling)
    with pytest.raises(extension.ExtensionUnavailable, match="illegal instruction"):
        extension.load.__wrapped__()
    monkeypatch.setenv("LOPT_CPU_ISA", "avx-512")
    with pytest.raises(extension.ExtensionUnavailable, match="must be one of auto, avx512"):
        extension.cpu_isa()


def test_other_architectures_build_native_or_generic(host, monkeypatch):
    host(None, machine="aarch64")
    assert extension.cpu_isa() == "native"
    assert extension.lower_isa() is None
    assert extension.isa_flags("native") == ["-march=native"]
    monkeypatch.setenv("LOPT_CPU_ISA", "generic")
    assert extension.cpu_isa() == "generic"
    assert extension.isa_flags("generic") == []
    monkeypatch.setenv("LOPT_CPU_ISA", "avx2")
    with pytest.raises(extension.ExtensionUnavailable, match="x86-64 level; this CPU is aarch64"):
        extension.cpu_isa()


# Shapes of the cross-level run: factored of rank 2 and 3 along either axis, partial lane
# groups, a diagonal tensor of several reduction tiles, a scalar.
ISA_SHAPES = [(130, 70), (3, 50, 41), (9000,), (), (17, 3), (700, 20)]


def fused_run() -> dict[str, torch.Tensor]:
    """small_fc_lopt and VeLO, 4 fused steps each on a seeded task with float32 and bfloat16
    parameters: every parameter and state tensor afterwards, by name."""
    task = make_task(3, 4, ISA_SHAPES)
    small_fc = _weights(checkpoint_dir("small_fc_h32_sm0p01"))
    velo = _weights(checkpoint_dir("velo_small"))
    makers = {"small_fc_lopt": lambda ps: SmallFCLOpt(ps, small_fc, fused=True),
              "velo": lambda ps: VeLO(ps, velo, num_steps=50, fused=True)}
    results = {}
    for kind, make in makers.items():
        for dtype in (torch.float32, torch.bfloat16):
            params = [torch.tensor(v).to(dtype) for v in task.params.values()]
            opt = make(params)
            for t in range(task.steps):
                for p, g in zip(params, task.grads[t].values(), strict=True):
                    p.grad = torch.tensor(g).to(dtype)
                opt.step(loss=float(task.losses[t]))
            for i, p in enumerate(params):
                results[f"{kind} {dtype} param {i}"] = p.detach().clone()
                for name, value in opt.state[p].items():
                    if isinstance(value, torch.Tensor):
                        results[f"{kind} {dtype} {name} {i}"] = value.clone()
    return results


def _avx512_instructions(library: str) -> int:
    """How many instructions of ``library`` use AVX-512 registers (zmm, or mask registers)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], check=True,
                          capture_output=True, text=True).stdout
    return sum(1 for line in text.splitlines() if "zmm" in line or "%k" in line)


@pytest.mark.slow
def test_lower_level_build_gives_identical_bits(tmp_path):
    """The extension built without AVX-512 on an AVX-512 CPU (``LOPT_CPU_ISA=avx2``: the 16
    lanes in two AVX2 registers, what a CPU without AVX-512 runs) runs small_fc_lopt and VeLO
    with identical bits in every parameter and state tensor: the lane count and every sum's
    order (csrc/reduction_order.h) are the same at every level. Its library holds no AVX-512
    instruction. Slow: a second build, once per TORCH_EXTENSIONS_DIR (about 3 minutes on 2
    cores; cached beside the default build, as its name carries the level; ``make test`` makes
    it beside the default build with ``lopt-port build --lower-level``)."""
    isa, lower = extension.cpu_isa(), extension.lower_isa()
    if lower is None or isa != "avx512":
        pytest.skip(f"the default build is for {isa}, not avx512")
    out = tmp_path / "lower.pt"
    code = ("import sys, torch; from lopt_port import extension; "
            "from tests.test_build import fused_run; "
            "torch.save((extension.load(), fused_run()), sys.argv[1])")
    env = {**os.environ, "LOPT_CPU_ISA": lower, "LOPT_PORT_QUIET_BUILD": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, check=True)
    lower_library, lower_results = torch.load(out)
    assert os.path.basename(lower_library) == f"{extension.binding_name(lower)}.so"
    results = fused_run()
    assert results.keys() == lower_results.keys()
    different = [k for k, v in results.items() if not torch.equal(v, lower_results[k])]
    assert not different, f"{lower} differs from {isa} in {different}"
    assert _avx512_instructions(extension.load()) > 0
    assert _avx512_instructions(lower_library) == 0
