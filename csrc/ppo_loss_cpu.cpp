// The fused PPO loss on the CPU: chunks in parallel with OpenMP, each chunk's sums in its own slot.
// Contiguous chunks (the common case) run a loop the compiler vectorizes; any other layout goes
// through the strided element function. Both call the element math of ppo_loss.h.
#include <omp.h>

#include <cstring>

#include "ppo_loss.h"

namespace fastppo {
namespace {

// Below this many elements the work stays on the calling thread.
constexpr int64_t kParallelElements = 1 << 15;

// ------------------------------------------------------------------ an exp that vectorizes
// libm's exp is a call the vectorizer cannot widen. exp(x) = 2^k * exp(r) with k = round(x / ln 2)
// and |r| <= ln(2)/2; exp(r) from Cephes' minimax polynomial (float) or rational function
// (double); 2^k built from exponent bits, in two halves so that k = 128 (float) or 1024 (double)
// still fits. Outside the finite range the result is +inf or 0; NaN stays NaN.

template <typename To, typename From>
inline To bits_as(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

inline float pow2i(int32_t k) { return bits_as<float>((k + 127) << 23); }
inline double pow2i(int64_t k) { return bits_as<double>((k + 1023) << 52); }

inline float vexp(float x) {
  const float hi = 88.72283f, lo = -87.33654f;
  const float xc = x > hi ? hi : (x < lo ? lo : x);
  const float t = xc * 1.44269504088896341f;
  const int32_t k = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float kf = static_cast<float>(k);
  const float r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t k1 = k / 2;
  const float y = e * pow2i(k1) * pow2i(k - k1);
  return x > hi ? __builtin_inff() : (x < lo ? 0.0f : (x == x ? y : x));
}

inline double vexp(double x) {
  const double hi = 709.782712893384, lo = -708.3964185322641;
  const double xc = x > hi ? hi : (x < lo ? lo : x);
  const double t = xc * 1.4426950408889634073599;
  const int64_t k = static_cast<int64_t>(t + (t >= 0.0 ? 0.5 : -0.5));
  const double kd = static_cast<double>(k);
  const double r = (xc - kd * 6.93145751953125e-1) - kd * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
  const double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr +
                   2.00000000000000000009e0;
  const double e = 1.0 + 2.0 * p / (q - p);
  const int64_t k1 = k / 2;
  const double y = e * pow2i(k1) * pow2i(k - k1);
  return x > hi ? __builtin_inf() : (x < lo ? 0.0 : (x == x ? y : x));
}

// ------------------------------------------------------------------ pass 1

bool unit_columns(const Strided& s) { return s.data == nullptr || s.sc == 1; }

// Contiguous chunk of advantages (and a one-byte mask, or none): count, then mean and squared
// deviations in a second sweep over the (cached) chunk.
template <typename S, bool kMask>
Moments chunk_moments_unit(const PpoLossArgs& a, const ChunkRange& range) {
  const S* adv = static_cast<const S*>(a.advantages.data) + range.r * a.advantages.sr + range.c0;
  const uint8_t* mask = kMask ? static_cast<const uint8_t*>(a.mask.data) + range.r * a.mask.sr + range.c0 : nullptr;
  const int64_t n = range.c1 - range.c0;
  double count = 0.0, sum = 0.0;
#pragma omp simd reduction(+ : count, sum)
  for (int64_t i = 0; i < n; ++i) {
    const bool sel = !kMask || mask[i] != 0;
    count += sel ? 1.0 : 0.0;
    sum += sel ? static_cast<double>(adv[i]) : 0.0;
  }
  const double mean = count > 0.0 ? sum / count : 0.0;
  double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(adv[i]) - mean;
    m2 += (!kMask || mask[i] != 0) ? d * d : 0.0;
  }
  return Moments{count, mean, m2};
}

template <typename S>
Moments chunk_moments(const PpoLossArgs& a, const ChunkRange& range, bool unit, bool byte_mask) {
  if (unit && !a.mask.data) return chunk_moments_unit<S, false>(a, range);
  if (unit && byte_mask) return chunk_moments_unit<S, true>(a, range);
  Moments m{0.0, 0.0, 0.0};
  for (int64_t c = range.c0; c < range.c1; ++c) m = adv_moments_element<S>(a, range.r, c, m);
  return m;
}

// ------------------------------------------------------------------ pass 2

template <typename S, bool kMask, bool kValue, bool kEntropy>
void chunk_loss_unit(const PpoLossArgs& a, const ChunkRange& range, double* partial) {
  const int64_t r = range.r, c0 = range.c0, n = range.c1 - range.c0;
  auto row = [&](const Strided& s) { return static_cast<const S*>(s.data) + r * s.sr + c0; };
  const S* new_logprob = row(a.new_logprob);
  const S* old_logprob = row(a.old_logprob);
  const S* adv = row(a.advantages);
  const S* value = kValue ? row(a.new_value) : nullptr;
  const S* old_value = kValue ? row(a.clip_vloss ? a.old_value : a.new_value) : nullptr;
  const S* ret = kValue ? row(a.returns) : nullptr;
  const S* entropy = kEntropy ? row(a.entropy) : nullptr;
  const uint8_t* mask = kMask ? static_cast<const uint8_t*>(a.mask.data) + r * a.mask.sr + c0 : nullptr;
  S* grad_logprob = static_cast<S*>(a.grad_logprob) + r * a.C + c0;
  S* grad_value = kValue ? static_cast<S*>(a.grad_value) + r * a.C + c0 : nullptr;
  const S scale = static_cast<const S*>(a.row_scale)[r];
  const S value_scale = S(a.vf_coef) * scale;
  const S adv_mean = S(a.adv_stats[0]), adv_inv_std = S(a.adv_stats[1]);
  const LossCoefs<S> coefs = loss_coefs<S>(a);
  double count = 0, pg = 0, v = 0, ent = 0, kl = 0, old_kl = 0, clipped = 0;
#pragma omp simd reduction(+ : count, pg, v, ent, kl, old_kl, clipped)
  for (int64_t i = 0; i < n; ++i) {
    const bool sel = !kMask || mask[i] != 0;
    const S logratio = new_logprob[i] - old_logprob[i];
    const LossElement<S> e = loss_element(logratio, vexp(logratio), adv[i], adv_mean, adv_inv_std,
                                          kValue ? value[i] : S(0), kValue ? old_value[i] : S(0),
                                          kValue ? ret[i] : S(0), coefs);
    grad_logprob[i] = sel ? e.grad_logprob * scale : S(0);
    if (kValue) grad_value[i] = sel ? e.grad_value * value_scale : S(0);
    count += sel ? 1.0 : 0.0;
    pg += sel ? static_cast<double>(e.pg) : 0.0;
    v += kValue && sel ? static_cast<double>(e.v) : 0.0;
    ent += kEntropy && sel ? static_cast<double>(entropy[i]) : 0.0;
    kl += sel ? static_cast<double>(e.kl) : 0.0;
    old_kl += sel ? static_cast<double>(e.old_kl) : 0.0;
    clipped += sel ? static_cast<double>(e.clipped) : 0.0;
  }
  const double sums[kLossSums] = {count, pg, v, ent, kl, old_kl, clipped};
  for (int s = 0; s < kLossSums; ++s) partial[s] = sums[s];
}

template <typename S, bool kMask>
void chunk_loss_unit_dispatch(const PpoLossArgs& a, const ChunkRange& range, double* partial) {
  const bool value = a.new_value.data != nullptr, entropy = a.entropy.data != nullptr;
  if (value && entropy) chunk_loss_unit<S, kMask, true, true>(a, range, partial);
  if (value && !entropy) chunk_loss_unit<S, kMask, true, false>(a, range, partial);
  if (!value && entropy) chunk_loss_unit<S, kMask, false, true>(a, range, partial);
  if (!value && !entropy) chunk_loss_unit<S, kMask, false, false>(a, range, partial);
}

template <typename S>
void chunk_loss(const PpoLossArgs& a, const ChunkRange& range, int64_t k, bool unit, bool byte_mask) {
  double* partial = a.partials + k * kLossSums;
  if (unit && !a.mask.data) return chunk_loss_unit_dispatch<S, false>(a, range, partial);
  if (unit && byte_mask) return chunk_loss_unit_dispatch<S, true>(a, range, partial);
  double sums[kLossSums] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t c = range.c0; c < range.c1; ++c) ppo_loss_element<S>(a, range.r, c, sums);
  for (int s = 0; s < kLossSums; ++s) partial[s] = sums[s];
}

template <typename S>
void ppo_loss_cpu_typed(const PpoLossArgs& a) {
  const int64_t chunks = a.chunks();
  const bool parallel = a.R * a.C >= kParallelElements;
  const bool unit = unit_columns(a.new_logprob) && unit_columns(a.old_logprob) && unit_columns(a.advantages) &&
                    unit_columns(a.new_value) && unit_columns(a.old_value) && unit_columns(a.returns) &&
                    unit_columns(a.entropy) && unit_columns(a.mask);
  const bool byte_mask = a.mask.data && a.mask_type == kFlagU8;
  if (a.needs_pass1()) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t k = 0; k < chunks; ++k) adv_moments_store(a, k, chunk_moments<S>(a, chunk_range(a, k), unit, byte_mask));
  }
  loss_pass1_finish<S>(a);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t k = 0; k < chunks; ++k) chunk_loss<S>(a, chunk_range(a, k), k, unit, byte_mask);
  ppo_loss_finish<S>(a);
}

}  // namespace

void ppo_loss_cpu(const PpoLossArgs& args) {
  if (args.is_f64) {
    ppo_loss_cpu_typed<double>(args);
  } else {
    ppo_loss_cpu_typed<float>(args);
  }
}

}  // namespace fastppo
