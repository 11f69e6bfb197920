// The fused clipped PPO loss over an [R, C] problem (R sequences of C tokens; a 1-D batch is one
// row), described by raw pointers and element strides; CPU and CUDA launchers.
//
// The work is cut into fixed chunks (a row's columns, kLossChunk at a time) whatever the device
// or thread count; each chunk's partial sums land in their own slot and are combined in chunk
// order, so results are the same bits run after run.
//
//   pass 1 (when norm_adv, a mask or a seq mode makes counts unknown): per chunk, the count and
//          moments of the selected advantages; finish 1 turns them into the advantage mean and
//          1/(std + eps) and each row's scale (1/tokens, or the seq modes' per-row factors)
//   pass 2: per element, the loss terms, the stats and the final gradients (each element's
//           derivative times its row's scale); per chunk, the sums
//   finish 2: the sums -> the loss and the stats
// Backward then only multiplies the saved gradients by the incoming gradient of the loss.
#pragma once

#include <cstdint>

#include "fastppo_math.h"

namespace fastppo {

constexpr int64_t kLossChunk = 4096;

// Slots of a chunk's partial sums (pass 1 uses the first three for its moments), and of the stats.
enum LossSum : int { kSumCount = 0, kSumPg, kSumV, kSumEnt, kSumKl, kSumOldKl, kSumClip, kLossSums };
enum LossStat : int { kStatPg = 0, kStatV, kStatEnt, kStatKl, kStatOldKl, kStatClip, kLossStats };
enum LossAgg : int { kAggTokenMean = 0, kAggSeqMeanTokenMean = 1, kAggSeqMeanTokenSum = 2 };

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
  // Outputs, all allocated by the caller. grad_* are contiguous [R, C] (grad_value only with
  // new_value); loss is one element; stats is [kLossStats]; row_scale is [R].
  void* grad_logprob = nullptr;
  void* grad_value = nullptr;
  void* loss = nullptr;
  void* stats = nullptr;
  void* row_scale = nullptr;
  // Workspace: [chunks * kLossSums] partial sums, and [2] (mean, 1/(std+eps)) of the advantages.
  double* partials = nullptr;
  double* adv_stats = nullptr;
  // Data-parallel training (token-mean only): the (count, mean, m2) of the selected advantages of
  // the whole group's minibatch, and the group's size K. The advantages are normalized with them
  // and every mean divides by count / K, so the mean of the K ranks' gradients is the gradient of
  // the loss over the union of their minibatches. Null: this call's own data alone.
  const double* group = nullptr;
  double group_size = 1.0;

  FASTPPO_HD int64_t chunks_per_row() const { return (C + kLossChunk - 1) / kLossChunk; }
  FASTPPO_HD int64_t chunks() const { return R * chunks_per_row(); }
  FASTPPO_HD bool needs_pass1() const {
    return group == nullptr && (norm_adv || mask.data != nullptr || agg != kAggTokenMean);
  }
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
  S clip, dual_clip, vf_clip;
  bool clip_vloss;
};

template <typename S>
FASTPPO_HD LossCoefs<S> loss_coefs(const LossOptions& a) {
  return LossCoefs<S>{S(a.clip_coef), S(a.dual_clip), S(a.vf_clip_coef), a.clip_vloss};
}

// Everything one selected element contributes: its derivatives (before the row scale) and terms.
template <typename S>
struct LossElement {
  S grad_logprob, grad_value;
  S pg, v, kl, old_kl, clipped;
};

// The element math shared by every loop: `ratio` is exp(logratio), computed by the caller (a
// vectorizable exp on the CPU, the device's exp on CUDA). Branch-free, so CPU loops vectorize.
template <typename S>
FASTPPO_HD LossElement<S> loss_element(S logratio, S ratio, S adv_raw, S adv_mean, S adv_inv_std, S value,
                                       S old_value, S ret, const LossCoefs<S>& k) {
  const S adv = (adv_raw - adv_mean) * adv_inv_std;
  const Term<S> pg = policy_term(ratio, adv, k.clip, k.dual_clip);
  const Term<S> v = value_term(value, old_value, ret, k.clip_vloss, k.vf_clip);
  const S deviation = ratio - S(1);
  const S clipped = (deviation > k.clip || -deviation > k.clip) ? S(1) : S(0);
  return LossElement<S>{pg.grad, v.grad, pg.value, v.value, approx_kl_k3(ratio, logratio), -logratio, clipped};
}

// ------------------------------------------------------------------ pass 1

// Pass 1, one element: adds a selected advantage to the chunk's moments.
template <typename S>
FASTPPO_HD Moments adv_moments_element(const PpoLossArgs& a, int64_t r, int64_t c, Moments m) {
  return a.selected(r, c) ? moments_push(m, static_cast<double>(a.advantages.at<S>(r, c))) : m;
}

// Pass 1 end of a chunk: its moments go to the first three slots of its partial sums.
FASTPPO_HD void adv_moments_store(const PpoLossArgs& a, int64_t k, Moments m) {
  double* p = a.partials + k * kLossSums;
  p[0] = m.count;
  p[1] = m.mean;
  p[2] = m.m2;
}

FASTPPO_HD Moments adv_moments_load(const PpoLossArgs& a, int64_t k) {
  const double* p = a.partials + k * kLossSums;
  return Moments{p[0], p[1], p[2]};
}

// Finish 1: the advantage statistics (merged in chunk order) and each row's gradient scale.
// Sequences without a selected token are left out of the seq modes' mean over sequences.
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
  a.adv_stats[0] = a.norm_adv ? total.mean : 0.0;
  a.adv_stats[1] = a.norm_adv ? moments_inv_std(total) : 1.0;
  for (int64_t r = 0; r < a.R; ++r) {
    double count = 0.0;
    for (int64_t j = 0; j < per_row; ++j) count += a.partials[(r * per_row + j) * kLossSums];
    double scale = total.count > 0.0 ? 1.0 / total.count : 0.0;
    if (a.agg == kAggSeqMeanTokenMean) scale = count > 0.0 ? 1.0 / (sequences * count) : 0.0;
    if (a.agg == kAggSeqMeanTokenSum) scale = count > 0.0 ? 1.0 / sequences : 0.0;
    row_scale[r] = S(scale);
  }
}

// ------------------------------------------------------------------ pass 2

// Pass 2, one element through the strides: writes the final gradients, adds the terms to `sums`.
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
  const S logratio = a.new_logprob.at<S>(r, c) - a.old_logprob.at<S>(r, c);
  const bool has_value = grad_value != nullptr;
  const S value = has_value ? a.new_value.at<S>(r, c) : S(0);
  const LossElement<S> e = loss_element(
      logratio, scalar_exp(logratio), a.advantages.at<S>(r, c), S(a.adv_stats[0]), S(a.adv_stats[1]), value,
      has_value && a.clip_vloss ? a.old_value.at<S>(r, c) : value, has_value ? a.returns.at<S>(r, c) : S(0),
      loss_coefs<S>(a));
  grad_logprob[out] = e.grad_logprob * scale;
  if (has_value) grad_value[out] = e.grad_value * (S(a.vf_coef) * scale);
  sums[kSumCount] += 1.0;
  sums[kSumPg] += e.pg;
  sums[kSumV] += has_value ? static_cast<double>(e.v) : 0.0;
  sums[kSumEnt] += a.entropy.data ? static_cast<double>(a.entropy.at<S>(r, c)) : 0.0;
  sums[kSumKl] += e.kl;
  sums[kSumOldKl] += e.old_kl;
  sums[kSumClip] += e.clipped;
}

// Finish 2: combines the chunks' sums in order into the loss and the stats. Token stats
// (approx_kl, old_approx_kl, clipfrac) are means over selected elements; pg, v and entropy use
// `agg`. Nothing selected at all gives zeros.
template <typename S>
FASTPPO_HD void ppo_loss_finish(const PpoLossArgs& a) {
  double token[kLossSums] = {0, 0, 0, 0, 0, 0, 0};
  double seq[kLossSums] = {0, 0, 0, 0, 0, 0, 0};
  double sequences = 0.0;
  const int64_t per_row = a.chunks_per_row();
  for (int64_t r = 0; r < a.R; ++r) {
    double row[kLossSums] = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < per_row; ++j)
      for (int s = 0; s < kLossSums; ++s) row[s] += a.partials[(r * per_row + j) * kLossSums + s];
    for (int s = 0; s < kLossSums; ++s) token[s] += row[s];
    if (row[kSumCount] > 0.0) {
      sequences += 1.0;
      const double per_token = a.agg == kAggSeqMeanTokenMean ? 1.0 / row[kSumCount] : 1.0;
      for (int s = kSumPg; s <= kSumEnt; ++s) seq[s] += row[s] * per_token;
    }
  }
  const double inv_tokens = a.inv_tokens(token[kSumCount]);
  const double inv_sequences = sequences > 0.0 ? 1.0 / sequences : 0.0;
  const bool token_mean = a.agg == kAggTokenMean;
  const double pg = token_mean ? token[kSumPg] * inv_tokens : seq[kSumPg] * inv_sequences;
  const double v = token_mean ? token[kSumV] * inv_tokens : seq[kSumV] * inv_sequences;
  const double ent = token_mean ? token[kSumEnt] * inv_tokens : seq[kSumEnt] * inv_sequences;
  *static_cast<S*>(a.loss) = S(pg - a.ent_coef * ent + a.vf_coef * v);
  S* stats = static_cast<S*>(a.stats);
  stats[kStatPg] = S(pg);
  stats[kStatV] = S(v);
  stats[kStatEnt] = S(ent);
  stats[kStatKl] = S(token[kSumKl] * inv_tokens);
  stats[kStatOldKl] = S(token[kSumOldKl] * inv_tokens);
  stats[kStatClip] = S(token[kSumClip] * inv_tokens);
}

void ppo_loss_cpu(const PpoLossArgs& args);
void ppo_loss_cuda(const PpoLossArgs& args, int device, std::uintptr_t stream);

}  // namespace fastppo
