// The per-step work between a batched environment and the policy, in one call: the auto-reset
// mask, per-env episode return and length, observation normalization (running mean / variance,
// clipped), reward scaling by the running std of the discounted return (clipped), and writing the
// step into the rollout storage. Host memory only (EnvPool's outputs live there); the caller moves
// the written slot to a GPU when the storage lives on one.
#pragma once

#include <cstdint>

namespace fastppo {

// Running count, mean and sum of squared deviations per feature, float64 (Welford / Chan).
struct RunningStats {
  double* count;  // [1]
  double* mean;   // [dim]
  double* m2;     // [dim]
  int64_t dim;
};

struct EnvStepArgs {
  int64_t N = 0, obs_dim = 0;  // N: the environments in this step's batch
  // Which environment each batch position is (EnvPool's async mode hands back a subset in any
  // order); null: position i is environment i. The per-env state below is indexed by environment.
  const int32_t* env_ids = nullptr;
  // Inputs from the environment for this step.
  const void* obs = nullptr; int obs_type = 0;  // 0 float32, 1 float64, 2 uint8
  const void* reward = nullptr; bool reward_f64 = false;
  const uint8_t* terminated = nullptr;
  const uint8_t* truncated = nullptr;
  const void* episode_reward = nullptr; bool episode_reward_f64 = false;  // what episode returns sum (Atari: unclipped)
  const uint8_t* episode_over = nullptr;  // null: an episode ends when terminated or truncated
  // Settings.
  bool normalize_obs = false, normalize_reward = false, update_stats = true;
  double gamma = 0.99, clip = 10.0, eps = 1e-8;
  // State, updated in place. With defer_stats each step's moments go to the pending stats instead,
  // and normalization keeps using the running ones until the caller merges the pending moments in
  // (data-parallel training merges every rank's at the end of a rollout, so all ranks normalize
  // identically).
  RunningStats obs_stats{}, return_stats{};
  bool defer_stats = false;
  RunningStats obs_pending{}, return_pending{};
  double* discounted_return = nullptr;  // [N]
  double* episode_return = nullptr;     // [N]
  int64_t* episode_length = nullptr;    // [N]
  uint8_t* previous_done = nullptr;     // [N]: the env ended an episode at the previous step
  // Outputs: this step's slot of the rollout storage, and the episodes that ended.
  void* obs_out = nullptr; int obs_out_type = 0;  // 0 float32, 2 uint8 (a copy; no normalization)
  float* reward_out = nullptr;   // [N]
  uint8_t* done_out = nullptr;   // [N] terminated or truncated
  uint8_t* terminated_out = nullptr;
  uint8_t* real_out = nullptr;   // [N] false for the dummy step after an episode ended
  double* finished_return = nullptr;   // [N], valid where finished
  int64_t* finished_length = nullptr;  // [N]
  uint8_t* finished = nullptr;         // [N]
};

// Returns the number of episodes that ended at this step.
int64_t env_step(const EnvStepArgs& args);

}  // namespace fastppo
