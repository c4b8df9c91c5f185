// Lane-group helpers of the CPU backends: up to kLanes consecutive elements gathered
// lane-major, so that the header's per-element math vectorizes across lanes (`omp simd`).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "small_fc_lopt_args.h"

namespace lopt {
namespace cpu {

constexpr int kLanes = 16;

// One element range [begin, end) of tensor `tensor`.
struct WorkItem {
  int tensor;
  int64_t begin, end;
};

// The inputs of up to kLanes consecutive elements, lane-major per quantity. Lanes past the
// end hold zeros (and unit factors): finite features that are never used.
struct LaneInputs {
  alignas(64) float g[kLanes], p[kLanes], rms[kLanes];
  alignas(64) float m[kMaxDecays][kLanes];
  alignas(64) float vr[kMaxDecays][kLanes];  // v_row entry, or v_diag
  alignas(64) float vc[kMaxDecays][kLanes];  // v_col entry (factored)
  alignas(64) float rf[kMaxDecays][kLanes];  // row factor (factored)
  alignas(64) float cf[kMaxDecays][kLanes];  // column factor (factored)
};

// Gather lanes [0, lanes) starting at element i0; with `update`, apply this step's moving
// averages of momentum, rms and v_diag first and store them (phase 2).
template <int K, bool Factored, bool Update>
void gather(const TensorArgs& t, const GroupDecays& d, int64_t i0, int lanes,
            FactoredCursor& cur, LaneInputs& in) {
  for (int e = 0; e < kLanes; ++e) {
    if (e >= lanes) {
      in.g[e] = in.p[e] = in.rms[e] = 0.0f;
      for (int a = 0; a < K; ++a) {
        in.m[a][e] = in.vr[a][e] = in.vc[a][e] = 0.0f;
        in.rf[a][e] = in.cf[a][e] = 1.0f;
      }
      continue;
    }
    const int64_t i = i0 + e;
    const float p = load_value(t.p, t.dtype, i);
    const float g = effective_grad(load_value(t.g, t.dtype, i), p, t.grad_wd, t.grad_clip);
    in.g[e] = g;
    in.p[e] = p;
    float* m = t.m + i * K;
    if (Update) {
      for (int a = 0; a < K; ++a) m[a] = ema(d.mom[a], m[a], d.mom_mix[a] * g);
      t.rms[i] = ema(d.rms, t.rms[i], d.rms_mix * (g * g));
    }
    in.rms[e] = t.rms[i];
    for (int a = 0; a < K; ++a) in.m[a][e] = m[a];
    if (Factored) {
      for (int a = 0; a < K; ++a) {
        in.vr[a][e] = t.v_row[cur.row * K + a];
        in.vc[a][e] = t.v_col[cur.col * K + a];
        in.rf[a][e] = t.row_factor[cur.row * K + a];
        in.cf[a][e] = t.col_factor[cur.col * K + a];
      }
      cur.next();
    } else {
      float* v = t.v_diag + i * K;
      if (Update) {
        const float gs = factored_grad_sq(g);
        for (int a = 0; a < K; ++a) v[a] = ema(d.fac[a], v[a], d.fac_mix[a] * gs);
      }
      for (int a = 0; a < K; ++a) in.vr[a][e] = v[a];
    }
  }
}

// The header's per-element state for lane e.
template <int K, bool Factored>
inline ElementState lane_state(const LaneInputs& in, int e, bool head_variant) {
  float m[K], vr[K];
  for (int a = 0; a < K; ++a) {
    m[a] = in.m[a][e];
    vr[a] = in.vr[a][e];
  }
  if (Factored) {
    float vc[K], rf[K], cf[K];
    for (int a = 0; a < K; ++a) {
      vc[a] = in.vc[a][e];
      rf[a] = in.rf[a][e];
      cf[a] = in.cf[a][e];
    }
    return factored_state(in.g[e], in.p[e], in.rms[e], m, vr, vc, rf, cf, K);
  }
  return diag_state(in.g[e], in.p[e], in.rms[e], m, vr, K, head_variant);
}

constexpr int64_t kApplyChunk = 1024;  // elements per parallel work item of the apply phases

// The fixed reduction tiles of every tensor (accumulate_tile): results do not depend on the
// number of threads.
inline std::vector<WorkItem> accumulate_items(const TensorArgs* t, int count) {
  std::vector<WorkItem> items;
  for (int i = 0; i < count; ++i) {
    const int64_t tile = accumulate_tile(t[i].n);
    for (int64_t b = 0; b < t[i].n; b += tile) items.push_back({i, b, std::min(t[i].n, b + tile)});
  }
  return items;
}

// Chunks of kApplyChunk elements of every tensor.
inline std::vector<WorkItem> apply_items(const TensorArgs* t, int count) {
  std::vector<WorkItem> items;
  for (int i = 0; i < count; ++i)
    for (int64_t b = 0; b < t[i].n; b += kApplyChunk)
      items.push_back({i, b, std::min(t[i].n, b + kApplyChunk)});
  return items;
}

// Per tensor, each tile's `width` partials summed in tile order.
inline std::vector<double> per_tensor(const std::vector<WorkItem>& items,
                                      const std::vector<double>& part, int count, int width) {
  std::vector<double> total(static_cast<size_t>(count) * width, 0.0);
  for (size_t w = 0; w < items.size(); ++w)
    for (int f = 0; f < width; ++f) total[items[w].tensor * width + f] += part[w * width + f];
  return total;
}

// Every tensor's F feature normalizers from its sums of squares.
inline std::vector<float> normalizers(const TensorArgs* t, int count, int F) {
  std::vector<float> inv(static_cast<size_t>(count) * F);
  for (int i = 0; i < count; ++i)
    for (int f = 0; f < F; ++f) inv[i * F + f] = normalizer(t[i].sumsq[f], t[i].n);
  return inv;
}

}  // namespace cpu
}  // namespace lopt
