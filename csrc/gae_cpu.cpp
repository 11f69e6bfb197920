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

// Time-major layout (environments adjacent in memory): sweep t backwards and, at each t, walk a
// contiguous range of environments, so every load streams through memory in order.
template <typename S>
void gae_env_inner(const GaeArgs& a, int64_t n0, int64_t n1) {
  const S* R = static_cast<const S*>(a.rewards);
  const S* V = static_cast<const S*>(a.values);
  const S* L = static_cast<const S*>(a.last_value);
  S* adv = static_cast<S*>(a.adv);
  S* ret = static_cast<S*>(a.ret);
  const S gamma = S(a.gamma), gamma_lam = S(a.gamma * a.lam);
  for (int64_t t = a.T - 1; t >= 0; --t) {
    const bool last_step = t + 1 == a.T;
    S* adv_t = adv + t * a.N;
    S* ret_t = ret + t * a.N;
    for (int64_t n = n0; n < n1; ++n) {
      const S value = V[t * a.values_st + n * a.values_sn];
      const S next_value = last_step ? L[n * a.last_value_sn] : V[(t + 1) * a.values_st + n * a.values_sn];
      const bool term = load_flag(a.terminated, a.terminated_type, t * a.terminated_st + n * a.terminated_sn);
      const bool done = load_flag(a.dones, a.dones_type, t * a.dones_st + n * a.dones_sn);
      const S delta = gae_delta(R[t * a.rewards_st + n * a.rewards_sn], value, next_value, term, gamma);
      const S next_adv = last_step ? S(0) : adv_t[a.N + n];
      const S advantage = gae_step(delta, gae_decay(done, gamma_lam), next_adv);
      adv_t[n] = advantage;
      ret_t[n] = advantage + value;
    }
  }
}

template <typename S>
void gae_cpu_typed(const GaeArgs& a) {
  const int threads = omp_get_max_threads();
  const int64_t elements = a.T * a.N;
  const S gamma = S(a.gamma), gamma_lam = S(a.gamma * a.lam);

  if (threads > 1 && a.T >= kChunkedHorizon && a.N < threads) {
    // Few long rollouts: each row's horizon is cut into `chunks` pieces. Pass 1 computes each
    // piece's affine map in parallel, a short serial pass joins them into the advantage entering
    // each piece, and pass 2 writes the pieces in parallel.
    const int64_t chunks = threads;
    const int64_t len = (a.T + chunks - 1) / chunks;
    std::vector<AffineMap<S>> maps(a.N * chunks);
    std::vector<S> carry(a.N * chunks);
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < a.N * chunks; ++k) {
      const int64_t n = k / chunks, t0 = std::min(a.T, (k % chunks) * len);
      maps[k] = gae_chunk_map(gae_row<S>(a, n), t0, std::min(a.T, t0 + len), gamma, gamma_lam);
    }
    for (int64_t n = 0; n < a.N; ++n) {
      S next = S(0);
      for (int64_t c = chunks - 1; c >= 0; --c) {
        carry[n * chunks + c] = next;
        next = gae_step(maps[n * chunks + c].a, maps[n * chunks + c].b, next);
      }
    }
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < a.N * chunks; ++k) {
      const int64_t n = k / chunks, t0 = std::min(a.T, (k % chunks) * len);
      gae_chunk_write(gae_row<S>(a, n), t0, std::min(a.T, t0 + len), gamma, gamma_lam, carry[k]);
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
    gae_env_inner<S>(a, n0, n1);
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
