// CPU backend of the fused small_fc_lopt step: plain C++ and OpenMP over raw pointers.
#pragma once

#include <cstdint>

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

// One parameter tensor and its state (all contiguous float32).
struct TensorArgs {
  int64_t n;
  float* p;
  const float* g;
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
};

// Phase 1: factored statistics. v_row/v_col moving averages of mean(g^2 + 1e-30) over d0/d1,
// then the row and column factors. Does nothing for non-factored tensors.
void small_fc_reduce_cpu(const TensorArgs& t, const GroupDecays& d);

// Phase 2: momentum, rms and v_diag moving averages; sums of squares of every raw feature
// column into sumsq[F] (fixed-size blocks summed in order: deterministic).
void small_fc_accumulate_cpu(const TensorArgs& t, const GroupDecays& d, bool head_variant,
                             float* sumsq);

// Phase 3: features again, normalized by rsqrt(1e-5 + sumsq / n), time features appended,
// the MLP, and p <- p - step.
void small_fc_apply_cpu(const TensorArgs& t, const GroupDecays& d, bool head_variant,
                        const float* sumsq, const float* time_features, const MlpView& net,
                        float exp_mult, float step_mult, float lr);

}  // namespace lopt
