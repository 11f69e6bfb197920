// Bindings of the fused clipped PPO loss (ppo_loss.h).
#include "bindings_common.h"
#include "ppo_loss.h"

namespace fastppo::bind {
namespace {

// float64 elements of ppo_loss's workspace: each chunk's partial sums, then the advantages'
// (mean, 1/(std+eps)), then one value per row (the sequence ratio's).
int64_t ppo_loss_workspace(int64_t R, int64_t C) {
  require(R >= 0 && C >= 0, "ppo_loss_workspace", "R and C must be >= 0");
  PpoLossArgs a;
  a.R = R;
  a.C = C;
  return std::max<int64_t>(a.chunks(), 1) * kLossSums + 2 + R;
}

void ppo_loss(int64_t R, int64_t C, const std::string& dtype, Strided2 new_logprob, Strided2 old_logprob,
              Strided2 advantages, py::object new_value, py::object old_value, py::object returns,
              py::object entropy, py::object mask, const std::string& mask_dtype, double clip_coef,
              double vf_coef, double ent_coef, double vf_clip_coef, double dual_clip, bool clip_vloss,
              bool norm_adv, int agg, py::object grad_logprob, py::object grad_value, py::object loss, py::object stats,
              py::object row_scale, py::object workspace, int device, std::uintptr_t stream, py::object group,
              double group_size, double clip_coef_high, py::object is_weights, py::object ref_logprob, double kl_coef,
              int kl_estimator, bool sequence_ratio) {
  require(agg >= kAggTokenMean && agg <= kAggSeqMeanTokenSumNorm, "ppo_loss", "agg must be 0, 1, 2 or 3");
  require(kl_estimator >= kKlNone && kl_estimator <= kKlK3, "ppo_loss", "kl_estimator must be -1 (none), 0, 1 or 2");
  PpoLossArgs a = rows_cols_args<PpoLossArgs>("ppo_loss", R, C, dtype);
  a.new_logprob = strided(new_logprob);
  a.old_logprob = strided(old_logprob);
  a.advantages = strided(advantages);
  a.new_value = optional_strided(new_value);
  a.old_value = optional_strided(old_value);
  a.returns = optional_strided(returns);
  a.entropy = optional_strided(entropy);
  a.mask = optional_strided(mask);
  if (a.mask.data) a.mask_type = flag_type(mask_dtype, "mask");
  static_cast<LossOptions&>(a) = loss_options(clip_coef, vf_coef, ent_coef, vf_clip_coef, dual_clip, clip_vloss, norm_adv);
  a.agg = agg;
  a.clip_coef_high = clip_coef_high < 0.0 ? clip_coef : clip_coef_high;
  a.is_weights = optional_strided(is_weights);
  a.ref_logprob = optional_strided(ref_logprob);
  a.kl_coef = kl_coef;
  a.kl_estimator = kl_estimator;
  a.sequence_ratio = sequence_ratio;
  require(ref_logprob.is_none() == (kl_estimator == kKlNone), "ppo_loss",
          "ref_logprob and kl_estimator go together (kl_estimator -1 without ref_logprob)");
  if (!a.ref_logprob.data) a.kl_estimator = kKlNone;  // an empty input (address 0): nothing to read
  a.grad_logprob = optional_address(grad_logprob);
  a.grad_value = optional_address(grad_value);
  a.loss = optional_address(loss);
  a.stats = optional_address(stats);
  a.row_scale = optional_address(row_scale);
  a.partials = static_cast<double*>(optional_address(workspace));
  if (a.partials) a.adv_stats = a.partials + std::max<int64_t>(a.chunks(), 1) * kLossSums;
  if (a.partials) a.row_values = a.adv_stats + 2;
  a.group = static_cast<const double*>(optional_address(group));
  a.group_size = group_size;
  require(!a.group || (agg == kAggTokenMean && group_size >= 1.0), "ppo_loss",
          "group statistics need agg token-mean and group_size >= 1");
  require(!a.new_value.data || (a.returns.data && (!clip_vloss || a.old_value.data)), "ppo_loss",
          "new_value needs returns (and old_value when clip_vloss)");
  require(a.loss && a.stats && a.row_scale && a.partials && (R * C == 0 || a.grad_logprob) &&
              (!a.new_value.data || R * C == 0 || a.grad_value),
          "ppo_loss", "missing output or workspace buffer");
  dispatch("ppo_loss", device, stream, ppo_loss_cpu, FASTPPO_CUDA_LAUNCHER(ppo_loss_cuda), a);
}

}  // namespace

void bind_loss(py::module_& m) {
  m.attr("LOSS_STATS") = static_cast<int>(kLossStatsAll);
  m.def("ppo_loss_workspace", &ppo_loss_workspace, py::arg("R"), py::arg("C"),
        "float64 elements of the workspace ppo_loss needs for an [R, C] problem.");
  m.def("ppo_loss", &ppo_loss, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("new_logprob"),
        py::arg("old_logprob"), py::arg("advantages"), py::arg("new_value"), py::arg("old_value"),
        py::arg("returns"), py::arg("entropy"), py::arg("mask"), py::arg("mask_dtype"), py::arg("clip_coef"),
        py::arg("vf_coef"), py::arg("ent_coef"), py::arg("vf_clip_coef"), py::arg("dual_clip"),
        py::arg("clip_vloss"), py::arg("norm_adv"), py::arg("agg"), py::arg("grad_logprob"),
        py::arg("grad_value"), py::arg("loss"), py::arg("stats"), py::arg("row_scale"), py::arg("workspace"),
        py::arg("device"), py::arg("stream"), py::arg("group") = py::none(), py::arg("group_size") = 1.0,
        py::arg("clip_coef_high") = -1.0, py::arg("is_weights") = py::none(), py::arg("ref_logprob") = py::none(),
        py::arg("kl_coef") = 0.0, py::arg("kl_estimator") = -1, py::arg("sequence_ratio") = false,
        "Fused clipped PPO loss over an [R, C] problem: writes loss, stats[LOSS_STATS] (pg, v, entropy, approx_kl, "
        "old_approx_kl, clipfrac, the reference KL, clipfrac_low, clipfrac_high), the gradients grad_logprob / "
        "grad_value ([R, C], contiguous) "
        "of the loss, and row_scale[R] (d loss / d entropy = -ent_coef * row_scale). workspace: float64 "
        "[ppo_loss_workspace(R, C)]. group: None, or float64 [3] (count, mean, m2) of the selected advantages of "
        "a data-parallel group of group_size ranks (token-mean only; see PpoLossArgs::group). clip_coef_high < 0: "
        "clip_coef. is_weights: [R, C] weights of the policy term. ref_logprob with kl_estimator (0 k1, 1 k2, "
        "2 k3; -1 without): kl_coef * agg(KL) joins the loss. sequence_ratio: GSPO's per-row ratio.");
}

}  // namespace fastppo::bind
