// The fused PPO loss on the CPU: chunks in parallel with OpenMP, each chunk's sums in its own slot.
// The per-element math is in ppo_loss.h / fastppo_math.h, shared with CUDA.
#include <omp.h>

#include "ppo_loss.h"

namespace fastppo {
namespace {

// Below this many elements the work stays on the calling thread.
constexpr int64_t kParallelElements = 1 << 14;

template <typename S>
void ppo_loss_cpu_typed(const PpoLossArgs& a) {
  const int64_t chunks = a.chunks();
  const bool parallel = a.R * a.C >= kParallelElements;
  if (a.norm_adv) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t k = 0; k < chunks; ++k) {
      const ChunkRange range = chunk_range(a, k);
      Moments m{0.0, 0.0, 0.0};
      for (int64_t c = range.c0; c < range.c1; ++c) m = adv_moments_element<S>(a, range.r, c, m);
      adv_moments_store(a, k, m);
    }
    adv_moments_finish(a);
  }
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t k = 0; k < chunks; ++k) {
    const ChunkRange range = chunk_range(a, k);
    double sums[kLossSums] = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t c = range.c0; c < range.c1; ++c) ppo_loss_element<S>(a, range.r, c, sums);
    for (int s = 0; s < kLossSums; ++s) a.partials[k * kLossSums + s] = sums[s];
  }
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
