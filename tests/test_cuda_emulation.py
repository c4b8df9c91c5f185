"""The CUDA emulation of ``csrc/cuda_emulation/``: its semantics.

Small probe kernels (``tests/cuda_emulation_probes.cu``, CUDA C++ launched with LOPT_LAUNCH)
compiled with the emulator by g++ into a shared library that ctypes loads (no torch in the
loop): barriers, what a missing barrier does under fault exposure, warp shuffles and their
width rule, misuse and deadlock reports, launch limits, ``cudaGetLastError``, thread order and
determinism, index mapping, and the guard regions of the device copies. (The emulated CUDA
backend's mutation controls: ``tests/test_cuda_emulated_mutations.py``.)
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import CXX, ROOT, needs_emulation

CSRC = os.path.join(ROOT, "csrc")
EMULATION = os.path.join(CSRC, "cuda_emulation")
PROBES = os.path.join(ROOT, "tests", "cuda_emulation_probes.cu")
pytestmark = [needs_emulation, pytest.mark.emulated, pytest.mark.usefixtures("faults_on")]

# cudaError_t values of cuda_runtime.h.
SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION, LAUNCH_FAILURE = 0, 1, 9, 719
OPT_IN_SHARED = 163 * 1024  # sm_80's opt-in dynamic shared memory per block
DEFAULT_SHARED = 48 * 1024

P = ctypes.c_void_p
INT = ctypes.c_int
U = ctypes.c_uint
SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "probe_failure_detail": (ctypes.c_char_p, []),
    "probe_neighbour": (INT, [INT, INT, INT, P]),
    "probe_overwrite": (INT, [INT, INT, P]),
    "probe_unwritten": (INT, [INT, INT, INT, P]),
    "probe_order": (INT, [INT, INT, P, INT]),
    "probe_tree_sum": (INT, [INT, INT, P, P]),
    "probe_shfl_int": (INT, [INT, U, INT, INT, P, P]),
    "probe_shfl_double": (INT, [INT, U, INT, INT, P, P]),
    "probe_butterfly": (INT, [INT, INT, INT, P, P]),
    "probe_split_mask": (INT, [INT, P, P]),
    "probe_misuse": (INT, [INT, INT, P]),
    "probe_config": (INT, [INT, U, U, U, U, U, U, ctypes.c_size_t, ctypes.POINTER(INT)]),
    "probe_set_max_dynamic": (INT, [INT, INT]),
    "probe_last_error": (INT, []),
    "probe_launch_only": (None, [U, U, ctypes.POINTER(INT)]),
    "probe_index": (INT, [U, U, U, U, U, U, P]),
    "probe_guard": (INT, [P, INT, INT, INT, INT, ctypes.c_float, ctypes.POINTER(ctypes.c_char_p)]),
    "probe_guard_rmw": (INT, [P, INT, INT, ctypes.POINTER(ctypes.c_char_p)]),
}


def build_probes(out_dir: str) -> str:
    """Compile the probes with the emulator into ``out_dir/probes.so``; its path."""
    lib = os.path.join(out_dir, "probes.so")
    cmd = [CXX, "-x", "c++", "-std=c++17", "-O1", "-fPIC", "-shared", "-Wall", "-Werror",
           f"-I{EMULATION}", PROBES, os.path.join(EMULATION, "emulator.cpp"), "-o", lib]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"the probes do not compile:\n{result.stderr[-3000:]}"
    return lib


@pytest.fixture(scope="session")
def probes_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The probe library, built once per test session (about 3 s)."""
    return build_probes(str(tmp_path_factory.mktemp("cuda_emulation_probes")))


@pytest.fixture(scope="session")
def probes(probes_path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(probes_path)
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


def detail(probes: ctypes.CDLL) -> str:
    return probes.probe_failure_detail().decode()


def set_faults(monkeypatch: pytest.MonkeyPatch, on: bool, seed: int = 0) -> None:
    monkeypatch.setenv("LOPT_PORT_EMULATION_FAULTS", "1" if on else "0")
    monkeypatch.setenv("LOPT_PORT_EMULATION_SEED", str(seed))


# ---------------------------------------------------------------------------------------
# Barriers, shared memory and fault exposure.

@pytest.mark.parametrize("threads", [32, 100, 256, 1024])
def test_barrier_makes_every_write_visible(probes, threads):
    """Each thread writes its shared slot, passes the barrier and reads its neighbour's: every
    value is there, in each of three blocks (shared memory is per block)."""
    out = np.zeros(3 * threads, np.float32)
    assert probes.probe_neighbour(3, threads, 1, ptr(out)) == SUCCESS
    t = np.arange(threads)
    np.testing.assert_array_equal(out, np.tile((t + 1) % threads + 1, 3).astype(np.float32))


def test_missing_barrier_is_exposed_by_poisoned_shared_memory(probes, monkeypatch):
    """The same probe without its barrier: with faults on, threads that run before their
    neighbour read its slot as the poison (NaN); with faults off the bug hides (threads run in
    order and the slots still hold the previous launch's values)."""
    n = 256
    exact = ((np.arange(n) + 1) % n + 1).astype(np.float32)
    out = np.zeros(n, np.float32)
    assert probes.probe_neighbour(1, n, 0, ptr(out)) == SUCCESS
    assert np.isnan(out).sum() > n // 8, out  # about half: a random order
    assert np.array_equal(out[~np.isnan(out)], exact[~np.isnan(out)])

    set_faults(monkeypatch, on=False)
    assert probes.probe_neighbour(1, n, 1, ptr(out)) == SUCCESS  # fills the slots
    assert probes.probe_neighbour(1, n, 0, ptr(out)) == SUCCESS
    np.testing.assert_array_equal(out, exact)


def test_missing_barrier_is_exposed_by_shuffled_order(probes, monkeypatch):
    """A write-after-read race (every slot written before it is read, so no poison involved):
    without the second barrier a thread may overwrite its slot before its left neighbour read
    it. In order (faults off) only the last thread loses; shuffled, about half of them."""
    n = 256
    exact = ((np.arange(n) + 1) % n).astype(np.float32)
    out = np.zeros(n, np.float32)
    assert probes.probe_overwrite(n, 1, ptr(out)) == SUCCESS
    np.testing.assert_array_equal(out, exact)
    assert probes.probe_overwrite(n, 0, ptr(out)) == SUCCESS
    wrong = out != exact
    assert wrong.sum() > n // 8 and np.all(out[wrong] == -1.0), out

    set_faults(monkeypatch, on=False)
    assert probes.probe_overwrite(n, 0, ptr(out)) == SUCCESS
    assert list(np.flatnonzero(out != exact)) == [n - 1]


def test_unwritten_shared_memory_is_nan_with_faults_on(probes, monkeypatch):
    """Shared memory that no thread of the block wrote reads as NaN with faults on, in every
    block: static arrays of a kernel template and of a device function template, and dynamic
    shared memory. With faults off nothing is poisoned: static shared memory keeps what the
    last block left, dynamic shared memory starts each launch at zero."""
    n, blocks = 64, 2
    out = np.zeros((blocks * n, 3), np.float32)
    assert probes.probe_unwritten(blocks, n, 1, ptr(out)) == SUCCESS
    assert np.all(out == 42.0)
    assert probes.probe_unwritten(blocks, n, 0, ptr(out)) == SUCCESS
    assert np.all(out.view(np.uint32) == 0xFFFFFFFF), out  # the poison bytes, exactly

    set_faults(monkeypatch, on=False)
    assert probes.probe_unwritten(blocks, n, 1, ptr(out)) == SUCCESS
    assert probes.probe_unwritten(blocks, n, 0, ptr(out)) == SUCCESS
    assert np.all(out[:, :2] == 42.0) and np.all(out[:, 2] == 0.0)


# ---------------------------------------------------------------------------------------
# Warp shuffles.

def shfl_xor_reference(values: np.ndarray, lane_mask: int, width: int) -> np.ndarray:
    """The CUDA Programming Guide's rule for __shfl_xor_sync: lane l reads lane
    ``l ^ lane_mask`` of its warp; with ``width`` < 32, a source in a later group of ``width``
    lanes returns the caller's own value (earlier groups may be read)."""
    out = values.copy()
    for t in range(len(values)):
        lane, base = t % 32, t - t % 32
        src = lane ^ lane_mask
        if src // width <= lane // width:
            out[t] = values[base + src]
    return out


@pytest.mark.parametrize("width", [32, 16, 8, 4, 2, 1])
@pytest.mark.parametrize("lane_mask", [1, 2, 4, 8, 16, 31, 5, 0])
def test_shfl_xor_follows_the_programming_guide(probes, lane_mask, width):
    """Two warps, 32-bit and 64-bit values: each lane gets the rule's value."""
    n = 64
    ints = (np.arange(n, dtype=np.int32) * 7919 + 13).astype(np.int32)
    doubles = np.arange(n, dtype=np.float64) * 1.0e10 + 0.125  # needs all 64 bits
    out_i, out_d = np.zeros_like(ints), np.zeros_like(doubles)
    assert probes.probe_shfl_int(n, 0xFFFFFFFF, lane_mask, width, ptr(ints), ptr(out_i)) == 0
    assert probes.probe_shfl_double(n, 0xFFFFFFFF, lane_mask, width, ptr(doubles),
                                    ptr(out_d)) == SUCCESS
    np.testing.assert_array_equal(out_i, shfl_xor_reference(ints, lane_mask, width))
    np.testing.assert_array_equal(out_d, shfl_xor_reference(doubles, lane_mask, width))


def test_width_rule_examples(probes):
    """The rule by hand, width 8, lane_mask 8: lanes 0-7 would read lanes 8-15 (a later group)
    and keep their own values; lanes 8-15 read lanes 0-7 (an earlier group)."""
    values = np.arange(32, dtype=np.int32) + 100
    out = np.zeros_like(values)
    assert probes.probe_shfl_int(32, 0xFFFFFFFF, 8, 8, ptr(values), ptr(out)) == SUCCESS
    assert list(out[:8]) == list(range(100, 108))
    assert list(out[8:16]) == list(range(100, 108))
    assert list(out[16:24]) == list(range(116, 124))
    assert list(out[24:32]) == list(range(116, 124))


@pytest.mark.parametrize(("start", "width", "group"), [(16, 32, 32), (8, 32, 16),
                                                       (4, 8, 8), (1, 2, 2)])
def test_butterfly_sums_each_group(probes, start, width, group):
    """The xor butterfly from `start` down to 1: every lane holds the sum of its group of
    2 * start lanes (exact: small integers in doubles). Starting at 8 with width 32 (the
    mutation of warp_sum) sums half-warps only."""
    n = 64
    values = np.arange(n, dtype=np.float64) ** 2
    out = np.zeros_like(values)
    assert probes.probe_butterfly(n, start, width, ptr(values), ptr(out)) == SUCCESS
    expected = values.reshape(-1, group).sum(axis=1).repeat(group)
    np.testing.assert_array_equal(out, expected)


def test_disjoint_masks_shuffle_separately(probes):
    """Divergent halves of a warp, each with its own mask (0x0000FFFF xor 1, 0xFFFF0000 xor
    2): legal, and each half pairs within itself."""
    values = np.arange(64, dtype=np.int32)
    out = np.zeros_like(values)
    assert probes.probe_split_mask(64, ptr(values), ptr(out)) == SUCCESS, detail(probes)
    lane = values % 32
    expected = np.where(lane < 16, values ^ 1, values ^ 2)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(("kind", "threads", "message"), [
    (0, 32, r"thread \(0,0,0\): __shfl_xor_sync's mask names lane 16, which has exited"),
    (1, 16, r"mask names lane 16, which the block does not have"),
    (2, 32, r"lanes of one warp call __shfl_xor_sync with different masks "
            r"\(0xffffffff by lane 16, 0x0000ffff by lane 0\)"),
    (3, 32, r"thread \([1-9]\d*,0,0\): __shfl_xor_sync's mask does not name the calling lane"),
    (4, 32, r"__shfl_xor_sync reads lane 16, outside the mask"),
    (5, 32, r"__shfl_xor_sync width 12 is not a power of two up to 32"),
    (6, 32, r"block \(0,0,0\) deadlocks: 16 threads wait at __syncthreads, 16 in "
            r"__shfl_xor_sync whose lanes never all arrive, 0 have exited"),
    (7, 64, r"block \(0,0,0\) deadlocks: 33 threads wait at __syncthreads, 1 in "
            r"__shfl_xor_sync whose lanes never all arrive, 30 have exited"),
], ids=["exited-lane", "absent-lane", "masks-disagree", "caller-not-in-mask",
        "reads-outside-mask", "bad-width", "deadlock-barrier-vs-shuffle",
        "deadlock-partner-at-barrier"])
def test_misuse_fails_the_launch_with_a_message(probes, monkeypatch, kind, threads, message):
    """Each misuse fails the launch (cudaErrorLaunchFailure) with a message that says what
    and where, whatever the thread order."""
    for seed in range(3):
        monkeypatch.setenv("LOPT_PORT_EMULATION_SEED", str(seed))
        out = np.zeros(threads, np.int32)
        assert probes.probe_misuse(kind, threads, ptr(out)) == LAUNCH_FAILURE
        assert re.search(message, detail(probes)), detail(probes)


def test_exited_threads_count_as_arrived_at_a_barrier(probes):
    """Odd threads return before the barrier; the even ones pass it (as on the device, where
    exited threads no longer count at bar.sync)."""
    out = np.full(64, -1, np.int32)
    assert probes.probe_misuse(8, 64, ptr(out)) == SUCCESS
    assert list(out[::2]) == list(range(0, 64, 2)) and np.all(out[1::2] == -1)


# ---------------------------------------------------------------------------------------
# Launches.

@pytest.mark.parametrize(("grid", "block", "code", "message"), [
    ((1, 1, 1), (1025, 1, 1), INVALID_CONFIGURATION, r"block dimension 0 is 1025 \(limit 1024\)"),
    ((1, 1, 1), (32, 33, 1), INVALID_CONFIGURATION, r"1056 threads per block \(limit 1024\)"),
    ((1, 1, 1), (1, 1, 65), INVALID_CONFIGURATION, r"block dimension 2 is 65 \(limit 64\)"),
    ((1, 1, 1), (0, 1, 1), INVALID_CONFIGURATION, r"block dimension 0 is 0"),
    ((0, 1, 1), (32, 1, 1), INVALID_CONFIGURATION, r"grid dimension 0 is 0 \(1 to 2147483647\)"),
    ((1, 65536, 1), (1, 1, 1), INVALID_CONFIGURATION, r"grid dimension 1 is 65536 \(1 to 65535\)"),
    ((1, 1, 65536), (1, 1, 1), INVALID_CONFIGURATION, r"grid dimension 2 is 65536"),
    ((1, 1, 1), (1024, 1, 1), SUCCESS, None),
    ((2, 1, 1), (4, 4, 64), SUCCESS, None),
    ((3, 2, 2), (32, 32, 1), SUCCESS, None),
])
def test_launch_limits(probes, grid, block, code, message):
    """sm_80/sm_90's limits: refused launches fail with cudaErrorInvalidConfiguration and run
    no thread; accepted ones run every thread of every block."""
    ran = INT(-1)
    assert probes.probe_config(0, *grid, *block, 0, ctypes.byref(ran)) == code
    if code == SUCCESS:
        assert ran.value == int(np.prod(grid)) * int(np.prod(block))
    else:
        assert ran.value == 0
        assert re.search(message, detail(probes)), detail(probes)
        assert detail(probes).startswith("invalid launch configuration: ")


def test_dynamic_shared_memory_limits(probes):
    """48 KB of dynamic shared memory without cudaFuncSetAttribute; more after it, up to what
    the attribute allows; the attribute itself at most sm_80's opt-in 163 KB. Each kernel keeps
    its own limit (tags 1 and 2 are other kernels than tag 0)."""
    ran = INT(0)

    def launch(tag: int, nbytes: int) -> int:
        return probes.probe_config(tag, 1, 1, 1, 32, 1, 1, nbytes, ctypes.byref(ran))

    assert launch(0, DEFAULT_SHARED) == SUCCESS and ran.value == 32
    assert launch(0, DEFAULT_SHARED + 1) == INVALID_VALUE and ran.value == 0
    assert re.search(r"asks for 49153 bytes of dynamic shared memory; the kernel may use 49152",
                     detail(probes)), detail(probes)

    assert probes.probe_set_max_dynamic(1, 100 * 1024) == SUCCESS
    assert launch(1, 100 * 1024) == SUCCESS and ran.value == 32
    assert launch(1, 100 * 1024 + 1) == INVALID_VALUE
    assert launch(0, DEFAULT_SHARED + 1) == INVALID_VALUE  # tag 0's limit is unchanged

    assert probes.probe_set_max_dynamic(2, OPT_IN_SHARED + 1) == INVALID_VALUE
    assert "exceed the opt-in maximum 166912" in detail(probes)
    assert probes.probe_last_error() == INVALID_VALUE  # a failed runtime call sets it
    assert probes.probe_last_error() == SUCCESS
    assert launch(2, DEFAULT_SHARED + 1) == INVALID_VALUE  # the refused attribute set nothing
    assert probes.probe_set_max_dynamic(2, OPT_IN_SHARED) == SUCCESS
    assert launch(2, 140 * 1024) == SUCCESS and ran.value == 32
    assert launch(2, OPT_IN_SHARED + 1) == INVALID_VALUE


def test_get_last_error_returns_then_clears(probes):
    """A failed launch's error stays pending over later successful launches until
    cudaGetLastError returns it, once."""
    ran = INT(0)
    assert probes.probe_last_error() == SUCCESS
    probes.probe_launch_only(0, 32, ctypes.byref(ran))  # grid 0
    assert ran.value == 0
    probes.probe_launch_only(2, 32, ctypes.byref(ran))
    assert ran.value == 64
    assert probes.probe_last_error() == INVALID_CONFIGURATION
    assert probes.probe_last_error() == SUCCESS


@pytest.mark.parametrize(("grid", "block"), [((2, 3, 2), (4, 3, 2)), ((1, 1, 1), (8, 4, 2)),
                                             ((3, 1, 1), (32, 1, 1)), ((1, 2, 1), (5, 1, 7))])
def test_thread_and_block_indices(probes, grid, block):
    """Every (threadIdx, blockIdx) pair exactly once, x fastest; blockDim and gridDim; and
    lanes numbered by the linear thread index x + bx (y + by z) (the xor-8 partner of a
    thread is linear ^ 8)."""
    nb, nt = int(np.prod(grid)), int(np.prod(block))
    out = np.full((nb, nt, 8), -9, np.int32)
    assert probes.probe_index(*grid, *block, ptr(out)) == SUCCESS
    bx, by, _ = block
    gx, gy, _ = grid
    for b in range(nb):
        for t in range(nt):
            expected = [t % bx, t // bx % by, t // (bx * by), b % gx, b // gx % gy, b // (gx * gy),
                        bx * 100 + gx, t ^ 8 if nt % 32 == 0 else -1]
            assert list(out[b, t]) == expected, (b, t)


# ---------------------------------------------------------------------------------------
# Thread order and determinism.

def order(probes: ctypes.CDLL, blocks: int, threads: int) -> np.ndarray:
    events = np.zeros(2 * blocks * threads, np.int32)
    assert probes.probe_order(blocks, threads, ptr(events), len(events)) == len(events)
    return events


def test_thread_order(probes, monkeypatch):
    """Faults off: blocks and threads in index order. Faults on: blocks one after another in
    a shuffled order; within a block a shuffled order before the barrier and another after it
    (every thread exactly once each time)."""
    blocks, n = 8, 64
    set_faults(monkeypatch, on=False)
    events = order(probes, blocks, n).reshape(blocks, 2, n)
    for b in range(blocks):
        assert list(events[b, 0]) == [b * 10000 + t for t in range(n)]
        assert list(events[b, 1]) == [100000000 + b * 10000 + t for t in range(n)]

    set_faults(monkeypatch, on=True)
    events = order(probes, blocks, n).reshape(blocks, 2, n)
    block_order = events[:, 0, 0] // 10000
    assert sorted(block_order) == list(range(blocks)) and list(block_order) != list(range(blocks))
    for b in range(blocks):
        before, after = events[b, 0] % 10000, events[b, 1] % 10000
        assert np.all(events[b, 0] // 10000 == block_order[b])
        assert np.all(events[b, 1] == 100000000 + block_order[b] * 10000 + after)
        assert sorted(before) == list(range(n)) and sorted(after) == list(range(n))
        assert list(before) != list(range(n)) and list(before) != list(after)


ORDER_SCRIPT = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
out = (ctypes.c_int * 256)()
for _ in range(2):
    assert lib.probe_order(2, 64, out, 256) == 256
    print(",".join(str(v) for v in out))
"""


def orders_in_fresh_process(probes_path: str, seed: int | None) -> str:
    """The event logs of two launches in a new process (LOPT_PORT_EMULATION_SEED=seed)."""
    env = dict(os.environ, LOPT_PORT_EMULATION_FAULTS="1")
    env.pop("LOPT_PORT_EMULATION_SEED", None)
    if seed is not None:
        env["LOPT_PORT_EMULATION_SEED"] = str(seed)
    result = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, probes_path], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_same_seed_same_order(probes_path):
    """Runs repeat: a new process with the same seed shuffles every launch alike (the order
    depends on the seed and the launch's number in the process); another seed shuffles
    differently; no seed is seed 0."""
    first = orders_in_fresh_process(probes_path, 5)
    assert orders_in_fresh_process(probes_path, 5) == first
    assert orders_in_fresh_process(probes_path, 6) != first
    assert orders_in_fresh_process(probes_path, None) == orders_in_fresh_process(probes_path, 0)
    launch_1, launch_2 = first.splitlines()
    assert launch_1 != launch_2


def test_correct_kernel_is_independent_of_the_seed(probes, monkeypatch):
    """A tree sum with every barrier in place gives the same bits under every seed and with
    faults off, and they are the float32 tree sum's."""
    blocks, n = 3, 256
    values = np.random.default_rng(0).normal(size=blocks * n).astype(np.float32)
    scaled = (values * np.float32(1.0000001)).reshape(blocks, n)
    half = n // 2
    while half:
        scaled[:, :half] = scaled[:, :half] + scaled[:, half:2 * half]
        half //= 2
    results = []
    for on, seed in [(False, 0), (True, 0), (True, 1), (True, 2), (True, 12345)]:
        set_faults(monkeypatch, on, seed)
        out = np.zeros(blocks, np.float32)
        assert probes.probe_tree_sum(blocks, n, ptr(values), ptr(out)) == SUCCESS
        results.append(out.view(np.uint32).copy())
    assert all(np.array_equal(r, results[0]) for r in results)
    np.testing.assert_array_equal(results[0], scaled[:, 0].view(np.uint32))


# ---------------------------------------------------------------------------------------
# Guard regions of the device copies (device_memory.h).

def guard(probes: ctypes.CDLL, host: np.ndarray, first: int, threads: int,
          copy_in: bool = True) -> str:
    report = ctypes.c_char_p()
    assert probes.probe_guard(ptr(host), len(host), int(copy_in), first, threads, 100.0,
                              ctypes.byref(report)) == SUCCESS
    return report.value.decode()


def test_guarded_copy_in_bounds_is_copied_back(probes):
    host = np.arange(10, dtype=np.float32)
    assert guard(probes, host, 0, 10) == ""
    np.testing.assert_array_equal(host, np.arange(10, dtype=np.float32) + 100)


@pytest.mark.parametrize(("first", "threads", "report"), [
    (1, 10, "a kernel wrote past the end of probe buffer (40 bytes), at byte offset 40"),
    (10, 1, "a kernel wrote past the end of probe buffer (40 bytes), at byte offset 40"),
    (12, 1, "a kernel wrote past the end of probe buffer (40 bytes), at byte offset 48"),
    (-1, 2, "a kernel wrote before the start of probe buffer (40 bytes), at byte offset -1"),
    (-3, 1, "a kernel wrote before the start of probe buffer (40 bytes), at byte offset -9"),
])
def test_writes_outside_a_buffer_are_reported(probes, first, threads, report):
    """A write outside the buffer changes a guard: finish() names the buffer and the changed
    byte nearest to it (100.0f is 00 00 c8 42: its first byte is 0, its last 0x42). The
    buffer's own elements are still copied back."""
    host = np.arange(10, dtype=np.float32)
    assert guard(probes, host, first, threads) == report
    expected = np.arange(10, dtype=np.float32)
    for i in range(max(first, 0), min(first + threads, 10)):
        expected[i] = 100.0 + (i - first)
    np.testing.assert_array_equal(host, expected)


def test_output_copies_start_as_nan(probes):
    """A buffer added without copy_in (scratch, outputs) holds the poison until written."""
    host = np.arange(10, dtype=np.float32)
    assert guard(probes, host, 2, 3, copy_in=False) == ""
    assert np.all(host[[0, 1, 5, 6, 7, 8, 9]].view(np.uint32) == 0xFFFFFFFF)
    np.testing.assert_array_equal(host[2:5], [100.0, 101.0, 102.0])


@pytest.mark.xfail(strict=True, reason="known gap: a value computed from a guard's NaN "
                   "(0xFFFFFFFF propagates through float arithmetic) and written back into "
                   "that guard leaves it unchanged; see the report of the emulation tests")
def test_read_modify_write_past_the_end_is_reported(probes):
    """d[n] = d[n] * 2 + 1 reads the guard (NaN) and writes NaN with the same bits."""
    host = np.arange(10, dtype=np.float32)
    report = ctypes.c_char_p()
    assert probes.probe_guard_rmw(ptr(host), 10, 10, ctypes.byref(report)) == SUCCESS
    assert report.value.decode().startswith("a kernel wrote past the end of probe buffer")
