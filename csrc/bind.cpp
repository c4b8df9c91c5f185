// Torch binding of the fused steps: multi-tensor ops, one per phase (small_fc_lopt three, VeLO
// two), each called once per parameter group and step, dispatched by device to the CPU
// backends or (when built with LOPT_WITH_CUDA) the CUDA launchers. Tensors arrive as lists;
// per-tensor factored dims as a flat int list [d1, d0, d1, d0, ...] with -1 for non-factored
// tensors.
// Plain C++: the CUDA path needs no CUDA headers, only c10's device-generic guard and
// stream interfaces.
//
// Built a second time for the emulated CUDA backend (LOPT_CUDA_EMULATION, see
// cuda_emulation/): the ops are then `torch.ops.lopt_port_emulated.*`, take CPU tensors and
// run the CUDA launchers (the .cu sources compiled by the host compiler) on guarded copies of
// every buffer.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "small_fc_lopt_cpu.h"
#include "velo_cpu.h"
#if defined(LOPT_WITH_CUDA)
#include "small_fc_lopt_cuda.h"
#include "velo_cuda.h"
#endif
#if defined(LOPT_CUDA_EMULATION)
#include "cuda_emulation/device_memory.h"
#define LOPT_OPS_LIBRARY lopt_port_emulated
#else
#define LOPT_OPS_LIBRARY lopt_port
#endif

namespace {

// Whether the CUDA launchers take CPU tensors (the emulated backend).
#if defined(LOPT_CUDA_EMULATION)
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

using at::Tensor;

template <typename T>
T* ptr(const Tensor& t) {
  return t.numel() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

void check_tensor(const Tensor& t, const char* what, const at::Device& device,
                  bool state = true) {
  if (state)
    TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32, got ",
                t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(t.device() == device, what, " is on ", t.device(), ", the parameters on ",
              device);
}

lopt::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return lopt::DType::kFloat32;
    case at::kBFloat16: return lopt::DType::kBFloat16;
    case at::kHalf: return lopt::DType::kFloat16;
    default: TORCH_CHECK(false, "parameters must be float32, bfloat16 or float16, got ",
                         t.scalar_type());
  }
}

lopt::GroupDecays group_decays(const Tensor& decays) {
  // decays: [momentum (k), rms (1), adafactor (k)], float32 on the CPU.
  check_tensor(decays, "decays", at::Device(at::kCPU));
  const int64_t total = decays.numel();
  TORCH_CHECK(total % 2 == 1 && total >= 3 && (total - 1) / 2 <= lopt::kMaxDecays,
              "decays must hold k momentum, 1 rms and k adafactor values, 1 <= k <= ",
              lopt::kMaxDecays);
  lopt::GroupDecays d;
  d.k = static_cast<int>((total - 1) / 2);
  const float* v = decays.data_ptr<float>();
  for (int a = 0; a < d.k; ++a) {
    d.mom[a] = v[a];
    d.mom_mix[a] = 1.0f - v[a];
    const float c = std::min(std::max(v[d.k + 1 + a], 0.0f), 1.0f);
    d.fac[a] = c;
    d.fac_mix[a] = 1.0f - c;
  }
  d.rms = std::min(std::max(v[d.k], 0.0f), 1.0f);
  d.rms_mix = 1.0f - d.rms;
  return d;
}

struct Group {
  at::Device device{at::kCPU};
  lopt::GroupDecays decays;
  std::vector<lopt::TensorArgs> tensors;
};

Group make_group(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                 at::TensorList rms, at::TensorList v_row, at::TensorList v_col,
                 at::TensorList v_diag, at::TensorList row_factor, at::TensorList col_factor,
                 at::IntArrayRef dims, const Tensor& decays) {
  Group group;
  group.decays = group_decays(decays);
  const int k = group.decays.k;
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "no parameters");
  TORCH_CHECK(grads.size() == n && momentum.size() == n && rms.size() == n &&
                  v_row.size() == n && v_col.size() == n && v_diag.size() == n &&
                  row_factor.size() == n && col_factor.size() == n &&
                  dims.size() == 2 * n,
              "every tensor list needs one entry per parameter");
  group.device = params[0].device();
  const at::Device& dev = group.device;
  TORCH_CHECK(dev.is_cpu() || dev.is_cuda(), "no fused kernel for device ", dev);
  group.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    lopt::TensorArgs& t = group.tensors[i];
    check_tensor(params[i], "params", dev, false);
    check_tensor(grads[i], "grads", dev, false);
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), "grad ", i, " is ",
                grads[i].scalar_type(), ", its parameter ", params[i].scalar_type());
    check_tensor(momentum[i], "momentum", dev);
    check_tensor(rms[i], "rms", dev);
    TORCH_CHECK(params[i].dim() <= lopt::kMaxRank, "rank above ", lopt::kMaxRank);
    TORCH_CHECK(params[i].numel() > 0, "parameter ", i, " is empty");
    TORCH_CHECK(grads[i].numel() == params[i].numel() &&
                    momentum[i].numel() == params[i].numel() * k &&
                    rms[i].numel() == params[i].numel(),
                "state sizes do not match parameter ", i);
    t.n = params[i].numel();
    t.n_total = t.n;
    t.entry_sums = t.sums = nullptr;
    t.dtype = dtype_of(params[i]);
    t.p = ptr<void>(params[i]);
    t.g = ptr<void>(grads[i]);
    t.m = ptr<float>(momentum[i]);
    t.rms = ptr<float>(rms[i]);
    t.d1 = static_cast<int>(dims[2 * i]);
    t.d0 = static_cast<int>(dims[2 * i + 1]);
    t.factored = t.d1 >= 0;
    t.v_row = t.v_col = t.v_diag = t.row_factor = t.col_factor = t.sumsq = nullptr;
    t.grad_wd = 0.0f;
    t.grad_clip = std::numeric_limits<float>::infinity();
    t.scale = 1.0f;
    t.n_row = t.n_col = t.n_rcm = 0;
    const auto sizes = params[i].sizes();
    t.ix = lopt::FactoredIndex{};
    t.ix.rank = static_cast<int>(sizes.size());
    for (int d = 0; d < t.ix.rank; ++d) t.ix.size[d] = sizes[d];
    if (t.factored) {
      TORCH_CHECK(t.d0 >= 0 && t.d0 < t.ix.rank && t.d1 < t.ix.rank && t.d0 != t.d1,
                  "bad factored dims for parameter ", i);
      for (const Tensor* s : {&v_row[i], &v_col[i], &row_factor[i], &col_factor[i]})
        check_tensor(*s, "factored state", dev);
      int64_t rs = 1, cs = 1, qs = 1;
      for (int d = t.ix.rank - 1; d >= 0; --d) {
        t.ix.row_stride[d] = d == t.d0 ? 0 : rs;
        t.ix.col_stride[d] = d == t.d1 ? 0 : cs;
        t.ix.rcm_stride[d] = (d == t.d0 || d == t.d1) ? 0 : qs;
        if (d != t.d0) rs *= sizes[d];
        if (d != t.d1) cs *= sizes[d];
        if (d != t.d0 && d != t.d1) qs *= sizes[d];
      }
      t.n_row = rs;
      t.n_col = cs;
      t.n_rcm = qs;
      TORCH_CHECK(v_row[i].numel() == rs * k && v_col[i].numel() == cs * k &&
                      row_factor[i].numel() == rs * k && col_factor[i].numel() == cs * k,
                  "factored state sizes do not match parameter ", i);
      t.v_row = ptr<float>(v_row[i]);
      t.v_col = ptr<float>(v_col[i]);
      t.row_factor = ptr<float>(row_factor[i]);
      t.col_factor = ptr<float>(col_factor[i]);
    } else {
      check_tensor(v_diag[i], "v_diag", dev);
      TORCH_CHECK(v_diag[i].numel() == t.n * k, "v_diag size does not match parameter ", i);
      t.v_diag = ptr<float>(v_diag[i]);
    }
  }
  return group;
}

#if defined(LOPT_WITH_CUDA)
#if defined(LOPT_CUDA_EMULATION)
extern "C" const char* lopt_emu_failure_detail();
#endif

void check_cuda(int code, const char* phase) {
#if defined(LOPT_CUDA_EMULATION)
  TORCH_CHECK(code == 0, "lopt_port emulated CUDA ", phase, " failed: ",
              lopt_cuda_error_string(code), ": ", lopt_emu_failure_detail());
#else
  TORCH_CHECK(code == 0, "lopt_port CUDA ", phase, " failed: ", lopt_cuda_error_string(code));
#endif
}

// Where a group's CUDA launchers run. On a GPU: the group's device made current for this
// object's lifetime and its current stream (c10's device-generic interfaces, no CUDA headers).
// Emulated: the group's buffers replaced by guarded copies (device(), for the other buffers),
// copied back and their guards checked by finish().
class OnDevice {
 public:
  // `features`: floats of each tensor's sumsq; `sumsq_out`: whether the phase writes it;
  // `sums`: doubles of each tensor's partial sums (TensorArgs::sums, where set).
  OnDevice(Group& g, int features, bool sumsq_out, int sums = 0)
#if !defined(LOPT_CUDA_EMULATION)
      : guard_(g.device)
#endif
  {
#if defined(LOPT_CUDA_EMULATION)
    const int k = g.decays.k;
    for (size_t i = 0; i < g.tensors.size(); ++i) {
      lopt::TensorArgs& t = g.tensors[i];
      const std::string n = " of parameter " + std::to_string(i);
      const size_t elem = t.dtype == lopt::DType::kFloat32 ? 4 : 2;
      t.p = mem_.add(static_cast<unsigned char*>(t.p), t.n * elem, "params" + n);
      t.g = mem_.add(static_cast<const unsigned char*>(t.g), t.n * elem, "grads" + n);
      t.m = mem_.add(t.m, t.n * k, "momentum" + n);
      t.rms = mem_.add(t.rms, t.n, "rms" + n);
      t.v_row = mem_.add(t.v_row, t.n_row * k, "v_row" + n);
      t.v_col = mem_.add(t.v_col, t.n_col * k, "v_col" + n);
      t.v_diag = mem_.add(t.v_diag, t.n * k, "v_diag" + n);
      t.row_factor = mem_.add(t.row_factor, t.n_row * k, "row factors" + n);
      t.col_factor = mem_.add(t.col_factor, t.n_col * k, "column factors" + n);
      t.sumsq = mem_.add(t.sumsq, features, "sumsq" + n, !sumsq_out);
      t.entry_sums = mem_.add(t.entry_sums, t.n_row + t.n_col, "entry sums" + n, false);
      t.sums = mem_.add(t.sums, sums, "partial sums" + n, false);
    }
#else
    (void)features;
    (void)sumsq_out;
    (void)sums;
#endif
  }

  // The device pointer of another buffer of `count` elements (`copy_in`: its contents are
  // read; otherwise it is scratch or output).
  template <typename T>
  T* device(T* data, int64_t count, const char* what, bool copy_in = true) {
#if defined(LOPT_CUDA_EMULATION)
    return mem_.add(data, static_cast<size_t>(count), what, copy_in);
#else
    (void)count;
    (void)what;
    (void)copy_in;
    return data;
#endif
  }

  void* stream() const {
#if defined(LOPT_CUDA_EMULATION)
    return nullptr;
#else
    return c10::impl::getDeviceGuardImpl(guard_.current_device().type())
        ->getStream(guard_.current_device())
        .native_handle();
#endif
  }

  void finish(int code, const char* phase) {
#if defined(LOPT_CUDA_EMULATION)
    const std::string bounds = mem_.finish();
    check_cuda(code, phase);
    TORCH_CHECK(bounds.empty(), "lopt_port emulated CUDA ", phase, ": ", bounds);
#else
    check_cuda(code, phase);
#endif
  }

 private:
#if defined(LOPT_CUDA_EMULATION)
  lopt_emu::DeviceCopies mem_;
#else
  c10::DeviceGuard guard_;
#endif
};
#endif

#if !defined(LOPT_WITH_CUDA)
void cuda_unavailable(const Group& group) {
  TORCH_CHECK(group.device.is_cpu(), "lopt_port was built without its CUDA kernels (nvcc "
              "was not found when the extension was built); parameters are on ",
              group.device);
}
#endif

void set_grad_transform(Group& g, at::ArrayRef<double> grad_wd, double grad_clip) {
  TORCH_CHECK(grad_wd.size() == g.tensors.size(), "grad_wd needs one value per parameter");
  TORCH_CHECK(grad_clip > 0, "grad_clip must be positive");
  for (size_t i = 0; i < g.tensors.size(); ++i) {
    g.tensors[i].grad_wd = static_cast<float>(grad_wd[i]);
    g.tensors[i].grad_clip = static_cast<float>(grad_clip);
  }
}

// Sharded parameters: the normalizers' element counts, those of the whole tensors (none given:
// each tensor's own).
void set_counts(Group& g, at::IntArrayRef counts) {
  TORCH_CHECK(counts.empty() || counts.size() == g.tensors.size(),
              "counts needs one value per parameter (or none)");
  for (size_t i = 0; i < counts.size(); ++i) {
    TORCH_CHECK(counts[i] >= g.tensors[i].n, "count ", i, " is below its tensor's elements");
    g.tensors[i].n_total = counts[i];
  }
}

// Sharded parameters, phase 1's sums only: for each factored tensor the sums of g^2 + 1e-30
// over this rank's elements of its v_row entries, then of its v_col entries (float64,
// concatenated over the factored tensors in order), for the caller to complete over the ranks
// and finish; nothing else is written.
Tensor factored_sums(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                     at::TensorList rms, at::TensorList v_row, at::TensorList v_col,
                     at::TensorList v_diag, at::TensorList row_factor, at::TensorList col_factor,
                     at::IntArrayRef dims, const Tensor& decays, at::ArrayRef<double> grad_wd,
                     double grad_clip) {
  Group g = make_group(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                       col_factor, dims, decays);
  set_grad_transform(g, grad_wd, grad_clip);
  int64_t total = 0;
  for (const lopt::TensorArgs& t : g.tensors)
    if (t.factored) total += t.n_row + t.n_col;
  Tensor out = at::empty({total}, params[0].options().dtype(at::kDouble));
  int64_t next = 0;
  for (lopt::TensorArgs& t : g.tensors)
    if (t.factored) {
      t.entry_sums = out.data_ptr<double>() + next;
      next += t.n_row + t.n_col;
    }
  const int count = static_cast<int>(g.tensors.size());
  if constexpr (!kEmulated) {
    if (g.device.is_cpu()) {
      lopt::factored_sums_cpu(g.tensors.data(), count, g.decays);
      return out;
    }
  }
#if defined(LOPT_WITH_CUDA)
  OnDevice dev(g, 0, false);
  dev.finish(lopt_factored_sums_cuda(g.tensors.data(), count, &g.decays, dev.stream()),
             "factored sums");
#else
  cuda_unavailable(g);
#endif
  return out;
}

void reduce(at::TensorList params, at::TensorList grads, at::TensorList momentum,
            at::TensorList rms, at::TensorList v_row, at::TensorList v_col,
            at::TensorList v_diag, at::TensorList row_factor, at::TensorList col_factor,
            at::IntArrayRef dims, const Tensor& decays) {
  Group g = make_group(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                       col_factor, dims, decays);
  const int count = static_cast<int>(g.tensors.size());
  if constexpr (!kEmulated) {
    if (g.device.is_cpu()) {
      lopt::small_fc_reduce_cpu(g.tensors.data(), count, g.decays);
      return;
    }
  }
#if defined(LOPT_WITH_CUDA)
  OnDevice dev(g, 0, false);
  dev.finish(lopt_small_fc_reduce_cuda(g.tensors.data(), count, &g.decays, dev.stream()),
             "reduce");
#else
  cuda_unavailable(g);
#endif
}

// Returns (sumsq [count, F] float32, sums): with `sharded`, sums holds each tensor's float64
// sums of squares [count, F] (this rank's elements), for the caller to complete over the
// ranks; otherwise it is empty.
std::tuple<Tensor, Tensor> accumulate(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList v_row, at::TensorList v_col, at::TensorList v_diag,
    at::TensorList row_factor, at::TensorList col_factor, at::IntArrayRef dims,
    const Tensor& decays, bool head_variant, bool sharded) {
  Group g = make_group(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                       col_factor, dims, decays);
  const int count = static_cast<int>(g.tensors.size());
  const int nf = lopt::raw_feature_count(g.decays.k);
  Tensor sumsq = at::empty({count, nf}, params[0].options().dtype(at::kFloat));
  Tensor sums = at::empty({sharded ? count : 0, nf}, params[0].options().dtype(at::kDouble));
  for (int i = 0; i < count; ++i) {
    g.tensors[i].sumsq = sumsq.data_ptr<float>() + i * nf;
    if (sharded) g.tensors[i].sums = sums.data_ptr<double>() + i * nf;
  }
  if constexpr (!kEmulated) {
    if (g.device.is_cpu()) {
      lopt::small_fc_accumulate_cpu(g.tensors.data(), count, g.decays, head_variant);
      return {sumsq, sums};
    }
  }
#if defined(LOPT_WITH_CUDA)
  OnDevice dev(g, nf, true, sharded ? nf : 0);
  Tensor partials = at::empty(
      {lopt_small_fc_partials(g.tensors.data(), count, g.decays.k)},
      params[0].options().dtype(at::kDouble));
  double* scratch = dev.device(partials.data_ptr<double>(), partials.numel(), "partials", false);
  dev.finish(lopt_small_fc_accumulate_cuda(g.tensors.data(), count, &g.decays, head_variant,
                                           scratch, dev.stream()),
             "accumulate");
#else
  cuda_unavailable(g);
#endif
  return {sumsq, sums};
}

void apply(at::TensorList params, at::TensorList grads, at::TensorList momentum,
           at::TensorList rms, at::TensorList v_row, at::TensorList v_col,
           at::TensorList v_diag, at::TensorList row_factor, at::TensorList col_factor,
           at::IntArrayRef dims, const Tensor& decays, bool head_variant,
           const Tensor& sumsq, const Tensor& time_features, at::TensorList mlp,
           double exp_mult, double step_mult, double lr, at::ArrayRef<double> step_scales,
           at::IntArrayRef counts) {
  Group g = make_group(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                       col_factor, dims, decays);
  set_counts(g, counts);
  const int count = static_cast<int>(g.tensors.size());
  // MuLO's per-tensor scale s (p <- p - lr * (step * s)); an empty list means s = 1.
  TORCH_CHECK(step_scales.empty() || step_scales.size() == static_cast<size_t>(count),
              "step_scales needs one value per parameter (or none)");
  for (size_t i = 0; i < step_scales.size(); ++i)
    g.tensors[i].scale = static_cast<float>(step_scales[i]);
  const int nf = lopt::raw_feature_count(g.decays.k);
  check_tensor(sumsq, "sumsq", g.device);
  check_tensor(time_features, "time_features", at::Device(at::kCPU));
  TORCH_CHECK(sumsq.numel() == static_cast<int64_t>(count) * nf, "sumsq shape");
  TORCH_CHECK(time_features.numel() == static_cast<int64_t>(count) * lopt::kNumTimeFeatures,
              "time_features must be [number of parameters, ", lopt::kNumTimeFeatures, "]");
  const float* tf = time_features.data_ptr<float>();
  for (int i = 0; i < count; ++i) {
    g.tensors[i].sumsq = sumsq.data_ptr<float>() + i * nf;
    std::copy(tf + i * lopt::kNumTimeFeatures, tf + (i + 1) * lopt::kNumTimeFeatures,
              g.tensors[i].time);
  }
  TORCH_CHECK(mlp.size() % 2 == 0 && mlp.size() / 2 <= lopt::kMaxLayers && !mlp.empty(),
              "mlp must be [w0, b0, w1, b1, ...]");
  lopt::MlpView net;
  net.layers = static_cast<int>(mlp.size() / 2);
  net.sizes[0] = nf + lopt::kNumTimeFeatures;
  for (int l = 0; l < net.layers; ++l) {
    const Tensor& w = mlp[2 * l];
    const Tensor& b = mlp[2 * l + 1];
    check_tensor(w, "mlp weight", g.device);
    check_tensor(b, "mlp bias", g.device);
    TORCH_CHECK(w.dim() == 2 && w.size(1) == net.sizes[l] && b.numel() == w.size(0) &&
                    w.size(0) <= lopt::kMaxHidden,
                "mlp layer ", l, " has the wrong shape");
    net.sizes[l + 1] = static_cast<int>(w.size(0));
    net.w[l] = w.data_ptr<float>();
    net.b[l] = b.data_ptr<float>();
  }
  TORCH_CHECK(net.sizes[net.layers] == 2, "the last mlp layer must have 2 outputs");
  const float em = static_cast<float>(exp_mult);
  const float sm = static_cast<float>(step_mult);
  const float lr32 = static_cast<float>(lr);
  if constexpr (!kEmulated) {
    if (g.device.is_cpu()) {
      lopt::small_fc_apply_cpu(g.tensors.data(), count, g.decays, head_variant, net, em, sm,
                               lr32);
      return;
    }
  }
#if defined(LOPT_WITH_CUDA)
  OnDevice dev(g, nf, false);
  for (int l = 0; l < net.layers; ++l) {
    net.w[l] = dev.device(net.w[l], mlp[2 * l].numel(), "mlp weight");
    net.b[l] = dev.device(net.b[l], mlp[2 * l + 1].numel(), "mlp bias");
  }
  dev.finish(lopt_small_fc_apply_cuda(g.tensors.data(), count, &g.decays, head_variant, &net,
                                      em, sm, lr32, dev.stream()),
             "apply");
#else
  cuda_unavailable(g);
#endif
}

// Returns (stats, sumsq, sums). With `sharded`, the factored statistics are this step's already
// (factored_sums, completed over the ranks, then finished by the caller) and sums holds each
// tensor's float64 moments and sums of squares [count, moments + F] over this rank's
// elements, for the caller to complete over the ranks (stats and sumsq then describe this
// rank's elements only); otherwise sums is empty.
std::tuple<Tensor, Tensor, Tensor> velo_accumulate(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList v_row, at::TensorList v_col, at::TensorList v_diag,
    at::TensorList row_factor, at::TensorList col_factor, at::IntArrayRef dims,
    const Tensor& decays, at::ArrayRef<double> grad_wd, double grad_clip, bool sharded) {
  Group g = make_group(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                       col_factor, dims, decays);
  set_grad_transform(g, grad_wd, grad_clip);
  const int count = static_cast<int>(g.tensors.size());
  const int nf = lopt::velo_feature_count(g.decays.k);
  const auto options = params[0].options().dtype(at::kFloat);
  Tensor stats = at::empty({count, lopt::velo_stats_count(g.decays.k)}, options);
  Tensor sumsq = at::empty({count, nf}, options);
  const int width = lopt::velo_moment_count(g.decays.k) + nf;
  Tensor sums = at::empty({sharded ? count : 0, width}, options.dtype(at::kDouble));
  for (int i = 0; i < count; ++i) {
    g.tensors[i].sumsq = sumsq.data_ptr<float>() + i * nf;
    if (sharded) g.tensors[i].sums = sums.data_ptr<double>() + i * width;
  }
  if constexpr (!kEmulated) {
    if (g.device.is_cpu()) {
      lopt::velo_accumulate_cpu(g.tensors.data(), count, g.decays, sharded,
                                stats.data_ptr<float>());
      return {stats, sumsq, sums};
    }
  }
#if defined(LOPT_WITH_CUDA)
  OnDevice dev(g, nf, true, sharded ? width : 0);
  Tensor partials = at::empty({lopt_velo_partials(g.tensors.data(), count, g.decays.k)},
                              params[0].options().dtype(at::kDouble));
  float* stats_out = dev.device(stats.data_ptr<float>(), stats.numel(), "stats", false);
  double* scratch = dev.device(partials.data_ptr<double>(), partials.numel(), "partials", false);
  dev.finish(lopt_velo_accumulate_cuda(g.tensors.data(), count, &g.decays, sharded, stats_out,
                                       scratch, dev.stream()),
             "VeLO accumulate");
#else
  cuda_unavailable(g);
#endif
  return {stats, sumsq, sums};
}

void velo_apply(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                at::TensorList rms, at::TensorList v_row, at::TensorList v_col,
                at::TensorList v_diag, at::TensorList row_factor, at::TensorList col_factor,
                at::IntArrayRef dims, const Tensor& decays, at::ArrayRef<double> grad_wd,
                double grad_clip, const Tensor& sumsq, const Tensor& weights, int64_t hidden,
                int64_t layers, const Tensor& lr_mult, const Tensor& param_scale,
                at::ArrayRef<double> lr, at::ArrayRef<double> decay_mult, double exp_mult,
                double step_mult, at::IntArrayRef counts) {
  Group g = make_group(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                       col_factor, dims, decays);
  set_grad_transform(g, grad_wd, grad_clip);
  set_counts(g, counts);
  const int count = static_cast<int>(g.tensors.size());
  const int k = g.decays.k;
  const int nf = lopt::velo_feature_count(k);
  TORCH_CHECK(hidden >= 1 && hidden <= lopt::kMaxVeloHidden && layers >= 1,
              "VeLO's MLP needs 1 <= ff_hidden_size <= ", lopt::kMaxVeloHidden,
              " and ff_hidden_layers >= 1");
  const int width = lopt::velo_mlp_size(k, static_cast<int>(hidden), static_cast<int>(layers));
  for (const Tensor* t : {&sumsq, &weights, &lr_mult, &param_scale})
    check_tensor(*t, "VeLO step input", g.device);
  TORCH_CHECK(sumsq.numel() == static_cast<int64_t>(count) * nf, "sumsq shape");
  TORCH_CHECK(weights.numel() == static_cast<int64_t>(count) * width,
              "weights must be [number of parameters, ", width, "]");
  TORCH_CHECK(lr_mult.numel() == count && param_scale.numel() == count,
              "lr_mult and param_scale need one value per parameter");
  TORCH_CHECK(lr.size() == static_cast<size_t>(count) &&
                  decay_mult.size() == static_cast<size_t>(count),
              "lr and decay_mult need one value per parameter");
  for (int i = 0; i < count; ++i) g.tensors[i].sumsq = sumsq.data_ptr<float>() + i * nf;
  std::vector<float> lr32(lr.begin(), lr.end()), decay32(decay_mult.begin(), decay_mult.end());
  lopt::VeloApplyArgs a;
  a.weights = weights.data_ptr<float>();
  a.hidden = static_cast<int>(hidden);
  a.layers = static_cast<int>(layers);
  a.lr_mult = lr_mult.data_ptr<float>();
  a.param_scale = param_scale.data_ptr<float>();
  a.lr = lr32.data();
  a.decay_mult = decay32.data();
  a.exp_mult = static_cast<float>(exp_mult);
  a.step_mult = static_cast<float>(step_mult);
  if constexpr (!kEmulated) {
    if (g.device.is_cpu()) {
      lopt::velo_apply_cpu(g.tensors.data(), count, g.decays, a);
      return;
    }
  }
#if defined(LOPT_WITH_CUDA)
  OnDevice dev(g, nf, false);
  const float* w = dev.device(a.weights, weights.numel(), "weights");
  const float* lm = dev.device(a.lr_mult, lr_mult.numel(), "lr_mult");
  const float* ps = dev.device(a.param_scale, param_scale.numel(), "param_scale");
  dev.finish(lopt_velo_apply_cuda(g.tensors.data(), count, &g.decays, w, a.hidden, a.layers,
                                  lm, ps, a.lr, a.decay_mult, a.exp_mult, a.step_mult,
                                  dev.stream()),
             "VeLO apply");
#else
  cuda_unavailable(g);
#endif
}

}  // namespace

TORCH_LIBRARY(LOPT_OPS_LIBRARY, m) {
  m.def("small_fc_reduce(Tensor[] params, Tensor[] grads, Tensor[] momentum, "
        "Tensor[] rms, Tensor(a!)[] v_row, Tensor(b!)[] v_col, Tensor[] v_diag, "
        "Tensor(c!)[] row_factor, Tensor(d!)[] col_factor, int[] dims, Tensor decays) -> ()");
  m.def("factored_sums(Tensor[] params, Tensor[] grads, Tensor[] momentum, Tensor[] rms, "
        "Tensor[] v_row, Tensor[] v_col, Tensor[] v_diag, Tensor[] row_factor, "
        "Tensor[] col_factor, int[] dims, Tensor decays, float[] grad_wd, "
        "float grad_clip) -> Tensor");
  m.def("small_fc_accumulate(Tensor[] params, Tensor[] grads, Tensor(a!)[] momentum, "
        "Tensor(b!)[] rms, Tensor[] v_row, Tensor[] v_col, Tensor(c!)[] v_diag, "
        "Tensor[] row_factor, Tensor[] col_factor, int[] dims, Tensor decays, "
        "bool head_variant, bool sharded) -> (Tensor, Tensor)");
  m.def("small_fc_apply(Tensor(a!)[] params, Tensor[] grads, Tensor[] momentum, "
        "Tensor[] rms, Tensor[] v_row, Tensor[] v_col, Tensor[] v_diag, "
        "Tensor[] row_factor, Tensor[] col_factor, int[] dims, Tensor decays, "
        "bool head_variant, Tensor sumsq, Tensor time_features, Tensor[] mlp, "
        "float exp_mult, float step_mult, float lr, float[] step_scales, "
        "int[] counts) -> ()");
  m.def("velo_accumulate(Tensor[] params, Tensor[] grads, Tensor(a!)[] momentum, "
        "Tensor(b!)[] rms, Tensor(c!)[] v_row, Tensor(d!)[] v_col, Tensor(e!)[] v_diag, "
        "Tensor(f!)[] row_factor, Tensor(g!)[] col_factor, int[] dims, Tensor decays, "
        "float[] grad_wd, float grad_clip, bool sharded) -> (Tensor, Tensor, Tensor)");
  m.def("velo_apply(Tensor(a!)[] params, Tensor[] grads, Tensor[] momentum, Tensor[] rms, "
        "Tensor[] v_row, Tensor[] v_col, Tensor[] v_diag, Tensor[] row_factor, "
        "Tensor[] col_factor, int[] dims, Tensor decays, float[] grad_wd, float grad_clip, "
        "Tensor sumsq, Tensor weights, int hidden, int layers, Tensor lr_mult, "
        "Tensor param_scale, float[] lr, float[] decay_mult, float exp_mult, "
        "float step_mult, int[] counts) -> ()");
}

TORCH_LIBRARY_IMPL(LOPT_OPS_LIBRARY, CPU, m) {
  m.impl("factored_sums", factored_sums);
  m.impl("small_fc_reduce", reduce);
  m.impl("small_fc_accumulate", accumulate);
  m.impl("small_fc_apply", apply);
  m.impl("velo_accumulate", velo_accumulate);
  m.impl("velo_apply", velo_apply);
}

#if !defined(LOPT_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(LOPT_OPS_LIBRARY, CUDA, m) {
  m.impl("factored_sums", factored_sums);
  m.impl("small_fc_reduce", reduce);
  m.impl("small_fc_accumulate", accumulate);
  m.impl("small_fc_apply", apply);
  m.impl("velo_accumulate", velo_accumulate);
  m.impl("velo_apply", velo_apply);
}
#endif

// ---------------------------------------------------------------------------------------
// The emulator's launch log (lopt_emu_launch_log, cuda_emulation/cuda_runtime.h), for
// tests/test_gpu_model.py: `launch_log(mode)` returns the launches since its last call as
// JSON and sets the mode for the following ones (0 off, 1 configurations, 2 probe buffers).
#if defined(LOPT_CUDA_EMULATION)
extern "C" const char* lopt_emu_launch_log(int mode);

namespace {
std::string launch_log(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "launch_log mode must be 0, 1 or 2, got ", mode);
  return lopt_emu_launch_log(static_cast<int>(mode));
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(LOPT_OPS_LIBRARY, m) { m.def("launch_log(int mode) -> str", &launch_log); }
#endif
