// Lane-group helpers of the CPU backends: up to kLanes consecutive elements gathered
// lane-major, so that the header's per-element math vectorizes across lanes (`omp simd`).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "reduction_order.h"
#include "tensor_args.h"
#include "velo_math.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace lopt {

// The CPU's lane values: 16 floats in one AVX-512 register (two AVX2 registers at the avx2
// level, an array below it; LOPT_CPU_ISA, lopt_port/extension.py), with the lane operations of
// scalar_math.h, so that the header's MLPs run on 16 elements at once through exactly each
// element's operations: every level gives the same bits.
#if defined(__AVX512F__)
struct Lanes16 {
  __m512 v;
};
inline Lanes16 lane_fma(Lanes16 a, Lanes16 b, Lanes16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Lanes16 lane_add(Lanes16 a, Lanes16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Lanes16 lane_mul(Lanes16 a, Lanes16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
// relu(v) = v < 0 ? 0 : v (NaN passes): keep v where !(v < 0).
inline Lanes16 lane_relu(Lanes16 a) {
  const __m512 zero = _mm512_setzero_ps();
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, zero, _CMP_LT_OQ), a.v, zero)};
}
template <>
inline Lanes16 lane_splat<Lanes16>(float x) { return {_mm512_set1_ps(x)}; }
inline Lanes16 load_lanes16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store_lanes16(float* p, Lanes16 a) { _mm512_storeu_ps(p, a.v); }
#elif defined(__AVX2__) && defined(__FMA__)
// Lanes 0-7 in lo, 8-15 in hi. (The array below compiles to the same operations, but GCC
// takes minutes to vectorize it through the unrolled MLPs.)
struct Lanes16 {
  __m256 lo, hi;
};
inline Lanes16 lane_fma(Lanes16 a, Lanes16 b, Lanes16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Lanes16 lane_add(Lanes16 a, Lanes16 b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline Lanes16 lane_mul(Lanes16 a, Lanes16 b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
// relu(v) = v < 0 ? 0 : v (NaN passes): zero where v < 0.
inline __m256 relu8(__m256 a) {
  const __m256 zero = _mm256_setzero_ps();
  return _mm256_blendv_ps(a, zero, _mm256_cmp_ps(a, zero, _CMP_LT_OQ));
}
inline Lanes16 lane_relu(Lanes16 a) { return {relu8(a.lo), relu8(a.hi)}; }
template <>
inline Lanes16 lane_splat<Lanes16>(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Lanes16 load_lanes16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store_lanes16(float* p, Lanes16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
#else
struct Lanes16 {
  float v[16];
};
inline Lanes16 lane_fma(Lanes16 a, Lanes16 b, Lanes16 c) {
  for (int e = 0; e < 16; ++e) a.v[e] = fmaf(a.v[e], b.v[e], c.v[e]);
  return a;
}
inline Lanes16 lane_add(Lanes16 a, Lanes16 b) {
  for (int e = 0; e < 16; ++e) a.v[e] = a.v[e] + b.v[e];
  return a;
}
inline Lanes16 lane_mul(Lanes16 a, Lanes16 b) {
  for (int e = 0; e < 16; ++e) a.v[e] = a.v[e] * b.v[e];
  return a;
}
inline Lanes16 lane_relu(Lanes16 a) {
  for (int e = 0; e < 16; ++e) a.v[e] = relu(a.v[e]);
  return a;
}
template <>
inline Lanes16 lane_splat<Lanes16>(float x) {
  Lanes16 a;
  for (int e = 0; e < 16; ++e) a.v[e] = x;
  return a;
}
inline Lanes16 load_lanes16(const float* p) {
  Lanes16 a;
  for (int e = 0; e < 16; ++e) a.v[e] = p[e];
  return a;
}
inline void store_lanes16(float* p, Lanes16 a) {
  for (int e = 0; e < 16; ++e) p[e] = a.v[e];
}
#endif

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
      for (int a = 0; a < K; ++a) m[a] = momentum_update(d, a, m[a], g);
      t.rms[i] = rms_update(d, t.rms[i], g);
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
        for (int a = 0; a < K; ++a) v[a] = diag_update(d, a, v[a], g);
      }
      for (int a = 0; a < K; ++a) in.vr[a][e] = v[a];
    }
  }
}

#if defined(__AVX512F__)
// Permute indices and lane masks for moving 16 lanes between a [16, K] layout (K registers)
// and K lane registers, computed at compile time.
struct PermuteTable {
  alignas(64) int idx[kMaxDecays][kMaxDecays][16];
  unsigned mask[kMaxDecays][kMaxDecays];
};

// Deinterleave: output a takes from source register k the lanes e with e*K + a in [16k, 16k+16).
constexpr PermuteTable deinterleave_table(int K) {
  PermuteTable t{};
  for (int a = 0; a < K; ++a)
    for (int k = 0; k < K; ++k)
      for (int e = 0; e < 16; ++e) {
        const int i = e * K + a - 16 * k;
        t.idx[a][k][e] = i & 15;
        if (i >= 0 && i < 16) t.mask[a][k] |= 1u << e;
      }
  return t;
}

// Interleave: output register k takes from lane register a the positions l with (16k+l) % K == a.
constexpr PermuteTable interleave_table(int K) {
  PermuteTable t{};
  for (int k = 0; k < K; ++k)
    for (int a = 0; a < K; ++a)
      for (int l = 0; l < 16; ++l) {
        t.idx[k][a][l] = (16 * k + l) / K;
        if ((16 * k + l) % K == a) t.mask[k][a] |= 1u << l;
      }
  return t;
}

template <int K>
struct Permutes {
  static constexpr PermuteTable de = deinterleave_table(K);
  static constexpr PermuteTable in = interleave_table(K);
};
#endif

// dst[a][e] = src[e * K + a] for kLanes elements of a [n, K] state (deinterleave), and back.
// With AVX-512 each output register is K masked permutes of the K source registers.
template <int K>
LOPT_HD void deinterleave(const float* src, float (*dst)[kLanes]) {
#if defined(__AVX512F__)
  static_assert(kLanes == 16, "one AVX-512 register per lane group");
  __m512 r[K];
  for (int k = 0; k < K; ++k) r[k] = _mm512_loadu_ps(src + 16 * k);
  for (int a = 0; a < K; ++a) {
    __m512 out = _mm512_setzero_ps();
    for (int k = 0; k < K; ++k)
      out = _mm512_mask_permutexvar_ps(out, static_cast<__mmask16>(Permutes<K>::de.mask[a][k]),
                                       _mm512_load_si512(Permutes<K>::de.idx[a][k]), r[k]);
    _mm512_store_ps(dst[a], out);
  }
#else
  for (int a = 0; a < K; ++a)
    for (int e = 0; e < kLanes; ++e) dst[a][e] = src[e * K + a];
#endif
}

template <int K>
LOPT_HD void interleave(const float (*src)[kLanes], float* dst) {
#if defined(__AVX512F__)
  __m512 r[K];
  for (int a = 0; a < K; ++a) r[a] = _mm512_load_ps(src[a]);
  for (int k = 0; k < K; ++k) {
    __m512 out = _mm512_setzero_ps();
    for (int a = 0; a < K; ++a)
      out = _mm512_mask_permutexvar_ps(out, static_cast<__mmask16>(Permutes<K>::in.mask[k][a]),
                                       _mm512_load_si512(Permutes<K>::in.idx[k][a]), r[a]);
    _mm512_storeu_ps(dst + 16 * k, out);
  }
#else
  for (int a = 0; a < K; ++a)
    for (int e = 0; e < kLanes; ++e) dst[e * K + a] = src[a][e];
#endif
}

// A lane group covers half of the kReduceLanes lanes of one round (reduction_order.h): the
// group starting `offset` elements into its tile adds to lanes half(offset) * kLanes + e.
static_assert(kReduceLanes == 2 * kLanes, "two lane groups per round");
inline int half(int64_t offset) { return static_cast<int>((offset / kLanes) & 1); }

// out[r] = lane_tree_sum(acc[r]) for rows r < rows (a tile's sums; acc is overwritten).
inline void tree_sum_rows(double (*acc)[kReduceLanes], int rows, double* out) {
  for (int r = 0; r < rows; ++r) out[r] = lane_tree_sum(acc[r]);
}

// Per entry e < entries, lane_tree_sum of the lane-major sums acc[l * entries + e].
inline std::vector<double> entry_totals(const double* acc, int64_t entries) {
  std::vector<double> total(entries);
  for (int64_t e = 0; e < entries; ++e) {
    double v[kReduceLanes];
    for (int l = 0; l < kReduceLanes; ++l) v[l] = acc[l * entries + e];
    total[e] = lane_tree_sum(v);
  }
  return total;
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
    for (int f = 0; f < F; ++f) inv[i * F + f] = normalizer(t[i].sumsq[f], t[i].n_total);
  return inv;
}

}  // namespace cpu
}  // namespace lopt
