"""The compiled environment boundary against a plain numpy reference of the same bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from fastppo.envstep import EnvStepBoundary


def outputs(n, obs_shape, dtype=np.float32):
    return dict(obs_out=np.zeros((n,) + obs_shape, dtype), reward_out=np.zeros(n, np.float32),
                done_out=np.zeros(n, bool), terminated_out=np.zeros(n, bool), real_out=np.zeros(n, bool))


def test_dummy_steps_and_episode_statistics_across_truncation():
    b = EnvStepBoundary(3, (2,))
    # env 0 ends (terminated) at step 1; env 1 is truncated at step 2; env 2 never ends.
    script = [
        dict(reward=[1.0, 2.0, 3.0], term=[0, 0, 0], trunc=[0, 0, 0]),
        dict(reward=[1.0, 2.0, 3.0], term=[1, 0, 0], trunc=[0, 0, 0]),
        dict(reward=[0.0, 2.0, 3.0], term=[0, 0, 0], trunc=[0, 1, 0]),  # env 0: dummy reset step
        dict(reward=[4.0, 0.0, 3.0], term=[0, 0, 0], trunc=[0, 0, 0]),  # env 1: dummy reset step
    ]
    real, finished = [], []
    for step in script:
        out = outputs(3, (2,))
        finished.append(b.step(np.zeros((3, 2), np.float32), np.array(step["reward"], np.float32),
                               np.array(step["term"], bool), np.array(step["trunc"], bool), **out))
        real.append(out["real_out"].tolist())
        assert out["done_out"].tolist() == [bool(t or u) for t, u in zip(step["term"], step["trunc"])]
        assert out["terminated_out"].tolist() == [bool(t) for t in step["term"]]
        assert out["reward_out"].tolist() == step["reward"]
    assert real == [[True] * 3, [True] * 3, [False, True, True], [True, False, True]]
    assert finished == [[], [(2.0, 2)], [(6.0, 3)], []]
    assert b.episode_return.tolist() == [4.0, 0.0, 12.0] and b.episode_length.tolist() == [1, 0, 4]
    assert b.episodes == 2 and b.recent_mean_return() == 4.0


def test_life_loss_is_not_the_end_of_the_game():
    b = EnvStepBoundary(1, (1,))
    out = outputs(1, (1,))
    args = lambda r, term, over: (np.zeros((1, 1), np.float32), np.array([r], np.float32), np.array([term]),  # noqa: E731
                                  np.array([False]))
    # A lost life: terminated for training, but the game (and its score) goes on.
    assert b.step(*args(1.0, True, False), **out, episode_reward=np.array([5.0]), episode_over=np.array([False])) == []
    assert out["terminated_out"][0] and out["real_out"][0]
    b.step(*args(0.0, False, False), **out, episode_reward=np.array([0.0]), episode_over=np.array([False]))
    assert not out["real_out"][0]  # the soft reset step after the life loss
    done = b.step(*args(1.0, True, True), **out, episode_reward=np.array([7.0]), episode_over=np.array([True]))
    assert done == [(12.0, 2)]


def test_observation_normalization_matches_running_moments():
    rng = np.random.default_rng(0)
    b = EnvStepBoundary(4, (3,), normalize_obs=True)
    seen = []
    for t in range(20):
        obs = rng.normal(loc=[1.0, -2.0, 50.0], scale=[1.0, 0.1, 30.0], size=(4, 3))
        seen.append(obs)
        out = outputs(4, (3,))
        b.step(obs, np.zeros(4, np.float32), np.zeros(4, bool), np.zeros(4, bool), **out)
        everything = np.concatenate(seen)
        mean, var = everything.mean(0), everything.var(0)
        np.testing.assert_allclose(b.obs_mean, mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.obs_variance(), var, rtol=1e-10)
        expected = np.clip((obs - mean) / np.sqrt(var + 1e-8), -10, 10)
        np.testing.assert_allclose(out["obs_out"], expected, rtol=1e-5, atol=1e-5)
    frozen = b.state_dict()
    out = outputs(4, (3,))
    b.step(np.full((4, 3), 1e6), np.zeros(4, np.float32), np.zeros(4, bool), np.zeros(4, bool), **out, update_stats=False)
    assert (out["obs_out"] == 10).all()  # clipped, and the statistics did not move
    np.testing.assert_array_equal(b.obs_mean, frozen["obs_mean"])


def test_reward_scaling_by_the_running_std_of_the_discounted_return():
    rng = np.random.default_rng(1)
    gamma = 0.9
    b = EnvStepBoundary(2, (1,), normalize_reward=True, gamma=gamma)
    returns, history = np.zeros(2), []
    for t in range(30):
        reward = rng.normal(size=2).astype(np.float32)
        done = np.array([t % 7 == 6, t % 11 == 10])
        out = outputs(2, (1,))
        b.step(np.zeros((2, 1), np.float32), reward, done, np.zeros(2, bool), **out)
        # CleanRL's NormalizeReward on real steps (the step after a done is a dummy one).
        real = out["real_out"]
        returns = np.where(real, returns * gamma + reward, returns)
        history.extend(returns[real])
        expected = np.clip(reward / np.sqrt(np.var(history) + 1e-8), -10, 10)
        np.testing.assert_allclose(out["reward_out"], expected, rtol=1e-5)
        returns[done] = 0.0


def test_state_round_trip_and_uint8_copies():
    b = EnvStepBoundary(2, (2, 2))
    out = outputs(2, (2, 2), np.uint8)
    frames = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    b.step(frames, np.ones(2, np.float32), np.array([True, False]), np.zeros(2, bool), **out)
    np.testing.assert_array_equal(out["obs_out"], frames)
    c = EnvStepBoundary(2, (2, 2))
    c.load_state_dict(b.state_dict())
    assert c.previous_done.tolist() == [True, False] and c.episodes == 1 and list(c.recent) == [(1.0, 1)]


def test_bad_buffers_are_refused():
    b = EnvStepBoundary(2, (3,))
    out = outputs(2, (3,))
    with pytest.raises(ValueError, match=r"obs has shape \(2, 4\); expected \(2, 3\)"):
        b.step(np.zeros((2, 4)), np.zeros(2), np.zeros(2, bool), np.zeros(2, bool), **out)
    out["reward_out"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="reward_out must be a C-contiguous numpy array of shape"):
        b.step(np.zeros((2, 3)), np.zeros(2), np.zeros(2, bool), np.zeros(2, bool), **out)


def test_prime_books_no_transition_and_the_old_name_warns():
    b = EnvStepBoundary(2, (1,), normalize_obs=True)
    obs_out = np.full((2, 1), np.nan, np.float32)
    b.prime(np.array([[3.0], [5.0]]), obs_out)
    assert np.isfinite(obs_out).all() and b.obs_count[0] == 2
    assert b.episodes == 0 and b.episode_length.tolist() == [0, 0] and b.episode_return.tolist() == [0.0, 0.0]
    with pytest.warns(DeprecationWarning, match="EnvBoundary is renamed EnvStepBoundary"):
        from fastppo.envstep import EnvBoundary
    assert EnvBoundary is EnvStepBoundary
