// The CPU kernels (GAE, the fused loss, the policy heads, the RLHF kernels, the fused MLP), compiled
// three times: for baseline x86-64, for AVX2 + FMA and for AVX-512, picked at run time by what the CPU
// supports. Only the loops in cpu_kernels.inc are compiled per instruction set; the element math they inline (fastppo_math.h and
// the kernel headers) is defined once, outside the target region. Contiguous data runs loops the
// compiler vectorizes; other layouts go through the strided element functions.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa_regions.h"
#include "parallel.h"
#include "gae.h"
#include "heads.h"
#include "actor_critic.h"
#include "lowp.h"
#include "ppo_loss.h"
#include "rlhf.h"
#include "rnn.h"

namespace fastppo {

// False under FASTPPO_CPU_ISA=scalar: the loops that have a contiguous (vectorized) path and an
// element-by-element one take the element path for every layout. A diagnostic setting: the speed
// gate (benchmarks/guard.py) shows with it that it fails on a kernel that lost its vector loops.
bool contiguous_loops();

// kGemmRows: the rows of A the fused actor-critic's register-blocked product takes at a time (each
// with two vectors of columns in accumulators): 8 where there are 32 vector registers (AVX-512: 16
// accumulators), else 4.
namespace baseline {
constexpr int kGemmRows = 4;
#include "cpu_kernels.inc"
}  // namespace baseline

// FASTPPO_ISA_COPIES is set by CMake where the compiler applies cpu_isa_regions.h's regions (GCC and
// clang on x86-64); elsewhere only the baseline copy exists and build_info() says so.
#if FASTPPO_ISA_COPIES
FASTPPO_TARGET_PUSH_AVX2
namespace avx2 {
FASTPPO_ISA_GUARD_AVX2
constexpr int kGemmRows = 4;
#include "cpu_kernels.inc"
}  // namespace avx2
FASTPPO_TARGET_POP
FASTPPO_TARGET_PUSH_AVX512
namespace avx512 {
FASTPPO_ISA_GUARD_AVX512
constexpr int kGemmRows = 8;
#define FASTPPO_AVX512_COPY 1  // the loops' hand-written AVX-512 parts (see ppo_loss_cpu_loops.inc)
#include "cpu_kernels.inc"
#undef FASTPPO_AVX512_COPY
}  // namespace avx512
FASTPPO_TARGET_POP
#endif

namespace {
enum class Isa { kBaseline, kAvx2, kAvx512, kScalar };

// The widest instruction set this CPU supports, or the one FASTPPO_CPU_ISA names (baseline, avx2,
// avx512; a wider one than the CPU has is not taken), so tests can run every compiled copy;
// `scalar` is the baseline copy without its contiguous loops (see contiguous_loops).
Isa detect_isa() {
  const char* asked = std::getenv("FASTPPO_CPU_ISA");
  const std::string name = asked ? asked : "";
  if (!name.empty() && name != "baseline" && name != "avx2" && name != "avx512" && name != "scalar")
    throw std::invalid_argument("FASTPPO_CPU_ISA must be baseline, avx2, avx512 or scalar (or unset), got '" + name +
                                "'");
  if (name == "scalar") return Isa::kScalar;
#if FASTPPO_ISA_COPIES
  Isa best = Isa::kBaseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
  if (!name.empty()) {
    const Isa want = name == "baseline" ? Isa::kBaseline : name == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(best)) return want;
  }
  return best;
#else
  return Isa::kBaseline;
#endif
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}
}  // namespace

const char* cpu_isa_compiled() { return FASTPPO_ISA_COPIES ? "baseline,avx2,avx512" : "baseline"; }

const char* cpu_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
    default: return "baseline";
  }
}

bool contiguous_loops() { return isa() != Isa::kScalar; }

#if FASTPPO_ISA_COPIES
#define FASTPPO_DISPATCH(fn, args) \
  (isa() == Isa::kAvx512 ? avx512::fn(args) : isa() == Isa::kAvx2 ? avx2::fn(args) : baseline::fn(args))
#define FASTPPO_DISPATCH_V(fn, ...)                                                         \
  (isa() == Isa::kAvx512 ? avx512::fn(__VA_ARGS__)                                          \
                         : isa() == Isa::kAvx2 ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define FASTPPO_DISPATCH(fn, args) baseline::fn(args)
#define FASTPPO_DISPATCH_V(fn, ...) baseline::fn(__VA_ARGS__)
#endif

void gae_cpu(const GaeArgs& args) {
  if (args.T > 0 && args.N > 0) FASTPPO_DISPATCH(gae, args);
}
void ppo_loss_cpu(const PpoLossArgs& args) { FASTPPO_DISPATCH(ppo_loss, args); }
void categorical_forward_cpu(const CategoricalArgs& args) { FASTPPO_DISPATCH(categorical_forward, args); }
void categorical_backward_cpu(const CategoricalArgs& args) { FASTPPO_DISPATCH(categorical_backward, args); }
void categorical_sample_cpu(const CategoricalArgs& args, const void* noise, int64_t noise_sr, int64_t* actions_out) {
  FASTPPO_DISPATCH_V(categorical_sample, args, noise, noise_sr, actions_out);
}
void multi_categorical_forward_cpu(const MultiCategoricalArgs& args) { FASTPPO_DISPATCH(multi_categorical_forward, args); }
void multi_categorical_backward_cpu(const MultiCategoricalArgs& args) { FASTPPO_DISPATCH(multi_categorical_backward, args); }
void multi_categorical_sample_cpu(const MultiCategoricalArgs& args, const void* noise, int64_t noise_sr,
                                  int64_t* actions_out) {
  FASTPPO_DISPATCH_V(multi_categorical_sample, args, noise, noise_sr, actions_out);
}
void normal_forward_cpu(const NormalArgs& args) { FASTPPO_DISPATCH(normal_forward, args); }
void normal_backward_cpu(const NormalArgs& args) { FASTPPO_DISPATCH(normal_backward, args); }
void kl_rewards_cpu(const KlRewardArgs& args) { FASTPPO_DISPATCH(kl_rewards, args); }
void masked_whiten_cpu(const WhitenArgs& args) { FASTPPO_DISPATCH(masked_whiten, args); }
void token_gae_cpu(const TokenGaeArgs& args) { FASTPPO_DISPATCH(token_gae, args); }

void mlp_forward_cpu(const MlpSpec& spec, bool is_f64, int64_t rows, const void* x, int64_t ldx, void* saved) {
  FASTPPO_DISPATCH_V(mlp_forward, spec, is_f64, rows, x, ldx, saved);
}
void mlp_backward_cpu(const MlpSpec& spec, bool is_f64, int64_t rows, const void* x, int64_t ldx, const void* saved,
                      const void* grad_out, void* grad_x) {
  FASTPPO_DISPATCH_V(mlp_backward, spec, is_f64, rows, x, ldx, saved, grad_out, grad_x);
}
void actor_critic_act_cpu(const ActorCriticSpec& spec, const ActArgs& args) {
  FASTPPO_DISPATCH_V(actor_critic_act, spec, args);
}
void actor_critic_apply_cpu(const ActorCriticSpec& spec, const UpdateArgs& args) {
  FASTPPO_DISPATCH_V(actor_critic_apply, spec, args);
}
void actor_critic_transpose_cpu(const ActorCriticSpec& spec) { FASTPPO_DISPATCH_V(actor_critic_transpose, spec); }
void actor_critic_update_cpu(const ActorCriticSpec& spec, const UpdateArgs& args) {
  FASTPPO_DISPATCH_V(actor_critic_update, spec, args);
}

void lstm_forward_cpu(const LstmArgs& args) { FASTPPO_DISPATCH(lstm_forward, args); }
void lstm_backward_cpu(const LstmArgs& args) { FASTPPO_DISPATCH(lstm_backward, args); }

int64_t categorical_check_actions_cpu(const CategoricalArgs& args) {
  for (int64_t r = 0; r < args.rows; ++r)
    if (categorical_action(args, r) < 0) return r;
  return -1;
}

int64_t categorical_check_mask_cpu(const CategoricalArgs& args) {
  if (!args.mask) return -1;
  for (int64_t r = 0; r < args.rows; ++r)
    if (!categorical_legal(args, r, categorical_action(args, r)) &&
        any_legal(args.mask + r * args.mask_sr, args.mask_sc, args.A))
      return r;
  return -1;
}

int64_t multi_categorical_check_actions_cpu(const MultiCategoricalArgs& args) {
  for (int64_t r = 0; r < args.rows; ++r)
    for (int64_t k = 0; k < args.K; ++k)
      if (multi_categorical_action(args, r, k) < 0) return r * args.K + k;
  return -1;
}

int64_t multi_categorical_check_mask_cpu(const MultiCategoricalArgs& args) {
  if (!args.mask) return -1;
  for (int64_t r = 0; r < args.rows; ++r)
    for (int64_t k = 0; k < args.K; ++k) {
      const int64_t c0 = args.offsets[k];
      if (!multi_categorical_legal(args, r, c0 + multi_categorical_action(args, r, k)) &&
          any_legal(args.mask + r * args.mask_sr + c0 * args.mask_sc, args.mask_sc, args.offsets[k + 1] - c0))
        return r * args.K + k;
    }
  return -1;
}

}  // namespace fastppo
