// Bindings of the fused policy heads (heads.h): categorical (with an optional mask of legal
// actions), multi-discrete and diagonal Gaussian (plain or tanh-squashed) log-prob and entropy,
// forward and backward, and the Gumbel-max samplers.
#include "bindings_common.h"
#include "heads.h"

namespace fastppo::bind {
namespace {

int scalar_type(const std::string& dtype, const char* name) {
  if (dtype == "float32") return kF32;
  if (dtype == "float64") return kF64;
  if (dtype == "bfloat16") return kBF16;
  if (dtype == "float16") return kF16;
  throw py::type_error(std::string("fastppo._C: ") + name +
                       " dtype must be float32, float64, bfloat16 or float16, got '" + dtype + "'");
}

CategoricalArgs categorical_args(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits,
                                 Strided1 actions, const std::string& actions_dtype, double temperature) {
  require(rows >= 0 && A >= 1, "categorical", "rows must be >= 0 and A >= 1");
  require(temperature > 0.0, "categorical", "temperature must be > 0");
  CategoricalArgs a;
  a.rows = rows;
  a.A = A;
  a.dtype = scalar_type(dtype, "logits");
  const Strided l = strided(logits);
  a.logits = l.data, a.logits_sr = l.sr, a.logits_sc = l.sc;
  a.actions = address(std::get<0>(actions));
  a.actions_s = std::get<1>(actions);
  if (actions_dtype == "int64") {
    a.actions_type = kFlagI64;
  } else if (actions_dtype == "int32") {
    a.actions_type = kFlagI32;
  } else {
    throw py::type_error("fastppo._C.categorical: actions dtype must be int64 or int32, got '" + actions_dtype + "'");
  }
  a.inv_temperature = 1.0 / temperature;
  return a;
}

// A mask of legal actions: None, or a bool [rows, A] spec (bytes, element strides).
void set_mask(const py::object& spec, const uint8_t** data, int64_t* sr, int64_t* sc) {
  if (spec.is_none()) return;
  const Strided m = strided(spec.cast<Strided2>());
  *data = static_cast<const uint8_t*>(m.data);
  *sr = m.sr;
  *sc = m.sc;
}

// The CPU checks of the taken actions, before anything runs: out of range is an IndexError, an
// illegal action (in a row or component with a legal one) a ValueError; each names the first.
void check_categorical_actions(const CategoricalArgs& a) {
  const int64_t bad = categorical_check_actions_cpu(a);
  if (bad >= 0) throw py::index_error("fastppo._C.categorical: row " + std::to_string(bad) + " has an action out of range");
  const int64_t illegal = categorical_check_mask_cpu(a);
  if (illegal >= 0)
    throw py::value_error("fastppo._C.categorical: row " + std::to_string(illegal) +
                          " takes an action its mask marks illegal");
}

// stats: [2, rows] contiguous, in the accumulation type (float for bf16 / f16 logits): the
// log-sum-exp and the entropy of each row, written by forward and read by backward.
void set_stats(CategoricalArgs& a, const py::object& stats) {
  char* base = static_cast<char*>(address(stats));
  a.lse = base;
  a.entropy_acc = base + a.rows * (a.dtype == kF64 ? sizeof(double) : sizeof(float));
}

void categorical_forward(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits, Strided1 actions,
                         const std::string& actions_dtype, double temperature, py::object logprob, py::object entropy,
                         py::object stats, int device, std::uintptr_t stream, const py::object& mask) {
  CategoricalArgs a = categorical_args(rows, A, dtype, logits, actions, actions_dtype, temperature);
  set_mask(mask, &a.mask, &a.mask_sr, &a.mask_sc);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  set_stats(a, stats);
  if (rows == 0) return;
  if (device < 0) check_categorical_actions(a);
  dispatch("categorical_forward", device, stream, categorical_forward_cpu,
           FASTPPO_CUDA_LAUNCHER(categorical_forward_cuda), a);
}

// Gumbel-max sample per row (CPU), then the forward pass on the sampled actions: one call.
void categorical_sample(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits, std::uintptr_t noise,
                        int64_t noise_sr, double temperature, std::uintptr_t actions, py::object logprob,
                        py::object entropy, py::object stats, const py::object& mask) {
  CategoricalArgs a = categorical_args(rows, A, dtype, logits, Strided1{py::int_(actions), 1}, "int64", temperature);
  set_mask(mask, &a.mask, &a.mask_sr, &a.mask_sc);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  set_stats(a, stats);
  if (rows == 0) return;
  require(noise != 0 && actions != 0, "categorical_sample", "null noise or actions");
  py::gil_scoped_release no_gil;
  categorical_sample_cpu(a, reinterpret_cast<const void*>(noise), noise_sr, reinterpret_cast<int64_t*>(actions));
  categorical_forward_cpu(a);
}

void categorical_backward(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits, Strided1 actions,
                          const std::string& actions_dtype, double temperature, py::object stats,
                          py::object grad_logprob, py::object grad_entropy, py::object grad_logits, int device,
                          std::uintptr_t stream, const py::object& mask) {
  CategoricalArgs a = categorical_args(rows, A, dtype, logits, actions, actions_dtype, temperature);
  set_mask(mask, &a.mask, &a.mask_sr, &a.mask_sc);
  set_stats(a, stats);
  optional_vector(grad_logprob, &a.grad_logprob, &a.grad_logprob_s);
  optional_vector(grad_entropy, &a.grad_entropy, &a.grad_entropy_s);
  a.grad_logits = address(grad_logits);
  if (rows == 0) return;
  dispatch("categorical_backward", device, stream, categorical_backward_cpu,
           FASTPPO_CUDA_LAUNCHER(categorical_backward_cuda), a);
}

MultiCategoricalArgs multi_categorical_args(int64_t rows, int64_t K, int64_t A, const std::string& dtype,
                                            std::uintptr_t offsets, Strided2 logits, Strided2 actions,
                                            const std::string& actions_dtype, const py::object& mask, bool reduce) {
  require(rows >= 0 && K >= 1 && A >= K, "multi_categorical", "rows must be >= 0, K >= 1 and A >= K");
  require(offsets != 0, "multi_categorical", "null offsets");
  MultiCategoricalArgs a;
  a.rows = rows;
  a.K = K;
  a.A = A;
  a.dtype = scalar_type(dtype, "logits");
  a.offsets = reinterpret_cast<const int64_t*>(offsets);
  const Strided l = strided(logits), x = strided(actions);
  a.logits = l.data, a.logits_sr = l.sr, a.logits_sc = l.sc;
  a.actions = x.data, a.actions_sr = x.sr, a.actions_sc = x.sc;
  if (actions_dtype == "int64") {
    a.actions_type = kFlagI64;
  } else if (actions_dtype == "int32") {
    a.actions_type = kFlagI32;
  } else {
    throw py::type_error("fastppo._C.multi_categorical: actions dtype must be int64 or int32, got '" + actions_dtype +
                         "'");
  }
  set_mask(mask, &a.mask, &a.mask_sr, &a.mask_sc);
  a.reduce = reduce;
  return a;
}

// stats: [2, rows, K] contiguous in the accumulation dtype: each component's log-sum-exp, then its entropy.
void set_multi_stats(MultiCategoricalArgs& a, const py::object& stats) {
  char* base = static_cast<char*>(address(stats));
  a.lse = base;
  a.entropy_acc = base + a.rows * a.K * (a.dtype == kF64 ? sizeof(double) : sizeof(float));
}

// A [rows] or [rows, K] incoming gradient: None, or (data, row stride, component stride).
void set_multi_grad(const py::object& spec, const void** data, int64_t* sr, int64_t* sc) {
  if (spec.is_none()) return;
  const Strided g = strided(spec.cast<Strided2>());
  *data = g.data;
  *sr = g.sr;
  *sc = g.sc;
}

// CPU (offsets in host memory): the checks of check_categorical_actions, per component.
void check_multi_categorical_actions(const MultiCategoricalArgs& a) {
  const int64_t bad = multi_categorical_check_actions_cpu(a);
  if (bad >= 0)
    throw py::index_error("fastppo._C.multi_categorical: row " + std::to_string(bad / a.K) + ", component " +
                          std::to_string(bad % a.K) + " has an action out of range");
  const int64_t illegal = multi_categorical_check_mask_cpu(a);
  if (illegal >= 0)
    throw py::value_error("fastppo._C.multi_categorical: row " + std::to_string(illegal / a.K) + ", component " +
                          std::to_string(illegal % a.K) + " takes an action its mask marks illegal");
}

void multi_categorical_forward(int64_t rows, int64_t K, int64_t A, const std::string& dtype, std::uintptr_t offsets,
                               Strided2 logits, Strided2 actions, const std::string& actions_dtype,
                               const py::object& mask, bool reduce, py::object logprob, py::object entropy,
                               py::object stats, int device, std::uintptr_t stream) {
  MultiCategoricalArgs a = multi_categorical_args(rows, K, A, dtype, offsets, logits, actions, actions_dtype, mask, reduce);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  set_multi_stats(a, stats);
  if (rows == 0) return;
  if (device < 0) check_multi_categorical_actions(a);
  dispatch("multi_categorical_forward", device, stream, multi_categorical_forward_cpu,
           FASTPPO_CUDA_LAUNCHER(multi_categorical_forward_cuda), a);
}

// CPU: each component's Gumbel-max sample, then the forward pass (summed) on the sampled actions.
void multi_categorical_sample(int64_t rows, int64_t K, int64_t A, const std::string& dtype, std::uintptr_t offsets,
                              Strided2 logits, const py::object& mask, std::uintptr_t noise, int64_t noise_sr,
                              std::uintptr_t actions, py::object logprob, py::object entropy, py::object stats) {
  MultiCategoricalArgs a = multi_categorical_args(rows, K, A, dtype, offsets, logits, Strided2{py::int_(actions), K, 1},
                                                  "int64", mask, true);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  set_multi_stats(a, stats);
  if (rows == 0) return;
  require(noise != 0 && actions != 0, "multi_categorical_sample", "null noise or actions");
  py::gil_scoped_release no_gil;
  multi_categorical_sample_cpu(a, reinterpret_cast<const void*>(noise), noise_sr, reinterpret_cast<int64_t*>(actions));
  multi_categorical_forward_cpu(a);
}

void multi_categorical_backward(int64_t rows, int64_t K, int64_t A, const std::string& dtype, std::uintptr_t offsets,
                                Strided2 logits, Strided2 actions, const std::string& actions_dtype,
                                const py::object& mask, bool reduce, py::object stats, py::object grad_logprob,
                                py::object grad_entropy, py::object grad_logits, int device, std::uintptr_t stream) {
  MultiCategoricalArgs a = multi_categorical_args(rows, K, A, dtype, offsets, logits, actions, actions_dtype, mask, reduce);
  set_multi_stats(a, stats);
  set_multi_grad(grad_logprob, &a.grad_logprob, &a.grad_logprob_sr, &a.grad_logprob_sc);
  set_multi_grad(grad_entropy, &a.grad_entropy, &a.grad_entropy_sr, &a.grad_entropy_sc);
  a.grad_logits = address(grad_logits);
  if (rows == 0) return;
  dispatch("multi_categorical_backward", device, stream, multi_categorical_backward_cpu,
           FASTPPO_CUDA_LAUNCHER(multi_categorical_backward_cuda), a);
}

NormalArgs normal_args(int64_t rows, int64_t D, const std::string& dtype, Strided2 mean, Strided2 log_std,
                       Strided2 actions, const py::object& pre_tanh = py::none(), bool squashed = false) {
  require(rows >= 0 && D >= 1, "normal", "rows must be >= 0 and D >= 1");
  NormalArgs a;
  a.rows = rows;
  a.D = D;
  a.is_f64 = float_is_f64(dtype);
  const Strided mu = strided(mean), ls = strided(log_std), x = strided(actions);
  a.mean = mu.data, a.mean_sr = mu.sr, a.mean_sc = mu.sc;
  a.log_std = ls.data, a.log_std_sr = ls.sr, a.log_std_sc = ls.sc;
  a.actions = x.data, a.actions_sr = x.sr, a.actions_sc = x.sc;
  a.squashed = squashed;
  if (!pre_tanh.is_none()) {
    require(squashed, "normal", "pre_tanh is only read by the squashed head");
    const Strided u = strided(pre_tanh.cast<Strided2>());
    a.pre_tanh = u.data, a.pre_tanh_sr = u.sr, a.pre_tanh_sc = u.sc;
  }
  return a;
}

// float64 elements of normal_backward's workspace: per chunk of rows, the partial gradient of a
// log_std shared by all rows (none when each row has its own).
int64_t normal_backward_workspace(int64_t rows, int64_t D, bool shared_log_std) {
  require(rows >= 0 && D >= 1, "normal_backward_workspace", "rows must be >= 0 and D >= 1");
  return shared_log_std ? std::max<int64_t>(1, (rows + kNormalChunk - 1) / kNormalChunk) * D : 0;
}

void normal_forward(int64_t rows, int64_t D, const std::string& dtype, Strided2 mean, Strided2 log_std,
                    Strided2 actions, py::object logprob, py::object entropy, int device, std::uintptr_t stream,
                    bool squashed, const py::object& pre_tanh) {
  NormalArgs a = normal_args(rows, D, dtype, mean, log_std, actions, pre_tanh, squashed);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  if (rows == 0) return;
  dispatch("normal_forward", device, stream, normal_forward_cpu, FASTPPO_CUDA_LAUNCHER(normal_forward_cuda), a);
}

void normal_backward(int64_t rows, int64_t D, const std::string& dtype, Strided2 mean, Strided2 log_std,
                     Strided2 actions, py::object grad_logprob, py::object grad_entropy, py::object grad_mean,
                     py::object grad_log_std, py::object workspace, int device, std::uintptr_t stream,
                     bool squashed, const py::object& pre_tanh) {
  NormalArgs a = normal_args(rows, D, dtype, mean, log_std, actions, pre_tanh, squashed);
  optional_vector(grad_logprob, &a.grad_logprob, &a.grad_logprob_s);
  optional_vector(grad_entropy, &a.grad_entropy, &a.grad_entropy_s);
  a.grad_mean = address(grad_mean);
  a.grad_log_std = address(grad_log_std);
  a.partials = static_cast<double*>(optional_address(workspace));
  require(a.log_std_sr != 0 || a.partials, "normal_backward", "a shared log_std needs a workspace");
  dispatch("normal_backward", device, stream, normal_backward_cpu, FASTPPO_CUDA_LAUNCHER(normal_backward_cuda), a);
}

}  // namespace

void bind_heads(py::module_& m) {
  m.def("categorical_forward", &categorical_forward, py::arg("rows"), py::arg("A"), py::arg("dtype"), py::arg("logits"),
        py::arg("actions"), py::arg("actions_dtype"), py::arg("temperature"), py::arg("logprob"), py::arg("entropy"),
        py::arg("stats"), py::arg("device"), py::arg("stream"), py::arg("mask") = py::none(),
        "Categorical head forward over [rows, A] logits: writes logprob and entropy ([rows] each, in the logits' "
        "dtype) and stats ([2, rows] in the accumulation dtype: the log-sum-exp and the entropy). mask: None or a "
        "bool [rows, A] spec of the legal actions.");
  m.def("categorical_sample", &categorical_sample, py::arg("rows"), py::arg("A"), py::arg("dtype"), py::arg("logits"),
        py::arg("noise"), py::arg("noise_sr"), py::arg("temperature"), py::arg("actions"), py::arg("logprob"),
        py::arg("entropy"), py::arg("stats"), py::arg("mask") = py::none(),
        "CPU: Gumbel-max sample of one action per row of logits / temperature from uniform noise [rows, A] (in "
        "the accumulation dtype), then its log-prob and the entropy: writes actions (int64), logprob, entropy, "
        "stats as categorical_forward does.");
  m.def("categorical_backward", &categorical_backward, py::arg("rows"), py::arg("A"), py::arg("dtype"),
        py::arg("logits"), py::arg("actions"), py::arg("actions_dtype"), py::arg("temperature"), py::arg("stats"),
        py::arg("grad_logprob"), py::arg("grad_entropy"), py::arg("grad_logits"), py::arg("device"),
        py::arg("stream"), py::arg("mask") = py::none(),
        "Categorical head backward from forward's stats: writes contiguous [rows, A] grad_logits in the logits' "
        "dtype (grad_logprob and grad_entropy: in the logits' dtype too).");
  m.def("multi_categorical_forward", &multi_categorical_forward, py::arg("rows"), py::arg("K"), py::arg("A"),
        py::arg("dtype"), py::arg("offsets"), py::arg("logits"), py::arg("actions"), py::arg("actions_dtype"),
        py::arg("mask"), py::arg("reduce"), py::arg("logprob"), py::arg("entropy"), py::arg("stats"), py::arg("device"),
        py::arg("stream"),
        "Multi-discrete head forward over [rows, A] logits, component k on columns [offsets[k], offsets[k + 1]) "
        "(offsets: int64 [K + 1] on the logits' device), actions [rows, K]: writes logprob and entropy ([rows] "
        "summed when reduce, else [rows, K]; the logits' dtype) and stats ([2, rows, K], accumulation dtype).");
  m.def("multi_categorical_sample", &multi_categorical_sample, py::arg("rows"), py::arg("K"), py::arg("A"),
        py::arg("dtype"), py::arg("offsets"), py::arg("logits"), py::arg("mask"), py::arg("noise"),
        py::arg("noise_sr"), py::arg("actions"), py::arg("logprob"), py::arg("entropy"), py::arg("stats"),
        "CPU: Gumbel-max sample of each component from uniform noise [rows, A], into actions (int64 [rows, K], "
        "contiguous), then the summed log-prob and entropy as multi_categorical_forward writes them.");
  m.def("multi_categorical_backward", &multi_categorical_backward, py::arg("rows"), py::arg("K"), py::arg("A"),
        py::arg("dtype"), py::arg("offsets"), py::arg("logits"), py::arg("actions"), py::arg("actions_dtype"),
        py::arg("mask"), py::arg("reduce"), py::arg("stats"), py::arg("grad_logprob"), py::arg("grad_entropy"),
        py::arg("grad_logits"), py::arg("device"), py::arg("stream"),
        "Multi-discrete head backward from forward's stats: grad_logprob / grad_entropy as (data, row stride, "
        "component stride) specs (component stride 0 when reduced) or None; writes contiguous [rows, A] "
        "grad_logits in the logits' dtype.");
  m.def("normal_forward", &normal_forward, py::arg("rows"), py::arg("D"), py::arg("dtype"), py::arg("mean"),
        py::arg("log_std"), py::arg("actions"), py::arg("logprob"), py::arg("entropy"), py::arg("device"),
        py::arg("stream"), py::arg("squashed") = false, py::arg("pre_tanh") = py::none(),
        "Diagonal Gaussian head forward: writes logprob and entropy ([rows] each). squashed: the tanh-squashed "
        "head, at u = pre_tanh ([rows, D] spec) or the clamped atanh of the actions.");
  m.def("normal_backward_workspace", &normal_backward_workspace, py::arg("rows"), py::arg("D"),
        py::arg("shared_log_std"), "float64 elements of the workspace normal_backward needs (0: pass None).");
  m.def("normal_backward", &normal_backward, py::arg("rows"), py::arg("D"), py::arg("dtype"), py::arg("mean"),
        py::arg("log_std"), py::arg("actions"), py::arg("grad_logprob"), py::arg("grad_entropy"),
        py::arg("grad_mean"), py::arg("grad_log_std"), py::arg("workspace"), py::arg("device"), py::arg("stream"),
        py::arg("squashed") = false, py::arg("pre_tanh") = py::none(),
        "Diagonal Gaussian head backward: writes grad_mean [rows, D] and grad_log_std ([rows, D], or [D] when "
        "shared). workspace: float64 [normal_backward_workspace(rows, D, shared)], or None when that is 0. "
        "squashed, pre_tanh: as normal_forward's.");
}

}  // namespace fastppo::bind
