// CUDA backend of the fused small_fc_lopt step (see small_fc_lopt_cuda.h). Pure CUDA C++: no
// torch headers. The per-element math is the header's, as on the CPU; the chunking, the warp
// sums and the per-element state are multi_tensor_cuda.cuh's.
#include <cuda_runtime.h>

#include "multi_tensor_cuda.cuh"
#include "small_fc_lopt_cuda.h"

namespace {

using namespace lopt;
using namespace lopt::gpu;

// ---------------------------------------------------------------------------------------
// Phase 1a: one warp per v_row entry (sum over d0) and per v_col entry (sum over d1); for a
// sharded tensor (entry_sums set) only the sums, written for the caller to complete.
__global__ void rowcol_kernel(const __grid_constant__ Chunk c,
                              const __grid_constant__ GroupDecays d) {
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (unit >= c.offset[c.count]) return;
  const int i = find_tensor(c, unit);
  const TensorArgs& t = c.t[i];
  int64_t e = unit - c.offset[i];
  const bool is_row = e < t.n_row;
  if (!is_row) e -= t.n_row;
  const int del = is_row ? t.d0 : t.d1;
  const int64_t base = deleted_axis_base(t.ix.size, t.ix.rank, del, e);
  const int64_t stride = axis_stride(t.ix.size, t.ix.rank, del);
  const int64_t len = t.ix.size[del];
  double s = 0.0;
  for (int64_t j = lane; j < len; j += 32) {
    const int64_t q = base + j * stride;
    s += factored_grad_sq(effective_grad(
        load_value(t.g, t.dtype, q), t.grad_wd != 0.0f ? load_value(t.p, t.dtype, q) : 0.0f,
        t.grad_wd, t.grad_clip));
  }
  s = warp_sum(s);
  if (t.entry_sums != nullptr) {  // a sharded tensor: the caller completes the sum
    if (lane == 0) t.entry_sums[(is_row ? 0 : t.n_row) + e] = s;
    return;
  }
  if (lane < d.k) {
    const float mean = static_cast<float>(s / static_cast<double>(len));
    float* v = (is_row ? t.v_row : t.v_col) + e * d.k + lane;
    *v = factored_update(d, lane, *v, mean);
  }
}

// Phase 1b: one warp per row-column mean entry (row factors of the v_row entries along
// reduced_d1), then warps of 32 column-factor values.
__global__ void factor_kernel(const __grid_constant__ Chunk c,
                              const __grid_constant__ GroupDecays d) {
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (unit >= c.offset[c.count]) return;
  const int i = find_tensor(c, unit);
  const TensorArgs& t = c.t[i];
  const int64_t e = unit - c.offset[i];
  const int k = d.k;
  if (e >= t.n_rcm) {
    const int64_t j = (e - t.n_rcm) * 32 + lane;
    if (j < t.n_col * k) t.col_factor[j] = safe_rsqrt(t.v_col[j]);
    return;
  }
  int64_t row_shape[kMaxRank];
  int r = 0;
  for (int dim = 0; dim < t.ix.rank; ++dim)
    if (dim != t.d0) row_shape[r++] = t.ix.size[dim];
  const int reduced_d1 = t.d1 > t.d0 ? t.d1 - 1 : t.d1;
  const int64_t len = row_shape[reduced_d1];
  const int64_t step = axis_stride(row_shape, t.ix.rank - 1, reduced_d1);
  const int64_t base = deleted_axis_base(row_shape, t.ix.rank - 1, reduced_d1, e);
  for (int a = 0; a < k; ++a) {
    double s = 0.0;
    for (int64_t x = lane; x < len; x += 32) s += t.v_row[(base + x * step) * k + a];
    s = warp_sum(s);
    const float mean = static_cast<float>(s / static_cast<double>(len));
    for (int64_t x = lane; x < len; x += 32) {
      const int64_t q = (base + x * step) * k + a;
      t.row_factor[q] = safe_rsqrt(t.v_row[q] / (mean + kRowColMeanEps));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Phase 2: one warp per tile of accumulate_tile(n) elements; each tile's sums of squares of
// the raw features in float64, in reduction order 1 (lane l takes the tile's elements l,
// l + 32, ...; warp_sum's butterfly), into the tile's partial row.
template <int K>
__global__ void __launch_bounds__(kThreads)
accumulate_kernel(const __grid_constant__ Chunk c, const __grid_constant__ GroupDecays d,
                  bool head_variant, double* partials) {
  constexpr int F = 4 + 8 * K;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (unit >= c.offset[c.count]) return;
  const int i = find_tensor(c, unit);
  const TensorArgs& t = c.t[i];
  const int64_t tile_index = unit - c.offset[i];
  const int64_t tile = accumulate_tile(t.n);
  const int64_t begin = tile_index * tile;
  const int64_t end = begin + tile < t.n ? begin + tile : t.n;
  double s[F];
  for (int f = 0; f < F; ++f) s[f] = 0.0;
  for (int64_t e = begin + lane; e < end; e += kReduceLanes) {
    float raw[F];
    raw_features(element_state<K, true>(t, d, head_variant, e), K, raw);
    for (int f = 0; f < F; ++f) s[f] += static_cast<double>(raw[f]) * raw[f];
  }
  for (int f = 0; f < F; ++f) {
    const double v = warp_sum(s[f]);
    if (lane == 0) partials[(c.part_offset[i] + tile_index) * F + f] = v;
  }
}

// Phase 2, final: sumsq[f] of each tensor = its tiles' partials summed in order.
template <int K>
__global__ void sumsq_kernel(const __grid_constant__ Chunk c, const double* partials) {
  constexpr int F = 4 + 8 * K;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= static_cast<int64_t>(c.count) * F) return;
  const int i = static_cast<int>(j / F);
  const int f = static_cast<int>(j % F);
  const TensorArgs& t = c.t[i];
  const int64_t tiles = accumulate_tiles(t.n);
  double total = 0.0;
  for (int64_t b = 0; b < tiles; ++b) total += partials[(c.part_offset[i] + b) * F + f];
  t.sumsq[f] = static_cast<float>(total);
  if (t.sums != nullptr) t.sums[f] = total;
}

// ---------------------------------------------------------------------------------------
// Phase 3: one block per kApplyTile elements of a tensor, one element per thread at a time.
// The MLP weights are staged in shared memory (every thread of a warp reads the same weight:
// a broadcast); H > 0 specializes the 2-hidden-layer network of width H.
template <int K, int H>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const __grid_constant__ Chunk c, const __grid_constant__ GroupDecays d,
             bool head_variant, const __grid_constant__ MlpView net, float exp_mult,
             float step_mult, float lr) {
  constexpr int F = 4 + 8 * K;
  LOPT_DYNAMIC_SHARED(float, smem);
  __shared__ float inv[F];
  const int64_t unit = blockIdx.x;
  const int i = find_tensor(c, unit);
  const TensorArgs& t = c.t[i];
  // Stage the weights: layer l's w then b, in order.
  const float* w[kMaxLayers];
  const float* b[kMaxLayers];
  int off = 0;
  for (int l = 0; l < net.layers; ++l) {
    const int nw = net.sizes[l] * net.sizes[l + 1];
    for (int j = threadIdx.x; j < nw; j += kThreads) smem[off + j] = net.w[l][j];
    w[l] = smem + off;
    off += nw;
    for (int j = threadIdx.x; j < net.sizes[l + 1]; j += kThreads) smem[off + j] = net.b[l][j];
    b[l] = smem + off;
    off += net.sizes[l + 1];
  }
  if (threadIdx.x < F) inv[threadIdx.x] = normalizer(t.sumsq[threadIdx.x], t.n_total);
  __syncthreads();
  const int64_t begin = (unit - c.offset[i]) * kApplyTile;
  const int64_t end = begin + kApplyTile < t.n ? begin + kApplyTile : t.n;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const ElementState s = element_state<K, false>(t, d, head_variant, e);
    float x[F + kNumTimeFeatures];
    raw_features(s, K, x);
    for (int f = 0; f < F; ++f) x[f] *= inv[f];
    for (int f = 0; f < kNumTimeFeatures; ++f) x[F + f] = t.time[f];
    float out[2];
    if (H > 0) {
      float h1[H > 0 ? H : 1], h2[H > 0 ? H : 1];
      mlp_layer(w[0], b[0], F + kNumTimeFeatures, H, true, x, h1);
      mlp_layer(w[1], b[1], H, H, true, h1, h2);
      mlp_layer(w[2], b[2], H, 2, false, h2, out);
    } else {
      float buf_a[kMaxHidden], buf_b[kMaxHidden];
      const float* in = x;
      for (int l = 0; l < net.layers; ++l) {
        const bool hidden = l != net.layers - 1;
        float* target = hidden ? (l % 2 == 0 ? buf_a : buf_b) : out;
        mlp_layer(w[l], b[l], net.sizes[l], net.sizes[l + 1], hidden, in, target);
        in = target;
      }
    }
    store_value(t.p, t.dtype, e,
                s.p - step_from_output(out[0], out[1], exp_mult, step_mult, t.scale, lr));
  }
}

// ---- GPU model: memory traffic per kernel ------------------------------------------------
// One line per kernel: the arrays it reads and writes per element of the tensors it runs
// over, then after `|` those it reads or writes per factored entry or per tensor (a small
// share). `x*k`: k floats per element; `x*2`: read twice; `p`, `g`: one value in the
// parameter's dtype, every other array float32; `[wd]`: only with a nonzero grad_wd. Reads
// are the arrays the results depend on (what the emulator's probe sees).
// lopt_port/gpu_model.py parses these lines (its bytes per parameter follow from them) and
// tests/test_gpu_model.py holds them against the buffers each launch reads and writes under
// the emulator's probe. Keep them in step with the kernels.
// traffic rowcol_kernel: reads g*2 p*2[wd] | v_row v_col; writes | v_row v_col
// traffic factor_kernel: reads | v_row v_col; writes | row_factor col_factor
// traffic accumulate_kernel: reads p g m*k rms v_diag*k | v_row v_col row_factor col_factor; writes m*k rms v_diag*k | partials
// traffic sumsq_kernel: reads | partials; writes | sumsq
// traffic apply_kernel: reads p g m*k rms v_diag*k | v_row v_col row_factor col_factor sumsq mlp; writes p
// ---- end of GPU model ----------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Launchers.

// Phase 1a over every chunk: a warp per v_row and v_col entry of the factored tensors.
int rowcol_launches(const TensorArgs* tensors, int count, const GroupDecays& d,
                    cudaStream_t s) {
  return for_each_chunk(
      tensors, count,
      [](const TensorArgs& t) { return t.factored ? t.n_row + t.n_col : int64_t{0}; },
      [&](Chunk& c, int) {
        LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.offset[c.count], kWarps)), kThreads, 0,
                    s, rowcol_kernel)(c, d);
        return last_error();
      });
}

template <int K>
int accumulate_k(const TensorArgs* tensors, int count, const GroupDecays& d, bool head,
                 double* partials, cudaStream_t stream) {
  constexpr int F = 4 + 8 * K;
  // Partial rows are numbered across all chunks, so each chunk's tensors get their own.
  int64_t next_row = 0;
  return for_each_chunk(
      tensors, count, [](const TensorArgs& t) { return accumulate_tiles(t.n); },
      [&](Chunk& c, int) {
        for (int i = 0; i < c.count; ++i) {
          c.part_offset[i] = next_row;
          next_row += accumulate_tiles(c.t[i].n);
        }
        LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.offset[c.count], kWarps)), kThreads, 0,
                    stream, accumulate_kernel<K>)(c, d, head, partials);
        int err = last_error();
        if (err != 0) return err;
        LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.count * F, kThreads)), kThreads, 0,
                    stream, sumsq_kernel<K>)(c, partials);
        return last_error();
      });
}

template <int K, int H>
int apply_launch(const Chunk& c, const GroupDecays& d, bool head, const MlpView& net,
                 float exp_mult, float step_mult, float lr, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        apply_kernel<K, H>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  LOPT_LAUNCH(static_cast<unsigned>(c.offset[c.count]), kThreads, smem, stream,
              apply_kernel<K, H>)(
      c, d, head, net, exp_mult, step_mult, lr);
  return last_error();
}

template <int K>
int apply_k(const TensorArgs* tensors, int count, const GroupDecays& d, bool head,
            const MlpView& net, float exp_mult, float step_mult, float lr,
            cudaStream_t stream) {
  size_t floats = 0;
  for (int l = 0; l < net.layers; ++l)
    floats += static_cast<size_t>(net.sizes[l] + 1) * net.sizes[l + 1];
  const size_t smem = floats * sizeof(float);
  const bool h32 = net.layers == 3 && net.sizes[1] == 32 && net.sizes[2] == 32;
  return for_each_chunk(
      tensors, count, [](const TensorArgs& t) { return blocks_for(t.n, kApplyTile); },
      [&](Chunk& c, int) {
        return h32 ? apply_launch<K, 32>(c, d, head, net, exp_mult, step_mult, lr, smem, stream)
                   : apply_launch<K, 0>(c, d, head, net, exp_mult, step_mult, lr, smem, stream);
      });
}

}  // namespace

extern "C" {

int lopt_factored_sums_cuda(const TensorArgs* tensors, int count, const GroupDecays* decays,
                            void* stream) {
  return rowcol_launches(tensors, count, *decays, static_cast<cudaStream_t>(stream));
}

int lopt_small_fc_reduce_cuda(const TensorArgs* tensors, int count, const GroupDecays* decays,
                              void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const GroupDecays d = *decays;
  const int err = rowcol_launches(tensors, count, d, s);
  if (err != 0) return err;
  const int k = d.k;
  return for_each_chunk(
      tensors, count,
      [k](const TensorArgs& t) {
        return t.factored ? t.n_rcm + blocks_for(t.n_col * k, 32) : int64_t{0};
      },
      [&](Chunk& c, int) {
        LOPT_LAUNCH(static_cast<unsigned>(blocks_for(c.offset[c.count], kWarps)), kThreads, 0,
                    s, factor_kernel)(c, d);
        return last_error();
      });
}

int lopt_small_fc_accumulate_cuda(const TensorArgs* tensors, int count,
                                  const GroupDecays* decays, bool head_variant,
                                  double* partials, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (decays->k) {
    case 1: return accumulate_k<1>(tensors, count, *decays, head_variant, partials, s);
    case 2: return accumulate_k<2>(tensors, count, *decays, head_variant, partials, s);
    case 3: return accumulate_k<3>(tensors, count, *decays, head_variant, partials, s);
    case 4: return accumulate_k<4>(tensors, count, *decays, head_variant, partials, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int lopt_small_fc_apply_cuda(const TensorArgs* tensors, int count, const GroupDecays* decays,
                             bool head_variant, const MlpView* net, float exp_mult,
                             float step_mult, float lr, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (decays->k) {
    case 1: return apply_k<1>(tensors, count, *decays, head_variant, *net, exp_mult, step_mult, lr, s);
    case 2: return apply_k<2>(tensors, count, *decays, head_variant, *net, exp_mult, step_mult, lr, s);
    case 3: return apply_k<3>(tensors, count, *decays, head_variant, *net, exp_mult, step_mult, lr, s);
    case 4: return apply_k<4>(tensors, count, *decays, head_variant, *net, exp_mult, step_mult, lr, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int64_t lopt_small_fc_partials(const TensorArgs* tensors, int count, int k) {
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) tiles += accumulate_tiles(tensors[i].n);
  return tiles * raw_feature_count(k);
}

const char* lopt_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
