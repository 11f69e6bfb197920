// The fused clipped PPO loss over an [R, C] problem (R sequences of C tokens; a 1-D batch is one
// row), described by raw pointers and element strides; CPU and CUDA launchers.
//
// The work is cut into fixed chunks (a row's columns, kLossChunk at a time) whatever the device
// or thread count; each chunk's partial sums land in their own slot and are combined in chunk
// order, so results are the same bits run after run.
//
//   pass 1 (norm_adv only): moments of the selected advantages per chunk -> mean and 1/(std+eps)
//   pass 2: per element, the loss terms, the stats and the local derivatives (written to the
//           gradient outputs); per chunk, the sums
//   finish: sums -> loss, stats, and the per-row scale that backward multiplies the local
//           derivatives by (1/count for token means, per-sequence factors for the seq modes)
#pragma once

#include <cstdint>

#include "fastppo_math.h"

namespace fastppo {

constexpr int64_t kLossChunk = 4096;

// Slots of a chunk's partial sums, and of the outputs.
enum LossSum : int { kSumCount = 0, kSumPg, kSumV, kSumEnt, kSumKl, kSumOldKl, kSumClip, kLossSums };
enum LossOut : int { kOutLoss = 0, kOutPg, kOutV, kOutEnt, kOutKl, kOutOldKl, kOutClip, kLossOuts };
enum LossAgg : int { kAggTokenMean = 0, kAggSeqMeanTokenMean = 1, kAggSeqMeanTokenSum = 2 };

// A read-only [R, C] array seen through element strides; null when the argument is absent.
struct Strided {
  const void* data = nullptr;
  int64_t sr = 0, sc = 0;
  template <typename S>
  FASTPPO_HD S at(int64_t r, int64_t c) const {
    return static_cast<const S*>(data)[r * sr + c * sc];
  }
};

struct PpoLossArgs {
  int64_t R = 0, C = 0;
  bool is_f64 = false;
  Strided new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy;
  Strided mask; int mask_type = kFlagU8;  // data null: every element selected
  double clip_coef = 0.2, vf_coef = 0.5, ent_coef = 0.0, vf_clip_coef = 0.2, dual_clip = 0.0;
  bool clip_vloss = true, norm_adv = true;
  int agg = kAggTokenMean;
  // Outputs, all allocated by the caller. grad_* are contiguous [R, C] local derivatives
  // (grad_value only with new_value); out is [kLossOuts]; row_scale is [R].
  void* grad_logprob = nullptr;
  void* grad_value = nullptr;
  void* out = nullptr;
  void* row_scale = nullptr;
  // Workspace: [chunks * kLossSums] partial sums, and [2] (mean, 1/(std+eps)) of the advantages.
  double* partials = nullptr;
  double* adv_stats = nullptr;

  FASTPPO_HD int64_t chunks_per_row() const { return (C + kLossChunk - 1) / kLossChunk; }
  FASTPPO_HD int64_t chunks() const { return R * chunks_per_row(); }
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

// Pass 1 finish: mean and 1/(std + eps) from the chunks' moments, merged in chunk order.
FASTPPO_HD void adv_moments_finish(const PpoLossArgs& a) {
  Moments total{0.0, 0.0, 0.0};
  for (int64_t k = 0; k < a.chunks(); ++k) {
    const double* p = a.partials + k * kLossSums;
    total = moments_merge(total, Moments{p[0], p[1], p[2]});
  }
  a.adv_stats[0] = total.mean;
  a.adv_stats[1] = moments_inv_std(total);
}

// Pass 2, one element: writes the local derivatives and adds the element's terms to `sums`.
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
  S adv = a.advantages.at<S>(r, c);
  if (a.norm_adv) adv = S((static_cast<double>(adv) - a.adv_stats[0]) * a.adv_stats[1]);
  const S logratio = a.new_logprob.at<S>(r, c) - a.old_logprob.at<S>(r, c);
  const S ratio = scalar_exp(logratio);
  const Term<S> pg = policy_term(ratio, adv, S(a.clip_coef), S(a.dual_clip));
  grad_logprob[out] = pg.grad;
  sums[kSumCount] += 1.0;
  sums[kSumPg] += pg.value;
  sums[kSumKl] += approx_kl_k3(ratio, logratio);
  sums[kSumOldKl] += -logratio;
  const S deviation = ratio - S(1);
  sums[kSumClip] += (deviation > S(a.clip_coef) || -deviation > S(a.clip_coef)) ? 1.0 : 0.0;
  if (grad_value) {
    const Term<S> v = value_term(a.new_value.at<S>(r, c), a.clip_vloss ? a.old_value.at<S>(r, c) : S(0),
                                 a.returns.at<S>(r, c), a.clip_vloss, S(a.vf_clip_coef));
    grad_value[out] = S(a.vf_coef) * v.grad;
    sums[kSumV] += v.value;
  }
  if (a.entropy.data) sums[kSumEnt] += a.entropy.at<S>(r, c);
}

// Finish: combines the chunks' sums in order into the loss, the stats and the per-row scales.
// Token stats (approx_kl, old_approx_kl, clipfrac) are means over selected elements; pg, v and
// entropy use `agg`. Sequences without a selected token are left out of the seq modes' mean.
// Nothing selected at all gives zeros.
template <typename S>
FASTPPO_HD void ppo_loss_finish(const PpoLossArgs& a) {
  double token[kLossSums] = {0, 0, 0, 0, 0, 0, 0};
  double seq[kLossSums] = {0, 0, 0, 0, 0, 0, 0};
  double sequences = 0.0;
  const int64_t per_row = a.chunks_per_row();
  S* row_scale = static_cast<S*>(a.row_scale);
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
  const double tokens = token[kSumCount];
  const double inv_tokens = tokens > 0.0 ? 1.0 / tokens : 0.0;
  const double inv_sequences = sequences > 0.0 ? 1.0 / sequences : 0.0;
  double pg, v, ent;
  if (a.agg == kAggTokenMean) {
    pg = token[kSumPg] * inv_tokens;
    v = token[kSumV] * inv_tokens;
    ent = token[kSumEnt] * inv_tokens;
  } else {
    pg = seq[kSumPg] * inv_sequences;
    v = seq[kSumV] * inv_sequences;
    ent = seq[kSumEnt] * inv_sequences;
  }
  for (int64_t r = 0; r < a.R; ++r) {
    double scale = inv_tokens;
    if (a.agg != kAggTokenMean) {
      double count = 0.0;
      for (int64_t j = 0; j < per_row; ++j) count += a.partials[(r * per_row + j) * kLossSums + kSumCount];
      scale = count == 0.0 ? 0.0 : (a.agg == kAggSeqMeanTokenMean ? inv_sequences / count : inv_sequences);
    }
    row_scale[r] = S(scale);
  }
  S* out = static_cast<S*>(a.out);
  out[kOutLoss] = S(pg - a.ent_coef * ent + a.vf_coef * v);
  out[kOutPg] = S(pg);
  out[kOutV] = S(v);
  out[kOutEnt] = S(ent);
  out[kOutKl] = S(token[kSumKl] * inv_tokens);
  out[kOutOldKl] = S(token[kSumOldKl] * inv_tokens);
  out[kOutClip] = S(token[kSumClip] * inv_tokens);
}

void ppo_loss_cpu(const PpoLossArgs& args);
void ppo_loss_cuda(const PpoLossArgs& args, int device, std::uintptr_t stream);

}  // namespace fastppo
