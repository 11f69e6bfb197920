// The per-element math of fastppo, written once and called by the CPU loops and the CUDA kernels.
// Every function here is a small inline host+device function of scalars: no memory layout, no threads.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTPPO_HD __host__ __device__ __forceinline__
#else
#define FASTPPO_HD inline
#endif

namespace fastppo {

// Element types of the 0/1 flag arrays (`dones`, `terminated`). bool is stored as one byte.
enum FlagType : int { kFlagU8 = 0, kFlagI8 = 1, kFlagI32 = 2, kFlagI64 = 3, kFlagF32 = 4, kFlagF64 = 5 };

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

template <typename S>
FASTPPO_HD S gae_delta(S reward, S value, S next_value, bool terminated, S gamma) {
  return reward + (terminated ? S(0) : gamma * next_value) - value;
}

// The factor that carries A_{t+1} into A_t: zero where the episode ended at t.
template <typename S>
FASTPPO_HD S gae_decay(bool done, S gamma_lam) {
  return done ? S(0) : gamma_lam;
}

// One step of the backward recursion.
template <typename S>
FASTPPO_HD S gae_step(S delta, S decay, S next_adv) {
  return delta + decay * next_adv;
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
};

// The affine map of steps [t0, t1) of a row, without writing anything.
template <typename S>
FASTPPO_HD AffineMap<S> gae_chunk_map(const GaeRow<S>& row, int64_t t0, int64_t t1, S gamma, S gamma_lam) {
  AffineMap<S> run{S(0), S(1)};
  for (int64_t t = t1 - 1; t >= t0; --t) run = affine_prepend(row.delta(t, gamma), row.decay(t, gamma_lam), run);
  return run;
}

// Writes advantages and returns of steps [t0, t1) given A_{t1} (`carry`); returns A_{t0}.
template <typename S>
FASTPPO_HD S gae_chunk_write(const GaeRow<S>& row, int64_t t0, int64_t t1, S gamma, S gamma_lam, S carry) {
  for (int64_t t = t1 - 1; t >= t0; --t) {
    carry = gae_step(row.delta(t, gamma), row.decay(t, gamma_lam), carry);
    row.adv[t * row.out_stride] = carry;
    row.ret[t * row.out_stride] = carry + row.value(t);
  }
  return carry;
}

}  // namespace fastppo
