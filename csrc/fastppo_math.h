// The per-element math of fastppo, written once and called by the CPU loops and the CUDA kernels.
// Every function here is a small inline host+device function of scalars: no memory layout, no threads.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPPO_HD __host__ __device__ __forceinline__
#else
#define FASTPPO_HD inline
#endif

namespace fastppo {

// Element types of the 0/1 flag arrays (`dones`, `terminated`). bool is stored as one byte.
enum FlagType : int { kFlagU8 = 0, kFlagI8 = 1, kFlagI32 = 2, kFlagI64 = 3, kFlagF32 = 4, kFlagF64 = 5 };

// A read-only [R, C] array seen through element strides; null when the argument is absent.
struct Strided {
  const void* data = nullptr;
  int64_t sr = 0, sc = 0;
  template <typename S>
  FASTPPO_HD S at(int64_t r, int64_t c) const {
    return static_cast<const S*>(data)[r * sr + c * sc];
  }
};

// Bytes per element of a flag type.
FASTPPO_HD int64_t flag_size(int type) {
  switch (type) {
    case kFlagU8: case kFlagI8: return 1;
    case kFlagI32: case kFlagF32: return 4;
    default: return 8;
  }
}

// A flag element is set when nonzero, whatever its type.
template <typename F>
FASTPPO_HD bool flag_set(F x) {
  return x != F(0);
}

// Reads flag element `offset` (in elements) of an array of the given type. The switch is uniform
// across a launch, so it costs a predictable branch, not a divergence.
FASTPPO_HD bool load_flag(const void* base, int type, int64_t offset) {
  switch (type) {
    case kFlagU8: return flag_set(static_cast<const uint8_t*>(base)[offset]);
    case kFlagI8: return flag_set(static_cast<const int8_t*>(base)[offset]);
    case kFlagI32: return flag_set(static_cast<const int32_t*>(base)[offset]);
    case kFlagI64: return flag_set(static_cast<const int64_t*>(base)[offset]);
    case kFlagF32: return flag_set(static_cast<const float*>(base)[offset]);
    default: return flag_set(static_cast<const double*>(base)[offset]);
  }
}

// ---------------------------------------------------------------------------------------------
// Generalized advantage estimation (Schulman et al. 2016), per transition t:
//   delta_t = r_t + gamma * (1 - terminated_t) * V_{t+1} - V_t
//   A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
// A select rather than a multiply by (1 - flag) keeps a terminated step finite even when the
// next value is inf or NaN (it is never used).
//
// No multiply-add here is fused into an FMA, so advantages are bitwise those of the plain loop
// (CleanRL's, the float64 reference's): GCC is told so where the loops are compiled
// (cpu_kernels.inc), clang here, since it fuses per expression where the expression is written.
#if defined(__clang__)
#pragma float_control(push)
#pragma clang fp contract(off)
#endif

template <typename S>
FASTPPO_HD S gae_delta(S reward, S value, S next_value, bool terminated, S gamma) {
  return reward + (terminated ? S(0) : gamma * next_value) - value;
}

// The factor that carries A_{t+1} into A_t: zero where the episode ended at t.
template <typename S>
FASTPPO_HD S gae_decay(bool done, S gamma_lam) {
  return done ? S(0) : gamma_lam;
}

// One step of the backward recursion. Where the episode ended (decay 0) the next advantage is
// not read at all, so a non-finite one beyond the end (padding after a response) cannot leak back.
template <typename S>
FASTPPO_HD S gae_step(S delta, S decay, S next_adv) {
  return decay == S(0) ? delta : delta + decay * next_adv;
}

// A run of steps [t0, t1) acts on the advantage after it as an affine map A_{t0} = a + b * A_{t1}.
// Prepending step t (delta, decay) to a run (a, b) gives (delta + decay * a, decay * b); this is
// what lets a long horizon be cut into chunks that are scanned in parallel and then joined.
template <typename S>
struct AffineMap {
  S a;
  S b;
};

template <typename S>
FASTPPO_HD AffineMap<S> affine_prepend(S delta, S decay, AffineMap<S> run) {
  return AffineMap<S>{gae_step(delta, decay, run.a), decay * run.b};
}

// One environment's trajectory seen through strides (in elements), so that time-major [T, N]
// arrays, batch-major [B, T] views and their transposes are all read in place.
template <typename S>
struct GaeRow {
  const S* rewards; int64_t rewards_stride;
  const S* values; int64_t values_stride;
  const void* dones; int dones_type; int64_t dones_stride;
  const void* terminated; int terminated_type; int64_t terminated_stride;
  S last_value;
  S* adv; S* ret; int64_t out_stride;
  int64_t T;

  FASTPPO_HD S value(int64_t t) const { return values[t * values_stride]; }
  FASTPPO_HD S next_value(int64_t t) const { return t + 1 < T ? value(t + 1) : last_value; }
  FASTPPO_HD S delta(int64_t t, S gamma) const {
    return gae_delta(rewards[t * rewards_stride], value(t), next_value(t),
                     load_flag(terminated, terminated_type, t * terminated_stride), gamma);
  }
  FASTPPO_HD S decay(int64_t t, S gamma_lam) const {
    return gae_decay(load_flag(dones, dones_type, t * dones_stride), gamma_lam);
  }
  // Step t of the backward recursion given A_{t+1}: writes A_t and the return, returns A_t.
  FASTPPO_HD S write_step(int64_t t, S gamma, S gamma_lam, S next_adv) const {
    const S advantage = gae_step(delta(t, gamma), decay(t, gamma_lam), next_adv);
    adv[t * out_stride] = advantage;
    ret[t * out_stride] = advantage + value(t);
    return advantage;
  }
  // Prepends step t to the affine map of the steps after it.
  FASTPPO_HD AffineMap<S> prepend_step(int64_t t, S gamma, S gamma_lam, AffineMap<S> run) const {
    return affine_prepend(delta(t, gamma), decay(t, gamma_lam), run);
  }
};

// The affine map of steps [t0, t1) of a row, without writing anything.
template <typename S>
FASTPPO_HD AffineMap<S> gae_chunk_map(const GaeRow<S>& row, int64_t t0, int64_t t1, S gamma, S gamma_lam) {
  AffineMap<S> run{S(0), S(1)};
  for (int64_t t = t1 - 1; t >= t0; --t) run = row.prepend_step(t, gamma, gamma_lam, run);
  return run;
}

// Writes advantages and returns of steps [t0, t1) given A_{t1} (`carry`); returns A_{t0}.
template <typename S>
FASTPPO_HD S gae_chunk_write(const GaeRow<S>& row, int64_t t0, int64_t t1, S gamma, S gamma_lam, S carry) {
  for (int64_t t = t1 - 1; t >= t0; --t) carry = row.write_step(t, gamma, gamma_lam, carry);
  return carry;
}
#if defined(__clang__)
#pragma float_control(pop)
#endif

// ---------------------------------------------------------------------------------------------
// Clipped PPO loss (Schulman et al. 2017) per element, with the derivatives written next to the
// values. max/min/clamp follow torch's derivative conventions (a tie sends half the gradient to
// each side; clamp passes the gradient on its closed interval), so gradients equal autograd's
// on the eager formula, ties included.

template <typename S>
FASTPPO_HD S clamp(S x, S lo, S hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// exp in the input's own precision on host and device.
FASTPPO_HD float scalar_exp(float x) { return expf(x); }
FASTPPO_HD double scalar_exp(double x) { return exp(x); }
FASTPPO_HD float scalar_log(float x) { return logf(x); }
FASTPPO_HD double scalar_log(double x) { return log(x); }
FASTPPO_HD float scalar_sqrt(float x) { return sqrtf(x); }
FASTPPO_HD double scalar_sqrt(double x) { return sqrt(x); }

// max(a, b) as torch.max: NaN if either is (a clipped term can be 0 * inf or inf - inf).
// Two selects on one compare each: GCC if-converts and vectorizes this, but not a select on
// `a > b || a != a` (nor on the bitwise | of the two), which left the loss loops scalar and 5-8x
// slower. benchmarks/guard.py catches such a loss of speed.
template <typename S>
FASTPPO_HD S max_value(S a, S b) {
  const S larger = a > b ? a : b;  // b when either is NaN
  return a == a ? larger : a;
}

// d max(a, b) given da and db, with torch's tie rule.
template <typename S>
FASTPPO_HD S max_grad(S a, S b, S da, S db) {
  return a > b ? da : (b > a ? db : S(0.5) * (da + db));
}

template <typename S>
struct Term {
  S value;
  S grad;  // derivative of value with respect to the differentiable input
};

// Largest finite value of S: a ratio above it is exp's overflow to +inf.
FASTPPO_HD float finite_max(float) { return 3.402823466e38f; }
FASTPPO_HD double finite_max(double) { return 1.7976931348623157e308; }

// Negated clipped surrogate: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(logratio);
// gradient with respect to the log-ratio. clip_high > clip_low is DAPO's clip-higher; equal, it is
// PPO's symmetric clip. With dual_clip > 1 and A < 0 it is bounded by -dual_clip A.
// An overflowed ratio (exp(logratio) = inf) takes the clipped branch: finite value, zero gradient.
// Written with selects only, so a CPU loop over it vectorizes.
template <typename S>
FASTPPO_HD Term<S> policy_term(S ratio, S adv, S clip_low, S clip_high, S dual_clip) {
  const S lo = S(1) - clip_low, hi = S(1) + clip_high;
  const bool overflow = ratio > finite_max(ratio);
  const S r = overflow ? hi : ratio;
  const S unclipped = -adv * r, clipped = -adv * clamp(r, lo, hi);
  const S d_unclipped = overflow ? S(0) : -adv * r;
  const S d_clipped = (r >= lo && r <= hi) ? d_unclipped : S(0);
  // max(unclipped, clipped) as torch.max, in one select: `clipped` is NaN only where `unclipped` is
  // (a NaN ratio or advantage, or 0 * inf with r = 0 = clamp(r)), and a NaN `unclipped` is kept.
  const S value = clipped > unclipped ? clipped : unclipped;
  const S grad = max_grad(unclipped, clipped, d_unclipped, d_clipped);
  // Dual clip: min(value, bound); the bound has no gradient.
  const S bound = -dual_clip * adv;
  const bool dual = dual_clip > S(0) && adv < S(0);
  return Term<S>{dual && bound < value ? bound : value, dual ? max_grad(-value, -bound, grad, S(0)) : grad};
}

// 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2), or 0.5 * (v - R)^2 unclipped;
// gradient with respect to v.
template <typename S>
FASTPPO_HD Term<S> value_term(S value, S old_value, S ret, bool clip_vloss, S vf_clip) {
  const S err = value - ret;
  const S unclipped = err * err;
  const S step = value - old_value;
  const S clipped_err = old_value + clamp(step, -vf_clip, vf_clip) - ret;
  const S clipped = clipped_err * clipped_err;
  const S d_clipped = (step >= -vf_clip && step <= vf_clip) ? S(2) * clipped_err : S(0);
  const S value_clipped = S(0.5) * max_value(unclipped, clipped);
  const S grad_clipped = S(0.5) * max_grad(unclipped, clipped, S(2) * err, d_clipped);
  return Term<S>{clip_vloss ? value_clipped : S(0.5) * unclipped, clip_vloss ? grad_clipped : err};
}

// KL estimators of the new policy from the old, from log r = new - old (Schulman's k1 and k3).
template <typename S>
FASTPPO_HD S approx_kl_k3(S ratio, S logratio) {
  return (ratio - S(1)) - logratio;
}

// Per-token KL estimators of KL(pi || pi_ref) from one token sampled from pi, with
// d = log pi(x) - log pi_ref(x) (Schulman 2020, "Approximating KL divergence"): k1 = d (unbiased,
// can be negative), k2 = d^2 / 2 (biased, low variance), k3 = (e^-d - 1) + d (unbiased, >= 0).
enum KlEstimator : int { kKlK1 = 0, kKlK2 = 1, kKlK3 = 2 };

// An estimate and its derivative with respect to log pi, given d and e = exp(-d) (read by k3 only:
// the caller's exp, so the CPU loops pass their vectorizable one). With the estimator a constant of
// the caller, the selects fold away.
template <typename S>
FASTPPO_HD Term<S> kl_term(S d, S exp_neg_d, int estimator) {
  if (estimator == kKlK2) return Term<S>{S(0.5) * d * d, d};
  if (estimator == kKlK3) return Term<S>{approx_kl_k3(exp_neg_d, -d), S(1) - exp_neg_d};
  return Term<S>{d, S(1)};
}

template <typename S>
FASTPPO_HD S kl_estimate(S d, int estimator) {
  return kl_term(d, estimator == kKlK3 ? scalar_exp(-d) : S(0), estimator).value;
}

// The estimate clamped to [-clamp, clamp] (clamp <= 0: not clamped); NaN stays NaN.
template <typename S>
FASTPPO_HD S kl_clamped(S kl, S clamp) {
  if (!(clamp > S(0))) return kl;
  return kl > clamp ? clamp : (kl < -clamp ? -clamp : kl);
}

// One token's KL penalty term: the clamped estimate from log pi - log pi_ref, and its reward -beta * kl.
template <typename S>
FASTPPO_HD S kl_token(S logprob, S ref_logprob, int estimator, S clamp) {
  return kl_clamped(kl_estimate(logprob - ref_logprob, estimator), clamp);
}

template <typename S>
FASTPPO_HD S kl_reward(S kl, S beta) {
  return -beta * kl;
}

// Running mean / sum of squared deviations (Welford), merged by Chan et al.'s rule; accumulated
// in double whatever the input type.
struct Moments {
  double count;
  double mean;
  double m2;
};

FASTPPO_HD Moments moments_push(Moments m, double x) {
  m.count += 1.0;
  const double d = x - m.mean;
  m.mean += d / m.count;
  m.m2 += d * (x - m.mean);
  return m;
}

FASTPPO_HD Moments moments_merge(Moments a, Moments b) {
  const double n = a.count + b.count;
  if (n == 0.0) return a;
  const double d = b.mean - a.mean;
  return Moments{n, a.mean + d * (b.count / n), a.m2 + b.m2 + d * d * (a.count * b.count / n)};
}

// Moments' unbiased variance (0 with fewer than two elements) and their population variance
// (1 before any element: running normalization starts as the identity).
FASTPPO_HD double moments_unbiased_var(Moments m) { return m.count >= 2.0 ? m.m2 / (m.count - 1.0) : 0.0; }
FASTPPO_HD double moments_population_var(Moments m) { return m.count > 0.0 ? m.m2 / m.count : 1.0; }

// Advantage normalization (A - mean) / (std + 1e-8) with the unbiased std; with fewer than two
// elements the std is taken as 0 (torch would give NaN), so a lone advantage normalizes to 0.
constexpr double kAdvEps = 1e-8;

FASTPPO_HD double moments_inv_std(Moments m) {
  const double var = moments_unbiased_var(m);
  return 1.0 / (sqrt(var > 0.0 ? var : 0.0) + kAdvEps);
}

// 1 / sqrt(var + eps): the scale of whitening (RLHF) and of running observation / reward
// normalization.
FASTPPO_HD double inv_std_eps(double var, double eps) { return 1.0 / sqrt(var + eps); }

// (x - mean) * inv_std, plus `shift` (the mean again when only the scale is to change).
template <typename S>
FASTPPO_HD S whiten(S x, S mean, S inv_std, S shift) {
  return (x - mean) * inv_std + shift;
}

// ---------------------------------------------------------------------------------------------
// Categorical policy head over logits x (softmax p = exp(x - lse)), streamed through once.
// Running state of the online softmax (Milakov & Gimelshein 2018), extended with t = sum e^(x-m) x
// for the entropy: lse = m + log s, H = lse - t / s. A logit of -inf (a masked action) adds
// nothing (e^(x - m) = 0), so a row may mix -inf with finite logits. A row without a distribution
// comes out as torch.log_softmax gives it: a NaN logit makes s NaN, a +inf one too (e^(x - m) at
// x = m = +inf is e^NaN), and a row of only -inf leaves s = 0; each gives lse = NaN, so the row's
// log-probs, entropy and (p = e^(x - NaN)) gradients are NaN.

template <typename S>
struct SoftmaxState {
  S m;  // running max (-inf before the first logit above -inf)
  S s;  // sum of e^(x - m): 0 while every logit is -inf, NaN once one is NaN or +inf
  S t;  // sum of e^(x - m) * x over the logits with e^(x - m) > 0
};

template <typename S>
FASTPPO_HD SoftmaxState<S> softmax_empty() {
  return SoftmaxState<S>{S(-INFINITY), S(0), S(0)};
}

// Merges two states. An empty one (s = 0) changes nothing; a NaN one makes the result NaN.
template <typename S>
FASTPPO_HD SoftmaxState<S> softmax_merge(SoftmaxState<S> a, SoftmaxState<S> b) {
  if (b.s == S(0)) return a;
  if (a.s == S(0)) return b;
  const S m = a.m > b.m ? a.m : b.m;
  const S ea = scalar_exp(a.m - m), eb = scalar_exp(b.m - m);
  return SoftmaxState<S>{m, a.s * ea + b.s * eb, a.t * ea + b.t * eb};
}

// Adds one logit: softmax_merge with the state {x, e^(x - x), x}, e^(x - x) written as (x - x) + 1:
// 1 for a finite x, NaN for NaN and +inf as the exp would give. -inf adds nothing. Written out so
// that it takes one exp, not the merge's two (one of which is e^0 = 1): the same values.
template <typename S>
FASTPPO_HD SoftmaxState<S> softmax_push(SoftmaxState<S> state, S x) {
  if (x == S(-INFINITY)) return state;
  const S one = (x - x) + S(1);
  if (state.s == S(0)) return SoftmaxState<S>{x, one, x};
  if (x > state.m) {  // a new max: the sums so far are rescaled
    const S e = scalar_exp(state.m - x);
    return SoftmaxState<S>{x, state.s * e + one, state.t * e + x};
  }
  const S e = scalar_exp(x - state.m);  // NaN for a NaN x, and for +inf after +inf
  return SoftmaxState<S>{state.m, state.s + e, state.t + e * x};
}

// NaN where s is 0 or NaN (see above), where a log-sum-exp would give -inf for a row of only -inf.
template <typename S>
FASTPPO_HD S softmax_lse(SoftmaxState<S> st) {
  return st.s > S(0) ? st.m + scalar_log(st.s) : S(NAN);
}

template <typename S>
FASTPPO_HD S softmax_entropy(SoftmaxState<S> st) {
  return softmax_lse(st) - st.t / st.s;
}

// d/dx_j of (g_logprob * log p_a + g_entropy * H) without the action's own term, given
// p_j = exp(x_j - lse) (softmax_prob) and lse, H of the row:
//   -g_logprob * p_j - g_entropy * p_j * (x_j - lse + H);   the action a adds + g_logprob.
// The entropy term of a -inf logit is exactly 0 (p = 0, not 0 * inf). In a row without a
// distribution p is NaN at every logit, and -g_logprob * p makes each gradient NaN. The select is on
// x, not on p: GCC merges a select on p with vexp's own selects into a longer loop.
template <typename S>
FASTPPO_HD S categorical_grad(S x, S p, S lse, S entropy, S g_logprob, S g_entropy) {
  const bool live = x > -finite_max(x);
  const S d_entropy = live ? -p * (x - lse + entropy) : S(0);
  return -g_logprob * p + g_entropy * d_entropy;
}

// Gumbel-max sampling: argmax_j (x_j - log(-log u_j)) over uniform u in (0, 1) is a sample of
// softmax(x). u = 0 (torch.rand can return it) is taken as the smallest positive value; a -inf
// logit is never chosen unless every logit of the row is -inf.
template <typename S>
FASTPPO_HD S gumbel_score(S x, S u) {
  const S tiny = sizeof(S) == 4 ? S(1.17549435e-38f) : S(2.2250738585072014e-308);
  return x - scalar_log(-scalar_log(u > tiny ? u : tiny));
}

// Whether `score` replaces `best`, the largest so far, in an argmax that picks as torch.argmax
// does: the first NaN, else the first largest (index 0 when every score is -inf). A row without a
// distribution so still yields an index in range.
template <typename S>
FASTPPO_HD bool argmax_takes(S score, S best) {
  return best == best && !(score <= best);
}

// exp as a function object, for the element functions that take the caller's exp.
struct ScalarExp {
  template <typename S>
  FASTPPO_HD S operator()(S x) const {
    return scalar_exp(x);
  }
};

// log p_a of the action's logit x_a (unscaled) at temperature 1 / inv_temperature.
template <typename S>
FASTPPO_HD S categorical_logprob(S x_a, S inv_temperature, S lse) {
  return x_a * inv_temperature - lse;
}

// p_j = exp(x_j - lse) with the given exp (which must give exp(-inf) = 0 and exp(NaN) = NaN): 0
// for a -inf logit where lse is finite; NaN wherever lse is NaN.
template <typename S, typename Exp>
FASTPPO_HD S softmax_prob(S x, S lse, Exp exp_fn) {
  return exp_fn(x - lse);
}

// ---------------------------------------------------------------------------------------------
// Diagonal Gaussian head, one dimension: log N(a; mu, sigma) and the entropy, sigma = exp(log_std).

constexpr double kHalfLog2Pi = 0.91893853320467274178;

// 1 / sigma^2 = exp(-2 log_std), with the caller's exp (the CPU loops pass their vectorizable one).
template <typename S, typename Exp = ScalarExp>
FASTPPO_HD S normal_inv_var(S log_std, Exp exp_fn = Exp{}) {
  return exp_fn(S(-2) * log_std);
}

template <typename S>
FASTPPO_HD S normal_logprob(S action, S mean, S log_std, S inv_var) {
  const S z = action - mean;
  return -S(0.5) * z * z * inv_var - log_std - S(kHalfLog2Pi);
}

template <typename S>
FASTPPO_HD S normal_entropy(S log_std) {
  return S(0.5) + S(kHalfLog2Pi) + log_std;
}

// Gradients of g_logprob * logprob + g_entropy * entropy: w.r.t. mean, and w.r.t. log_std.
template <typename S>
FASTPPO_HD S normal_grad_mean(S action, S mean, S inv_var, S g_logprob) {
  return g_logprob * (action - mean) * inv_var;
}

template <typename S>
FASTPPO_HD S normal_grad_log_std(S action, S mean, S inv_var, S g_logprob, S g_entropy) {
  const S z = action - mean;
  return g_logprob * (z * z * inv_var - S(1)) + g_entropy;
}

// ---------------------------------------------------------------------------------------------
// Tanh-squashed diagonal Gaussian, one dimension: the action is a = tanh(u) with u ~ N(mu, sigma),
// so log p(a) = log N(u; mu, sigma) - log(1 - tanh(u)^2).

constexpr double kLog2 = 0.69314718055994530942;

FASTPPO_HD float scalar_log1p(float x) { return log1pf(x); }
FASTPPO_HD double scalar_log1p(double x) { return log1p(x); }
FASTPPO_HD float scalar_atanh(float x) { return atanhf(x); }
FASTPPO_HD double scalar_atanh(double x) { return atanh(x); }

// log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) with softplus(z) = max(z, 0) + log1p(e^-|z|):
// finite for every finite u, where 1 - tanh(u)^2 itself rounds to 0 from |u| ~ 9 (float32) on.
template <typename S>
FASTPPO_HD S tanh_log_det(S u) {
  const S z = S(-2) * u;
  const S softplus = (z > S(0) ? z : S(0)) + scalar_log1p(scalar_exp(z > S(0) ? -z : z));
  return S(2) * (S(kLog2) - u - softplus);
}

// u = atanh(a) of an action given after the squash, a clamped to [-1 + eps, 1 - eps] with eps the
// machine epsilon of S (as SB3's TanhBijector), so that a = +-1 (tanh of a large u, rounded) gives
// a finite u: |u| <= 8.32 in float32, 18.37 in float64. NaN stays NaN.
template <typename S>
FASTPPO_HD S tanh_inverse(S a) {
  const S eps = sizeof(S) == 4 ? S(1.1920928955078125e-07) : S(2.220446049250313e-16);
  return scalar_atanh(clamp(a, S(-1) + eps, S(1) - eps));
}

// ---------------------------------------------------------------------------------------------
// Fused actor-critic MLP: hidden activations (written from the layer's output y, as backward
// needs them) and the Adam step after a global grad-norm clip.

enum Activation : int { kActTanh = 0, kActRelu = 1 };

// d act / d pre-activation, from the activation's output y: tanh' = 1 - y^2, relu' = [y > 0].
template <typename S>
FASTPPO_HD S activation_grad_from_output(S y, int act) {
  return act == kActRelu ? (y > S(0) ? S(1) : S(0)) : S(1) - y * y;
}

// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)).
FASTPPO_HD double grad_clip_factor(double norm, double max_norm) {
  const double f = max_norm / (norm + 1e-6);
  return f < 1.0 ? f : 1.0;
}

// The per-step scalars of Adam (Kingma & Ba 2015) as torch.optim.Adam computes them at step t >= 1.
struct AdamStep {
  double lr, beta1, beta2, eps;
  double step_size;            // lr / (1 - beta1^t)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

// One parameter: moments updated in place, returns the new parameter value.
template <typename S>
FASTPPO_HD S adam_update(S param, S grad, S* exp_avg, S* exp_avg_sq, const AdamStep& a) {
  const S m = *exp_avg + (grad - *exp_avg) * S(1.0 - a.beta1);
  const S v = *exp_avg_sq * S(a.beta2) + S(1.0 - a.beta2) * grad * grad;
  *exp_avg = m;
  *exp_avg_sq = v;
  const S denom = scalar_sqrt(v) / S(a.bias_correction2_sqrt) + S(a.eps);
  return param - S(a.step_size) * m / denom;
}

}  // namespace fastppo
