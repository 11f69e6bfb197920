// What every bindings_*.cpp file shares: buffer specs, dtype names and the CPU / CUDA dispatch.
// The compiled core never sees a numpy array or a torch tensor, only (address, element strides,
// dtype name, device, stream), so one build serves numpy and every torch version. Argument checks
// with user-facing messages live in python/fastppo; the checks here only guard the C++ against a
// caller that skipped them.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "fastppo_math.h"
#include "ppo_loss.h"

namespace fastppo::bind {

namespace py = pybind11;

// A buffer's data is an integer address (torch's data_ptr()) or the numpy array itself, whose
// pointer is read here in nanoseconds rather than through numpy's ctypes helper.
inline void* address(py::handle data) {
  if (py::isinstance<py::array>(data)) return const_cast<void*>(py::reinterpret_borrow<py::array>(data).data());
  return reinterpret_cast<void*>(data.cast<std::uintptr_t>());
}
inline void* optional_address(const py::object& data) { return data.is_none() ? nullptr : address(data); }
template <typename T>
T* typed(py::handle data) {
  return static_cast<T*>(address(data));
}

// (data, stride over rows, stride over columns) and (data, stride), strides in elements.
using Strided2 = std::tuple<py::object, int64_t, int64_t>;
using Strided1 = std::tuple<py::object, int64_t>;

inline Strided strided(const Strided2& spec) {
  return Strided{address(std::get<0>(spec)), std::get<1>(spec), std::get<2>(spec)};
}
// An optional [R, C] input: None, or (data, stride over R, stride over C).
inline Strided optional_strided(const py::object& spec) {
  return spec.is_none() ? Strided{} : strided(spec.cast<Strided2>());
}
// An optional [rows] vector: None (left null), or (data, stride).
inline void optional_vector(const py::object& spec, const void** data, int64_t* stride) {
  if (spec.is_none()) return;
  const auto t = spec.cast<Strided1>();
  *data = address(std::get<0>(t));
  *stride = std::get<1>(t);
}

inline bool float_is_f64(const std::string& dtype, const char* name = "dtype") {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  throw py::type_error(std::string("fastppo._C: ") + name + " must be 'float32' or 'float64', got '" + dtype + "'");
}

// A 0/1 flag or mask array: bool, integers or floats.
inline int flag_type(const std::string& dtype, const char* name) {
  if (dtype == "bool" || dtype == "uint8") return kFlagU8;
  if (dtype == "int8") return kFlagI8;
  if (dtype == "int32") return kFlagI32;
  if (dtype == "int64") return kFlagI64;
  if (dtype == "float32") return kFlagF32;
  if (dtype == "float64") return kFlagF64;
  throw py::type_error(std::string("fastppo._C: ") + name +
                       " dtype must be bool, uint8, int8, int32, int64, float32 or float64, got '" + dtype + "'");
}

inline void require(bool ok, const char* op, const std::string& what) {
  if (!ok) throw py::value_error(std::string("fastppo._C.") + op + ": " + what);
}

// Launchers of an op over its argument struct; Args is deduced from the struct alone, so a null
// CUDA launcher can be passed.
inline void require_unit_interval(double x, const char* op, const char* name) {
  require(x >= 0.0 && x <= 1.0, op, std::string(name) + " must be in [0, 1]");
}

// The argument struct of an [R, C] op with its size and float type filled in.
template <typename Args>
Args rows_cols_args(const char* op, int64_t R, int64_t C, const std::string& dtype) {
  require(R >= 0 && C >= 0, op, "R and C must be >= 0");
  Args a;
  a.R = R;
  a.C = C;
  a.is_f64 = float_is_f64(dtype);
  return a;
}

inline LossOptions loss_options(double clip_coef, double vf_coef, double ent_coef, double vf_clip_coef,
                                double dual_clip, bool clip_vloss, bool norm_adv) {
  LossOptions o;
  o.clip_coef = clip_coef;
  o.vf_coef = vf_coef;
  o.ent_coef = ent_coef;
  o.vf_clip_coef = vf_clip_coef;
  o.dual_clip = dual_clip;
  o.clip_vloss = clip_vloss;
  o.norm_adv = norm_adv;
  return o;
}

template <typename Args>
struct Launchers {
  using Cpu = void (*)(const Args&);
  using Cuda = void (*)(const Args&, int, std::uintptr_t);
};

// The CUDA launcher of an op, or null in a CPU-only build (where it is not compiled).
#if FASTPPO_WITH_CUDA
#define FASTPPO_CUDA_LAUNCHER(fn) (&fastppo::fn)
#else
#define FASTPPO_CUDA_LAUNCHER(fn) nullptr
#endif

// Runs an op without the GIL: on the CPU when device < 0, else on `stream` of CUDA `device`.
template <typename Args>
void dispatch(const char* op, int device, std::uintptr_t stream, typename Launchers<Args>::Cpu cpu,
              typename Launchers<Args>::Cuda cuda, const Args& args) {
  if (device >= 0 && !cuda)
    throw std::runtime_error(std::string("fastppo._C.") + op + ": this build of fastppo has no CUDA support");
  py::gil_scoped_release no_gil;
  if (device < 0) return cpu(args);
  cuda(args, device, stream);
}

// Registration of each op family (bindings_<family>.cpp), called by the module in bindings.cpp.
void bind_gae(py::module_& m);
void bind_loss(py::module_& m);
void bind_heads(py::module_& m);
void bind_rlhf(py::module_& m);
void bind_env_step(py::module_& m);
void bind_actor_critic(py::module_& m);
void bind_rnn(py::module_& m);

}  // namespace fastppo::bind
