// CPU backend of the fused VeLO step: two multi-tensor phases around the per-tensor network,
// which runs in torch between them.
#pragma once

#include "tensor_args.h"
#include "velo_math.h"

namespace lopt {

// Phase A: each tensor's statistics of the state before this step's update (velo_stats,
// velo_math.h: velo_stats_count(k) floats per tensor); the factored statistics (as
// small_fc_reduce_cpu); the moving averages; the per-feature sums of squares of the 6 + 8k
// features into sumsq. Gradients are effective_grad (weight decay, clip) throughout.
// Sharded parameters, phase A's factored sums alone (velo_accumulate_cpu's, in the order of
// small_fc_reduce_cpu): each factored tensor's sums of g^2 + 1e-30 per v_row entry, then per
// v_col entry, over this rank's elements into its entry_sums (which must be set).
void factored_sums_cpu(const TensorArgs* t, int count, const GroupDecays& d);

// factored_ready: v_row, v_col and the row and column factors are this step's already
// (sharded parameters: factored_sums, completed over the ranks); otherwise phase A forms them.
void velo_accumulate_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                         bool factored_ready, float* stats);

struct VeloApplyArgs {
  const float* weights;      // [count, velo_mlp_size]: each tensor's interpolated MLP
  int hidden, layers;        // ff_hidden_size, ff_hidden_layers
  const float* lr_mult;      // [count]
  const float* param_scale;  // [count]
  const float* lr;           // [count] (host)
  const float* decay_mult;   // [count] (host): 1 - lr * wd for decoupled weight decay, else 1
  float exp_mult, step_mult;
};

// Phase B: features again, normalized by rsqrt(1e-5 + sumsq / n), each tensor's MLP, and
// p <- decay_mult * p - lr * velo_step(...), rounded to the parameter dtype.
void velo_apply_cpu(const TensorArgs* t, int count, const GroupDecays& d,
                    const VeloApplyArgs& a);

}  // namespace lopt
