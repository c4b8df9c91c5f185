// Per-element math of small_fc_lopt (upstream AdafacMLPLOpt), shared by the CPU and CUDA
// backends. Plain C++ (no torch headers); every function is host+device under nvcc.
//
// Float32 throughout, upstream's order of operations. Moving averages are
// fma(decay, v, (1 - decay) * x), as XLA compiles upstream's `c*v + (1-c)*x` under jit. Both
// backends are compiled without floating-point contraction (-ffp-contract=off, nvcc
// -fmad=false), so the only fused multiply-adds are the ones written here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined: the CPU backend calls these inside `omp simd` loops over lanes, which
// vectorize only when the calls are inlined.
#if defined(__CUDACC__)
#define LOPT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LOPT_HD inline __attribute__((always_inline))
#else
#define LOPT_HD inline
#endif

// Full unrolling on the device, so that small per-element arrays stay in registers.
#if defined(__CUDA_ARCH__)
#define LOPT_UNROLL _Pragma("unroll")
#else
#define LOPT_UNROLL
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
constexpr int kMaxRawFeatures = 6 + 8 * kMaxDecays;  // VeLO's count, >= small_fc's 4 + 8k
constexpr int kMaxMlpInput = kMaxRawFeatures + kNumTimeFeatures;

LOPT_HD int raw_feature_count(int k) { return 4 + 8 * k; }

// ---------------------------------------------------------------------------------------
// Parameter and gradient storage: float32, bfloat16 or float16 (state is always float32).
// Conversions are exact widenings on load and round-to-nearest-even on store, bit for bit
// what torch's `.float()` and `copy_` do (NaN stores as torch's canonical quiet NaN).

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

LOPT_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

LOPT_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

LOPT_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

LOPT_HD uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

LOPT_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return bits_float(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return bits_float(sign);
    e = 113;  // subnormal: shift the leading one into the implicit position
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    return bits_float(sign | (e << 23) | ((m & 0x3FFu) << 13));
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}

LOPT_HD uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half or zero
    if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 rounds to 0
    const int shift = 126 - static_cast<int>(a >> 23);  // 14 .. 24
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = (a >> 13) - (112u << 10);
  const uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry rounds up the exponent
  return static_cast<uint16_t>(sign | r);
}

LOPT_HD float load_value(const void* base, DType dt, int64_t i) {
  if (dt == DType::kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dt == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}

LOPT_HD void store_value(void* base, DType dt, int64_t i, float v) {
  if (dt == DType::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = dt == DType::kBFloat16 ? float_to_bf16(v) : float_to_fp16(v);
  }
}

// ---------------------------------------------------------------------------------------
// Accumulators and features.

LOPT_HD float rsqrt_ieee(float x) { return 1.0f / sqrtf(x); }

// max(x, floor) that lets NaN through, as jnp.maximum and torch.clamp_min do (fmaxf would
// return the floor for NaN).
LOPT_HD float max_nan(float x, float floor) { return x < floor ? floor : x; }

LOPT_HD float safe_rsqrt(float x) { return rsqrt_ieee(max_nan(x, kSafeRsqrtFloor)); }

LOPT_HD float ema(float decay, float v, float increment) { return fmaf(decay, v, increment); }

// ReLU that lets NaN through, as upstream's max(x, 0) and torch.relu do.
LOPT_HD float relu(float v) { return v < 0.0f ? 0.0f : v; }

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

// exp(x) in straight-line float arithmetic, so that the CPU's lane loops vectorize it (a call
// to expf does not): x = n ln2 + r with n = rint(x / ln2) and ln2 split in two (Cody-Waite),
// e^r by its degree-7 Taylor polynomial on |r| <= ln2 / 2, then two exact scalings by powers
// of two. Within 0.94 ulp of the exact value on every normal result (checked exhaustively over
// a seventh of all floats); +-inf and NaN map as expf's do, results below 2^-126 may differ
// from expf's in the last subnormal bit.
LOPT_HD float exp_poly(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float n = rintf(xc * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, xc);
  r = fmaf(n, -1.428606765330187e-06f, r);
  float q = 1.0f / 5040.0f;
  q = fmaf(q, r, 1.0f / 720.0f);
  q = fmaf(q, r, 1.0f / 120.0f);
  q = fmaf(q, r, 1.0f / 24.0f);
  q = fmaf(q, r, 1.0f / 6.0f);
  q = fmaf(q, r, 0.5f);
  q = fmaf(q, r, 1.0f);
  q = fmaf(q, r, 1.0f);
  const int ni = xc == xc ? static_cast<int>(n) : 0;  // |n| <= 150: 2^n as two normal factors
  const int n1 = ni / 2, n2 = ni - n1;
  return q * bits_float(static_cast<uint32_t>(n1 + 127) << 23)
         * bits_float(static_cast<uint32_t>(n2 + 127) << 23);
}

// VeLO's exponential: the device's expf, and exp_poly on the host (vectorizable).
LOPT_HD float velo_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_poly(x);
#endif
}

// VeLO's step: lr_mult * ((direction * (param_scale * exp(magnitude * exp_mult))) * step_mult).
LOPT_HD float velo_step(float direction, float magnitude, float exp_mult, float param_scale,
                        float step_mult, float lr_mult) {
  return lr_mult * ((direction * (param_scale * velo_exp(magnitude * exp_mult))) * step_mult);
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
  return (((direction * expf(magnitude * exp_mult)) * step_mult) * scale) * lr;
}

// ---------------------------------------------------------------------------------------
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

// The same indices walked element by element without divisions: start at `linear`, then
// next() moves to linear + 1 (the last axis varies fastest).
struct FactoredCursor {
  const FactoredIndex* ix;
  int64_t coord[kMaxRank];
  int64_t row, col, rcm;

  LOPT_HD void start(const FactoredIndex& index, int64_t linear) {
    ix = &index;
    row = col = rcm = 0;
    for (int d = index.rank - 1; d >= 0; --d) {
      coord[d] = linear % index.size[d];
      linear /= index.size[d];
      row += coord[d] * index.row_stride[d];
      col += coord[d] * index.col_stride[d];
      rcm += coord[d] * index.rcm_stride[d];
    }
  }

  LOPT_HD void next() {
    for (int d = ix->rank - 1; d >= 0; --d) {
      row += ix->row_stride[d];
      col += ix->col_stride[d];
      rcm += ix->rcm_stride[d];
      if (++coord[d] < ix->size[d]) return;
      row -= ix->row_stride[d] * ix->size[d];
      col -= ix->col_stride[d] * ix->size[d];
      rcm -= ix->rcm_stride[d] * ix->size[d];
      coord[d] = 0;
    }
  }
};

// Stride of `axis` in a contiguous tensor of sizes size[0..rank).
LOPT_HD int64_t axis_stride(const int64_t* size, int rank, int axis) {
  int64_t s = 1;
  for (int d = rank - 1; d > axis; --d) s *= size[d];
  return s;
}

// The linear index, in a contiguous tensor of sizes size[0..rank), of the element at
// coordinate 0 along axis `del` whose other coordinates are those of entry `entry` of the
// shape with `del` deleted. Entry + j * axis_stride(del) walks the reduced axis.
LOPT_HD int64_t deleted_axis_base(const int64_t* size, int rank, int del, int64_t entry) {
  int64_t out = 0, stride = 1;
  for (int d = rank - 1; d >= 0; --d) {
    if (d != del) {
      out += (entry % size[d]) * stride;
      entry /= size[d];
    }
    stride *= size[d];
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Deterministic reductions: the per-feature sums of squares are summed per tile of
// accumulate_tile(n) consecutive elements, then the tiles in order. The tile depends only on
// n (never on the thread count or device), so every run and backend splits alike; at most
// kMaxTilesPerTensor tiles bound the scratch memory whatever the tensor size.
constexpr int64_t kMinTile = 4096;
constexpr int64_t kMaxTilesPerTensor = 1024;

LOPT_HD int64_t accumulate_tile(int64_t n) {
  const int64_t per = (n + kMaxTilesPerTensor - 1) / kMaxTilesPerTensor;
  return per <= kMinTile ? kMinTile : (per + kMinTile - 1) / kMinTile * kMinTile;
}

LOPT_HD int64_t accumulate_tiles(int64_t n) {
  const int64_t t = accumulate_tile(n);
  return (n + t - 1) / t;
}

}  // namespace lopt
