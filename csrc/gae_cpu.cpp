// GAE on the CPU: OpenMP across environments, or across chunks of the horizon when there are
// fewer environments than threads. The per-step math is in fastppo_math.h.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "gae.h"

namespace fastppo {
namespace {

// Below this many elements the whole problem is done on the calling thread: a parallel region
// costs more than the work.
constexpr int64_t kParallelElements = 1 << 15;
// A horizon at least this long, with fewer environments than threads, is split into chunks.
constexpr int64_t kChunkedHorizon = 2048;
// Chunks each thread of the chunked scan walks in lockstep.
constexpr int kLanes = 8;

// Calls f(F{}) with F the C++ type of a flag array, so loops over flags compile per type.
template <typename Fn>
void with_flag_type(int type, Fn&& f) {
  switch (type) {
    case kFlagU8: f(uint8_t{}); break;
    case kFlagI8: f(int8_t{}); break;
    case kFlagI32: f(int32_t{}); break;
    case kFlagI64: f(int64_t{}); break;
    case kFlagF32: f(float{}); break;
    default: f(double{}); break;
  }
}

// Time-major layout (environments adjacent in memory): sweep t backwards and, at each t, walk a
// contiguous range of environments [n0, n1), so every load streams through memory in order and
// the inner loop vectorizes. kUnit: every input is contiguous along N (the common case), which
// lets the compiler drop the strides. The last step, which reads `last_value`, goes through the
// generic row code.
template <typename S, typename D, typename M, bool kUnit>
void gae_env_inner(const GaeArgs& a, int64_t n0, int64_t n1) {
  const S gamma = S(a.gamma), gamma_lam = S(a.gamma * a.lam);
  for (int64_t n = n0; n < n1; ++n) gae_chunk_write(gae_row<S>(a, n), a.T - 1, a.T, gamma, gamma_lam, S(0));
  const int64_t rs = kUnit ? 1 : a.rewards_sn, vs = kUnit ? 1 : a.values_sn;
  const int64_t ds = kUnit ? 1 : a.dones_sn, ms = kUnit ? 1 : a.terminated_sn;
  for (int64_t t = a.T - 2; t >= 0; --t) {
    const S* __restrict__ r = static_cast<const S*>(a.rewards) + t * a.rewards_st;
    const S* __restrict__ v = static_cast<const S*>(a.values) + t * a.values_st;
    const S* __restrict__ v_next = v + a.values_st;
    const D* __restrict__ d = static_cast<const D*>(a.dones) + t * a.dones_st;
    const M* __restrict__ m = static_cast<const M*>(a.terminated) + t * a.terminated_st;
    S* __restrict__ adv = static_cast<S*>(a.adv) + t * a.N;
    const S* __restrict__ adv_next = adv + a.N;
    S* __restrict__ ret = static_cast<S*>(a.ret) + t * a.N;
#pragma omp simd
    for (int64_t n = n0; n < n1; ++n) {
      const S value = v[n * vs];
      const S delta = gae_delta(r[n * rs], value, v_next[n * vs], flag_set(m[n * ms]), gamma);
      const S advantage = gae_step(delta, gae_decay(flag_set(d[n * ds]), gamma_lam), adv_next[n]);
      adv[n] = advantage;
      ret[n] = advantage + value;
    }
  }
}

template <typename S>
void gae_env_inner_dispatch(const GaeArgs& a, int64_t n0, int64_t n1) {
  const bool unit = a.rewards_sn == 1 && a.values_sn == 1 && a.dones_sn == 1 && a.terminated_sn == 1;
  with_flag_type(a.dones_type, [&](auto dones_tag) {
    with_flag_type(a.terminated_type, [&](auto terminated_tag) {
      using D = decltype(dones_tag);
      using M = decltype(terminated_tag);
      if (unit) {
        gae_env_inner<S, D, M, true>(a, n0, n1);
      } else {
        gae_env_inner<S, D, M, false>(a, n0, n1);
      }
    });
  });
}

template <typename S>
void gae_cpu_typed(const GaeArgs& a) {
  const int threads = omp_get_max_threads();
  const int64_t elements = a.T * a.N;
  const S gamma = S(a.gamma), gamma_lam = S(a.gamma * a.lam);

  if (a.T >= kChunkedHorizon && a.N < threads) {
    // Few long rollouts: each row's horizon is cut into chunks. Pass 1 computes each chunk's
    // affine map, a short serial pass joins them into the advantage entering each chunk, and
    // pass 2 writes the chunks. Each thread walks kLanes chunks in lockstep, so even one thread
    // overlaps kLanes independent recurrences instead of waiting on one long dependency chain.
    const int64_t groups = elements >= kParallelElements ? threads : 1;
    const int64_t chunks = groups * kLanes;
    const int64_t len = (a.T + chunks - 1) / chunks;
    std::vector<AffineMap<S>> maps(a.N * chunks, AffineMap<S>{S(0), S(1)});
    std::vector<S> carry(a.N * chunks);
#pragma omp parallel for schedule(static) if (groups > 1)
    for (int64_t g = 0; g < a.N * groups; ++g) {
      const GaeRow<S> row = gae_row<S>(a, g / groups);
      AffineMap<S>* lane_maps = maps.data() + g * kLanes;
      const int64_t first = (g % groups) * kLanes * len;
      for (int64_t j = len - 1; j >= 0; --j)
        for (int lane = 0; lane < kLanes; ++lane) {
          const int64_t t = first + lane * len + j;
          if (t < a.T) lane_maps[lane] = row.prepend_step(t, gamma, gamma_lam, lane_maps[lane]);
        }
    }
    for (int64_t n = 0; n < a.N; ++n) {
      S next = S(0);
      for (int64_t c = chunks - 1; c >= 0; --c) {
        carry[n * chunks + c] = next;
        next = gae_step(maps[n * chunks + c].a, maps[n * chunks + c].b, next);
      }
    }
#pragma omp parallel for schedule(static) if (groups > 1)
    for (int64_t g = 0; g < a.N * groups; ++g) {
      const GaeRow<S> row = gae_row<S>(a, g / groups);
      S* lane_carry = carry.data() + g * kLanes;
      const int64_t first = (g % groups) * kLanes * len;
      for (int64_t j = len - 1; j >= 0; --j)
        for (int lane = 0; lane < kLanes; ++lane) {
          const int64_t t = first + lane * len + j;
          if (t < a.T) lane_carry[lane] = row.write_step(t, gamma, gamma_lam, lane_carry[lane]);
        }
    }
    return;
  }

  if (a.rewards_st < a.rewards_sn || a.N == 1) {
    // Batch-major memory (each row's steps adjacent, e.g. a transposed [B, T] view): one row per
    // iteration, each read front to back.
#pragma omp parallel for schedule(static) if (elements >= kParallelElements)
    for (int64_t n = 0; n < a.N; ++n) gae_chunk_write(gae_row<S>(a, n), 0, a.T, gamma, gamma_lam, S(0));
    return;
  }

  // Time-major memory: each thread owns a contiguous range of environments.
#pragma omp parallel if (elements >= kParallelElements)
  {
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
    const int64_t n0 = a.N * part / parts, n1 = a.N * (part + 1) / parts;
    gae_env_inner_dispatch<S>(a, n0, n1);
  }
}

}  // namespace

void gae_cpu(const GaeArgs& args) {
  if (args.T == 0 || args.N == 0) return;
  if (args.is_f64) {
    gae_cpu_typed<double>(args);
  } else {
    gae_cpu_typed<float>(args);
  }
}

}  // namespace fastppo
