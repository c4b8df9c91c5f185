// Torch binding of the fused small_fc_lopt step: three multi-tensor ops, one per phase, each
// called once per parameter group and step. Tensors arrive as lists; per-tensor factored
// dims as a flat int list [d1, d0, d1, d0, ...] with -1 for non-factored tensors.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#include "small_fc_lopt_cpu.h"

namespace {

using at::Tensor;

float* fptr(const Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

void check_f32(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU (the CUDA backend is not built)");
}

lopt::GroupDecays group_decays(const Tensor& decays) {
  // decays: [momentum (k), rms (1), adafactor (k)], float32 on the CPU.
  check_f32(decays, "decays");
  const int64_t total = decays.numel();
  TORCH_CHECK(total % 2 == 1 && (total - 1) / 2 <= lopt::kMaxDecays,
              "decays must hold k momentum, 1 rms and k adafactor values");
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

std::vector<lopt::TensorArgs> tensor_args(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList v_row, at::TensorList v_col, at::TensorList v_diag,
    at::TensorList row_factor, at::TensorList col_factor, at::IntArrayRef dims, int k) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum.size() == n && rms.size() == n &&
                  v_row.size() == n && v_col.size() == n && v_diag.size() == n &&
                  row_factor.size() == n && col_factor.size() == n &&
                  dims.size() == 2 * n,
              "every tensor list needs one entry per parameter");
  std::vector<lopt::TensorArgs> out(n);
  for (size_t i = 0; i < n; ++i) {
    lopt::TensorArgs& t = out[i];
    check_f32(params[i], "params");
    check_f32(grads[i], "grads");
    check_f32(momentum[i], "momentum");
    check_f32(rms[i], "rms");
    TORCH_CHECK(params[i].dim() <= lopt::kMaxRank, "rank above ", lopt::kMaxRank);
    TORCH_CHECK(grads[i].numel() == params[i].numel() &&
                    momentum[i].numel() == params[i].numel() * k &&
                    rms[i].numel() == params[i].numel(),
                "state sizes do not match parameter ", i);
    t.n = params[i].numel();
    t.p = fptr(params[i]);
    t.g = fptr(grads[i]);
    t.m = fptr(momentum[i]);
    t.rms = fptr(rms[i]);
    t.d1 = static_cast<int>(dims[2 * i]);
    t.d0 = static_cast<int>(dims[2 * i + 1]);
    t.factored = t.d1 >= 0;
    const auto sizes = params[i].sizes();
    t.ix.rank = static_cast<int>(sizes.size());
    if (t.factored) {
      TORCH_CHECK(t.d0 >= 0 && t.d0 < t.ix.rank && t.d1 < t.ix.rank && t.d0 != t.d1,
                  "bad factored dims for parameter ", i);
      for (const Tensor* s : {&v_row[i], &v_col[i], &row_factor[i], &col_factor[i]})
        check_f32(*s, "factored state");
      int64_t rs = 1, cs = 1, qs = 1;
      for (int d = t.ix.rank - 1; d >= 0; --d) {
        t.ix.size[d] = sizes[d];
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
      t.v_row = fptr(v_row[i]);
      t.v_col = fptr(v_col[i]);
      t.row_factor = fptr(row_factor[i]);
      t.col_factor = fptr(col_factor[i]);
    } else {
      check_f32(v_diag[i], "v_diag");
      TORCH_CHECK(v_diag[i].numel() == t.n * k, "v_diag size does not match parameter ", i);
      t.v_diag = fptr(v_diag[i]);
      for (int d = 0; d < t.ix.rank; ++d) t.ix.size[d] = sizes[d];
    }
  }
  return out;
}

Tensor accumulate(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                  at::TensorList rms, at::TensorList v_row, at::TensorList v_col,
                  at::TensorList v_diag, at::TensorList row_factor,
                  at::TensorList col_factor, at::IntArrayRef dims, const Tensor& decays,
                  bool head_variant) {
  const lopt::GroupDecays d = group_decays(decays);
  auto args = tensor_args(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                          col_factor, dims, d.k);
  const int nf = lopt::raw_feature_count(d.k);
  Tensor sumsq = at::zeros({static_cast<int64_t>(args.size()), nf}, decays.options());
  for (size_t i = 0; i < args.size(); ++i) {
    lopt::small_fc_reduce_cpu(args[i], d);
    lopt::small_fc_accumulate_cpu(args[i], d, head_variant,
                                  sumsq.data_ptr<float>() + i * nf);
  }
  return sumsq;
}

void apply(at::TensorList params, at::TensorList grads, at::TensorList momentum,
           at::TensorList rms, at::TensorList v_row, at::TensorList v_col,
           at::TensorList v_diag, at::TensorList row_factor, at::TensorList col_factor,
           at::IntArrayRef dims, const Tensor& decays, bool head_variant,
           const Tensor& sumsq, const Tensor& time_features, at::TensorList mlp,
           double exp_mult, double step_mult, double lr) {
  const lopt::GroupDecays d = group_decays(decays);
  auto args = tensor_args(params, grads, momentum, rms, v_row, v_col, v_diag, row_factor,
                          col_factor, dims, d.k);
  const int nf = lopt::raw_feature_count(d.k);
  check_f32(sumsq, "sumsq");
  check_f32(time_features, "time_features");
  TORCH_CHECK(sumsq.numel() == static_cast<int64_t>(args.size()) * nf, "sumsq shape");
  TORCH_CHECK(time_features.numel() ==
                  static_cast<int64_t>(args.size()) * lopt::kNumTimeFeatures,
              "time_features shape");
  TORCH_CHECK(mlp.size() % 2 == 0 && mlp.size() / 2 <= lopt::kMaxLayers && !mlp.empty(),
              "mlp must be [w0, b0, w1, b1, ...]");
  lopt::MlpView net;
  net.layers = static_cast<int>(mlp.size() / 2);
  net.sizes[0] = nf + lopt::kNumTimeFeatures;
  for (int l = 0; l < net.layers; ++l) {
    const Tensor& w = mlp[2 * l];
    const Tensor& b = mlp[2 * l + 1];
    check_f32(w, "mlp weight");
    check_f32(b, "mlp bias");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == net.sizes[l] && b.numel() == w.size(0) &&
                    w.size(0) <= lopt::kMaxHidden,
                "mlp layer ", l, " has the wrong shape");
    net.sizes[l + 1] = static_cast<int>(w.size(0));
    net.w[l] = w.data_ptr<float>();
    net.b[l] = b.data_ptr<float>();
  }
  TORCH_CHECK(net.sizes[net.layers] == 2, "the last mlp layer must have 2 outputs");
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].n == 0) continue;
    lopt::small_fc_apply_cpu(args[i], d, head_variant, sumsq.data_ptr<float>() + i * nf,
                             time_features.data_ptr<float>() + i * lopt::kNumTimeFeatures,
                             net, static_cast<float>(exp_mult),
                             static_cast<float>(step_mult), static_cast<float>(lr));
  }
}

}  // namespace

TORCH_LIBRARY(lopt_port, m) {
  m.def("small_fc_accumulate(Tensor[] params, Tensor[] grads, Tensor(a!)[] momentum, "
        "Tensor(b!)[] rms, Tensor(c!)[] v_row, Tensor(d!)[] v_col, Tensor(e!)[] v_diag, "
        "Tensor(f!)[] row_factor, Tensor(g!)[] col_factor, int[] dims, Tensor decays, "
        "bool head_variant) -> Tensor");
  m.def("small_fc_apply(Tensor(a!)[] params, Tensor[] grads, Tensor[] momentum, "
        "Tensor[] rms, Tensor[] v_row, Tensor[] v_col, Tensor[] v_diag, "
        "Tensor[] row_factor, Tensor[] col_factor, int[] dims, Tensor decays, "
        "bool head_variant, Tensor sumsq, Tensor time_features, Tensor[] mlp, "
        "float exp_mult, float step_mult, float lr) -> ()");
}

TORCH_LIBRARY_IMPL(lopt_port, CPU, m) {
  m.impl("small_fc_accumulate", accumulate);
  m.impl("small_fc_apply", apply);
}
