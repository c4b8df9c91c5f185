// CPU backend of the fused small_fc_lopt step (see small_fc_lopt_cpu.h).
//
// Elements are processed in groups of kLanes: a scalar loop gathers each element's inputs
// (parameter dtype conversion, factored indices by cursor), then an `omp simd` loop runs the
// header's per-element feature math across the lanes, and the MLP runs on the lane group as
// a small matrix product. Work is split into fixed tiles, so results never depend on the
// number of threads.
#include "small_fc_lopt_cpu.h"

#include <algorithm>

#include "cpu_lanes.h"
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 reports its own avx512fintrin.h internals (`__m512 __Y = __Y;`) as maybe
// uninitialized once inlined at -O3: a known false positive, not this file's code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lopt {
namespace {

using cpu::kLanes;
using cpu::LaneInputs;
using cpu::WorkItem;
using cpu::gather;
using cpu::lane_state;

// Phase 2 on one tile: sums of squares of the raw features in float64, in reduction order 1
// (lane = offset in the tile mod 32, lane_tree_sum), into out[F].
template <int K, bool Factored>
void accumulate_tile_cpu(const TensorArgs& t, const GroupDecays& d, bool head_variant,
                         int64_t begin, int64_t end, double* out) {
  constexpr int F = 4 + 8 * K;
  alignas(64) double acc[F][kReduceLanes] = {};
  alignas(64) float raw[F * kLanes];
  LaneInputs in;
  FactoredCursor cur;
  if (Factored) cur.start(t.ix, begin);
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - i0));
    gather<K, Factored, true>(t, d, i0, lanes, cur, in);
#pragma omp simd
    for (int e = 0; e < kLanes; ++e)
      raw_features(lane_state<K, Factored>(in, e, head_variant), K, raw + e, kLanes);
    if (lanes < kLanes)  // the tile's last group: unused lanes add nothing
      for (int f = 0; f < F; ++f)
        for (int e = lanes; e < kLanes; ++e) raw[f * kLanes + e] = 0.0f;
    const int h = cpu::half(i0 - begin) * kLanes;
    for (int f = 0; f < F; ++f)
#pragma omp simd
      for (int e = 0; e < kLanes; ++e) {
        const double v = raw[f * kLanes + e];
        acc[f][h + e] += v * v;
      }
  }
  cpu::tree_sum_rows(acc, F, out);
}

// The MLP for kLanes elements at once: the header's mlp_layer on 16-lane values (one
// AVX-512 register per quantity). x: feature-major inputs (x[i * kLanes + e]); out likewise.
void mlp_forward_lanes(const MlpView& net, const float* x, float* out) {
  Lanes16 buf[2][kMaxHidden];
  // x and out hold kLanes floats per quantity, Lanes16's layout.
  const Lanes16* in = reinterpret_cast<const Lanes16*>(x);
  for (int l = 0; l < net.layers; ++l) {
    const bool last = l == net.layers - 1;
    Lanes16* target = last ? reinterpret_cast<Lanes16*>(out) : buf[l % 2];
    mlp_layer<Lanes16>(net.w[l], net.b[l], net.sizes[l], net.sizes[l + 1], !last, in, target);
    in = target;
  }
}

// Phase 3 on elements [begin, end) of one tensor; inv[f] is the feature's normalizer.
template <int K, bool Factored>
void apply_range(const TensorArgs& t, const GroupDecays& d, bool head_variant,
                 const float* inv, const MlpView& net, float exp_mult, float step_mult,
                 float lr, int64_t begin, int64_t end) {
  constexpr int F = 4 + 8 * K;
  alignas(64) float x[(F + kNumTimeFeatures) * kLanes];
  for (int f = 0; f < kNumTimeFeatures; ++f)
    for (int e = 0; e < kLanes; ++e) x[(F + f) * kLanes + e] = t.time[f];
  LaneInputs in;
  FactoredCursor cur;
  if (Factored) cur.start(t.ix, begin);
  alignas(64) float out[2 * kLanes];
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - i0));
    gather<K, Factored, false>(t, d, i0, lanes, cur, in);
#pragma omp simd
    for (int e = 0; e < kLanes; ++e)
      raw_features(lane_state<K, Factored>(in, e, head_variant), K, x + e, kLanes);
    for (int f = 0; f < F; ++f)
#pragma omp simd
      for (int e = 0; e < kLanes; ++e) x[f * kLanes + e] *= inv[f];
    mlp_forward_lanes(net, x, out);
    for (int e = 0; e < lanes; ++e)
      store_value(t.p, t.dtype, i0 + e,
                  in.p[e] - step_from_output(out[e], out[kLanes + e], exp_mult, step_mult,
                                             t.scale, lr));
  }
}

template <int K>
void accumulate_k(const TensorArgs* t, int count, const GroupDecays& d, bool head_variant) {
  constexpr int F = 4 + 8 * K;
  const std::vector<WorkItem> items = cpu::accumulate_items(t, count);
  std::vector<double> partial(items.size() * F);
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const WorkItem& it = items[w];
    const TensorArgs& ti = t[it.tensor];
    double* out = partial.data() + w * F;
    if (ti.factored)
      accumulate_tile_cpu<K, true>(ti, d, head_variant, it.begin, it.end, out);
    else
      accumulate_tile_cpu<K, false>(ti, d, head_variant, it.begin, it.end, out);
  }
  const std::vector<double> total = cpu::per_tensor(items, partial, count, F);
  for (int i = 0; i < count; ++i)
    for (int f = 0; f < F; ++f) {
      t[i].sumsq[f] = static_cast<float>(total[i * F + f]);
      if (t[i].sums != nullptr) t[i].sums[f] = total[i * F + f];
    }
}

template <int K>
void apply_k(const TensorArgs* t, int count, const GroupDecays& d, bool head_variant,
             const MlpView& net, float exp_mult, float step_mult, float lr) {
  constexpr int F = 4 + 8 * K;
  const std::vector<float> inv = cpu::normalizers(t, count, F);
  const std::vector<WorkItem> items = cpu::apply_items(t, count);
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(static)
  for (int64_t w = 0; w < n_items; ++w) {
    const WorkItem& it = items[w];
    const TensorArgs& ti = t[it.tensor];
    const float* iv = inv.data() + it.tensor * F;
    if (ti.factored)
      apply_range<K, true>(ti, d, head_variant, iv, net, exp_mult, step_mult, lr, it.begin,
                           it.end);
    else
      apply_range<K, false>(ti, d, head_variant, iv, net, exp_mult, step_mult, lr, it.begin,
                            it.end);
  }
}

// Phase 1's sums for one tensor in one pass over its elements, in reduction order 4: an
// element's term goes to lane (its coordinate along d0) mod 32 of its v_row entry's sum and to
// lane (its coordinate along d1) mod 32 of its v_col entry's (lane-major accumulators).
void reduce_one(const TensorArgs& t, const GroupDecays& d) {
  std::vector<double> row_acc(kReduceLanes * t.n_row, 0.0), col_acc(kReduceLanes * t.n_col, 0.0);
  FactoredCursor cur;
  cur.start(t.ix, 0);
  for (int64_t i = 0; i < t.n; ++i, cur.next()) {
    const float gs = factored_grad_sq(effective_grad(
        load_value(t.g, t.dtype, i), t.grad_wd != 0.0f ? load_value(t.p, t.dtype, i) : 0.0f,
        t.grad_wd, t.grad_clip));
    row_acc[(cur.coord[t.d0] % kReduceLanes) * t.n_row + cur.row] += gs;
    col_acc[(cur.coord[t.d1] % kReduceLanes) * t.n_col + cur.col] += gs;
  }
  small_fc_reduce_finish(t, d, cpu::entry_totals(row_acc.data(), t.n_row).data(),
                         cpu::entry_totals(col_acc.data(), t.n_col).data());
}

}  // namespace

void small_fc_reduce_finish(const TensorArgs& t, const GroupDecays& d, const double* row_sum,
                            const double* col_sum) {
  if (t.entry_sums != nullptr) {  // a sharded tensor: the caller completes and finishes
    std::copy(row_sum, row_sum + t.n_row, t.entry_sums);
    std::copy(col_sum, col_sum + t.n_col, t.entry_sums + t.n_row);
    return;
  }
  const int k = d.k;
  const int rank = t.ix.rank;
  const double n0 = static_cast<double>(t.ix.size[t.d0]);
  const double n1 = static_cast<double>(t.ix.size[t.d1]);
  for (int64_t r = 0; r < t.n_row; ++r) {
    const float mean = static_cast<float>(row_sum[r] / n0);
    for (int a = 0; a < k; ++a)
      t.v_row[r * k + a] = factored_update(d, a, t.v_row[r * k + a], mean);
  }
  for (int64_t c = 0; c < t.n_col; ++c) {
    const float mean = static_cast<float>(col_sum[c] / n1);
    for (int a = 0; a < k; ++a)
      t.v_col[c * k + a] = factored_update(d, a, t.v_col[c * k + a], mean);
  }
  // Row factors: v_row over its mean along the remaining copy of d1 (upstream's
  // reduced_d1), per decay; the header's index math walks that axis per mean entry.
  int64_t row_shape[kMaxRank] = {};  // zeroed: GCC 12 (avx2 level) cannot see j < rank fill it
  int j = 0;
  for (int dim = 0; dim < rank; ++dim)
    if (dim != t.d0) row_shape[j++] = t.ix.size[dim];
  const int reduced_d1 = t.d1 > t.d0 ? t.d1 - 1 : t.d1;
  const int64_t len = row_shape[reduced_d1];
  const int64_t step = axis_stride(row_shape, rank - 1, reduced_d1);
  for (int64_t q = 0; q < t.n_rcm; ++q) {
    const int64_t base = deleted_axis_base(row_shape, rank - 1, reduced_d1, q);
    for (int a = 0; a < k; ++a) {
      const double sum = lane_ordered_sum(
          len, [&](int64_t x) { return static_cast<double>(t.v_row[(base + x * step) * k + a]); });
      const float mean = static_cast<float>(sum / n1);
      for (int64_t x = 0; x < len; ++x) {
        const int64_t r = (base + x * step) * k + a;
        t.row_factor[r] = safe_rsqrt(t.v_row[r] / (mean + kRowColMeanEps));
      }
    }
  }
  for (int64_t c = 0; c < t.n_col * k; ++c) t.col_factor[c] = safe_rsqrt(t.v_col[c]);
}

void small_fc_reduce_cpu(const TensorArgs* t, int count, const GroupDecays& d) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int i = 0; i < count; ++i)
    if (t[i].factored && t[i].n > 0) reduce_one(t[i], d);
}

void small_fc_accumulate_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                             bool head_variant) {
  switch (d.k) {
    case 1: accumulate_k<1>(t, count, d, head_variant); break;
    case 2: accumulate_k<2>(t, count, d, head_variant); break;
    case 3: accumulate_k<3>(t, count, d, head_variant); break;
    case 4: accumulate_k<4>(t, count, d, head_variant); break;
    default: break;
  }
}

void small_fc_apply_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                        bool head_variant, const MlpView& net, float exp_mult,
                        float step_mult, float lr) {
  switch (d.k) {
    case 1: apply_k<1>(t, count, d, head_variant, net, exp_mult, step_mult, lr); break;
    case 2: apply_k<2>(t, count, d, head_variant, net, exp_mult, step_mult, lr); break;
    case 3: apply_k<3>(t, count, d, head_variant, net, exp_mult, step_mult, lr); break;
    case 4: apply_k<4>(t, count, d, head_variant, net, exp_mult, step_mult, lr); break;
    default: break;
  }
}

}  // namespace lopt
