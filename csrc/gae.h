// GAE over a [T, N] problem described by raw pointers and element strides; CPU and CUDA launchers.
#pragma once

#include <cstdint>

#include "fastppo_math.h"

namespace fastppo {

// What the bindings hand to a launcher. Inputs are read in place through their strides (in
// elements, any sign); the outputs are the caller's freshly allocated contiguous [T, N] arrays.
struct GaeArgs {
  int64_t T = 0, N = 0;
  bool is_f64 = false;  // float64 when true, float32 otherwise
  const void* rewards = nullptr; int64_t rewards_st = 0, rewards_sn = 0;
  const void* values = nullptr; int64_t values_st = 0, values_sn = 0;
  const void* dones = nullptr; int dones_type = kFlagU8; int64_t dones_st = 0, dones_sn = 0;
  const void* terminated = nullptr; int terminated_type = kFlagU8; int64_t terminated_st = 0, terminated_sn = 0;
  const void* last_value = nullptr; int64_t last_value_sn = 0;
  void* adv = nullptr;
  void* ret = nullptr;
  double gamma = 0.99, lam = 0.95;
};

// Environment n of the problem as a GaeRow.
template <typename S>
FASTPPO_HD GaeRow<S> gae_row(const GaeArgs& a, int64_t n) {
  const S* rewards = static_cast<const S*>(a.rewards) + n * a.rewards_sn;
  const S* values = static_cast<const S*>(a.values) + n * a.values_sn;
  const S last = static_cast<const S*>(a.last_value)[n * a.last_value_sn];
  const auto* dones = static_cast<const char*>(a.dones);
  const auto* terminated = static_cast<const char*>(a.terminated);
  const int64_t dones_bytes = n * a.dones_sn * flag_size(a.dones_type);
  const int64_t terminated_bytes = n * a.terminated_sn * flag_size(a.terminated_type);
  return GaeRow<S>{rewards, a.rewards_st, values, a.values_st,
                   dones + dones_bytes, a.dones_type, a.dones_st,
                   terminated + terminated_bytes, a.terminated_type, a.terminated_st,
                   last, static_cast<S*>(a.adv) + n, static_cast<S*>(a.ret) + n, a.N, a.T};
}

void gae_cpu(const GaeArgs& args);
// Runs on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream) of `device`.
void gae_cuda(const GaeArgs& args, int device, std::uintptr_t stream);

}  // namespace fastppo
