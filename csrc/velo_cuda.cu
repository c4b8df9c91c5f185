// CUDA backend of the fused VeLO step (see velo_cuda.h): velo_cpu.cpp's quantities in the same
// reduction orders (reduction_order.h), with the header's per-element math. Pure CUDA C++, no
// torch headers; the chunking and the per-element state are multi_tensor_cuda.cuh's.
//
// Phase A, after lopt_small_fc_reduce_cuda (the factored statistics; a sharded step has formed
// them before: factored_ready), per chunk of tensors:
//   update_kernel  one warp per tile: the moments of the old state, the moving averages
//                  (stored) and the squares of the new state's features, lanes as in
//                  reduction orders 1-3, into the tile's partial row;
//   side_kernel    one warp per side column of each factored tensor (reduction order 5);
//   stats_kernel   one block per tensor: the tiles' rows in order, velo_stats, sumsq (and for
//                  a sharded tensor its float64 sums, for the caller to complete).
// No atomics: results depend on the data only.
// Phase B: apply_kernel, one block per kApplyTile elements of one tensor, with that tensor's
// MLP weights in shared memory.
#include "velo_cuda.h"

#include <cuda_runtime.h>

#include "multi_tensor_cuda.cuh"
#include "small_fc_lopt_cuda.h"

namespace {

using namespace lopt;
using namespace lopt::gpu;

// A tile's partial row: the moments (VeloMoments), then the F feature columns.
__host__ __device__ constexpr int row_width(int k) { return velo_moment_count(k) + 6 + 8 * k; }

// Side columns per tensor: (2 * rs + side) * K + a for side (v_row, v_col), rs (value, rsqrt).
__host__ __device__ constexpr int side_columns(int k) { return 4 * k; }

// Reduction unit `unit` (a warp): tile `index` (accumulate_tile(n) elements, [begin, end)) of
// tensor `tensor` of the chunk.
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

// One warp per tile. Lane l takes the tile's elements l, l + 32, ... in order: the old state's
// moments in float64, then this step's moving averages (stored) and the squares of the new
// state's features in square blocks of kSquareRounds elements (a factored tensor's side
// columns excepted: side_kernel), then warp_sum per column into the tile's partial row.
template <int K>
__global__ void __launch_bounds__(kThreads)
update_kernel(const __grid_constant__ Chunk c, const __grid_constant__ GroupDecays d,
              double* part) {
  constexpr int F = 6 + 8 * K;
  constexpr int M = VeloMoments<K>::kCount;
  constexpr int W = row_width(K);
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (unit >= c.offset[c.count]) return;
  const Tile tl = tile_of(c, unit);
  const TensorArgs& t = c.t[tl.tensor];
  const int skip0 = t.factored ? 6 + 3 * K : F, skip1 = t.factored ? 6 + 7 * K : F;
  double acc[W];
  float block[F];
  LOPT_UNROLL
  for (int w = 0; w < W; ++w) acc[w] = 0.0;
  LOPT_UNROLL
  for (int f = 0; f < F; ++f) block[f] = 0.0f;
  int round = 0;
  for (int64_t e = tl.begin + lane; e < tl.end; e += kReduceLanes, ++round) {
    float m_old[K];
    LOPT_UNROLL
    for (int a = 0; a < K; ++a) m_old[a] = t.m[e * K + a];
    velo_add_moments<K>(acc, 1, load_value(t.p, t.dtype, e), t.rms[e], m_old);
    float x[F];
    velo_raw_features(element_state<K, true>(t, d, false, e), K, x);
    const bool flush = round % kSquareRounds == kSquareRounds - 1 || e + kReduceLanes >= tl.end;
    LOPT_UNROLL
    for (int f = 0; f < F; ++f) {
      if (f >= skip0 && f < skip1) continue;
      block[f] = square_into(block[f], x[f]);
      if (flush) {
        acc[M + f] += block[f];
        block[f] = 0.0f;
      }
    }
  }
  double* row = part + (c.part_offset[tl.tensor] + tl.index) * W;
  LOPT_UNROLL
  for (int w = 0; w < W; ++w) {
    const double v = warp_sum(acc[w]);
    if (lane == 0) row[w] = v;
  }
}

// One warp per side column of each factored tensor (reduction order 5): the entries' features
// squared in float64, in lanes, times the number of elements sharing an entry, into
// side[(first + i) * side_columns(K) + column].
template <int K>
__global__ void __launch_bounds__(kThreads)
side_kernel(const __grid_constant__ Chunk c, int first, double* side) {
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (unit >= c.offset[c.count]) return;
  const int i = find_tensor(c, unit);
  const TensorArgs& t = c.t[i];
  const int q = static_cast<int>(unit - c.offset[i]);
  const int a = q % K, is_col = (q / K) % 2, rsqrt_group = q / (2 * K);
  const float* v = is_col ? t.v_col : t.v_row;
  const int64_t entries = is_col ? t.n_col : t.n_row;
  double s = 0.0;
  for (int64_t r = lane; r < entries; r += kReduceLanes) {
    const double f = velo_side_feature(v[r * K + a], rsqrt_group != 0);
    s += f * f;
  }
  s = warp_sum(s);
  if (lane == 0)
    side[(static_cast<int64_t>(first) + i) * side_columns(K) + q] =
        s * static_cast<double>(t.n / entries);
}

// One block per tensor of the chunk: thread w < W adds column w of the tensor's tiles' rows in
// tile order; then stats (velo_stats) and sumsq (the side columns of a factored tensor from
// side_kernel).
template <int K>
__global__ void __launch_bounds__(kThreads)
stats_kernel(const __grid_constant__ Chunk c, int first, const double* part, const double* side,
             float* stats) {
  constexpr int F = 6 + 8 * K;
  constexpr int M = VeloMoments<K>::kCount;
  constexpr int W = row_width(K);
  __shared__ double total[W];
  const int i = blockIdx.x;
  const TensorArgs& t = c.t[i];
  const int64_t index = static_cast<int64_t>(first) + i;
  if (threadIdx.x < W) {
    const int64_t tiles = accumulate_tiles(t.n);
    double s = 0.0;
    for (int64_t b = 0; b < tiles; ++b) s += part[(c.part_offset[i] + b) * W + threadIdx.x];
    total[threadIdx.x] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) velo_stats<K>(total, t.n, stats + index * velo_stats_count(K));
  if (t.sums != nullptr && threadIdx.x < M) t.sums[threadIdx.x] = total[threadIdx.x];
  if (threadIdx.x < F) {
    const int f = threadIdx.x;
    const int c0 = 6 + 3 * K;
    const bool from_side = t.factored && f >= c0 && f < c0 + side_columns(K);
    const double sum = from_side ? side[index * side_columns(K) + f - c0] : total[M + f];
    t.sumsq[f] = static_cast<float>(sum);
    if (t.sums != nullptr) t.sums[M + f] = sum;
  }
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
  if (threadIdx.x < F) inv[threadIdx.x] = normalizer(t.sumsq[threadIdx.x], t.n_total);
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
    float out[1][kVeloOutputs];
    velo_mlp<float, K, H, L, 1, false>(VeloElementInputs{x, 1, inv}, w, h, l, out);
    const float step = velo_step(out[0][0], out[0][1], exp_mult, scale, step_mult, lm);
    const float p = decay != 1.0f ? s.p * decay : s.p;
    store_value(t.p, t.dtype, e, p - lr * step);
  }
}

// ---- GPU model: memory traffic per kernel ------------------------------------------------
// As in small_fc_lopt_cuda.cu (whose rowcol_kernel and factor_kernel phase A launches first):
// per element `|` per factored entry or per tensor; lopt_port/gpu_model.py parses these lines
// and tests/test_gpu_model.py holds them against the emulator's probe.
// traffic update_kernel: reads p g m*k rms v_diag*k | row_factor col_factor; writes m*k rms v_diag*k | partials
// traffic side_kernel: reads | v_row v_col; writes | partials
// traffic stats_kernel: reads | partials; writes | stats sumsq
// traffic apply_kernel: reads p g m*k rms v_diag*k | v_row v_col row_factor col_factor sumsq weights lr_mult param_scale; writes p
// ---- end of GPU model ----------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Launchers.

template <int K>
int accumulate_k(const TensorArgs* tensors, int count, const GroupDecays& d,
                 bool factored_ready, float* stats, double* partials, cudaStream_t stream) {
  if (!factored_ready)
    if (const int err = lopt_small_fc_reduce_cuda(tensors, count, &d, stream); err != 0)
      return err;
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) tiles += accumulate_tiles(tensors[i].n);
  // Scratch (lopt_velo_partials): the tiles' partial rows [tiles, W], then the side columns
  // [count, side_columns(K)].
  double* part = partials;
  double* side = part + tiles * row_width(K);
  // Partial rows are numbered across all chunks, so each chunk's tensors get their own.
  int64_t next_row = 0;
  return for_each_chunk(
      tensors, count, [](const TensorArgs& t) { return accumulate_tiles(t.n); },
      [&](Chunk& c, int first) {
        for (int i = 0; i < c.count; ++i) {
          c.part_offset[i] = next_row;
          next_row += accumulate_tiles(c.t[i].n);
        }
        LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.offset[c.count], kWarps)), kThreads, 0,
                    stream, update_kernel<K>)(c, d, part);
        int err = last_error();
        if (err != 0) return err;
        // The side columns' units: side_columns(K) warps per factored tensor.
        Chunk sides = c;
        for (int i = 0; i < c.count; ++i)
          sides.offset[i + 1] = sides.offset[i] + (c.t[i].factored ? side_columns(K) : 0);
        if (sides.offset[c.count] > 0) {
          LOPT_LAUNCH(static_cast<unsigned>(blocks_for(sides.offset[c.count], kWarps)),
                      kThreads, 0, stream, side_kernel<K>)(sides, first, side);
          err = last_error();
          if (err != 0) return err;
        }
        LOPT_LAUNCH(static_cast<unsigned>(c.count), kThreads, 0, stream, stats_kernel<K>)(
            c, first, part, side, stats);
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
                              bool factored_ready, float* stats, double* partials,
                              void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (decays->k) {
    case 1: return accumulate_k<1>(tensors, count, *decays, factored_ready, stats, partials, s);
    case 2: return accumulate_k<2>(tensors, count, *decays, factored_ready, stats, partials, s);
    case 3: return accumulate_k<3>(tensors, count, *decays, factored_ready, stats, partials, s);
    case 4: return accumulate_k<4>(tensors, count, *decays, factored_ready, stats, partials, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int64_t lopt_velo_partials(const TensorArgs* tensors, int count, int k) {
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) tiles += accumulate_tiles(tensors[i].n);
  return tiles * row_width(k) + static_cast<int64_t>(count) * side_columns(k);
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
