// Bindings of GAE over a time-major [T, N] rollout (gae.h).
#include "bindings_common.h"
#include "gae.h"

namespace fastppo::bind {
namespace {

void gae(int64_t T, int64_t N, const std::string& dtype, Strided2 rewards, Strided2 values, Strided2 dones,
         const std::string& dones_dtype, Strided2 terminated, const std::string& terminated_dtype,
         Strided1 last_value, py::object adv, py::object ret, double gamma, double lam, int device,
         std::uintptr_t stream) {
  require(T >= 0 && N >= 0, "gae", "T and N must be >= 0");
  require_unit_interval(gamma, "gae", "gamma");
  require_unit_interval(lam, "gae", "lam");
  GaeArgs a;
  a.T = T;
  a.N = N;
  a.is_f64 = float_is_f64(dtype);
  const Strided r = strided(rewards), v = strided(values), d = strided(dones), k = strided(terminated);
  a.rewards = r.data, a.rewards_st = r.sr, a.rewards_sn = r.sc;
  a.values = v.data, a.values_st = v.sr, a.values_sn = v.sc;
  a.dones = d.data, a.dones_st = d.sr, a.dones_sn = d.sc;
  a.dones_type = flag_type(dones_dtype, "dones");
  a.terminated = k.data, a.terminated_st = k.sr, a.terminated_sn = k.sc;
  a.terminated_type = flag_type(terminated_dtype, "terminated");
  a.last_value = address(std::get<0>(last_value));
  a.last_value_sn = std::get<1>(last_value);
  a.adv = address(adv);
  a.ret = address(ret);
  a.gamma = gamma;
  a.lam = lam;
  if (T == 0 || N == 0) return;
  require(a.rewards && a.values && a.dones && a.terminated && a.last_value && a.adv && a.ret, "gae",
          "null data pointer");
  dispatch("gae", device, stream, gae_cpu, FASTPPO_CUDA_LAUNCHER(gae_cuda), a);
}

}  // namespace

void bind_gae(py::module_& m) {
  m.def("gae", &gae, py::arg("T"), py::arg("N"), py::arg("dtype"), py::arg("rewards"), py::arg("values"),
        py::arg("dones"), py::arg("dones_dtype"), py::arg("terminated"), py::arg("terminated_dtype"),
        py::arg("last_value"), py::arg("adv"), py::arg("ret"), py::arg("gamma"), py::arg("lam"),
        py::arg("device"), py::arg("stream"),
        "GAE over a [T, N] problem given as raw buffers; writes contiguous [T, N] adv and ret.");
}

}  // namespace fastppo::bind
