// Shared helpers for the native CPU kernels: argument checks, dtype dispatch, chunked parallel loops.
//
// Every per-element tensor is a contiguous [B, D] row view prepared by the Python launcher; per-sample
// coefficients are contiguous float32 [B]. Values are loaded, converted to float, computed and rounded
// once to the output dtype (float32, float16 or bfloat16). Reductions accumulate each chunk in float
// (vectorised `omp simd` reduction) and add the chunk partials in double in a fixed order, so results
// do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace tdm_r1 {

// Elements per parallel task: 16K fp32 = 64 KiB per stream, large enough to amortise the task and the
// per-row coefficient loads, small enough to split one 16M-element row across both cores.
constexpr int64_t kChunk = 16384;

// Elements summed in float before moving to a double accumulator: 1024 keeps the float rounding error of a
// sum near that of a pairwise sum (about 64 adds per SIMD lane) at no measurable cost.
constexpr int64_t kSub = 1024;

using OptTensor = std::optional<at::Tensor>;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output buffers of at least 4 MiB are advised MADV_HUGEPAGE before the kernel first writes them. Large CPU
// tensors come straight from mmap, so every call faults its outputs in; with 4 KiB pages those faults cost
// more than the kernel itself (2-core VM, THP in `madvise` mode, 16M fp32 sampler_step+renoise: 225 ms ->
// 57 ms). The advice only changes the page size backing the range; a refusal by the kernel is harmless.
constexpr int64_t kHugeAdviseMin = int64_t{4} << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  const auto nbytes = static_cast<uintptr_t>(t.nbytes());
  if (nbytes < static_cast<uintptr_t>(kHugeAdviseMin)) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + nbytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

inline void advise_huge_pages(const std::optional<at::Tensor>& t) {
  if (t.has_value()) advise_huge_pages(*t);
}

inline void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t D, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == D, name, " must have shape [", B, ", ", D, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

inline void check_rows(const OptTensor& t, const char* name, int64_t B, int64_t D, at::ScalarType dtype) {
  if (t.has_value()) check_rows(*t, name, B, D, dtype);
}

inline void check_vec(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.numel() == n && t.is_contiguous(), name, " must be a contiguous tensor of ", n, " elements");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

template <typename T>
inline const T* ptr(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
inline const T* ptr(const OptTensor& t) {
  return t.has_value() ? static_cast<const T*>(t->const_data_ptr()) : nullptr;
}

template <typename T>
inline T* out_ptr(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

template <typename T>
inline T* out_ptr(const OptTensor& t) {
  return t.has_value() ? static_cast<T*>(t->mutable_data_ptr()) : nullptr;
}

// Calls f(tag) with a value of the C++ element type: float, c10::Half or c10::BFloat16.
template <typename F>
inline void dispatch_float(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", st, " (float32, float16 and bfloat16 are supported)");
  }
}

// Runs f(chunk, row, j0, j1) over [row * D + j0, row * D + j1) for every kChunk-sized piece of every row,
// split across the ATen (OpenMP) thread pool. `chunk` indexes rows * chunks_per_row(D) slots.
inline int64_t chunks_per_row(int64_t D) { return std::max<int64_t>(1, cdiv(D, kChunk)); }

template <typename F>
inline void for_each_chunk(int64_t B, int64_t D, const F& f) {
  const int64_t per_row = chunks_per_row(D);
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(D, 1));  // small rows: batch them
  at::parallel_for(0, B * per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = c / per_row;
      const int64_t j0 = (c % per_row) * kChunk;
      f(c, row, j0, std::min(D, j0 + kChunk));
    }
  });
}

// Sums K partials per chunk into K per-row float sums, in chunk order (deterministic).
inline void sum_row_partials(const std::vector<double>& parts, int64_t B, int64_t D, int64_t K, float* out) {
  const int64_t per_row = chunks_per_row(D);
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t c = 0; c < per_row; ++c) acc += parts[(r * per_row + c) * K + k];
      out[r * K + k] = static_cast<float>(acc);
    }
  }
}

}  // namespace tdm_r1
