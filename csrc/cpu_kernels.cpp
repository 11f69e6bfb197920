// The CPU kernels that gain from wide vectors (the fused loss, the policy heads, the RLHF kernels), compiled twice:
// for baseline x86-64 and for AVX2 + FMA, picked at run time by what the CPU supports. Only the
// loops in cpu_kernels.inc are compiled twice; the element math they inline (fastppo_math.h and
// the kernel headers) is defined once, outside the target region. Contiguous data runs loops the
// compiler vectorizes; other layouts go through the strided element functions.
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "heads.h"
#include "ppo_loss.h"
#include "rlhf.h"

namespace fastppo {

namespace baseline {
#include "cpu_kernels.inc"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTPPO_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#else
#define FASTPPO_HAVE_AVX2 0
#endif

namespace {
bool use_avx2() {
#if FASTPPO_HAVE_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}
}  // namespace

#if FASTPPO_HAVE_AVX2
#define FASTPPO_DISPATCH(fn, args) (use_avx2() ? avx2::fn(args) : baseline::fn(args))
#else
#define FASTPPO_DISPATCH(fn, args) baseline::fn(args)
#endif

void ppo_loss_cpu(const PpoLossArgs& args) { FASTPPO_DISPATCH(ppo_loss, args); }
void categorical_forward_cpu(const CategoricalArgs& args) { FASTPPO_DISPATCH(categorical_forward, args); }
void categorical_backward_cpu(const CategoricalArgs& args) { FASTPPO_DISPATCH(categorical_backward, args); }
void normal_forward_cpu(const NormalArgs& args) { FASTPPO_DISPATCH(normal_forward, args); }
void normal_backward_cpu(const NormalArgs& args) { FASTPPO_DISPATCH(normal_backward, args); }
void kl_rewards_cpu(const KlRewardArgs& args) { FASTPPO_DISPATCH(kl_rewards, args); }
void masked_whiten_cpu(const WhitenArgs& args) { FASTPPO_DISPATCH(masked_whiten, args); }

int64_t categorical_check_actions_cpu(const CategoricalArgs& args) {
  for (int64_t r = 0; r < args.rows; ++r)
    if (categorical_action(args, r) < 0) return r;
  return -1;
}

}  // namespace fastppo
