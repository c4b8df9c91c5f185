// CPU backend of the fused small_fc_lopt step (see small_fc_lopt_cpu.h).
#include "small_fc_lopt_cpu.h"

#include <algorithm>
#include <vector>

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
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < t.n; ++i) {
    float x[kMaxRawFeatures + kNumTimeFeatures];
    raw_features(element_state(t, d, head_variant, i), k, x);
    for (int f = 0; f < nf; ++f) x[f] *= inv[f];
    for (int f = 0; f < kNumTimeFeatures; ++f) x[nf + f] = time_features[f];
    float out[2];
    mlp_forward(net, x, out);
    t.p[i] = t.p[i] - step_from_output(out[0], out[1], exp_mult, step_mult, lr);
  }
}

}  // namespace lopt
