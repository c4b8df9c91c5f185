// Multi-tensor machinery shared by the CUDA backends (small_fc_lopt_cuda.cu, velo_cuda.cu).
// CUDA C++ for nvcc only, no torch headers.
//
// The tensors of a group go to the kernels in chunks of kChunk TensorArgs held in kernel
// parameter space (__grid_constant__, no copies). Work units (warps for the reductions, blocks
// for the element phases) are numbered across the chunk's tensors by a prefix sum, so one
// launch covers them all. Reductions are deterministic: fixed per-lane strides, fixed shuffle
// trees, per-tile partials summed in order by one thread.
#pragma once

#include <cuda_runtime.h>

#include "reduction_order.h"
#include "tensor_args.h"

// Launches and dynamic shared memory, spelled so that the emulated CUDA backend
// (cuda_emulation/cuda_runtime.h, which defines both) compiles these sources unchanged:
// LOPT_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<...>>>(args...).
#if !defined(LOPT_CUDA_EMULATION)
#define LOPT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define LOPT_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace lopt {
namespace gpu {

constexpr int kChunk = 16;            // tensors per launch
constexpr int kThreads = 256;         // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int64_t kApplyTile = 2048;  // elements per block in the apply phases
constexpr unsigned kFullMask = 0xFFFFFFFFu;

struct Chunk {
  int count;
  int64_t offset[kChunk + 1];       // work units before tensor i (prefix sum)
  int64_t part_offset[kChunk];      // reductions: first partial row of tensor i
  TensorArgs t[kChunk];
};

__device__ __forceinline__ int find_tensor(const Chunk& c, int64_t unit) {
  int i = 0;
  while (i + 1 < c.count && unit >= c.offset[i + 1]) ++i;
  return i;
}

// Sum over a warp in a fixed butterfly order; every lane gets the total.
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Per-element state after this step's accumulator update (Update) or as stored.
template <int K, bool Update>
__device__ __forceinline__ ElementState element_state(const TensorArgs& t, const GroupDecays& d,
                                                      bool head_variant, int64_t i) {
  const float p = load_value(t.p, t.dtype, i);
  const float g = effective_grad(load_value(t.g, t.dtype, i), p, t.grad_wd, t.grad_clip);
  float m[K];
  float* mp = t.m + i * K;
  for (int a = 0; a < K; ++a) m[a] = Update ? momentum_update(d, a, mp[a], g) : mp[a];
  float rms = Update ? rms_update(d, t.rms[i], g) : t.rms[i];
  if (Update) {
    for (int a = 0; a < K; ++a) mp[a] = m[a];
    t.rms[i] = rms;
  }
  if (t.factored) {
    int64_t r, c, q;
    factored_indices(t.ix, i, &r, &c, &q);
    float vr[K], vc[K], rf[K], cf[K];
    for (int a = 0; a < K; ++a) {
      vr[a] = t.v_row[r * K + a];
      vc[a] = t.v_col[c * K + a];
      rf[a] = t.row_factor[r * K + a];
      cf[a] = t.col_factor[c * K + a];
    }
    return factored_state(g, p, rms, m, vr, vc, rf, cf, K);
  }
  float v[K];
  float* vp = t.v_diag + i * K;
  for (int a = 0; a < K; ++a) {
    v[a] = Update ? diag_update(d, a, vp[a], g) : vp[a];
    if (Update) vp[a] = v[a];
  }
  return diag_state(g, p, rms, m, v, K, head_variant);
}

// ---------------------------------------------------------------------------------------
// Launch helpers: split the tensors into chunks, number the work units, launch.

inline int64_t blocks_for(int64_t units, int64_t per_block) {
  return (units + per_block - 1) / per_block;
}

// launch(chunk, start) for each chunk of tensors[start, start + kChunk) with at least one
// work unit (units(t) of them per tensor); stops at the first nonzero (error) return.
template <typename Units, typename Launch>
int for_each_chunk(const TensorArgs* tensors, int count, Units units, Launch launch) {
  Chunk c;
  for (int start = 0; start < count; start += kChunk) {
    c.count = count - start < kChunk ? count - start : kChunk;
    c.offset[0] = 0;
    for (int i = 0; i < c.count; ++i) {
      c.t[i] = tensors[start + i];
      c.offset[i + 1] = c.offset[i] + units(c.t[i]);
      c.part_offset[i] = 0;
    }
    if (c.offset[c.count] == 0) continue;
    const int err = launch(c, start);
    if (err != 0) return err;
  }
  return 0;
}

inline int last_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace gpu
}  // namespace lopt
