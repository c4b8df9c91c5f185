// CUDA backend of the fused VeLO step (see velo_cuda.h): velo_cpu.cpp's quantities, summed in
// the same fixed tiles of accumulate_tile(n), with the header's per-element math. Pure CUDA
// C++, no torch headers; the chunking and the per-element state are multi_tensor_cuda.cuh's.
//
// Phase A, after lopt_small_fc_reduce_cuda (the factored statistics), per chunk of tensors:
//   sums_kernel    per tile: sums of p^2, m (k) and rms of the old state (the CPU's pass 1);
//   totals_kernel  per tensor: those tiles in order;
//   update_kernel  per tile: squared deviations of the old m and rms about the momentum means
//                  (pass 2), then the moving averages and the sums of squares of the new
//                  state's features (pass 3), from one read of the state;
//   stats_kernel   per tensor: the tiles in order, into stats and sumsq.
// Deterministic: within a tile each thread sums its elements (stride kThreads) in order, then
// a fixed shuffle tree and the warps in order; tiles are summed in order by one thread. No
// atomics, so results depend on the data only.
// Phase B: apply_kernel, one block per kApplyTile elements of one tensor, with that tensor's
// MLP weights in shared memory.
#include "velo_cuda.h"

#include <cuda_runtime.h>

#include "multi_tensor_cuda.cuh"
#include "small_fc_lopt_cuda.h"

namespace {

using namespace lopt;
using namespace lopt::gpu;

// Partial-row widths for k decays: pass 1 sums p^2, m (k) and rms; the update pass sums the
// squared deviations of m (k) and of rms (k), then the squares of the 6 + 8k features.
__host__ __device__ constexpr int sums_width(int k) { return 2 + k; }
__host__ __device__ constexpr int update_width(int k) { return 2 * k + 6 + 8 * k; }

// Block-wide sums of acc[0, W) into out[0, W): each warp by warp_sum's fixed butterfly, then
// thread f adds the warps' sums of column f in warp order. Every thread of the block calls it.
template <int W>
__device__ __forceinline__ void block_sum(const double (&acc)[W], double* out) {
  __shared__ double warp_part[kWarps][W];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
LOPT_UNROLL
  for (int f = 0; f < W; ++f) {
    const double v = warp_sum(acc[f]);
    if (lane == 0) warp_part[warp][f] = v;
  }
  __syncthreads();
  if (threadIdx.x < W) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_part[w][threadIdx.x];
    out[threadIdx.x] = total;
  }
}

// Reduction block `unit`: tile `index` (accumulate_tile(n) elements, [begin, end)) of tensor
// `tensor` of the chunk.
struct Tile {
  int tensor;
  int64_t index, begin, end;
};

__device__ __forceinline__ Tile tile_of(const Chunk& c, int64_t unit) {
  Tile tl;
  tl.tensor = find_tensor(c, unit);
  const int64_t n = c.t[tl.tensor].n;
  const int64_t size = accumulate_tile(n);
  tl.index = unit - c.offset[tl.tensor];
  tl.begin = tl.index * size;
  tl.end = tl.begin + size < n ? tl.begin + size : n;
  return tl;
}

// ---------------------------------------------------------------------------------------
// Phase A.

// Pass 1, one block per tile: sums of p^2 (the square in float32), m (k) and rms, of the state
// before this step's update, into the tile's partial row.
template <int K>
__global__ void __launch_bounds__(kThreads)
sums_kernel(const __grid_constant__ Chunk c, double* part) {
  constexpr int W = sums_width(K);
  const Tile tl = tile_of(c, blockIdx.x);
  const TensorArgs& t = c.t[tl.tensor];
  double acc[W];
LOPT_UNROLL
  for (int f = 0; f < W; ++f) acc[f] = 0.0;
  for (int64_t e = tl.begin + threadIdx.x; e < tl.end; e += kThreads) {
    const float p = load_value(t.p, t.dtype, e);
    acc[0] += static_cast<double>(p * p);
LOPT_UNROLL
    for (int a = 0; a < K; ++a) acc[1 + a] += t.m[e * K + a];
    acc[1 + K] += t.rms[e];
  }
  block_sum<W>(acc, part + (c.part_offset[tl.tensor] + tl.index) * W);
}

// Pass 1, per tensor: its tiles' sums in tile order, into totals[first + i] (one thread per
// tensor and column).
template <int K>
__global__ void totals_kernel(const __grid_constant__ Chunk c, int first, const double* part,
                              double* totals) {
  constexpr int W = sums_width(K);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= static_cast<int64_t>(c.count) * W) return;
  const int i = static_cast<int>(j / W);
  const int f = static_cast<int>(j % W);
  const int64_t tiles = accumulate_tiles(c.t[i].n);
  double total = 0.0;
  for (int64_t b = 0; b < tiles; ++b) total += part[(c.part_offset[i] + b) * W + f];
  totals[(static_cast<int64_t>(first) + i) * W + f] = total;
}

// Passes 2 and 3, one block per tile. Per element: the squared deviations of the old m and of
// the old rms about the momentum means mean_a = sum(m_a) / n (upstream's var_rms quirk: rms
// about the momentum mean too), then this step's moving averages (stored) and the squares of
// the new state's 6 + 8K features. Partial row: deviations of m (K), of rms (K), features.
template <int K>
__global__ void __launch_bounds__(kThreads)
update_kernel(const __grid_constant__ Chunk c, const __grid_constant__ GroupDecays d, int first,
              const double* totals, double* part) {
  constexpr int W = update_width(K);
  constexpr int F = 6 + 8 * K;
  const Tile tl = tile_of(c, blockIdx.x);
  const TensorArgs& t = c.t[tl.tensor];
  const double n = static_cast<double>(t.n);
  const double* sums = totals + (static_cast<int64_t>(first) + tl.tensor) * sums_width(K);
  double mean[K];
LOPT_UNROLL
  for (int a = 0; a < K; ++a) mean[a] = sums[1 + a] / n;
  double acc[W];
LOPT_UNROLL
  for (int f = 0; f < W; ++f) acc[f] = 0.0;
  for (int64_t e = tl.begin + threadIdx.x; e < tl.end; e += kThreads) {
    const float rms_old = t.rms[e];
LOPT_UNROLL
    for (int a = 0; a < K; ++a) {
      const double dm = t.m[e * K + a] - mean[a];
      const double dr = rms_old - mean[a];
      acc[a] += dm * dm;
      acc[K + a] += dr * dr;
    }
    float raw[F];
    velo_raw_features(element_state<K, true>(t, d, false, e), K, raw);
LOPT_UNROLL
    for (int f = 0; f < F; ++f) acc[2 * K + f] += static_cast<double>(raw[f]) * raw[f];
  }
  block_sum<W>(acc, part + (c.part_offset[tl.tensor] + tl.index) * W);
}

// Per tensor, one thread per output: stats[first + i] in velo_stats_count's layout (mean p^2,
// mean m (K), var m (K), mean rms, var rms (K)), each sum / n cast to float32 once, and sumsq;
// the update pass's partials summed in tile order.
template <int K>
__global__ void stats_kernel(const __grid_constant__ Chunk c, int first, const double* totals,
                             const double* part, float* stats) {
  constexpr int W1 = sums_width(K);
  constexpr int W = update_width(K);
  constexpr int S = 2 + 3 * K;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= static_cast<int64_t>(c.count) * (W1 + W)) return;
  const int i = static_cast<int>(j / (W1 + W));
  const int q = static_cast<int>(j % (W1 + W));
  const TensorArgs& t = c.t[i];
  const int64_t index = static_cast<int64_t>(first) + i;
  const double n = static_cast<double>(t.n);
  float* s = stats + index * S;
  if (q < W1) {  // sum p^2 -> s[0], sum m_a -> s[1 + a], sum rms -> s[1 + 2K]
    s[q <= K ? q : 1 + 2 * K] = static_cast<float>(totals[index * W1 + q] / n);
    return;
  }
  const int r = q - W1;
  const int64_t tiles = accumulate_tiles(t.n);
  double total = 0.0;
  for (int64_t b = 0; b < tiles; ++b) total += part[(c.part_offset[i] + b) * W + r];
  if (r < 2 * K)  // deviations of m_a (r = a) -> s[1 + K + a], of rms (r = K + a) -> s[2 + 2K + a]
    s[r < K ? 1 + K + r : 2 + K + r] = static_cast<float>(total / n);
  else
    t.sumsq[r - 2 * K] = static_cast<float>(total);
}

// ---------------------------------------------------------------------------------------
// Phase B.

// A chunk's host values: the group index of its first tensor, each tensor's lr and
// decay_mult.
struct VeloChunk {
  int first;
  float lr[kChunk];
  float decay_mult[kChunk];
};

// One block per kApplyTile elements of a tensor, one element per thread at a time. The block
// stages its tensor's MLP weights (velo_mlp's layout) in shared memory, where every thread of a
// warp reads the same weight (a broadcast). H, L > 0: the MLP's sizes at compile time (the
// released 4-wide, 2-hidden-layer net), so that velo_mlp unrolls into registers; 0: `hidden`
// and `layers` at run time.
template <int K, int H, int L>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const __grid_constant__ Chunk c, const __grid_constant__ GroupDecays d,
             const __grid_constant__ VeloChunk v, const float* weights, int hidden, int layers,
             const float* lr_mult, const float* param_scale, float exp_mult, float step_mult) {
  constexpr int F = 6 + 8 * K;
  LOPT_DYNAMIC_SHARED(float, w);
  __shared__ float inv[F];
  const int64_t unit = blockIdx.x;
  const int i = find_tensor(c, unit);
  const TensorArgs& t = c.t[i];
  const int64_t index = static_cast<int64_t>(v.first) + i;
  const int h = H > 0 ? H : hidden;  // the MLP's sizes, constants when specialized
  const int l = H > 0 ? L : layers;
  const int width = velo_mlp_size(K, h, l);
  const float* src = weights + index * width;
  for (int j = threadIdx.x; j < width; j += kThreads) w[j] = src[j];
  if (threadIdx.x < F) inv[threadIdx.x] = normalizer(t.sumsq[threadIdx.x], t.n);
  __syncthreads();
  const float lm = lr_mult[index], scale = param_scale[index];
  const float lr = v.lr[i], decay = v.decay_mult[i];
  const int64_t begin = (unit - c.offset[i]) * kApplyTile;
  const int64_t end = begin + kApplyTile < t.n ? begin + kApplyTile : t.n;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    // A compiler barrier: the weights are read from shared memory for every element (broadcast
    // reads) rather than hoisted out of the loop into ~160 registers per thread, which would
    // leave room for one block per SM. It emits no instruction and changes no result.
    asm volatile("" ::: "memory");
    const ElementState s = element_state<K, false>(t, d, false, e);
    float x[F];
    velo_raw_features(s, K, x);
LOPT_UNROLL
    for (int f = 0; f < F; ++f) x[f] *= inv[f];
    float out[kVeloOutputs];
    velo_mlp(x, 1, w, K, h, l, out);
    const float step = velo_step(out[0], out[1], exp_mult, scale, step_mult, lm);
    const float p = decay != 1.0f ? s.p * decay : s.p;
    store_value(t.p, t.dtype, e, p - lr * step);
  }
}

// ---------------------------------------------------------------------------------------
// Launchers.

template <int K>
int accumulate_k(const TensorArgs* tensors, int count, const GroupDecays& d, float* stats,
                 double* partials, cudaStream_t stream) {
  constexpr int W1 = sums_width(K);
  constexpr int W = update_width(K);
  if (const int err = lopt_small_fc_reduce_cuda(tensors, count, &d, stream); err != 0) return err;
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) tiles += accumulate_tiles(tensors[i].n);
  // Scratch: pass 1 partial rows [tiles, W1], their per-tensor totals [count, W1], the
  // update pass's partial rows [tiles, W] (lopt_velo_partials).
  double* sums_part = partials;
  double* totals = sums_part + tiles * W1;
  double* update_part = totals + static_cast<int64_t>(count) * W1;
  // Partial rows are numbered across all chunks, so each chunk's tensors get their own.
  int64_t next_row = 0;
  return for_each_chunk(
      tensors, count, [](const TensorArgs& t) { return accumulate_tiles(t.n); },
      [&](Chunk& c, int first) {
        for (int i = 0; i < c.count; ++i) {
          c.part_offset[i] = next_row;
          next_row += accumulate_tiles(c.t[i].n);
        }
        const unsigned tile_blocks = static_cast<unsigned>(c.offset[c.count]);
        LOPT_LAUNCH(tile_blocks, kThreads, 0, stream, sums_kernel<K>)(c, sums_part);
        int err = last_error();
        if (err != 0) return err;
        LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.count * W1, kThreads)), kThreads, 0,
                    stream, totals_kernel<K>)(c, first, sums_part, totals);
        err = last_error();
        if (err != 0) return err;
        LOPT_LAUNCH(tile_blocks, kThreads, 0, stream, update_kernel<K>)(c, d, first, totals,
                                                                         update_part);
        err = last_error();
        if (err != 0) return err;
        LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.count * (W1 + W), kThreads)), kThreads,
                    0, stream, stats_kernel<K>)(c, first, totals, update_part, stats);
        return last_error();
      });
}

template <int K, int H, int L>
int apply_launch(const Chunk& c, const GroupDecays& d, const VeloChunk& v, const float* weights,
                 int hidden, int layers, const float* lr_mult, const float* param_scale,
                 float exp_mult, float step_mult, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        apply_kernel<K, H, L>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  LOPT_LAUNCH(static_cast<unsigned>(c.offset[c.count]), kThreads, smem, stream,
              apply_kernel<K, H, L>)(
      c, d, v, weights, hidden, layers, lr_mult, param_scale, exp_mult, step_mult);
  return last_error();
}

template <int K>
int apply_k(const TensorArgs* tensors, int count, const GroupDecays& d, const float* weights,
            int hidden, int layers, const float* lr_mult, const float* param_scale,
            const float* lr, const float* decay_mult, float exp_mult, float step_mult,
            cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(velo_mlp_size(K, hidden, layers)) * sizeof(float);
  const bool released = hidden == 4 && layers == 2;
  VeloChunk v{};
  return for_each_chunk(
      tensors, count, [](const TensorArgs& t) { return blocks_for(t.n, kApplyTile); },
      [&](Chunk& c, int first) {
        v.first = first;
        for (int i = 0; i < c.count; ++i) {
          v.lr[i] = lr[first + i];
          v.decay_mult[i] = decay_mult[first + i];
        }
        return released
                   ? apply_launch<K, 4, 2>(c, d, v, weights, hidden, layers, lr_mult,
                                           param_scale, exp_mult, step_mult, smem, stream)
                   : apply_launch<K, 0, 0>(c, d, v, weights, hidden, layers, lr_mult,
                                           param_scale, exp_mult, step_mult, smem, stream);
      });
}

}  // namespace

extern "C" {

int lopt_velo_accumulate_cuda(const TensorArgs* tensors, int count, const GroupDecays* decays,
                              float* stats, double* partials, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (decays->k) {
    case 1: return accumulate_k<1>(tensors, count, *decays, stats, partials, s);
    case 2: return accumulate_k<2>(tensors, count, *decays, stats, partials, s);
    case 3: return accumulate_k<3>(tensors, count, *decays, stats, partials, s);
    case 4: return accumulate_k<4>(tensors, count, *decays, stats, partials, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int64_t lopt_velo_partials(const TensorArgs* tensors, int count, int k) {
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) tiles += accumulate_tiles(tensors[i].n);
  return tiles * (sums_width(k) + update_width(k)) + static_cast<int64_t>(count) * sums_width(k);
}

int lopt_velo_apply_cuda(const TensorArgs* tensors, int count, const GroupDecays* decays,
                         const float* weights, int hidden, int layers, const float* lr_mult,
                         const float* param_scale, const float* lr, const float* decay_mult,
                         float exp_mult, float step_mult, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (decays->k) {
    case 1: return apply_k<1>(tensors, count, *decays, weights, hidden, layers, lr_mult,
                              param_scale, lr, decay_mult, exp_mult, step_mult, s);
    case 2: return apply_k<2>(tensors, count, *decays, weights, hidden, layers, lr_mult,
                              param_scale, lr, decay_mult, exp_mult, step_mult, s);
    case 3: return apply_k<3>(tensors, count, *decays, weights, hidden, layers, lr_mult,
                              param_scale, lr, decay_mult, exp_mult, step_mult, s);
    case 4: return apply_k<4>(tensors, count, *decays, weights, hidden, layers, lr_mult,
                              param_scale, lr, decay_mult, exp_mult, step_mult, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // extern "C"
