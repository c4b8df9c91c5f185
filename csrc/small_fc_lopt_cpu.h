// CPU backend of the fused small_fc_lopt step: plain C++ and OpenMP over raw pointers. Each
// function takes every tensor of a parameter group at once.
#pragma once

#include "tensor_args.h"

namespace lopt {

// Phase 1: factored statistics. v_row/v_col moving averages of mean(g^2 + 1e-30) over d0/d1,
// then the row and column factors. Non-factored tensors are skipped. Tensors run in
// parallel, each summed in element order (deterministic).
void small_fc_reduce_cpu(const TensorArgs* t, int count, const GroupDecays& d);

// The rest of phase 1 for one factored tensor, from the sums of g^2 + 1e-30 over each v_row
// entry's and each v_col entry's elements: the moving averages and the factors; for a sharded
// tensor (entry_sums set) only the sums, copied to entry_sums for the caller to complete.
void small_fc_reduce_finish(const TensorArgs& t, const GroupDecays& d, const double* row_sum,
                            const double* col_sum);

// Phase 2: momentum, rms and v_diag moving averages; per-feature sums of squares of the raw
// features into each tensor's sumsq (summed per accumulate_tile, then the tiles in order).
void small_fc_accumulate_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                             bool head_variant);

// Phase 3: features again, normalized by rsqrt(1e-5 + sumsq / n), time features appended,
// the MLP, and p <- p - lr * (step * scale) (rounded to the parameter dtype; scale is each
// tensor's TensorArgs::scale).
void small_fc_apply_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                        bool head_variant, const MlpView& net, float exp_mult,
                        float step_mult, float lr);

}  // namespace lopt
