// Per-sample sum of (v* - v_pred)^2 with v* = cx x + cn n computed on the fly, and its gradient
// scale * (v_pred - v*); see kernels/velocity_target_mse.py.
#include "common.h"

namespace tdm_r1 {
namespace {

template <typename T>
inline float sq_sum_block(const T* __restrict__ x, const T* __restrict__ noise, const T* __restrict__ v_pred, float cx,
                          float cn, int64_t len) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < len; ++j) {
    const float d = cx * static_cast<float>(x[j]) + cn * static_cast<float>(noise[j]) - static_cast<float>(v_pred[j]);
    acc += d * d;
  }
  return acc;
}

template <typename T>
void sq_sum_rows(const T* x, const T* noise, const T* v_pred, const float* cx, const float* cn, float* out, int64_t B,
                 int64_t D) {
  std::vector<double> parts(B * chunks_per_row(D), 0.0);
  double* pp = parts.data();
  for_each_chunk(B, D, [=](int64_t c, int64_t r, int64_t j0, int64_t j1) {
    double total = 0.0;
    for (int64_t k = r * D + j0, hi = r * D + j1; k < hi; k += kSub) {
      total += sq_sum_block<T>(x + k, noise + k, v_pred + k, cx[r], cn[r], std::min(kSub, hi - k));
    }
    pp[c] = total;
  });
  sum_row_partials(parts, B, D, 1, out);
}

template <typename T>
inline void grad_block(const T* __restrict__ x, const T* __restrict__ noise, const T* __restrict__ v_pred, float cx,
                       float cn, float scale, T* __restrict__ grad, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float d = static_cast<float>(v_pred[j]) - cx * static_cast<float>(x[j]) - cn * static_cast<float>(noise[j]);
    grad[j] = static_cast<T>(scale * d);
  }
}

template <typename T>
void grad_rows(const T* x, const T* noise, const T* v_pred, const float* cx, const float* cn, const float* scale,
               T* grad, int64_t B, int64_t D) {
  for_each_chunk(B, D, [=](int64_t, int64_t r, int64_t j0, int64_t j1) {
    const int64_t o = r * D + j0;
    grad_block<T>(x + o, noise + o, v_pred + o, cx[r], cn[r], scale[r], grad + o, j1 - j0);
  });
}

void check_args(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& v_pred, const at::Tensor& cx,
                const at::Tensor& cn) {
  TORCH_CHECK(x.dim() == 2, "velocity_target_mse: x must be [B, D]");
  const int64_t B = x.size(0), D = x.size(1);
  check_rows(noise, "noise", B, D, x.scalar_type());
  check_rows(v_pred, "v_pred", B, D, x.scalar_type());
  check_vec(cx, "cx", B);
  check_vec(cn, "cn", B);
}

void velocity_target_mse(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& v_pred, const at::Tensor& cx,
                         const at::Tensor& cn, const at::Tensor& sq_sum) {
  check_args(x, noise, v_pred, cx, cn);
  const int64_t B = x.size(0), D = x.size(1);
  check_vec(sq_sum, "sq_sum", B);
  dispatch_float(x.scalar_type(), "velocity_target_mse", [&](auto tag) {
    using T = decltype(tag);
    sq_sum_rows<T>(ptr<T>(x), ptr<T>(noise), ptr<T>(v_pred), ptr<float>(cx), ptr<float>(cn), out_ptr<float>(sq_sum),
                   B, D);
  });
}

void velocity_target_mse_backward(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& v_pred,
                                  const at::Tensor& cx, const at::Tensor& cn, const at::Tensor& scale,
                                  const at::Tensor& grad) {
  check_args(x, noise, v_pred, cx, cn);
  const int64_t B = x.size(0), D = x.size(1);
  check_vec(scale, "scale", B);
  check_rows(grad, "grad", B, D, x.scalar_type());
  advise_huge_pages(grad);
  dispatch_float(x.scalar_type(), "velocity_target_mse_backward", [&](auto tag) {
    using T = decltype(tag);
    grad_rows<T>(ptr<T>(x), ptr<T>(noise), ptr<T>(v_pred), ptr<float>(cx), ptr<float>(cn), ptr<float>(scale),
                 out_ptr<T>(grad), B, D);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdm_r1, m) {
  m.def("velocity_target_mse(Tensor x, Tensor noise, Tensor v_pred, Tensor cx, Tensor cn, Tensor(a!) sq_sum) -> ()");
  m.def(
      "velocity_target_mse_backward(Tensor x, Tensor noise, Tensor v_pred, Tensor cx, Tensor cn, Tensor scale, "
      "Tensor(a!) grad) -> ()");
}

TORCH_LIBRARY_IMPL(tdm_r1, CPU, m) {
  m.impl("velocity_target_mse", &velocity_target_mse);
  m.impl("velocity_target_mse_backward", &velocity_target_mse_backward);
}

}  // namespace tdm_r1
