// The fused clipped PPO loss over an [R, C] problem (R sequences of C tokens; a 1-D batch is one
// row), described by raw pointers and element strides; CPU and CUDA launchers.
//
// The work is cut into fixed chunks (a row's columns, kLossChunk at a time) whatever the device
// or thread count; each chunk's partial sums land in their own slot and are combined in chunk
// order, so results are the same bits run after run.
//
//   pass 1 (when norm_adv, a mask, a seq mode or the sequence ratio makes counts unknown): per
//          chunk, the count and moments of the selected advantages (and with the sequence ratio,
//          the sum of the selected log-ratios); finish 1 turns them into the advantage mean and
//          1/(std + eps), each row's scale (1/tokens, or the seq modes' per-row factors) and each
//          row's mean log-ratio
//   pass 2: per element, the loss terms, the stats and the final gradients (each element's
//           derivative times its row's scale); per chunk, the sums
//   finish 2: the sums -> the loss and the stats (and with the sequence ratio, each row's
//             d loss / d log-ratio mean over its selected tokens)
//   pass 3 (sequence ratio only): adds that to the gradient of each selected token of the row
// Backward then only multiplies the saved gradients by the incoming gradient of the loss.
#pragma once

#include <cstdint>

#include "fastppo_math.h"

namespace fastppo {

constexpr int64_t kLossChunk = 4096;

// Slots of a chunk's partial sums (pass 1 uses the first three for its moments and kSumLogRatio
// for the sequence ratio's log-ratio sum), and of the stats. kSumRefKl: the KL term against the
// reference; kSumSeqGrad: d loss / d ratio-level log-ratio of the sequence ratio, before the scale.
enum LossSum : int {
  kSumCount = 0, kSumPg, kSumV, kSumEnt, kSumKl, kSumOldKl, kSumClip,
  kSumRefKl, kSumClipLow, kSumClipHigh, kSumSeqGrad, kLossSums,
  kSumLogRatio = 3
};
// kLossStats: the stats the fused actor-critic reports too (mlp.h's layout); ppo_loss writes all
// kLossStatsAll.
enum LossStat : int {
  kStatPg = 0, kStatV, kStatEnt, kStatKl, kStatOldKl, kStatClip, kLossStats,
  kStatRefKl = kLossStats, kStatClipLow, kStatClipHigh, kLossStatsAll
};
enum LossAgg : int { kAggTokenMean = 0, kAggSeqMeanTokenMean = 1, kAggSeqMeanTokenSum = 2, kAggSeqMeanTokenSumNorm = 3 };
// No KL term against a reference (else a KlEstimator).
constexpr int kKlNone = -1;

// The loss's coefficients and switches (ppo_loss's keyword arguments; dual_clip 0: off).
struct LossOptions {
  double clip_coef = 0.2, vf_coef = 0.5, ent_coef = 0.0, vf_clip_coef = 0.2, dual_clip = 0.0;
  bool clip_vloss = true, norm_adv = true;
};

struct PpoLossArgs : LossOptions {
  int64_t R = 0, C = 0;
  bool is_f64 = false;
  Strided new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy;
  Strided mask; int mask_type = kFlagU8;  // data null: every element selected
  int agg = kAggTokenMean;
  // The loss family of LLM training. clip_coef_high: the upper clip 1 + clip_coef_high (the lower
  // stays 1 - clip_coef). is_weights: per-element weights of the policy term (null: 1). ref_logprob
  // with kl_estimator (kKlNone: no term): kl_coef * agg(KL estimate of log pi - log pi_ref) joins
  // the loss. sequence_ratio: each row's ratio is exp of its selected tokens' mean log-ratio (GSPO).
  double clip_coef_high = 0.2, kl_coef = 0.0;
  Strided is_weights, ref_logprob;
  int kl_estimator = kKlNone;
  bool sequence_ratio = false;
  // Outputs, all allocated by the caller. grad_* are contiguous [R, C] (grad_value only with
  // new_value); loss is one element; stats is [kLossStats]; row_scale is [R].
  void* grad_logprob = nullptr;
  void* grad_value = nullptr;
  void* loss = nullptr;
  void* stats = nullptr;
  void* row_scale = nullptr;
  // Workspace: [chunks * kLossSums] partial sums, [2] (mean, 1/(std+eps)) of the advantages, and
  // [R] per-row values of the sequence ratio (after finish 1 the row's mean log-ratio, after
  // finish 2 the gradient pass 3 adds to each of its selected tokens).
  double* partials = nullptr;
  double* adv_stats = nullptr;
  double* row_values = nullptr;
  // Data-parallel training (token-mean only): the (count, mean, m2) of the selected advantages of
  // the whole group's minibatch, and the group's size K. The advantages are normalized with them
  // and every mean divides by count / K, so the mean of the K ranks' gradients is the gradient of
  // the loss over the union of their minibatches. Null: this call's own data alone.
  const double* group = nullptr;
  double group_size = 1.0;

  FASTPPO_HD int64_t chunks_per_row() const { return (C + kLossChunk - 1) / kLossChunk; }
  FASTPPO_HD int64_t chunks() const { return R * chunks_per_row(); }
  FASTPPO_HD bool needs_pass1() const {
    return sequence_ratio || (group == nullptr && (norm_adv || mask.data != nullptr || agg != kAggTokenMean));
  }
  // What the seq-mean-token-sum-norm mode divides by: every element of the [R, C] input.
  FASTPPO_HD double inv_elements() const { return R * C > 0 ? 1.0 / static_cast<double>(R * C) : 0.0; }
  // What every token-mean divides by: the selected count, or the group's count / K.
  FASTPPO_HD double inv_tokens(double count) const {
    if (group != nullptr) count = group[0] / group_size;
    return count > 0.0 ? 1.0 / count : 0.0;
  }
  FASTPPO_HD bool selected(int64_t r, int64_t c) const {
    return mask.data == nullptr || load_flag(mask.data, mask_type, r * mask.sr + c * mask.sc);
  }
};

// Chunk k covers row r, columns [c0, c1).
struct ChunkRange {
  int64_t r, c0, c1;
};

FASTPPO_HD ChunkRange chunk_range(const PpoLossArgs& a, int64_t k) {
  const int64_t per_row = a.chunks_per_row();
  const int64_t r = k / per_row, c0 = (k % per_row) * kLossChunk;
  return ChunkRange{r, c0, c0 + kLossChunk < a.C ? c0 + kLossChunk : a.C};
}

// ------------------------------------------------------------------ one element

template <typename S>
struct LossCoefs {
  S clip, clip_high, dual_clip, vf_clip;
  bool clip_vloss;
};

// Symmetric clip (the fused actor-critic's); ppo_loss_coefs adds clip_coef_high.
template <typename S>
FASTPPO_HD LossCoefs<S> loss_coefs(const LossOptions& a) {
  return LossCoefs<S>{S(a.clip_coef), S(a.clip_coef), S(a.dual_clip), S(a.vf_clip_coef), a.clip_vloss};
}

// Everything one selected element contributes: its derivatives (before the row scale) and terms.
// clipped_low / clipped_high: the ratio below 1 - clip with A < 0, above 1 + clip_high with A > 0
// (where the clip takes the gradient away).
template <typename S>
struct LossElement {
  S grad_logprob, grad_value;
  S pg, v, kl, old_kl, clipped, clipped_low, clipped_high;
};

// The element math shared by every loop: `ratio` is exp(logratio), computed by the caller (a
// vectorizable exp on the CPU, the device's exp on CUDA); `policy_ratio` the ratio of the policy
// term and the clip stats (`ratio`, or the sequence's ratio). approx_kl and old_approx_kl are
// always the token's. Branch-free, so CPU loops vectorize.
template <typename S>
FASTPPO_HD LossElement<S> loss_element(S logratio, S ratio, S policy_ratio, S adv_raw, S adv_mean, S adv_inv_std,
                                       S value, S old_value, S ret, const LossCoefs<S>& k) {
  const S adv = (adv_raw - adv_mean) * adv_inv_std;
  const Term<S> pg = policy_term(policy_ratio, adv, k.clip, k.clip_high, k.dual_clip);
  const Term<S> v = value_term(value, old_value, ret, k.clip_vloss, k.vf_clip);
  // CleanRL's |ratio - 1| > c, per side. Selects on one compare each (GCC leaves a select on a || or
  // && of two compares branchy here, and the CPU loops over it scalar; benchmarks/vector_code.py
  // counts); the sides exclude each other, so their sum is the or.
  const S deviation = policy_ratio - S(1);
  const S below = -deviation > k.clip ? S(1) : S(0);
  const S above = deviation > k.clip_high ? S(1) : S(0);
  const S clipped = below + above;
  const S clipped_low = adv < S(0) ? below : S(0);
  const S clipped_high = adv > S(0) ? above : S(0);
  return LossElement<S>{pg.grad, v.grad, pg.value, v.value, approx_kl_k3(ratio, logratio), -logratio,
                        clipped, clipped_low, clipped_high};
}

template <typename S>
FASTPPO_HD LossElement<S> loss_element(S logratio, S ratio, S adv_raw, S adv_mean, S adv_inv_std, S value,
                                       S old_value, S ret, const LossCoefs<S>& k) {
  return loss_element(logratio, ratio, ratio, adv_raw, adv_mean, adv_inv_std, value, old_value, ret, k);
}

template <typename S>
FASTPPO_HD LossCoefs<S> ppo_loss_coefs(const PpoLossArgs& a) {
  LossCoefs<S> k = loss_coefs<S>(a);
  k.clip_high = S(a.clip_coef_high);
  return k;
}

// The sequence ratio of row r, from its mean log-ratio (finish 1).
template <typename S>
FASTPPO_HD S sequence_ratio_of_row(const PpoLossArgs& a, int64_t r) {
  return scalar_exp(S(a.row_values[r]));
}

// ------------------------------------------------------------------ pass 1

// Pass 1, one element: adds a selected advantage to the chunk's moments.
template <typename S>
FASTPPO_HD Moments adv_moments_element(const PpoLossArgs& a, int64_t r, int64_t c, Moments m) {
  return a.selected(r, c) ? moments_push(m, static_cast<double>(a.advantages.at<S>(r, c))) : m;
}

// Pass 1, one element: its log-ratio when selected (the sequence ratio's sum), else 0.
template <typename S>
FASTPPO_HD double selected_logratio(const PpoLossArgs& a, int64_t r, int64_t c) {
  return a.selected(r, c) ? static_cast<double>(a.new_logprob.at<S>(r, c) - a.old_logprob.at<S>(r, c)) : 0.0;
}

// Pass 1 end of a chunk: its moments go to the first three slots of its partial sums, the sum of
// its selected log-ratios (sequence ratio only) to kSumLogRatio.
FASTPPO_HD void adv_moments_store(const PpoLossArgs& a, int64_t k, Moments m, double logratio_sum) {
  double* p = a.partials + k * kLossSums;
  p[0] = m.count;
  p[1] = m.mean;
  p[2] = m.m2;
  p[kSumLogRatio] = logratio_sum;
}

FASTPPO_HD Moments adv_moments_load(const PpoLossArgs& a, int64_t k) {
  const double* p = a.partials + k * kLossSums;
  return Moments{p[0], p[1], p[2]};
}

// Finish 1: the advantage statistics (merged in chunk order), each row's gradient scale and, with
// the sequence ratio, each row's mean log-ratio over its selected tokens (the count taken as at
// least 1, as TRL does). Sequences without a selected token are left out of the seq modes' mean
// over sequences (seq-mean-token-sum-norm divides by R * C whatever the mask). A data-parallel
// group's moments, when given, replace this call's own.
template <typename S>
FASTPPO_HD void loss_pass1_finish(const PpoLossArgs& a) {
  S* row_scale = static_cast<S*>(a.row_scale);
  if (!a.needs_pass1()) {
    const Moments group = a.group ? Moments{a.group[0], a.group[1], a.group[2]} : Moments{0.0, 0.0, 0.0};
    a.adv_stats[0] = a.group && a.norm_adv ? group.mean : 0.0;
    a.adv_stats[1] = a.group && a.norm_adv ? moments_inv_std(group) : 1.0;
    for (int64_t r = 0; r < a.R; ++r) row_scale[r] = S(a.inv_tokens(static_cast<double>(a.R * a.C)));
    return;
  }
  const int64_t per_row = a.chunks_per_row();
  Moments total{0.0, 0.0, 0.0};
  double sequences = 0.0;
  for (int64_t r = 0; r < a.R; ++r) {
    Moments row{0.0, 0.0, 0.0};
    for (int64_t j = 0; j < per_row; ++j) row = moments_merge(row, adv_moments_load(a, r * per_row + j));
    total = moments_merge(total, row);
    sequences += row.count > 0.0 ? 1.0 : 0.0;
  }
  const Moments adv = a.group ? Moments{a.group[0], a.group[1], a.group[2]} : total;
  a.adv_stats[0] = a.norm_adv ? adv.mean : 0.0;
  a.adv_stats[1] = a.norm_adv ? moments_inv_std(adv) : 1.0;
  for (int64_t r = 0; r < a.R; ++r) {
    double count = 0.0, logratio = 0.0;
    for (int64_t j = 0; j < per_row; ++j) {
      count += a.partials[(r * per_row + j) * kLossSums];
      logratio += a.partials[(r * per_row + j) * kLossSums + kSumLogRatio];
    }
    double scale = a.inv_tokens(total.count);
    if (a.agg == kAggSeqMeanTokenMean) scale = count > 0.0 ? 1.0 / (sequences * count) : 0.0;
    if (a.agg == kAggSeqMeanTokenSum) scale = count > 0.0 ? 1.0 / sequences : 0.0;
    if (a.agg == kAggSeqMeanTokenSumNorm) scale = a.inv_elements();
    row_scale[r] = S(scale);
    if (a.sequence_ratio) a.row_values[r] = logratio / (count > 1.0 ? count : 1.0);
  }
}

// ------------------------------------------------------------------ pass 2

// Pass 2, one element through the strides: writes the final gradients, adds the terms to `sums`.
// With the sequence ratio the policy term's derivative goes to kSumSeqGrad instead (pass 3 adds it).
template <typename S>
FASTPPO_HD void ppo_loss_element(const PpoLossArgs& a, int64_t r, int64_t c, double* sums) {
  const int64_t out = r * a.C + c;
  S* grad_logprob = static_cast<S*>(a.grad_logprob);
  S* grad_value = static_cast<S*>(a.grad_value);
  if (!a.selected(r, c)) {
    grad_logprob[out] = S(0);
    if (grad_value) grad_value[out] = S(0);
    return;
  }
  const S scale = static_cast<const S*>(a.row_scale)[r];
  const S logprob = a.new_logprob.at<S>(r, c);
  const S logratio = logprob - a.old_logprob.at<S>(r, c);
  const S ratio = scalar_exp(logratio);
  const bool has_value = grad_value != nullptr;
  const S value = has_value ? a.new_value.at<S>(r, c) : S(0);
  const LossElement<S> e = loss_element(
      logratio, ratio, a.sequence_ratio ? sequence_ratio_of_row<S>(a, r) : ratio, a.advantages.at<S>(r, c),
      S(a.adv_stats[0]), S(a.adv_stats[1]), value, has_value && a.clip_vloss ? a.old_value.at<S>(r, c) : value,
      has_value ? a.returns.at<S>(r, c) : S(0), ppo_loss_coefs<S>(a));
  const S weight = a.is_weights.data ? a.is_weights.at<S>(r, c) : S(1);
  const S pg_grad = weight * e.grad_logprob;
  S grad = a.sequence_ratio ? S(0) : pg_grad * scale;
  Term<S> kl{S(0), S(0)};
  if (a.kl_estimator != kKlNone) {
    const S d = logprob - a.ref_logprob.at<S>(r, c);
    kl = kl_term(d, a.kl_estimator == kKlK3 ? scalar_exp(-d) : S(0), a.kl_estimator);
    if (a.kl_coef != 0.0) grad += kl.grad * (S(a.kl_coef) * scale);
  }
  grad_logprob[out] = grad;
  if (has_value) grad_value[out] = e.grad_value * (S(a.vf_coef) * scale);
  sums[kSumCount] += 1.0;
  sums[kSumPg] += weight * e.pg;
  sums[kSumV] += has_value ? static_cast<double>(e.v) : 0.0;
  sums[kSumEnt] += a.entropy.data ? static_cast<double>(a.entropy.at<S>(r, c)) : 0.0;
  sums[kSumKl] += e.kl;
  sums[kSumOldKl] += e.old_kl;
  sums[kSumClip] += e.clipped;
  sums[kSumRefKl] += kl.value;
  sums[kSumClipLow] += e.clipped_low;
  sums[kSumClipHigh] += e.clipped_high;
  sums[kSumSeqGrad] += a.sequence_ratio ? static_cast<double>(pg_grad) : 0.0;
}

// The terms aggregated with `agg` (pg, v, entropy, the reference KL).
FASTPPO_HD bool aggregated_sum(int s) { return (s >= kSumPg && s <= kSumEnt) || s == kSumRefKl; }

// Finish 2: combines the chunks' sums in order into the loss and the stats. Token stats
// (approx_kl, old_approx_kl, the clip fractions) are means over selected elements; pg, v, entropy
// and the reference KL use `agg`. Nothing selected at all gives zeros. With the sequence ratio,
// each row's gradient of its selected tokens goes to row_values for pass 3.
template <typename S>
FASTPPO_HD void ppo_loss_finish(const PpoLossArgs& a) {
  double token[kLossSums] = {};
  double seq[kLossSums] = {};
  double sequences = 0.0;
  const int64_t per_row = a.chunks_per_row();
  for (int64_t r = 0; r < a.R; ++r) {
    double row[kLossSums] = {};
    for (int64_t j = 0; j < per_row; ++j)
      for (int s = 0; s < kLossSums; ++s) row[s] += a.partials[(r * per_row + j) * kLossSums + s];
    for (int s = 0; s < kLossSums; ++s) token[s] += row[s];
    if (row[kSumCount] > 0.0) {
      sequences += 1.0;
      const double per_token = a.agg == kAggSeqMeanTokenMean ? 1.0 / row[kSumCount] : 1.0;
      for (int s = 0; s < kLossSums; ++s) seq[s] += aggregated_sum(s) ? row[s] * per_token : 0.0;
    }
    if (a.sequence_ratio) {
      const double scale = static_cast<double>(static_cast<const S*>(a.row_scale)[r]);
      a.row_values[r] = row[kSumSeqGrad] * scale / (row[kSumCount] > 1.0 ? row[kSumCount] : 1.0);
    }
  }
  const double inv_tokens = a.inv_tokens(token[kSumCount]);
  const double inv_sequences = sequences > 0.0 ? 1.0 / sequences : 0.0;
  double agg[kLossSums] = {};
  for (int s = 0; s < kLossSums; ++s) {
    if (a.agg == kAggTokenMean) agg[s] = token[s] * inv_tokens;
    else if (a.agg == kAggSeqMeanTokenSumNorm) agg[s] = token[s] * a.inv_elements();
    else agg[s] = seq[s] * inv_sequences;
  }
  // kl_coef 0: the KL is reported, not part of the loss (0 * inf would make it NaN).
  const double kl_term = a.kl_coef != 0.0 ? a.kl_coef * agg[kSumRefKl] : 0.0;
  *static_cast<S*>(a.loss) = S(agg[kSumPg] - a.ent_coef * agg[kSumEnt] + a.vf_coef * agg[kSumV] + kl_term);
  S* stats = static_cast<S*>(a.stats);
  stats[kStatPg] = S(agg[kSumPg]);
  stats[kStatV] = S(agg[kSumV]);
  stats[kStatEnt] = S(agg[kSumEnt]);
  stats[kStatKl] = S(token[kSumKl] * inv_tokens);
  stats[kStatOldKl] = S(token[kSumOldKl] * inv_tokens);
  stats[kStatClip] = S(token[kSumClip] * inv_tokens);
  stats[kStatRefKl] = S(agg[kSumRefKl]);
  stats[kStatClipLow] = S(token[kSumClipLow] * inv_tokens);
  stats[kStatClipHigh] = S(token[kSumClipHigh] * inv_tokens);
}

// ------------------------------------------------------------------ pass 3 (sequence ratio)

// Adds the row's share of the sequence ratio's gradient to a selected element's gradient.
template <typename S>
FASTPPO_HD void sequence_grad_element(const PpoLossArgs& a, int64_t r, int64_t c) {
  if (a.selected(r, c)) static_cast<S*>(a.grad_logprob)[r * a.C + c] += S(a.row_values[r]);
}

void ppo_loss_cpu(const PpoLossArgs& args);
void ppo_loss_cuda(const PpoLossArgs& args, int device, std::uintptr_t stream);

}  // namespace fastppo
