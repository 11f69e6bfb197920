"""bfloat16 and float16 inputs: the categorical head (read as stored, computed in float32), the
Gaussian head, GAE and the RLHF kernels (through float32), against plain float64 references on the
same (already rounded) inputs.

Two checks per output, values and gradients:

- the documented tolerance: within one rounding of the dtype of the float64 result,
  ``|ours - exact| <= eps(dtype) * |exact| + atol``, where atol covers float32's own error where a
  result cancels to near 0 (``1e-5`` of the largest result) and the dtype's smallest subnormal step;
- an error budget (as flash-attention tests its kernels): the largest error is at most ``K`` times
  the largest error of the same computation written in torch in that dtype, or half a unit in the
  last place of the largest result, whichever is larger (a single value rounded the lucky way by
  torch must not fail the kernel).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402
from fastppo import categorical_logprob_entropy, categorical_sample, normal_logprob_entropy  # noqa: E402
from fastppo.rlhf.kernels import kl_penalty_rewards, masked_whiten, token_gae  # noqa: E402

from conftest import needs_cuda  # noqa: E402
from peers import cleanrl_gae_as_fastppo, torch_normal  # noqa: E402
from references import (categorical_reference, gae_reference, kl_reference, normal_reference, rollout,  # noqa: E402
                        token_gae_reference, whiten_reference)

F64 = torch.float64
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]
K = 2.0


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def subnormal_step(dtype) -> float:
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def finite_pairs(got, exact, check=True):
    """``got`` (any dtype and device) and ``exact`` (float64) where ``exact`` is finite, after
    checking (when ``check``) that both are non-finite at the same places with the same values."""
    got = got.detach().cpu().double()
    exact = exact.detach().cpu().double()
    assert got.shape == exact.shape
    finite = exact.isfinite()
    if check:
        assert torch.equal(got[~finite].isnan(), exact[~finite].isnan())
        assert torch.equal(got[~finite & ~exact.isnan()], exact[~finite & ~exact.isnan()])
    return got[finite], exact[finite]


def assert_one_rounding(got, exact, dtype, what=""):
    """The documented tolerance (see the module docstring)."""
    got, exact = finite_pairs(got, exact)
    if exact.numel() == 0:
        return
    atol = 1e-5 * exact.abs().max().item() + subnormal_step(dtype)
    bound = eps(dtype) * exact.abs() + atol
    worst = ((got - exact).abs() - bound).max().item()
    assert worst <= 0, f"{what}: error above eps * |exact| + {atol:.3g} by {worst:.3g}"


def assert_within_budget(got, theirs, exact, dtype, what=""):
    """The error budget against torch's computation in the same dtype (see the module docstring)."""
    got, exact_g = finite_pairs(got, exact)
    theirs, exact_t = finite_pairs(theirs, exact, check=False)
    if exact_g.numel() == 0:
        return
    ours_err = (got - exact_g).abs().max().item()
    their_err = (theirs - exact_t).abs().nan_to_num(math.inf).max().item()  # torch's NaN: worse than any
    largest = exact_g.abs().max().item()
    half_ulp = 0.5 * eps(dtype) * 2.0 ** math.floor(math.log2(largest)) if largest > 0 else 0.0
    bound = max(K * their_err, half_ulp, subnormal_step(dtype))
    assert ours_err <= bound, f"{what}: error {ours_err:.3g} > max({K} x torch's {their_err:.3g}, half ulp {half_ulp:.3g})"


def weights(n, dtype, device, seed):
    """Weights of the two outputs in the backward pass, as rounded to the dtype (so that the exact
    gradient uses the values the kernel sees)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=F64).to(dtype).to(device) for _ in range(2)]


# ---------------------------------------------------------------------------------------------
# The categorical head


def low_precision_logits(rows, A, dtype, device, layout, seed, scale=3.0):
    """``[rows, A]`` logits of ``dtype`` in the given memory layout, with their values in float64."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, A, generator=g, dtype=F64) * scale).to(dtype)
    actions = torch.randint(0, A, (rows,), generator=g).to(device)
    if layout == "contiguous":
        logits = values.to(device)
    elif layout == "row-strided":  # rows further apart than A (a slice of a wider buffer)
        wide = torch.zeros(rows, A + 5, dtype=dtype, device=device)
        wide[:, 2:A + 2] = values.to(device)
        logits = wide[:, 2:A + 2]
    elif layout == "column-strided":  # every other column of a buffer: the action dimension strided
        wide = torch.zeros(rows, 2 * A, dtype=dtype, device=device)
        wide[:, ::2] = values.to(device)
        logits = wide[:, ::2]
    else:  # "transposed": [A, rows] memory seen as [rows, A]
        logits = values.T.contiguous().to(device).T
    assert torch.equal(logits.cpu(), values)
    return logits, actions, values.double()


def torch_head(logits, actions, temperature):
    """The head as torch computes it in the logits' dtype (log_softmax, p log p); a masked (-inf)
    logit taken as the dtype's lowest value, whose p is 0 all the same, so that autograd through
    p log p does not make 0 * inf."""
    return categorical_reference(logits.clamp(min=torch.finfo(logits.dtype).min), actions, temperature)


def check_categorical(logits, actions, exact_logits, temperature, dtype, seed=0, what=""):
    """Values and gradients of fastppo's head and of torch's (both in ``dtype``) against float64."""
    x = logits.detach().requires_grad_()  # the view itself, strides and all
    lp, ent = categorical_logprob_entropy(x, actions, temperature=temperature)
    assert lp.dtype == ent.dtype == dtype and lp.shape == ent.shape == actions.shape
    w1, w2 = weights(actions.numel(), dtype, logits.device, seed)
    (grad,) = torch.autograd.grad((lp.float() * w1.float() + ent.float() * w2.float()).sum(), x)
    assert grad.dtype == dtype and grad.shape == logits.shape

    leaf = exact_logits.clamp(min=-1e300).requires_grad_()  # -inf: p = 0 all the same (see torch_head)
    exact_lp, exact_ent = categorical_reference(leaf, actions.cpu(), temperature)
    (exact_grad,) = torch.autograd.grad((exact_lp * w1.cpu().double() + exact_ent * w2.cpu().double()).sum(), leaf)

    low = logits.detach().clone().requires_grad_()
    their_lp, their_ent = torch_head(low, actions, temperature)
    (their_grad,) = torch.autograd.grad((their_lp * w1 + their_ent * w2).sum(), low)

    for name, ours, theirs, exact in (("logprob", lp, their_lp, exact_lp), ("entropy", ent, their_ent, exact_ent),
                                      ("grad", grad, their_grad, exact_grad)):
        assert_one_rounding(ours, exact, dtype, f"{what} {name}")
        assert_within_budget(ours, theirs, exact, dtype, f"{what} {name}")
    return grad


# V of 1, the small-action tile path (6, 64) and just past it (65), 97, 1025 (two blocks of the
# streaming softmax and one element), a prime past several blocks (65537), and one row.
CATEGORICAL_SIZES = [(1, 1), (5, 1), (1, 97), (257, 6), (64, 64), (3, 65), (33, 97), (7, 1025), (9, 65537)]


@pytest.mark.parametrize("rows,A", CATEGORICAL_SIZES)
@pytest.mark.parametrize("dtype", LOW)
def test_categorical_within_budget(device, dtype, rows, A):
    logits, actions, exact = low_precision_logits(rows, A, dtype, device, "contiguous", seed=rows * 7 + A)
    check_categorical(logits, actions, exact, 1.0, dtype, what=f"{rows}x{A}")


@pytest.mark.parametrize("layout", ["row-strided", "column-strided", "transposed"])
@pytest.mark.parametrize("rows,A", [(1, 97), (40, 9), (13, 1025)])
@pytest.mark.parametrize("dtype", LOW)
def test_categorical_strided_views(device, dtype, rows, A, layout):
    logits, actions, exact = low_precision_logits(rows, A, dtype, device, layout, seed=A)
    grad = check_categorical(logits, actions, exact, 0.7, dtype, what=layout)
    # The same bits as from a contiguous copy: the layout changes what is read, not the math.
    x = logits.contiguous().requires_grad_()
    lp, ent = categorical_logprob_entropy(x, actions, temperature=0.7)
    w1, w2 = weights(rows, dtype, device, 0)
    (grad_c,) = torch.autograd.grad((lp.float() * w1.float() + ent.float() * w2.float()).sum(), x)
    assert torch.equal(grad, grad_c)


@pytest.mark.parametrize("A", [6, 1025])
@pytest.mark.parametrize("dtype", LOW)
def test_categorical_masked_actions(device, dtype, A):
    """-inf logits (masked actions) keep p = 0 and an exact zero gradient in bf16 / f16 too; a
    masked action taken has log-prob -inf."""
    logits, actions, _ = low_precision_logits(64, A, dtype, device, "contiguous", seed=A + 1)
    logits[:, ::3] = float("-inf")
    actions = (actions // 3) * 3 + 1
    actions[actions >= A] = 1
    exact = logits.cpu().double()
    grad = check_categorical(logits, actions, exact, 1.0, dtype, what="masked")
    assert (grad[:, ::3] == 0).all() and grad.isfinite().all()
    actions[0] = 0  # a masked action taken
    lp, ent = categorical_logprob_entropy(logits, actions)
    assert lp[0].item() == float("-inf") and ent[0].isfinite()


@pytest.mark.parametrize("dtype", LOW)
def test_categorical_nonfinite_rows_are_nan(device, dtype):
    """A NaN or +inf logit, or a row of only -inf, makes the row's outputs and gradient NaN, as in
    float32; the next row is untouched."""
    A = 1300
    logits, actions, _ = low_precision_logits(6, A, dtype, device, "contiguous", seed=3)
    logits[0, 700] = float("nan")
    logits[2, 1030] = float("inf")
    logits[4] = float("-inf")
    x = logits.clone().requires_grad_()
    lp, ent = categorical_logprob_entropy(x, actions)
    (grad,) = torch.autograd.grad((lp.float() + ent.float()).sum(), x)
    bad = torch.tensor([True, False, True, False, True, False], device=device)
    assert lp[bad].isnan().all() and ent[bad].isnan().all() and grad[bad].isnan().all()
    assert lp[~bad].isfinite().all() and ent[~bad].isfinite().all() and grad[~bad].isfinite().all()


@pytest.mark.parametrize("dtype", LOW)
def test_categorical_one_output_and_int32_actions(device, dtype):
    logits, actions, exact = low_precision_logits(30, 200, dtype, device, "contiguous", seed=9)
    for pick in (0, 1):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(categorical_logprob_entropy(x, actions.int())[pick].float().sum(), x)
        leaf = exact.clone().requires_grad_()
        (exact_grad,) = torch.autograd.grad(categorical_reference(leaf, actions.cpu())[pick].sum(), leaf)
        assert_one_rounding(grad, exact_grad, dtype, f"output {pick}")


@pytest.mark.parametrize("dtype", LOW)
def test_categorical_inference_path_equals_autograd_path(device, dtype):
    logits, actions, _ = low_precision_logits(16, 300, dtype, device, "contiguous", seed=4)
    with torch.no_grad():
        a = categorical_logprob_entropy(logits, actions)
    b = categorical_logprob_entropy(logits.clone().requires_grad_(), actions)
    for x, y in zip(a, b):
        assert x.dtype == dtype and torch.equal(x, y.detach())


@pytest.mark.parametrize("dtype", LOW)
def test_categorical_under_torch_compile_fullgraph(dtype):
    logits, actions, _ = low_precision_logits(16, 300, dtype, "cpu", "contiguous", seed=6)

    def step(logits):
        lp, ent = categorical_logprob_entropy(logits, actions, temperature=0.9)
        return (lp.float() * 0.3 + ent.float()).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaf = logits.clone().requires_grad_()
        out = fn(leaf)
        results.append((out.detach(), torch.autograd.grad(out, leaf)[0]))
    assert results[1][1].dtype == dtype
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_categorical_opcheck(dtype):
    logits, actions, _ = low_precision_logits(7, 70, dtype, "cpu", "contiguous", seed=2)
    torch.library.opcheck(torch.ops.fastppo.categorical_logprob_entropy.default,
                          (logits.clone().requires_grad_(), actions, 1.3))
    _, _, stats = torch.ops.fastppo.categorical_logprob_entropy.default(logits, actions, 1.0)
    assert stats.dtype == torch.float32 and stats.shape == (2, 7)
    torch.library.opcheck(torch.ops.fastppo.categorical_backward.default,
                          (logits, actions, 1.0, stats, torch.ones(7, dtype=dtype), None))


@pytest.mark.parametrize("rows,A", [(1, 1), (97, 6), (3, 1025)])
@pytest.mark.parametrize("dtype", LOW)
def test_categorical_sample(device, dtype, rows, A):
    """The sample is the Gumbel-max argmax of the logits' values (float32 noise and scores), and its
    log-prob and entropy are the head's, in the logits' dtype."""
    logits, _, exact = low_precision_logits(rows, A, dtype, device, "contiguous", seed=rows + A)
    for records in (False, True):  # the fused CPU kernel (on the CPU), and the torch argmax path
        g = torch.Generator(device=device).manual_seed(5)
        action, lp, ent = categorical_sample(logits.clone().requires_grad_(records), generator=g)
        assert action.dtype == torch.int64 and lp.dtype == ent.dtype == dtype
        u = torch.rand(logits.shape, generator=torch.Generator(device=device).manual_seed(5), dtype=torch.float32,
                       device=device)
        scores = exact - torch.log(-torch.log(u.double().cpu().clamp(min=torch.finfo(torch.float32).tiny)))
        agree = (action.cpu() == scores.argmax(-1)).double().mean().item()
        assert agree > 0.99
        exact_lp, exact_ent = categorical_reference(exact, action.cpu())
        assert_one_rounding(lp, exact_lp, dtype, "sample logprob")
        assert_one_rounding(ent, exact_ent, dtype, "sample entropy")


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool])
def test_categorical_refuses_other_dtypes(dtype):
    logits = torch.zeros(3, 4, dtype=dtype)
    for fn in (lambda: categorical_logprob_entropy(logits, torch.zeros(3, dtype=torch.int64)),
               lambda: categorical_sample(logits)):
        with pytest.raises(TypeError, match=r"logits has dtype .*; expected float32, float64, bfloat16 or float16"):
            fn()


@needs_cuda
@pytest.mark.cuda
def test_categorical_cuda_bf16_memory_is_the_logits_and_their_gradient():
    """On CUDA, forward and backward on bf16 logits allocate the bf16 gradient and O(rows) beyond
    the inputs: no float32 copy of the logits (which would be twice the logits' bytes)."""
    rows, A = 256, 32000
    logits = torch.randn(rows, A, device="cuda").to(torch.bfloat16).requires_grad_()
    actions = torch.randint(0, A, (rows,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = categorical_logprob_entropy(logits, actions)
    (grad,) = torch.autograd.grad((lp.float() + ent.float()).sum(), logits)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert grad.dtype == torch.bfloat16
    assert peak <= logits.numel() * 2 + (1 << 20), peak


# ---------------------------------------------------------------------------------------------
# The Gaussian head (through float32)


@pytest.mark.parametrize("rows,D", [(1, 1), (97, 6), (1025, 3)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", LOW)
def test_normal_within_budget(device, dtype, rows, D, shared):
    g = torch.Generator().manual_seed(rows * D)
    mean = torch.randn(rows, D, generator=g, dtype=F64).to(dtype).to(device)
    log_std = (torch.randn(D if shared else (rows, D), generator=g, dtype=F64) * 0.5).to(dtype).to(device)
    actions = torch.randn(rows, D, generator=g, dtype=F64).to(dtype).to(device)
    leaves = [mean.clone().requires_grad_(), log_std.clone().requires_grad_()]
    lp, ent = normal_logprob_entropy(leaves[0], leaves[1], actions)
    assert lp.dtype == ent.dtype == dtype
    w1, w2 = weights(rows, dtype, device, 1)
    grads = torch.autograd.grad((lp.float() * w1.float() + ent.float() * w2.float()).sum(), leaves)
    assert all(gr.dtype == dtype for gr in grads)

    exact_leaves = [mean.cpu().double().requires_grad_(), log_std.cpu().double().requires_grad_()]
    e_lp, e_ent = normal_reference(exact_leaves[0], exact_leaves[1], actions.cpu().double())
    exact_grads = torch.autograd.grad((e_lp * w1.cpu().double() + e_ent * w2.cpu().double()).sum(), exact_leaves)

    low_leaves = [mean.clone().requires_grad_(), log_std.clone().requires_grad_()]
    t_lp, t_ent = torch_normal(low_leaves[0], low_leaves[1].expand_as(low_leaves[0]) if shared else low_leaves[1],
                               actions)
    their_grads = torch.autograd.grad((t_lp * w1 + t_ent * w2).sum(), low_leaves)

    pairs = [("logprob", lp, t_lp, e_lp), ("entropy", ent, t_ent, e_ent)]
    pairs += [(f"grad {n}", a, b, c) for n, a, b, c in zip(("mean", "log_std"), grads, their_grads, exact_grads)]
    for name, ours, theirs, exact in pairs:
        assert_one_rounding(ours, exact, dtype, name)
        assert_within_budget(ours, theirs, exact, dtype, name)


def test_normal_under_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    mean, log_std, actions = (torch.randn(s, generator=g).to(torch.bfloat16) for s in ((16, 4), (4,), (16, 4)))

    def step(mean, log_std):
        lp, ent = normal_logprob_entropy(mean, log_std, actions)
        return (lp.float() - 0.1 * ent.float()).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [mean.clone().requires_grad_(), log_std.clone().requires_grad_()]
        out = fn(*leaves)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves)))
    for eager, comp in zip(*results):
        assert comp.dtype == eager.dtype
        torch.testing.assert_close(comp, eager, rtol=0, atol=0)


def test_normal_mixed_dtypes_name_the_argument():
    mean = torch.zeros(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"log_std has dtype torch.float32; expected torch.bfloat16, the dtype of mean"):
        normal_logprob_entropy(mean, torch.zeros(3), mean)
    with pytest.raises(TypeError, match=r"actions has dtype torch.float16; expected torch.bfloat16"):
        normal_logprob_entropy(mean, torch.zeros(3, dtype=torch.bfloat16), mean.half())


# ---------------------------------------------------------------------------------------------
# GAE (through float32)


@pytest.mark.parametrize("T,N", [(1, 1), (97, 3), (1025, 2)])
@pytest.mark.parametrize("dtype", LOW)
def test_gae_within_budget(device, dtype, T, N):
    r, v, d, term, last = rollout(T, N, seed=T + N)
    r, v, last = (torch.from_numpy(x).to(dtype).to(device) for x in (r, v, last))
    d, term = (torch.from_numpy(x).to(device) for x in (d, term))
    adv, ret = fastppo.gae(r, v, d, last, terminated=term)
    assert adv.dtype == ret.dtype == dtype and adv.device == r.device
    exact = gae_reference(r.double().cpu().numpy(), v.double().cpu().numpy(), d.cpu().numpy(),
                          last.double().cpu().numpy(), term.cpu().numpy())
    theirs = cleanrl_gae_as_fastppo(r, v, d, last, term)
    for name, ours, their, ex in zip(("advantages", "returns"), (adv, ret), theirs, exact):
        assert_one_rounding(ours, torch.from_numpy(ex), dtype, name)
        assert_within_budget(ours, their, torch.from_numpy(ex), dtype, name)


def test_gae_numpy_float16_and_out():
    r, v, d, term, last = rollout(97, 4, seed=1)
    r16, v16, last16 = (x.astype(np.float16) for x in (r, v, last))
    exact = gae_reference(r16.astype(np.float64), v16.astype(np.float64), d, last16.astype(np.float64), term)
    adv, ret = fastppo.gae(r16, v16, d, last16, terminated=term)
    assert isinstance(adv, np.ndarray) and adv.dtype == np.float16
    for ours, ex in zip((adv, ret), exact):
        assert_one_rounding(torch.from_numpy(ours.astype(np.float64)), torch.from_numpy(ex), torch.float16)
    out = (np.empty_like(r16), np.empty_like(r16))
    got = fastppo.gae(r16, v16, d, last16, terminated=term, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    assert np.array_equal(out[0], adv) and np.array_equal(out[1], ret)
    # a Python number as last_value, and a strided (transposed) view
    adv_t, _ = fastppo.gae(np.ascontiguousarray(r16.T).T, v16, d, 0.5, terminated=term)
    adv_c, _ = fastppo.gae(r16, v16, d, np.full(4, 0.5, np.float16), terminated=term)
    assert np.array_equal(adv_t, adv_c)


def test_gae_torch_out_and_mixed_dtypes():
    r, v, d, term, last = rollout(33, 5, seed=2)
    r, v, last = (torch.from_numpy(x).to(torch.bfloat16) for x in (r, v, last))
    d = torch.from_numpy(d)
    adv, ret = fastppo.gae(r, v, d, last)
    out = (torch.empty_like(r), torch.empty_like(r))
    got = fastppo.gae(r, v, d, last, out=out)
    assert got[0] is out[0] and torch.equal(out[0], adv) and torch.equal(out[1], ret)
    with pytest.raises(TypeError, match=r"fastppo.gae: values has dtype torch.float32; expected torch.bfloat16"):
        fastppo.gae(r, v.float(), d, last)
    with pytest.raises(TypeError, match=r"fastppo.gae: last_value has dtype torch.float16; expected torch.bfloat16"):
        fastppo.gae(r, v, d, last.half())
    with pytest.raises(TypeError, match=r"fastppo.gae: out\[0\] has dtype torch.float32; expected torch.bfloat16"):
        fastppo.gae(r, v, d, last, out=(torch.empty(33, 5), torch.empty_like(r)))
    with pytest.raises(TypeError, match=r"fastppo.gae: rewards has dtype torch.int32"):
        fastppo.gae(r.int(), v.int(), d, last)


# ---------------------------------------------------------------------------------------------
# The RLHF kernels (through float32)


def token_batch(B, T, dtype, device, seed):
    rng = np.random.default_rng(seed)
    lp = torch.from_numpy(-np.abs(rng.normal(size=(B, T))) * 3.0).to(dtype).to(device)
    ref = (lp.double() + torch.from_numpy(rng.normal(scale=0.5, size=(B, T))).to(device)).to(dtype)
    scores = torch.from_numpy(rng.normal(size=B) * 2.0).to(dtype).to(device)
    lengths = torch.from_numpy(rng.integers(0, T + 1, size=B))
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return lp, ref, scores, mask


def torch_kl(lp, ref, mask, scores, beta, estimator):
    """The shaped rewards in the inputs' dtype, as a trainer writes them in torch."""
    d = lp - ref
    kl = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d}[estimator]
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    rewards = -beta * kl
    last = torch.where(mask.any(-1), mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1), -1)
    rows = torch.arange(len(last), device=lp.device)[last >= 0]
    rewards[rows, last[last >= 0]] += scores[last >= 0]
    return rewards, kl


@pytest.mark.parametrize("B,T", [(1, 1), (97, 3), (3, 1025)])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", LOW)
def test_kl_penalty_rewards_within_budget(device, dtype, estimator, B, T):
    lp, ref, scores, mask = token_batch(B, T, dtype, device, seed=B + T)
    rewards, kl, last = kl_penalty_rewards(lp, ref, mask, scores, beta=0.05, estimator=estimator)
    assert rewards.dtype == kl.dtype == dtype and last.dtype == torch.int64
    e_rewards, e_kl, e_last = kl_reference(lp.double(), ref.double(), mask, scores.double(), 0.05, estimator)
    assert torch.equal(last.cpu(), e_last)
    t_rewards, t_kl = torch_kl(lp, ref, mask, scores, 0.05, estimator)
    for name, ours, theirs, exact in (("rewards", rewards, t_rewards, e_rewards), ("kl", kl, t_kl, e_kl)):
        assert_one_rounding(ours, exact, dtype, name)
        assert_within_budget(ours, theirs, exact, dtype, name)


@pytest.mark.parametrize("B,T", [(1, 1), (97, 3), (3, 1025)])
@pytest.mark.parametrize("dtype", LOW)
def test_masked_whiten_within_budget(device, dtype, B, T):
    x, _, _, mask = token_batch(B, T, dtype, device, seed=B * T)
    out = masked_whiten(x, mask)
    assert out.dtype == dtype
    exact = whiten_reference(x.double(), mask)
    sel = mask
    xs = x[sel]
    mean, var = xs.mean(), (xs.var() if xs.numel() > 1 else torch.zeros((), dtype=dtype, device=device))
    theirs = torch.where(sel, (x - mean) * torch.rsqrt(var + 1e-8), torch.zeros((), dtype=dtype, device=device))
    assert_one_rounding(out, exact, dtype, "whiten")
    if xs.numel() >= 2:  # (torch's 1e-8 is 0 in float16: one element gives 0 * inf there)
        assert_within_budget(out, theirs, exact, dtype, "whiten")
    # strided view: same bits as a contiguous copy
    wide = torch.zeros(B, 2 * T, dtype=dtype, device=device)
    wide[:, ::2] = x
    assert torch.equal(masked_whiten(wide[:, ::2], mask), out)


@pytest.mark.parametrize("B,T", [(1, 1), (97, 3), (3, 1025)])
@pytest.mark.parametrize("dtype", LOW)
def test_token_gae_within_budget(device, dtype, B, T):
    rewards, values, _, mask = token_batch(B, T, dtype, device, seed=B + 2 * T)
    last = mask.sum(-1) - 1
    adv, ret = token_gae(rewards, values, last, gamma=1.0, gae_lambda=0.95, mask=mask)
    assert adv.dtype == ret.dtype == dtype
    e_adv, e_ret = token_gae_reference(rewards.double(), values.double(), last.cpu(), 1.0, 0.95, mask)
    for name, ours, exact in (("advantages", adv, e_adv), ("returns", ret, e_ret)):
        assert_one_rounding(ours, exact, dtype, name)
    # torch's loop in the dtype, per row (each response ends at its last token)
    t_adv = torch.zeros_like(rewards)
    for b in range(B):
        running = torch.zeros((), dtype=dtype, device=device)
        for t in range(int(last[b]), -1, -1):
            next_value = values[b, t + 1] if t < int(last[b]) else torch.zeros((), dtype=dtype, device=device)
            running = rewards[b, t] + next_value - values[b, t] + 0.95 * running
            t_adv[b, t] = running
        if B * T > 400 and b >= 2:
            break  # a few rows of the Python loop are enough for the budget at the larger sizes
    rows = slice(0, 3) if B * T > 400 else slice(None)
    assert_within_budget(adv[rows], t_adv[rows], e_adv[rows], dtype, "advantages")


def test_rlhf_mixed_dtypes_name_the_argument():
    lp = torch.zeros(3, 5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"kl_penalty_rewards: ref_logprob has dtype torch.float32; expected torch.bfloat16"):
        kl_penalty_rewards(lp, torch.zeros(3, 5))
    with pytest.raises(TypeError, match=r"kl_penalty_rewards: scores has dtype torch.float16; expected torch.bfloat16"):
        kl_penalty_rewards(lp, lp, scores=torch.zeros(3, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"token_gae: values has dtype torch.float32; expected torch.bfloat16"):
        token_gae(lp, torch.zeros(3, 5), torch.tensor([4, 4, 4]))
    with pytest.raises(TypeError, match=r"masked_whiten: x has dtype torch.int32"):
        masked_whiten(torch.zeros(3, 5, dtype=torch.int32))
