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

#include "gae.h"
#include "ppo_loss.h"

#if FASTPPO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;
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
}
