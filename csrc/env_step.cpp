// One environment step's bookkeeping (see env_step.h). Plain loops: N is a few to a few thousand
// environments, and the obs normalization is a streaming pass over [N, obs_dim].
#include "env_step.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastppo_math.h"

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

Moments running(const RunningStats& s, int64_t d) { return Moments{*s.count, s.mean[d], s.m2[d]}; }

// Merges a batch's moments into feature d of the running stats (their shared count is advanced
// by the caller once all features are merged).
void merge(const RunningStats& s, int64_t d, Moments batch) {
  const Moments total = moments_merge(running(s, d), batch);
  s.mean[d] = total.mean;
  s.m2[d] = total.m2;
}

double inv_std(const RunningStats& s, int64_t d, double eps) {
  return inv_std_eps(moments_population_var(running(s, d)), eps);
}

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
      const RunningStats& target = a.defer_stats ? a.obs_pending : a.obs_stats;
      for (int64_t d = 0; d < D; ++d) {
        Moments batch{0.0, 0.0, 0.0};
        for (int64_t i = 0; i < a.N; ++i) batch = moments_push(batch, load_obs(a, i * D + d));
        merge(target, d, batch);
      }
      *target.count += static_cast<double>(a.N);
    }
    std::vector<double> scale(D);
    for (int64_t d = 0; d < D; ++d) scale[d] = inv_std(a.obs_stats, d, a.eps);
    float* out = static_cast<float*>(a.obs_out);
    for (int64_t i = 0; i < a.N; ++i)
      for (int64_t d = 0; d < D; ++d) {
        const double z = whiten(load_obs(a, i * D + d), a.obs_stats.mean[d], scale[d], 0.0);
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
    Moments batch{0.0, 0.0, 0.0};
    for (int64_t i = 0; i < a.N; ++i) {
      if (!a.real_out[i]) continue;
      const int64_t e = a.env_ids ? a.env_ids[i] : i;
      a.discounted_return[e] = a.discounted_return[e] * a.gamma + load(a.reward, a.reward_f64, i);
      batch = moments_push(batch, a.discounted_return[e]);
    }
    if (a.update_stats) {
      const RunningStats& target = a.defer_stats ? a.return_pending : a.return_stats;
      merge(target, 0, batch);
      *target.count += batch.count;
    }
    const double scale = inv_std(a.return_stats, 0, a.eps);
    for (int64_t i = 0; i < a.N; ++i) {
      const double r = load(a.reward, a.reward_f64, i) * scale;
      a.reward_out[i] = static_cast<float>(std::clamp(r, -a.clip, a.clip));
      if (a.done_out[i]) a.discounted_return[a.env_ids ? a.env_ids[i] : i] = 0.0;
    }
  } else {
    for (int64_t i = 0; i < a.N; ++i) a.reward_out[i] = static_cast<float>(load(a.reward, a.reward_f64, i));
  }
  return finished;
}

}  // namespace fastppo
