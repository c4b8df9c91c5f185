// The reduction orders of the fused kernels, host+device. Every sum a kernel forms is defined
// here (which terms, in which lanes and blocks, in which order), and the CPU backends, the
// CUDA kernels and the emulated CUDA backend all form it in that order, so that their results
// are identical bit for bit and never depend on thread counts.
//
// 1. Lanes. A sum over a sequence of terms t_0, t_1, ... (the elements of a tile, or the
//    elements along one axis) is split into kReduceLanes = 32 interleaved lanes: term j goes to
//    lane j % 32, each lane adds its terms in order in float64 starting from 0, and the lanes
//    are combined by lane_tree_sum. On a GPU a lane is a thread of a warp (the combination is
//    a shuffle butterfly); on the CPU a lane is a vector lane (a 16-wide group covers half of
//    the lanes of one round of 32 terms).
// 2. Square blocks (VeLO's feature sums of squares): a lane's terms are squared in blocks of
//    kSquareRounds consecutive terms of that lane, each block an FMA chain in float32 from 0
//    (square_into), then added to the lane's float64 sum.
// 3. Tiles. The per-tensor sums of phase 2 / phase A (feature sums of squares, VeLO's moments)
//    are formed per tile of accumulate_tile(n) consecutive elements (lanes as above, by the
//    element's offset in its tile), then the tiles' sums are added in tile order from 0.
// 4. Factored statistics. Each v_row / v_col entry's sum of g^2 + 1e-30 runs over the elements
//    along its deleted axis (term j = the element at coordinate j), in lanes as above; so does
//    each row-column mean's sum of v_row entries. The mean is float(sum / length).
// 5. VeLO's side features (the four groups that depend on one v_row or v_col entry) of a
//    factored tensor: per column, each entry's feature squared in float64, the entries in
//    lanes as above, times the number of elements sharing an entry.
#pragma once

#include <cstdint>

#include "scalar_math.h"

namespace lopt {

constexpr int kReduceLanes = 32;
constexpr int kSquareRounds = 4;

// Combines the 32 lane sums v[0..32) (overwritten) in the tree of a warp's shuffle butterfly:
// for offsets 16, 8, 4, 2, 1, lane l adds lane l + offset (l < offset). The GPU's warp_sum
// (multi_tensor_cuda.cuh) forms the same tree with __shfl_xor_sync, where every lane ends
// with lane 0's total.
LOPT_HD double lane_tree_sum(double* v) {
  for (int off = kReduceLanes / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) v[l] = v[l] + v[l + off];
  return v[0];
}

// The sum of term(j) for j in [0, len) in reduction order 1, formed by one thread.
template <typename Term>
LOPT_HD double lane_ordered_sum(int64_t len, Term term) {
  double lanes[kReduceLanes] = {};
  for (int64_t j = 0; j < len; ++j) lanes[j % kReduceLanes] += term(j);
  return lane_tree_sum(lanes);
}

// One term of a square block: block + x * x with one rounding.
LOPT_HD float square_into(float block, float x) { return fmaf(x, x, block); }

// Tiles: the tile depends only on n (never on the thread count or device), so every run and
// backend splits alike; at most kMaxTilesPerTensor tiles bound the scratch memory whatever
// the tensor size. Tiles are multiples of kReduceLanes * kSquareRounds elements, so every
// tile but a tensor's last holds whole rounds and square blocks.
constexpr int64_t kMinTile = 4096;
constexpr int64_t kMaxTilesPerTensor = 1024;
static_assert(kMinTile % (kReduceLanes * kSquareRounds) == 0, "whole square blocks per tile");

LOPT_HD int64_t accumulate_tile(int64_t n) {
  const int64_t per = (n + kMaxTilesPerTensor - 1) / kMaxTilesPerTensor;
  return per <= kMinTile ? kMinTile : (per + kMinTile - 1) / kMinTile * kMinTile;
}

LOPT_HD int64_t accumulate_tiles(int64_t n) {
  const int64_t t = accumulate_tile(n);
  return (n + t - 1) / t;
}

}  // namespace lopt
