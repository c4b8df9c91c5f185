// CUDA backend of the fused small_fc_lopt step: C launchers over raw device pointers, no
// torch headers. Each launcher takes every tensor of a parameter group (the TensorArgs array
// lives in host memory; its pointers are device pointers), enqueues its kernels on `stream`
// (a cudaStream_t) and returns 0 or the CUDA error code (lopt_cuda_error_string names it).
// The caller sets the current device.
#pragma once

#include "tensor_args.h"

extern "C" {

// Phase 1: v_row/v_col moving averages and the row/column factors of factored tensors.
// Sharded parameters: phase 1a only, each factored tensor's per-entry sums into its
// entry_sums (which must be set), as factored_sums_cpu.
int lopt_factored_sums_cuda(const lopt::TensorArgs* tensors, int count,
                            const lopt::GroupDecays* decays, void* stream);

int lopt_small_fc_reduce_cuda(const lopt::TensorArgs* tensors, int count,
                              const lopt::GroupDecays* decays, void* stream);

// Phase 2: moving averages and per-feature sums of squares into each tensor's sumsq.
// `partials` is device scratch of lopt_small_fc_partials(tensors, count, k) doubles.
int lopt_small_fc_accumulate_cuda(const lopt::TensorArgs* tensors, int count,
                                  const lopt::GroupDecays* decays, bool head_variant,
                                  double* partials, void* stream);

// Phase 3: features, normalization, MLP (weights staged in shared memory), parameter write
// p <- p - lr * (step * scale) with each tensor's TensorArgs::scale.
int lopt_small_fc_apply_cuda(const lopt::TensorArgs* tensors, int count,
                             const lopt::GroupDecays* decays, bool head_variant,
                             const lopt::MlpView* net, float exp_mult, float step_mult,
                             float lr, void* stream);

// Scratch needed by lopt_small_fc_accumulate_cuda, in doubles.
int64_t lopt_small_fc_partials(const lopt::TensorArgs* tensors, int count, int k);

const char* lopt_cuda_error_string(int code);
}
