// Probe kernels of the CUDA emulation's own tests (tests/test_cuda_emulation.py). CUDA C++ using
// only what csrc/cuda_emulation/cuda_runtime.h provides, launched through LOPT_LAUNCH, with
// extern "C" host entry points that the tests call through ctypes. The tests compile this file
// with g++ (-x c++, -I csrc/cuda_emulation) and csrc/cuda_emulation/emulator.cpp into one
// shared library.
//
// Every entry point returns the cudaError_t of what it launched (cudaGetLastError after the
// launch), so that a test sees the launch's status and can read lopt_emu_failure_detail().
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "device_memory.h"

#define PROBE_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kMaxThreads = 1024;
constexpr unsigned kFull = 0xFFFFFFFFu;

// An event log that the emulated threads append to. Threads are fibers run one at a time on
// the launching OS thread, so plain increments are safe (no atomics in the emulator's world).
int g_log[1 << 14];
int g_log_len = 0;
void log_event(int v) {
  if (g_log_len < static_cast<int>(sizeof g_log / sizeof g_log[0])) g_log[g_log_len++] = v;
}

int linear_thread() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

int block_threads() { return static_cast<int>(blockDim.x * blockDim.y * blockDim.z); }

int finish() { return static_cast<int>(cudaGetLastError()); }

// ---------------------------------------------------------------------------------------
// Barriers and shared memory.

// Every thread writes its slot; then (after the barrier, if any) reads its right neighbour's.
__global__ void neighbour_kernel(int with_barrier, float* out) {
  __shared__ float slot[kMaxThreads];
  const int n = block_threads(), t = linear_thread();
  slot[t] = static_cast<float>(t + 1);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * n + t] = slot[(t + 1) % n];
}

// All slots are written before the first barrier; each thread then reads its neighbour's slot
// and overwrites its own. Without the second barrier a thread may overwrite a slot before its
// left neighbour has read it (a write-after-read race; no shared memory is left unwritten).
__global__ void overwrite_kernel(int second_barrier, float* out) {
  __shared__ float slot[kMaxThreads];
  const int n = block_threads(), t = linear_thread();
  slot[t] = static_cast<float>(t);
  __syncthreads();
  const float mine = slot[(t + 1) % n];
  if (second_barrier) __syncthreads();
  slot[t] = -1.0f;
  out[t] = mine;
}

// A shared array declared in a device function template (as velo_cuda.cu's block_sum).
template <typename T>
__device__ __forceinline__ T* helper_shared() {
  __shared__ T in_helper[kMaxThreads];
  return in_helper;
}

// write = 1: fills its shared arrays with 42 (static in this kernel template, static in a
// device function template, dynamic); write = 0: only reads them (shared memory nobody wrote
// in this block). A template, as the project's kernels are (GCC ignores section attributes on
// the statics of templates, so these are the cases a section-based emulation would miss).
template <int Tag>
__global__ void unwritten_kernel(int write, float* out) {
  __shared__ float in_kernel[kMaxThreads];
  LOPT_DYNAMIC_SHARED(float, dyn);
  float* helper = helper_shared<float>();
  const int n = block_threads(), t = linear_thread();
  if (write) {
    in_kernel[t] = 42.0f;
    helper[t] = 42.0f;
    dyn[t] = 42.0f;
  }
  __syncthreads();
  float* o = out + 3 * (blockIdx.x * n + t);
  o[0] = in_kernel[t];
  o[1] = helper[t];
  o[2] = dyn[t];
}

// Logs (block, thread) at its start and again after a barrier: the order the scheduler ran
// them in.
__global__ void order_kernel() {
  const int id = static_cast<int>(blockIdx.x) * 10000 + linear_thread();
  log_event(id);
  __syncthreads();
  log_event(100000000 + id);
}

// A block-wide sum through shared memory in a fixed tree (with every barrier): the result of a
// correct kernel, which no scheduling may change.
__global__ void tree_sum_kernel(const float* in, float* out) {
  __shared__ float part[kMaxThreads];
  const int n = block_threads(), t = linear_thread();
  part[t] = in[blockIdx.x * n + t] * 1.0000001f;
  __syncthreads();
  for (int half = n / 2; half > 0; half /= 2) {
    if (t < half) part[t] += part[t + half];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = part[0];
}

// ---------------------------------------------------------------------------------------
// Warp shuffles.

// Lanes named in `mask` shuffle in[t] (lane_mask, width); the others copy in[t].
template <typename T>
__global__ void shfl_kernel(unsigned mask, int lane_mask, int width, const T* in, T* out) {
  const int t = linear_thread();
  if ((mask >> (t % 32)) & 1u)
    out[t] = __shfl_xor_sync(mask, in[t], lane_mask, width);
  else
    out[t] = in[t];
}

// The butterfly sum from offset `start` down to 1 within groups of `width` lanes.
__global__ void butterfly_kernel(int start, int width, const double* in, double* out) {
  const int t = linear_thread();
  double v = in[t];
  for (int off = start; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off, width);
  out[t] = v;
}

// Divergent halves of a warp, each shuffling among its own 16 lanes with its own mask (legal
// since Volta's independent thread scheduling).
__global__ void split_mask_kernel(const int* in, int* out) {
  const int t = linear_thread();
  if (t % 32 < 16)
    out[t] = __shfl_xor_sync(0x0000FFFFu, in[t], 1);
  else
    out[t] = __shfl_xor_sync(0xFFFF0000u, in[t], 2);
}

// Misuses, each a launch that must fail (see probe_misuse).
__global__ void misuse_kernel(int kind, int* out) {
  const int t = linear_thread(), lane = t % 32;
  int v = t;
  switch (kind) {
    case 0:  // the upper half-warp exits; the lower one names it in the mask
      if (lane >= 16) return;
      v = __shfl_xor_sync(kFull, v, 1);
      break;
    case 1:  // the full mask in a block of fewer than 32 threads
      v = __shfl_xor_sync(kFull, v, 1);
      break;
    case 2:  // lanes disagree: the lower half names lanes 0-15, the upper half all 32
      v = __shfl_xor_sync(lane < 16 ? 0x0000FFFFu : kFull, v, 1);
      break;
    case 3:  // the mask does not name the calling lane
      v = __shfl_xor_sync(0x1u, v, 1);
      break;
    case 4:  // lanes 0-15 read lanes 16-31, which the mask does not name
      if (lane < 16) v = __shfl_xor_sync(0x0000FFFFu, v, 16);
      break;
    case 5:  // a width that is not a power of two
      v = __shfl_xor_sync(kFull, v, 1, 12);
      break;
    case 6:  // deadlock: half the warp at a barrier, the other half in a full-mask shuffle
      if (lane < 16)
        __syncthreads();
      else
        v = __shfl_xor_sync(kFull, v, 1);
      break;
    case 7:  // deadlock: warp 1 waits at a barrier; lane 0 of warp 0 shuffles with lane 1,
             // which went to the barrier instead (the rest of warp 0 exits)
      if (t >= 32) {
        __syncthreads();
      } else if (t == 0) {
        v = __shfl_xor_sync(0x3u, v, 1);
      } else if (t == 1) {
        __syncthreads();
      } else {
        return;
      }
      break;
    case 8:  // no misuse: threads that exit early count as arrived at later barriers
      if (t % 2) return;
      __syncthreads();
      break;
  }
  out[t] = v;
}

// ---------------------------------------------------------------------------------------
// Launch configuration and index mapping.

// Counts the threads that ran and touches the last byte of its dynamic shared memory.
template <int Tag>
__global__ void config_kernel(size_t dynamic_bytes, int* threads_run) {
  LOPT_DYNAMIC_SHARED(unsigned char, dyn);
  if (dynamic_bytes > 0 && linear_thread() == 0) dyn[dynamic_bytes - 1] = 7;
  ++*threads_run;
}

// Each thread writes its threadIdx, blockIdx and the lane-xor-8 partner's linear id.
__global__ void index_kernel(int* out) {
  const int block = static_cast<int>(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
  const int t = linear_thread();
  int* o = out + 8 * (block * block_threads() + t);
  o[0] = static_cast<int>(threadIdx.x);
  o[1] = static_cast<int>(threadIdx.y);
  o[2] = static_cast<int>(threadIdx.z);
  o[3] = static_cast<int>(blockIdx.x);
  o[4] = static_cast<int>(blockIdx.y);
  o[5] = static_cast<int>(blockIdx.z);
  o[6] = static_cast<int>(blockDim.x * 100 + gridDim.x);
  o[7] = block_threads() % 32 == 0 ? __shfl_xor_sync(kFull, t, 8) : -1;
}

// ---------------------------------------------------------------------------------------
// Guarded device copies.

__global__ void write_kernel(float* d, int first, float value) {
  d[first + linear_thread()] = value + static_cast<float>(linear_thread());
}

__global__ void nan_rmw_kernel(float* d, int index) {
  if (linear_thread() == 0) d[index] = d[index] * 2.0f + 1.0f;
}

std::string g_guard_report;

}  // namespace

PROBE_API const char* probe_failure_detail() { return lopt_emu_failure_detail(); }

PROBE_API int probe_neighbour(int blocks, int threads, int with_barrier, float* out) {
  LOPT_LAUNCH(dim3(blocks), dim3(threads), 0, nullptr, neighbour_kernel)(with_barrier, out);
  return finish();
}

PROBE_API int probe_overwrite(int threads, int second_barrier, float* out) {
  LOPT_LAUNCH(1, threads, 0, nullptr, overwrite_kernel)(second_barrier, out);
  return finish();
}

PROBE_API int probe_unwritten(int blocks, int threads, int write, float* out) {
  LOPT_LAUNCH(blocks, threads, threads * sizeof(float), nullptr, unwritten_kernel<0>)(write, out);
  return finish();
}

// The events of one launch of order_kernel into out (at most `capacity`); their count.
PROBE_API int probe_order(int blocks, int threads, int* out, int capacity) {
  g_log_len = 0;
  LOPT_LAUNCH(blocks, threads, 0, nullptr, order_kernel)();
  const int err = finish();
  if (err != cudaSuccess) return -err;
  for (int i = 0; i < g_log_len && i < capacity; ++i) out[i] = g_log[i];
  return g_log_len;
}

PROBE_API int probe_tree_sum(int blocks, int threads, const float* in, float* out) {
  LOPT_LAUNCH(blocks, threads, 0, nullptr, tree_sum_kernel)(in, out);
  return finish();
}

PROBE_API int probe_shfl_int(int threads, unsigned mask, int lane_mask, int width,
                             const int* in, int* out) {
  LOPT_LAUNCH(1, threads, 0, nullptr, shfl_kernel<int>)(mask, lane_mask, width, in, out);
  return finish();
}

PROBE_API int probe_shfl_double(int threads, unsigned mask, int lane_mask, int width,
                                const double* in, double* out) {
  LOPT_LAUNCH(1, threads, 0, nullptr, shfl_kernel<double>)(mask, lane_mask, width, in, out);
  return finish();
}

PROBE_API int probe_butterfly(int threads, int start, int width, const double* in, double* out) {
  LOPT_LAUNCH(1, threads, 0, nullptr, butterfly_kernel)(start, width, in, out);
  return finish();
}

PROBE_API int probe_split_mask(int threads, const int* in, int* out) {
  LOPT_LAUNCH(1, threads, 0, nullptr, split_mask_kernel)(in, out);
  return finish();
}

PROBE_API int probe_misuse(int kind, int threads, int* out) {
  LOPT_LAUNCH(1, threads, 0, nullptr, misuse_kernel)(kind, out);
  return finish();
}

// Launches config_kernel<tag> (tags 0-3: separate kernels, so that each keeps its own dynamic
// shared-memory limit); the launch's error, and the number of threads that ran in *threads_run.
PROBE_API int probe_config(int tag, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                           unsigned by, unsigned bz, size_t dynamic_bytes, int* threads_run) {
  const dim3 grid(gx, gy, gz), block(bx, by, bz);
  *threads_run = 0;
  switch (tag) {
    case 0: LOPT_LAUNCH(grid, block, dynamic_bytes, nullptr, config_kernel<0>)(dynamic_bytes, threads_run); break;
    case 1: LOPT_LAUNCH(grid, block, dynamic_bytes, nullptr, config_kernel<1>)(dynamic_bytes, threads_run); break;
    case 2: LOPT_LAUNCH(grid, block, dynamic_bytes, nullptr, config_kernel<2>)(dynamic_bytes, threads_run); break;
    default: LOPT_LAUNCH(grid, block, dynamic_bytes, nullptr, config_kernel<3>)(dynamic_bytes, threads_run); break;
  }
  return finish();
}

// cudaFuncSetAttribute(config_kernel<tag>, MaxDynamicSharedMemorySize, bytes); its result.
PROBE_API int probe_set_max_dynamic(int tag, int bytes) {
  const cudaFuncAttribute a = cudaFuncAttributeMaxDynamicSharedMemorySize;
  switch (tag) {
    case 0: return cudaFuncSetAttribute(config_kernel<0>, a, bytes);
    case 1: return cudaFuncSetAttribute(config_kernel<1>, a, bytes);
    case 2: return cudaFuncSetAttribute(config_kernel<2>, a, bytes);
    default: return cudaFuncSetAttribute(config_kernel<3>, a, bytes);
  }
}

// cudaGetLastError without a launch.
PROBE_API int probe_last_error() { return static_cast<int>(cudaGetLastError()); }

// A launch without taking its error (so that a test sees what stays pending).
PROBE_API void probe_launch_only(unsigned gx, unsigned bx, int* threads_run) {
  *threads_run = 0;
  LOPT_LAUNCH(gx, bx, 0, nullptr, config_kernel<3>)(size_t{0}, threads_run);
}

PROBE_API int probe_index(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, int* out) {
  LOPT_LAUNCH(dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr, index_kernel)(out);
  return finish();
}

// host[0, n) on a guarded device copy ("probe buffer"; copy_in: its contents, else scratch);
// `threads` threads write value + i to element first + i; the copies are checked and copied
// back. The launch's error, and the guard report in *report ("" when the guards are intact).
PROBE_API int probe_guard(float* host, int n, int copy_in, int first, int threads, float value,
                          const char** report) {
  lopt_emu::DeviceCopies mem;
  float* d = mem.add(host, static_cast<size_t>(n), "probe buffer", copy_in != 0);
  if (threads > 0) LOPT_LAUNCH(1, threads, 0, nullptr, write_kernel)(d, first, value);
  const int err = finish();
  g_guard_report = mem.finish();
  *report = g_guard_report.c_str();
  return err;
}

// d[index] = d[index] * 2 + 1 on a guarded copy of host[0, n) (index n: one past the end, a
// read-modify-write of the guard); the guard report as probe_guard.
PROBE_API int probe_guard_rmw(float* host, int n, int index, const char** report) {
  lopt_emu::DeviceCopies mem;
  float* d = mem.add(host, static_cast<size_t>(n), "probe buffer");
  LOPT_LAUNCH(1, 1, 0, nullptr, nan_rmw_kernel)(d, index);
  const int err = finish();
  g_guard_report = mem.finish();
  *report = g_guard_report.c_str();
  return err;
}
