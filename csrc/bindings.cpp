// fastppo._C: the compiled core. A plain pybind11 module over raw buffers (data pointer, element
// strides, dtype name, device, stream); it never sees a numpy array or a torch tensor, so one build
// serves numpy and every torch version. Argument checking with user-facing messages happens in
// python/fastppo; the checks here only guard the C++ against a caller that skipped them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "env_step.h"
#include "gae.h"
#include "heads.h"
#include "ppo_loss.h"
#include "rlhf.h"

#if FASTPPO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace fastppo {
const char* cpu_isa();  // cpu_kernels.cpp: the instruction set the CPU loops run with
}  // namespace fastppo
using fastppo::GaeArgs;

namespace {

// A buffer's data is given as an integer address (torch's data_ptr()) or as the numpy array
// itself, whose pointer is read here in nanoseconds rather than through numpy's ctypes helper.
void* address(py::handle data) {
  if (py::isinstance<py::array>(data)) return const_cast<void*>(py::reinterpret_borrow<py::array>(data).data());
  return reinterpret_cast<void*>(data.cast<std::uintptr_t>());
}

// (data, stride over T, stride over N), strides in elements.
using Strided2 = std::tuple<py::object, int64_t, int64_t>;
// (data, stride over N).
using Strided1 = std::tuple<py::object, int64_t>;

const void* pointer(const py::object& data) { return address(data); }

bool float_is_f64(const std::string& dtype) {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  throw py::type_error("fastppo._C: float dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

int flag_type(const std::string& dtype, const char* name) {
  if (dtype == "bool" || dtype == "uint8") return fastppo::kFlagU8;
  if (dtype == "int8") return fastppo::kFlagI8;
  if (dtype == "int32") return fastppo::kFlagI32;
  if (dtype == "int64") return fastppo::kFlagI64;
  if (dtype == "float32") return fastppo::kFlagF32;
  if (dtype == "float64") return fastppo::kFlagF64;
  throw py::type_error(std::string("fastppo._C: ") + name + " dtype must be bool, uint8, int8, int32, int64, float32 or float64, got '" + dtype + "'");
}

int cuda_device_count() {
#if FASTPPO_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error and report none
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

void gae(int64_t T, int64_t N, const std::string& dtype, Strided2 rewards, Strided2 values, Strided2 dones,
         const std::string& dones_dtype, Strided2 terminated, const std::string& terminated_dtype,
         Strided1 last_value, py::object adv, py::object ret, double gamma, double lam, int device,
         std::uintptr_t stream) {
  if (T < 0 || N < 0) throw py::value_error("fastppo._C.gae: T and N must be >= 0");
  if (!(gamma >= 0.0 && gamma <= 1.0)) throw py::value_error("fastppo._C.gae: gamma must be in [0, 1]");
  if (!(lam >= 0.0 && lam <= 1.0)) throw py::value_error("fastppo._C.gae: lam must be in [0, 1]");
  GaeArgs a;
  a.T = T;
  a.N = N;
  a.is_f64 = float_is_f64(dtype);
  std::tie(std::ignore, a.rewards_st, a.rewards_sn) = rewards;
  a.rewards = pointer(std::get<0>(rewards));
  std::tie(std::ignore, a.values_st, a.values_sn) = values;
  a.values = pointer(std::get<0>(values));
  std::tie(std::ignore, a.dones_st, a.dones_sn) = dones;
  a.dones = pointer(std::get<0>(dones));
  a.dones_type = flag_type(dones_dtype, "dones");
  std::tie(std::ignore, a.terminated_st, a.terminated_sn) = terminated;
  a.terminated = pointer(std::get<0>(terminated));
  a.terminated_type = flag_type(terminated_dtype, "terminated");
  a.last_value = pointer(std::get<0>(last_value));
  a.last_value_sn = std::get<1>(last_value);
  a.adv = address(adv);
  a.ret = address(ret);
  a.gamma = gamma;
  a.lam = lam;
  if (T == 0 || N == 0) return;
  if (!a.rewards || !a.values || !a.dones || !a.terminated || !a.last_value || !a.adv || !a.ret)
    throw py::value_error("fastppo._C.gae: null data pointer");

  py::gil_scoped_release no_gil;
  if (device < 0) {
    fastppo::gae_cpu(a);
    return;
  }
#if FASTPPO_WITH_CUDA
  fastppo::gae_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error("fastppo._C.gae: this build of fastppo has no CUDA support");
#endif
}

fastppo::Strided strided(const Strided2& spec) {
  fastppo::Strided out;
  out.data = pointer(std::get<0>(spec));
  out.sr = std::get<1>(spec);
  out.sc = std::get<2>(spec);
  return out;
}

// An optional [R, C] input: None, or (data, stride over R, stride over C).
fastppo::Strided optional_strided(const py::object& spec) {
  return spec.is_none() ? fastppo::Strided{} : strided(spec.cast<Strided2>());
}

void* optional_address(const py::object& data) { return data.is_none() ? nullptr : address(data); }

void ppo_loss(int64_t R, int64_t C, const std::string& dtype, Strided2 new_logprob, Strided2 old_logprob,
              Strided2 advantages, py::object new_value, py::object old_value, py::object returns,
              py::object entropy, py::object mask, const std::string& mask_dtype, double clip_coef,
              double vf_coef, double ent_coef, double vf_clip_coef, double dual_clip, bool clip_vloss,
              bool norm_adv, int agg, py::object grad_logprob, py::object grad_value, py::object loss, py::object stats,
              py::object row_scale, py::object partials, py::object adv_stats, int device, std::uintptr_t stream) {
  if (R < 0 || C < 0) throw py::value_error("fastppo._C.ppo_loss: R and C must be >= 0");
  if (agg < fastppo::kAggTokenMean || agg > fastppo::kAggSeqMeanTokenSum)
    throw py::value_error("fastppo._C.ppo_loss: agg must be 0, 1 or 2");
  fastppo::PpoLossArgs a;
  a.R = R;
  a.C = C;
  a.is_f64 = float_is_f64(dtype);
  a.new_logprob = strided(new_logprob);
  a.old_logprob = strided(old_logprob);
  a.advantages = strided(advantages);
  a.new_value = optional_strided(new_value);
  a.old_value = optional_strided(old_value);
  a.returns = optional_strided(returns);
  a.entropy = optional_strided(entropy);
  a.mask = optional_strided(mask);
  if (a.mask.data) a.mask_type = flag_type(mask_dtype, "mask");
  a.clip_coef = clip_coef;
  a.vf_coef = vf_coef;
  a.ent_coef = ent_coef;
  a.vf_clip_coef = vf_clip_coef;
  a.dual_clip = dual_clip;
  a.clip_vloss = clip_vloss;
  a.norm_adv = norm_adv;
  a.agg = agg;
  a.grad_logprob = optional_address(grad_logprob);
  a.grad_value = optional_address(grad_value);
  a.loss = optional_address(loss);
  a.stats = optional_address(stats);
  a.row_scale = optional_address(row_scale);
  a.partials = static_cast<double*>(optional_address(partials));
  a.adv_stats = static_cast<double*>(optional_address(adv_stats));
  if (a.new_value.data && (!a.returns.data || (clip_vloss && !a.old_value.data)))
    throw py::value_error("fastppo._C.ppo_loss: new_value needs returns (and old_value when clip_vloss)");
  if (!a.loss || !a.stats || !a.row_scale || !a.adv_stats || (R * C > 0 && (!a.grad_logprob || !a.partials)) ||
      (a.new_value.data && R * C > 0 && !a.grad_value))
    throw py::value_error("fastppo._C.ppo_loss: missing output or workspace buffer");

  py::gil_scoped_release no_gil;
  if (device < 0) {
    fastppo::ppo_loss_cpu(a);
    return;
  }
#if FASTPPO_WITH_CUDA
  fastppo::ppo_loss_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error("fastppo._C.ppo_loss: this build of fastppo has no CUDA support");
#endif
}

int scalar_type(const std::string& dtype, const char* name) {
  if (dtype == "float32") return fastppo::kF32;
  if (dtype == "float64") return fastppo::kF64;
  if (dtype == "bfloat16") return fastppo::kBF16;
  if (dtype == "float16") return fastppo::kF16;
  throw py::type_error(std::string("fastppo._C: ") + name + " dtype must be float32, float64, bfloat16 or float16, got '" + dtype + "'");
}

// (data, stride) of a [rows] vector, or None (left null).
void optional_vector(const py::object& spec, const void** data, int64_t* stride) {
  if (spec.is_none()) return;
  const auto t = spec.cast<Strided1>();
  *data = pointer(std::get<0>(t));
  *stride = std::get<1>(t);
}

fastppo::CategoricalArgs categorical_args(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits,
                                          Strided1 actions, const std::string& actions_dtype, double temperature) {
  if (rows < 0 || A < 1) throw py::value_error("fastppo._C.categorical: rows must be >= 0 and A >= 1");
  if (!(temperature > 0.0)) throw py::value_error("fastppo._C.categorical: temperature must be > 0");
  fastppo::CategoricalArgs a;
  a.rows = rows;
  a.A = A;
  a.dtype = scalar_type(dtype, "logits");
  a.logits = pointer(std::get<0>(logits));
  a.logits_sr = std::get<1>(logits);
  a.logits_sc = std::get<2>(logits);
  a.actions = pointer(std::get<0>(actions));
  a.actions_s = std::get<1>(actions);
  if (actions_dtype == "int64") {
    a.actions_type = fastppo::kFlagI64;
  } else if (actions_dtype == "int32") {
    a.actions_type = fastppo::kFlagI32;
  } else {
    throw py::type_error("fastppo._C.categorical: actions dtype must be int64 or int32, got '" + actions_dtype + "'");
  }
  a.inv_temperature = 1.0 / temperature;
  return a;
}

void run_on(int device, std::uintptr_t stream, void (*cpu)(const fastppo::CategoricalArgs&),
            void (*cuda)(const fastppo::CategoricalArgs&, int, std::uintptr_t), const fastppo::CategoricalArgs& a) {
  py::gil_scoped_release no_gil;
  if (device < 0) return cpu(a);
#if FASTPPO_WITH_CUDA
  cuda(a, device, stream);
#else
  (void)cuda;
  (void)stream;
  throw std::runtime_error("fastppo._C: this build of fastppo has no CUDA support");
#endif
}

void categorical_forward(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits, Strided1 actions,
                         const std::string& actions_dtype, double temperature, py::object logprob, py::object entropy,
                         py::object lse, int device, std::uintptr_t stream) {
  fastppo::CategoricalArgs a = categorical_args(rows, A, dtype, logits, actions, actions_dtype, temperature);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  a.lse = address(lse);
  if (rows == 0) return;
  if (device < 0 && a.dtype != fastppo::kF32 && a.dtype != fastppo::kF64)
    throw py::type_error("fastppo._C.categorical: bfloat16 / float16 logits run on CUDA only");
  if (device < 0) {
    const int64_t bad = fastppo::categorical_check_actions_cpu(a);
    if (bad >= 0) throw py::index_error("fastppo._C.categorical: row " + std::to_string(bad) + " has an action out of range");
  }
  run_on(device, stream, fastppo::categorical_forward_cpu, fastppo::categorical_forward_cuda, a);
}

// Gumbel-max sample per row (CPU), then the forward pass on the sampled actions: one call.
void categorical_sample(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits, std::uintptr_t noise,
                        int64_t noise_sr, double temperature, std::uintptr_t actions, py::object logprob,
                        py::object entropy, py::object lse) {
  const Strided1 action_spec{py::int_(actions), 1};
  fastppo::CategoricalArgs a = categorical_args(rows, A, dtype, logits, action_spec, "int64", temperature);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  a.lse = address(lse);
  if (rows == 0) return;
  if (A <= 0) throw py::value_error("fastppo._C.categorical_sample: A must be >= 1");
  if (a.dtype != fastppo::kF32 && a.dtype != fastppo::kF64)
    throw py::type_error("fastppo._C.categorical_sample: logits must be float32 or float64");
  if (noise == 0 || actions == 0) throw py::value_error("fastppo._C.categorical_sample: null noise or actions");
  py::gil_scoped_release no_gil;
  fastppo::categorical_sample_cpu(a, reinterpret_cast<const void*>(noise), noise_sr, reinterpret_cast<int64_t*>(actions));
  fastppo::categorical_forward_cpu(a);
}

void categorical_backward(int64_t rows, int64_t A, const std::string& dtype, Strided2 logits, Strided1 actions,
                          const std::string& actions_dtype, double temperature, py::object lse, py::object entropy,
                          py::object grad_logprob, py::object grad_entropy, py::object grad_logits, int device,
                          std::uintptr_t stream) {
  fastppo::CategoricalArgs a = categorical_args(rows, A, dtype, logits, actions, actions_dtype, temperature);
  a.lse = address(lse);
  a.entropy = address(entropy);
  optional_vector(grad_logprob, &a.grad_logprob, &a.grad_logprob_s);
  optional_vector(grad_entropy, &a.grad_entropy, &a.grad_entropy_s);
  a.grad_logits = address(grad_logits);
  if (rows == 0) return;
  run_on(device, stream, fastppo::categorical_backward_cpu, fastppo::categorical_backward_cuda, a);
}

fastppo::NormalArgs normal_args(int64_t rows, int64_t D, const std::string& dtype, Strided2 mean, Strided2 log_std,
                                Strided2 actions) {
  if (rows < 0 || D < 1) throw py::value_error("fastppo._C.normal: rows must be >= 0 and D >= 1");
  fastppo::NormalArgs a;
  a.rows = rows;
  a.D = D;
  a.is_f64 = float_is_f64(dtype);
  std::tie(std::ignore, a.mean_sr, a.mean_sc) = mean;
  a.mean = pointer(std::get<0>(mean));
  std::tie(std::ignore, a.log_std_sr, a.log_std_sc) = log_std;
  a.log_std = pointer(std::get<0>(log_std));
  std::tie(std::ignore, a.actions_sr, a.actions_sc) = actions;
  a.actions = pointer(std::get<0>(actions));
  return a;
}

void normal_forward(int64_t rows, int64_t D, const std::string& dtype, Strided2 mean, Strided2 log_std,
                    Strided2 actions, py::object logprob, py::object entropy, int device, std::uintptr_t stream) {
  fastppo::NormalArgs a = normal_args(rows, D, dtype, mean, log_std, actions);
  a.logprob = address(logprob);
  a.entropy = address(entropy);
  if (rows == 0) return;
  py::gil_scoped_release no_gil;
  if (device < 0) return fastppo::normal_forward_cpu(a);
#if FASTPPO_WITH_CUDA
  fastppo::normal_forward_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error("fastppo._C.normal: this build of fastppo has no CUDA support");
#endif
}

void normal_backward(int64_t rows, int64_t D, const std::string& dtype, Strided2 mean, Strided2 log_std,
                     Strided2 actions, py::object grad_logprob, py::object grad_entropy, py::object grad_mean,
                     py::object grad_log_std, py::object partials, int device, std::uintptr_t stream) {
  fastppo::NormalArgs a = normal_args(rows, D, dtype, mean, log_std, actions);
  optional_vector(grad_logprob, &a.grad_logprob, &a.grad_logprob_s);
  optional_vector(grad_entropy, &a.grad_entropy, &a.grad_entropy_s);
  a.grad_mean = address(grad_mean);
  a.grad_log_std = address(grad_log_std);
  a.partials = static_cast<double*>(optional_address(partials));
  if (a.log_std_sr == 0 && !a.partials) throw py::value_error("fastppo._C.normal: a shared log_std needs partials");
  py::gil_scoped_release no_gil;
  if (device < 0) return fastppo::normal_backward_cpu(a);
#if FASTPPO_WITH_CUDA
  fastppo::normal_backward_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error("fastppo._C.normal: this build of fastppo has no CUDA support");
#endif
}

int obs_type(const std::string& dtype, const char* name) {
  if (dtype == "float32") return 0;
  if (dtype == "float64") return 1;
  if (dtype == "uint8") return 2;
  throw py::type_error(std::string("fastppo._C.env_step: ") + name + " dtype must be float32, float64 or uint8, got '" + dtype + "'");
}

// Every array is C-contiguous host memory; fastppo.envstep checks that before calling.
int64_t env_step(int64_t N, int64_t obs_dim, py::object obs, const std::string& obs_dtype, py::object reward,
                 bool reward_f64, py::object terminated, py::object truncated, py::object episode_reward,
                 bool episode_reward_f64, py::object episode_over, bool normalize_obs, bool normalize_reward,
                 bool update_stats, double gamma, double clip, py::object obs_count, py::object obs_mean,
                 py::object obs_m2, py::object return_count, py::object return_mean, py::object return_m2,
                 py::object discounted_return, py::object episode_return, py::object episode_length,
                 py::object previous_done, py::object obs_out, const std::string& obs_out_dtype,
                 py::object reward_out, py::object done_out, py::object terminated_out, py::object real_out,
                 py::object finished_return, py::object finished_length, py::object finished,
                 py::object env_ids) {
  if (N < 0 || obs_dim < 0) throw py::value_error("fastppo._C.env_step: N and obs_dim must be >= 0");
  fastppo::EnvStepArgs a;
  a.N = N;
  a.env_ids = static_cast<const int32_t*>(optional_address(env_ids));
  a.obs_dim = obs_dim;
  a.obs = address(obs);
  a.obs_type = obs_type(obs_dtype, "obs");
  a.reward = address(reward);
  a.reward_f64 = reward_f64;
  a.terminated = static_cast<const uint8_t*>(address(terminated));
  a.truncated = static_cast<const uint8_t*>(address(truncated));
  a.episode_reward = address(episode_reward);
  a.episode_reward_f64 = episode_reward_f64;
  a.episode_over = static_cast<const uint8_t*>(optional_address(episode_over));
  a.normalize_obs = normalize_obs;
  a.normalize_reward = normalize_reward;
  a.update_stats = update_stats;
  a.gamma = gamma;
  a.clip = clip;
  a.obs_stats = {static_cast<double*>(address(obs_count)), static_cast<double*>(address(obs_mean)),
                 static_cast<double*>(address(obs_m2)), obs_dim};
  a.return_stats = {static_cast<double*>(address(return_count)), static_cast<double*>(address(return_mean)),
                    static_cast<double*>(address(return_m2)), 1};
  a.discounted_return = static_cast<double*>(address(discounted_return));
  a.episode_return = static_cast<double*>(address(episode_return));
  a.episode_length = static_cast<int64_t*>(address(episode_length));
  a.previous_done = static_cast<uint8_t*>(address(previous_done));
  a.obs_out = address(obs_out);
  a.obs_out_type = obs_type(obs_out_dtype, "obs_out");
  if (normalize_obs && a.obs_out_type != 0) throw py::type_error("fastppo._C.env_step: normalized obs_out must be float32");
  if (!normalize_obs && a.obs_out_type == 2 && a.obs_type != 2)
    throw py::type_error("fastppo._C.env_step: a uint8 obs_out needs uint8 obs");
  a.reward_out = static_cast<float*>(address(reward_out));
  a.done_out = static_cast<uint8_t*>(address(done_out));
  a.terminated_out = static_cast<uint8_t*>(address(terminated_out));
  a.real_out = static_cast<uint8_t*>(address(real_out));
  a.finished_return = static_cast<double*>(address(finished_return));
  a.finished_length = static_cast<int64_t*>(address(finished_length));
  a.finished = static_cast<uint8_t*>(address(finished));
  py::gil_scoped_release no_gil;
  return fastppo::env_step(a);
}

void kl_rewards(int64_t R, int64_t C, const std::string& dtype, Strided2 logprob, Strided2 ref_logprob,
                py::object mask, const std::string& mask_dtype, py::object scores, double beta, int estimator,
                double clamp, py::object rewards, py::object kl, py::object last, int device, std::uintptr_t stream) {
  if (R < 0 || C < 0) throw py::value_error("fastppo._C.kl_rewards: R and C must be >= 0");
  if (estimator < fastppo::kKlK1 || estimator > fastppo::kKlK3)
    throw py::value_error("fastppo._C.kl_rewards: estimator must be 0 (k1), 1 (k2) or 2 (k3)");
  fastppo::KlRewardArgs a;
  a.R = R;
  a.C = C;
  a.is_f64 = float_is_f64(dtype);
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
  if (R > 0 && (!a.last || (C > 0 && (!a.rewards || !a.kl || !a.logprob.data || !a.ref_logprob.data))))
    throw py::value_error("fastppo._C.kl_rewards: missing input or output buffer");
  py::gil_scoped_release no_gil;
  if (device < 0) return fastppo::kl_rewards_cpu(a);
#if FASTPPO_WITH_CUDA
  fastppo::kl_rewards_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error("fastppo._C.kl_rewards: this build of fastppo has no CUDA support");
#endif
}

void masked_whiten(int64_t R, int64_t C, const std::string& dtype, Strided2 x, py::object mask,
                   const std::string& mask_dtype, bool shift_mean, double eps, py::object out, py::object partials,
                   py::object stats, int device, std::uintptr_t stream) {
  if (R < 0 || C < 0) throw py::value_error("fastppo._C.masked_whiten: R and C must be >= 0");
  if (!(eps >= 0.0)) throw py::value_error("fastppo._C.masked_whiten: eps must be >= 0");
  fastppo::WhitenArgs a;
  a.R = R;
  a.C = C;
  a.is_f64 = float_is_f64(dtype);
  a.x = strided(x);
  a.mask = optional_strided(mask);
  if (a.mask.data) a.mask_type = flag_type(mask_dtype, "mask");
  a.shift_mean = shift_mean;
  a.eps = eps;
  a.out = optional_address(out);
  a.partials = static_cast<double*>(optional_address(partials));
  a.stats = static_cast<double*>(optional_address(stats));
  if (!a.stats || (R * C > 0 && (!a.out || !a.partials || !a.x.data)))
    throw py::value_error("fastppo._C.masked_whiten: missing input, output or workspace buffer");
  py::gil_scoped_release no_gil;
  if (device < 0) return fastppo::masked_whiten_cpu(a);
#if FASTPPO_WITH_CUDA
  fastppo::masked_whiten_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error("fastppo._C.masked_whiten: this build of fastppo has no CUDA support");
#endif
}

void token_gae(int64_t R, int64_t C, const std::string& dtype, Strided2 rewards, Strided2 values, Strided1 last,
               double gamma, double lam, py::object adv, py::object ret, int device, std::uintptr_t stream) {
  if (R < 0 || C < 0) throw py::value_error("fastppo._C.token_gae: R and C must be >= 0");
  if (!(gamma >= 0.0 && gamma <= 1.0)) throw py::value_error("fastppo._C.token_gae: gamma must be in [0, 1]");
  if (!(lam >= 0.0 && lam <= 1.0)) throw py::value_error("fastppo._C.token_gae: lam must be in [0, 1]");
  fastppo::TokenGaeArgs a;
  a.R = R;
  a.C = C;
  a.is_f64 = float_is_f64(dtype);
  a.rewards = strided(rewards);
  a.values = strided(values);
  a.last = static_cast<const int64_t*>(pointer(std::get<0>(last)));
  a.last_stride = std::get<1>(last);
  a.gamma = gamma;
  a.lam = lam;
  a.adv = optional_address(adv);
  a.ret = optional_address(ret);
  if (R * C == 0) return;
  if (!a.rewards.data || !a.values.data || !a.last || !a.adv || !a.ret)
    throw py::value_error("fastppo._C.token_gae: missing input or output buffer");
  py::gil_scoped_release no_gil;
  if (device < 0) return fastppo::token_gae_cpu(a);
#if FASTPPO_WITH_CUDA
  fastppo::token_gae_cuda(a, device, stream);
#else
  (void)stream;
  throw std::runtime_error("fastppo._C.token_gae: this build of fastppo has no CUDA support");
#endif
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTPPO_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["openmp"] = true;
  info["openmp_version"] = _OPENMP;
  info["openmp_max_threads"] = omp_get_max_threads();
  info["cpu_isa"] = fastppo::cpu_isa();
  info["cuda"] = static_cast<bool>(FASTPPO_WITH_CUDA);
  info["cuda_architectures"] = FASTPPO_CUDA_ARCHS;
#if FASTPPO_WITH_CUDA
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda_runtime_version"] = py::none();
#endif
  return info;
}

}  // namespace

void bind_mlp(py::module_& m);  // bindings_mlp.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastppo compiled kernels over raw buffers (see fastppo for the public API)";
  m.attr("__version__") = FASTPPO_VERSION;
  m.attr("WITH_CUDA") = static_cast<bool>(FASTPPO_WITH_CUDA);
  m.def("build_info", &build_info, "Dict describing how this module was compiled.");
  m.def("cuda_device_count", &cuda_device_count,
        "Number of CUDA devices the compiled runtime sees (0 on a CPU-only build or without a driver).");
  m.def("gae", &gae, py::arg("T"), py::arg("N"), py::arg("dtype"), py::arg("rewards"), py::arg("values"),
        py::arg("dones"), py::arg("dones_dtype"), py::arg("terminated"), py::arg("terminated_dtype"),
        py::arg("last_value"), py::arg("adv"), py::arg("ret"), py::arg("gamma"), py::arg("lam"),
        py::arg("device"), py::arg("stream"),
        "GAE over a [T, N] problem given as raw buffers; writes contiguous [T, N] adv and ret.");
  m.def("env_step", &env_step, "One environment step's bookkeeping (see csrc/env_step.h); returns episodes ended.");
  m.attr("NORMAL_CHUNK") = fastppo::kNormalChunk;
  m.def("categorical_forward", &categorical_forward, py::arg("rows"), py::arg("A"), py::arg("dtype"), py::arg("logits"),
        py::arg("actions"), py::arg("actions_dtype"), py::arg("temperature"), py::arg("logprob"), py::arg("entropy"),
        py::arg("lse"), py::arg("device"), py::arg("stream"),
        "Categorical head forward over [rows, A] logits: writes logprob, entropy and lse ([rows] each).");
  m.def("categorical_sample", &categorical_sample, py::arg("rows"), py::arg("A"), py::arg("dtype"), py::arg("logits"),
        py::arg("noise"), py::arg("noise_sr"), py::arg("temperature"), py::arg("actions"), py::arg("logprob"),
        py::arg("entropy"), py::arg("lse"),
        "CPU: Gumbel-max sample of one action per row of logits / temperature from uniform noise [rows, A], "
        "then its log-prob, the entropy and the log-sum-exp: writes actions (int64), logprob, entropy, lse.");
  m.def("categorical_backward", &categorical_backward, py::arg("rows"), py::arg("A"), py::arg("dtype"),
        py::arg("logits"), py::arg("actions"), py::arg("actions_dtype"), py::arg("temperature"), py::arg("lse"),
        py::arg("entropy"), py::arg("grad_logprob"), py::arg("grad_entropy"), py::arg("grad_logits"),
        py::arg("device"), py::arg("stream"), "Categorical head backward: writes contiguous [rows, A] grad_logits.");
  m.def("normal_forward", &normal_forward, py::arg("rows"), py::arg("D"), py::arg("dtype"), py::arg("mean"),
        py::arg("log_std"), py::arg("actions"), py::arg("logprob"), py::arg("entropy"), py::arg("device"),
        py::arg("stream"), "Diagonal Gaussian head forward: writes logprob and entropy ([rows] each).");
  m.def("normal_backward", &normal_backward, py::arg("rows"), py::arg("D"), py::arg("dtype"), py::arg("mean"),
        py::arg("log_std"), py::arg("actions"), py::arg("grad_logprob"), py::arg("grad_entropy"),
        py::arg("grad_mean"), py::arg("grad_log_std"), py::arg("partials"), py::arg("device"), py::arg("stream"),
        "Diagonal Gaussian head backward: writes grad_mean [rows, D] and grad_log_std ([rows, D], or [D] when shared).");
  m.attr("LOSS_CHUNK") = fastppo::kLossChunk;
  m.attr("LOSS_SUMS") = static_cast<int>(fastppo::kLossSums);
  m.attr("LOSS_STATS") = static_cast<int>(fastppo::kLossStats);
  m.def("ppo_loss", &ppo_loss, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("new_logprob"),
        py::arg("old_logprob"), py::arg("advantages"), py::arg("new_value"), py::arg("old_value"),
        py::arg("returns"), py::arg("entropy"), py::arg("mask"), py::arg("mask_dtype"), py::arg("clip_coef"),
        py::arg("vf_coef"), py::arg("ent_coef"), py::arg("vf_clip_coef"), py::arg("dual_clip"),
        py::arg("clip_vloss"), py::arg("norm_adv"), py::arg("agg"), py::arg("grad_logprob"),
        py::arg("grad_value"), py::arg("loss"), py::arg("stats"), py::arg("row_scale"), py::arg("partials"), py::arg("adv_stats"),
        py::arg("device"), py::arg("stream"),
        "Fused clipped PPO loss over an [R, C] problem: writes loss, stats[6] (pg, v, entropy, approx_kl, "
        "old_approx_kl, clipfrac), the gradients grad_logprob / grad_value ([R, C], contiguous) "
        "of the loss, and row_scale[R] (d loss / d entropy = -ent_coef * row_scale).");
  m.attr("WHITEN_CHUNK") = fastppo::kLossChunk;
  m.def("kl_rewards", &kl_rewards, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("logprob"),
        py::arg("ref_logprob"), py::arg("mask"), py::arg("mask_dtype"), py::arg("scores"), py::arg("beta"),
        py::arg("estimator"), py::arg("clamp"), py::arg("rewards"), py::arg("kl"), py::arg("last"), py::arg("device"),
        py::arg("stream"),
        "Per-token KL estimate vs the reference and shaped rewards -beta*kl (+ score at each row's last selected "
        "token) over [R, C]: writes contiguous rewards and kl [R, C] and last [R] (int64, -1 for an empty row).");
  m.def("masked_whiten", &masked_whiten, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("x"), py::arg("mask"),
        py::arg("mask_dtype"), py::arg("shift_mean"), py::arg("eps"), py::arg("out"), py::arg("partials"),
        py::arg("stats"), py::arg("device"), py::arg("stream"),
        "Masked whitening over [R, C]: writes contiguous out [R, C] (0 where unselected) and stats[3] "
        "(count, mean, unbiased variance of the selected elements).");
  m.def("token_gae", &token_gae, py::arg("R"), py::arg("C"), py::arg("dtype"), py::arg("rewards"), py::arg("values"),
        py::arg("last"), py::arg("gamma"), py::arg("lam"), py::arg("adv"), py::arg("ret"), py::arg("device"),
        py::arg("stream"),
        "GAE along each row of [R, C] tokens, ending at last[r] (no bootstrap): writes contiguous adv and ret, "
        "0 after the last token.");
  bind_mlp(m);
}
