// CPU backend of the fused VeLO step (see velo_cpu.h). Work is split into the fixed tiles of
// accumulate_tile(n) (phase A: three passes, each summed per tile and then in tile order) and
// chunks of kApplyChunk elements (phase B), so results never depend on the thread count.
#include "velo_cpu.h"

#include <algorithm>
#include <vector>

#include "cpu_lanes.h"
#include "small_fc_lopt_cpu.h"

namespace lopt {
namespace {

using cpu::kLanes;
using cpu::LaneInputs;
using cpu::WorkItem;
using cpu::gather;
using cpu::lane_state;
using cpu::per_tensor;

template <int K>
void accumulate_k(const TensorArgs* t, int count, const GroupDecays& d, float* stats) {
  constexpr int F = 6 + 8 * K;
  small_fc_reduce_cpu(t, count, d);
  const std::vector<WorkItem> items = cpu::accumulate_items(t, count);
  const int64_t n_items = static_cast<int64_t>(items.size());
  // Pass 1: sums of p^2, m and rms (old state).
  constexpr int W1 = 2 + K;
  std::vector<double> part1(items.size() * W1);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const WorkItem& it = items[w];
    const TensorArgs& ti = t[it.tensor];
    double acc[W1] = {};
    for (int64_t i = it.begin; i < it.end; ++i) {
      const float p = load_value(ti.p, ti.dtype, i);
      acc[0] += static_cast<double>(p * p);
      for (int a = 0; a < K; ++a) acc[1 + a] += ti.m[i * K + a];
      acc[1 + K] += ti.rms[i];
    }
    std::copy(acc, acc + W1, part1.begin() + w * W1);
  }
  const std::vector<double> sum1 = per_tensor(items, part1, count, W1);
  // Pass 2: squared deviations of m and of rms about the momentum mean (old state).
  constexpr int W2 = 2 * K;
  std::vector<double> part2(items.size() * W2);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const WorkItem& it = items[w];
    const TensorArgs& ti = t[it.tensor];
    const double n = static_cast<double>(ti.n);
    double mean[K];
    for (int a = 0; a < K; ++a) mean[a] = sum1[it.tensor * W1 + 1 + a] / n;
    double acc[W2] = {};
    for (int64_t i = it.begin; i < it.end; ++i)
      for (int a = 0; a < K; ++a) {
        const double dm = ti.m[i * K + a] - mean[a];
        const double dr = ti.rms[i] - mean[a];
        acc[a] += dm * dm;
        acc[K + a] += dr * dr;
      }
    std::copy(acc, acc + W2, part2.begin() + w * W2);
  }
  const std::vector<double> sum2 = per_tensor(items, part2, count, W2);
  // Pass 3: the moving averages, then the sums of squares of the features (new state).
  std::vector<double> part3(items.size() * F);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const WorkItem& it = items[w];
    const TensorArgs& ti = t[it.tensor];
    alignas(64) double acc[F][kLanes] = {};
    alignas(64) float raw[F * kLanes];
    LaneInputs in;
    FactoredCursor cur;
    if (ti.factored) cur.start(ti.ix, it.begin);
    for (int64_t i0 = it.begin; i0 < it.end; i0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, it.end - i0));
      if (ti.factored) {
        gather<K, true, true>(ti, d, i0, lanes, cur, in);
#pragma omp simd
        for (int e = 0; e < kLanes; ++e)
          velo_raw_features(lane_state<K, true>(in, e, false), K, raw + e, kLanes);
      } else {
        gather<K, false, true>(ti, d, i0, lanes, cur, in);
#pragma omp simd
        for (int e = 0; e < kLanes; ++e)
          velo_raw_features(lane_state<K, false>(in, e, false), K, raw + e, kLanes);
      }
      if (lanes < kLanes)
        for (int f = 0; f < F; ++f)
          for (int e = lanes; e < kLanes; ++e) raw[f * kLanes + e] = 0.0f;
      for (int f = 0; f < F; ++f)
#pragma omp simd
        for (int e = 0; e < kLanes; ++e) {
          const double v = raw[f * kLanes + e];
          acc[f][e] += v * v;
        }
    }
    for (int f = 0; f < F; ++f) {
      double total = 0.0;
      for (int e = 0; e < kLanes; ++e) total += acc[f][e];
      part3[w * F + f] = total;
    }
  }
  const std::vector<double> sum3 = per_tensor(items, part3, count, F);
  const int S = velo_stats_count(K);
  for (int i = 0; i < count; ++i) {
    const double n = static_cast<double>(t[i].n);
    float* s = stats + i * S;
    s[0] = static_cast<float>(sum1[i * W1] / n);
    for (int a = 0; a < K; ++a) {
      s[1 + a] = static_cast<float>(sum1[i * W1 + 1 + a] / n);
      s[1 + K + a] = static_cast<float>(sum2[i * W2 + a] / n);
      s[2 + 2 * K + a] = static_cast<float>(sum2[i * W2 + K + a] / n);
    }
    s[1 + 2 * K] = static_cast<float>(sum1[i * W1 + 1 + K] / n);
    for (int f = 0; f < F; ++f) t[i].sumsq[f] = static_cast<float>(sum3[i * F + f]);
  }
}

// velo_mlp for kLanes elements at once (x and out feature-major, x[f * kLanes + e]): every
// lane gets exactly velo_mlp's operations in the same order; the loops over lanes vectorize.
template <int K, int H, int L>
void velo_mlp_lanes(const float* x, const float* w, float* out) {
  alignas(64) float h[H][kLanes] = {};
  int col = 0;
  for (int j = 0; j < kVeloGroups; ++j) {
    const int width = velo_group_width(j, K);
    for (int o = 0; o < H; ++o) {
      alignas(64) float partial[kLanes] = {};
      for (int i = 0; i < width; ++i) {
        const float wv = w[i * H + o];
        for (int e = 0; e < kLanes; ++e)
          partial[e] = fmaf(x[(col + i) * kLanes + e], wv, partial[e]);
      }
      for (int e = 0; e < kLanes; ++e) h[o][e] = h[o][e] + partial[e];
    }
    w += width * H;
    col += width;
  }
  for (int o = 0; o < H; ++o)
    for (int e = 0; e < kLanes; ++e) h[o][e] = relu(h[o][e] + w[o]);
  w += H;
  for (int l = 1; l <= L; ++l) {
    const int n_out = l == L ? kVeloOutputs : H;
    alignas(64) float next[H > kVeloOutputs ? H : kVeloOutputs][kLanes];
    for (int o = 0; o < n_out; ++o) {
      alignas(64) float acc[kLanes] = {};
      for (int i = 0; i < H; ++i) {
        const float wv = w[i * n_out + o];
        for (int e = 0; e < kLanes; ++e) acc[e] = fmaf(h[i][e], wv, acc[e]);
      }
      for (int e = 0; e < kLanes; ++e) next[o][e] = acc[e] + w[H * n_out + o];
    }
    w += H * n_out + n_out;
    for (int o = 0; o < n_out; ++o)
      for (int e = 0; e < kLanes; ++e) {
        if (l == L) out[o * kLanes + e] = next[o][e];
        else h[o][e] = relu(next[o][e]);
      }
  }
}

// H, L > 0: the MLP's sizes at compile time (the released 4-wide, 2-hidden-layer net), so that
// velo_mlp unrolls and vectorizes across the lanes; 0: runtime sizes, one lane at a time.
template <int K, bool Factored, int H, int L>
void apply_range(const TensorArgs& t, const GroupDecays& d, const float* inv, const float* w,
                 const VeloApplyArgs& a, int index, int64_t begin, int64_t end) {
  constexpr int F = 6 + 8 * K;
  alignas(64) float x[F * kLanes];
  alignas(64) float out[kVeloOutputs * kLanes];
  LaneInputs in;
  FactoredCursor cur;
  if (Factored) cur.start(t.ix, begin);
  // The weights in a local array, apart from every buffer the lanes write.
  constexpr int kWeights = H > 0 ? (6 + 8 * K) * H + H + (L - 1) * (H * H + H) + H * 3 + 3 : 1;
  alignas(64) float wl[kWeights];
  if constexpr (H > 0)
    for (int j = 0; j < kWeights; ++j) wl[j] = w[j];
  const float lr_mult = a.lr_mult[index], scale = a.param_scale[index];
  const float lr = a.lr[index], decay = a.decay_mult[index];
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - i0));
    gather<K, Factored, false>(t, d, i0, lanes, cur, in);
#pragma omp simd
    for (int e = 0; e < kLanes; ++e)
      velo_raw_features(lane_state<K, Factored>(in, e, false), K, x + e, kLanes);
    for (int f = 0; f < F; ++f)
#pragma omp simd
      for (int e = 0; e < kLanes; ++e) x[f * kLanes + e] *= inv[f];
    if constexpr (H > 0) {
      velo_mlp_lanes<K, H, L>(x, wl, out);
    } else {
      for (int e = 0; e < lanes; ++e) {
        float o[kVeloOutputs];
        velo_mlp(x + e, kLanes, w, K, a.hidden, a.layers, o);
        for (int c = 0; c < kVeloOutputs; ++c) out[c * kLanes + e] = o[c];
      }
    }
    for (int e = 0; e < lanes; ++e) {
      const float step = velo_step(out[e], out[kLanes + e], a.exp_mult, scale, a.step_mult,
                                   lr_mult);
      const float p = decay != 1.0f ? in.p[e] * decay : in.p[e];
      store_value(t.p, t.dtype, i0 + e, p - lr * step);
    }
  }
}

template <int K>
void apply_k(const TensorArgs* t, int count, const GroupDecays& d, const VeloApplyArgs& a) {
  constexpr int F = 6 + 8 * K;
  const int width = velo_mlp_size(K, a.hidden, a.layers);
  const std::vector<float> inv = cpu::normalizers(t, count, F);
  const std::vector<WorkItem> items = cpu::apply_items(t, count);
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(static)
  for (int64_t w = 0; w < n_items; ++w) {
    const WorkItem& it = items[w];
    const TensorArgs& ti = t[it.tensor];
    const float* iv = inv.data() + it.tensor * F;
    const float* weights = a.weights + static_cast<int64_t>(it.tensor) * width;
    const bool released = a.hidden == 4 && a.layers == 2;
    if (ti.factored && released)
      apply_range<K, true, 4, 2>(ti, d, iv, weights, a, it.tensor, it.begin, it.end);
    else if (released)
      apply_range<K, false, 4, 2>(ti, d, iv, weights, a, it.tensor, it.begin, it.end);
    else if (ti.factored)
      apply_range<K, true, 0, 0>(ti, d, iv, weights, a, it.tensor, it.begin, it.end);
    else
      apply_range<K, false, 0, 0>(ti, d, iv, weights, a, it.tensor, it.begin, it.end);
  }
}

}  // namespace

void velo_accumulate_cpu(const TensorArgs* t, int count, const GroupDecays& d, float* stats) {
  switch (d.k) {
    case 1: accumulate_k<1>(t, count, d, stats); break;
    case 2: accumulate_k<2>(t, count, d, stats); break;
    case 3: accumulate_k<3>(t, count, d, stats); break;
    case 4: accumulate_k<4>(t, count, d, stats); break;
    default: break;
  }
}

void velo_apply_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                    const VeloApplyArgs& a) {
  switch (d.k) {
    case 1: apply_k<1>(t, count, d, a); break;
    case 2: apply_k<2>(t, count, d, a); break;
    case 3: apply_k<3>(t, count, d, a); break;
    case 4: apply_k<4>(t, count, d, a); break;
    default: break;
  }
}

}  // namespace lopt
