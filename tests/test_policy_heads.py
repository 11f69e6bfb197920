"""fastppo.policy.FusedActorCritic's heads beyond the plain categorical and Gaussian ones: masks of
legal actions, the multi-discrete head and the tanh-squashed Gaussian, against float64 formulas
written out here and against the unfused path (``fastppo.agent.sample_and_score`` on fastppo's
heads, and ``fastppo.learner.Learner``'s torch update), on awkward sizes and masks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fastppo.agent import ActionHead, Kernels, sample_and_score  # noqa: E402
from fastppo.learner import Batch, Learner  # noqa: E402
from fastppo.policy import FusedActorCritic, NotFusable  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
NVEC = (3, 4, 5)
LOW, HIGH = (-2.0, 0.5, -1.0), (3.0, 1.5, 1.0)


def close(got, want, tol, what=""):
    """|got - want| <= tol * max(1, max |want|)."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if want.numel():
        err, bound = (got - want).abs().max().item(), tol * max(1.0, want.abs().max().item())
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def head_of(kind: str) -> ActionHead:
    if kind == "categorical":
        return ActionHead("categorical", 7, start=(0,))
    if kind == "multi_categorical":
        return ActionHead("multi_categorical", sum(NVEC), NVEC, (0,) * len(NVEC))
    return ActionHead(kind, len(LOW), low=LOW, high=HIGH, bounds_dtype="float32")


class HeadAgent(nn.Module):
    """An MLP actor-critic with a fastppo.agent.ActionHead, scored by the unfused heads (fastppo's
    kernels through sample_and_score), in any dtype."""

    def __init__(self, obs_dim: int, head: ActionHead, hidden: int = 13):
        super().__init__()
        self.head = head
        self.actor = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                   nn.Linear(hidden, head.n_out))
        self.critic = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        if head.continuous:
            self.actor_logstd = nn.Parameter(torch.randn(head.n_out) * 0.3)

    def get_action_and_value(self, obs, action=None, action_mask=None):
        out = self.actor(obs)
        log_std = self.actor_logstd if self.head.continuous else None
        action, logprob, entropy = sample_and_score(Kernels(), out, log_std, action, self.head, action_mask)
        return action, logprob, entropy, self.critic(obs).squeeze(-1)


def make_agent(kind, dtype, seed=0, obs_dim=5):
    torch.manual_seed(seed)
    return HeadAgent(obs_dim, head_of(kind)).to(dtype)


def sizes_of(head: ActionHead):
    return head.nvec or (head.n_out,)


def random_masks(head: ActionHead, rows: int, g: torch.Generator, none_legal: bool = True) -> torch.Tensor:
    """bool [rows, A]: random legal actions with at least one per component, rows 0 and 1 with a
    single legal action per component, and (none_legal) row 2's first component without any."""
    parts = []
    for n in sizes_of(head):
        m = torch.rand(rows, n, generator=g) < 0.5
        m[torch.arange(rows), torch.randint(0, n, (rows,), generator=g)] = True
        if rows > 1:
            m[:2] = False
            m[0, n - 1] = m[1, 0] = True  # all but one illegal
        parts.append(m)
    mask = torch.cat(parts, 1)
    if none_legal and rows > 2:
        mask[2, :sizes_of(head)[0]] = False
    return mask.contiguous()


# ------------------------------------------------------------------ float64 references of the heads


def discrete_reference(head, logits, mask, noise):
    """(actions [rows, K], summed log-prob, summed entropy) in float64: Gumbel-max among the legal
    columns of each component (column 0 where none is legal), log-softmax over the legal logits."""
    logits = logits.double()
    rows = logits.shape[0]
    actions, logprob, entropy, c0 = [], torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64), 0
    for n in sizes_of(head):
        x = logits[:, c0:c0 + n]
        legal = torch.ones_like(x, dtype=torch.bool) if mask is None else mask[:, c0:c0 + n]
        xm = x.masked_fill(~legal, -math.inf)
        score = xm if noise is None else xm - torch.log(-torch.log(noise[:, c0:c0 + n].double()))
        any_legal = legal.any(1)
        a = torch.where(any_legal, score.argmax(1), torch.zeros(rows, dtype=torch.int64))
        logp = torch.log_softmax(xm, 1)
        p = logp.exp()
        lp = torch.where(any_legal, logp.gather(1, a[:, None])[:, 0], torch.zeros(rows, dtype=torch.float64))
        h = -(p * logp.masked_fill(~legal, 0)).sum(1)
        actions.append(a)
        logprob += lp
        entropy += torch.where(any_legal, h, torch.zeros_like(h))
        c0 += n
    return torch.stack(actions, 1), logprob, entropy


def tanh_reference(mean, log_std, u):
    """(log-prob, entropy) of the tanh-squashed Gaussian at the pre-squash sample u, float64."""
    mean, log_std, u = mean.double(), log_std.double(), u.double()
    logp = torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
    log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))
    return (logp - log_det).sum(-1), (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1).expand(u.shape[0])


# ------------------------------------------------------------------ act


ACT_CASES = [(kind, masked, dtype, rows) for kind, masked in (("categorical", True), ("multi_categorical", False),
                                                             ("multi_categorical", True), ("tanh_normal", False))
             for dtype in (torch.float64, torch.float32) for rows in (1, 97)]


@pytest.mark.parametrize("kind,masked,dtype,rows", ACT_CASES)
def test_act_matches_the_float64_heads_and_the_unfused_scores(kind, masked, dtype, rows):
    agent = make_agent(kind, dtype, seed=rows)
    head = agent.head
    fused = FusedActorCritic(agent)
    assert fused.kind == kind
    g = torch.Generator().manual_seed(rows + 1)
    obs = torch.randn(rows, 5, generator=g, dtype=torch.float64).to(dtype)
    if head.continuous:
        fused.set_action_bounds(np.array(LOW), np.array(HIGH))
        noise = torch.randn(rows, head.n_out, generator=g, dtype=torch.float64).to(dtype) * 3  # some |u| large
    else:
        noise = torch.rand(rows, head.n_out, generator=g, dtype=torch.float64).to(dtype)
    mask = random_masks(head, rows, g) if masked else None
    env = np.zeros((rows,) + head.action_shape, head.env_dtype)
    action, logprob, value = fused.act(obs, noise, mask=mask, env_action=env)
    with torch.no_grad():
        out = agent.actor(obs)
        close(value, agent.critic(obs).squeeze(-1), TOL[dtype], "value")
        if head.continuous:
            u = out.double() + agent.actor_logstd.double().exp() * noise.double()
            close(action, u, TOL[dtype], "action u")
            want_lp, _ = tanh_reference(out, agent.actor_logstd, action)
            want_env = head.to_env(action)
            np.testing.assert_allclose(env, want_env, rtol=1e-6, atol=1e-6)
            assert ((env >= np.float32(LOW)) & (env <= np.float32(HIGH))).all()
        else:
            want_actions, want_lp, _ = discrete_reference(head, out, mask, noise)
            assert torch.equal(action.reshape(rows, -1), want_actions)
            np.testing.assert_array_equal(env, action.numpy().astype(np.int32))
            if mask is not None:  # every sampled action legal where its component has a legal one
                cols = action.reshape(rows, -1) + torch.tensor(np.cumsum((0,) + sizes_of(head))[:-1])
                comp_legal = torch.stack([m.any(1) for m in mask.split(list(sizes_of(head)), 1)], 1)
                assert (mask.gather(1, cols) | ~comp_legal).all()
        close(logprob, want_lp, TOL[dtype], "logprob")
        # the unfused head scores the fused sample alike
        _, unfused_lp, _ = sample_and_score(Kernels(), out, getattr(agent, "actor_logstd", None), action, head, mask)
        close(logprob, unfused_lp, TOL[dtype], "logprob vs the unfused head")
    greedy, _, _ = fused.act(obs, mask=mask)
    if head.continuous:
        close(greedy, out, TOL[dtype], "greedy mean")
    else:
        assert torch.equal(greedy.reshape(rows, -1), discrete_reference(head, out, mask, None)[0])


@pytest.mark.parametrize("kind", ["categorical", "multi_categorical"])
def test_masked_sampling_frequencies_are_the_legal_softmax(kind):
    agent = make_agent(kind, torch.float64, seed=3)
    head = agent.head
    fused = FusedActorCritic(agent)
    n = 40000
    g = torch.Generator().manual_seed(5)
    obs = torch.randn(1, 5, generator=g, dtype=torch.float64).expand(n, 5).contiguous()
    with torch.no_grad():
        agent.actor[-1].weight.mul_(40.0)  # logits of a few units: frequencies far from uniform
        fused.refresh()
        out = agent.actor(obs[:1])
    legal = {"categorical": [1, 0, 1, 1, 0, 0, 1], "multi_categorical": [1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1]}[kind]
    mask = torch.tensor(legal, dtype=torch.bool).expand(n, -1).contiguous()
    action, logprob, _ = fused.act(obs, torch.rand(n, head.n_out, generator=g, dtype=torch.float64), mask=mask)
    action = action.reshape(n, -1)
    c0 = 0
    for k, size in enumerate(sizes_of(head)):
        legal = mask[0, c0:c0 + size]
        p = torch.softmax(out[0, c0:c0 + size].masked_fill(~legal, -math.inf), 0)
        freq = torch.bincount(action[:, k], minlength=size).double() / n
        assert (freq[~legal] == 0).all()  # an illegal action is never sampled
        bound = 5 * (p * (1 - p) / n).sqrt() + 1e-3
        assert ((freq - p).abs() <= bound).all(), (k, freq, p)
        assert p[legal].min() < 0.8 * p[legal].max()  # the frequencies checked are not all alike
        c0 += size


def test_one_legal_action_and_none():
    agent = make_agent("multi_categorical", torch.float64, seed=4)
    fused = FusedActorCritic(agent)
    obs = torch.randn(6, 5, dtype=torch.float64)
    mask = torch.zeros(6, sum(NVEC), dtype=torch.bool)
    mask[:, [2, 3 + 1, 7 + 4]] = True  # one legal action per component
    mask[3:, 3:7] = False              # rows 3..5: none in the second component
    action, logprob, _ = fused.act(obs, torch.rand(6, sum(NVEC), dtype=torch.float64), mask=mask)
    assert (action[:3] == torch.tensor([2, 1, 4])).all() and (action[3:] == torch.tensor([2, 0, 4])).all()
    assert (logprob == 0).all()  # a choice of one has log-prob exactly 0; no choice adds 0


# ------------------------------------------------------------------ update


def make_batch(agent, B, g, masked, row_mask, illegal_column=None):
    """A rollout of B rows sampled from ``agent`` (under random masks when ``masked``; column
    ``illegal_column`` illegal in every row, column 0 legal where that leaves none), with old
    log-probs and values moved away from the current ones so that ratios and value updates clip."""
    dtype = next(agent.parameters()).dtype
    obs = torch.randn(B, 5, generator=g, dtype=torch.float64).to(dtype)
    mask = random_masks(agent.head, B, g) if masked else None
    if illegal_column is not None:
        mask[:, illegal_column] = False
        mask[:, 0] |= ~mask[:, :sizes_of(agent.head)[0]].any(1)
    with torch.no_grad():
        out = agent.actor(obs)
        if agent.head.continuous:
            actions = out + agent.actor_logstd.exp() * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype) * 2
        else:
            noise = torch.rand(out.shape, generator=g, dtype=torch.float64).to(dtype)
            actions = discrete_reference(agent.head, out, mask, noise)[0]
            actions = actions[:, 0] if agent.head.kind == "categorical" else actions
        _, logprob, _, value = agent.get_action_and_value(obs, actions, mask)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return Batch(obs, actions.contiguous(), logprob + randn(B, scale=0.3), randn(B) + 0.3, value + randn(B),
                 value + randn(B, scale=0.3), (torch.rand(B, generator=g) < 0.7) if row_mask else None, mask)


UPDATE_CASES = [("categorical", True, torch.float64, 97, False), ("categorical", True, torch.float64, 1, False),
                ("multi_categorical", False, torch.float64, 97, True), ("multi_categorical", True, torch.float64, 97, True),
                ("multi_categorical", True, torch.float32, 64, False), ("categorical", True, torch.float32, 97, True),
                ("tanh_normal", False, torch.float64, 97, True), ("tanh_normal", False, torch.float32, 1, False)]


@pytest.mark.parametrize("kind,masked,dtype,M,row_mask", UPDATE_CASES)
def test_update_matches_the_torch_learner(kind, masked, dtype, M, row_mask):
    """Three minibatch updates (the first takes rows 0..2: one legal action, and a component with
    none): parameters, gradients, stats and the grad norm equal the torch Learner's on a copy."""
    agent = make_agent(kind, dtype, seed=M)
    B = 301
    batch = make_batch(agent, B, torch.Generator().manual_seed(M + 7), masked, row_mask)
    ref = copy.deepcopy(agent)
    opts = dict(lr=1e-2, max_grad_norm=0.5, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)
    fused = FusedActorCritic(agent, **opts)
    learner = Learner(ref, "torch", **opts)
    learner.set_batch(batch)
    fused.set_batch(*batch)
    g = torch.Generator().manual_seed(M)
    first = torch.cat([torch.arange(min(M, 3)), torch.randperm(B - 3, generator=g)[:M - min(M, 3)] + 3])
    for k, idx in enumerate([first, torch.randperm(B, generator=g)[:M], torch.randint(0, B, (M,), generator=g)]):
        stats = fused.update(idx)
        want = learner.minibatch(idx)
        close(stats, want, TOL[dtype], f"update {k}: stats")
        for (name, p), q in zip(agent.named_parameters(), ref.parameters()):
            close(p.grad, q.grad, TOL[dtype], f"update {k}: grad of {name}")
            close(p.detach(), q.detach(), TOL[dtype], f"update {k}: {name}")
    assert np.isfinite(stats).all()


@pytest.mark.parametrize("kind", ["categorical", "multi_categorical"])
def test_illegal_logits_get_exactly_zero_gradient(kind):
    agent = make_agent(kind, torch.float64, seed=9)
    g = torch.Generator().manual_seed(9)
    batch = make_batch(agent, 64, g, True, False, illegal_column=1)
    fused = FusedActorCritic(agent, max_grad_norm=1e9, ent_coef=0.01)
    fused.set_batch(*batch)
    fused.update(torch.arange(64))
    last = agent.actor[-1]
    assert (last.weight.grad[1] == 0).all() and last.bias.grad[1] == 0
    assert (last.weight.grad[0] != 0).any() and last.bias.grad[0] != 0  # the legal ones do learn


def test_bind_rollout_reads_each_steps_mask():
    agent = make_agent("multi_categorical", torch.float32, seed=2)
    fused = FusedActorCritic(agent)
    T, N, A = 3, 4, sum(NVEC)
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(T + 1, N, 5, generator=g).numpy()
    noise = torch.rand(T, N, A, generator=g)
    masks = np.stack([random_masks(agent.head, N, g).numpy() for _ in range(T)])
    action, logprob, value = torch.zeros(T, N, 3, dtype=torch.int64), torch.zeros(T, N), torch.zeros(T, N)
    env = np.zeros((T, N, 3), np.int32)
    act_step = fused.bind_rollout(obs, noise, action, logprob, value, env, masks)
    for t in range(T):
        act_step(t)
        want_action, want_lp, want_value = fused.act(torch.from_numpy(obs[t]), noise[t], mask=masks[t])
        assert torch.equal(action[t], want_action) and torch.equal(logprob[t], want_lp)
        np.testing.assert_array_equal(env[t], want_action.numpy())


# ------------------------------------------------------------------ bad input


def test_bad_masks_and_actions_name_the_argument():
    agent = make_agent("categorical", torch.float64)
    fused = FusedActorCritic(agent)
    obs = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"act: mask has shape \(4, 6\); expected \(4, 7\)"):
        fused.act(obs, mask=torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="act: mask .*uint8.*bool"):
        fused.act(obs, mask=torch.ones(4, 7, dtype=torch.uint8))
    g = torch.Generator().manual_seed(0)
    batch = make_batch(agent, 10, g, True, False)
    with pytest.raises(ValueError, match=r"set_batch: action_mask has shape \(10, 8\); expected \(10, 7\)"):
        fused.set_batch(*batch[:7], torch.ones(10, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="set_batch: action_mask .*int64.*bool"):
        fused.set_batch(*batch[:7], batch.action_mask.long())
    mask = batch.action_mask.clone()
    mask[5] = True
    mask[5, batch.actions[5]] = False
    with pytest.raises(ValueError, match=f"set_batch: actions holds at row 5 action {int(batch.actions[5])}, which "
                                         "action_mask marks illegal"):
        fused.set_batch(*batch[:7], mask)
    fused.set_batch(*batch[:7], batch.action_mask.t().contiguous().t())  # strided: copied once, accepted

    multi = FusedActorCritic(make_agent("multi_categorical", torch.float64))
    mbatch = make_batch(multi.module, 10, g, True, False)
    bad = mbatch.actions.clone()
    bad[3, 2] = 5
    with pytest.raises(ValueError, match=r"in \[0, 5\) \(component 2 of nvec \[3, 4, 5\]\), got values from 0 to 5"):
        multi.set_batch(mbatch.obs, bad, *mbatch[2:])
    mask = mbatch.action_mask.clone()
    mask[4, 3 + int(mbatch.actions[4, 1])] = False
    mask[4, 3 + (int(mbatch.actions[4, 1]) + 1) % 4] = True
    with pytest.raises(ValueError, match="row 4 component 1's action"):
        multi.set_batch(*mbatch[:7], mask)
    with pytest.raises(ValueError, match=r"actions has shape \(10,\); expected \(10, 3\)"):
        multi.set_batch(mbatch.obs, mbatch.actions[:, 0], *mbatch[2:])

    tanh = FusedActorCritic(make_agent("tanh_normal", torch.float64))
    with pytest.raises(ValueError, match="act: mask selects among a categorical or multi-discrete"):
        tanh.act(obs, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="set_action_bounds: .* finite with low < high"):
        tanh.set_action_bounds(np.array([-1.0, -np.inf, 0.0]), np.ones(3))
    with pytest.raises(ValueError, match="bind_rollout: mask has shape"):
        fused.bind_rollout(np.zeros((3, 2, 5)), torch.zeros(2, 2, 7, dtype=torch.float64),
                           torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.float64),
                           torch.zeros(2, 2, dtype=torch.float64), np.zeros((2, 2), np.int32),
                           np.ones((2, 2, 6), np.bool_))


def test_heads_of_modules_without_an_action_head():
    class Plain(nn.Module):
        def __init__(self, n_out, continuous):
            super().__init__()
            self.actor, self.critic = nn.Linear(5, n_out), nn.Linear(5, 1)
            if continuous:
                self.actor_logstd = nn.Parameter(torch.zeros(n_out))

    assert FusedActorCritic(Plain(12, False), nvec=[3, 4, 5]).kind == "multi_categorical"
    assert FusedActorCritic(Plain(3, True), squash="tanh").kind == "tanh_normal"
    assert FusedActorCritic(Plain(12, False)).kind == "categorical"
    with pytest.raises(ValueError, match="nvec must be a list of component sizes >= 1 summing to the actor's 12"):
        FusedActorCritic(Plain(12, False), nvec=[3, 4])
    with pytest.raises(ValueError, match="squash='tanh' squashes a Gaussian policy"):
        FusedActorCritic(Plain(12, False), squash="tanh")
    plain = Plain(3, False)
    plain.head = head_of("normal")
    with pytest.raises(NotFusable, match="a normal head needs actor_logstd"):
        FusedActorCritic(plain)
    with pytest.raises(ValueError, match="has a policy head .* nvec and squash are for modules without one"):
        FusedActorCritic(make_agent("tanh_normal", torch.float64), squash="tanh")
