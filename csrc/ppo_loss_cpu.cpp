// The fused PPO loss on the CPU: chunks in parallel with OpenMP, each chunk's sums in its own slot.
// Contiguous chunks (the common case) run loops the compiler vectorizes; any other layout goes
// through the strided element function. Both call the element math of ppo_loss.h. The loops are
// compiled twice, for baseline x86-64 and for AVX2 + FMA, and picked by what the CPU supports.
#include <omp.h>

#include <cstring>

#include "ppo_loss.h"

namespace fastppo {

namespace baseline {
namespace {
#include "ppo_loss_cpu_loops.inc"
}  // namespace
void ppo_loss_cpu(const PpoLossArgs& args) { args.is_f64 ? ppo_loss_cpu_typed<double>(args) : ppo_loss_cpu_typed<float>(args); }
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTPPO_HAVE_AVX2_LOOPS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {
#include "ppo_loss_cpu_loops.inc"
}  // namespace
void ppo_loss_cpu(const PpoLossArgs& args) { args.is_f64 ? ppo_loss_cpu_typed<double>(args) : ppo_loss_cpu_typed<float>(args); }
}  // namespace avx2
#pragma GCC pop_options
#endif

void ppo_loss_cpu(const PpoLossArgs& args) {
#if FASTPPO_HAVE_AVX2_LOOPS
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return avx2::ppo_loss_cpu(args);
#endif
  baseline::ppo_loss_cpu(args);
}

}  // namespace fastppo
