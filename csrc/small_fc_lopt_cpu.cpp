// CPU backend of the fused small_fc_lopt step (see small_fc_lopt_cpu.h).
#include "small_fc_lopt_cpu.h"

#include <algorithm>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 reports its own avx512fintrin.h internals (`__m512 __Y = __Y;`) as maybe
// uninitialized once inlined at -O3: a known false positive, not this file's code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lopt {
namespace {

constexpr int64_t kBlock = 4096;  // fixed reduction blocks: results independent of threads

// Linear index of `linear` (in `size[0..rank)`) in the shape with axis `del` removed.
int64_t drop_axis_index(const int64_t* size, int rank, int del, int64_t linear) {
  int64_t out = 0, stride = 1;
  for (int d = rank - 1; d >= 0; --d) {
    const int64_t coord = linear % size[d];
    linear /= size[d];
    if (d != del) {
      out += coord * stride;
      stride *= size[d];
    }
  }
  return out;
}

// Per-element state after the accumulator update (phase 2 and 3 share it).
ElementState element_state(const TensorArgs& t, const GroupDecays& d, bool head_variant,
                           int64_t i) {
  ElementState s;
  const int k = d.k;
  s.g = t.g[i];
  s.p = t.p[i];
  s.rms = t.rms[i];
  for (int a = 0; a < k; ++a) s.m[a] = t.m[i * k + a];
  if (t.factored) {
    int64_t r, c, q;
    factored_indices(t.ix, i, &r, &c, &q);
    for (int a = 0; a < k; ++a) {
      const float rf = t.row_factor[r * k + a];
      const float cf = t.col_factor[c * k + a];
      s.fac_g[a] = s.g * rf * cf;
      s.row[a] = t.v_row[r * k + a];
      s.col[a] = t.v_col[c * k + a];
      s.mom_mult[a] = s.m[a] * rf * cf;
    }
  } else {
    for (int a = 0; a < k; ++a) {
      const float v = t.v_diag[i * k + a];
      s.fac_g[a] = s.g * safe_rsqrt(v + kDiagPrecondEps);
      s.row[a] = v;
      s.col[a] = v;
      s.mom_mult[a] = diag_mom_mult(s.m[a], v, head_variant);
    }
  }
  return s;
}

// The MLP for kLanes elements at once, feature-major (x[i * kLanes + e], out likewise), a
// tile of TILE outputs per pass so that the FMA chains overlap. Every element gets exactly
// the operations of MlpView's definition, in the same order.
constexpr int kLanes = 16;
constexpr int kOutTile = 8;

template <int TILE>
void mlp_tile(const float* in, int n_in, const float* w, const float* b, int o0, bool hidden,
              float* target) {
#if defined(__AVX512F__)
  static_assert(kLanes == 16, "one zmm register per output");
  __m512 acc[TILE];
  for (int t = 0; t < TILE; ++t) acc[t] = _mm512_set1_ps(0.0f);
  for (int i = 0; i < n_in; ++i) {
    const __m512 xi = _mm512_loadu_ps(in + i * kLanes);
    for (int t = 0; t < TILE; ++t)
      acc[t] = _mm512_fmadd_ps(xi, _mm512_set1_ps(w[static_cast<int64_t>(o0 + t) * n_in + i]),
                               acc[t]);
  }
  for (int t = 0; t < TILE; ++t) {
    __m512 v = _mm512_add_ps(acc[t], _mm512_set1_ps(b[o0 + t]));
    if (hidden) v = _mm512_max_ps(_mm512_set1_ps(0.0f), v);  // NaN passes, as relu()
    _mm512_storeu_ps(target + (o0 + t) * kLanes, v);
  }
#else
  float acc[TILE][kLanes] = {};
  for (int i = 0; i < n_in; ++i)
    for (int t = 0; t < TILE; ++t) {
      const float wi = w[static_cast<int64_t>(o0 + t) * n_in + i];
      for (int e = 0; e < kLanes; ++e) acc[t][e] = fmaf(in[i * kLanes + e], wi, acc[t][e]);
    }
  for (int t = 0; t < TILE; ++t)
    for (int e = 0; e < kLanes; ++e) {
      const float v = acc[t][e] + b[o0 + t];
      target[(o0 + t) * kLanes + e] = hidden ? relu(v) : v;
    }
#endif
}

void mlp_forward_lanes(const MlpView& net, const float* x, float* out) {
  alignas(64) float buf_a[kMaxHidden * kLanes];
  alignas(64) float buf_b[kMaxHidden * kLanes];
  const float* in = x;
  float* dst = buf_a;
  for (int l = 0; l < net.layers; ++l) {
    const int n_in = net.sizes[l];
    const int n_out = net.sizes[l + 1];
    const bool hidden = l != net.layers - 1;
    float* target = hidden ? dst : out;
    const float* w = net.w[l];
    const float* b = net.b[l];
    int o0 = 0;
    for (; o0 + kOutTile <= n_out; o0 += kOutTile) mlp_tile<kOutTile>(in, n_in, w, b, o0, hidden, target);
    switch (n_out - o0) {
      case 7: mlp_tile<7>(in, n_in, w, b, o0, hidden, target); break;
      case 6: mlp_tile<6>(in, n_in, w, b, o0, hidden, target); break;
      case 5: mlp_tile<5>(in, n_in, w, b, o0, hidden, target); break;
      case 4: mlp_tile<4>(in, n_in, w, b, o0, hidden, target); break;
      case 3: mlp_tile<3>(in, n_in, w, b, o0, hidden, target); break;
      case 2: mlp_tile<2>(in, n_in, w, b, o0, hidden, target); break;
      case 1: mlp_tile<1>(in, n_in, w, b, o0, hidden, target); break;
      default: break;
    }
    in = target;
    dst = (dst == buf_a) ? buf_b : buf_a;
  }
}

}  // namespace

void small_fc_reduce_cpu(const TensorArgs& t, const GroupDecays& d) {
  if (!t.factored || t.n == 0) return;
  const int k = d.k;
  const int rank = t.ix.rank;
  std::vector<double> row_sum(t.n_row, 0.0), col_sum(t.n_col, 0.0);
  for (int64_t i = 0; i < t.n; ++i) {
    int64_t r, c, q;
    factored_indices(t.ix, i, &r, &c, &q);
    const float gs = t.g[i] * t.g[i] + kFactoredGradSqEps;
    row_sum[r] += gs;
    col_sum[c] += gs;
  }
  const double n0 = static_cast<double>(t.ix.size[t.d0]);
  const double n1 = static_cast<double>(t.ix.size[t.d1]);
  for (int64_t r = 0; r < t.n_row; ++r) {
    const float mean = static_cast<float>(row_sum[r] / n0);
    for (int a = 0; a < k; ++a)
      t.v_row[r * k + a] = ema(d.fac[a], t.v_row[r * k + a], d.fac_mix[a] * mean);
  }
  for (int64_t c = 0; c < t.n_col; ++c) {
    const float mean = static_cast<float>(col_sum[c] / n1);
    for (int a = 0; a < k; ++a)
      t.v_col[c * k + a] = ema(d.fac[a], t.v_col[c * k + a], d.fac_mix[a] * mean);
  }
  // Mean of v_row over the remaining copy of d1 (upstream's reduced_d1), per decay.
  int64_t row_shape[kMaxRank];
  int j = 0;
  for (int dim = 0; dim < rank; ++dim)
    if (dim != t.d0) row_shape[j++] = t.ix.size[dim];
  const int reduced_d1 = t.d1 > t.d0 ? t.d1 - 1 : t.d1;
  std::vector<double> rcm(t.n_rcm * k, 0.0);
  for (int64_t r = 0; r < t.n_row; ++r) {
    const int64_t q = drop_axis_index(row_shape, rank - 1, reduced_d1, r);
    for (int a = 0; a < k; ++a) rcm[q * k + a] += t.v_row[r * k + a];
  }
  for (int64_t r = 0; r < t.n_row; ++r) {
    const int64_t q = drop_axis_index(row_shape, rank - 1, reduced_d1, r);
    for (int a = 0; a < k; ++a) {
      const float mean = static_cast<float>(rcm[q * k + a] / n1);
      t.row_factor[r * k + a] = safe_rsqrt(t.v_row[r * k + a] / (mean + kRowColMeanEps));
    }
  }
  for (int64_t c = 0; c < t.n_col * k; ++c) t.col_factor[c] = safe_rsqrt(t.v_col[c]);
}

void small_fc_accumulate_cpu(const TensorArgs& t, const GroupDecays& d, bool head_variant,
                             float* sumsq) {
  const int k = d.k;
  const int nf = raw_feature_count(k);
  const int64_t blocks = (t.n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(blocks) * nf, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    double* acc = partial.data() + b * nf;
    const int64_t end = std::min(t.n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) {
      const float g = t.g[i];
      for (int a = 0; a < k; ++a)
        t.m[i * k + a] = ema(d.mom[a], t.m[i * k + a], d.mom_mix[a] * g);
      t.rms[i] = ema(d.rms, t.rms[i], d.rms_mix * (g * g));
      if (!t.factored) {
        const float gs = g * g + kFactoredGradSqEps;
        for (int a = 0; a < k; ++a)
          t.v_diag[i * k + a] = ema(d.fac[a], t.v_diag[i * k + a], d.fac_mix[a] * gs);
      }
      float raw[kMaxRawFeatures];
      raw_features(element_state(t, d, head_variant, i), k, raw);
      for (int f = 0; f < nf; ++f) acc[f] += static_cast<double>(raw[f]) * raw[f];
    }
  }
  for (int f = 0; f < nf; ++f) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += partial[b * nf + f];
    sumsq[f] = static_cast<float>(total);
  }
}

void small_fc_apply_cpu(const TensorArgs& t, const GroupDecays& d, bool head_variant,
                        const float* sumsq, const float* time_features, const MlpView& net,
                        float exp_mult, float step_mult, float lr) {
  const int k = d.k;
  const int nf = raw_feature_count(k);
  float inv[kMaxRawFeatures];
  for (int f = 0; f < nf; ++f)
    inv[f] = rsqrt_ieee(kNormalizerEps + sumsq[f] / static_cast<float>(t.n));
  const int64_t groups = (t.n + kLanes - 1) / kLanes;
#pragma omp parallel for schedule(static)
  for (int64_t gidx = 0; gidx < groups; ++gidx) {
    const int64_t i0 = gidx * kLanes;
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, t.n - i0));
    alignas(64) float x[(kMaxRawFeatures + kNumTimeFeatures) * kLanes];
    for (int e = 0; e < kLanes; ++e) {
      float raw[kMaxRawFeatures] = {};
      if (e < lanes) raw_features(element_state(t, d, head_variant, i0 + e), k, raw);
      for (int f = 0; f < nf; ++f) x[f * kLanes + e] = raw[f] * inv[f];
      for (int f = 0; f < kNumTimeFeatures; ++f) x[(nf + f) * kLanes + e] = time_features[f];
    }
    alignas(64) float out[2 * kLanes];
    mlp_forward_lanes(net, x, out);
    for (int e = 0; e < lanes; ++e)
      t.p[i0 + e] -= step_from_output(out[e], out[kLanes + e], exp_mult, step_mult, lr);
  }
}

}  // namespace lopt
