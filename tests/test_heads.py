"""fastppo's fused policy heads against torch.distributions in float64."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastppo  # noqa: E402
from fastppo import categorical_logprob_entropy, categorical_sample, normal_logprob_entropy  # noqa: E402
from fastppo.policy import FusedActorCritic  # noqa: E402

from peers import torch_categorical, torch_normal  # noqa: E402
from references import categorical_reference  # noqa: E402


def weighted_grads(logprob, entropy, leaves, seed=0):
    """Gradients of a fixed random weighting of log-prob and entropy (exercises both paths)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(logprob.shape, generator=g, dtype=torch.float64).to(logprob)
    w2 = torch.randn(entropy.shape, generator=g, dtype=torch.float64).to(entropy)
    return torch.autograd.grad((logprob * w1 + entropy * w2).sum(), leaves)


def random_logits(rows, A, device, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, A, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    actions = torch.randint(0, A, (rows,), generator=g).to(device)
    return logits, actions


CATEGORICAL_SIZES = [(1, 2), (97, 6), (512, 18), (64, 32000), (4, 131072)]


@pytest.mark.parametrize("rows,A", CATEGORICAL_SIZES)
def test_categorical_matches_torch_distributions(device, rows, A):
    logits, actions = random_logits(rows, A, device, seed=rows + A)
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    ours = categorical_logprob_entropy(x, actions)
    theirs = torch_categorical(y, actions)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    (g_ours,) = weighted_grads(*ours, [x])
    (g_theirs,) = weighted_grads(*theirs, [y])
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rows,A", [(97, 6), (64, 32000)])
def test_categorical_float32_within_float32_error(device, rows, A):
    logits, actions = random_logits(rows, A, device, seed=5)
    x = logits.float().requires_grad_()
    lp, ent = categorical_logprob_entropy(x, actions)
    ref_lp, ref_ent = torch_categorical(logits, actions)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-4)


def test_categorical_temperature_and_leading_dims(device):
    logits, actions = random_logits(6 * 5, 11, device, seed=3)
    logits, actions = logits.reshape(6, 5, 11), actions.reshape(6, 5)
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    ours = categorical_logprob_entropy(x, actions, temperature=0.7)
    theirs = torch_categorical(y, actions, temperature=0.7)
    for a, b in zip(ours, theirs):
        assert a.shape == (6, 5)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weighted_grads(*ours, [x])[0], weighted_grads(*theirs, [y])[0], rtol=1e-8, atol=1e-8)


def test_categorical_strided_logits(device):
    logits, actions = random_logits(40, 9, device, seed=8)
    wide = torch.zeros(9, 40, dtype=torch.float64, device=device)
    wide.copy_(logits.T)
    view = wide.T.requires_grad_()  # [40, 9] with the action dimension strided
    assert view.stride(-1) != 1
    ref = logits.clone().requires_grad_()
    ours = categorical_logprob_entropy(view, actions)
    theirs = torch_categorical(ref, actions)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weighted_grads(*ours, [view])[0], weighted_grads(*theirs, [ref])[0], rtol=1e-8, atol=1e-8)


def test_categorical_masked_and_extreme_logits(device):
    logits, actions = random_logits(64, 20, device, seed=2)
    logits[:, ::3] = float("-inf")  # masked actions
    actions = (actions // 3) * 3 + 1  # never a masked one
    logits[0, 1] = 1e4  # very large logits
    logits[1, :] = torch.where(torch.isinf(logits[1]), logits[1], torch.full_like(logits[1], -5e3))
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    ours = categorical_logprob_entropy(x, actions)
    theirs = torch_categorical(y, actions)
    assert all(torch.isfinite(t).all() for t in ours)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    (g,) = weighted_grads(*ours, [x])
    assert torch.isfinite(g).all()
    assert (g[:, ::3] == 0).all()
    # torch.distributions' entropy gradient is NaN wherever a row holds -inf; with the most
    # negative logit that stays finite after normalization it is finite and must agree.
    assert torch.isnan(weighted_grads(*theirs, [y])[0]).any()
    z = logits.clamp(min=-1e300).requires_grad_()
    torch.testing.assert_close(g, weighted_grads(*torch_categorical(z, actions), [z])[0], rtol=1e-8, atol=1e-8)


def test_categorical_only_one_output_used(device):
    logits, actions = random_logits(30, 7, device, seed=4)
    for pick in (0, 1):
        x = logits.clone().requires_grad_()
        y = logits.clone().requires_grad_()
        (g_ours,) = torch.autograd.grad(categorical_logprob_entropy(x, actions)[pick].sum(), [x])
        (g_theirs,) = torch.autograd.grad(torch_categorical(y, actions)[pick].sum(), [y])
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-9)


def test_categorical_bad_actions_are_a_clear_error():
    logits, actions = random_logits(5, 4, "cpu")
    for bad in (4, -1, 100):
        actions[2] = bad
        with pytest.raises(IndexError, match=rf"actions holds {bad} .* expected indices in \[0, 4\)"):
            categorical_logprob_entropy(logits, actions)


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda l, a: (l.float().int(), a), TypeError, ["logits", "int32"]),
        (lambda l, a: (l.to(torch.complex64), a), TypeError, ["logits", "complex64", "bfloat16 or float16"]),
        (lambda l, a: (l, a.float()), TypeError, ["actions", "float32", "int64"]),
        (lambda l, a: (l, a[:3]), ValueError, ["actions", "(3,)", "(5,)"]),
        (lambda l, a: (l, [0, 1]), TypeError, ["actions", "list"]),
        (lambda l, a: (l[:, :0], a), ValueError, ["logits", "A >= 1"]),
    ],
)
def test_categorical_bad_input(make, error, words):
    logits, actions = random_logits(5, 4, "cpu")
    with pytest.raises(error) as info:
        categorical_logprob_entropy(*make(logits, actions))
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    with pytest.raises(ValueError, match="temperature"):
        categorical_logprob_entropy(logits, actions, temperature=0.0)


# ---------------------------------------------------------------- non-finite logits

INF, NAN = math.inf, math.nan

# The rows that categorical_logprob_entropy's docstring lists, each with the action taken (a
# column of the row) and whether the row has a distribution.
NONFINITE_ROWS = [
    ([0.5, NAN, -1.0, 2.0], 0, False),  # NaN
    ([0.5, NAN, -1.0, 2.0], 1, False),  # NaN, taken
    ([0.5, -1.0, INF, 2.0], 0, False),  # +inf
    ([0.5, -1.0, INF, 2.0], 2, False),  # +inf, taken
    ([INF, 0.5, INF, -1.0], 1, False),  # two +inf
    ([-INF, -INF, -INF, -INF], 2, False),  # only -inf
    ([-INF, NAN, 1.0, -INF], 2, False),  # NaN next to masked actions
    ([-INF, 1.0, INF, -INF], 1, False),  # +inf next to masked actions
    ([NAN, INF, 1.0, -INF], 3, False),  # NaN and +inf
    ([-INF, 0.5, -INF, 2.0], 1, True),  # masked actions
    ([-INF, 0.5, -INF, 2.0], 0, True),  # a masked action taken: log-prob -inf
]
# "A4": the rows as written (the small-action-space path). "A1300-...": the four values at columns
# spread over the 512-wide blocks of the streaming softmax, the other columns -inf (a block may then
# hold a NaN or +inf among -inf only) or finite.
LAYOUTS = ["A4", "A1300-masked", "A1300-finite"]


def nonfinite_batch(layout, dtype, device):
    """The rows above, each followed by a finite row (a row's NaN must not reach the next one):
    ``[2 * rows, A]`` logits, actions, and the documented rows without a distribution."""
    A = 4 if layout == "A4" else 1300
    cols = torch.tensor([0, 1, 2, 3] if A == 4 else [5, 700, 1030, A - 1])
    g = torch.Generator().manual_seed(A)
    n = 2 * len(NONFINITE_ROWS)
    logits = torch.randn(n, A, generator=g, dtype=torch.float64) * 2
    actions = torch.randint(0, A, (n,), generator=g)
    for i, (row, action, _) in enumerate(NONFINITE_ROWS):
        if layout != "A1300-finite":
            logits[2 * i] = -INF
        logits[2 * i, cols] = torch.tensor(row, dtype=torch.float64)
        actions[2 * i] = cols[action]
    no_distribution = logits.isnan().any(-1) | (logits == INF).any(-1) | (logits == -INF).all(-1)
    if layout != "A1300-finite":  # (finite columns give the row of -inf a distribution)
        assert no_distribution[::2].tolist() == [not ok for _, _, ok in NONFINITE_ROWS]
    return logits.to(dtype=dtype, device=device), actions.to(device), no_distribution


def log_softmax_reference(logits, actions, no_distribution, w1, w2):
    """torch in float64: ``log_softmax(logits)[action]``, ``-sum p log p`` (0 log 0 = 0) and the
    gradient of ``sum(w1 * logprob + w2 * entropy)``. In a row with a distribution a -inf logit is
    taken as -1e300 for the gradient (p = 0 there all the same, where autograd through p log p at
    -inf gives 0 * inf); a row without one keeps its logits."""
    x = logits.detach().cpu().double()
    actions = actions.cpu()
    logprob, entropy = categorical_reference(x, actions)
    assert torch.equal(entropy.isnan(), no_distribution)  # torch's NaN rows are the documented ones
    leaf = torch.where(no_distribution[:, None], x, x.clamp(min=-1e300)).requires_grad_()
    lp, ent = categorical_reference(leaf, actions)
    (grad,) = torch.autograd.grad((lp * w1 + ent * w2).sum(), leaf)
    return logprob, entropy, grad


@pytest.mark.parametrize("outputs", ["both", "logprob", "entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_categorical_nonfinite_logits_as_log_softmax(device, layout, dtype, outputs):
    """NaN, +inf and only -inf make a row's log-prob, entropy and gradient NaN, as torch's
    log_softmax does; masked actions next to finite logits keep p = 0 and a zero gradient."""
    logits, actions, no_distribution = nonfinite_batch(layout, dtype, device)
    x = logits.clone().requires_grad_()
    logprob, entropy = categorical_logprob_entropy(x, actions)
    g = torch.Generator().manual_seed(1)
    w1, w2 = (torch.randn(logits.shape[0], generator=g, dtype=torch.float64) for _ in range(2))
    w1, w2 = (w1 if outputs != "entropy" else w1 * 0), (w2 if outputs != "logprob" else w2 * 0)
    terms = [(out * w.to(out)).sum() for out, w, used in ((logprob, w1, outputs != "entropy"),
                                                          (entropy, w2, outputs != "logprob")) if used]
    (grad,) = torch.autograd.grad(sum(terms), x)  # one output alone: the other's gradient is None
    want_lp, want_ent, want_grad = log_softmax_reference(logits, actions, no_distribution, w1, w2)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprob.cpu().double(), want_lp, equal_nan=True, **tol)
    torch.testing.assert_close(entropy.cpu().double(), want_ent, equal_nan=True, **tol)
    torch.testing.assert_close(grad.cpu().double(), want_grad, equal_nan=True, **tol)
    assert grad.dtype == dtype
    # Stated outright: NaN on every row without a distribution, exact zeros at masked logits elsewhere
    # (but for a taken masked action's own log-prob term).
    none = no_distribution.to(device)
    assert logprob[none].isnan().all() and entropy[none].isnan().all() and grad[none].isnan().all()
    masked = (logits == -INF) & ~none[:, None]
    if outputs != "entropy":
        masked[torch.arange(len(actions), device=device), actions] = False
    assert (grad[masked] == 0).all() and grad[~none].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_categorical_sample_nonfinite_rows(device, layout, dtype):
    """A row without a distribution samples torch.argmax's pick (the first NaN, else the first
    +inf, else 0) on the fused CPU kernel and the torch path alike, with NaN log-prob and entropy;
    a masked action is never sampled."""
    logits, _, no_distribution = nonfinite_batch(layout, dtype, device)
    x = logits.cpu().double()
    nan, pos_inf = x.isnan(), x == INF
    want = torch.where(nan.any(-1), nan.int().argmax(-1), torch.where(pos_inf.any(-1), pos_inf.int().argmax(-1), 0))
    for records in (False, True):  # the fused kernel (CPU), and the torch argmax that autograd takes
        for seed in range(4):
            g = torch.Generator(device=device).manual_seed(seed)
            action, logprob, entropy = categorical_sample(logits.clone().requires_grad_(records), generator=g)
            action, logprob, entropy = action.cpu(), logprob.detach().cpu(), entropy.detach().cpu()
            assert torch.equal(action[no_distribution], want[no_distribution])
            assert logprob[no_distribution].isnan().all() and entropy[no_distribution].isnan().all()
            ok = ~no_distribution
            assert (x[ok].gather(-1, action[ok, None]) > -INF).all()  # never a masked action
            assert logprob[ok].isfinite().all() and entropy[ok].isfinite().all()


class LinearActorCritic(nn.Module):
    """A categorical actor-critic of one Linear each: the actor's bias puts the non-finite values
    into every row's logits."""

    def __init__(self, obs_dim, n_out):
        super().__init__()
        self.actor = nn.Linear(obs_dim, n_out)
        self.critic = nn.Linear(obs_dim, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("row", [0, 2, 4, 5, 9], ids=["nan", "+inf", "two+inf", "only-inf", "masked"])
def test_fused_actor_critic_nonfinite_logits(row, dtype):
    """The fused actor-critic's copy of the head: act samples as torch.argmax and gives
    log_softmax's log-prob, and an update's loss statistics and gradients (before the clip and
    Adam step) equal torch's on the same module in float64, NaN for NaN."""
    bias = NONFINITE_ROWS[row][0]
    torch.manual_seed(row)
    module = LinearActorCritic(5, 4).to(dtype)
    with torch.no_grad():
        module.actor.bias.copy_(torch.tensor(bias))
    ref = copy.deepcopy(module).double()
    fused = FusedActorCritic(module, ent_coef=0.01)
    g = torch.Generator().manual_seed(0)
    M = 16
    obs = torch.randn(M, 5, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.rand(M, 4, generator=g, dtype=torch.float64).to(dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        out = ref.actor(obs.double())
    no_distribution = NONFINITE_ROWS[row][2] is False
    for u in (None, noise):
        action, logprob, _ = fused.act(obs, u)
        scores = out if u is None else out - torch.log(-torch.log(u.double()))
        assert torch.equal(action, scores.argmax(-1))
        want = torch.log_softmax(out, -1).gather(-1, action[:, None])[:, 0]
        torch.testing.assert_close(logprob.double(), want, equal_nan=True, **tol)
        assert logprob.isnan().all() == no_distribution

    # One update on the batch acted on (a masked action is never in it), its step left undone.
    old_logprob = (logprob.double() - 0.3).nan_to_num(-1.0)
    adv, ret, old_value = (torch.randn(M, generator=g, dtype=torch.float64) for _ in range(3))
    batch = [t.to(dtype).contiguous() for t in (old_logprob, adv, ret, old_value)]
    fused.set_batch(obs, action, batch[0], batch[1], batch[2], batch[3])
    idx = torch.arange(M)
    stats = np.zeros(7)
    fused.update_at(M, idx.data_ptr(), 1e-3, stats.ctypes.data, apply_step=False)
    out = ref.actor(obs.double())
    leaf_out = out if no_distribution else out.clamp(min=-1e300)  # see log_softmax_reference
    lp, ent = categorical_reference(leaf_out, action)
    res = fastppo.ppo_loss(lp, old_logprob, adv, ref.critic(obs.double()).squeeze(-1), old_value, ret, ent,
                           clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=True, vf_clip_coef=0.2)
    res.loss.backward()
    for i, name in enumerate(("pg_loss", "v_loss", "entropy")):
        torch.testing.assert_close(torch.tensor(stats[i]), getattr(res, name).double(), equal_nan=True, **tol)
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, equal_nan=True, **tol, msg=lambda m: f"d {name}: {m}")
    if no_distribution:
        assert module.actor.bias.grad.isnan().all() and module.critic.bias.grad.isfinite().all()
    else:  # the masked actions' logits get no gradient
        assert (module.actor.bias.grad[[0, 2]] == 0).all() and (module.actor.weight.grad[[0, 2]] == 0).all()


# ---------------------------------------------------------------- diagonal Gaussian


@pytest.mark.parametrize("rows,D", [(1, 1), (97, 6), (256, 17), (3000, 3)])
@pytest.mark.parametrize("shared", [True, False])
def test_normal_matches_torch_distributions(device, rows, D, shared):
    g = torch.Generator().manual_seed(rows * D)
    mean = torch.randn(rows, D, generator=g, dtype=torch.float64).to(device)
    log_std = (torch.randn(D if shared else (rows, D), generator=g, dtype=torch.float64) * 0.5).to(device)
    actions = torch.randn(rows, D, generator=g, dtype=torch.float64).to(device)
    m1, s1 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    m2, s2 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    ours = normal_logprob_entropy(m1, s1, actions)
    theirs = torch_normal(m2, s2.expand_as(m2) if shared else s2, actions)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(weighted_grads(*ours, [m1, s1]), weighted_grads(*theirs, [m2, s2])):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_normal_shared_log_std_gradient_is_the_same_bits_every_run(device):
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(5000, 6, generator=g).to(device)
    actions = torch.randn(5000, 6, generator=g).to(device)
    log_std = torch.zeros(6, device=device, requires_grad=True)
    grads = [torch.autograd.grad(normal_logprob_entropy(mean, log_std, actions)[0].sum(), [log_std])[0] for _ in range(3)]
    assert all(torch.equal(grads[0], x) for x in grads[1:])


@pytest.mark.parametrize("shared", [True, False])
def test_normal_entropy_gradient_ignores_the_actions(device, shared):
    # The entropy depends on log_std alone. Differentiating only the entropy ran the backward kernel
    # with a zero log-prob gradient, and 0 * (a - mean)^2 / sigma^2 made a NaN or inf action's (or
    # mean's) gradient NaN.
    mean = torch.tensor([[0.0, 1.0], [2.0, 3.0], [-1.0, 0.5]], dtype=torch.float64, device=device, requires_grad=True)
    log_std = torch.zeros(2 if shared else (3, 2), dtype=torch.float64, device=device, requires_grad=True)
    actions = torch.tensor([[float("nan"), 1.0], [2.0, float("inf")], [0.0, 0.0]], dtype=torch.float64, device=device)
    weights = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64, device=device)
    logprob, entropy = normal_logprob_entropy(mean, log_std, actions)
    assert torch.isnan(logprob[0]) and torch.isinf(logprob[1])
    grad_mean, grad_log_std = torch.autograd.grad((entropy * weights).sum(), [mean, log_std])
    assert torch.equal(grad_mean, torch.zeros_like(mean))
    expected = weights.sum().expand(2) if shared else weights[:, None].expand(3, 2)
    torch.testing.assert_close(grad_log_std, expected, rtol=0, atol=0)


def test_normal_bad_input():
    mean, log_std, actions = torch.zeros(4, 3), torch.zeros(3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"log_std has shape \(2,\); expected \(3,\), mean.shape\[-1:\] \(shared by every row\)"):
        normal_logprob_entropy(mean, torch.zeros(2), actions)
    with pytest.raises(ValueError, match=r"actions has shape \(4, 2\)"):
        normal_logprob_entropy(mean, log_std, torch.zeros(4, 2))
    with pytest.raises(TypeError, match=r"log_std has dtype torch.float64; expected torch.float32"):
        normal_logprob_entropy(mean, log_std.double(), actions)
    with pytest.raises(TypeError, match=r"mean has dtype torch.int64"):
        normal_logprob_entropy(mean.long(), log_std, actions)


# ---------------------------------------------------------------- torch integration


def test_opcheck_heads():
    logits, actions = random_logits(7, 5, "cpu")
    torch.library.opcheck(torch.ops.fastppo.categorical_logprob_entropy.default,
                          (logits.clone().requires_grad_(), actions, 1.3))
    _, ent = torch_categorical(logits, actions)
    stats = torch.stack([torch.logsumexp(logits, -1), ent])
    torch.library.opcheck(torch.ops.fastppo.categorical_backward.default,
                          (logits, actions, 1.0, stats, torch.ones(7, dtype=torch.float64), None))
    mean, actions_n = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for log_std in (torch.randn(3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.fastppo.normal_logprob_entropy.default,
                              (mean.clone().requires_grad_(), log_std.clone().requires_grad_(), actions_n))


def test_heads_under_torch_compile_fullgraph():
    logits, actions = random_logits(16, 9, "cpu", seed=6)
    g = torch.Generator().manual_seed(0)
    mean, log_std, actions_n = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((16, 4), (4,), (16, 4)))

    def step(logits, mean, log_std):
        lp, ent = categorical_logprob_entropy(logits, actions, temperature=0.9)
        nlp, nent = normal_logprob_entropy(mean, log_std, actions_n)
        return (lp * 0.3 + ent).sum() + (nlp - 0.1 * nent).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (logits, mean, log_std)]
        out = fn(*leaves)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0)
