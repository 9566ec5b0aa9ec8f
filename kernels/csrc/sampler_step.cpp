// Few-step sampler update (Euler/DDIM and DPM-Solver++(2M)) with optional fused re-noising; see
// kernels/sampler_step.py for the math and the derivation of the backward.
#include "common.h"

namespace tdm_r1 {
namespace {

// The vector loops are leaf functions over restrict pointers passed by value, so the compiler sees unit-stride
// streams with no aliasing (lambdas capturing the pointers by reference vectorise into gathers).
template <typename T, bool kPrev, bool kTau>
inline void step_block(const T* __restrict__ x, const T* __restrict__ v, const T* __restrict__ prev,
                       const T* __restrict__ noise, float s, float dt, float c2, float a, float b,
                       T* __restrict__ x_next, T* __restrict__ x0_hat, T* __restrict__ x_tau, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float xv = static_cast<float>(x[j]), vv = static_cast<float>(v[j]);
    const float x0 = xv - s * vv;
    float xn = xv - dt * vv;
    if constexpr (kPrev) xn += c2 * (static_cast<float>(prev[j]) - x0);
    x0_hat[j] = static_cast<T>(x0);
    x_next[j] = static_cast<T>(xn);
    if constexpr (kTau) x_tau[j] = static_cast<T>(a * xn + b * static_cast<float>(noise[j]));
  }
}

template <typename T, bool kPrev, bool kTau>
void step_rows(const T* x, const T* v, const T* prev, const T* noise, const float* s, const float* dt,
               const float* c2, const float* a, const float* b, T* x_next, T* x0_hat, T* x_tau, int64_t B,
               int64_t D) {
  for_each_chunk(B, D, [=](int64_t, int64_t r, int64_t j0, int64_t j1) {
    const int64_t o = r * D + j0;
    step_block<T, kPrev, kTau>(x + o, v + o, kPrev ? prev + o : nullptr, kTau ? noise + o : nullptr, s[r], dt[r],
                               kPrev ? c2[r] : 0.f, kTau ? a[r] : 0.f, kTau ? b[r] : 0.f, x_next + o, x0_hat + o,
                               kTau ? x_tau + o : nullptr, j1 - j0);
  });
}

// g_n = g_next + a * g_tau is the total gradient reaching x_next; with x_next = (1 - c2) x + (c2 s - dt) v
// + c2 x0_prev and x0_hat = x - s v: grad_x = (1 - c2) g_n + g_0, grad_v = (c2 s - dt) g_n - s g_0,
// grad_x0_prev = c2 g_n. Each requested gradient is one loop (usually only grad_v is).
template <typename T, bool kGn, bool kG0, bool kGtau>
inline void step_backward_block(const T* __restrict__ g_next, const T* __restrict__ g_x0,
                                const T* __restrict__ g_tau, float a, float kn, float k0, T* __restrict__ out,
                                int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    float gn = kGn ? static_cast<float>(g_next[j]) : 0.f;
    if constexpr (kGtau) gn += a * static_cast<float>(g_tau[j]);
    const float g0 = kG0 ? static_cast<float>(g_x0[j]) : 0.f;
    out[j] = static_cast<T>(kn * gn + k0 * g0);
  }
}

template <typename T, bool kGn, bool kG0, bool kGtau>
void step_backward_rows(const T* g_next, const T* g_x0, const T* g_tau, const float* s, const float* dt,
                        const float* c2, const float* a, T* grad_x, T* grad_v, T* grad_prev, int64_t B, int64_t D) {
  for_each_chunk(B, D, [=](int64_t, int64_t r, int64_t j0, int64_t j1) {
    const float sr = s[r], dr = dt[r], cr = c2 ? c2[r] : 0.f, ar = kGtau ? a[r] : 0.f;
    const int64_t o = r * D + j0, len = j1 - j0;
    const T* gn = kGn ? g_next + o : nullptr;
    const T* g0 = kG0 ? g_x0 + o : nullptr;
    const T* gt = kGtau ? g_tau + o : nullptr;
    if (grad_x) step_backward_block<T, kGn, kG0, kGtau>(gn, g0, gt, ar, 1.f - cr, 1.f, grad_x + o, len);
    if (grad_v) step_backward_block<T, kGn, kG0, kGtau>(gn, g0, gt, ar, cr * sr - dr, -sr, grad_v + o, len);
    if (grad_prev) step_backward_block<T, kGn, false, kGtau>(gn, nullptr, gt, ar, cr, 0.f, grad_prev + o, len);
  });
}

void sampler_step(const at::Tensor& x, const at::Tensor& v, const at::Tensor& s, const at::Tensor& dt,
                  const OptTensor& x0_prev, const OptTensor& c2, const OptTensor& noise, const OptTensor& a,
                  const OptTensor& b, const at::Tensor& x_next, const at::Tensor& x0_hat, const OptTensor& x_tau) {
  TORCH_CHECK(x.dim() == 2, "sampler_step: x must be [B, D]");
  const int64_t B = x.size(0), D = x.size(1);
  const auto st = x.scalar_type();
  check_rows(x, "x", B, D, st);
  check_rows(v, "v", B, D, st);
  check_rows(x0_prev, "x0_prev", B, D, st);
  check_rows(noise, "noise", B, D, st);
  check_rows(x_next, "x_next", B, D, st);
  check_rows(x0_hat, "x0_hat", B, D, st);
  check_rows(x_tau, "x_tau", B, D, st);
  check_vec(s, "s", B);
  check_vec(dt, "dt", B);
  const bool has_prev = x0_prev.has_value(), has_tau = noise.has_value();
  TORCH_CHECK(has_prev == c2.has_value(), "sampler_step: x0_prev and c2 go together");
  TORCH_CHECK(has_tau == a.has_value() && has_tau == b.has_value() && has_tau == x_tau.has_value(),
              "sampler_step: noise, a, b and x_tau go together");
  if (has_prev) check_vec(*c2, "c2", B);
  if (has_tau) {
    check_vec(*a, "a", B);
    check_vec(*b, "b", B);
  }
  advise_huge_pages(x_next);
  advise_huge_pages(x0_hat);
  advise_huge_pages(x_tau);
  dispatch_float(st, "sampler_step", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto kp, auto kt) {
      step_rows<T, decltype(kp)::value, decltype(kt)::value>(
          ptr<T>(x), ptr<T>(v), ptr<T>(x0_prev), ptr<T>(noise), ptr<float>(s), ptr<float>(dt), ptr<float>(c2),
          ptr<float>(a), ptr<float>(b), out_ptr<T>(x_next), out_ptr<T>(x0_hat), out_ptr<T>(x_tau), B, D);
    };
    using Y = std::true_type;
    using N = std::false_type;
    if (has_prev && has_tau) run(Y{}, Y{});
    else if (has_prev) run(Y{}, N{});
    else if (has_tau) run(N{}, Y{});
    else run(N{}, N{});
  });
}

void sampler_step_backward(const OptTensor& g_next, const OptTensor& g_x0, const OptTensor& g_tau,
                           const at::Tensor& s, const at::Tensor& dt, const OptTensor& c2, const OptTensor& a,
                           const OptTensor& grad_x, const OptTensor& grad_v, const OptTensor& grad_prev) {
  const at::Tensor* any = grad_x ? &*grad_x : grad_v ? &*grad_v : grad_prev ? &*grad_prev : nullptr;
  if (any == nullptr) return;
  TORCH_CHECK(any->dim() == 2, "sampler_step_backward: gradients must be [B, D]");
  const int64_t B = any->size(0), D = any->size(1);
  const auto st = any->scalar_type();
  for (const auto* t : {&g_next, &g_x0, &g_tau, &grad_x, &grad_v, &grad_prev}) check_rows(*t, "gradient", B, D, st);
  check_vec(s, "s", B);
  check_vec(dt, "dt", B);
  if (c2) check_vec(*c2, "c2", B);
  TORCH_CHECK(!grad_prev || c2, "sampler_step_backward: grad_prev needs c2");
  TORCH_CHECK(!g_tau || a, "sampler_step_backward: g_tau needs a");
  if (a) check_vec(*a, "a", B);
  for (const auto* t : {&grad_x, &grad_v, &grad_prev}) advise_huge_pages(*t);
  dispatch_float(st, "sampler_step_backward", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto kn, auto k0, auto kt) {
      step_backward_rows<T, decltype(kn)::value, decltype(k0)::value, decltype(kt)::value>(
          ptr<T>(g_next), ptr<T>(g_x0), ptr<T>(g_tau), ptr<float>(s), ptr<float>(dt), ptr<float>(c2),
          ptr<float>(a), out_ptr<T>(grad_x), out_ptr<T>(grad_v), out_ptr<T>(grad_prev), B, D);
    };
    using Y = std::true_type;
    using N = std::false_type;
    const bool n = g_next.has_value(), z = g_x0.has_value(), t = g_tau.has_value();
    if (n && z && t) run(Y{}, Y{}, Y{});
    else if (n && z) run(Y{}, Y{}, N{});
    else if (n && t) run(Y{}, N{}, Y{});
    else if (z && t) run(N{}, Y{}, Y{});
    else if (n) run(Y{}, N{}, N{});
    else if (z) run(N{}, Y{}, N{});
    else if (t) run(N{}, N{}, Y{});
    else run(N{}, N{}, N{});
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdm_r1, m) {
  m.def(
      "sampler_step(Tensor x, Tensor v, Tensor s, Tensor dt, Tensor? x0_prev, Tensor? c2, Tensor? noise, "
      "Tensor? a, Tensor? b, Tensor(a!) x_next, Tensor(b!) x0_hat, Tensor(c!)? x_tau) -> ()");
  m.def(
      "sampler_step_backward(Tensor? g_next, Tensor? g_x0, Tensor? g_tau, Tensor s, Tensor dt, Tensor? c2, "
      "Tensor? a, Tensor(a!)? grad_x, Tensor(b!)? grad_v, Tensor(c!)? grad_prev) -> ()");
}

TORCH_LIBRARY_IMPL(tdm_r1, CPU, m) {
  m.impl("sampler_step", &sampler_step);
  m.impl("sampler_step_backward", &sampler_step_backward);
}

}  // namespace tdm_r1
