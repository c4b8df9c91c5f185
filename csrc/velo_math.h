// Per-element math of VeLO (upstream HyperV2's per-parameter network), host+device, shared by
// the CPU and CUDA backends: the 6 + 8k features, the layer-0 partials of the side groups,
// the MLP, the step, and the per-tensor statistics from phase A's moments.
#pragma once

#include <cstdint>

#include "small_fc_lopt_math.h"

namespace lopt {

// VeLO's 6 + 8k per-parameter features (30 for k = 3) in upstream's group order: g,
// clip(g, +-0.1), p, m[k], rms, m*rr[k], rr, fac_g[k], g*rr, row[k], col[k],
// rsqrt(row+1e-8)[k], rsqrt(col+1e-8)[k], fac_mom_mult[k], with rr = rsqrt(rms + 1e-6) and
// the non-factored fac_mom_mult m * v^-0.5 (no epsilon: diag_state with head_variant false).
constexpr float kVeloGradClipFeature = 0.1f;
constexpr int kVeloGroups = 14;

LOPT_HD int velo_feature_count(int k) { return 6 + 8 * k; }

// The columns of velo_raw_features that vary element by element: every group but the four
// side groups (velo_side_group) of a factored tensor, which depend on one v_row or v_col entry.
LOPT_HD void velo_element_features(const ElementState& s, int k, float* out, int stride = 1) {
  const float rr = rsqrt_ieee(s.rms + kRmsFeatureEps);
  int j = 0;
  out[stride * j++] = s.g;
  out[stride * j++] = s.g < -kVeloGradClipFeature ? -kVeloGradClipFeature
                      : (s.g > kVeloGradClipFeature ? kVeloGradClipFeature : s.g);
  out[stride * j++] = s.p;
  for (int i = 0; i < k; ++i) out[stride * j++] = s.m[i];
  out[stride * j++] = s.rms;
  for (int i = 0; i < k; ++i) out[stride * j++] = s.m[i] * rr;
  out[stride * j++] = rr;
  for (int i = 0; i < k; ++i) out[stride * j++] = s.fac_g[i];
  out[stride * j++] = s.g * rr;
  j += 4 * k;
  for (int i = 0; i < k; ++i) out[stride * j++] = s.mom_mult[i];
}

// The four side groups, from column 6 + 3k: row[k], col[k], rsqrt(row + 1e-8)[k],
// rsqrt(col + 1e-8)[k].
LOPT_HD float velo_side_feature(float v, bool rsqrt_group) {
  return rsqrt_group ? rsqrt_ieee(v + kRowColFeatureEps) : v;
}

LOPT_HD void velo_raw_features(const ElementState& s, int k, float* out, int stride = 1) {
  velo_element_features(s, k, out, stride);
  int j = 6 + 3 * k;
  for (int i = 0; i < k; ++i) out[stride * j++] = velo_side_feature(s.row[i], false);
  for (int i = 0; i < k; ++i) out[stride * j++] = velo_side_feature(s.col[i], false);
  for (int i = 0; i < k; ++i) out[stride * j++] = velo_side_feature(s.row[i], true);
  for (int i = 0; i < k; ++i) out[stride * j++] = velo_side_feature(s.col[i], true);
}

// Width of VeLO feature group j (w0__j) for k decays.
LOPT_HD int velo_group_width(int j, int k) {
  return (j == 3 || j == 5 || j == 7 || j >= 9) ? k : 1;
}

// First feature column of group j (the weights of w0__j start at column * hidden).
LOPT_HD int velo_group_column(int j, int k) {
  int c = 0;
  for (int i = 0; i < j; ++i) c += velo_group_width(i, k);
  return c;
}

// The side groups: 9 (v_row), 10 (v_col), 11 (rsqrt v_row), 12 (rsqrt v_col).
constexpr int kVeloFirstSideGroup = 9;
LOPT_HD bool velo_side_group(int j) { return j >= kVeloFirstSideGroup && j < kVeloFirstSideGroup + 4; }

// Layer-0 partial sums of side group j for one v_row or v_col entry v[0..k): per output o,
// the group's FMA chain over its k normalized features (x = raw * inv), exactly as velo_mlp
// forms it for every element of that row or column, so that it can be formed once per entry.
// inv: the tensor's feature normalizers; w: its flattened MLP weights.
LOPT_HD void velo_side_partial(const float* v, int j, int k, const float* inv, const float* w,
                               int hidden, float* out) {
  const int c = velo_group_column(j, k);
  const bool rsqrt_group = j >= kVeloFirstSideGroup + 2;
  float x[kMaxDecays];
  LOPT_UNROLL
  for (int i = 0; i < k; ++i) x[i] = velo_side_feature(v[i], rsqrt_group) * inv[c + i];
  LOPT_UNROLL
  for (int o = 0; o < hidden; ++o) {
    float partial = 0.0f;
    LOPT_UNROLL
    for (int i = 0; i < k; ++i) partial = fmaf(x[i], w[(c + i) * hidden + o], partial);
    out[o] = partial;
  }
}

// VeLO's per-tensor MLP for one element; x[f * xs] are the normalized features. Weights per
// tensor, flattened in upstream's leaf order and [in, out] layout: w0__0 .. w0__13, b0, then
// per layer l = 1..layers: w_l, b_l (the last layer has 3 outputs). Layer 0 sums the groups
// one by one (each group an FMA chain from 0, then added), as upstream's loop over groups.
constexpr int kMaxVeloHidden = 16;
constexpr int kVeloOutputs = 3;

LOPT_HD void velo_mlp(const float* x, int xs, const float* w, int k, int hidden, int layers,
                      float* out) {
  float h[kMaxVeloHidden];
  LOPT_UNROLL
  for (int o = 0; o < hidden; ++o) h[o] = 0.0f;
  int col = 0;
  LOPT_UNROLL
  for (int j = 0; j < kVeloGroups; ++j) {
    const int width = velo_group_width(j, k);
    LOPT_UNROLL
    for (int o = 0; o < hidden; ++o) {
      float partial = 0.0f;
      LOPT_UNROLL
      for (int i = 0; i < width; ++i) partial = fmaf(x[(col + i) * xs], w[i * hidden + o], partial);
      h[o] = h[o] + partial;
    }
    w += width * hidden;
    col += width;
  }
  LOPT_UNROLL
  for (int o = 0; o < hidden; ++o) h[o] = relu(h[o] + w[o]);
  w += hidden;
  LOPT_UNROLL
  for (int l = 1; l <= layers; ++l) {
    const int n_out = l == layers ? kVeloOutputs : hidden;
    float next[kMaxVeloHidden];
    LOPT_UNROLL
    for (int o = 0; o < n_out; ++o) {
      float acc = 0.0f;
      LOPT_UNROLL
      for (int i = 0; i < hidden; ++i) acc = fmaf(h[i], w[i * n_out + o], acc);
      next[o] = acc + w[hidden * n_out + o];
    }
    w += hidden * n_out + n_out;
    LOPT_UNROLL
    for (int o = 0; o < n_out; ++o) {
      if (l == layers) out[o] = next[o];
      else h[o] = relu(next[o]);
    }
  }
}

// Floats of one tensor's flattened MLP weights (velo_mlp's layout).
LOPT_HD int velo_mlp_size(int k, int hidden, int layers) {
  return velo_feature_count(k) * hidden + hidden + (layers - 1) * (hidden * hidden + hidden)
         + hidden * kVeloOutputs + kVeloOutputs;
}

// VeLO's step: lr_mult * ((direction * (param_scale * exp(magnitude * exp_mult))) * step_mult).
LOPT_HD float velo_step(float direction, float magnitude, float exp_mult, float param_scale,
                        float step_mult, float lr_mult) {
  return lr_mult * ((direction * (param_scale * exp_poly(magnitude * exp_mult))) * step_mult);
}


// ---------------------------------------------------------------------------------------
// Phase A's per-tensor statistics of the state *before* this step's update.

// Moment sums, per tensor, in float64 (reduction orders 1 and 3): p^2 (squared in float32,
// as upstream's mean(p^2)), m and m^2 (k each), rms and rms^2. Squares of float32 values are
// exact in float64, so only the sums round.
LOPT_HD constexpr int velo_moment_count(int k) { return 3 + 2 * k; }

template <int K>
struct VeloMoments {
  static constexpr int kCount = velo_moment_count(K);
  static constexpr int kP2 = 0, kM = 1, kM2 = 1 + K, kRms = 1 + 2 * K, kRms2 = 2 + 2 * K;
};

// Adds one element's old state to the moment sums acc[c * stride] (c in VeloMoments order).
template <int K>
LOPT_HD void velo_add_moments(double* acc, int stride, float p, float rms, const float* m) {
  using M = VeloMoments<K>;
  const double r = rms;
  acc[M::kP2 * stride] += static_cast<double>(p * p);
  acc[M::kRms * stride] += r;
  acc[M::kRms2 * stride] += r * r;
  LOPT_UNROLL
  for (int a = 0; a < K; ++a) {
    const double v = m[a];
    acc[(M::kM + a) * stride] += v;
    acc[(M::kM2 + a) * stride] += v * v;
  }
}

LOPT_HD int velo_stats_count(int k) { return 2 + 3 * k; }

// The statistics, velo_stats_count(K) floats: mean p^2, mean m (k), mean (m - mean m)^2 (k),
// mean rms, mean (rms - mean m)^2 (k) (upstream's var_rms quirk: about the momentum mean),
// from the moment sums `mo` over n elements. The variances follow in one pass as
// E[x^2] - 2 c E[x] + c^2 about a center c, clamped at 0; each is cast to float32 once.
template <int K>
LOPT_HD void velo_stats(const double* mo, int64_t n, float* s) {
  using M = VeloMoments<K>;
  const double count = static_cast<double>(n);
  const double mean_rms = mo[M::kRms] / count, mean_rms2 = mo[M::kRms2] / count;
  s[0] = static_cast<float>(mo[M::kP2] / count);
  LOPT_UNROLL
  for (int a = 0; a < K; ++a) {
    const double mean = mo[M::kM + a] / count;
    const double var_m = mo[M::kM2 + a] / count - mean * mean;
    const double var_rms = mean_rms2 - 2.0 * mean * mean_rms + mean * mean;
    s[1 + a] = static_cast<float>(mean);
    s[1 + K + a] = static_cast<float>(var_m > 0.0 ? var_m : 0.0);
    s[2 + 2 * K + a] = static_cast<float>(var_rms > 0.0 ? var_rms : 0.0);
  }
  s[1 + 2 * K] = static_cast<float>(mean_rms);
}

}  // namespace lopt
