// Arguments of the fused phases (small_fc_lopt and VeLO): plain structs of sizes and raw
// pointers, filled by the torch binding and read by the CPU and CUDA backends alike.
#pragma once

#include <cstdint>

#include "factored_index.h"
#include "small_fc_lopt_math.h"

namespace lopt {

// Decays of a parameter group. mix = 1 - decay in float32; rms and adafactor decays are
// clipped to [0, 1] as upstream does, momentum decays are not.
struct GroupDecays {
  int k;
  float mom[kMaxDecays], mom_mix[kMaxDecays];
  float rms, rms_mix;
  float fac[kMaxDecays], fac_mix[kMaxDecays];
};

// This step's moving averages of one element's accumulators (the same FMA in every backend):
// momentum a, rms, non-factored v_diag a, and a factored v_row / v_col entry a from the mean
// of g^2 + 1e-30 over its elements.
LOPT_HD float momentum_update(const GroupDecays& d, int a, float m, float g) {
  return ema(d.mom[a], m, d.mom_mix[a] * g);
}
LOPT_HD float rms_update(const GroupDecays& d, float rms, float g) {
  return ema(d.rms, rms, d.rms_mix * (g * g));
}
LOPT_HD float diag_update(const GroupDecays& d, int a, float v, float g) {
  return ema(d.fac[a], v, d.fac_mix[a] * factored_grad_sq(g));
}
LOPT_HD float factored_update(const GroupDecays& d, int a, float v, float mean) {
  return ema(d.fac[a], v, d.fac_mix[a] * mean);
}

// One parameter tensor and its state. Params and grads are `dtype`; state is float32. All
// contiguous, on the device the phase runs on.
struct TensorArgs {
  int64_t n;
  int64_t n_total;  // elements of the whole tensor, the normalizers' count (n unless sharded)
  DType dtype;
  void* p;
  const void* g;
  float* m;       // [n, k]
  float* rms;     // [n]
  bool factored;
  FactoredIndex ix;
  int d1, d0;
  int64_t n_row, n_col, n_rcm;
  float* v_row;       // [n_row, k]   (factored)
  float* v_col;       // [n_col, k]   (factored)
  float* v_diag;      // [n, k]       (not factored)
  float* row_factor;  // [n_row, k]   scratch (factored)
  float* col_factor;  // [n_col, k]   scratch (factored)
  float* sumsq;       // [F]: accumulate writes, apply reads
  float time[kNumTimeFeatures];  // this tensor's time features (apply)
  float grad_wd;      // effective_grad: weight decay added to the gradient (0: none)
  float grad_clip;    // effective_grad: clip bound (+inf: none)
  float scale;        // small_fc apply: the step's per-tensor multiplier (MuLO's s; else 1)
  // Sharded parameters (this rank's rows): the partial sums the phases leave for the caller
  // to complete over the ranks. nullptr: the phase finishes the sums itself.
  double* entry_sums;  // factored_sums: [n_row + n_col] sums of g^2 + 1e-30 per entry
  double* sums;        // accumulate: the tensor's float64 sums (small_fc: the F feature
                       // columns; VeLO: velo_moment_count(k) moments, then the F columns)
};

}  // namespace lopt
