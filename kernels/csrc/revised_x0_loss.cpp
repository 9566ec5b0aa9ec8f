// Per-sample sums of the revised-x0 generator loss and its gradient wrt x0_hat; see kernels/revised_x0_loss.py.
#include "common.h"

namespace tdm_r1 {
namespace {

constexpr int64_t kSums = 5;  // sum|x - ref_real|, sum|x - ref_reward|, sum (x - t_kl)^2, (x - t_cfg)^2, (x - t_rew)^2

template <typename T, bool kRew>
inline void sums_block(const T* __restrict__ x0, const T* __restrict__ tk, const T* __restrict__ tc,
                       const T* __restrict__ tr, const T* __restrict__ rr, const T* __restrict__ rs, int64_t len,
                       double* __restrict__ out) {
  float a_real = 0.f, a_sur = 0.f, q_kl = 0.f, q_cfg = 0.f, q_rew = 0.f;
#pragma omp simd reduction(+ : a_real, a_sur, q_kl, q_cfg, q_rew)
  for (int64_t j = 0; j < len; ++j) {
    const float x = static_cast<float>(x0[j]);
    const float dk = x - static_cast<float>(tk[j]), dc = x - static_cast<float>(tc[j]);
    a_real += std::abs(x - static_cast<float>(rr[j]));
    q_kl += dk * dk;
    q_cfg += dc * dc;
    if constexpr (kRew) {
      const float dr = x - static_cast<float>(tr[j]);
      a_sur += std::abs(x - static_cast<float>(rs[j]));
      q_rew += dr * dr;
    }
  }
  out[0] += a_real;
  out[1] += a_sur;
  out[2] += q_kl;
  out[3] += q_cfg;
  out[4] += q_rew;
}

template <typename T, bool kRew>
void sums_rows(const T* x0, const T* tk, const T* tc, const T* tr, const T* rr, const T* rs, float* out, int64_t B,
               int64_t D) {
  std::vector<double> parts(B * chunks_per_row(D) * kSums, 0.0);
  double* pp = parts.data();
  for_each_chunk(B, D, [=](int64_t c, int64_t r, int64_t j0, int64_t j1) {
    for (int64_t k = r * D + j0, hi = r * D + j1; k < hi; k += kSub) {
      sums_block<T, kRew>(x0 + k, tk + k, tc + k, kRew ? tr + k : nullptr, rr + k, kRew ? rs + k : nullptr,
                          std::min(kSub, hi - k), pp + c * kSums);
    }
  });
  sum_row_partials(parts, B, D, kSums, out);
}

// grad = ck (x - t_kl) + cc (x - t_cfg) + cr (x - t_rew), with the per-sample c* from the Python launcher.
template <typename T, bool kRew>
inline void grad_block(const T* __restrict__ x0, const T* __restrict__ tk, const T* __restrict__ tc,
                       const T* __restrict__ tr, float ck, float cc, float cr, T* __restrict__ grad, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float x = static_cast<float>(x0[j]);
    float g = ck * (x - static_cast<float>(tk[j])) + cc * (x - static_cast<float>(tc[j]));
    if constexpr (kRew) g += cr * (x - static_cast<float>(tr[j]));
    grad[j] = static_cast<T>(g);
  }
}

template <typename T, bool kRew>
void grad_rows(const T* x0, const T* tk, const T* tc, const T* tr, const float* coef, T* grad, int64_t B, int64_t D) {
  for_each_chunk(B, D, [=](int64_t, int64_t r, int64_t j0, int64_t j1) {
    const int64_t o = r * D + j0;
    grad_block<T, kRew>(x0 + o, tk + o, tc + o, kRew ? tr + o : nullptr, coef[r * 3], coef[r * 3 + 1],
                        kRew ? coef[r * 3 + 2] : 0.f, grad + o, j1 - j0);
  });
}

void check_inputs(const at::Tensor& x0_hat, const at::Tensor& t_kl, const at::Tensor& t_cfg, const OptTensor& t_rew) {
  TORCH_CHECK(x0_hat.dim() == 2, "revised_x0_loss: x0_hat must be [B, D]");
  const int64_t B = x0_hat.size(0), D = x0_hat.size(1);
  const auto st = x0_hat.scalar_type();
  check_rows(t_kl, "target_kl", B, D, st);
  check_rows(t_cfg, "target_cfg", B, D, st);
  check_rows(t_rew, "target_reward", B, D, st);
}

void revised_x0_loss(const at::Tensor& x0_hat, const at::Tensor& t_kl, const at::Tensor& t_cfg, const OptTensor& t_rew,
                     const at::Tensor& ref_real, const OptTensor& ref_rew, const at::Tensor& sums) {
  check_inputs(x0_hat, t_kl, t_cfg, t_rew);
  const int64_t B = x0_hat.size(0), D = x0_hat.size(1);
  check_rows(ref_real, "ref_real", B, D, x0_hat.scalar_type());
  check_rows(ref_rew, "ref_reward", B, D, x0_hat.scalar_type());
  TORCH_CHECK(t_rew.has_value() == ref_rew.has_value(), "revised_x0_loss: target_reward and ref_reward go together");
  check_vec(sums, "sums", B * kSums);
  dispatch_float(x0_hat.scalar_type(), "revised_x0_loss", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto kr) {
      sums_rows<T, decltype(kr)::value>(ptr<T>(x0_hat), ptr<T>(t_kl), ptr<T>(t_cfg), ptr<T>(t_rew), ptr<T>(ref_real),
                                        ptr<T>(ref_rew), out_ptr<float>(sums), B, D);
    };
    if (t_rew) run(std::true_type{});
    else run(std::false_type{});
  });
}

void revised_x0_loss_backward(const at::Tensor& x0_hat, const at::Tensor& t_kl, const at::Tensor& t_cfg,
                              const OptTensor& t_rew, const at::Tensor& coef, const at::Tensor& grad) {
  check_inputs(x0_hat, t_kl, t_cfg, t_rew);
  const int64_t B = x0_hat.size(0), D = x0_hat.size(1);
  check_vec(coef, "coef", B * 3);
  check_rows(grad, "grad", B, D, x0_hat.scalar_type());
  advise_huge_pages(grad);
  dispatch_float(x0_hat.scalar_type(), "revised_x0_loss_backward", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto kr) {
      grad_rows<T, decltype(kr)::value>(ptr<T>(x0_hat), ptr<T>(t_kl), ptr<T>(t_cfg), ptr<T>(t_rew), ptr<float>(coef),
                                        out_ptr<T>(grad), B, D);
    };
    if (t_rew) run(std::true_type{});
    else run(std::false_type{});
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdm_r1, m) {
  m.def(
      "revised_x0_loss(Tensor x0_hat, Tensor target_kl, Tensor target_cfg, Tensor? target_reward, Tensor ref_real, "
      "Tensor? ref_reward, Tensor(a!) sums) -> ()");
  m.def(
      "revised_x0_loss_backward(Tensor x0_hat, Tensor target_kl, Tensor target_cfg, Tensor? target_reward, "
      "Tensor coef, Tensor(a!) grad) -> ()");
}

TORCH_LIBRARY_IMPL(tdm_r1, CPU, m) {
  m.impl("revised_x0_loss", &revised_x0_loss);
  m.impl("revised_x0_loss_backward", &revised_x0_loss_backward);
}

}  // namespace tdm_r1
