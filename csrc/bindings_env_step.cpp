// Bindings of the environment boundary (env_step.h): EnvStepper holds the addresses of a batch of
// environments' running state once, so that each step passes only that step's arrays.
// python/fastppo/envstep.py checks shapes, dtypes and contiguity; every array is host memory.
#include "bindings_common.h"
#include "env_step.h"

namespace fastppo::bind {
namespace {

// 0 float32, 1 float64, 2 uint8: the observation types env_step reads.
int obs_type(const py::array& a, const char* name) {
  const char kind = a.dtype().kind();
  if (kind == 'f' && a.itemsize() == 4) return 0;
  if (kind == 'f' && a.itemsize() == 8) return 1;
  if (kind == 'u' && a.itemsize() == 1) return 2;
  throw py::type_error(std::string("fastppo._C.EnvStepper: ") + name + " dtype must be float32, float64 or uint8, got '" +
                       py::str(a.dtype()).cast<std::string>() + "'");
}

bool is_f64(const py::array& a) { return a.dtype().kind() == 'f' && a.itemsize() == 8; }

class EnvStepper {
 public:
  EnvStepper(int64_t N, int64_t obs_dim, bool normalize_obs, bool normalize_reward, double gamma, double clip,
             py::array obs_count, py::array obs_mean, py::array obs_m2, py::array return_count, py::array return_mean,
             py::array return_m2, py::array discounted_return, py::array episode_return, py::array episode_length,
             py::array previous_done, py::array finished_return, py::array finished_length, py::array finished)
      : state_(py::make_tuple(obs_count, obs_mean, obs_m2, return_count, return_mean, return_m2, discounted_return,
                              episode_return, episode_length, previous_done, finished_return, finished_length,
                              finished)) {
    require(N >= 0 && obs_dim >= 0, "EnvStepper", "N and obs_dim must be >= 0");
    a_.N = N;
    a_.obs_dim = obs_dim;
    a_.normalize_obs = normalize_obs;
    a_.normalize_reward = normalize_reward;
    a_.gamma = gamma;
    a_.clip = clip;
    a_.obs_stats = {typed<double>(obs_count), typed<double>(obs_mean), typed<double>(obs_m2), obs_dim};
    a_.return_stats = {typed<double>(return_count), typed<double>(return_mean), typed<double>(return_m2), 1};
    a_.discounted_return = typed<double>(discounted_return);
    a_.episode_return = typed<double>(episode_return);
    a_.episode_length = typed<int64_t>(episode_length);
    a_.previous_done = typed<uint8_t>(previous_done);
    a_.finished_return = typed<double>(finished_return);
    a_.finished_length = typed<int64_t>(finished_length);
    a_.finished = typed<uint8_t>(finished);
  }

  // Sends each step's moments to these pending stats (same shapes as the running ones) instead of
  // the running stats, which stay as they are until the caller merges the pending in.
  void defer_stats(py::array obs_count, py::array obs_mean, py::array obs_m2, py::array return_count,
                   py::array return_mean, py::array return_m2) {
    pending_ = py::make_tuple(obs_count, obs_mean, obs_m2, return_count, return_mean, return_m2);
    a_.obs_pending = {typed<double>(obs_count), typed<double>(obs_mean), typed<double>(obs_m2), a_.obs_dim};
    a_.return_pending = {typed<double>(return_count), typed<double>(return_mean), typed<double>(return_m2), 1};
    a_.defer_stats = true;
  }

  // One step of `rows` environments (all N, or the async batch named by env_ids) written into
  // the *_out arrays. Returns the number of episodes that ended.
  int64_t step(int64_t rows, const py::array& obs, const py::array& reward, const py::array& terminated,
               const py::array& truncated, const py::array& episode_reward, const py::object& episode_over,
               bool update_stats, py::array obs_out, py::array reward_out, py::array done_out,
               py::array terminated_out, py::array real_out, const py::object& env_ids) {
    require(rows >= 0 && rows <= a_.N, "EnvStepper.step", "rows must be in [0, N]");
    EnvStepArgs a = inputs(rows, obs, reward, terminated, truncated);
    a.episode_reward = episode_reward.data();
    a.episode_reward_f64 = is_f64(episode_reward);
    a.episode_over = static_cast<const uint8_t*>(optional_address(episode_over));
    a.env_ids = static_cast<const int32_t*>(optional_address(env_ids));
    a.update_stats = update_stats;
    return run(a, obs_out.mutable_data(), obs_type(obs_out, "obs_out"), reward_out.mutable_data(),
               done_out.mutable_data(), terminated_out.mutable_data(), real_out.mutable_data());
  }

  // Binds rollout storage by address: row t of each [T, N] output is at base + t * step (bytes);
  // observations go to row t + 1 of obs_out.
  void bind_rollout(std::uintptr_t obs_out, int64_t obs_step, const py::array& obs_like, std::uintptr_t reward_out,
                    int64_t reward_step, std::uintptr_t done_out, int64_t done_step, std::uintptr_t terminated_out,
                    int64_t terminated_step, std::uintptr_t real_out, int64_t real_step) {
    bound_ = {obs_out, obs_step, reward_out, reward_step, done_out, done_step, terminated_out, terminated_step,
              real_out, real_step, obs_type(obs_like, "obs_out")};
  }

  // step() of all N environments into row t of the bound storage.
  int64_t step_at(int64_t t, const py::array& obs, const py::array& reward, const py::array& terminated,
                  const py::array& truncated) {
    require(bound_.obs != 0, "EnvStepper.step_at", "call bind_rollout first");
    EnvStepArgs a = inputs(a_.N, obs, reward, terminated, truncated);
    a.episode_reward = a.reward;
    a.episode_reward_f64 = a.reward_f64;
    const auto at = [t](std::uintptr_t base, int64_t step) { return reinterpret_cast<void*>(base + t * step); };
    return run(a, at(bound_.obs + bound_.obs_step, bound_.obs_step), bound_.obs_type, at(bound_.reward, bound_.reward_step),
               at(bound_.done, bound_.done_step), at(bound_.terminated, bound_.terminated_step),
               at(bound_.real, bound_.real_step));
  }

 private:
  EnvStepArgs inputs(int64_t rows, const py::array& obs, const py::array& reward, const py::array& terminated,
                     const py::array& truncated) const {
    EnvStepArgs a = a_;
    a.N = rows;
    a.obs = obs.data();
    a.obs_type = obs_type(obs, "obs");
    a.reward = reward.data();
    a.reward_f64 = is_f64(reward);
    a.terminated = static_cast<const uint8_t*>(terminated.data());
    a.truncated = static_cast<const uint8_t*>(truncated.data());
    return a;
  }

  int64_t run(EnvStepArgs& a, void* obs_out, int obs_out_type, void* reward_out, void* done_out, void* terminated_out,
              void* real_out) {
    if (a.normalize_obs && obs_out_type != 0)
      throw py::type_error("fastppo._C.EnvStepper: normalized obs_out must be float32");
    if (!a.normalize_obs && obs_out_type == 2 && a.obs_type != 2)
      throw py::type_error("fastppo._C.EnvStepper: a uint8 obs_out needs uint8 obs");
    a.obs_out = obs_out;
    a.obs_out_type = obs_out_type;
    a.reward_out = static_cast<float*>(reward_out);
    a.done_out = static_cast<uint8_t*>(done_out);
    a.terminated_out = static_cast<uint8_t*>(terminated_out);
    a.real_out = static_cast<uint8_t*>(real_out);
    py::gil_scoped_release no_gil;
    return env_step(a);
  }

  struct Bound {
    std::uintptr_t obs = 0; int64_t obs_step = 0;
    std::uintptr_t reward = 0; int64_t reward_step = 0;
    std::uintptr_t done = 0; int64_t done_step = 0;
    std::uintptr_t terminated = 0; int64_t terminated_step = 0;
    std::uintptr_t real = 0; int64_t real_step = 0;
    int obs_type = 0;
  };
  py::tuple state_, pending_;  // keep the state arrays alive
  EnvStepArgs a_;
  Bound bound_;
};

}  // namespace

void bind_env_step(py::module_& m) {
  py::class_<EnvStepper>(m, "EnvStepper",
                         "One environment step's bookkeeping (csrc/env_step.h) over running state held by address.")
      .def(py::init<int64_t, int64_t, bool, bool, double, double, py::array, py::array, py::array, py::array,
                    py::array, py::array, py::array, py::array, py::array, py::array, py::array, py::array,
                    py::array>(),
           py::arg("N"), py::arg("obs_dim"), py::arg("normalize_obs"), py::arg("normalize_reward"), py::arg("gamma"),
           py::arg("clip"), py::arg("obs_count"), py::arg("obs_mean"), py::arg("obs_m2"), py::arg("return_count"),
           py::arg("return_mean"), py::arg("return_m2"), py::arg("discounted_return"), py::arg("episode_return"),
           py::arg("episode_length"), py::arg("previous_done"), py::arg("finished_return"),
           py::arg("finished_length"), py::arg("finished"))
      .def("step", &EnvStepper::step, py::arg("rows"), py::arg("obs"), py::arg("reward"), py::arg("terminated"),
           py::arg("truncated"), py::arg("episode_reward"), py::arg("episode_over"), py::arg("update_stats"),
           py::arg("obs_out"), py::arg("reward_out"), py::arg("done_out"), py::arg("terminated_out"),
           py::arg("real_out"), py::arg("env_ids"), "One step into the *_out arrays; returns the episodes ended.")
      .def("defer_stats", &EnvStepper::defer_stats, py::arg("obs_count"), py::arg("obs_mean"), py::arg("obs_m2"),
           py::arg("return_count"), py::arg("return_mean"), py::arg("return_m2"),
           "Sends each step's moments to these pending stats instead of the running ones.")
      .def("bind_rollout", &EnvStepper::bind_rollout, py::arg("obs_out"), py::arg("obs_step"), py::arg("obs_like"),
           py::arg("reward_out"), py::arg("reward_step"), py::arg("done_out"), py::arg("done_step"),
           py::arg("terminated_out"), py::arg("terminated_step"), py::arg("real_out"), py::arg("real_step"),
           "Binds [T, N] rollout storage by address (steps in bytes; obs_like gives the obs dtype).")
      .def("step_at", &EnvStepper::step_at, py::arg("t"), py::arg("obs"), py::arg("reward"), py::arg("terminated"),
           py::arg("truncated"), "step() of all N environments into row t of the bound storage.");
}

}  // namespace fastppo::bind
