"""fastppo.policy: the fused MLP and the fused actor-critic against the same computation in torch.

Every reference is eager torch: ``seq(x)`` for :func:`fused_mlp` (in float64), and for
:class:`FusedActorCritic` the torch training step it replaces, ``fastppo.learner.Learner``'s torch
backend: the module's forward, fastppo's heads and ``ppo_loss``, ``loss.backward()``,
``clip_grad_norm_`` and ``torch.optim.Adam``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastppo  # noqa: E402
from fastppo.learner import Batch as LearnerBatch  # noqa: E402
from fastppo.learner import Learner  # noqa: E402
from fastppo.policy import FusedActorCritic, NotFusable, fused_mlp, mlp_layers  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def close(got, want, tol: float, what: str = "") -> None:
    """|got - want| <= tol * max(1, max |want|): an error relative to the reference's magnitude."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def mlp(sizes, act=nn.Tanh, last_linear=True) -> nn.Sequential:
    """Linear(sizes[0], sizes[1]), act, Linear(sizes[1], sizes[2]), act, ... (an act after the last
    Linear too unless `last_linear`)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or not last_linear:
            layers.append(act())
    return nn.Sequential(*layers)


# ================================================================== fused_mlp


def mlp_case(sizes, act, dtype, rows, seed, last_linear=True):
    """A random stack and input: the module in `dtype` and a float64 copy as the reference."""
    torch.manual_seed(seed)
    seq = mlp(sizes, act, last_linear).to(torch.float64)
    with torch.no_grad():  # larger than the default init, so tanh saturates and relu cuts often
        for p in seq.parameters():
            p.mul_(2.0)
    ref = copy.deepcopy(seq)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, sizes[0], generator=g, dtype=torch.float64)
    return seq.to(dtype), ref, x


def check_fused_mlp(seq, ref, x, dtype, last_linear=True, seed=0):
    """fused_mlp(seq, x) and its gradients (w.r.t. x and every parameter, for a random incoming
    gradient) against ref(x) in float64."""
    xs = x.detach().to(dtype).requires_grad_()
    xr = x.detach().to(torch.float64).requires_grad_()
    out = fused_mlp(seq, xs, last_linear=last_linear)
    want = ref(xr)
    assert out.dtype == dtype and out.shape == want.shape
    tol = TOL[dtype]
    close(out, want, tol, "output")
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(out, [xs, *seq.parameters()], grad_out.to(dtype))
    want_grads = torch.autograd.grad(want, [xr, *ref.parameters()], grad_out)
    names = ["x"] + [n for n, _ in seq.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads):
        assert a.dtype == dtype
        close(a, b, tol, f"d {name}")


MLP_CASES = [  # dtype, activation, Linear widths (depth = len - 1), rows
    (torch.float64, nn.Tanh, [7, 1], 1),
    (torch.float64, nn.ReLU, [1, 7, 64], 5),
    (torch.float64, nn.Tanh, [7, 64, 64, 97], 97),
    (torch.float64, nn.ReLU, [64, 1, 97, 7], 1025),
    (torch.float64, nn.Tanh, [97, 64, 1], 4096),
    (torch.float32, nn.Tanh, [17, 64, 64, 1], 4096),
    (torch.float32, nn.ReLU, [97, 97, 7], 1025),
    (torch.float32, nn.Tanh, [64, 97], 5),
    (torch.float32, nn.ReLU, [1, 64], 97),
    (torch.float32, nn.ReLU, [7, 64, 64, 64], 1),
]


@pytest.mark.parametrize(
    "dtype,act,sizes,rows", MLP_CASES,
    ids=[f"{str(d)[6:]}-{a.__name__.lower()}-{'x'.join(map(str, s))}-rows{r}" for d, a, s, r in MLP_CASES],
)
def test_fused_mlp_matches_torch(dtype, act, sizes, rows):
    seq, ref, x = mlp_case(sizes, act, dtype, rows, seed=rows + len(sizes))
    check_fused_mlp(seq, ref, x, dtype, seed=rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_fused_mlp_ending_in_an_activation(dtype, act):
    """last_linear=False: the activation also follows the last Linear (a shared trunk)."""
    seq, ref, x = mlp_case([5, 64, 33], act, dtype, 70, seed=11, last_linear=False)
    assert isinstance(seq[-1], act)
    check_fused_mlp(seq, ref, x, dtype, last_linear=False)
    with pytest.raises(NotFusable, match="must end with a Linear"):
        fused_mlp(seq, x.to(dtype))


def test_fused_mlp_leading_batch_shape():
    seq, ref, _ = mlp_case([6, 64, 4], nn.Tanh, torch.float64, 1, seed=3)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    out = fused_mlp(seq, x)
    assert out.shape == (3, 5, 4)
    check_fused_mlp(seq, ref, x, torch.float64)
    assert fused_mlp(seq, torch.randn(6, dtype=torch.float64)).shape == (4,)  # no batch dimension at all


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_mlp_non_contiguous_inputs(dtype):
    """A transposed view, a sliced view (row stride > in) and a column slice, read as given."""
    seq, ref, _ = mlp_case([9, 64, 3], nn.ReLU, dtype, 1, seed=4)
    base = torch.randn(40, 20, dtype=torch.float64)
    views = {
        "transposed": torch.randn(9, 33, dtype=torch.float64).T,
        "every other row": base[::2, :9],
        "column slice": base[:, 5:14],
        "3-d permuted": torch.randn(9, 4, 6, dtype=torch.float64).permute(1, 2, 0),
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        check_fused_mlp(seq, ref, x, dtype)


def test_fused_mlp_broadcast_input():
    """An expanded x (stride 0 along the rows) is a valid [rows, in] tensor; seq(x) accepts it."""
    seq, ref, _ = mlp_case([7, 64, 3], nn.Tanh, torch.float64, 1, seed=5)
    x = torch.randn(1, 7, dtype=torch.float64).expand(5, 7)
    check_fused_mlp(seq, ref, x, torch.float64)


def test_fused_mlp_empty_batch_and_frozen_input():
    seq, ref, _ = mlp_case([4, 64, 2], nn.Tanh, torch.float64, 1, seed=6)
    empty = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    out = fused_mlp(seq, empty)
    assert out.shape == (0, 2)
    grads = torch.autograd.grad(out.sum(), [empty, *seq.parameters()])
    assert all(g.abs().sum() == 0 for g in grads)
    # x without requires_grad: only the parameters' gradients.
    x = torch.randn(10, 4, dtype=torch.float64)
    grads = torch.autograd.grad(fused_mlp(seq, x).sum(), list(seq.parameters()))
    for a, b in zip(grads, torch.autograd.grad(ref(x).sum(), list(ref.parameters()))):
        close(a, b, 1e-9)


def test_fused_mlp_lone_linear_and_layer_list():
    lin = nn.Linear(5, 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    close(fused_mlp(lin, x), lin(x), 1e-12)
    seq = mlp([5, 64, 64, 3], nn.ReLU)
    linears, act = mlp_layers(seq)
    assert linears == [seq[0], seq[2], seq[4]] and act == "relu"
    assert mlp_layers(lin) == ([lin], None)


# ------------------------------------------------------------------ fused_mlp: bad input


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)), ["layer 1", "Sigmoid"]),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
         ["same", "relu", "tanh"]),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)), ["layer 2", "bias"]),
        (lambda: nn.Linear(3, 2, bias=False), ["bias"]),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(5, 2)), ["5 inputs", "4 outputs"]),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh()), ["must end with a Linear"]),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), ["layer 1", "Tanh or nn.ReLU"]),
        (lambda: nn.Conv2d(1, 2, 3), ["Conv2d"]),
        (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)), ["layer 0", "Conv2d"]),
        (lambda: Conv(), ["Conv"]),
        (lambda: nn.Sequential(), ["Sequential"]),
        (lambda: mlp([3] + [4] * 17 + [2]), ["at most 16"]),
    ],
    ids=["sigmoid", "mixed", "no-bias", "lone-no-bias", "widths", "ends-in-act", "no-act", "conv", "cnn", "module",
         "empty", "too-deep"],
)
def test_not_fusable_stacks(make, words):
    seq = make()
    with pytest.raises(NotFusable) as info:
        mlp_layers(seq)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    with pytest.raises(NotFusable):
        fused_mlp(seq, torch.randn(2, 3))
    assert issubclass(NotFusable, ValueError)


def test_fused_mlp_bad_input():
    seq = mlp([3, 8, 2])
    with pytest.raises(TypeError, match="x has dtype torch.float64; expected float32"):
        fused_mlp(seq, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fused_mlp(seq, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\], got \[4, 5\]"):
        fused_mlp(seq, torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\], got \[\]"):
        fused_mlp(seq, torch.tensor(1.0))
    with pytest.raises(NotFusable, match="float32 or all float64, got torch.float16"):
        fused_mlp(seq.half(), torch.randn(4, 3).half())
    mixed = mlp([3, 8, 2])
    mixed[2].double()
    with pytest.raises(NotFusable, match="float32 or all float64"):
        fused_mlp(mixed, torch.randn(4, 3))
    strided = mlp([3, 8, 2])
    strided[0].weight = nn.Parameter(torch.randn(3, 8).T)
    with pytest.raises(NotFusable, match="not contiguous"):
        fused_mlp(strided, torch.randn(4, 3))


# ================================================================== the fused actor-critic


class ActorCritic(nn.Module):
    """CleanRL's MLP agent (separate actor and critic, two hidden layers), or with `shared` one
    trunk and the heads on it (`head`: their hidden widths, none: a Linear each); `actor_logstd`
    for a Gaussian policy."""

    def __init__(self, obs_dim, n_out, continuous, act=nn.Tanh, shared=False, hidden=64, head=()):
        super().__init__()
        self.shared = shared
        if shared:
            self.trunk = mlp([obs_dim, hidden, hidden], act, last_linear=False)
            self.actor = mlp([hidden, *head, n_out], act) if head else nn.Linear(hidden, n_out)
            self.critic = mlp([hidden, *head, 1], act) if head else nn.Linear(hidden, 1)
        else:
            self.actor = mlp([obs_dim, hidden, hidden, n_out], act)
            self.critic = mlp([obs_dim, hidden, hidden, 1], act)
        if continuous:
            self.actor_logstd = nn.Parameter(torch.randn(n_out) * 0.3)

    @property
    def continuous(self):
        return hasattr(self, "actor_logstd")

    @property
    def obs_dim(self):
        return (self.trunk if self.shared else self.actor)[0].in_features

    def forward(self, obs):
        """(actor output, value [rows])."""
        h = self.trunk(obs) if self.shared else obs
        return self.actor(h), self.critic(h).squeeze(-1)

    def get_action_and_value(self, obs, actions):
        """fastppo.train.Agent's interface, as fastppo.learner.Learner calls it."""
        out, value = self(obs)
        return (actions, *self.heads(out, actions), value)

    def heads(self, out, actions):
        if self.continuous:  # the shared [D] log-std, as train.py's Agent passes it (see test_expanded_log_std_head)
            return fastppo.normal_logprob_entropy(out, self.actor_logstd, actions)
        return fastppo.categorical_logprob_entropy(out, actions)


def make_module(obs_dim, n_out, continuous, dtype, act=nn.Tanh, shared=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ActorCritic(obs_dim, n_out, continuous, act, shared, **kwargs).to(dtype)


@dataclass
class Batch:
    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    values: torch.Tensor
    mask: Optional[torch.Tensor] = None

    def tensors(self):
        return (self.obs, self.actions, self.logprobs, self.advantages, self.returns, self.values, self.mask)


def make_batch(module, B, seed=0, mask_p=None) -> Batch:
    """A rollout of B rows sampled from `module`'s policy, with old log-probs and values moved
    away from the current ones so that ratios and value updates clip."""
    dtype = next(module.parameters()).dtype
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    obs = randn(B, module.obs_dim)
    with torch.no_grad():
        out, value = module(obs)
        if module.continuous:
            actions = out + module.actor_logstd.exp() * randn(*out.shape)
        else:
            noise = torch.rand(out.shape, generator=g, dtype=torch.float64).to(dtype)
            actions = (out - torch.log(-torch.log(noise))).argmax(-1)
        logprob, _ = module.heads(out, actions)
    mask = None if mask_p is None else torch.rand(B, generator=g) < mask_p
    return Batch(obs.contiguous(), actions.contiguous(), logprob + randn(B, scale=0.3), randn(B) + 0.3,
                 value + randn(B), value + randn(B, scale=0.3), mask)


def torch_update(learner: Learner, batch: Batch, idx, lr=None):
    """The torch path of one minibatch update, fastppo.learner.Learner's (the module's forward and
    heads, fastppo.ppo_loss, backward, clip_grad_norm_, torch.optim.Adam); returns (stats [6], grad
    norm before clipping)."""
    learner.set_batch(LearnerBatch(*batch.tensors()))
    stats = learner.minibatch(idx, lr)
    return stats[:6].tolist(), float(stats[6])


def fused_and_reference(module, **opts):
    """(FusedActorCritic on `module`, a deep copy of the module as it was, a torch Learner of it, opts)."""
    opts = dict(dict(lr=3e-4, max_grad_norm=0.5, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=True,
                     vf_clip_coef=None, norm_adv=True), **opts)
    ref = copy.deepcopy(module)
    fused = FusedActorCritic(module, **opts)
    return fused, ref, Learner(ref, "torch", eps=1e-5, **opts), opts


def assert_same_parameters(module, ref, tol, what=""):
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        close(p.detach(), q.detach(), tol, f"{what}{name}")


@dataclass
class UpdateCase:
    continuous: bool
    n_out: int
    dtype: torch.dtype
    M: int
    mask: Optional[str] = None  # None, "random", or "edge" (2nd update: one selected row; 3rd: none)
    clip_vloss: bool = True
    norm_adv: bool = True
    max_grad_norm: float = 0.02  # small: updates clip; 1e9: none does
    act: type = nn.Tanh
    shared: bool = False
    extra: Optional[dict] = None  # other constructor options
    widths: Optional[dict] = None  # ActorCritic's hidden / head

    def __str__(self):
        parts = [f"{'cont' if self.continuous else 'disc'}{self.n_out}", str(self.dtype)[6:], f"M{self.M}"]
        parts += [f"mask-{self.mask}"] if self.mask else []
        parts += [] if self.clip_vloss else ["noclipv"]
        parts += [] if self.norm_adv else ["nonorm"]
        parts += ["noclip" if self.max_grad_norm > 1e6 else "clip"]
        parts += ["relu"] if self.act is nn.ReLU else []
        parts += ["trunk"] if self.shared else []
        parts += ["+".join(self.extra)] if self.extra else []
        parts += ["-".join(f"{k}{v}" for k, v in self.widths.items())] if self.widths else []
        return "-".join(parts)


B = 2048
UPDATE_CASES = [
    UpdateCase(False, 2, torch.float64, 64),
    UpdateCase(False, 7, torch.float64, 128, mask="random", clip_vloss=False, max_grad_norm=1e9),
    UpdateCase(False, 7, torch.float64, 1, norm_adv=False),
    UpdateCase(False, 7, torch.float64, 1, mask="edge", max_grad_norm=1e-3),
    UpdateCase(False, 2, torch.float64, 1025, mask="edge", norm_adv=False, max_grad_norm=1e9),
    UpdateCase(True, 1, torch.float64, 64, mask="edge", norm_adv=False),
    UpdateCase(True, 6, torch.float64, 128, clip_vloss=False, act=nn.ReLU, extra=dict(vf_clip_coef=0.5, lr=1e-3)),
    UpdateCase(True, 6, torch.float64, 1025, mask="random", max_grad_norm=1e9),
    UpdateCase(False, 7, torch.float64, 128, mask="random", shared=True),
    UpdateCase(True, 6, torch.float64, 64, shared=True, act=nn.ReLU, extra=dict(ent_coef=0.0, vf_coef=1.3)),
    UpdateCase(False, 7, torch.float32, 128, mask="random", clip_vloss=False, max_grad_norm=1e9),
    UpdateCase(False, 2, torch.float32, 1025, act=nn.ReLU),
    UpdateCase(True, 1, torch.float32, 1, norm_adv=False),
    UpdateCase(True, 6, torch.float32, 1025, mask="edge"),
    UpdateCase(True, 6, torch.float32, 64, shared=True, max_grad_norm=1e9, extra=dict(betas=(0.8, 0.95))),
    UpdateCase(False, 2, torch.float32, 64, shared=True, act=nn.ReLU, norm_adv=False),
    UpdateCase(True, 6, torch.float64, 128, act=nn.ReLU, widths=dict(hidden=97)),
    UpdateCase(False, 7, torch.float64, 64, mask="random", shared=True, widths=dict(hidden=7, head=(33, 5))),
    UpdateCase(True, 1, torch.float32, 128, shared=True, widths=dict(hidden=1, head=(16,))),
]


def minibatches(case: UpdateCase, batch: Batch, seed: int):
    """Three minibatch index sets: random rows; with mask="edge", then rows of which exactly one is
    selected, then rows that are all masked out."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randperm(B, generator=g)[:case.M]
    if case.mask != "edge":  # the last one may repeat rows
        return [first, torch.randperm(B, generator=g)[:case.M], torch.randint(0, B, (case.M,), generator=g)]
    kept, dropped = batch.mask.nonzero().squeeze(1), (~batch.mask).nonzero().squeeze(1)
    assert dropped.numel() >= case.M
    one = torch.cat([dropped[torch.randperm(dropped.numel(), generator=g)[:case.M - 1]], kept[3:4]])
    one = one[torch.randperm(case.M, generator=g)]
    none = dropped[torch.randperm(dropped.numel(), generator=g)[:case.M]]
    return [first, one.contiguous(), none.contiguous()]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=str)
def test_update_matches_torch(case: UpdateCase):
    """Three successive updates: parameters, their (clipped) gradients, the stats and the grad norm
    equal those of the torch step on a deep copy of the module."""
    obs_dim = 11
    module = make_module(obs_dim, case.n_out, case.continuous, case.dtype, case.act, case.shared, seed=case.M,
                         **(case.widths or {}))
    batch = make_batch(module, B, seed=case.n_out, mask_p={None: None, "random": 0.7, "edge": 0.4}[case.mask])
    opts = dict(clip_vloss=case.clip_vloss, norm_adv=case.norm_adv, max_grad_norm=case.max_grad_norm)
    fused, ref, learner, opts = fused_and_reference(module, **opts, **(case.extra or {}))
    fused.set_batch(*batch.tensors())
    tol = TOL[case.dtype]
    clipped = []
    for k, idx in enumerate(minibatches(case, batch, seed=case.M + 1)):
        stats = fused.update(idx)
        want_stats, want_norm = torch_update(learner, batch, idx)
        assert stats.dtype == np.float64 and stats.shape == (7,)
        for name, a, b in zip(("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac"),
                              stats[:6], want_stats):
            close(a, b, tol, f"update {k}: {name}")
        close(stats[6], want_norm, tol, f"update {k}: grad norm")
        clipped.append(want_norm > opts["max_grad_norm"])
        assert_same_parameters(module, ref, tol, f"update {k}: ")
        for (name, p), q in zip(module.named_parameters(), ref.parameters()):
            close(p.grad, q.grad, tol, f"update {k}: grad of {name}")
        if case.mask == "edge" and k == 2:  # nothing selected: zero loss and gradients, Adam still steps
            assert stats[6] == 0 and (fused.grads == 0).all() and not stats[:6].any()
    assert fused.step == 3
    # The cases exercise what they say: the small max_grad_norm clips, the large one never does.
    assert any(clipped) if case.max_grad_norm < 1 else not any(clipped)


def test_update_lr_argument_and_zero_grad_step_moves_parameters():
    """update(idx, lr=...) steps at that rate; a fully masked minibatch (after a real one) still
    moves the parameters through Adam's momentum, as torch's Adam does with zero gradients."""
    module = make_module(5, 3, False, torch.float64, seed=1)
    batch = make_batch(module, 256, seed=2)
    batch.mask = torch.ones(256, dtype=torch.bool)
    batch.mask[128:] = False
    fused, ref, learner, opts = fused_and_reference(module, lr=1e-3)
    fused.set_batch(*batch.tensors())
    schedule = [(torch.arange(0, 64), 2e-3), (torch.arange(128, 192), 5e-4), (torch.arange(64, 128), None)]
    for k, (idx, lr) in enumerate(schedule):
        before = fused.params.clone()
        stats = fused.update(idx, lr=lr)
        torch_update(learner, batch, idx, opts["lr"] if lr is None else lr)
        assert_same_parameters(module, ref, 1e-9, f"update {k}: ")
        assert not torch.equal(before, fused.params)
        if k == 1:
            assert stats[6] == 0.0
    out = np.full(7, np.nan)
    assert fused.update(torch.arange(10), stats=out) is out and np.isfinite(out).all()


class LinearPolicy(nn.Module):
    """No hidden layer at all: a linear actor and critic (no activation anywhere)."""

    def __init__(self, obs_dim, n_out):
        super().__init__()
        self.actor = nn.Linear(obs_dim, n_out)
        self.critic = nn.Sequential(nn.Linear(obs_dim, 1))
        self.shared, self.obs_dim, self.continuous = False, obs_dim, False

    def forward(self, obs):
        return self.actor(obs), self.critic(obs).squeeze(-1)

    def heads(self, out, actions):
        return fastppo.categorical_logprob_entropy(out, actions)

    get_action_and_value = ActorCritic.get_action_and_value


def test_update_linear_policy():
    torch.manual_seed(0)
    module = LinearPolicy(9, 4).double()
    batch = make_batch(module, 500, seed=1)
    fused, ref, learner, opts = fused_and_reference(module)
    fused.set_batch(*batch.tensors())
    for k in range(3):
        idx = torch.randperm(500)[:200]
        stats = fused.update(idx)
        want_stats, want_norm = torch_update(learner, batch, idx)
        close(stats, want_stats + [want_norm], 1e-9, f"update {k}: stats")
        assert_same_parameters(module, ref, 1e-9, f"update {k}: ")
    close(fused.act(batch.obs[:7])[2], ref(batch.obs[:7])[1].detach(), 1e-9)


def test_train_agent_is_fusable():
    """train.py's Agent for vector observations (trunk = nn.Identity) runs fused and steps like torch."""
    import gymnasium as gym

    from fastppo.agent import Agent

    for space in (gym.spaces.Discrete(3), gym.spaces.Box(-1.0, 1.0, (2,), np.float32)):
        torch.manual_seed(0)
        agent = Agent((4,), space, "classic")
        fused = FusedActorCritic(agent)
        assert fused.continuous == isinstance(space, gym.spaces.Box) and fused.obs_dim == 4
        assert fused.dtype == torch.float32 and fused.activation == "tanh"
        obs = torch.randn(6, 4)
        _, _, value = fused.act(obs)
        close(value, agent.get_value(obs).detach(), 1e-5)


# ------------------------------------------------------------------ act


def act_reference(module, obs, noise):
    """The torch computation act stands for: (action, its log-prob, value)."""
    with torch.no_grad():
        out, value = module(obs)
        if module.continuous:
            action = out if noise is None else out + module.actor_logstd.exp() * noise
        else:
            action = out.argmax(-1) if noise is None else (out - torch.log(-torch.log(noise))).argmax(-1)
        logprob, _ = module.heads(out, action)
    return action, logprob, value


def check_act(fused, module, obs, noise, tol, low=None, high=None):
    rows = obs.shape[0]
    env = np.zeros((rows, fused.n_out) if fused.continuous else rows, np.float32 if fused.continuous else np.int32)
    action, logprob, value = fused.act(obs, noise, env_action=env)
    want_action, want_logprob, want_value = act_reference(module, obs, noise)
    assert logprob.shape == value.shape == (rows,)
    if fused.continuous:
        assert action.dtype == fused.dtype and action.shape == (rows, fused.n_out)
        close(action, want_action, tol, "action")
        assert np.array_equal(env, np.clip(action.numpy().astype(np.float32), low, high))
    else:
        assert action.dtype == torch.int64 and action.shape == (rows,)
        assert torch.equal(action, want_action)
        assert np.array_equal(env, action.numpy().astype(np.int32))
    close(logprob, want_logprob, tol, "logprob")
    close(value, want_value, tol, "value")
    # The log-prob is that of the returned action (the reference's own action may differ by rounding).
    with torch.no_grad():
        close(logprob, module.heads(module(obs)[0], action)[0], tol, "logprob of the returned action")
    return action, logprob, value


ACT_CASES = [(False, 2, torch.float64, nn.Tanh, False), (False, 7, torch.float32, nn.ReLU, True),
             (True, 1, torch.float64, nn.ReLU, False), (True, 6, torch.float32, nn.Tanh, True)]


@pytest.mark.parametrize("continuous,n_out,dtype,act,shared", ACT_CASES,
                         ids=[f"{'cont' if c else 'disc'}{n}-{str(d)[6:]}-{a.__name__.lower()}{'-trunk' if s else ''}"
                              for c, n, d, a, s in ACT_CASES])
def test_act_matches_torch(continuous, n_out, dtype, act, shared):
    """Greedy and sampled actions (Gumbel-max / mean + std * noise), their log-probs, the values and
    the environment actions (int32; float32 clipped to the bounds) for 1, 4 and 97 rows."""
    module = make_module(13, n_out, continuous, dtype, act, shared, seed=n_out)
    fused = FusedActorCritic(module)
    low, high = np.full(n_out, -0.7, np.float32), np.linspace(0.2, 1.5, n_out).astype(np.float32)
    if continuous:
        with pytest.raises(ValueError, match="set_action_bounds"):
            fused.act(torch.zeros(2, 13, dtype=dtype), env_action=np.zeros((2, n_out), np.float32))
        fused.set_action_bounds(low, high)
    g = torch.Generator().manual_seed(0)
    tol = TOL[dtype]
    for rows in (1, 4, 97):
        obs = (torch.randn(rows, 13, generator=g, dtype=torch.float64) * 2).to(dtype)
        if rows == 4:  # a view with rows 20 apart
            obs = torch.cat([obs, torch.full((rows, 7), float("nan"), dtype=dtype)], 1)[:, :13]
            assert obs.stride(0) == 20
        greedy, _, _ = check_act(fused, module, obs, None, tol, low, high)
        if continuous:
            noise = torch.randn(rows, n_out, generator=g, dtype=torch.float64).to(dtype) * 2
        else:
            noise = torch.rand(rows, n_out, generator=g, dtype=torch.float64).to(dtype)
        sampled, _, _ = check_act(fused, module, obs, noise, tol, low, high)
        if continuous:
            with torch.no_grad():
                close(greedy, module(obs)[0], tol, "greedy action is the mean")
    if continuous:  # the noise spread some actions beyond the bounds: the clip was exercised
        assert ((sampled < torch.from_numpy(low)) | (sampled > torch.from_numpy(high))).any()
    else:
        assert len(set(sampled.tolist())) > 1


def test_act_outputs_given_and_scalar_bounds():
    module = make_module(3, 2, True, torch.float32, seed=9)
    fused = FusedActorCritic(module)
    fused.set_action_bounds(-0.25, 0.25)  # broadcast to [D]
    obs = torch.randn(5, 3)
    action, logprob, value = torch.empty(5, 2), torch.empty(5), torch.empty(5)
    env = np.zeros((5, 2), np.float32)
    noise = torch.randn(5, 2) * 3
    got = fused.act(obs.numpy(), noise.numpy(), action=action, logprob=logprob, value=value, env_action=env)
    assert got[0] is action and got[1] is logprob and got[2] is value
    assert np.array_equal(env, action.numpy().clip(-0.25, 0.25)) and (np.abs(env) == 0.25).any()
    want = act_reference(module, obs, noise)
    for a, b in zip(got, want):
        close(a, b, 1e-5)


def act_at(fused, obs, noise=None):
    """act through the raw-address call (no refresh, no checks)."""
    rows = obs.shape[0]
    action = torch.empty((rows, fused.n_out) if fused.continuous else rows,
                         dtype=fused.dtype if fused.continuous else torch.int64)
    logprob, value = torch.empty(rows, dtype=fused.dtype), torch.empty(rows, dtype=fused.dtype)
    fused.act_at(rows, obs.data_ptr(), obs.stride(0), 0 if noise is None else noise.data_ptr(), action.data_ptr(),
                 logprob.data_ptr(), value.data_ptr())
    return action, logprob, value


def check_act_at(fused, module, obs, noise, tol, what):
    got = act_at(fused, obs, noise)
    want = act_reference(module, obs, noise)
    for name, a, b in zip(("action", "logprob", "value"), got, want):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), f"{what}: action"
        else:
            close(a, b, tol, f"{what}: {name}")


@pytest.mark.parametrize("continuous,shared", [(False, False), (True, True)])
def test_act_after_update_and_after_refresh(continuous, shared):
    """act_at (no refresh of its own) uses the weights of the last update; after load_state_dict
    from outside, refresh() brings it up to date."""
    module = make_module(8, 5, continuous, torch.float64, shared=shared, seed=3)
    fused, ref, learner, opts = fused_and_reference(module, lr=0.05)  # large steps: visible changes
    batch = make_batch(module, 512, seed=4)
    fused.set_batch(*batch.tensors())
    obs = torch.randn(97, 8, dtype=torch.float64)
    noise = (torch.randn if continuous else torch.rand)(97, 5, dtype=torch.float64)
    before = act_at(fused, obs, noise)[2].clone()
    for k in range(2):
        idx = torch.randperm(512)[:128]
        fused.update(idx)
        torch_update(learner, batch, idx)
        check_act_at(fused, ref, obs, noise, 1e-9, f"after update {k}")
        check_act_at(fused, module, obs, None, 1e-9, f"after update {k}, greedy")
    assert (act_at(fused, obs, noise)[2] - before).abs().max() > 1e-3
    other = make_module(8, 5, continuous, torch.float64, shared=shared, seed=99)
    module.load_state_dict(other.state_dict())
    fused.refresh()
    check_act_at(fused, other, obs, noise, 1e-12, "after load_state_dict + refresh")
    assert_same_parameters(module, other, 0.0)
    # act() refreshes by itself.
    module.load_state_dict(ref.state_dict())
    close(fused.act(obs, noise)[2], act_reference(ref, obs, noise)[2], 1e-9, "act after load_state_dict")


# ------------------------------------------------------------------ the module stays a torch module


def test_module_stays_a_torch_module():
    module = make_module(6, 3, True, torch.float64, shared=True, seed=5)
    state = copy.deepcopy(module.state_dict())
    fused = FusedActorCritic(module)
    # The parameters are unchanged and now views of the flat buffer, in order, covering it.
    for name, p in module.state_dict().items():
        assert torch.equal(p, state[name]), name
    lo = fused.params.data_ptr()
    hi = lo + fused.params.numel() * fused.params.element_size()
    assert sum(p.numel() for p in module.parameters()) == fused.params.numel()
    for name, p in module.named_parameters():
        assert lo <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= hi, name
        assert p.untyped_storage().data_ptr() == fused.params.untyped_storage().data_ptr(), name
        assert p.grad is not None and p.grad.untyped_storage().data_ptr() == fused.grads.untyped_storage().data_ptr()
    spans = sorted((p.data_ptr(), p.numel() * p.element_size()) for p in module.parameters())
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # no two overlap

    batch = make_batch(module, 300, seed=6)
    fused.set_batch(*batch.tensors())
    for _ in range(3):
        fused.update(torch.randperm(300)[:100])
    # A torch forward sees the updated parameters; it equals the fused act.
    obs = torch.randn(20, 6, dtype=torch.float64)
    action, logprob, value = fused.act(obs)
    with torch.no_grad():
        out, want_value = module(obs)
    close(value, want_value, 1e-12, "value")
    close(action, out, 1e-12, "greedy action")
    assert not torch.equal(module.state_dict()["actor.weight"], state["actor.weight"])
    # state_dict round-trips, both ways.
    saved = copy.deepcopy(module.state_dict())
    fresh = make_module(6, 3, True, torch.float64, shared=True, seed=77)
    fresh.load_state_dict(saved)
    assert_same_parameters(fresh, module, 0.0)
    module.load_state_dict(state)
    assert torch.equal(fused.params[:6 * 64], state["trunk.0.weight"].reshape(-1))  # written into the buffer
    for name, p in module.state_dict().items():
        assert torch.equal(p, state[name]), name
    # And torch autograd still reaches the parameters.
    module.zero_grad(set_to_none=True)
    out, value = module(obs)
    (out.sum() + value.sum()).backward()
    assert all(p.grad is not None for n, p in module.named_parameters() if n != "actor_logstd")


# ------------------------------------------------------------------ errors


class NoCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.actor = mlp([4, 8, 2])
        self.value = mlp([4, 8, 1])


class CNNActor(nn.Module):
    def __init__(self, where):
        super().__init__()
        cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU())
        if where == "trunk":
            self.trunk, self.actor, self.critic = cnn, nn.Linear(8, 2), nn.Linear(8, 1)
        else:
            self.actor = nn.Sequential(*cnn, nn.Linear(8, 2))
            self.critic = mlp([36, 8, 1])


def with_changes(change):
    module = ActorCritic(4, 3, False)
    change(module)
    return module


def extra_parameter(m):
    m.temperature = nn.Parameter(torch.ones(()))


def extra_layer(m):
    m.aux = nn.Linear(4, 4)


def shared_layer(m):
    m.critic[0] = m.actor[0]


def relu_critic(m):
    m.critic[1] = nn.ReLU()
    m.critic[3] = nn.ReLU()


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: NoCritic(), ["NoCritic", "actor", "critic"]),
        (lambda: with_changes(lambda m: setattr(m, "critic", mlp([4, 64, 64, 2]))), ["critic", "1 output", "2"]),
        (lambda: with_changes(extra_parameter), ["1 parameter", "outside"]),
        (lambda: with_changes(extra_layer), ["2 parameter", "outside"]),
        (lambda: with_changes(shared_layer), ["shared"]),
        (lambda: with_changes(relu_critic), ["one activation", "relu", "tanh"]),
        (lambda: with_changes(lambda m: setattr(m, "actor_logstd", nn.Parameter(torch.zeros(2)))),
         ["actor_logstd", "[3]"]),
        (lambda: with_changes(lambda m: m.half()), ["float16"]),
        (lambda: CNNActor("actor"), ["Conv2d"]),
        (lambda: CNNActor("trunk"), ["Conv2d"]),
    ],
    ids=["no-critic", "critic-2-outputs", "extra-parameter", "extra-layer", "shared-parameter", "mixed-activations",
         "logstd-shape", "float16", "cnn-actor", "cnn-trunk"],
)
def test_actor_critic_not_fusable(make, words):
    with pytest.raises(NotFusable) as info:
        FusedActorCritic(make())
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_train_atari_agent_not_fusable():
    import gymnasium as gym

    from fastppo.agent import Agent

    with pytest.raises(NotFusable, match="Conv2d"):
        FusedActorCritic(Agent((4, 84, 84), gym.spaces.Discrete(6), "atari"))


def test_bad_options():
    for kwargs, word in ((dict(lr=-1.0), "lr"), (dict(eps=-1e-5), "eps"), (dict(clip_coef=float("nan")), "clip_coef"),
                         (dict(betas=(0.9, 1.0)), "betas")):
        with pytest.raises(ValueError, match=word):
            FusedActorCritic(make_module(4, 2, False, torch.float64), **kwargs)


def set_batch_args(fused_continuous, dtype=torch.float64, B=16, obs_dim=4, n_out=2):
    actions = torch.randn(B, n_out, dtype=dtype) if fused_continuous else torch.randint(0, n_out, (B,))
    return dict(obs=torch.randn(B, obs_dim, dtype=dtype), actions=actions, logprobs=torch.randn(B, dtype=dtype),
                advantages=torch.randn(B, dtype=dtype), returns=torch.randn(B, dtype=dtype),
                values=torch.randn(B, dtype=dtype), mask=torch.ones(B, dtype=torch.bool))


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("name", ["obs", "actions", "logprobs", "advantages", "returns", "values", "mask"])
def test_set_batch_bad_arguments(continuous, name):
    fused = FusedActorCritic(make_module(4, 2, continuous, torch.float64))
    args = set_batch_args(continuous)
    fused.set_batch(**args)  # the good ones pass
    bad_dtype = {"actions": args["actions"].float() if continuous else args["actions"].bool(),
                 "mask": args["mask"].to(torch.uint8)}.get(name, args[name].float())
    with pytest.raises(TypeError, match=rf"set_batch: {name} has dtype"):
        fused.set_batch(**dict(args, **{name: bad_dtype}))
    with pytest.raises((TypeError, ValueError), match=name):
        fused.set_batch(**dict(args, **{name: args[name].numpy()}))
    x = args[name]
    bad_shapes = [x[:, :-1], x.reshape(-1), x.unsqueeze(0)] if name == "obs" else [x[:-1], x.unsqueeze(-1), x[None]]
    for bad_shape in bad_shapes:
        with pytest.raises(ValueError, match=rf"set_batch: {name} (must have|has) shape"):
            fused.set_batch(**dict(args, **{name: bad_shape}))
    if x.dim() == 2:  # the right shape, not contiguous (a categorical head's actions are copied: see below)
        with pytest.raises(ValueError, match=rf"set_batch: {name} must be C-contiguous"):
            fused.set_batch(**dict(args, **{name: x.T.contiguous().T}))


def test_update_errors():
    fused = FusedActorCritic(make_module(4, 2, False, torch.float64))
    with pytest.raises(RuntimeError, match="set_batch first"):
        fused.update(torch.arange(4))
    fused.set_batch(**set_batch_args(False))
    for idx in (torch.tensor([0, 16]), torch.tensor([-1, 3]), torch.tensor([100])):
        with pytest.raises(ValueError, match=r"idx must be in \[0, 16\)"):
            fused.update(idx)
    with pytest.raises(ValueError, match="empty"):
        fused.update(torch.zeros(0, dtype=torch.int64))
    for idx, error, match in ((torch.arange(4.0), TypeError, r"idx has dtype torch.float32; expected int64 \(or another"),
                              (np.arange(4.0), TypeError, "idx has dtype float64; expected int64"),
                              (torch.ones(4, dtype=torch.bool), TypeError, "idx has dtype torch.bool"),
                              ([0, 1], TypeError, "idx must be a numpy.ndarray or a torch.Tensor, got list"),
                              (torch.zeros(2, 2, dtype=torch.int64), ValueError, "idx must be 1-D"),
                              (np.zeros((2, 2), np.int64), ValueError, "idx must be 1-D"),
                              (np.int64(3), TypeError, "idx must be a numpy.ndarray"),
                              (np.array(3), ValueError, "idx must be 1-D"),
                              (np.arange(20)[::2], ValueError, r"idx must be in \[0, 16\), got values from 0 to 18"),
                              (np.array([-1, 3], np.int32), ValueError, r"idx must be in \[0, 16\)"),
                              (np.array([2**63 + 1], np.uint64), ValueError, r"idx must be in \[0, 16\)"),
                              (torch.tensor([0, 17], dtype=torch.int32), ValueError, r"idx must be in \[0, 16\)"),
                              (np.zeros(0, np.int64), ValueError, "empty")):
        with pytest.raises(error, match=match):
            fused.update(idx)
    assert fused.step == 0  # refused calls do not count as Adam steps
    fused.update(torch.arange(16))
    assert fused.step == 1


# ------------------------------------------------------------------ what CleanRL's scripts pass


def twin_fused(continuous=False, dtype=torch.float64, n_out=3, **opts):
    """Two fused learners on equal copies of one module, and a batch of it."""
    module = make_module(5, n_out, continuous, dtype, seed=3)
    batch = make_batch(module, 97, seed=4)
    return FusedActorCritic(module, **opts), FusedActorCritic(copy.deepcopy(module), **opts), batch


def assert_same_update(fused, twin, got, want):
    np.testing.assert_array_equal(got, want)
    assert torch.equal(fused.params, twin.params) and torch.equal(fused.exp_avg_sq, twin.exp_avg_sq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int32, torch.uint8], ids=str)
def test_categorical_actions_of_other_dtypes_equal_int64(dtype):
    """A categorical head's actions as CleanRL stores them (float32) or in another dtype or layout
    give the int64 batch's updates, bit for bit; the copy is taken at set_batch."""
    fused, twin, batch = twin_fused()
    actions = batch.actions.to(dtype)
    fused.set_batch(batch.obs, actions, *batch.tensors()[2:])
    twin.set_batch(*batch.tensors())
    actions.fill_(2)  # set_batch copied them: later writes do not reach the batch
    idx = torch.randperm(97, generator=torch.Generator().manual_seed(0))[:33]
    assert_same_update(fused, twin, fused.update(idx), twin.update(idx))
    strided = torch.stack([batch.actions.double(), torch.full((97,), 0.5, dtype=torch.float64)], 1)[:, 0]  # stride 2
    assert not strided.is_contiguous()
    fused.set_batch(batch.obs, strided, *batch.tensors()[2:])
    assert_same_update(fused, twin, fused.update(idx), twin.update(idx))


def test_int64_actions_and_indices_are_read_in_place():
    fused, _, batch = twin_fused()
    fused.set_batch(*batch.tensors())
    assert fused._batch[1] is batch.actions  # no copy of a batch that fits
    idx = np.arange(10)
    assert fused._minibatch_rows(idx)[1] == idx.ctypes.data
    idx_t = torch.arange(10)
    assert fused._minibatch_rows(idx_t)[1] == idx_t.data_ptr()
    assert fused._minibatch_rows(idx_t[::2])[1] != idx_t.data_ptr()


@pytest.mark.parametrize("bad,words", [
    (0.5, r"actions must hold whole action indices, got 0.5 at row 6 \(torch.float32\)"),
    (float("nan"), "actions must hold whole action indices, got nan at row 6"),
    (float("inf"), "actions must hold whole action indices, got inf at row 6"),
    (1e30, "actions must hold whole action indices"),
    (-1.0, r"actions must be action indices in \[0, 3\), got values from -1 to"),
    (3.0, r"actions must be action indices in \[0, 3\), got values from 0 to 3"),
], ids=["half", "nan", "inf", "huge", "negative", "too-large"])
def test_categorical_float_actions_refused(bad, words):
    fused, _, batch = twin_fused()
    actions = batch.actions.float()
    actions[6] = bad
    with pytest.raises(ValueError, match="set_batch: " + words):
        fused.set_batch(batch.obs, actions, *batch.tensors()[2:])
    assert fused._batch is None  # nothing was bound


def test_categorical_int64_actions_out_of_range_refused():
    """The compiled update reads logits[action] unchecked: set_batch checks every head's range."""
    fused, _, batch = twin_fused()
    for bad in (-1, 3, 2**40):
        actions = batch.actions.clone()
        actions[96] = bad
        with pytest.raises(ValueError, match=r"set_batch: actions must be action indices in \[0, 3\)"):
            fused.set_batch(batch.obs, actions, *batch.tensors()[2:])
    with pytest.raises(TypeError, match=r"set_batch: actions has dtype torch.complex64; expected int64 \(or another"):
        fused.set_batch(batch.obs, batch.actions.to(torch.complex64), *batch.tensors()[2:])


@pytest.mark.parametrize("continuous", [False, True])
def test_numpy_and_strided_indices_equal_contiguous_int64(continuous):
    """update() on numpy indices (CleanRL's b_inds[start:end]), strided slices and other integer
    dtypes makes the step of the same rows as a contiguous int64 tensor, bit for bit."""
    fused, twin, batch = twin_fused(continuous, dtype=torch.float32)
    fused.set_batch(*batch.tensors())
    twin.set_batch(*batch.tensors())
    b_inds = np.arange(97)
    np.random.default_rng(0).shuffle(b_inds)
    for idx in (b_inds[:32], b_inds[32:64].astype(np.int32), b_inds[::3], b_inds[1::2].astype(">i8"),
                b_inds[:40].astype(np.uint8), torch.from_numpy(b_inds)[::2], torch.from_numpy(b_inds[5:30]).int(),
                torch.from_numpy(b_inds).flip(0)):
        want = torch.from_numpy(np.array(idx, dtype=np.int64)) if isinstance(idx, np.ndarray) else idx.long().contiguous()
        assert_same_update(fused, twin, fused.update(idx), twin.update(want))
    assert fused.step == twin.step == 8


def test_lr_is_a_settable_property():
    """fused.lr is the rate of update() calls given none (a schedule sets it between updates)."""
    fused, twin, batch = twin_fused(lr=1e-3)
    fused.set_batch(*batch.tensors())
    twin.set_batch(*batch.tensors())
    assert fused.lr == 1e-3
    fused.lr = np.float32(2e-3)
    assert type(fused.lr) is float and fused.lr == pytest.approx(2e-3)
    idx = torch.arange(40)
    assert_same_update(fused, twin, fused.update(idx), twin.update(idx, lr=fused.lr))
    fused.lr = 0
    before = fused.params.clone()
    fused.update(idx)
    assert torch.equal(before, fused.params)  # lr 0: no step
    for bad in (-1e-3, float("nan"), float("inf"), "3e-4", None):
        with pytest.raises(ValueError, match="FusedActorCritic: lr must be a finite number >= 0"):
            fused.lr = bad
    assert fused.lr == 0


def test_act_action_dtypes():
    """act's action: int64 [rows] for a categorical head, the parameters' dtype [rows, D] for a
    Gaussian one (float32 for CleanRL's agent; int64 is refused)."""
    categorical = FusedActorCritic(make_module(4, 3, False, torch.float32))
    action, logprob, value = categorical.act(torch.zeros(2, 4), torch.rand(2, 3))
    assert action.dtype == torch.int64 and action.shape == (2,) and logprob.dtype == value.dtype == torch.float32
    gaussian = FusedActorCritic(make_module(4, 3, True, torch.float32))
    action, logprob, value = gaussian.act(torch.zeros(2, 4), torch.randn(2, 3))
    assert action.dtype == torch.float32 and action.shape == (2, 3)
    with pytest.raises(TypeError, match="act: action has dtype torch.int64; expected float32"):
        gaussian.act(torch.zeros(2, 4), action=torch.zeros(2, 3, dtype=torch.int64))


def test_act_bad_arguments():
    fused = FusedActorCritic(make_module(4, 3, False, torch.float32))
    with pytest.raises(TypeError, match="obs has dtype torch.float64"):
        fused.act(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"obs must have shape \[rows, 4\], got \[2, 5\]"):
        fused.act(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="noise has 3 rows, obs 2"):
        fused.act(torch.zeros(2, 4), torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"noise must have shape \[rows, 3\]"):
        fused.act(torch.zeros(2, 4), torch.rand(2, 2))
    with pytest.raises(TypeError, match="env_action has dtype int64; expected int32"):
        fused.act(torch.zeros(2, 4), env_action=np.zeros(2, np.int64))
    with pytest.raises(TypeError, match="action has dtype torch.int32; expected int64"):
        fused.act(torch.zeros(2, 4), action=torch.zeros(2, dtype=torch.int32))


# ------------------------------------------------------------------ Adam's state


@pytest.mark.parametrize("continuous,dtype", [(False, torch.float64), (True, torch.float32)])
def test_optimizer_state_round_trips(continuous, dtype):
    """Two fused learners fed the same updates; one is saved midway (module and Adam state) and
    restored into a fresh module: both end with the same parameters. Without Adam's state they differ."""
    def learner(seed=0):
        module = make_module(7, 4, continuous, dtype, seed=seed)
        return module, FusedActorCritic(module, lr=1e-2)

    first, fused_first = learner()
    batch = make_batch(first, 400, seed=1)
    second, fused_second = learner()
    g = torch.Generator().manual_seed(2)
    schedule = [torch.randperm(400, generator=g)[:100] for _ in range(6)]
    for fused in (fused_first, fused_second):
        fused.set_batch(*batch.tensors())
    for idx in schedule[:3]:
        fused_first.update(idx)
        fused_second.update(idx)
    module_state = copy.deepcopy(second.state_dict())
    adam_state = copy.deepcopy(fused_second.state_dict())
    assert adam_state["step"] == 3 and adam_state["exp_avg_sq"].abs().sum() > 0
    del second, fused_second

    restored, fused_restored = learner(seed=123)
    restored.load_state_dict(module_state)
    fused_restored.load_state_dict(adam_state)
    forgetful, fused_forgetful = learner(seed=123)
    forgetful.load_state_dict(module_state)
    for fused in (fused_restored, fused_forgetful):
        fused.set_batch(*batch.tensors())
    for idx in schedule[3:]:
        fused_first.update(idx)
        fused_restored.update(idx)
        fused_forgetful.update(idx)
    assert fused_restored.step == 6
    assert torch.equal(fused_restored.params, fused_first.params)
    assert torch.equal(fused_restored.exp_avg, fused_first.exp_avg)
    for (name, p), q in zip(restored.named_parameters(), first.parameters()):
        assert torch.equal(p, q), name
    assert not torch.allclose(fused_forgetful.params, fused_first.params, rtol=0, atol=1e-6)
    obs = torch.randn(9, 7, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(fused_restored.act(obs), fused_first.act(obs)))
    with pytest.raises(ValueError, match="exp_avg has 3 elements"):
        fused_restored.load_state_dict(dict(step=1, exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3)))


# ------------------------------------------------------------------ bugs found while writing these tests


@pytest.mark.parametrize("continuous", [False, True])
def test_act_noise_with_a_row_stride(continuous):
    fused = FusedActorCritic(make_module(4, 3, continuous, torch.float64, seed=1))
    obs = torch.randn(6, 4, dtype=torch.float64)
    noise = (torch.randn if continuous else torch.rand)(6, 8, dtype=torch.float64)[:, :3]  # rows 8 apart
    got, want = fused.act(obs, noise), fused.act(obs, noise.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["action", "env_action", "stats"])
def test_outputs_too_small_are_refused(which):
    """Outputs smaller than what the C++ writes must be refused. Each one here is the head of a
    larger buffer, so that what the unchecked call writes past its end stays in owned memory."""
    module = make_module(4, 6, True, torch.float32, seed=1)
    fused = FusedActorCritic(module)
    fused.set_action_bounds(-1.0, 1.0)
    obs = torch.randn(5, 4)
    if which == "action":
        whole = torch.full((5 * 6,), -7.0)
        call = lambda: fused.act(obs, action=whole[:5].view(5, 1))  # noqa: E731
    elif which == "env_action":
        whole = np.full(5 * 6, -7.0, np.float32)
        call = lambda: fused.act(obs, env_action=whole[:5].reshape(5, 1))  # noqa: E731
    else:
        whole = np.full(14, -7.0, np.float32)
        fused.set_batch(*make_batch(module, 32, seed=0).tensors())
        call = lambda: fused.update(torch.arange(8), stats=whole[:7])  # noqa: E731  float32 [7]: 28 of 56 bytes
    with pytest.raises((TypeError, ValueError)):  # unfixed: DID NOT RAISE, and the tail of `whole` is written
        call()
    assert (whole[7:] == -7).all()


def test_expanded_log_std_head():
    """normal_logprob_entropy(mean, log_std.expand_as(mean), actions), the shape-matched call
    CleanRL-style code makes, backpropagates like the shared [D] call."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_std = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randn(4, 3, generator=g, dtype=torch.float64)
    lp, ent = fastppo.normal_logprob_entropy(mean, log_std.expand_as(mean), actions)
    got = torch.autograd.grad((lp + 0.3 * ent).sum(), [mean, log_std])
    lp, ent = fastppo.normal_logprob_entropy(mean, log_std, actions)
    want = torch.autograd.grad((lp + 0.3 * ent).sum(), [mean, log_std])
    for a, b in zip(got, want):
        close(a, b, 1e-12)


@pytest.mark.parametrize("continuous", [False, True])
def test_update_after_parameters_changed_from_outside(continuous):
    """The forward pass of an update reads a transposed copy of the weights; update() refreshes it,
    so parameters changed by the caller between updates are the ones that are trained."""
    module = make_module(5, 3, continuous, torch.float64)
    fused, ref, learner, opts = fused_and_reference(module)
    batch = make_batch(module, 256, seed=4)
    fused.set_batch(*batch.tensors())
    idx = torch.arange(64)
    fused.update(idx)
    torch_update(learner, batch, idx)
    with torch.no_grad():  # the same outside change on both sides
        for p, q in zip(module.parameters(), ref.parameters()):
            p.mul_(1.5)
            q.mul_(1.5)
    stats = fused.update(idx + 64)
    want, _ = torch_update(learner, batch, idx + 64)
    close(stats[:6], want, 1e-9, "stats after an outside change")
    assert_same_parameters(module, ref, 1e-9, "after an outside change")


# ------------------------------------------------------------------ a training loop's calls


def test_update_rows_and_apply_gradients_equal_update():
    """update_rows on slices of an index tensor, writing into rows of a stats array (the trainer's
    call), makes update()'s step; with group moments it stops before the step, and
    apply_gradients() completes it."""
    module = make_module(6, 3, False, torch.float64, seed=7)
    twin = copy.deepcopy(module)
    batch = make_batch(module, 256, seed=8, mask_p=0.7)
    rows, checked = FusedActorCritic(module, lr=1e-2), FusedActorCritic(twin, lr=1e-2)
    rows.set_batch(*batch.tensors())
    checked.set_batch(*batch.tensors())
    order, stats = torch.randperm(256), np.zeros((3, 7))
    rows.update_rows(order[:64], 1e-2, stats[0])
    np.testing.assert_array_equal(stats[0], checked.update(order[:64].clone()))
    rows.update_rows(order[64:128], 1e-2, stats[1])
    np.testing.assert_array_equal(stats[1], checked.update(order[64:128].clone()))
    assert torch.equal(rows.params, checked.params) and rows.step == 2
    idx = order[128:192]
    sel = batch.advantages[idx][batch.mask[idx]]
    moments = torch.stack([sel.new_tensor(float(sel.numel())), sel.mean(), ((sel - sel.mean()) ** 2).sum()])
    before = rows.params.clone()
    rows.update_rows(idx, 1e-2, stats[2], moments, 1)
    assert torch.equal(rows.params, before) and rows.step == 2  # gradients only
    rows.apply_gradients(1e-2, stats[2])
    close(stats[2], checked.update(idx.clone()), 1e-12, "stats")
    close(rows.params, checked.params, 1e-12, "parameters")
