// The CUDA execution model that the kernels of csrc/*.cu use, for the host C++ compiler: the
// emulated CUDA backend compiles those very sources (no copy, no rewriting) with this folder
// first on the include path, so that their `#include <cuda_runtime.h>` lands here.
//
// What it provides, and nothing more: __global__/__device__/__host__/__forceinline__/
// __launch_bounds__/__grid_constant__ (no-ops), threadIdx/blockIdx/blockDim/gridDim, warpSize,
// __shared__ memory per block, __syncthreads(), __shfl_xor_sync with its lane and width
// semantics, kernel launches (LOPT_LAUNCH; nvcc spells it <<<...>>>), dynamic shared memory
// (LOPT_DYNAMIC_SHARED), cudaFuncSetAttribute for the dynamic shared-memory limit,
// cudaGetLastError and cudaGetErrorString.
//
// A launch runs every block, one after another, and every thread of a block as a fiber with
// its own stack, on the calling OS thread. A thread runs until it reaches __syncthreads(), a
// warp shuffle or its end, and waits there: a barrier releases when every thread of the block
// that has not exited reaches it, a shuffle when every lane of its mask has called it (they
// then read each other's values). Launch limits are checked and fail the launch loudly:
// threads per block, block and grid dimensions, dynamic and total shared memory. Fault
// exposure (on unless LOPT_PORT_EMULATION_FAULTS=0): the threads released by each barrier run
// in a shuffled order (seeded, so runs repeat), blocks too, and all shared memory is filled
// with NaN bytes (0xFF) at each block's start, so that a missing barrier or a read of
// unwritten shared memory changes results. Misuse (a shuffle whose mask names an exited or
// absent lane, lanes that disagree on the mask, a deadlock) fails the launch with a message
// (lopt_emu_failure_detail).
//
// The launch log (lopt_emu_launch_log; tests/test_gpu_model.py holds lopt_port/gpu_model.py's
// launches and grids against it): each launch's kernel, grid, block and dynamic shared
// memory and, when probing, which device buffers (device_memory.h) it writes and reads.
//
// Not emulated: real warp divergence (a thread runs alone between sync points), the memory
// model, register and occupancy limits, device math functions (the host's libm), speed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define LOPT_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
// Static shared arrays are thread-local statics of the emulated library: its thread-local
// segment (the launching OS thread's instance, which every fiber of the launch sees) is the
// block's shared memory, filled with NaN bytes at each block's start (blocks run one at a
// time). So nothing else in a library built with this header may be thread_local. (Not a
// linker section: GCC silently ignores section attributes on the statics of function
// templates, GCC bug 70435, and the kernels' shared arrays are in templates.)
#define __shared__ static thread_local __attribute__((aligned(16)))

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

constexpr int warpSize = 32;

namespace lopt_emu {

// The launch being run: its block and the thread (fiber) running now.
struct ThreadContext {
  uint3 idx;
};
extern ThreadContext* g_thread;
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

void syncthreads();
// The value of `src` lane's `bits` after every lane of `mask` has called it (xor with
// lane_mask within groups of `width` lanes; see __shfl_xor_sync).
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width);
void* dynamic_shared();

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  const void* kernel;
  const char* name;  // the kernel as the launch spells it, e.g. "apply_kernel<K, H>"
};

// Runs body(closure) as every thread of every block; the cudaError_t of the launch.
int run_launch(const LaunchConfig& config, void (*body)(void*), void* closure);
int set_max_dynamic_smem(const void* kernel, int bytes);
int take_last_error();
void set_last_error(int code);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  LaunchConfig config;

  template <typename... A>
  void operator()(A&&... args) const {
    struct Closure {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } closure{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    const int err = run_launch(
        config, [](void* c) { std::apply(static_cast<Closure*>(c)->kernel,
                                         static_cast<Closure*>(c)->params); },
        &closure);
    if (err != cudaSuccess) set_last_error(err);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                    const char* name) {
  return Launch<P...>{
      kernel, LaunchConfig{grid, block, smem, reinterpret_cast<const void*>(kernel), name}};
}

}  // namespace lopt_emu

#define threadIdx (::lopt_emu::g_thread->idx)
#define blockIdx (::lopt_emu::g_block_idx)
#define blockDim (::lopt_emu::g_block_dim)
#define gridDim (::lopt_emu::g_grid_dim)

// kernel<<<grid, block, smem, stream>>>(args...) is LOPT_LAUNCH(grid, block, smem, stream,
// kernel)(args...) in the sources (multi_tensor_cuda.cuh defines it for nvcc).
#define LOPT_LAUNCH(grid, block, smem, stream, ...) \
  ::lopt_emu::launch(__VA_ARGS__, grid, block, smem, stream, #__VA_ARGS__)
#define LOPT_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::lopt_emu::dynamic_shared())

inline void __syncthreads() { ::lopt_emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = ::lopt_emu::shuffle_xor(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    ::lopt_emu::set_last_error(cudaErrorInvalidValue);
    return cudaErrorInvalidValue;
  }
  return static_cast<cudaError_t>(
      ::lopt_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value));
}

inline cudaError_t cudaGetLastError() {
  return static_cast<cudaError_t>(::lopt_emu::take_last_error());
}

const char* cudaGetErrorString(cudaError_t code);

extern "C" {
// What made the last failed launch fail, in words ("" when none has failed).
const char* lopt_emu_failure_detail();
// The launches since the last call, as a JSON list, and the log's mode from now on: 0 off,
// 1 each launch's kernel, grid, block and dynamic shared memory, 2 (probe) also the device
// buffers it writes (those whose bytes it changes) and reads (those whose NaN poisoning,
// one buffer at a time on a rerun from the same inputs, changes another buffer's result or
// a byte of its own that the launch writes): reads are what the results depend on. Probing
// reruns each launch once per buffer.
const char* lopt_emu_launch_log(int mode);
}
