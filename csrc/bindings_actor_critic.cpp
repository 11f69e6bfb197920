// Bindings of the fused actor-critic (actor_critic.h): mlp_forward / mlp_backward for an autograd op, and
// ActorCriticPlan, which holds the network's layout and parameter addresses so that the trainer's
// per-step and per-minibatch calls pass only a few integers. Addresses are Python ints (torch's
// data_ptr(), numpy's ctypes.data); python/fastppo/policy.py checks shapes, dtypes and devices.
#include <cmath>
#include <vector>

#include "bindings_common.h"
#include "actor_critic.h"

namespace fastppo::bind {
namespace {

// (weight, bias, grad_weight, grad_bias, in, out); a grad address of 0 means "not needed".
using LayerSpec = std::tuple<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t>;
// An LSTM: (w_ih, w_hh, b_ih, b_hh, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, F, H); biases 0 for none.
using LstmSpec = std::tuple<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                            std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t>;

template <typename T = void>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

int activation_code(const std::string& name) {
  if (name == "tanh") return kActTanh;
  if (name == "relu") return kActRelu;
  throw py::value_error("fastppo._C: activation must be 'tanh' or 'relu', got '" + name + "'");
}

MlpSpec mlp_spec(const std::vector<LayerSpec>& layers, const std::string& activation, bool last_linear,
                          bool allow_empty) {
  MlpSpec spec;
  if (layers.size() > static_cast<size_t>(kMaxMlpLayers))
    throw py::value_error("fastppo._C: at most " + std::to_string(kMaxMlpLayers) + " layers per MLP, got " +
                          std::to_string(layers.size()));
  if (layers.empty() && !allow_empty) throw py::value_error("fastppo._C: an MLP needs at least one layer");
  spec.n = static_cast<int>(layers.size());
  spec.act = activation_code(activation);
  spec.last_linear = last_linear;
  for (int i = 0; i < spec.n; ++i) {
    DenseLayer& L = spec.layer[i];
    std::uintptr_t w, b, gw, gb;
    std::tie(w, b, gw, gb, L.in, L.out) = layers[i];
    if (w == 0 || b == 0 || L.in <= 0 || L.out <= 0)
      throw py::value_error("fastppo._C: layer " + std::to_string(i) + " needs weight and bias and in, out > 0");
    if (i > 0 && L.in != spec.layer[i - 1].out)
      throw py::value_error("fastppo._C: layer " + std::to_string(i) + " takes " + std::to_string(L.in) +
                            " inputs but the layer before gives " + std::to_string(spec.layer[i - 1].out));
    L.w = ptr(w);
    L.b = ptr(b);
    L.grad_w = ptr(gw);
    L.grad_b = ptr(gb);
  }
  return spec;
}

void mlp_forward(const std::string& dtype, const std::vector<LayerSpec>& layers, const std::string& activation,
                 bool last_linear, int64_t rows, std::uintptr_t x, int64_t ldx, std::uintptr_t saved) {
  const MlpSpec spec = mlp_spec(layers, activation, last_linear, false);
  if (rows < 0 || ldx < spec.in_dim()) throw py::value_error("fastppo._C.mlp_forward: bad rows or row stride");
  if (rows == 0) return;
  const bool f64 = float_is_f64(dtype);
  py::gil_scoped_release no_gil;
  mlp_forward_cpu(spec, f64, rows, ptr(x), ldx, ptr(saved));
}

void mlp_backward(const std::string& dtype, const std::vector<LayerSpec>& layers, const std::string& activation,
                  bool last_linear, int64_t rows, std::uintptr_t x, int64_t ldx, std::uintptr_t saved,
                  std::uintptr_t grad_out, std::uintptr_t grad_x) {
  const MlpSpec spec = mlp_spec(layers, activation, last_linear, false);
  if (rows < 0 || ldx < spec.in_dim()) throw py::value_error("fastppo._C.mlp_backward: bad rows or row stride");
  const bool f64 = float_is_f64(dtype);
  py::gil_scoped_release no_gil;
  mlp_backward_cpu(spec, f64, rows, ptr(x), ldx, ptr(saved), ptr(grad_out), ptr(grad_x));
}

class ActorCriticPlan {
 public:
  ActorCriticPlan(const std::string& dtype, const std::string& activation, const std::vector<LayerSpec>& trunk,
                  const std::vector<LayerSpec>& actor, const std::vector<LayerSpec>& critic, bool continuous,
                  std::uintptr_t log_std, std::uintptr_t grad_log_std, std::uintptr_t params, std::uintptr_t grads,
                  std::uintptr_t exp_avg, std::uintptr_t exp_avg_sq, int64_t n_params, bool squashed,
                  const std::vector<int64_t>& nvec, const std::vector<LstmSpec>& rnn) {
    s_.is_f64 = float_is_f64(dtype);
    s_.trunk = mlp_spec(trunk, activation, false, true);
    s_.actor = mlp_spec(actor, activation, true, false);
    s_.critic = mlp_spec(critic, activation, true, false);
    if (s_.critic.out_dim() != 1) throw py::value_error("fastppo._C.ActorCriticPlan: the critic must end in 1 output");
    if (rnn.size() > 2) throw py::value_error("fastppo._C.ActorCriticPlan: at most 2 LSTMs (the actor's, the critic's)");
    if (!rnn.empty() && s_.trunk.n > 0)
      throw py::value_error("fastppo._C.ActorCriticPlan: a recurrent actor-critic has no trunk");
    s_.n_rnn = static_cast<int>(rnn.size());
    for (int r = 0; r < s_.n_rnn; ++r) {
      LstmLayer& L = s_.rnn[r];
      std::uintptr_t w_ih, w_hh, b_ih, b_hh, g_w_ih, g_w_hh, g_b_ih, g_b_hh;
      std::tie(w_ih, w_hh, b_ih, b_hh, g_w_ih, g_w_hh, g_b_ih, g_b_hh, L.F, L.H) = rnn[r];
      if (w_ih == 0 || w_hh == 0 || g_w_ih == 0 || g_w_hh == 0 || L.F <= 0 || L.H <= 0 || (b_ih == 0) != (b_hh == 0) ||
          (b_ih != 0 && (g_b_ih == 0 || g_b_hh == 0)))
        throw py::value_error("fastppo._C.ActorCriticPlan: LSTM " + std::to_string(r) +
                              " needs its weights, their gradients and F, H > 0");
      if (L.F != s_.rnn[0].F || L.H != s_.rnn[0].H)
        throw py::value_error("fastppo._C.ActorCriticPlan: the LSTMs must have the same input and hidden sizes");
      L.w_ih = ptr(w_ih), L.w_hh = ptr(w_hh), L.b_ih = ptr(b_ih), L.b_hh = ptr(b_hh);
      L.grad_w_ih = ptr(g_w_ih), L.grad_w_hh = ptr(g_w_hh), L.grad_b_ih = ptr(g_b_ih), L.grad_b_hh = ptr(g_b_hh);
    }
    const int64_t features = s_.n_rnn > 0 ? s_.rnn[0].H : s_.trunk.n > 0 ? s_.trunk.out_dim() : s_.actor.in_dim();
    if (s_.actor.in_dim() != features || s_.critic.in_dim() != features)
      throw py::value_error("fastppo._C.ActorCriticPlan: actor and critic must take the trunk's (or the observation's) width");
    s_.continuous = continuous;
    s_.n_out = s_.actor.out_dim();
    if (squashed && !continuous)
      throw py::value_error("fastppo._C.ActorCriticPlan: squashed is a Gaussian policy's (continuous) option");
    s_.squashed = squashed;
    if (continuous && !nvec.empty())
      throw py::value_error("fastppo._C.ActorCriticPlan: nvec is a discrete policy's; a Gaussian one takes none");
    // The discrete components' column offsets: one component of all A logits when nvec is empty.
    offsets_.assign(1, 0);
    for (int64_t n : nvec) {
      if (n < 1) throw py::value_error("fastppo._C.ActorCriticPlan: every nvec entry must be >= 1");
      offsets_.push_back(offsets_.back() + n);
    }
    if (nvec.empty()) offsets_.push_back(s_.n_out);
    if (!continuous && offsets_.back() != s_.n_out)
      throw py::value_error("fastppo._C.ActorCriticPlan: the actor gives " + std::to_string(s_.n_out) +
                            " logits but nvec sums to " + std::to_string(offsets_.back()));
    s_.K = static_cast<int64_t>(offsets_.size()) - 1;
    s_.offsets = offsets_.data();
    if (continuous && (log_std == 0 || grad_log_std == 0))
      throw py::value_error("fastppo._C.ActorCriticPlan: a Gaussian policy needs log_std and its gradient");
    s_.log_std = ptr(log_std);
    s_.grad_log_std = ptr(grad_log_std);
    s_.params = ptr(params);
    s_.grads = ptr(grads);
    s_.exp_avg = ptr(exp_avg);
    s_.exp_avg_sq = ptr(exp_avg_sq);
    s_.n_params = n_params;
    // Storage of every layer's W^T, for few-row forwards (rollout inference).
    int64_t total = 0;
    for (MlpSpec* spec : {&s_.trunk, &s_.actor, &s_.critic})
      for (int i = 0; i < spec->n; ++i) total += spec->layer[i].in * spec->layer[i].out;
    for (int r = 0; r < s_.n_rnn; ++r) total += 4 * s_.rnn[r].H * (s_.rnn[r].F + s_.rnn[r].H);
    transposed_.assign(static_cast<size_t>(total), 0.0);  // doubles: room for either dtype
    const size_t elem = s_.is_f64 ? sizeof(double) : sizeof(float);
    char* base = reinterpret_cast<char*>(transposed_.data());
    int64_t offset = 0;
    for (MlpSpec* spec : {&s_.trunk, &s_.actor, &s_.critic})
      for (int i = 0; i < spec->n; ++i) {
        spec->layer[i].wt = base + offset * elem;
        offset += spec->layer[i].in * spec->layer[i].out;
      }
    for (int r = 0; r < s_.n_rnn; ++r) {
      LstmLayer& L = s_.rnn[r];
      L.w_ih_t = base + offset * elem;
      offset += 4 * L.H * L.F;
      L.w_hh_t = base + offset * elem;
      offset += 4 * L.H * L.H;
    }
    s_.wt_current = true;
    actor_critic_transpose_cpu(s_);
  }

  // After the parameters were changed from outside (load_state_dict, a torch optimizer step).
  void refresh() { actor_critic_transpose_cpu(s_); }

  int64_t obs_dim() const { return s_.obs_dim(); }
  int64_t n_out() const { return s_.n_out; }
  int64_t n_components() const { return s_.K; }

  void act(int64_t rows, std::uintptr_t obs, int64_t ldobs, std::uintptr_t noise, std::uintptr_t action,
           std::uintptr_t logprob, std::uintptr_t value, std::uintptr_t env_action, std::uintptr_t low,
           std::uintptr_t high, std::uintptr_t mask, std::uintptr_t state, std::uintptr_t starts) {
    if (s_.n_rnn > 0 && state == 0)
      throw py::value_error("fastppo._C.ActorCriticPlan.act: a recurrent actor-critic's step needs its state "
                            "[2 * n_rnn, rows, H]");
    if (s_.n_rnn == 0 && (state != 0 || starts != 0))
      throw py::value_error("fastppo._C.ActorCriticPlan.act: state and starts are a recurrent actor-critic's");
    if (rows <= 0) return;
    if (mask && s_.continuous)
      throw py::value_error("fastppo._C.ActorCriticPlan.act: a mask selects among a discrete policy's actions");
    ActArgs a;
    a.mask = ptr<const uint8_t>(mask);
    a.rows = rows;
    a.obs = ptr(obs);
    a.ldobs = ldobs;
    a.noise = ptr(noise);
    a.action = ptr(action);
    a.logprob = ptr(logprob);
    a.value = ptr(value);
    a.env_action = ptr(env_action);
    a.low = ptr<const float>(low);
    a.high = ptr<const float>(high);
    a.state = ptr(state);
    a.starts = ptr<const uint8_t>(starts);
    if (s_.continuous && a.env_action && (!a.low || !a.high))
      throw py::value_error("fastppo._C.ActorCriticPlan.act: a continuous env action needs low and high");
    actor_critic_act_cpu(s_, a);
  }

  // Rollout storage for act_step: each buffer's address and bytes per step; T steps.
  void bind_rollout(int64_t rows, std::uintptr_t obs, int64_t obs_step, std::uintptr_t noise, int64_t noise_step,
                    std::uintptr_t action, int64_t action_step, std::uintptr_t logprob, int64_t logprob_step,
                    std::uintptr_t value, int64_t value_step, std::uintptr_t env_action, int64_t env_action_step,
                    std::uintptr_t low, std::uintptr_t high, int64_t T, std::uintptr_t mask, int64_t mask_step,
                    std::uintptr_t state, std::uintptr_t starts, int64_t starts_step) {
    if (mask && s_.continuous)
      throw py::value_error("fastppo._C.ActorCriticPlan.bind_rollout: a mask selects among a discrete policy's actions");
    if ((s_.n_rnn > 0) != (state != 0))
      throw py::value_error(s_.n_rnn > 0 ? "fastppo._C.ActorCriticPlan.bind_rollout: a recurrent actor-critic needs its state"
                                         : "fastppo._C.ActorCriticPlan.bind_rollout: state is a recurrent actor-critic's");
    rollout_ = Rollout{rows, obs, obs_step, noise, noise_step, action, action_step, logprob, logprob_step,
                       value, value_step, env_action, env_action_step, mask, mask_step, low, high, T,
                       state, starts, starts_step};
  }

  // act() on step t of the bound rollout.
  void act_step(int64_t t) {
    const Rollout& r = rollout_;
    if (t < 0 || t >= r.T) throw py::index_error("fastppo._C.ActorCriticPlan.act_step: step out of the bound rollout");
    act(r.rows, r.obs + t * r.obs_step, s_.obs_dim(), r.noise + t * r.noise_step, r.action + t * r.action_step,
        r.logprob + t * r.logprob_step, r.value + t * r.value_step, r.env_action + t * r.env_action_step, r.low,
        r.high, r.mask ? r.mask + t * r.mask_step : 0, r.state, r.starts ? r.starts + t * r.starts_step : 0);
  }

  void set_batch(std::uintptr_t obs, std::uintptr_t actions, std::uintptr_t old_logprob, std::uintptr_t advantages,
                 std::uintptr_t returns, std::uintptr_t old_values, std::uintptr_t mask, std::uintptr_t action_mask) {
    if (action_mask && s_.continuous)
      throw py::value_error("fastppo._C.ActorCriticPlan.set_batch: an action mask is a discrete policy's");
    u_.obs = ptr(obs);
    u_.actions = ptr(actions);
    u_.old_logprob = ptr(old_logprob);
    u_.advantages = ptr(advantages);
    u_.returns = ptr(returns);
    u_.old_values = ptr(old_values);
    u_.mask = ptr<const uint8_t>(mask);
    u_.action_mask = ptr<const uint8_t>(action_mask);
  }

  // A recurrent actor-critic's rollout: T steps of N environments (rows t * N + e), starts uint8
  // [T * N], state [2 * n_rnn, N, H] (the LSTMs' h, c when the rollout began).
  void set_sequences(int64_t T, int64_t N, std::uintptr_t starts, std::uintptr_t state) {
    if (s_.n_rnn == 0) throw py::value_error("fastppo._C.ActorCriticPlan.set_sequences: the actor-critic is not recurrent");
    if (T < 1 || N < 1 || starts == 0 || state == 0)
      throw py::value_error("fastppo._C.ActorCriticPlan.set_sequences: needs T, N >= 1, starts and state");
    u_.T = T, u_.N = N;
    u_.starts = ptr<const uint8_t>(starts);
    u_.state = ptr(state);
  }

  void set_options(double clip_coef, double vf_coef, double ent_coef, double vf_clip_coef, bool clip_vloss,
                   bool norm_adv, double max_grad_norm, double beta1, double beta2, double eps) {
    static_cast<LossOptions&>(u_) = loss_options(clip_coef, vf_coef, ent_coef, vf_clip_coef, 0.0, clip_vloss, norm_adv);
    u_.max_grad_norm = max_grad_norm;
    u_.adam.beta1 = beta1;
    u_.adam.beta2 = beta2;
    u_.adam.eps = eps;
  }

  // One minibatch: rows idx[0..M) of the batch; Adam step number `step` (1-based) at rate lr.
  // One minibatch: forward, heads, loss, backward and (apply_step) the clip and Adam step. group:
  // 0, or the address of the data-parallel group's advantage moments (UpdateArgs::group).
  void update(int64_t M, std::uintptr_t idx, double lr, int64_t step, std::uintptr_t stats, std::uintptr_t group,
              double group_size, bool apply_step) {
    if (M <= 0) throw py::value_error("fastppo._C.ActorCriticPlan.update: the minibatch is empty");
    if (!u_.obs || !u_.actions || !u_.old_logprob || !u_.advantages || !u_.returns || !u_.old_values)
      throw py::value_error("fastppo._C.ActorCriticPlan.update: set_batch first");
    if (s_.n_rnn > 0 && (!u_.starts || M % u_.T != 0))
      throw py::value_error("fastppo._C.ActorCriticPlan.update: a recurrent minibatch is T = " + std::to_string(u_.T) +
                            " steps of whole environments (set_sequences first; M must be a multiple of T), got M = " +
                            std::to_string(M));
    UpdateArgs u = step_args(lr, step, stats);
    u.M = M;
    u.idx = ptr<const int64_t>(idx);
    u.group = ptr<const double>(group);
    u.group_size = group_size;
    u.apply_step = apply_step;
    py::gil_scoped_release no_gil;
    actor_critic_update_cpu(s_, u);
  }

  // The clip and Adam step of an update run with apply_step false (after the gradients' all-reduce).
  void apply(double lr, int64_t step, std::uintptr_t stats) {
    const UpdateArgs u = step_args(lr, step, stats);
    py::gil_scoped_release no_gil;
    actor_critic_apply_cpu(s_, u);
  }

 private:
  UpdateArgs step_args(double lr, int64_t step, std::uintptr_t stats) const {
    if (step < 1) throw py::value_error("fastppo._C.ActorCriticPlan: step must be >= 1");
    UpdateArgs u = u_;
    u.stats = ptr<double>(stats);
    u.adam.lr = lr;
    u.adam.step_size = lr / (1.0 - std::pow(u.adam.beta1, static_cast<double>(step)));
    u.adam.bias_correction2_sqrt = std::sqrt(1.0 - std::pow(u.adam.beta2, static_cast<double>(step)));
    return u;
  }

  ActorCriticSpec s_;
  UpdateArgs u_;
  std::vector<double> transposed_;
  std::vector<int64_t> offsets_;  // s_.offsets
  struct Rollout {
    int64_t rows = 0;
    std::uintptr_t obs = 0; int64_t obs_step = 0;
    std::uintptr_t noise = 0; int64_t noise_step = 0;
    std::uintptr_t action = 0; int64_t action_step = 0;
    std::uintptr_t logprob = 0; int64_t logprob_step = 0;
    std::uintptr_t value = 0; int64_t value_step = 0;
    std::uintptr_t env_action = 0; int64_t env_action_step = 0;
    std::uintptr_t mask = 0; int64_t mask_step = 0;
    std::uintptr_t low = 0, high = 0;
    int64_t T = 0;  // 0: nothing bound
    std::uintptr_t state = 0;  // recurrent: [2 * n_rnn, rows, H], carried from step to step
    std::uintptr_t starts = 0; int64_t starts_step = 0;
  } rollout_;
};

}  // namespace

void bind_actor_critic(py::module_& m) {
  m.def("mlp_forward", &mlp_forward, py::arg("dtype"), py::arg("layers"), py::arg("activation"),
        py::arg("last_linear"), py::arg("rows"), py::arg("x"), py::arg("ldx"), py::arg("saved"),
        "Forward of a Linear/activation stack on the CPU; every layer's output lands in `saved`.");
  m.def("mlp_backward", &mlp_backward, py::arg("dtype"), py::arg("layers"), py::arg("activation"),
        py::arg("last_linear"), py::arg("rows"), py::arg("x"), py::arg("ldx"), py::arg("saved"), py::arg("grad_out"),
        py::arg("grad_x"), "Backward of mlp_forward: writes the layers' weight and bias gradients (and d x).");
  py::class_<ActorCriticPlan>(m, "ActorCriticPlan",
                              "A fused actor-critic on the CPU: rollout inference and PPO minibatch updates.")
      .def(py::init<const std::string&, const std::string&, const std::vector<LayerSpec>&,
                    const std::vector<LayerSpec>&, const std::vector<LayerSpec>&, bool, std::uintptr_t,
                    std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, bool,
                    const std::vector<int64_t>&, const std::vector<LstmSpec>&>(),
           py::arg("dtype"), py::arg("activation"), py::arg("trunk"), py::arg("actor"), py::arg("critic"),
           py::arg("continuous"), py::arg("log_std"), py::arg("grad_log_std"), py::arg("params"), py::arg("grads"),
           py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("n_params"), py::arg("squashed") = false,
           py::arg("nvec") = std::vector<int64_t>{}, py::arg("rnn") = std::vector<LstmSpec>{})
      .def_property_readonly("obs_dim", &ActorCriticPlan::obs_dim)
      .def_property_readonly("n_out", &ActorCriticPlan::n_out)
      .def_property_readonly("n_components", &ActorCriticPlan::n_components)
      .def("act", &ActorCriticPlan::act, py::arg("rows"), py::arg("obs"), py::arg("ldobs"), py::arg("noise"),
           py::arg("action"), py::arg("logprob"), py::arg("value"), py::arg("env_action"), py::arg("low"),
           py::arg("high"), py::arg("mask") = 0, py::arg("state") = 0, py::arg("starts") = 0)
      .def("refresh", &ActorCriticPlan::refresh)
      .def("bind_rollout", &ActorCriticPlan::bind_rollout, py::arg("rows"), py::arg("obs"), py::arg("obs_step"),
           py::arg("noise"), py::arg("noise_step"), py::arg("action"), py::arg("action_step"), py::arg("logprob"),
           py::arg("logprob_step"), py::arg("value"), py::arg("value_step"), py::arg("env_action"),
           py::arg("env_action_step"), py::arg("low"), py::arg("high"), py::arg("T"), py::arg("mask") = 0,
           py::arg("mask_step") = 0, py::arg("state") = 0, py::arg("starts") = 0, py::arg("starts_step") = 0)
      .def("act_step", &ActorCriticPlan::act_step, py::arg("t"))
      .def("set_batch", &ActorCriticPlan::set_batch, py::arg("obs"), py::arg("actions"), py::arg("old_logprob"),
           py::arg("advantages"), py::arg("returns"), py::arg("old_values"), py::arg("mask"), py::arg("action_mask") = 0)
      .def("set_sequences", &ActorCriticPlan::set_sequences, py::arg("T"), py::arg("N"), py::arg("starts"),
           py::arg("state"))
      .def("set_options", &ActorCriticPlan::set_options, py::arg("clip_coef"), py::arg("vf_coef"), py::arg("ent_coef"),
           py::arg("vf_clip_coef"), py::arg("clip_vloss"), py::arg("norm_adv"), py::arg("max_grad_norm"),
           py::arg("beta1"), py::arg("beta2"), py::arg("eps"))
      .def("update", &ActorCriticPlan::update, py::arg("M"), py::arg("idx"), py::arg("lr"), py::arg("step"),
           py::arg("stats"), py::arg("group") = 0, py::arg("group_size") = 1.0, py::arg("apply_step") = true)
      .def("apply", &ActorCriticPlan::apply, py::arg("lr"), py::arg("step"), py::arg("stats"));
}

}  // namespace fastppo::bind
