// Token-level RLHF kernels over an [R, C] problem (R responses of C tokens), described by raw
// pointers and element strides like the fused loss:
//
//   kl_rewards:    per token, the KL estimate against the reference policy and the shaped reward
//                  -beta * kl, with the sequence's score added at its last selected token; one pass.
//   masked_whiten: (x - mean) / sqrt(var + eps) with the mean and unbiased variance of the selected
//                  elements; pass 1 takes each chunk's moments, the finish merges them in chunk order
//                  (the same bits run after run), pass 2 writes the output.
//   token_gae:     GAE along each row, which ends (no bootstrap) at its last real token; one
//                  backward sweep per row over contiguous tokens, with the GAE step of fastppo_math.h.
#pragma once

#include <cstdint>

#include "fastppo_math.h"
#include "ppo_loss.h"  // kLossChunk

namespace fastppo {

struct KlRewardArgs {
  int64_t R = 0, C = 0;
  bool is_f64 = false;
  Strided logprob, ref_logprob;
  Strided mask; int mask_type = kFlagU8;  // data null: every token selected
  const void* scores = nullptr;           // [R] through scores_stride, or null (no score)
  int64_t scores_stride = 0;
  double beta = 0.0, clamp = 0.0;
  int estimator = kKlK1;
  // Outputs, contiguous: rewards and kl [R, C] (0 at unselected tokens), last [R] int64: the index
  // of each row's last selected token, -1 when it has none (its score is then not added).
  void* rewards = nullptr;
  void* kl = nullptr;
  int64_t* last = nullptr;

  FASTPPO_HD bool selected(int64_t r, int64_t c) const {
    return mask.data == nullptr || load_flag(mask.data, mask_type, r * mask.sr + c * mask.sc);
  }
};

// The KL estimate of one token (0 when unselected: padded log-probs may hold anything).
template <typename S>
FASTPPO_HD S kl_reward_kl(const KlRewardArgs& a, int64_t r, int64_t c) {
  if (!a.selected(r, c)) return S(0);
  return kl_token(a.logprob.at<S>(r, c), a.ref_logprob.at<S>(r, c), a.estimator, S(a.clamp));
}

// Writes one token's kl and reward (without the score); returns whether it is selected.
template <typename S>
FASTPPO_HD bool kl_reward_element(const KlRewardArgs& a, int64_t r, int64_t c) {
  const S kl = kl_reward_kl<S>(a, r, c);
  static_cast<S*>(a.kl)[r * a.C + c] = kl;
  static_cast<S*>(a.rewards)[r * a.C + c] = kl_reward(kl, S(a.beta));
  return a.selected(r, c);
}

// After a row's tokens are written: records its last selected token and adds the score there.
template <typename S>
FASTPPO_HD void kl_reward_finish_row(const KlRewardArgs& a, int64_t r, int64_t last) {
  a.last[r] = last;
  if (last >= 0 && a.scores != nullptr) {
    const S score = static_cast<const S*>(a.scores)[r * a.scores_stride];
    static_cast<S*>(a.rewards)[r * a.C + last] = kl_reward(kl_reward_kl<S>(a, r, last), S(a.beta)) + score;
  }
}

struct WhitenArgs {
  int64_t R = 0, C = 0;
  bool is_f64 = false;
  Strided x;
  Strided mask; int mask_type = kFlagU8;
  bool shift_mean = true;
  double eps = 1e-8;
  void* out = nullptr;         // contiguous [R, C]; 0 at unselected elements
  double* partials = nullptr;  // [chunks * 3]: each chunk's count, mean, m2
  double* stats = nullptr;     // [3]: count, mean and unbiased variance of the selected elements
  // Data-parallel training: (count, mean, m2) of the selected elements of the whole group's batch,
  // used instead of this call's own; null: this call's data alone.
  const double* group = nullptr;

  FASTPPO_HD int64_t chunks_per_row() const { return (C + kLossChunk - 1) / kLossChunk; }
  FASTPPO_HD int64_t chunks() const { return R * chunks_per_row(); }
  FASTPPO_HD bool selected(int64_t r, int64_t c) const {
    return mask.data == nullptr || load_flag(mask.data, mask_type, r * mask.sr + c * mask.sc);
  }
  FASTPPO_HD int64_t chunk_row(int64_t k) const { return k / chunks_per_row(); }
  FASTPPO_HD int64_t chunk_begin(int64_t k) const { return (k % chunks_per_row()) * kLossChunk; }
  FASTPPO_HD int64_t chunk_end(int64_t k) const {
    const int64_t end = chunk_begin(k) + kLossChunk;
    return end < C ? end : C;
  }
};

template <typename S>
FASTPPO_HD Moments whiten_moments_element(const WhitenArgs& a, int64_t r, int64_t c, Moments m) {
  return a.selected(r, c) ? moments_push(m, static_cast<double>(a.x.at<S>(r, c))) : m;
}

FASTPPO_HD void whiten_store(const WhitenArgs& a, int64_t k, Moments m) {
  a.partials[3 * k] = m.count;
  a.partials[3 * k + 1] = m.mean;
  a.partials[3 * k + 2] = m.m2;
}

// Merges the chunks' moments in chunk order. With fewer than two selected elements the variance
// is 0 (no unbiased estimate exists), so the output is (x - mean) / sqrt(eps).
FASTPPO_HD void whiten_finish(const WhitenArgs& a) {
  Moments total{0.0, 0.0, 0.0};
  for (int64_t k = 0; k < a.chunks() && a.group == nullptr; ++k)
    total = moments_merge(total, Moments{a.partials[3 * k], a.partials[3 * k + 1], a.partials[3 * k + 2]});
  if (a.group != nullptr) total = Moments{a.group[0], a.group[1], a.group[2]};
  a.stats[0] = total.count;
  a.stats[1] = total.mean;
  a.stats[2] = moments_unbiased_var(total);
}

template <typename S>
FASTPPO_HD void whiten_element(const WhitenArgs& a, int64_t r, int64_t c) {
  S* out = static_cast<S*>(a.out);
  if (!a.selected(r, c)) {
    out[r * a.C + c] = S(0);
    return;
  }
  const S mean = S(a.stats[1]);
  out[r * a.C + c] = whiten(a.x.at<S>(r, c), mean, S(inv_std_eps(a.stats[2], a.eps)), a.shift_mean ? S(0) : mean);
}

struct TokenGaeArgs {
  int64_t R = 0, C = 0;
  bool is_f64 = false;
  Strided rewards, values;
  const int64_t* last = nullptr;  // [R] through last_stride: each row's last real token (-1: none)
  int64_t last_stride = 1;
  double gamma = 1.0, lam = 0.95;
  void* adv = nullptr;  // contiguous [R, C]; 0 after the last real token
  void* ret = nullptr;  // contiguous [R, C]
};

// One row, backwards from its last real token: that token is terminal (no bootstrap, nothing
// carried back from the padding, which is never read). An index past the end counts as C - 1.
template <typename S>
FASTPPO_HD void token_gae_row(const TokenGaeArgs& a, int64_t r) {
  S* adv = static_cast<S*>(a.adv) + r * a.C;
  S* ret = static_cast<S*>(a.ret) + r * a.C;
  int64_t last = a.last[r * a.last_stride];
  last = last < -1 ? -1 : (last > a.C - 1 ? a.C - 1 : last);
  for (int64_t c = a.C - 1; c > last; --c) {
    adv[c] = S(0);
    ret[c] = S(0);
  }
  const S gamma = S(a.gamma), gamma_lam = S(a.gamma * a.lam);
  S next_adv = S(0), next_value = S(0);
  for (int64_t c = last; c >= 0; --c) {
    const bool end = c == last;
    const S value = a.values.at<S>(r, c);
    const S delta = gae_delta(a.rewards.at<S>(r, c), value, next_value, end, gamma);
    const S advantage = gae_step(delta, gae_decay(end, gamma_lam), next_adv);
    adv[c] = advantage;
    ret[c] = advantage + value;
    next_adv = advantage;
    next_value = value;
  }
}

void kl_rewards_cpu(const KlRewardArgs& args);
void masked_whiten_cpu(const WhitenArgs& args);
void kl_rewards_cuda(const KlRewardArgs& args, int device, std::uintptr_t stream);
void masked_whiten_cuda(const WhitenArgs& args, int device, std::uintptr_t stream);
void token_gae_cpu(const TokenGaeArgs& args);
void token_gae_cuda(const TokenGaeArgs& args, int device, std::uintptr_t stream);

}  // namespace fastppo
