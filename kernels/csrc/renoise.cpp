// Re-noising x_tau = a x + b n with per-sample (a, b); see kernels/renoise.py.
#include "common.h"

namespace tdm_r1 {
namespace {

template <typename T>
inline void renoise_block(const T* __restrict__ x, const T* __restrict__ noise, float a, float b, T* __restrict__ out,
                          int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    out[j] = static_cast<T>(a * static_cast<float>(x[j]) + b * static_cast<float>(noise[j]));
  }
}

template <typename T>
void renoise_rows(const T* x, const T* noise, const float* a, const float* b, T* out, int64_t B, int64_t D) {
  for_each_chunk(B, D, [=](int64_t, int64_t r, int64_t j0, int64_t j1) {
    const int64_t o = r * D + j0;
    renoise_block<T>(x + o, noise + o, a[r], b[r], out + o, j1 - j0);
  });
}

void renoise(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& a, const at::Tensor& b,
             const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2, "renoise: x must be [B, D]");
  const int64_t B = x.size(0), D = x.size(1);
  const auto st = x.scalar_type();
  check_rows(noise, "noise", B, D, st);
  check_rows(out, "out", B, D, st);
  check_vec(a, "a", B);
  check_vec(b, "b", B);
  advise_huge_pages(out);
  dispatch_float(st, "renoise", [&](auto tag) {
    using T = decltype(tag);
    renoise_rows<T>(ptr<T>(x), ptr<T>(noise), ptr<float>(a), ptr<float>(b), out_ptr<T>(out), B, D);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdm_r1, m) {
  m.def("renoise(Tensor x, Tensor noise, Tensor a, Tensor b, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tdm_r1, CPU, m) { m.impl("renoise", &renoise); }

}  // namespace tdm_r1
