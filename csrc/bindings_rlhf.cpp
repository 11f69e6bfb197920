// Bindings of the token-level RLHF kernels (rlhf.h): KL-shaped rewards, masked whitening and GAE
// along each response.
#include "bindings_common.h"
#include "rlhf.h"

namespace fastppo::bind {
namespace {

void kl_rewards(int64_t R, int64_t C, const std::string& dtype, Strided2 logprob, Strided2 ref_logprob,
                py::object mask, const std::string& mask_dtype, py::object scores, double beta, int estimator,
                double clamp, py::object rewards, py::object kl, py::object last, int device, std::uintptr_t stream) {
  require(estimator >= kKlK1 && estimator <= kKlK3, "kl_rewards", "estimator must be 0 (k1), 1 (k2) or 2 (k3)");
  KlRewardArgs a = rows_cols_args<KlRewardArgs>("kl_rewards", R, C, dtype);
  a.logprob = strided(logprob);
  a.ref_logprob = strided(ref_logprob);
  a.mask = optional_strided(mask);
  if (a.mask.data) a.mask_type = flag_type(mask_dtype, "mask");
  optional_vector(scores, &a.scores, &a.scores_stride);
  a.beta = beta;
  a.estimator = estimator;
  a.clamp = clamp;
  a.rewards = optional_address(rewards);
  a.kl = optional_address(kl);
  a.last = static_cast<int64_t*>(optional_address(last));
  require(R == 0 || (a.last && (C == 0 || (a.rewards && a.kl && a.logprob.data && a.ref_logprob.data))),
          "kl_rewards", "missing input or output buffer");
  dispatch("kl_rewards", device, stream, kl_rewards_cpu, FASTPPO_CUDA_LAUNCHER(kl_rewards_cuda), a);
}

// float64 elements of masked_whiten's workspace: each chunk's (count, mean, m2), then the
// selected elements' (count, mean, unbiased variance).
int64_t masked_whiten_workspace(int64_t R, int64_t C) {
  require(R >= 0 && C >= 0, "masked_whiten_workspace", "R and C must be >= 0");
  WhitenArgs a;
  a.R = R;
  a.C = C;
  return 3 * std::max<int64_t>(a.chunks(), 1) + 3;
}

void masked_whiten(int64_t R, int64_t C, const std::string& dtype, Strided2 x, py::object mask,
                   const std::string& mask_dtype, bool shift_mean, double eps, py::object out, py::object workspace,
                   int device, std::uintptr_t stream, py::object group) {
  require(eps >= 0.0, "masked_whiten", "eps must be >= 0");
  WhitenArgs a = rows_cols_args<WhitenArgs>("masked_whiten", R, C, dtype);
  a.x = strided(x);
  a.mask = optional_strided(mask);
  if (a.mask.data) a.mask_type = flag_type(mask_dtype, "mask");
  a.shift_mean = shift_mean;
  a.eps = eps;
  a.out = optional_address(out);
  a.partials = static_cast<double*>(optional_address(workspace));
  require(a.partials != nullptr, "masked_whiten", "missing workspace buffer");
  a.stats = a.partials + masked_whiten_workspace(R, C) - 3;
  a.group = static_cast<const double*>(optional_address(group));
  require(R * C == 0 || (a.out && a.x.data), "masked_whiten", "missing input or output buffer");
  dispatch("masked_whiten", device, stream, masked_whiten_cpu, FASTPPO_CUDA_LAUNCHER(masked_whiten_cuda), a);
}

void token_gae(int64_t R, int64_t C, const std::string& dtype, Strided2 rewards, Strided2 values, Strided1 last,
               double gamma, double lam, py::object adv, py::object ret, int device, std::uintptr_t stream) {
  require_unit_interval(gamma, "token_gae", "gamma");
  require_unit_interval(lam, "token_gae", "lam");
  TokenGaeArgs a = rows_cols_args<TokenGaeArgs>("token_gae", R, C, dtype);
  a.rewards = strided(rewards);
  a.values = strided(values);
  a.last = static_cast<const int64_t*>(address(std::get<0>(last)));
  a.last_stride = std::get<1>(last);
  a.gamma = gamma;
  a.lam = lam;
  a.adv = optional_address(adv);
  a.ret = optional_address(ret);
  if (R * C == 0) return;
  require(a.rewards.data && a.values.data && a.last && a.adv && a.ret, "token_gae", "missing input or output buffer");
  dispatch("token_gae", device, stream, token_gae_cpu, FASTPPO_CUDA_LAUNCHER(token_gae_cuda), a);
}

}  // namespace

void bind_rlhf(py::module_& m) {
  m.def("kl_rewards", &kl_rewards, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("logprob"),
        py::arg("ref_logprob"), py::arg("mask"), py::arg("mask_dtype"), py::arg("scores"), py::arg("beta"),
        py::arg("estimator"), py::arg("clamp"), py::arg("rewards"), py::arg("kl"), py::arg("last"), py::arg("device"),
        py::arg("stream"),
        "Per-token KL estimate vs the reference and shaped rewards -beta*kl (+ score at each row's last selected "
        "token) over [R, C]: writes contiguous rewards and kl [R, C] and last [R] (int64, -1 for an empty row).");
  m.def("masked_whiten_workspace", &masked_whiten_workspace, py::arg("R"), py::arg("C"),
        "float64 elements of the workspace masked_whiten needs for an [R, C] problem; its last three hold "
        "(count, mean, unbiased variance) of the selected elements after the call.");
  m.def("masked_whiten", &masked_whiten, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("x"), py::arg("mask"),
        py::arg("mask_dtype"), py::arg("shift_mean"), py::arg("eps"), py::arg("out"), py::arg("workspace"),
        py::arg("device"), py::arg("stream"), py::arg("group") = py::none(),
        "Masked whitening over [R, C]: writes contiguous out [R, C] (0 where unselected). workspace: float64 "
        "[masked_whiten_workspace(R, C)]. group: None, or float64 [3] (count, mean, m2) of the selected elements "
        "of a data-parallel group's batch, used instead of this call's own.");
  m.def("token_gae", &token_gae, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("rewards"), py::arg("values"),
        py::arg("last"), py::arg("gamma"), py::arg("lam"), py::arg("adv"), py::arg("ret"), py::arg("device"),
        py::arg("stream"),
        "GAE along each row of [R, C] tokens, ending at last[r] (no bootstrap): writes contiguous adv and ret, "
        "0 after the last token.");
}

}  // namespace fastppo::bind
