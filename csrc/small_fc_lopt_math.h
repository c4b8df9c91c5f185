// Per-element math of small_fc_lopt (upstream AdafacMLPLOpt), shared by the CPU and CUDA
// backends. Plain C++ (no torch headers); every function is host+device under nvcc.
//
// Float32 throughout, upstream's order of operations. Moving averages are
// fma(decay, v, (1 - decay) * x), as XLA compiles upstream's `c*v + (1-c)*x` under jit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LOPT_HD __host__ __device__ __forceinline__
#else
#define LOPT_HD inline
#endif

namespace lopt {

constexpr float kFactoredGradSqEps = 1e-30f;
constexpr float kSafeRsqrtFloor = 1e-9f;
constexpr float kRowColMeanEps = 1e-9f;
constexpr float kDiagPrecondEps = 1e-9f;
constexpr float kRowColFeatureEps = 1e-8f;
constexpr float kRmsFeatureEps = 1e-6f;
constexpr float kFacMomMultEps = 1e-6f;
constexpr float kNormalizerEps = 1e-5f;

// The fused path supports upstream's decay layout: K momentum decays, one rms decay and K
// adafactor decays (K = 3 in every known checkpoint).
constexpr int kMaxDecays = 4;
constexpr int kMaxRank = 8;
constexpr int kMaxLayers = 8;
constexpr int kMaxHidden = 64;
constexpr int kNumTimeFeatures = 11;
constexpr int kMaxRawFeatures = 2 + 1 + 1 + 8 * kMaxDecays;

LOPT_HD int raw_feature_count(int k) { return 4 + 8 * k; }

LOPT_HD float rsqrt_ieee(float x) { return 1.0f / sqrtf(x); }

LOPT_HD float safe_rsqrt(float x) { return rsqrt_ieee(fmaxf(x, kSafeRsqrtFloor)); }

LOPT_HD float ema(float decay, float v, float increment) { return fmaf(decay, v, increment); }

// Per-element values after this step's accumulator update, from which the features follow.
struct ElementState {
  float g, p, rms;
  float m[kMaxDecays];
  float fac_g[kMaxDecays];
  float row[kMaxDecays];       // factored: v_row broadcast back; else v_diag
  float col[kMaxDecays];       // factored: v_col broadcast back; else v_diag
  float mom_mult[kMaxDecays];  // fac_mom_mult
};

// Raw feature columns in upstream order: g, p, m[k], rms, m*rsqrt(rms+1e-6)[k],
// rsqrt(rms+1e-6), fac_g[k], row[k], col[k], rsqrt(row+1e-8)[k], rsqrt(col+1e-8)[k],
// fac_mom_mult[k].
LOPT_HD void raw_features(const ElementState& s, int k, float* out) {
  int j = 0;
  out[j++] = s.g;
  out[j++] = s.p;
  for (int i = 0; i < k; ++i) out[j++] = s.m[i];
  out[j++] = s.rms;
  const float rr = rsqrt_ieee(s.rms + kRmsFeatureEps);
  for (int i = 0; i < k; ++i) out[j++] = s.m[i] * rr;
  out[j++] = rr;
  for (int i = 0; i < k; ++i) out[j++] = s.fac_g[i];
  for (int i = 0; i < k; ++i) out[j++] = s.row[i];
  for (int i = 0; i < k; ++i) out[j++] = s.col[i];
  for (int i = 0; i < k; ++i) out[j++] = rsqrt_ieee(s.row[i] + kRowColFeatureEps);
  for (int i = 0; i < k; ++i) out[j++] = rsqrt_ieee(s.col[i] + kRowColFeatureEps);
  for (int i = 0; i < k; ++i) out[j++] = s.mom_mult[i];
}

// Non-factored fac_mom_mult: m * (v + 1e-6)^-0.5 at HEAD, m * v^-0.5 in the 2022 wheel.
LOPT_HD float diag_mom_mult(float m, float v, bool head_variant) {
  return m * (1.0f / sqrtf(head_variant ? v + kFacMomMultEps : v));
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

// The MLP for kLanes elements at once, feature-major (x[i * kLanes + e], out likewise):
// per element and output, acc = fma(x[i], w[o][i], acc) for i in order, then + b, then ReLU
// (not after the last layer). Lanes and a tile of outputs are independent, so the loops
// vectorize and the FMA chains overlap.
// ReLU that lets NaN through, as upstream's max(x, 0) and torch.relu do.
LOPT_HD float relu(float v) { return v < 0.0f ? 0.0f : v; }

// step = direction * exp(magnitude * exp_mult) * step_mult, times lr.
LOPT_HD float step_from_output(float direction, float magnitude, float exp_mult,
                               float step_mult, float lr) {
  return ((direction * expf(magnitude * exp_mult)) * step_mult) * lr;
}

// Index math for a contiguous tensor with factored dims (d1, d0): for an element's linear
// index, the index of its v_row entry (d0 deleted), v_col entry (d1 deleted) and row-column
// mean entry (both deleted). Strides are 0 along the deleted dims.
struct FactoredIndex {
  int rank;
  int64_t size[kMaxRank];
  int64_t row_stride[kMaxRank];
  int64_t col_stride[kMaxRank];
  int64_t rcm_stride[kMaxRank];
};

LOPT_HD void factored_indices(const FactoredIndex& ix, int64_t linear, int64_t* row,
                              int64_t* col, int64_t* rcm) {
  int64_t r = 0, c = 0, q = 0;
  for (int d = ix.rank - 1; d >= 0; --d) {
    const int64_t coord = linear % ix.size[d];
    linear /= ix.size[d];
    r += coord * ix.row_stride[d];
    c += coord * ix.col_stride[d];
    q += coord * ix.rcm_stride[d];
  }
  *row = r;
  *col = c;
  *rcm = q;
}

}  // namespace lopt
