// Index math for factored statistics, host+device: an element's v_row, v_col and row-column
// mean entries, walked by division or by cursor, and the elements along a deleted axis.
#pragma once

#include <cstdint>

#include "scalar_math.h"

namespace lopt {

constexpr int kMaxRank = 8;

// // Index math for a contiguous tensor with factored dims (d1, d0): for an element's linear
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

// The coordinate along `axis` of the element at `linear` in a contiguous tensor.
LOPT_HD int64_t axis_coordinate(const FactoredIndex& ix, int64_t linear, int axis) {
  return (linear / axis_stride(ix.size, ix.rank, axis)) % ix.size[axis];
}

}  // namespace lopt
