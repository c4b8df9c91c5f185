// CUDA backend of the fused VeLO step: the CPU backend's two phases (velo_cpu.h) as C
// launchers over raw device pointers, no torch headers. Conventions as small_fc_lopt_cuda.h:
// the TensorArgs array lives in host memory and its pointers are device pointers, kernels are
// enqueued on `stream` (a cudaStream_t) with no host synchronization, the return value is 0 or
// a CUDA error code (lopt_cuda_error_string names it), and the caller sets the current device.
#pragma once

#include <cstdint>

#include "tensor_args.h"
#include "velo_math.h"

extern "C" {

// Phase A, as velo_accumulate_cpu: the factored statistics (lopt_small_fc_reduce_cuda, unless
// factored_ready); each tensor's statistics of the state before this step's update into
// `stats` (device, [count, 2 + 3k], velo_stats_count's layout); the moving averages; the
// per-feature sums of squares of the 6 + 8k features into each tensor's sumsq (and its float64
// sums into `sums` where set). `partials` is device scratch of lopt_velo_partials(tensors,
// count, k) doubles.
int lopt_velo_accumulate_cuda(const lopt::TensorArgs* tensors, int count,
                              const lopt::GroupDecays* decays, bool factored_ready,
                              float* stats, double* partials, void* stream);

// Scratch needed by lopt_velo_accumulate_cuda, in doubles.
int64_t lopt_velo_partials(const lopt::TensorArgs* tensors, int count, int k);

// Phase B, as velo_apply_cpu: features, normalization by rsqrt(1e-5 + sumsq / n), each
// tensor's MLP (its row of `weights`, [count, velo_mlp_size], staged in shared memory), and
// p <- decay_mult * p - lr * velo_step(...) rounded to the parameter dtype. weights, lr_mult
// and param_scale ([count]) are device pointers, read by the kernels; lr and decay_mult
// ([count]) are host pointers, read while launching.
int lopt_velo_apply_cuda(const lopt::TensorArgs* tensors, int count,
                         const lopt::GroupDecays* decays, const float* weights, int hidden,
                         int layers, const float* lr_mult, const float* param_scale,
                         const float* lr, const float* decay_mult, float exp_mult,
                         float step_mult, void* stream);
}
