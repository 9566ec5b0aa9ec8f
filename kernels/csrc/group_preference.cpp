// Group preference scores (segmented sums) and per-sample weights / gates; see kernels/group_preference.py.
#include <cmath>

#include "common.h"

namespace tdm_r1 {
namespace {

void check_samples(const at::Tensor& l, const at::Tensor& l_ref, const at::Tensor& adv, const at::Tensor& group) {
  const int64_t n = l.numel();
  check_vec(l, "l", n);
  check_vec(l_ref, "l_ref", n);
  check_vec(adv, "advantages", n);
  check_vec(group, "group", n, at::kLong);
}

// Sequential in sample order, accumulated in double: N is one epoch's samples, and the fixed order keeps the
// scores identical from run to run.
void group_preference_scores(const at::Tensor& l, const at::Tensor& l_ref, const at::Tensor& adv,
                             const at::Tensor& group, double coef, const at::Tensor& scores) {
  check_samples(l, l_ref, adv, group);
  const int64_t n = l.numel(), G = scores.numel();
  check_vec(scores, "scores", G);
  const float* lp = ptr<float>(l);
  const float* rp = ptr<float>(l_ref);
  const float* ap = ptr<float>(adv);
  const int64_t* gp = ptr<int64_t>(group);
  const float c = static_cast<float>(coef);
  std::vector<double> acc(G, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = gp[i];
    TORCH_CHECK(g >= 0 && g < G, "group_preference: group id ", g, " outside [0, ", G, ")");
    acc[g] += static_cast<double>(ap[i] * c * (lp[i] - rp[i]));
  }
  float* sp = out_ptr<float>(scores);
  for (int64_t g = 0; g < G; ++g) sp[g] = static_cast<float>(acc[g]);
}

void group_preference_weights(const at::Tensor& scores, const at::Tensor& l, const at::Tensor& l_ref,
                              const at::Tensor& l_old, const at::Tensor& adv, const at::Tensor& group, double clip,
                              const at::Tensor& ref_active, const at::Tensor& weights, const at::Tensor& ppo_mask,
                              const at::Tensor& ref_mask) {
  check_samples(l, l_ref, adv, group);
  const int64_t n = l.numel(), G = scores.numel();
  check_vec(scores, "scores", G);
  check_vec(l_old, "l_old", n);
  check_vec(ref_active, "ref_active", 1, at::kBool);
  check_vec(weights, "weights", n);
  check_vec(ppo_mask, "ppo_mask", n, at::kBool);
  check_vec(ref_mask, "ref_mask", n, at::kBool);
  const float* sp = ptr<float>(scores);
  const float* lp = ptr<float>(l);
  const float* rp = ptr<float>(l_ref);
  const float* op = ptr<float>(l_old);
  const float* ap = ptr<float>(adv);
  const int64_t* gp = ptr<int64_t>(group);
  const bool active = *ptr<bool>(ref_active);
  const float hi = static_cast<float>(1.0 + clip), lo = static_cast<float>(1.0 - clip);
  float* wp = out_ptr<float>(weights);
  bool* pp = out_ptr<bool>(ppo_mask);
  bool* qp = out_ptr<bool>(ref_mask);
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = gp[i];
      TORCH_CHECK(g >= 0 && g < G, "group_preference: group id ", g, " outside [0, ", G, ")");
      wp[i] = 1.f / (1.f + std::exp(-sp[g]));
      const float ratio = std::exp(op[i] - lp[i]);
      const bool pos = ap[i] > 0.f;
      pp[i] = pos ? ratio > hi : ratio < lo;
      qp[i] = active && (pos ? lp[i] < rp[i] : lp[i] > rp[i]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdm_r1, m) {
  m.def(
      "group_preference_scores(Tensor l, Tensor l_ref, Tensor advantages, Tensor group, float coef, "
      "Tensor(a!) scores) -> ()");
  m.def(
      "group_preference_weights(Tensor scores, Tensor l, Tensor l_ref, Tensor l_old, Tensor advantages, "
      "Tensor group, float clip, Tensor ref_active, Tensor(a!) weights, Tensor(b!) ppo_mask, "
      "Tensor(c!) ref_mask) -> ()");
}

TORCH_LIBRARY_IMPL(tdm_r1, CPU, m) {
  m.impl("group_preference_scores", &group_preference_scores);
  m.impl("group_preference_weights", &group_preference_weights);
}

}  // namespace tdm_r1
