"""fastppo.sb3: SB3's rollout buffer and PPO on fastppo's kernels compute what SB3 computes, learn
CartPole, and stay out of ``import fastppo``; the SB3 benchmark runs (tiny mode)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402
from stable_baselines3 import PPO as SB3PPO  # noqa: E402
from stable_baselines3.common import buffers as sb3_buffers  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from fastppo import sb3  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """SB3's small MLPs run fastest on one thread; on a busy 2-core machine, several threads spinning
    against each other make a PPO update ~30x slower. Both contenders run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_import_fastppo_does_not_import_sb3():
    code = ("import sys, fastppo; fastppo.ppo_loss; fastppo.categorical_logprob_entropy; "
            "assert 'stable_baselines3' not in sys.modules, 'import fastppo imported stable_baselines3'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ rollout buffer


@pytest.mark.parametrize("dict_obs", [False, True], ids=["box-obs", "dict-obs"])
@pytest.mark.parametrize("n_envs", [1, 4])
@pytest.mark.parametrize("n_steps", [1, 7, 128])
def test_rollout_buffer_gae_equals_sb3(n_steps, n_envs, dict_obs):
    box = spaces.Box(-1.0, 1.0, (3,))
    obs_space = spaces.Dict({"x": box}) if dict_obs else box
    theirs_cls, ours_cls = ((sb3_buffers.DictRolloutBuffer, sb3.DictRolloutBuffer) if dict_obs
                            else (sb3_buffers.RolloutBuffer, sb3.RolloutBuffer))
    kwargs = dict(gamma=0.97, gae_lambda=0.9, n_envs=n_envs, device="cpu")
    theirs = theirs_cls(n_steps, obs_space, spaces.Discrete(2), **kwargs)
    ours = ours_cls(n_steps, obs_space, spaces.Discrete(2), **kwargs)
    rng = np.random.default_rng(n_steps * 10 + n_envs)
    rewards = rng.normal(size=(n_steps, n_envs)).astype(np.float32)
    values = rng.normal(size=(n_steps, n_envs)).astype(np.float32)
    starts = (rng.random((n_steps, n_envs)) < 0.15).astype(np.float32)
    starts[0, 0] = 1.0  # an episode starting at t = 0 (its flag is never read: nothing comes before)
    starts[-1, -1] = 1.0  # and at the last step: cuts the trace between the last two steps
    for buffer in (theirs, ours):
        buffer.rewards[:], buffer.values[:], buffer.episode_starts[:] = rewards, values, starts
    last_values = torch.from_numpy(rng.normal(size=(n_envs, 1)).astype(np.float32))
    dones = np.arange(n_envs) % 2 == 0  # the last step ended some envs' episodes
    theirs.compute_returns_and_advantage(last_values, dones)
    advantages, returns = ours.advantages, ours.returns
    ours.compute_returns_and_advantage(last_values, dones)

    assert ours.advantages is advantages and ours.returns is returns  # written in place (out=)
    assert ours.advantages.dtype == np.float32 and ours.returns.shape == (n_steps, n_envs)
    # Both are float32 recursions of the same operations; a build that fuses a multiply-add or
    # reassociates (the chunked scan of long horizons) differs by a few ulps per step, damped by
    # gamma * lambda < 1: far below 1e-5 of the advantages' scale.
    scale = float(np.abs(theirs.advantages).max()) + float(np.abs(theirs.returns).max())
    np.testing.assert_allclose(ours.advantages, theirs.advantages, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(ours.returns, theirs.returns, rtol=1e-5, atol=1e-5 * scale)
    # The trace is cut where the next observation starts an episode (at the last step for the
    # cases with more than one step): the last advantage of env -1 ignores everything after it.
    if n_steps > 1:
        delta = rewards[-2, -1] - values[-2, -1]  # no bootstrap, no trace
        assert ours.advantages[-2, -1] == pytest.approx(delta, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------ one train() against SB3's

SMALL = dict(n_steps=64, n_envs=2, batch_size=32, n_epochs=4)
TRUNCATED_MINIBATCH = pytest.mark.filterwarnings("ignore:You have specified a mini-batch size:UserWarning")
TRAIN_CASES = [
    pytest.param("CartPole-v1", {}, id="cartpole"),
    pytest.param("CartPole-v1", dict(clip_range_vf=0.05, normalize_advantage=False), id="cartpole-vf-clip-raw-adv"),
    pytest.param("CartPole-v1", dict(target_kl=2e-5), id="cartpole-target-kl"),
    pytest.param("CartPole-v1", dict(dict_obs=True), id="cartpole-dict-obs"),
    # A linear clip schedule reaches 0 at the last update; 65 = 2 x 32 + 1 leaves a minibatch of one
    # (SB3 does not normalize it).
    pytest.param("CartPole-v1", dict(n_steps=65, n_envs=1, clip_range=lambda progress: 0.2 * progress),
                 id="cartpole-clip-to-0-minibatch-of-1", marks=TRUNCATED_MINIBATCH),
    pytest.param("Pendulum-v1", dict(ent_coef=0.01), id="pendulum"),
    pytest.param("Pendulum-v1", dict(clip_range_vf=0.1, ent_coef=0.01), id="pendulum-vf-clip"),
    pytest.param("Pendulum-v1", dict(target_kl=1e-5), id="pendulum-target-kl"),
    pytest.param("Pendulum-v1", dict(use_sde=True), id="pendulum-gsde-evaluate-actions"),
]


class DictObservation(gym.ObservationWrapper):
    """The env's observation as {"x": obs}: SB3's MultiInputPolicy and DictRolloutBuffer."""

    def __init__(self, env):
        super().__init__(env)
        self.observation_space = spaces.Dict({"x": env.observation_space})

    def observation(self, observation):
        return {"x": observation}


def learn_one_iteration(cls, env_id, settings):
    settings = dict(SMALL, **settings)
    n_envs, dict_obs = settings.pop("n_envs"), settings.pop("dict_obs", False)
    env = make_vec_env(env_id, n_envs=n_envs, seed=5, wrapper_class=DictObservation if dict_obs else None)
    policy = "MultiInputPolicy" if dict_obs else "MlpPolicy"
    model = cls(policy, env, seed=5, device="cpu", **settings)
    initial = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(total_timesteps=model.n_steps * n_envs)  # one rollout, one train()
    return model, initial


@pytest.mark.parametrize("env_id,settings", TRAIN_CASES)
def test_one_train_equals_sb3(env_id, settings):
    theirs, _ = learn_one_iteration(SB3PPO, env_id, settings)
    ours, initial = learn_one_iteration(sb3.PPO, env_id, settings)
    assert type(ours.rollout_buffer) is (sb3.DictRolloutBuffer if settings.get("dict_obs") else sb3.RolloutBuffer)
    fused = sb3.fused_evaluator(ours.policy) is not None
    assert fused == (not settings.get("use_sde", False))  # fastppo's heads wherever they apply

    for name in ("observations", "actions", "rewards", "episode_starts", "values", "log_probs"):
        mine, peer = getattr(ours.rollout_buffer, name), getattr(theirs.rollout_buffer, name)
        if isinstance(mine, dict):
            mine, peer = mine["x"], peer["x"]
        np.testing.assert_array_equal(mine, peer, err_msg=f"the two models collected different rollouts ({name})")
    np.testing.assert_allclose(ours.rollout_buffer.advantages, theirs.rollout_buffer.advantages, rtol=1e-5, atol=1e-5)

    # Parameters: float32 rounding differences (float64 vs float32 reductions, fused log-softmax)
    # carried through a few Adam steps stay near 1e-7; the update itself moves them by ~1e-3.
    ours_state, theirs_state = ours.policy.state_dict(), theirs.policy.state_dict()
    assert max((ours_state[k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    for key in theirs_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=1e-5, atol=1e-6, msg=key)

    ours_log, theirs_log = ours.logger.name_to_value, theirs.logger.name_to_value
    keys = {k for k in theirs_log if k.startswith("train/")}
    assert keys == {k for k in ours_log if k.startswith("train/")}
    assert {"train/entropy_loss", "train/policy_gradient_loss", "train/value_loss", "train/approx_kl",
            "train/clip_fraction", "train/loss", "train/explained_variance", "train/n_updates",
            "train/clip_range"} <= keys
    assert ours_log["train/n_updates"] == theirs_log["train/n_updates"]
    if "target_kl" in settings:  # it triggered: SB3 stopped before its last epoch, and so did we
        assert theirs_log["train/n_updates"] < SMALL["n_epochs"]
    for key in keys - {"train/n_updates"}:
        # Means of float32 terms of order 1: a few ulps survive the cancellation in near-zero means
        # (policy loss, approx_kl), hence the absolute part.
        assert float(ours_log[key]) == pytest.approx(float(theirs_log[key]), rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------ checkpoints

# Plain SB3 in a process where ``import fastppo`` fails: it loads the zip at argv[1], checks that
# fastppo stayed out, and writes the buffer's class and the policy's parameters to argv[2].
LOAD_WITHOUT_FASTPPO = """
import importlib.abc, sys

class NoFastppo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastppo" or name.startswith("fastppo."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, NoFastppo())
try:
    import fastppo
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker let fastppo in")
import torch
from stable_baselines3 import PPO
model = PPO.load(sys.argv[1], device="cpu")
assert not any(name.startswith("fastppo") for name in sys.modules), "loading imported fastppo"
buffer = type(model.rollout_buffer)
torch.save({"buffer": buffer.__module__ + "." + buffer.__qualname__, "state": model.policy.state_dict()},
           sys.argv[2])
"""


def small_model(cls, dict_obs=False, **kwargs):
    env = make_vec_env("CartPole-v1", n_envs=2, seed=3, wrapper_class=DictObservation if dict_obs else None)
    return cls("MultiInputPolicy" if dict_obs else "MlpPolicy", env, n_steps=16, batch_size=32, seed=3,
               device="cpu", **kwargs)


def assert_same_parameters(model, state):
    mine = model.policy.state_dict()
    assert mine.keys() == state.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], state[key], rtol=0, atol=0, msg=key)


def test_saved_zip_loads_in_plain_sb3_where_fastppo_cannot_be_imported(tmp_path):
    model = small_model(sb3.PPO)
    model.learn(total_timesteps=32)  # a train(): parameters that differ from a fresh model's
    model.save(tmp_path / "model.zip")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FASTPPO, str(tmp_path / "model.zip"),
                           str(tmp_path / "loaded.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    assert loaded["buffer"] == "stable_baselines3.common.buffers.RolloutBuffer"
    assert_same_parameters(model, loaded["state"])
    assert type(model.rollout_buffer) is sb3.RolloutBuffer  # saving left the model as it was


@pytest.mark.parametrize("dict_obs", [False, True], ids=["box-obs", "dict-obs"])
def test_each_class_loads_the_others_zip_with_its_own_buffer(tmp_path, dict_obs):
    sb3_buffer, fastppo_buffer = ((sb3_buffers.DictRolloutBuffer, sb3.DictRolloutBuffer) if dict_obs
                                  else (sb3_buffers.RolloutBuffer, sb3.RolloutBuffer))
    ours, theirs = small_model(sb3.PPO, dict_obs), small_model(SB3PPO, dict_obs)
    ours.save(tmp_path / "fastppo.zip")
    theirs.save(tmp_path / "sb3.zip")

    from_ours = SB3PPO.load(tmp_path / "fastppo.zip", device="cpu")
    assert type(from_ours.rollout_buffer) is sb3_buffer
    assert_same_parameters(from_ours, ours.policy.state_dict())
    from_theirs = sb3.PPO.load(tmp_path / "sb3.zip", env=theirs.get_env(), device="cpu")
    assert type(from_theirs.rollout_buffer) is fastppo_buffer  # GAE fused again
    assert_same_parameters(from_theirs, theirs.policy.state_dict())
    from_theirs.learn(total_timesteps=32)  # and it trains on it
    again = sb3.PPO.load(tmp_path / "fastppo.zip", device="cpu")
    assert type(again.rollout_buffer) is fastppo_buffer


def test_a_chosen_sb3_buffer_is_kept_through_save_and_load(tmp_path):
    model = small_model(sb3.PPO, rollout_buffer_class=sb3_buffers.RolloutBuffer)
    assert type(model.rollout_buffer) is sb3_buffers.RolloutBuffer
    model.save(tmp_path / "model.zip")
    assert type(sb3.PPO.load(tmp_path / "model.zip", device="cpu").rollout_buffer) is sb3_buffers.RolloutBuffer
    assert type(SB3PPO.load(tmp_path / "model.zip", device="cpu").rollout_buffer) is sb3_buffers.RolloutBuffer
    # Chosen when loading, either way.
    SB3PPO.load(tmp_path / "model.zip").save(tmp_path / "sb3.zip")
    chosen = sb3.PPO.load(tmp_path / "sb3.zip", device="cpu", rollout_buffer_class=sb3_buffers.RolloutBuffer)
    assert type(chosen.rollout_buffer) is sb3_buffers.RolloutBuffer
    default = sb3.PPO.load(tmp_path / "model.zip", device="cpu", rollout_buffer_class=None)
    assert type(default.rollout_buffer) is sb3.RolloutBuffer


# ------------------------------------------------------------------ learning


@pytest.mark.learning
def test_learns_cartpole_with_rl_zoo_settings():
    """rl-zoo's CartPole settings reach a 100-episode mean return of 195 well within 60k steps (SB3
    does it in ~25k); stops there (about 10 s on 2 busy cores)."""

    class StopAt195(BaseCallback):
        reached_at = None

        def _on_rollout_end(self):
            returns = [info["r"] for info in self.model.ep_info_buffer]
            if self.reached_at is None and len(returns) == 100 and np.mean(returns) >= 195:
                self.reached_at = self.num_timesteps

        def _on_step(self):
            return self.reached_at is None  # False ends learn() at the next step

    linear = lambda initial: (lambda progress: initial * progress)  # noqa: E731
    model = sb3.PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=1), n_steps=32, batch_size=256,
                    gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate=linear(1e-3),
                    clip_range=linear(0.2), seed=1, device="cpu")
    callback = StopAt195()
    model.learn(total_timesteps=60_000, callback=callback)
    recent = np.mean([info["r"] for info in model.ep_info_buffer])
    assert callback.reached_at is not None, f"mean return of the last 100 episodes {recent:.1f} < 195 after 60k steps"


# ------------------------------------------------------------------ benchmark


def test_bench_sb3_tiny_mode_runs_and_writes_its_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_sb3", "--tiny", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    document = json.loads((tmp_path / "sb3_cpu.json").read_text())
    assert document["mode"] == "tiny" and document["machine"]["stable_baselines3"]
    runs = {(r["env_id"], r["contender"]): r for r in document["results"]}
    assert set(runs) == {(e, c) for e in ("CartPole-v1", "HalfCheetah-v5") for c in ("sb3", "fastppo.sb3")}
    for r in runs.values():
        assert ("skipped" in r and r["skipped"]) or (r["steps"] == 512 and r["sps"] > 0 and r["train_seconds"] > 0)
    assert document["ratios"]["CartPole-v1"]["sps"] > 0
    report = (tmp_path / "sb3_cpu.md").read_text()
    assert "| CartPole-v1 | fastppo.sb3.PPO | 1 |" in report and "SPS fastppo.sb3 / SB3" in report
