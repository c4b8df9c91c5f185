// Per-element math of small_fc_lopt (upstream AdafacMLPLOpt), host+device, shared by the CPU
// and CUDA backends: the accumulators' features, the normalizer, the MLP and the step.
//
// Float32 throughout, upstream's order of operations.
#pragma once

#include <cstdint>

#include "factored_index.h"
#include "scalar_math.h"

namespace lopt {

constexpr float kFactoredGradSqEps = 1e-30f;
constexpr float kRowColMeanEps = 1e-9f;
constexpr float kDiagPrecondEps = 1e-9f;
constexpr float kRowColFeatureEps = 1e-8f;
constexpr float kRmsFeatureEps = 1e-6f;
constexpr float kFacMomMultEps = 1e-6f;
constexpr float kNormalizerEps = 1e-5f;

// The fused path supports upstream's decay layout: K momentum decays, one rms decay and K
// adafactor decays (K = 3 in every known checkpoint).
constexpr int kMaxDecays = 4;
constexpr int kMaxLayers = 8;
constexpr int kMaxHidden = 64;
constexpr int kNumTimeFeatures = 11;

LOPT_HD int raw_feature_count(int k) { return 4 + 8 * k; }

// The gradient an optimizer sees: g + wd * p (upstream prefab's weight decay, wd = 0 for
// none), clipped to [-clip, clip] (VeLO: 1000; +inf for none). NaN passes, as in jnp.clip.
LOPT_HD float effective_grad(float g, float p, float wd, float clip) {
  const float v = wd != 0.0f ? g + wd * p : g;
  return v < -clip ? -clip : (v > clip ? clip : v);
}

// g^2 + 1e-30, the quantity the adafactor accumulators average.
LOPT_HD float factored_grad_sq(float g) { return g * g + kFactoredGradSqEps; }

// Per-element values after this step's accumulator update, from which the features follow.
struct ElementState {
  float g, p, rms;
  float m[kMaxDecays];
  float fac_g[kMaxDecays];
  float row[kMaxDecays];       // factored: v_row broadcast back; else v_diag
  float col[kMaxDecays];       // factored: v_col broadcast back; else v_diag
  float mom_mult[kMaxDecays];  // fac_mom_mult
};

// Non-factored fac_mom_mult: m * (v + 1e-6)^-0.5 at HEAD, m * v^-0.5 in the 2022 wheel.
LOPT_HD float diag_mom_mult(float m, float v, bool head_variant) {
  return m * (1.0f / sqrtf(head_variant ? v + kFacMomMultEps : v));
}

// A factored tensor's element: rf/cf are its row and column factors, vr/vc its v_row and
// v_col entries (one per decay).
LOPT_HD ElementState factored_state(float g, float p, float rms, const float* m,
                                    const float* vr, const float* vc, const float* rf,
                                    const float* cf, int k) {
  ElementState s;
  s.g = g;
  s.p = p;
  s.rms = rms;
  for (int a = 0; a < k; ++a) {
    s.m[a] = m[a];
    s.fac_g[a] = g * rf[a] * cf[a];
    s.row[a] = vr[a];
    s.col[a] = vc[a];
    s.mom_mult[a] = m[a] * rf[a] * cf[a];
  }
  return s;
}

// A non-factored tensor's element with its v_diag entries v.
LOPT_HD ElementState diag_state(float g, float p, float rms, const float* m, const float* v,
                                int k, bool head_variant) {
  ElementState s;
  s.g = g;
  s.p = p;
  s.rms = rms;
  for (int a = 0; a < k; ++a) {
    s.m[a] = m[a];
    s.fac_g[a] = g * safe_rsqrt(v[a] + kDiagPrecondEps);
    s.row[a] = v[a];
    s.col[a] = v[a];
    s.mom_mult[a] = diag_mom_mult(m[a], v[a], head_variant);
  }
  return s;
}

// Raw feature columns in upstream order: g, p, m[k], rms, m*rsqrt(rms+1e-6)[k],
// rsqrt(rms+1e-6), fac_g[k], row[k], col[k], rsqrt(row+1e-8)[k], rsqrt(col+1e-8)[k],
// fac_mom_mult[k]. Column f goes to out[f * stride].
LOPT_HD void raw_features(const ElementState& s, int k, float* out, int stride = 1) {
  int j = 0;
  out[stride * j++] = s.g;
  out[stride * j++] = s.p;
  for (int i = 0; i < k; ++i) out[stride * j++] = s.m[i];
  out[stride * j++] = s.rms;
  const float rr = rsqrt_ieee(s.rms + kRmsFeatureEps);
  for (int i = 0; i < k; ++i) out[stride * j++] = s.m[i] * rr;
  out[stride * j++] = rr;
  for (int i = 0; i < k; ++i) out[stride * j++] = s.fac_g[i];
  for (int i = 0; i < k; ++i) out[stride * j++] = s.row[i];
  for (int i = 0; i < k; ++i) out[stride * j++] = s.col[i];
  for (int i = 0; i < k; ++i) out[stride * j++] = rsqrt_ieee(s.row[i] + kRowColFeatureEps);
  for (int i = 0; i < k; ++i) out[stride * j++] = rsqrt_ieee(s.col[i] + kRowColFeatureEps);
  for (int i = 0; i < k; ++i) out[stride * j++] = s.mom_mult[i];
}

// Second-moment normalizer of one feature column: rsqrt(1e-5 + sum(x^2) / n).
LOPT_HD float normalizer(float sumsq, int64_t n) {
  return rsqrt_ieee(kNormalizerEps + sumsq / static_cast<float>(n));
}

// MLP with ReLU between layers; weights in the nn.Linear layout [out, in]. Per element and
// output: acc = fma(x[i], w[o][i], acc) for i in order, then + b, then ReLU (not after the
// last layer).
struct MlpView {
  int layers;                  // number of Linear layers (hidden_layers + 1)
  int sizes[kMaxLayers + 1];   // sizes[0] = input width, sizes[layers] = 2
  const float* w[kMaxLayers];
  const float* b[kMaxLayers];
};

// One layer for one element: out[o] = act(b[o] + sum_i fma-chain(x[i] * w[o][i])).
LOPT_HD void mlp_layer(const float* w, const float* b, int n_in, int n_out, bool hidden,
                       const float* x, float* out) {
  LOPT_UNROLL
  for (int o = 0; o < n_out; ++o) {
    float acc = 0.0f;
    LOPT_UNROLL
    for (int i = 0; i < n_in; ++i) acc = fmaf(x[i], w[o * n_in + i], acc);
    const float v = acc + b[o];
    out[o] = hidden ? relu(v) : v;
  }
}

// step = direction * exp(magnitude * exp_mult) * step_mult, times the tensor's scale (MuLO's
// per-tensor mu-P s; 1 for small_fc_lopt, where the product is exact), times lr.
LOPT_HD float step_from_output(float direction, float magnitude, float exp_mult,
                               float step_mult, float scale, float lr) {
  return (((direction * exp_poly(magnitude * exp_mult)) * step_mult) * scale) * lr;
}

}  // namespace lopt
