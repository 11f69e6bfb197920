"""``fastppo train``'s policy head follows the action space (Discrete, MultiDiscrete, bounded Box
squashed by tanh, Box as CleanRL's), and action masks come from the environments: the heads
against float64 torch.distributions, the masks from the environment to the sample and the
update, short training runs on fastppo.toy_envs' masked tasks, eval and export of the new heads,
and the flags' errors."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

pytest.importorskip("envpool")
gym = pytest.importorskip("gymnasium")

import fastppo.toy_envs  # noqa: E402,F401  (registers the tasks)
from fastppo import cli  # noqa: E402
from fastppo import train as T  # noqa: E402
from fastppo.agent import ActionHead, Agent, Kernels, action_head, sample_and_score  # noqa: E402
from fastppo.config import action_masks_on, policy_backend, resolve  # noqa: E402
from fastppo.envs import action_mask_source, env_family, flat_mask, make_env, probe_actions  # noqa: E402
from fastppo.evaluate import evaluate  # noqa: E402
from fastppo.learner import Learner  # noqa: E402
from fastppo.recurrent import make_agent  # noqa: E402
from fastppo.rollout import make_collector  # noqa: E402

F64 = torch.float64
TOY = "fastppo.toy_envs:"
TIGHT = dict(rtol=1e-9, atol=1e-9)



class UnboundedBox(gym.Env):
    """A Box action without bounds (never stepped: for the errors of --squash tanh)."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


gym.register(id="UnboundedBox-v0", entry_point=UnboundedBox)  # found by its plain id in this process


class StartedSpaces(gym.Env):
    """Discrete and MultiDiscrete actions that start above 0; an action outside the space is an error."""

    def __init__(self, multi=False):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = (gym.spaces.MultiDiscrete([2, 3], start=[5, -1]) if multi
                             else gym.spaces.Discrete(3, start=2))
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        if not self.action_space.contains(np.asarray(action, self.action_space.dtype)):
            raise ValueError(f"action {action} outside {self.action_space}")
        self.t += 1
        return np.zeros(2, np.float32), 0.0, self.t >= 10, False, {}


gym.register(id="StartedDiscrete-v0", entry_point=StartedSpaces)
gym.register(id="StartedMultiDiscrete-v0", entry_point=StartedSpaces, kwargs=dict(multi=True))


@pytest.fixture(autouse=True)
def one_thread():
    """The small MLPs here gain nothing from more threads, and on a shared CPU their spin-waits
    cost an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args_for(tmp_path, env_id, **changes):
    return T.Args(env_id=env_id, run_dir=str(tmp_path), run_name="run", log_every=1000, **changes)


# ------------------------------------------------------------------ the head of each space


def test_each_space_gets_its_head_shapes_and_dtypes():
    cases = [
        (gym.spaces.Discrete(5), "none", "categorical", 5, (), torch.int64, np.int32),
        (gym.spaces.Discrete(5, start=2), "none", "categorical", 5, (), torch.int64, np.int32),
        (gym.spaces.MultiDiscrete([3, 4, 2]), "none", "multi_categorical", 9, (3,), torch.int64, np.int32),
        (gym.spaces.Box(-1.0, 1.0, (3,), np.float32), "none", "normal", 3, (3,), torch.float32, np.float32),
        (gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), "none", "normal", 3, (3,), torch.float32, np.float32),
        (gym.spaces.Box(-2.0, 3.0, (3,), np.float32), "tanh", "tanh_normal", 3, (3,), torch.float32, np.float32),
    ]
    obs = torch.randn(6, 4)
    for space, squash, kind, n_out, shape, dtype, env_dtype in cases:
        head = action_head(space, squash)
        assert (head.kind, head.n_out, head.action_shape, head.action_dtype, head.env_dtype) == (
            kind, n_out, shape, dtype, np.dtype(env_dtype)), space
        assert head.maskable == (kind in ("categorical", "multi_categorical"))
        torch.manual_seed(0)
        agent = Agent((4,), space, "classic", squash=squash)
        assert agent.head == head and agent.continuous == head.continuous
        assert agent.actor[-1].out_features == n_out and hasattr(agent, "actor_logstd") == head.continuous
        action, logprob, entropy, value = agent.get_action_and_value(obs)
        assert action.shape == (6,) + shape and action.dtype == dtype
        assert logprob.shape == entropy.shape == value.shape == (6,)
        sent = head.to_env(action)
        assert sent.dtype == env_dtype and sent.shape == (6,) + shape
        assert all(space.contains(a if a.ndim else a.item()) for a in sent), (space, sent)
    # gymnasium's start offsets the actions sent, not the stored ones
    head = action_head(gym.spaces.Discrete(5, start=2))
    assert head.to_env(torch.tensor([0, 4])).tolist() == [2, 6]
    head = action_head(gym.spaces.MultiDiscrete([3, 4], start=[1, -1]))
    assert head.to_env(torch.tensor([[0, 0], [2, 3]])).tolist() == [[1, -1], [3, 2]]


def test_duck_typed_spaces_and_unsupported_ones():
    class CartPoleActions:  # what benchmarks and tests pass: n and shape only
        n, shape = 2, ()

    assert action_head(CartPoleActions()) == ActionHead("categorical", 2, start=(0,))
    for space, words in [(gym.spaces.Box(-1, 1, (2, 3)), "1-D Box"), (gym.spaces.MultiBinary(3), "Discrete, MultiDiscrete"),
                         (gym.spaces.MultiDiscrete([[2, 3], [2, 2]]), "1-D nvec")]:
        with pytest.raises(ValueError, match=words):
            action_head(space)


def rand_mask(shape, g, splits=None):
    """A random bool mask with at least one legal action per row (per component with ``splits``)."""
    mask = torch.rand(shape, generator=g) < 0.6
    parts = mask.split(splits, -1) if splits else [mask]
    for part in parts:
        first = torch.randint(0, part.shape[-1], part.shape[:-1], generator=g)
        part.scatter_(-1, first.unsqueeze(-1), True)
    return mask


def masked_categorical(logits, mask):
    """sb3-contrib's MaskableCategorical written out: the illegal logits replaced by -1e8."""
    return torch.distributions.Categorical(logits=logits.masked_fill(~mask, -1e8))


@pytest.mark.parametrize("kind", ["categorical", "categorical-masked", "multi", "multi-masked", "normal", "tanh"])
def test_head_values_and_gradients_match_float64_torch_distributions(kind):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)  # the samples of torch.distributions
    rows, nvec = 97, (3, 4, 2)
    spaces = {"categorical": gym.spaces.Discrete(7), "multi": gym.spaces.MultiDiscrete(nvec),
              "normal": gym.spaces.Box(-1.0, 1.0, (4,)), "tanh": gym.spaces.Box(-2.0, 3.0, (4,))}
    base = kind.split("-")[0]
    head = action_head(spaces[base], "tanh" if base == "tanh" else "none")
    out = torch.randn(rows, head.n_out, generator=g, dtype=F64, requires_grad=True)
    log_std = (0.3 * torch.randn(head.n_out, generator=g, dtype=F64)).requires_grad_()
    mask = None
    if kind.endswith("masked"):
        mask = rand_mask((rows, head.n_out), g, list(nvec) if base == "multi" else None)
    if base == "categorical":
        dist = masked_categorical(out, mask) if mask is not None else torch.distributions.Categorical(logits=out)
        action = dist.sample()
        ref_logprob, ref_entropy = dist.log_prob(action), dist.entropy()
    elif base == "multi":
        parts = out.split(list(nvec), -1)
        masks = mask.split(list(nvec), -1) if mask is not None else [None] * len(nvec)
        dists = [masked_categorical(p, m) if m is not None else torch.distributions.Categorical(logits=p)
                 for p, m in zip(parts, masks)]
        action = torch.stack([d.sample() for d in dists], -1)
        ref_logprob = sum(d.log_prob(action[:, k]) for k, d in enumerate(dists))
        ref_entropy = sum(d.entropy() for d in dists)
    elif base == "normal":
        dist = torch.distributions.Normal(out, log_std.exp())
        action = dist.sample()
        ref_logprob, ref_entropy = dist.log_prob(action).sum(-1), dist.entropy().sum(-1)
    else:  # the stored action is the pre-squash sample u; the log-prob is that of tanh(u)
        gauss = torch.distributions.Normal(out, log_std.exp())
        squashed = torch.distributions.TransformedDistribution(
            gauss, [torch.distributions.transforms.TanhTransform(cache_size=1)])
        action = gauss.sample()
        ref_logprob, ref_entropy = squashed.log_prob(torch.tanh(action)).sum(-1), gauss.entropy().sum(-1)
    if mask is not None:
        assert bool(torch.gather(mask, -1, (action if base == "categorical" else action + torch.tensor([0, 3, 7]))
                                 .reshape(rows, -1)).all())
    _, logprob, entropy = sample_and_score(Kernels(), out, log_std if head.continuous else None, action, head, mask)
    torch.testing.assert_close(logprob, ref_logprob, **TIGHT)
    torch.testing.assert_close(entropy, ref_entropy, **TIGHT)
    w1, w2 = torch.randn(rows, generator=g, dtype=F64), torch.randn(rows, generator=g, dtype=F64)
    leaves = [out, log_std] if head.continuous else [out]
    got = torch.autograd.grad((logprob * w1 + entropy * w2).sum(), leaves)
    want = torch.autograd.grad((ref_logprob * w1 + ref_entropy * w2).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TIGHT)
    if mask is not None:  # an illegal logit has no gradient at all
        assert bool((got[0][~mask] == 0).all())


@pytest.mark.parametrize("base", ["categorical", "multi"])
def test_masked_sampling_takes_legal_actions_at_the_masked_softmax_frequencies(base):
    g = torch.Generator().manual_seed(5)
    nvec = (3, 4, 2)
    head = action_head(gym.spaces.Discrete(6) if base == "categorical" else gym.spaces.MultiDiscrete(nvec))
    rows = 4000
    logits = torch.randn(1, head.n_out, generator=g).expand(rows, -1).contiguous()
    mask = rand_mask((1, head.n_out), g, list(nvec) if base == "multi" else None).expand(rows, -1).contiguous()
    torch.manual_seed(0)
    action, logprob, _ = sample_and_score(Kernels(), logits, None, None, head, mask)
    columns = (action if base == "categorical" else action + torch.tensor([0, 3, 7])).reshape(rows, -1)
    assert bool(mask.gather(-1, columns).all())
    offsets = [0] if base == "categorical" else [0, 3, 7]
    sizes = [6] if base == "categorical" else list(nvec)
    for k, (o, n) in enumerate(zip(offsets, sizes)):
        p = torch.softmax(logits[0, o:o + n].masked_fill(~mask[0, o:o + n], -torch.inf), -1)
        counts = torch.bincount(columns[:, k] - o, minlength=n).float() / rows
        assert float((counts - p).abs().max()) < 0.03, (k, counts, p)


def test_tanh_actions_stay_in_the_bounds_and_reach_them():
    space = gym.spaces.Box(np.array([-2.0, 0.5, -1e-3], np.float32), np.array([3.0, 1.5, 1e-3], np.float32))
    head = action_head(space, "tanh")
    u = torch.tensor([[-1e4, -1e4, -1e4], [1e4, 1e4, 1e4], [0.0, 0.0, 0.0], [-20.0, 20.0, 9.0], [0.3, -0.7, -30.0]])
    sent = head.to_env(u)
    assert sent.dtype == np.float32 and bool(((sent >= space.low) & (sent <= space.high)).all())
    assert sent[0].tolist() == space.low.tolist() and sent[1].tolist() == space.high.tolist()
    mid = (space.low.astype(np.float64) + space.high) / 2
    np.testing.assert_allclose(sent[2], mid, rtol=1e-6)
    expected = space.low + (np.tanh(u.double().numpy()) + 1) * (space.high.astype(np.float64) - space.low) / 2
    np.testing.assert_allclose(sent, expected, rtol=1e-6, atol=1e-7)
    # without the squash the Gaussian's sample is clipped, as CleanRL's continuous PPO sends it
    clipped = action_head(space).to_env(u)
    assert clipped[0].tolist() == space.low.tolist() and clipped[2].tolist() == [0.0, 0.5, 0.0]


# ------------------------------------------------------------------ masks from the environments


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("env_id,source", [("InvalidAction-v0", "method"), ("InvalidActionInfo-v0", "info"),
                                           ("InvalidActionMulti-v0", "method")])
def test_collector_stores_the_environments_masks_and_samples_only_legal_actions(tmp_path, env_id, source, backend):
    args = resolve(args_for(tmp_path, TOY + env_id, num_envs=4, num_steps=50))
    envs = make_env(args, "classic")
    assert action_mask_source(envs) == source
    torch.manual_seed(0)
    agent = make_agent(args, envs.observation_space.shape, envs.action_space, "classic")
    fused = Learner(agent, "fused").fused if backend == "fused" else None
    collector = make_collector(args, envs, agent, "classic", torch.device("cpu"), fused)
    assert type(collector).__name__ == ("SyncFusedCollector" if fused else "SyncTorchCollector")
    collector.start()
    head, n = agent.head, agent.head.n_out
    sizes = list(head.nvec or (n,))
    timing = dict(env=0.0, inference=0.0, gae=0.0, learn=0.0)
    for _ in range(3):  # rollouts of 50 steps over episodes of 20: dummy reset steps included
        collector.collect(timing)
        masks, obs = collector.action_masks, collector.obs[:collector.T]
        # each environment shows its legal actions in the observation: the stored mask is that step's
        shown = np.concatenate([half[..., k:] for k, half in zip(sizes, np.split(obs, 2 * np.cumsum(sizes)[:-1], -1))],
                               -1)
        assert masks.shape == (collector.T, 4, n) and masks.dtype == np.bool_
        np.testing.assert_array_equal(masks, shown > 0.5)
        actions = collector.actions.numpy().reshape(collector.T, 4, -1)
        offsets = np.cumsum([0] + sizes[:-1])
        assert np.take_along_axis(masks, actions + offsets, -1).all()
        assert not collector.real.all()  # episodes ended within the rollouts
        batch = collector.batch(0.99, 0.95)
        assert torch.equal(batch.action_mask, torch.from_numpy(masks).reshape(-1, n))
    illegal = sum(env.unwrapped.illegal_actions for env in envs.envs.envs)
    assert illegal == 0  # the environments, which count what they receive, never saw an illegal action
    envs.close()


def test_update_scores_each_action_under_its_mask(tmp_path):
    args = resolve(args_for(tmp_path, TOY + "InvalidAction-v0", num_envs=4, num_steps=64))
    envs = make_env(args, "classic")
    torch.manual_seed(1)
    agent = make_agent(args, envs.observation_space.shape, envs.action_space, "classic")
    collector = make_collector(args, envs, agent, "classic", torch.device("cpu"))
    collector.start()
    collector.collect(dict(env=0.0, inference=0.0, gae=0.0, learn=0.0))
    batch = collector.batch(0.99, 0.95)
    envs.close()

    def first_kl(b, backend):  # one minibatch, one epoch: approx_kl before any step (ratio = new / stored prob)
        learner = Learner(copy.deepcopy(agent), backend, lr=0.0, update_epochs=1, num_minibatches=1)
        return learner.update(b)[3]

    for backend in ("torch", "fused"):
        assert abs(first_kl(batch, backend)) < 1e-6  # scored under the masks it was sampled with: the same log-probs
        assert first_kl(batch._replace(action_mask=None), backend) > 1e-3  # without them the log-probs differ


def test_action_masks_of_every_shape_lay_out_flat():
    # a flat list of flags (sb3-contrib's Discrete task), an array, per-component lists of equal and of
    # different lengths (a MultiDiscrete task's), arrays per component: side by side in component order
    cases = [([True, False, True], [1, 0, 1]), (np.array([0, 1], bool), [0, 1]),
             ([[True, False], [False, True]], [1, 0, 0, 1]), ([[True, False], [False, True, True]], [1, 0, 0, 1, 1]),
             ((np.array([1, 0], bool), np.array([0, 1, 0], bool)), [1, 0, 0, 1, 0]),
             (np.array([[1, 0, 1], [0, 1, 1]], bool), [1, 0, 1, 0, 1, 1])]
    for mask, want in cases:
        got = flat_mask(mask)
        assert got.ndim == 1 and got.astype(bool).tolist() == [bool(w) for w in want], (mask, got)


def test_flags_pick_masks_and_backend():
    head = action_head(gym.spaces.Discrete(3))
    assert action_masks_on("auto", head, "info", "X") and action_masks_on("on", head, "method", "X")
    assert not action_masks_on("auto", head, None, "X") and not action_masks_on("off", head, "info", "X")
    assert not action_masks_on("auto", action_head(gym.spaces.Box(-1, 1, (2,))), None, "X")
    args = T.Args()
    space = gym.spaces.MultiDiscrete([2, 3])
    assert policy_backend(args, "classic", (4,), torch.device("cpu"), None, gym.spaces.Discrete(3)) == "fused"
    # every head runs fused on the CPU: masked, MultiDiscrete and tanh-squashed included
    assert policy_backend(args, "classic", (4,), torch.device("cpu"), None, gym.spaces.Discrete(3), masked=True) == "fused"
    assert policy_backend(args, "classic", (4,), torch.device("cpu"), None, space, masked=True) == "fused"
    box = gym.spaces.Box(-1.0, 1.0, (2,))
    assert policy_backend(args, "mujoco", (4,), torch.device("cpu"), None, box) == "fused"
    assert policy_backend(dataclasses.replace(args, squash="tanh"), "mujoco", (4,), torch.device("cpu"), None, box) == "fused"
    assert policy_backend(dataclasses.replace(args, recurrent="gru"), "classic", (4,), torch.device("cpu"), None, space,
                          masked=True) == "torch"
    from fastppo.policy import FusedActorCritic

    for agent, kind in ((Agent((4,), space, "classic"), "multi_categorical"),
                        (Agent((4,), box, "mujoco", squash="tanh"), "tanh_normal")):
        assert Learner(agent, "fused").fused.kind == kind
        assert FusedActorCritic(copy.deepcopy(agent)).kind == kind


def test_defaults_of_the_mujoco_and_classic_presets_are_unchanged(tmp_path):
    # MuJoCo keeps CleanRL's clipped Gaussian on the fused backend; CartPole its categorical head.
    for env_id, obs_shape, kind in (("HalfCheetah-v5", (17,), "normal"), ("CartPole-v1", (4,), "categorical")):
        args = resolve(args_for(tmp_path, env_id))
        assert args.squash == "none" and args.action_masks == "auto"
        space, source = probe_actions(env_id)
        assert action_head(space, args.squash).kind == kind and source is None
        assert policy_backend(args, env_family(env_id), obs_shape, torch.device("cpu"), action_space=space) == "fused"


# ------------------------------------------------------------------ the flags' errors


@pytest.mark.parametrize("changes,words", [
    (dict(env_id="CartPole-v1", squash="tanh"), ["--squash tanh", "Discrete(2)", "--squash none"]),
    (dict(env_id="UnboundedBox-v0", squash="tanh"), ["--squash tanh", "finite"]),
    (dict(env_id="CartPole-v1", squash="sigmoid"), ["--squash must be one of none, tanh", "'sigmoid'"]),
    (dict(env_id="CartPole-v1", action_masks="yes"), ["--action-masks must be one of auto, on, off", "'yes'"]),
    (dict(env_id="CartPole-v1", action_masks="on"), ["--action-masks on", "CartPole-v1 gives no action masks"]),
    (dict(env_id=TOY + "BoundedTarget-v0", action_masks="on"), ["--action-masks on", "continuous"]),
    (dict(env_id=TOY + "InvalidAction-v0", policy_backend="fused", recurrent="gru"),
     ["--policy-backend fused", "--recurrent gru is set"]),
])
def test_bad_flag_combinations_fail_before_any_work(tmp_path, changes, words):
    with pytest.raises(ValueError) as info:
        T.train(args_for(tmp_path, **changes))
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not (tmp_path / "run").exists()


def test_cli_reports_a_bad_flag_by_name(tmp_path, capsys):
    code = cli.main(["train", "--env-id", "CartPole-v1", "--action-masks", "on", "--run-dir", str(tmp_path)])
    assert code == 2 and "--action-masks on" in capsys.readouterr().err


# ------------------------------------------------------------------ training, eval, export

# Settings that learn these tasks in a few seconds: 8 envs x 32 steps, one minibatch, 20 epochs.
JIT_LOAD = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")  # torch 2.9 on
QUICK = dict(preset="classic-fast", learning_rate=3e-3, num_envs=8, num_steps=32)


def learn_evaluate_and_export(tmp_path, task: str, eval_floor: float, backend: str) -> None:
    """Trains on ``task`` with QUICK's settings on ``backend`` (``auto`` resolves to the fused one; a
    training return above 15 of 20), evaluates the run above ``eval_floor`` and exports it to
    tmp_path/policy.{torchscript,onnx}."""
    summary = T.train(args_for(tmp_path, TOY + task, total_timesteps=16384, policy_backend=backend, **QUICK))
    assert summary["policy_backend"] == ("fused" if backend == "auto" else backend), summary
    assert summary["episodic_return"] > 15, summary
    run = tmp_path / "run"
    result = evaluate(str(run), episodes=8)
    assert result["mean_return"] > eval_floor, result
    for fmt in ("torchscript", "onnx"):
        assert cli.main(["export", str(run), "--format", fmt, "--out", str(tmp_path / f"policy.{fmt}")]) == 0


@JIT_LOAD
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_masked_task_learns_then_evaluates_and_exports_with_masks(tmp_path, backend):
    ort = pytest.importorskip("onnxruntime")
    # a uniform choice among the 3 legal actions earns 20/3 per 20-step episode; the correct one 20
    learn_evaluate_and_export(tmp_path, "InvalidAction-v0", eval_floor=18, backend=backend)
    env = gym.make(TOY + "InvalidAction-v0")
    obs, _ = env.reset(seed=3)
    obs = np.stack([obs] + [env.step(0)[0] for _ in range(15)])
    legal = obs[:, 8:] > 0.5
    target = obs[:, :8].argmax(-1)
    scripted = torch.jit.load(str(tmp_path / "policy.torchscript"))
    picked = scripted(torch.from_numpy(obs), torch.from_numpy(legal)).numpy()
    session = ort.InferenceSession(str(tmp_path / "policy.onnx"))
    onnx_picked = session.run(None, {"obs": obs, "action_mask": legal})[0]
    np.testing.assert_array_equal(picked, onnx_picked)
    assert legal[np.arange(16), picked].all() and (picked == target).mean() > 0.9
    # a mask that leaves one action legal decides the exported policy's action
    only = np.zeros_like(legal)
    only[np.arange(16), 7 - target % 8] = True
    assert (scripted(torch.from_numpy(obs), torch.from_numpy(only)).numpy() == 7 - target % 8).all()
    env.close()


@JIT_LOAD
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_multidiscrete_task_learns_evaluates_and_exports(tmp_path, backend):
    ort = pytest.importorskip("onnxruntime")
    # a uniform choice among each component's 2 legal actions earns 10 per episode; the correct one 20
    learn_evaluate_and_export(tmp_path, "InvalidActionMulti-v0", eval_floor=17, backend=backend)
    env = gym.make(TOY + "InvalidActionMulti-v0")
    obs = np.stack([env.reset(seed=4)[0]] + [env.step([0, 0, 0])[0] for _ in range(15)])
    legal = env.unwrapped.mask[None].repeat(16, 0)  # any mask of the right width: here the last step's
    picked = torch.jit.load(str(tmp_path / "policy.torchscript"))(torch.from_numpy(obs), torch.from_numpy(legal)).numpy()
    onnx_picked = ort.InferenceSession(str(tmp_path / "policy.onnx")).run(None, {"obs": obs, "action_mask": legal})[0]
    assert picked.shape == (16, 3) and picked.dtype == np.int64
    np.testing.assert_array_equal(picked, onnx_picked)
    assert np.take_along_axis(legal, picked + np.array([0, 3, 7]), -1).all()
    env.close()


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_masks_off_lets_the_environment_see_illegal_actions(tmp_path, mode):
    args = resolve(args_for(tmp_path, TOY + "InvalidAction-v0", total_timesteps=2048, action_masks=mode, **QUICK))
    envs = make_env(args, "classic")
    summary = T.train(args, envs=envs)
    assert summary["policy_backend"] == "fused"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["action_masks"] == mode
    illegal = sum(env.unwrapped.illegal_actions for env in envs.envs.envs)
    assert (illegal > 100) if mode == "off" else (illegal == 0)  # 5 of 8 actions are illegal at each step


@pytest.mark.parametrize("env_id", ["StartedDiscrete-v0", "StartedMultiDiscrete-v0"])
def test_the_fused_policy_adds_the_spaces_start(tmp_path, env_id):
    # the environments raise on an action outside their space: the run would fail without the start
    summary = T.train(args_for(tmp_path, env_id, total_timesteps=512, num_envs=4, num_steps=64, preset="classic-fast"))
    assert summary["policy_backend"] == "fused" and summary["episodes"] > 0


def test_recurrent_policy_takes_the_masks_too(tmp_path):
    summary = T.train(args_for(tmp_path, TOY + "InvalidActionMulti-v0", total_timesteps=2048, recurrent="gru", **QUICK))
    assert summary["policy_backend"] == "torch" and summary["episodes"] > 0
    assert evaluate(str(tmp_path / "run"), episodes=2)["episodes"] == 2


@JIT_LOAD
@pytest.mark.parametrize("squash", ["tanh", "none"])
def test_bounded_box_actions_stay_inside_the_bounds(tmp_path, squash):
    # BoundedTarget-v0 raises on an action outside [low, high]: the run would fail
    summary = T.train(args_for(tmp_path, TOY + "BoundedTarget-v0", total_timesteps=4096, squash=squash,
                               num_envs=4, num_steps=256, num_minibatches=4, update_epochs=4))
    assert summary["policy_backend"] == "fused" and summary["episodes"] > 0
    run = tmp_path / "run"
    assert np.isfinite(evaluate(str(run), episodes=2)["mean_return"])
    assert cli.main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "p.pt")]) == 0
    policy = torch.jit.load(str(tmp_path / "p.pt"))
    actions = policy(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 100)
    low, high = torch.tensor([-2.0, 0.5]), torch.tensor([3.0, 1.5])
    assert actions.shape == (64, 2) and bool(((actions >= low) & (actions <= high)).all())


@pytest.mark.parametrize("env_id", ["InvalidActionInfo-v0", "InvalidActionMulti-v0"])
def test_masked_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path, env_id):
    # --resume-replay replays the logged actions; the masks of the next step come from the last replayed one
    settings = dict(env_id=TOY + env_id, total_timesteps=4 * 4 * 50, num_envs=4, num_steps=50, checkpoint_every=2,
                    resume_replay=True, preset="classic-fast", learning_rate=3e-3)
    T.train(T.Args(run_dir=str(tmp_path), run_name="whole", log_every=1000, **settings))
    T.train(T.Args(run_dir=str(tmp_path), run_name="split", log_every=1000, **settings), stop_after=2)
    T.train(T.Args(), resume=str(tmp_path / "split"))

    def metrics(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time") and k not in ("sps", "first_iteration")}
                for r in rows]

    assert len(metrics("whole")) == 4 and metrics("split") == metrics("whole")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
