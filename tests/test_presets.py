"""``fastppo train``'s presets and the MLP policy's shape: rl-baselines3-zoo's tuned MuJoCo settings
(``--preset mujoco-zoo``) translated value by value, the shape options (``--hidden-sizes``,
``--activation``, ``--log-std-init``, ``--ortho-init``) building the policy they name on both policy
backends, old settings without them resolving to CleanRL's policy, and bad values failing fast."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

pytest.importorskip("envpool")

from fastppo import train as T  # noqa: E402
from fastppo.agent import Agent, MlpShape  # noqa: E402
from fastppo.config import MUJOCO_AUTO_PRESETS, MUJOCO_ZOO_TASKS, PRESETS, Args, preset_values, resolve  # noqa: E402
from fastppo.policy import FusedActorCritic  # noqa: E402
from fastppo.runs import saved_args  # noqa: E402

BOX = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)


def linears(seq):
    return [m for m in seq if isinstance(m, nn.Linear)]


# rl-baselines3-zoo's hyperparams/ppo.yml entries, as written there (batch_size, n_steps, n_epochs, gamma,
# gae_lambda, learning_rate, ent_coef, clip_range, max_grad_norm, vf_coef), and whether the entry sets
# policy_kwargs (log_std_init -2, no orthogonal init, ReLU, 256-256).
ZOO_YML = {
    "HalfCheetah-v5": (64, 512, 20, 0.98, 0.92, 2.0633e-05, 0.000401762, 0.1, 0.8, 0.58096, True),
    "Hopper-v5": (32, 512, 5, 0.999, 0.99, 9.80828e-05, 0.00229519, 0.2, 0.7, 0.835671, True),
    "Walker2d-v5": (32, 512, 20, 0.99, 0.95, 5.05041e-05, 0.000585045, 0.1, 1.0, 0.871923, False),
}


@pytest.mark.parametrize("env_id", list(ZOO_YML))
def test_mujoco_zoo_is_rl_zoo_settings_in_this_trainers_terms(env_id):
    batch, n_steps, epochs, gamma, lam, lr, ent, clip, mgn, vf, tuned = ZOO_YML[env_id]
    a = resolve(Args(env_id=env_id, preset="mujoco-zoo"))
    assert (a.num_envs, a.num_steps, a.update_epochs, a.num_minibatches) == (1, n_steps, epochs, n_steps // batch)
    assert (a.gamma, a.gae_lambda, a.learning_rate, a.ent_coef, a.clip_coef, a.max_grad_norm) == (gamma, lam, lr, ent, clip, mgn)
    # SB3 weighs (V - R)^2 by vf_coef; fastppo's loss is vf_coef * 0.5 * (V - R)^2.
    assert a.vf_coef == pytest.approx(2 * vf)
    assert a.anneal_lr is False and a.clip_vloss is False and a.anneal_clip is False
    assert a.normalize_obs and a.normalize_reward and a.total_timesteps == 1_000_000
    shape = ((256, 256), "relu", -2.0, False) if tuned else ((64, 64), "tanh", 0.0, True)
    assert (a.hidden_sizes, a.activation, a.log_std_init, a.ortho_init) == shape


def test_zoo_task_table_and_defaults():
    # a task without a tuned entry keeps rl-zoo's MuJoCo defaults (SB3's PPO defaults with normalization)
    ant = resolve(Args(env_id="Ant-v5", preset="mujoco-zoo"))
    assert (ant.num_steps, ant.num_minibatches, ant.update_epochs, ant.learning_rate) == (2048, 32, 10, 3e-4)
    assert ant.vf_coef == 1.0 and ant.anneal_lr is False and ant.hidden_sizes == (64, 64)
    assert preset_values("mujoco-zoo", "Swimmer-v5")["gamma"] == 0.9999
    for name, values in MUJOCO_ZOO_TASKS.items():
        assert set(values) <= set(PRESETS["mujoco-zoo"]), name
        if "num_minibatches" in values:
            assert values["num_envs"] * values["num_steps"] % values["num_minibatches"] == 0, name
    # the flags still win over the preset
    a = resolve(Args(env_id="Hopper-v5", preset="mujoco-zoo", learning_rate=1e-4, hidden_sizes=(32,), vf_coef=0.25))
    assert (a.learning_rate, a.hidden_sizes, a.vf_coef, a.gamma) == (1e-4, (32,), 0.25, 0.999)


def test_auto_picks_each_mujoco_tasks_best_preset():
    # the table's choices (benchmarks/results/mujoco_1m.md); a task without a measured entry gets CleanRL's
    expected = {"HalfCheetah-v5": "mujoco-zoo", "Hopper-v5": "mujoco", "Walker2d-v5": "mujoco-fast",
                "Ant-v5": "mujoco", "CartPole-v1": "classic-fast", "CartPoleNoVel-v1": "classic-lstm",
                "Acrobot-v1": "classic", "Pong-v5": "atari"}
    for env_id, preset in expected.items():
        assert resolve(Args(env_id=env_id)).preset == preset, env_id
    assert set(MUJOCO_AUTO_PRESETS.values()) <= set(PRESETS)


def test_mujoco_fast_is_mujocos_batch_from_two_environments():
    fast, cleanrl = (resolve(Args(env_id="Walker2d-v5", preset=p)) for p in ("mujoco-fast", "mujoco"))
    assert (fast.num_envs, fast.num_steps, cleanrl.num_envs, cleanrl.num_steps) == (2, 1024, 1, 2048)
    differ = {f.name for f in dataclasses.fields(Args) if getattr(fast, f.name) != getattr(cleanrl, f.name)}
    assert differ == {"preset", "num_envs", "num_steps"}
    # the flags still win over it
    assert resolve(Args(env_id="Walker2d-v5", preset="mujoco-fast", num_envs=4)).num_envs == 4


def test_other_presets_keep_cleanrl_policy_and_coefficients():
    for env_id, preset in (("Hopper-v5", "auto"), ("HalfCheetah-v5", "mujoco"), ("CartPole-v1", "classic"),
                           ("CartPole-v1", "auto")):
        a = resolve(Args(env_id=env_id, preset=preset))
        assert (a.hidden_sizes, a.activation, a.log_std_init, a.ortho_init) == ((64, 64), "tanh", 0.0, True)
        assert (a.vf_coef, a.max_grad_norm, a.anneal_lr) == (0.5, 0.5, True)


def test_default_shape_builds_cleanrl_agent_bit_for_bit():
    torch.manual_seed(3)
    agent = Agent((17,), BOX, "mujoco")
    torch.manual_seed(3)
    ref_layers = []
    for n_out, gain in ((6, 0.01), (1, 1.0)):  # CleanRL's Agent: actor_mean, then critic
        sizes = [(17, 64), (64, 64), (64, n_out)]
        for k, (i, o) in enumerate(sizes):
            layer = nn.Linear(i, o)
            nn.init.orthogonal_(layer.weight, gain if k == 2 else math.sqrt(2))
            nn.init.constant_(layer.bias, 0.0)
            ref_layers.append(layer)
    ours = linears(agent.actor) + linears(agent.critic)
    assert [type(m) for m in agent.actor[1::2]] == [nn.Tanh, nn.Tanh]
    for a, b in zip(ours, ref_layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(agent.actor_logstd.data, torch.zeros(6))


def test_zoo_shape_builds_relu_256_with_torch_default_init():
    shape = MlpShape((256, 256), "relu", -2.0, False)
    torch.manual_seed(0)
    agent = Agent((17,), BOX, "mujoco", mlp=shape)
    torch.manual_seed(0)
    plain = [nn.Linear(17, 256), nn.Linear(256, 256), nn.Linear(256, 6)]  # torch's default init, same order
    for a, b in zip(linears(agent.actor), plain):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert [l.out_features for l in linears(agent.critic)] == [256, 256, 1]
    assert all(isinstance(m, nn.ReLU) for m in list(agent.actor)[1::2])
    assert torch.equal(agent.actor_logstd.data, torch.full((6,), -2.0))


@pytest.mark.parametrize("hidden", [(7,), (33, 5, 2)])
def test_fused_step_matches_eager_for_other_shapes(hidden):
    """One fused minibatch update of a non-default MLP (relu, odd widths, 1 and 3 layers) moves the
    parameters as the eager loss + Adam does (float32, the trainer's dtype: equal up to rounding)."""
    torch.manual_seed(1)
    shape = MlpShape(hidden, "relu", -1.0, False)
    agent = Agent((5,), BOX, "mujoco", mlp=shape)
    eager = Agent((5,), BOX, "mujoco", mlp=shape)
    eager.load_state_dict(agent.state_dict())
    eager_start = {k: v.clone() for k, v in eager.state_dict().items()}
    B = 13
    obs, actions = torch.randn(B, 5), torch.randn(B, 6)
    with torch.no_grad():
        _, logprob, _, value = agent.get_action_and_value(obs, actions)
    logprob = logprob + 0.1 * torch.randn(B)
    adv, ret = torch.randn(B), torch.randn(B)
    fused = FusedActorCritic(agent, lr=1e-2, max_grad_norm=0.5, clip_coef=0.2, vf_coef=1.3, ent_coef=0.01,
                             clip_vloss=False)
    fused.set_batch(obs, actions, logprob, adv, ret, value)
    fused.update(torch.arange(B))

    opt = torch.optim.Adam(eager.parameters(), lr=1e-2, eps=1e-5)
    _, new_lp, ent, new_v = eager.get_action_and_value(obs, actions)
    a = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = (new_lp - logprob).exp()
    pg = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()
    loss = pg - 0.01 * ent.mean() + 1.3 * 0.5 * ((new_v - ret) ** 2).mean()
    loss.backward()
    nn.utils.clip_grad_norm_(eager.parameters(), 0.5)
    opt.step()
    for (name, p), q in zip(agent.named_parameters(), eager.parameters()):
        assert not torch.equal(p, eager_start[name]), name  # it moved
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6, msg=name)


def test_shape_flags_reach_the_saved_run_and_its_policy(tmp_path):
    args = Args(env_id="HalfCheetah-v5", preset="mujoco-zoo", total_timesteps=1024, num_steps=512,
                hidden_sizes=(32, 16), run_dir=str(tmp_path), run_name="run", log_every=1000)
    summary = T.train(args)
    assert summary["policy_backend"] == "fused"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["hidden_sizes"] == [32, 16] and saved["activation"] == "relu" and saved["preset"] == "mujoco-zoo"
    # JSON's list comes back as the tuple the settings hold, so a resume compares equal
    assert saved_args(saved, tmp_path / "run" / "config.json").hidden_sizes == (32, 16)
    from fastppo.export import load_policy

    policy = load_policy(tmp_path / "run")
    widths = [m.out_features for m in policy.policy.modules() if isinstance(m, nn.Linear)]
    assert widths[:3] == [32, 16, 6]
    resumed = T.train(Args(), resume=str(tmp_path / "run"))
    assert resumed["global_step"] == summary["global_step"]  # nothing left to run: the saved settings matched


def test_settings_saved_before_the_shape_options_resolve_to_cleanrl_policy():
    old = dict(Args(env_id="HalfCheetah-v5", preset="mujoco").__dict__)  # a saved run's preset is resolved
    for name in ("hidden_sizes", "activation", "log_std_init", "ortho_init", "vf_coef", "max_grad_norm", "anneal_lr"):
        old.pop(name)
    args = saved_args(old, Path("config.json"))
    assert MlpShape.of(args) == MlpShape()
    assert resolve(args).vf_coef == 0.5


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(hidden_sizes=(64, 0)), ["--hidden-sizes", "[64, 0]", ">= 1"]),
        (dict(hidden_sizes=()), ["--hidden-sizes", "[]"]),
        (dict(activation="gelu"), ["--activation", "tanh, relu", "'gelu'"]),
        (dict(log_std_init=float("nan")), ["--log-std-init", "finite"]),
        (dict(vf_coef=-1.0), ["--vf-coef", ">= 0", "-1.0"]),
        (dict(max_grad_norm=0.0), ["--max-grad-norm", "> 0"]),
        (dict(env_id="CartPoleNoVel-v1", hidden_sizes=(8,)), ["--hidden-sizes", "recurrent", "--recurrent-hidden-size"]),
    ],
)
def test_bad_shape_settings_fail_fast(changes, words):
    env = changes.pop("env_id", "HalfCheetah-v5")
    with pytest.raises(ValueError) as err:
        resolve(Args(env_id=env, preset="auto", **changes))
    for w in words:
        assert w in str(err.value), (w, str(err.value))
