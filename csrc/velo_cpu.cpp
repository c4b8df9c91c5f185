// CPU backend of the fused VeLO step (see velo_cpu.h). Phase A: the factored reduce (fixed
// chunks of runs), then one pass over the state in the fixed tiles of accumulate_tile(n),
// summed per tile and then in tile order. Phase B: fixed tiles of runs and chunks of
// kApplyChunk elements. Results never depend on the thread count.
#include "velo_cpu.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_lanes.h"
#include "small_fc_lopt_cpu.h"

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 reports its own avx512fintrin.h internals as maybe uninitialized once inlined at -O3
// (see small_fc_lopt_cpu.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lopt {
namespace {

using cpu::kLanes;
using cpu::LaneInputs;
using cpu::WorkItem;
using cpu::gather;
using cpu::lane_state;
using cpu::per_tensor;

// Layer-0 partials of the four side groups for a lane group: group kVeloFirstSideGroup + s,
// output o, lane e at p[s][o * ld[s] + e].
struct LaneSides {
  const float* p[4];
  int64_t ld[4];
};

// velo_mlp's inputs for G lane groups of kLanes elements: group g's raw features at
// x + g * (6 + 8K) * kLanes, feature-major (x[f * kLanes + e]), normalized by inv[f]; with
// Sides, the side groups' partials from sides[g] (formed per v_row / v_col entry by
// velo_side_partial) instead of x.
template <int K>
struct LaneGroupInputs {
  static constexpr int F = 6 + 8 * K;
  const float* x;
  const float* inv;
  const LaneSides* sides;
  Lanes16 input(int g, int c) const {
    return lane_mul(load_lanes16(x + (g * F + c) * kLanes), lane_splat<Lanes16>(inv[c]));
  }
  Lanes16 side(int g, int s, int o) const {
    return load_lanes16(sides[g].p[s] + o * sides[g].ld[s]);
  }
};

// The header's velo_mlp for G lane groups at once on 16-lane values (one AVX-512 register
// per quantity); group g's outputs go to out + g * 3 * kLanes. G = 2 interleaves two groups'
// independent dependency chains (the output layers and the step are chains of dependent FMAs
// that one group alone leaves mostly idle).
template <int K, int H, int L, bool Sides, int G = 1>
void velo_mlp_lanes(const float* x, const float* inv, const float* w, const LaneSides* sides,
                    float* out) {
  Lanes16 o[G][kVeloOutputs];
  velo_mlp<Lanes16, K, H, L, G, Sides>(LaneGroupInputs<K>{x, inv, sides}, w, H, L, o);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < kVeloOutputs; ++c)
      store_lanes16(out + (g * kVeloOutputs + c) * kLanes, o[g][c]);
}

// The per-tensor scalars of the step.
struct StepScalars {
  float lr_mult, scale, lr, decay, exp_mult, step_mult;
};

// H, L > 0: the MLP's sizes at compile time (the released 4-wide, 2-hidden-layer net), so that
// velo_mlp unrolls and runs on the lanes at once; 0: runtime sizes, one lane at a time.
template <int K, bool Factored, int H, int L>
void apply_range(const TensorArgs& t, const GroupDecays& d, const float* inv, const float* w,
                 const VeloApplyArgs& a, const StepScalars& sc, int64_t begin, int64_t end) {
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
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - i0));
    gather<K, Factored, false>(t, d, i0, lanes, cur, in);
#pragma omp simd
    for (int e = 0; e < kLanes; ++e)
      velo_raw_features(lane_state<K, Factored>(in, e, false), K, x + e, kLanes);
    if constexpr (H > 0) {
      velo_mlp_lanes<K, H, L, false>(x, inv, wl, nullptr, out);
    } else {
      for (int e = 0; e < lanes; ++e) {
        float o[1][kVeloOutputs];
        velo_mlp<float, K, 0, 0, 1, false>(VeloElementInputs{x + e, kLanes, inv}, w, a.hidden,
                                           a.layers, o);
        for (int c = 0; c < kVeloOutputs; ++c) out[c * kLanes + e] = o[0][c];
      }
    }
    for (int e = 0; e < lanes; ++e) {
      const float step = velo_step(out[e], out[kLanes + e], sc.exp_mult, sc.scale,
                                   sc.step_mult, sc.lr_mult);
      const float p = sc.decay != 1.0f ? in.p[e] * sc.decay : in.p[e];
      store_value(t.p, t.dtype, i0 + e, p - sc.lr * step);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Run layout: a factored tensor whose last axis moves exactly one of its v_row / v_col
// indices (every 2-D tensor). Viewed as [n / len, len], the elements of one run q share the
// fixed side's entry and walk the varying side's entries by `stride`, so the varying side's
// layer-0 partials are formed once per entry for a tile of runs, the fixed side's once per
// run, and the lanes load everything else contiguously.

struct RunLayout {
  bool ok = false;
  bool row_varies = false;
  int64_t len = 0, stride = 0;
};

RunLayout run_layout(const TensorArgs& t) {
  RunLayout r;
  if (!t.factored || t.ix.rank < 2) return r;
  const int last = t.ix.rank - 1;
  const int64_t rs = t.ix.row_stride[last], cs = t.ix.col_stride[last];
  r.len = t.ix.size[last];
  if ((rs != 0) == (cs != 0) || r.len < kLanes) return r;
  r.ok = true;
  r.row_varies = rs != 0;
  r.stride = r.row_varies ? rs : cs;
  return r;
}

constexpr int64_t kRunBlock = 1024;      // positions along the last axis per tile
constexpr int64_t kRunTileElems = 32768; // elements per tile (at least one run)
constexpr int64_t kPrefetchGroups = 16;   // lane groups between a prefetch and its use

constexpr int64_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// A tile of runs [q0, q1) x positions [j0, j1).
struct RunTile {
  int tensor;
  int64_t q0, q1, j0, j1;
};

std::vector<RunTile> run_tiles(const TensorArgs* t, const std::vector<RunLayout>& layout,
                               int count) {
  std::vector<RunTile> tiles;
  for (int i = 0; i < count; ++i) {
    if (!layout[i].ok) continue;
    const int64_t len = layout[i].len, runs = t[i].n / len;
    const int64_t rows = std::max<int64_t>(1, kRunTileElems / std::min(len, kRunBlock));
    for (int64_t q = 0; q < runs; q += rows)
      for (int64_t j = 0; j < len; j += kRunBlock)
        tiles.push_back({i, q, std::min(runs, q + rows), j, std::min(len, j + kRunBlock)});
  }
  return tiles;
}

// The varying side's table for positions [0, width) from entry `base` (stride `stride`):
// factors fac[a][j] and the partials part[s][o][j] of its value (s = 0) and rsqrt (s = 1)
// groups; then a lane group of padding (unit factors, zero partials).
template <int K, int H>
void side_table(const float* __restrict v, const float* __restrict factor, int64_t base,
                int64_t stride, int64_t width, int value_group, const float* inv,
                const float* w, float (*fac)[kRunBlock + kLanes],
                float (*part)[H][kRunBlock + kLanes]) {
  for (int64_t j0 = 0; j0 < width; j0 += kLanes) {
    alignas(64) float vl[K][kLanes];
    for (int a = 0; a < K; ++a)
#pragma omp simd
      for (int e = 0; e < kLanes; ++e) {
        const int64_t j = std::min<int64_t>(j0 + e, width - 1);
        vl[a][e] = v[(base + j * stride) * K + a];
        fac[a][j0 + e] = factor[(base + j * stride) * K + a];
      }
#pragma omp simd
    for (int e = 0; e < kLanes; ++e) {
      float ve[K], pv[H], pr[H];
      for (int a = 0; a < K; ++a) ve[a] = vl[a][e];
      velo_side_partial(ve, value_group, K, inv, w, H, pv);
      velo_side_partial(ve, value_group + 2, K, inv, w, H, pr);
      for (int o = 0; o < H; ++o) {
        part[0][o][j0 + e] = pv[o];
        part[1][o][j0 + e] = pr[o];
      }
    }
  }
  for (int64_t j = width; j < width + kLanes; ++j) {
    for (int o = 0; o < H; ++o) part[0][o][j] = part[1][o][j] = 0.0f;
    for (int a = 0; a < K; ++a) fac[a][j] = 1.0f;
  }
}

// Lane groups at positions begin, begin + kLanes, ... < end through the MLP, kPair at a time
// (velo_mlp_lanes with G = kPair: their dependency chains interleave), the rest one by one.
// prepare(g, i) loads the group at position i into slot g (features x + g * F * kLanes,
// sides[g]); finish(g, i) writes its step from out + g * 3 * kLanes.
constexpr int kPair = 2;

template <int K, int H, int L, bool Sides, typename Prepare, typename Finish>
void mlp_lane_groups(int64_t begin, int64_t end, const float* x, const float* inv,
                     const float* w, const LaneSides* sides, float* out, Prepare&& prepare,
                     Finish&& finish) {
  int64_t i = begin;
  for (; i + kPair * kLanes <= end; i += kPair * kLanes) {
    for (int g = 0; g < kPair; ++g) prepare(g, i + g * kLanes);
    velo_mlp_lanes<K, H, L, Sides, kPair>(x, inv, w, sides, out);
    for (int g = 0; g < kPair; ++g) finish(g, i + g * kLanes);
  }
  for (; i < end; i += kLanes) {
    prepare(0, i);
    velo_mlp_lanes<K, H, L, Sides>(x, inv, w, sides, out);
    finish(0, i);
  }
}

// The step of a lane group from its MLP outputs (direction out[e], magnitude
// out[kLanes + e]): p <- decay * p - lr * velo_step(...), stored for lanes [0, lanes).
template <DType DT>
inline void write_step(const float* out, const float* p, const StepScalars& sc, void* dst,
                       int64_t i0, int lanes) {
  alignas(64) float result[kLanes];
#pragma omp simd
  for (int e = 0; e < kLanes; ++e) {
    const float step = velo_step(out[e], out[kLanes + e], sc.exp_mult, sc.scale, sc.step_mult,
                                 sc.lr_mult);
    result[e] = (sc.decay != 1.0f ? p[e] * sc.decay : p[e]) - sc.lr * step;
  }
  if (lanes == kLanes) {  // one vector store (a loop of `lanes` stores compiles to rep movs)
#pragma omp simd
    for (int e = 0; e < kLanes; ++e) store_value(dst, DT, i0 + e, result[e]);
  } else {
    for (int e = 0; e < lanes; ++e) store_value(dst, DT, i0 + e, result[e]);
  }
}

// Lanes 0..15 = elements i0 .. i0 + 15: parameter, effective gradient, rms and momentum
// (deinterleaved from its [n, K] layout).
template <DType DT, int K>
LOPT_HD void load_lanes(const void* __restrict p, const void* __restrict g,
                       const float* __restrict m, const float* __restrict rms, float wd,
                       float clip, int64_t i0, LaneInputs& in) {
#pragma omp simd
  for (int e = 0; e < kLanes; ++e) {
    in.p[e] = load_value(p, DT, i0 + e);
    in.g[e] = effective_grad(load_value(g, DT, i0 + e), in.p[e], wd, clip);
    in.rms[e] = rms[i0 + e];
  }
  cpu::deinterleave<K>(m + i0 * K, in.m);
}

template <DType DT, int K, int H, int L, bool RowVaries>
void apply_run_tile(const TensorArgs& t, const RunLayout& rl, const float* inv, const float* w,
                    const StepScalars& sc, const RunTile& tile) {
  constexpr int F = 6 + 8 * K;
  constexpr int kWeights = F * H + H + (L - 1) * (H * H + H) + H * 3 + 3;
  alignas(64) float wl[kWeights];
  for (int j = 0; j < kWeights; ++j) wl[j] = w[j];
  const int64_t width = tile.j1 - tile.j0;
  void* const p_out = t.p;
  const void* __restrict const p_in = t.p;
  const void* __restrict const g_in = t.g;
  const float* __restrict const m_in = t.m;
  const float* __restrict const rms_in = t.rms;
  const float wd = t.grad_wd, clip = t.grad_clip;
  const float* vary_factor = RowVaries ? t.row_factor : t.col_factor;
  const float* vary_v = RowVaries ? t.v_row : t.v_col;
  const float* fixed_factor = RowVaries ? t.col_factor : t.row_factor;
  const float* fixed_v = RowVaries ? t.v_col : t.v_row;
  // Side group s = 0..3 is 9 + s: v_row, v_col, rsqrt v_row, rsqrt v_col.
  constexpr int vary_s = RowVaries ? 0 : 1, fixed_s = 1 - vary_s;
  alignas(64) float vfac[K][kRunBlock + kLanes];
  alignas(64) float vpart[2][H][kRunBlock + kLanes];
  alignas(64) float fpart[2][H][kLanes];
  int64_t table_base = -1;
  alignas(64) float x[kPair][F * kLanes];  // kPair lane groups in flight (mlp_lane_groups)
  alignas(64) float out[kPair][kVeloOutputs * kLanes];
  LaneInputs in[kPair]{};  // v_row / v_col lanes stay 0: the side groups are not formed per element
  LaneSides sides[kPair];
  for (LaneSides& sd : sides) {
    sd.ld[fixed_s] = sd.ld[2 + fixed_s] = kLanes;
    sd.ld[vary_s] = sd.ld[2 + vary_s] = kRunBlock + kLanes;
    sd.p[fixed_s] = &fpart[0][0][0];
    sd.p[2 + fixed_s] = &fpart[1][0][0];
  }
  for (int64_t q = tile.q0; q < tile.q1; ++q) {
    const int64_t first = q * rl.len + tile.j0;
    int64_t row, col, rcm;
    factored_indices(t.ix, first, &row, &col, &rcm);
    const int64_t vary0 = RowVaries ? row : col, fixed = RowVaries ? col : row;
    if (vary0 != table_base) {
      table_base = vary0;
      side_table<K, H>(vary_v, vary_factor, vary0, rl.stride, width,
                       kVeloFirstSideGroup + vary_s, inv, wl, vfac, vpart);
    }
    float part[2][H];
    velo_side_partial(fixed_v + fixed * K, kVeloFirstSideGroup + fixed_s, K, inv, wl, H,
                      part[0]);
    velo_side_partial(fixed_v + fixed * K, kVeloFirstSideGroup + 2 + fixed_s, K, inv, wl, H,
                      part[1]);
    for (int s = 0; s < 2; ++s)
      for (int o = 0; o < H; ++o)
        for (int e = 0; e < kLanes; ++e) fpart[s][o][e] = part[s][o];
    for (LaneInputs& li : in)
      for (int a = 0; a < K; ++a)
        for (int e = 0; e < kLanes; ++e)
          (RowVaries ? li.cf : li.rf)[a][e] = fixed_factor[fixed * K + a];
    // Lane group g at position j of this run: loads, features and side pointers.
    auto prepare = [&](int g, int64_t j) {
      LaneInputs& li = in[g];
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, width - j));
      const int64_t i0 = first + j;
      {
        // Software prefetch kPrefetchGroups lane groups ahead in the tile's walk (into the next
        // run past this one's end): the runs' short segments defeat the hardware prefetcher.
        int64_t ahead = j + kPrefetchGroups * kLanes, qa = q;
        if (ahead >= width) {
          ahead -= width;
          ++qa;
        }
        if (qa < tile.q1) {
          const int64_t ia = qa * rl.len + tile.j0 + ahead;
          __builtin_prefetch(static_cast<const char*>(p_in) + ia * dtype_size(DT));
          __builtin_prefetch(static_cast<const char*>(g_in) + ia * dtype_size(DT));
          __builtin_prefetch(rms_in + ia);
          for (int c = 0; c < K; ++c) __builtin_prefetch(m_in + ia * K + c * kLanes);
        }
      }
      if (lanes == kLanes) {
        load_lanes<DT, K>(p_in, g_in, m_in, rms_in, wd, clip, i0, li);
      } else {  // the run's last, partial lane group: lanes past its end repeat its last element
        for (int e = 0; e < kLanes; ++e) {
          const int64_t i = i0 + std::min(e, lanes - 1);
          li.p[e] = load_value(p_in, DT, i);
          li.g[e] = effective_grad(load_value(g_in, DT, i), li.p[e], wd, clip);
          li.rms[e] = rms_in[i];
          for (int a = 0; a < K; ++a) li.m[a][e] = m_in[i * K + a];
        }
      }
      float (*const vary_lanes)[kLanes] = RowVaries ? li.rf : li.cf;
      for (int a = 0; a < K; ++a)
#pragma omp simd
        for (int e = 0; e < kLanes; ++e) vary_lanes[a][e] = vfac[a][j + e];
#pragma omp simd
      for (int e = 0; e < kLanes; ++e)
        velo_element_features(lane_state<K, true>(li, e, false), K, x[g] + e, kLanes);
      sides[g].p[vary_s] = &vpart[0][0][j];
      sides[g].p[2 + vary_s] = &vpart[1][0][j];
    };
    auto finish = [&](int g, int64_t j) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, width - j));
      write_step<DT>(out[g], in[g].p, sc, p_out, first + j, lanes);
    };
    mlp_lane_groups<K, H, L, true>(0, width, x[0], inv, wl, sides, out[0], prepare, finish);
  }
}

// Phase B for a non-factored tensor's elements [begin, end): contiguous lane groups (v_diag
// deinterleaved like the momentum), all 6 + 8k features per element.
template <DType DT, int K, int H, int L>
void apply_diag_range(const TensorArgs& t, const float* inv, const float* w,
                      const StepScalars& sc, int64_t begin, int64_t end) {
  constexpr int F = 6 + 8 * K;
  constexpr int kWeights = F * H + H + (L - 1) * (H * H + H) + H * 3 + 3;
  alignas(64) float wl[kWeights];
  for (int j = 0; j < kWeights; ++j) wl[j] = w[j];
  alignas(64) float x[kPair][F * kLanes];
  alignas(64) float out[kPair][kVeloOutputs * kLanes];
  LaneInputs in[kPair]{};
  auto prepare = [&](int g, int64_t i0) {
    LaneInputs& li = in[g];
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - i0));
    if (lanes == kLanes) {
      load_lanes<DT, K>(t.p, t.g, t.m, t.rms, t.grad_wd, t.grad_clip, i0, li);
      cpu::deinterleave<K>(t.v_diag + i0 * K, li.vr);
    } else {  // the last, partial lane group: lanes past the end repeat the last element
      for (int e = 0; e < kLanes; ++e) {
        const int64_t i = i0 + std::min(e, lanes - 1);
        li.p[e] = load_value(t.p, DT, i);
        li.g[e] = effective_grad(load_value(t.g, DT, i), li.p[e], t.grad_wd, t.grad_clip);
        li.rms[e] = t.rms[i];
        for (int a = 0; a < K; ++a) {
          li.m[a][e] = t.m[i * K + a];
          li.vr[a][e] = t.v_diag[i * K + a];
        }
      }
    }
#pragma omp simd
    for (int e = 0; e < kLanes; ++e)
      velo_raw_features(lane_state<K, false>(li, e, false), K, x[g] + e, kLanes);
  };
  auto finish = [&](int g, int64_t i0) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - i0));
    write_step<DT>(out[g], in[g].p, sc, t.p, i0, lanes);
  };
  mlp_lane_groups<K, H, L, false>(begin, end, x[0], inv, wl, nullptr, out[0], prepare, finish);
}

template <int K>
void apply_run_tile_dtype(const TensorArgs& t, const RunLayout& rl, const float* inv,
                          const float* w, const StepScalars& sc, const RunTile& tile) {
  if (rl.row_varies) {
    switch (t.dtype) {
      case DType::kFloat32: apply_run_tile<DType::kFloat32, K, 4, 2, true>(t, rl, inv, w, sc, tile); break;
      case DType::kBFloat16: apply_run_tile<DType::kBFloat16, K, 4, 2, true>(t, rl, inv, w, sc, tile); break;
      case DType::kFloat16: apply_run_tile<DType::kFloat16, K, 4, 2, true>(t, rl, inv, w, sc, tile); break;
    }
  } else {
    switch (t.dtype) {
      case DType::kFloat32: apply_run_tile<DType::kFloat32, K, 4, 2, false>(t, rl, inv, w, sc, tile); break;
      case DType::kBFloat16: apply_run_tile<DType::kBFloat16, K, 4, 2, false>(t, rl, inv, w, sc, tile); break;
      case DType::kFloat16: apply_run_tile<DType::kFloat16, K, 4, 2, false>(t, rl, inv, w, sc, tile); break;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Phase A.

// One pass over the runs of a run-layout tensor whose lane lies in [lane0, lane1) (reduction
// order 4: a run's lane in its varying-side entries' sums is its coordinate along their
// deleted axis, mod 32). Each run's sum of g^2 + 1e-30 is its fixed-side entry's whole sum
// (one run per entry; lanes along the run) into fixed_sum; each element's term goes to the
// run's lane of its varying-side entry (vary: lane-major, [32][n_vary]). Reads g only (and p
// with weight decay).
template <DType DT, bool Decayed>
void run_sums(const TensorArgs& t, const RunLayout& rl, int lane0, int lane1,
              double* fixed_sum, double* vary, int64_t n_vary) {
  const void* __restrict p = t.p;
  const void* __restrict g = t.g;
  const float wd = t.grad_wd, clip = t.grad_clip;
  auto grad_sq = [&](int64_t i) {
    const float pv = Decayed ? load_value(p, DT, i) : 0.0f;
    return factored_grad_sq(effective_grad(load_value(g, DT, i), pv, Decayed ? wd : 0.0f, clip));
  };
  const int vary_axis = rl.row_varies ? t.d0 : t.d1;
  const int64_t runs = t.n / rl.len;
  for (int64_t q = 0; q < runs; ++q) {
    const int64_t first = q * rl.len;
    const int lane_q = static_cast<int>(axis_coordinate(t.ix, first, vary_axis) % kReduceLanes);
    if (lane_q < lane0 || lane_q >= lane1) continue;
    int64_t row, col, rcm;
    factored_indices(t.ix, first, &row, &col, &rcm);
    double* __restrict v = vary + lane_q * n_vary + (rl.row_varies ? row : col);
    alignas(64) double lane[kReduceLanes] = {};
    int64_t j0 = 0;
    for (; j0 + kLanes <= rl.len; j0 += kLanes) {
      const int64_t i0 = first + j0;
      double* __restrict lh = lane + cpu::half(j0) * kLanes;
      alignas(64) float gs[kLanes];
#pragma omp simd
      for (int e = 0; e < kLanes; ++e) {
        gs[e] = grad_sq(i0 + e);
        lh[e] += gs[e];
      }
      if (rl.stride == 1) {
#pragma omp simd
        for (int e = 0; e < kLanes; ++e) v[j0 + e] += gs[e];
      } else {
        for (int e = 0; e < kLanes; ++e) v[(j0 + e) * rl.stride] += gs[e];
      }
    }
    for (int64_t j = j0; j < rl.len; ++j) {
      const float gs = grad_sq(first + j);
      lane[j % kReduceLanes] += gs;
      v[j * rl.stride] += gs;
    }
    fixed_sum[rl.row_varies ? col : row] = lane_tree_sum(lane);
  }
}

constexpr int kReduceJobs = 8;  // jobs per run-layout tensor (lanes split evenly)

// Phase A's factored statistics (as small_fc_reduce_cpu, in the same reduction order):
// run-layout tensors by runs, kReduceJobs jobs each taking its share of the lanes; other
// factored tensors through small_fc_reduce_cpu.
void velo_reduce(const TensorArgs* t, int count, const GroupDecays& d,
                 const std::vector<RunLayout>& layout) {
  std::vector<TensorArgs> others;
  std::vector<int64_t> offset(count + 1, 0);
  std::vector<bool> by_runs(count, false);
  for (int i = 0; i < count; ++i) {
    int64_t size = 0;
    if (t[i].factored && t[i].n > 0) {
      if (!layout[i].ok) {
        others.push_back(t[i]);
      } else {
        by_runs[i] = true;
        const bool rv = layout[i].row_varies;
        size = (rv ? t[i].n_col : t[i].n_row) + kReduceLanes * (rv ? t[i].n_row : t[i].n_col);
      }
    }
    offset[i + 1] = offset[i] + size;
  }
  small_fc_reduce_cpu(others.data(), static_cast<int>(others.size()), d);
  // Scratch kept across steps (per calling thread): a fresh allocation of this size costs its
  // page faults on every step.
  static thread_local std::vector<double> scratch;
  scratch.assign(offset[count], 0.0);
  double* const sums = scratch.data();  // the OpenMP threads below see this thread's scratch
  struct Job {
    int tensor, lane0, lane1;
  };
  std::vector<Job> jobs;
  for (int i = 0; i < count; ++i)
    if (by_runs[i])
      for (int c = 0; c < kReduceJobs; ++c)
        jobs.push_back({i, c * kReduceLanes / kReduceJobs, (c + 1) * kReduceLanes / kReduceJobs});
  auto fixed_of = [&](int i) { return sums + offset[i]; };
  auto vary_of = [&](int i) {
    return fixed_of(i) + (layout[i].row_varies ? t[i].n_col : t[i].n_row);
  };
  auto n_vary_of = [&](int i) { return layout[i].row_varies ? t[i].n_row : t[i].n_col; };
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < n_jobs; ++w) {
    const Job& j = jobs[w];
    const TensorArgs& ti = t[j.tensor];
    const RunLayout& rl = layout[j.tensor];
    double* fixed = fixed_of(j.tensor);
    double* vary = vary_of(j.tensor);
    const int64_t nv = n_vary_of(j.tensor);
    const bool decayed = ti.grad_wd != 0.0f;
    switch (ti.dtype) {
      case DType::kFloat32:
        if (decayed) run_sums<DType::kFloat32, true>(ti, rl, j.lane0, j.lane1, fixed, vary, nv);
        else run_sums<DType::kFloat32, false>(ti, rl, j.lane0, j.lane1, fixed, vary, nv);
        break;
      case DType::kBFloat16:
        if (decayed) run_sums<DType::kBFloat16, true>(ti, rl, j.lane0, j.lane1, fixed, vary, nv);
        else run_sums<DType::kBFloat16, false>(ti, rl, j.lane0, j.lane1, fixed, vary, nv);
        break;
      case DType::kFloat16:
        if (decayed) run_sums<DType::kFloat16, true>(ti, rl, j.lane0, j.lane1, fixed, vary, nv);
        else run_sums<DType::kFloat16, false>(ti, rl, j.lane0, j.lane1, fixed, vary, nv);
        break;
    }
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int i = 0; i < count; ++i) {
    if (!by_runs[i]) continue;
    const bool rv = layout[i].row_varies;
    const std::vector<double> vary = cpu::entry_totals(vary_of(i), n_vary_of(i));
    small_fc_reduce_finish(t[i], d, rv ? vary.data() : fixed_of(i),
                           rv ? fixed_of(i) : vary.data());
  }
}

// How phase A walks a tile: element by element (v_diag), by runs (RunLayout with a length
// that is a multiple of kLanes) with the row (kRowRun) or the column (kColRun) entry varying
// along the last axis, or lane groups through the factored cursor (other factored tensors).
enum class Walk { kDiag, kRowRun, kColRun, kCursor };

// A tile's sums in reduction orders 1 to 3 (reduction_order.h): the moments of the old state
// (VeloMoments, per lane in float64) and the squares of the new state's features (square
// blocks per lane). Lane groups are staged in order from the tile's start; group b of a block
// of kBlockGroups covers half b % 2 of round b / 2, so a block holds kSquareRounds terms per
// lane, summed column by column when it is full (each accumulator is then loaded and stored
// once per block). Factored tensors leave out the side columns [6 + 3K, 6 + 7K) (side_sums).
template <int K, bool Factored>
struct TileSums {
  static constexpr int F = 6 + 8 * K;
  static constexpr int kBlockGroups = 2 * kSquareRounds;
  static constexpr int kSkip0 = Factored ? 6 + 3 * K : F, kSkip1 = Factored ? 6 + 7 * K : F;
  using M = VeloMoments<K>;
  alignas(64) double mom[M::kCount][kReduceLanes] = {};
  alignas(64) double sq[F][kReduceLanes] = {};
  // The staged groups: features of the new state, and the old state's p, rms and m (k), both
  // zero in lanes past the end.
  alignas(64) float x[kBlockGroups][F * kLanes];
  alignas(64) float old[kBlockGroups][2 + K][kLanes];
  int staged = 0;

  float* features() { return x[staged]; }
  float (*old_state())[kLanes] { return old[staged]; }

  // The current group is staged.
  void next() {
    if (++staged == kBlockGroups) flush(std::integral_constant<int, kBlockGroups>());
  }

  template <int N>
  void flush(std::integral_constant<int, N>) {
    for (int f = 0; f < F; ++f) {
      if (f >= kSkip0 && f < kSkip1) continue;
      for (int h = 0; h < 2; ++h)
#pragma omp simd
        for (int e = 0; e < kLanes; ++e) {
          float block = 0.0f;
          for (int b = h; b < N; b += 2) block = square_into(block, x[b][f * kLanes + e]);
          sq[f][h * kLanes + e] += block;
        }
    }
    // velo_add_moments' terms, column by column so that each column vectorizes across the
    // lanes: per lane the groups of its half in order.
    for (int h = 0; h < 2; ++h) {
      double* const lanes = &mom[0][h * kLanes];
#pragma omp simd
      for (int e = 0; e < kLanes; ++e)
        for (int b = h; b < N; b += 2) {
          const double r = old[b][1][e];
          lanes[M::kP2 * kReduceLanes + e] += static_cast<double>(old[b][0][e] * old[b][0][e]);
          lanes[M::kRms * kReduceLanes + e] += r;
          lanes[M::kRms2 * kReduceLanes + e] += r * r;
        }
      for (int a = 0; a < K; ++a)
#pragma omp simd
        for (int e = 0; e < kLanes; ++e)
          for (int b = h; b < N; b += 2) {
            const double v = old[b][2 + a][e];
            lanes[(M::kM + a) * kReduceLanes + e] += v;
            lanes[(M::kM2 + a) * kReduceLanes + e] += v * v;
          }
    }
    staged = 0;
  }

  // The tile's sums: the last, partial block, then every column's lanes by lane_tree_sum.
  void finish(double* mom_out, double* sq_out) {
    static_assert(kBlockGroups == 8, "the cases below");
    switch (staged) {
      case 1: flush(std::integral_constant<int, 1>()); break;
      case 2: flush(std::integral_constant<int, 2>()); break;
      case 3: flush(std::integral_constant<int, 3>()); break;
      case 4: flush(std::integral_constant<int, 4>()); break;
      case 5: flush(std::integral_constant<int, 5>()); break;
      case 6: flush(std::integral_constant<int, 6>()); break;
      case 7: flush(std::integral_constant<int, 7>()); break;
      default: break;
    }
    cpu::tree_sum_rows(mom, M::kCount, mom_out);
    cpu::tree_sum_rows(sq, F, sq_out);
  }
};

// Lanes 0..15 of a lane group at i0 with `lanes` elements: the old state (lanes past the end
// repeat the last element): parameter, effective gradient, rms, momentum and, with Diag,
// v_diag (deinterleaved from their [n, K] layout).
template <DType DT, int K, bool Diag>
LOPT_HD void load_old_state(const TensorArgs& t, int64_t i0, int lanes, LaneInputs& in) {
  if (lanes == kLanes) {
    load_lanes<DT, K>(t.p, t.g, t.m, t.rms, t.grad_wd, t.grad_clip, i0, in);
    if constexpr (Diag) cpu::deinterleave<K>(t.v_diag + i0 * K, in.vr);
    return;
  }
  alignas(64) float mm[K * kLanes], vv[K * kLanes];
  for (int e = 0; e < kLanes; ++e) {
    const int64_t ie = i0 + std::min(e, lanes - 1);
    in.p[e] = load_value(t.p, DT, ie);
    in.g[e] = effective_grad(load_value(t.g, DT, ie), in.p[e], t.grad_wd, t.grad_clip);
    in.rms[e] = t.rms[ie];
    for (int a = 0; a < K; ++a) {
      mm[e * K + a] = t.m[ie * K + a];
      if constexpr (Diag) vv[e * K + a] = t.v_diag[ie * K + a];
    }
  }
  cpu::deinterleave<K>(mm, in.m);
  if constexpr (Diag) cpu::deinterleave<K>(vv, in.vr);
}

// The old state's p, rms and m (k) into a TileSums slot for its moments, zero past `lanes`.
template <int K>
LOPT_HD void stage_old_state(const LaneInputs& in, int lanes, float (*o)[kLanes]) {
#pragma omp simd
  for (int e = 0; e < kLanes; ++e) {
    o[0][e] = e < lanes ? in.p[e] : 0.0f;
    o[1][e] = e < lanes ? in.rms[e] : 0.0f;
  }
  for (int a = 0; a < K; ++a)
#pragma omp simd
    for (int e = 0; e < kLanes; ++e) o[2 + a][e] = e < lanes ? in.m[a][e] : 0.0f;
}

// This step's moving averages of the lanes (momentum, rms and, with Diag, v_diag).
template <int K, bool Diag>
LOPT_HD void update_accumulators(const GroupDecays& d, LaneInputs& in) {
  for (int a = 0; a < K; ++a)
#pragma omp simd
    for (int e = 0; e < kLanes; ++e) in.m[a][e] = momentum_update(d, a, in.m[a][e], in.g[e]);
#pragma omp simd
  for (int e = 0; e < kLanes; ++e) in.rms[e] = rms_update(d, in.rms[e], in.g[e]);
  if constexpr (Diag)
    for (int a = 0; a < K; ++a)
#pragma omp simd
      for (int e = 0; e < kLanes; ++e) in.vr[a][e] = diag_update(d, a, in.vr[a][e], in.g[e]);
}

// Stores lanes [0, lanes) of the new state (interleaved back to [n, K]).
template <int K, bool Diag>
LOPT_HD void store_new_state(const TensorArgs& t, int64_t i0, int lanes, const LaneInputs& in) {
  if (lanes == kLanes) {
    cpu::interleave<K>(in.m, t.m + i0 * K);
    std::copy(in.rms, in.rms + kLanes, t.rms + i0);
    if constexpr (Diag) cpu::interleave<K>(in.vr, t.v_diag + i0 * K);
    return;
  }
  alignas(64) float buf[K * kLanes];
  cpu::interleave<K>(in.m, buf);
  std::copy(buf, buf + K * lanes, t.m + i0 * K);
  std::copy(in.rms, in.rms + lanes, t.rms + i0);
  if constexpr (Diag) {
    cpu::interleave<K>(in.vr, buf);
    std::copy(buf, buf + K * lanes, t.v_diag + i0 * K);
  }
}

// Phase A's one pass over the state, on one tile of lane groups (Walk::kDiag or a run walk):
// the moment sums of the old state (mom), the moving averages (stored), and the sums of
// squares of the new state's features (sq[F]; for runs the element columns only: the side
// columns are summed per entry), formed in TileSums.
template <DType DT, int K, Walk W>
void update_tile(const TensorArgs& t, const GroupDecays& d, const RunLayout& rl,
                 int64_t begin, int64_t end, double* mom, double* sq) {
  constexpr int F = 6 + 8 * K;
  constexpr bool kRun = W != Walk::kDiag, kRowVaries = W == Walk::kRowRun;
  TileSums<K, kRun> sums;
  LaneInputs in{};
  const float* vary_factor = kRowVaries ? t.row_factor : t.col_factor;
  const float* fixed_factor = kRowVaries ? t.col_factor : t.row_factor;
  float (*const fixed_lanes)[kLanes] = kRowVaries ? in.cf : in.rf;
  float (*const vary_lanes)[kLanes] = kRowVaries ? in.rf : in.cf;
  int64_t i = begin;
  while (i < end) {
    // A segment [i, seg_end) inside one run (the whole tile for v_diag).
    int64_t seg_end = end, vary0 = 0;
    if constexpr (kRun) {
      seg_end = std::min(end, (i / rl.len + 1) * rl.len);
      int64_t row, col, rcm;
      factored_indices(t.ix, i, &row, &col, &rcm);
      vary0 = kRowVaries ? row : col;
      const int64_t fixed = kRowVaries ? col : row;
      for (int a = 0; a < K; ++a)
        for (int e = 0; e < kLanes; ++e) fixed_lanes[a][e] = fixed_factor[fixed * K + a];
    }
    for (int64_t i0 = i; i0 < seg_end; i0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, seg_end - i0));
      const int64_t entry0 = vary0 + (i0 - i) * rl.stride;
      load_old_state<DT, K, !kRun>(t, i0, lanes, in);
      if constexpr (kRun) {
        if (rl.stride == 1 && lanes == kLanes) {
          cpu::deinterleave<K>(vary_factor + entry0 * K, vary_lanes);
        } else {
          for (int e = 0; e < kLanes; ++e)
            for (int a = 0; a < K; ++a)
              vary_lanes[a][e] =
                  vary_factor[(entry0 + std::min(e, lanes - 1) * rl.stride) * K + a];
        }
      }
      stage_old_state<K>(in, lanes, sums.old_state());
      update_accumulators<K, !kRun>(d, in);
      store_new_state<K, !kRun>(t, i0, lanes, in);
      // Features of the new state, staged for their squares.
      float* const x = sums.features();
      if constexpr (kRun) {
#pragma omp simd
        for (int e = 0; e < kLanes; ++e)
          velo_element_features(lane_state<K, true>(in, e, false), K, x + e, kLanes);
      } else {
#pragma omp simd
        for (int e = 0; e < kLanes; ++e)
          velo_raw_features(lane_state<K, false>(in, e, false), K, x + e, kLanes);
      }
      if (lanes < kLanes)
        for (int f = 0; f < F; ++f)
          for (int e = lanes; e < kLanes; ++e) x[f * kLanes + e] = 0.0f;
      sums.next();
    }
    i = seg_end;
  }
  sums.finish(mom, sq);
}

// Walk::kCursor, as update_tile: a factored tensor that runs cannot walk, by lane groups
// through the factored cursor (cpu::gather), the element columns of every element.
template <int K>
void cursor_tile(const TensorArgs& t, const GroupDecays& d, int64_t begin, int64_t end,
                 double* mom, double* sq) {
  constexpr int F = 6 + 8 * K;
  TileSums<K, true> sums;
  LaneInputs in;
  FactoredCursor cur;
  cur.start(t.ix, begin);
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - i0));
    float (*const o)[kLanes] = sums.old_state();  // before gather updates the state
    for (int e = 0; e < kLanes; ++e) {
      const int64_t i = i0 + e;
      o[0][e] = e < lanes ? load_value(t.p, t.dtype, i) : 0.0f;
      o[1][e] = e < lanes ? t.rms[i] : 0.0f;
      for (int a = 0; a < K; ++a) o[2 + a][e] = e < lanes ? t.m[i * K + a] : 0.0f;
    }
    gather<K, true, true>(t, d, i0, lanes, cur, in);
    float* const x = sums.features();
#pragma omp simd
    for (int e = 0; e < kLanes; ++e)
      velo_element_features(lane_state<K, true>(in, e, false), K, x + e, kLanes);
    for (int f = 0; f < F; ++f)
      for (int e = lanes; e < kLanes; ++e) x[f * kLanes + e] = 0.0f;
    sums.next();
  }
  sums.finish(mom, sq);
}

// Side columns of a factored tensor's feature sums of squares, in reduction order 5: per
// column, each (updated) v_row or v_col entry's feature squared in float64, the entries in
// lanes, times the number of elements sharing an entry.
template <int K>
void side_sums(const TensorArgs& t, double* sq) {
  const int c0 = 6 + 3 * K;
  for (int side = 0; side < 2; ++side) {
    const float* v = side == 0 ? t.v_row : t.v_col;
    const int64_t entries = side == 0 ? t.n_row : t.n_col;
    const double share = static_cast<double>(t.n / entries);
    for (int rs = 0; rs < 2; ++rs)
      for (int a = 0; a < K; ++a) {
        const double total = lane_ordered_sum(entries, [&](int64_t r) {
          const double f = velo_side_feature(v[r * K + a], rs == 1);
          return f * f;
        });
        sq[c0 + (2 * rs + side) * K + a] = total * share;
      }
  }
}

template <int K, DType DT>
void update_tile_walk(const TensorArgs& t, const GroupDecays& d, const RunLayout& rl,
                      int64_t begin, int64_t end, double* mom, double* sq) {
  if (!rl.ok) update_tile<DT, K, Walk::kDiag>(t, d, rl, begin, end, mom, sq);
  else if (rl.row_varies) update_tile<DT, K, Walk::kRowRun>(t, d, rl, begin, end, mom, sq);
  else update_tile<DT, K, Walk::kColRun>(t, d, rl, begin, end, mom, sq);
}

template <int K>
void accumulate_k(const TensorArgs* t, int count, const GroupDecays& d, bool factored_ready,
                  float* stats) {
  constexpr int F = 6 + 8 * K;
  using M = VeloMoments<K>;
  constexpr int W = M::kCount + F;
  std::vector<RunLayout> layout(count);
  for (int i = 0; i < count; ++i) layout[i] = run_layout(t[i]);
  if (!factored_ready) velo_reduce(t, count, d, layout);
  // Phase A walks runs in whole lane groups (reduction order 1 numbers lanes by the offset in
  // the tile); a factored tensor with runs of another length walks by cursor.
  std::vector<Walk> walk(count, Walk::kDiag);
  for (int i = 0; i < count; ++i) {
    if (!t[i].factored) continue;
    const RunLayout& rl = layout[i];
    walk[i] = !rl.ok || rl.len % kLanes != 0 ? Walk::kCursor
              : rl.row_varies                ? Walk::kRowRun
                                             : Walk::kColRun;
  }
  const std::vector<WorkItem> items = cpu::accumulate_items(t, count);
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<double> part(items.size() * W);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const WorkItem& it = items[w];
    const TensorArgs& ti = t[it.tensor];
    const RunLayout& rl = layout[it.tensor];
    double* mom = part.data() + w * W;
    double* sq = mom + M::kCount;
    if (walk[it.tensor] == Walk::kCursor) {
      cursor_tile<K>(ti, d, it.begin, it.end, mom, sq);
      continue;
    }
    switch (ti.dtype) {
      case DType::kFloat32: update_tile_walk<K, DType::kFloat32>(ti, d, rl, it.begin, it.end, mom, sq); break;
      case DType::kBFloat16: update_tile_walk<K, DType::kBFloat16>(ti, d, rl, it.begin, it.end, mom, sq); break;
      case DType::kFloat16: update_tile_walk<K, DType::kFloat16>(ti, d, rl, it.begin, it.end, mom, sq); break;
    }
  }
  std::vector<double> sums = per_tensor(items, part, count, W);
#pragma omp parallel for schedule(dynamic, 1)
  for (int i = 0; i < count; ++i)
    if (t[i].factored) side_sums<K>(t[i], sums.data() + i * W + M::kCount);
  const int S = velo_stats_count(K);
  for (int i = 0; i < count; ++i) {
    if (t[i].sums != nullptr) std::copy(sums.data() + i * W, sums.data() + (i + 1) * W, t[i].sums);
    velo_stats<K>(sums.data() + i * W, t[i].n, stats + i * S);
    for (int f = 0; f < F; ++f) t[i].sumsq[f] = static_cast<float>(sums[i * W + M::kCount + f]);
  }
}

}  // namespace

void factored_sums_cpu(const TensorArgs* t, int count, const GroupDecays& d) {
  std::vector<RunLayout> layout(count);
  for (int i = 0; i < count; ++i) layout[i] = run_layout(t[i]);
  velo_reduce(t, count, d, layout);
}

namespace {

template <int K>
void apply_k(const TensorArgs* t, int count, const GroupDecays& d, const VeloApplyArgs& a) {
  constexpr int F = 6 + 8 * K;
  const int width = velo_mlp_size(K, a.hidden, a.layers);
  const bool released = a.hidden == 4 && a.layers == 2;
  const std::vector<float> inv = cpu::normalizers(t, count, F);
  std::vector<StepScalars> scalars(count);
  std::vector<RunLayout> layout(count);
  std::vector<WorkItem> items;
  for (int i = 0; i < count; ++i) {
    scalars[i] = {a.lr_mult[i], a.param_scale[i], a.lr[i], a.decay_mult[i], a.exp_mult,
                  a.step_mult};
    if (released) layout[i] = run_layout(t[i]);
    if (layout[i].ok) continue;
    for (int64_t b = 0; b < t[i].n; b += cpu::kApplyChunk)
      items.push_back({i, b, std::min(t[i].n, b + cpu::kApplyChunk)});
  }
  const std::vector<RunTile> tiles = run_tiles(t, layout, count);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < n_tiles + n_items; ++w) {
    if (w < n_tiles) {
      const RunTile& tile = tiles[w];
      apply_run_tile_dtype<K>(t[tile.tensor], layout[tile.tensor],
                              inv.data() + tile.tensor * F,
                              a.weights + static_cast<int64_t>(tile.tensor) * width,
                              scalars[tile.tensor], tile);
      continue;
    }
    const WorkItem& it = items[w - n_tiles];
    const TensorArgs& ti = t[it.tensor];
    const float* iv = inv.data() + it.tensor * F;
    const float* weights = a.weights + static_cast<int64_t>(it.tensor) * width;
    const StepScalars& sc = scalars[it.tensor];
    if (ti.factored && released) {
      apply_range<K, true, 4, 2>(ti, d, iv, weights, a, sc, it.begin, it.end);
    } else if (released) {
      switch (ti.dtype) {
        case DType::kFloat32: apply_diag_range<DType::kFloat32, K, 4, 2>(ti, iv, weights, sc, it.begin, it.end); break;
        case DType::kBFloat16: apply_diag_range<DType::kBFloat16, K, 4, 2>(ti, iv, weights, sc, it.begin, it.end); break;
        case DType::kFloat16: apply_diag_range<DType::kFloat16, K, 4, 2>(ti, iv, weights, sc, it.begin, it.end); break;
      }
    } else if (ti.factored) {
      apply_range<K, true, 0, 0>(ti, d, iv, weights, a, sc, it.begin, it.end);
    } else {
      apply_range<K, false, 0, 0>(ti, d, iv, weights, a, sc, it.begin, it.end);
    }
  }
}

}  // namespace

void velo_accumulate_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                         bool factored_ready, float* stats) {
  switch (d.k) {
    case 1: accumulate_k<1>(t, count, d, factored_ready, stats); break;
    case 2: accumulate_k<2>(t, count, d, factored_ready, stats); break;
    case 3: accumulate_k<3>(t, count, d, factored_ready, stats); break;
    case 4: accumulate_k<4>(t, count, d, factored_ready, stats); break;
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
