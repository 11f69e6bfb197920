// One environment step's bookkeeping (see env_step.h). Plain loops: N is a few to a few thousand
// environments, and the obs normalization is a streaming pass over [N, obs_dim].
#include "env_step.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastppo {
namespace {

double load(const void* p, bool f64, int64_t i) {
  return f64 ? static_cast<const double*>(p)[i] : static_cast<const float*>(p)[i];
}

double load_obs(const EnvStepArgs& a, int64_t i) {
  switch (a.obs_type) {
    case 1: return static_cast<const double*>(a.obs)[i];
    case 2: return static_cast<const uint8_t*>(a.obs)[i];
    default: return static_cast<const float*>(a.obs)[i];
  }
}

// Merges the moments of a batch (count n, mean, m2) into running stats (Chan et al.).
void merge(const RunningStats& s, int64_t d, double n, double mean, double m2) {
  if (n == 0.0) return;
  const double count = *s.count, total = count + n, delta = mean - s.mean[d];
  s.mean[d] += delta * n / total;
  s.m2[d] += m2 + delta * delta * count * n / total;
}

double variance(const RunningStats& s, int64_t d) { return *s.count > 0.0 ? s.m2[d] / *s.count : 1.0; }

}  // namespace

int64_t env_step(const EnvStepArgs& a) {
  // Auto-reset mask and episode bookkeeping.
  int64_t finished = 0;
  for (int64_t i = 0; i < a.N; ++i) {
    const int64_t e = a.env_ids ? a.env_ids[i] : i;
    const bool real = !a.previous_done[e];
    const bool done = a.terminated[i] || a.truncated[i];
    a.previous_done[e] = done;
    a.real_out[i] = real;
    a.done_out[i] = done;
    a.terminated_out[i] = a.terminated[i] != 0;
    if (real) {
      a.episode_return[e] += load(a.episode_reward, a.episode_reward_f64, i);
      a.episode_length[e] += 1;
    }
    const bool over = a.episode_over ? a.episode_over[i] != 0 : done;
    a.finished[i] = over;
    if (over) {
      a.finished_return[i] = a.episode_return[e];
      a.finished_length[i] = a.episode_length[e];
      a.episode_return[e] = 0.0;
      a.episode_length[e] = 0;
      ++finished;
    }
  }

  // Observations: update the running moments with this batch, then normalize and clip.
  const int64_t D = a.obs_dim;
  if (a.normalize_obs) {
    if (a.update_stats && a.N > 0) {
      for (int64_t d = 0; d < D; ++d) {
        double mean = 0.0, m2 = 0.0;
        for (int64_t i = 0; i < a.N; ++i) mean += load_obs(a, i * D + d);
        mean /= static_cast<double>(a.N);
        for (int64_t i = 0; i < a.N; ++i) m2 += (load_obs(a, i * D + d) - mean) * (load_obs(a, i * D + d) - mean);
        merge(a.obs_stats, d, static_cast<double>(a.N), mean, m2);
      }
      *a.obs_stats.count += static_cast<double>(a.N);
    }
    std::vector<double> inv_std(D);
    for (int64_t d = 0; d < D; ++d) inv_std[d] = 1.0 / std::sqrt(variance(a.obs_stats, d) + a.eps);
    float* out = static_cast<float*>(a.obs_out);
    for (int64_t i = 0; i < a.N; ++i)
      for (int64_t d = 0; d < D; ++d) {
        const double z = (load_obs(a, i * D + d) - a.obs_stats.mean[d]) * inv_std[d];
        out[i * D + d] = static_cast<float>(std::clamp(z, -a.clip, a.clip));
      }
  } else if (a.obs_out_type == 2) {
    const auto* in = static_cast<const uint8_t*>(a.obs);
    std::copy(in, in + a.N * D, static_cast<uint8_t*>(a.obs_out));
  } else {
    float* out = static_cast<float*>(a.obs_out);
    for (int64_t i = 0; i < a.N * D; ++i) out[i] = static_cast<float>(load_obs(a, i));
  }

  // Rewards: scaled by the running std of the discounted return over real steps, clipped.
  if (a.normalize_reward) {
    double count = 0.0, mean = 0.0, m2 = 0.0;
    for (int64_t i = 0; i < a.N; ++i) {
      if (!a.real_out[i]) continue;
      const int64_t e = a.env_ids ? a.env_ids[i] : i;
      a.discounted_return[e] = a.discounted_return[e] * a.gamma + load(a.reward, a.reward_f64, i);
      count += 1.0;
      const double delta = a.discounted_return[e] - mean;  // Welford over this batch
      mean += delta / count;
      m2 += delta * (a.discounted_return[e] - mean);
    }
    if (a.update_stats) {
      merge(a.return_stats, 0, count, mean, m2);
      *a.return_stats.count += count;
    }
    const double inv_std = 1.0 / std::sqrt(variance(a.return_stats, 0) + a.eps);
    for (int64_t i = 0; i < a.N; ++i) {
      const double r = load(a.reward, a.reward_f64, i) * inv_std;
      a.reward_out[i] = static_cast<float>(std::clamp(r, -a.clip, a.clip));
      if (a.done_out[i]) a.discounted_return[a.env_ids ? a.env_ids[i] : i] = 0.0;
    }
  } else {
    for (int64_t i = 0; i < a.N; ++i) a.reward_out[i] = static_cast<float>(load(a.reward, a.reward_f64, i));
  }
  return finished;
}

}  // namespace fastppo
