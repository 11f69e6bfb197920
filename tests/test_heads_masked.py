"""The masked categorical, multi-discrete and tanh-squashed Gaussian heads against plain float64
references (tests/references.py), values and gradients, and against their torch.distributions
peers; masks, fully masked rows, illegal actions, strided views, low precision, the samplers and
torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402
from fastppo import (categorical_logprob_entropy, categorical_sample, multi_categorical_logprob_entropy,  # noqa: E402
                     multi_categorical_sample, tanh_normal_logprob_entropy)

from conftest import needs_cuda  # noqa: E402
from references import (masked_categorical_reference, multi_categorical_reference, normal_reference,  # noqa: E402
                        tanh_normal_reference)

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-9)
ROWS = [1, 97, 1025]
INF, NAN = math.inf, math.nan


def weighted_grads(outputs, leaves, seed=0):
    """Gradients of a fixed random weighting of the outputs (every output's backward path)."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for out in outputs:
        w = torch.randn(out.shape, generator=g, dtype=F64).to(device=out.device, dtype=out.dtype)
        total = total + (out * w).sum()
    return torch.autograd.grad(total, leaves)


def random_mask(shape, device, seed, p_legal=0.7, fully_masked_every=7):
    """A random bool mask with every ``fully_masked_every``-th row (over the leading dimensions;
    the first is row ``fully_masked_every - 1``) without a legal action and every other row with
    at least one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < p_legal
    rows = mask.reshape(-1, shape[-1])
    forced = torch.randint(0, shape[-1], (rows.shape[0],), generator=g)
    rows[torch.arange(rows.shape[0]), forced] = True
    rows[fully_masked_every - 1::fully_masked_every] = False
    return mask.to(device)


def legal_actions(mask, seed):
    """A legal action of each row (0 where none is legal)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(mask.shape, generator=g).to(mask.device)
    return torch.where(mask, scores, -1.0).argmax(-1)


def masked_case(rows, A, device, seed, dtype=F64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, A, generator=g, dtype=F64) * scale).to(dtype=dtype, device=device)
    mask = random_mask((rows, A), device, seed)
    return logits, legal_actions(mask, seed), mask


def check_against(ours, theirs, leaf_ours, leaf_theirs, tol=TIGHT):
    """Values and weighted gradients of two (logprob, entropy) pairs."""
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)
    (ga,) = weighted_grads(ours, [leaf_ours])
    (gb,) = weighted_grads(theirs, [leaf_theirs])
    torch.testing.assert_close(ga, gb, **tol)
    return ga


# ---------------------------------------------------------------- masked categorical


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("A", [1, 18, 1300])  # 1300: the streaming path, over several 512-wide blocks
def test_masked_categorical_matches_reference(device, rows, A):
    logits, actions, mask = masked_case(rows, A, device, seed=rows * 31 + A)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = categorical_logprob_entropy(x, actions, mask=mask)
    grad = check_against(ours, masked_categorical_reference(y, actions, mask), x, y)
    assert (grad[~mask] == 0).all() and grad.isfinite().all()
    none = ~mask.any(-1)
    assert none.any() == (rows >= 7)
    assert (ours[0][none] == 0).all() and (ours[1][none] == 0).all() and (grad[none] == 0).all()


@pytest.mark.parametrize("A", [6, 700])
def test_masked_categorical_strided_views(device, A):
    """Logits with strided columns, a transposed mask and strided actions: read in place."""
    rows = 97
    logits, actions, mask = masked_case(rows, A, device, seed=A)
    wide = torch.zeros(rows, 2 * A, dtype=F64, device=device)
    wide[:, ::2] = logits
    x = wide[:, ::2].requires_grad_()
    mask_t = mask.T.contiguous().T
    actions_s = torch.stack([actions, actions], -1)[:, 1]
    assert x.stride(-1) == 2 and mask_t.stride() == (1, rows) and actions_s.stride() == (2,)
    y = logits.clone().requires_grad_()
    ours = categorical_logprob_entropy(x, actions_s, temperature=0.8, mask=mask_t)
    check_against(ours, masked_categorical_reference(y, actions, mask, temperature=0.8), x, y)


def test_masked_categorical_leading_dims_and_int32_actions(device):
    logits, actions, mask = masked_case(6 * 5, 11, device, seed=3)
    logits, actions, mask = logits.reshape(6, 5, 11), actions.reshape(6, 5).int(), mask.reshape(6, 5, 11)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = categorical_logprob_entropy(x, actions, mask=mask)
    assert ours[0].shape == ours[1].shape == (6, 5)
    check_against(ours, masked_categorical_reference(y, actions, mask), x, y)


@pytest.mark.parametrize("A", [9, 1300])
def test_illegal_logits_are_never_read(device, A):
    """NaN, +inf or huge logits at illegal actions change nothing: the same outputs and gradients,
    bit for bit, as with ordinary values there."""
    logits, actions, mask = masked_case(64, A, device, seed=11)
    junk = logits.clone()
    junk[~mask] = torch.tensor([NAN, INF, -INF, 1e30], dtype=F64, device=device).repeat(A * 64)[: int((~mask).sum())]
    results = []
    for values in (logits, junk):
        x = values.clone().requires_grad_()
        out = categorical_logprob_entropy(x, actions, mask=mask)
        results.append(list(out) + list(weighted_grads(out, [x])))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert all(t.isfinite().all() for t in results[1])


@pytest.mark.parametrize("A", [5, 1300])
def test_all_true_mask_equals_no_mask(device, A):
    logits, actions, _ = masked_case(33, A, device, seed=5)
    out = []
    for mask in (None, torch.ones(logits.shape, dtype=torch.bool, device=device)):
        x = logits.clone().requires_grad_()
        lp, ent = categorical_logprob_entropy(x, actions, temperature=1.3, mask=mask)
        out.append([lp, ent, *weighted_grads((lp, ent), [x])])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("A", [4, 1300])
@pytest.mark.parametrize("outputs", ["both", "logprob", "entropy"])
def test_fully_masked_rows_are_zero_and_never_nan(device, A, outputs):
    """A row without a legal action: log-prob 0, entropy 0 and zero gradient, whatever its action
    and its logits (NaN included), whichever outputs are differentiated."""
    logits, actions, mask = masked_case(20, A, device, seed=2)
    mask[::2] = False
    logits[0] = NAN
    logits[2, :2] = INF
    actions[::2] = torch.arange(10, device=device) % A
    x = logits.clone().requires_grad_()
    lp, ent = categorical_logprob_entropy(x, actions, mask=mask)
    picked = {"both": [lp, ent], "logprob": [lp], "entropy": [ent]}[outputs]
    (grad,) = torch.autograd.grad(sum(t.sum() for t in picked), x)
    assert (lp[::2] == 0).all() and (ent[::2] == 0).all() and (grad[::2] == 0).all()
    assert lp.isfinite().all() and ent.isfinite().all() and grad.isfinite().all()


def test_legal_nonfinite_logits_follow_log_softmax(device):
    """The rules for non-finite logits hold among the legal ones: a legal -inf next to a finite
    legal logit has p = 0; a legal NaN or +inf, or only -inf legal logits, make the row NaN; an
    illegal logit's gradient stays 0 either way."""
    logits = torch.tensor([[0.5, -INF, 1.0, NAN],  # the NaN is illegal: a finite row
                           [0.5, NAN, 1.0, 2.0],  # a legal NaN
                           [-INF, -INF, 3.0, 1.0],  # only -inf legal logits
                           [INF, 0.0, 1.0, 2.0]],  # a legal +inf
                          dtype=F64, device=device)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool, device=device)
    actions = torch.tensor([2, 0, 0, 1], device=device)
    x = logits.clone().requires_grad_()
    lp, ent = categorical_logprob_entropy(x, actions, mask=mask)
    (grad,) = weighted_grads((lp, ent), [x])
    legal_row = torch.softmax(torch.tensor([0.5, 1.0], dtype=F64), -1)
    torch.testing.assert_close(lp[0].cpu(), legal_row[1].log(), **TIGHT)
    torch.testing.assert_close(ent[0].cpu(), -(legal_row * legal_row.log()).sum(), **TIGHT)
    assert grad[0].isfinite().all() and grad[0, 1] == 0 and grad[0, 3] == 0
    assert lp[1:].isnan().all() and ent[1:].isnan().all()
    assert (grad[~mask] == 0).all() and grad[1:][mask[1:]].isnan().all()


def test_illegal_action_is_a_clear_error():
    logits, actions, mask = masked_case(12, 5, "cpu", seed=4)
    row = 3
    assert mask[row].any()
    bad = int((~mask[row]).nonzero()[0]) if (~mask[row]).any() else None
    if bad is None:
        mask[row, 0] = False
        bad = 0
    actions[row] = bad
    with pytest.raises(ValueError, match=rf"actions holds {bad} at index \({row},\), an action that mask marks "
                                         r"illegal \(and 0 more such\)"):
        categorical_logprob_entropy(logits, actions, mask=mask)
    with pytest.raises(ValueError, match="mask marks illegal"):  # the autograd path too
        categorical_logprob_entropy(logits.clone().requires_grad_(), actions, mask=mask)
    actions[row] = 5
    with pytest.raises(IndexError, match=r"actions holds 5 .* expected indices in \[0, 5\)"):
        categorical_logprob_entropy(logits, actions, mask=mask)


@needs_cuda
@pytest.mark.cuda
def test_illegal_action_on_cuda_is_nan_with_zero_gradient():
    logits, actions, mask = masked_case(40, 7, "cuda", seed=8)
    illegal_row = 1
    assert mask[illegal_row].any() and not mask[illegal_row].all()
    actions[illegal_row] = int((~mask[illegal_row]).nonzero()[0])
    x = logits.clone().requires_grad_()
    lp, ent = categorical_logprob_entropy(x, actions, mask=mask)
    (grad,) = weighted_grads((lp, ent), [x])
    assert lp[illegal_row].isnan() and ent[illegal_row].isnan() and (grad[illegal_row] == 0).all()
    others = torch.arange(40, device="cuda") != illegal_row
    y = logits.clone().requires_grad_()
    ref = masked_categorical_reference(y, actions, mask)
    (ref_grad,) = weighted_grads(ref, [y])
    torch.testing.assert_close(lp[others], ref[0][others], **TIGHT)
    torch.testing.assert_close(grad[others], ref_grad[others], **TIGHT)


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda m: m.int(), TypeError, ["mask", "int32", "bool"]),
        (lambda m: m[:, :3], ValueError, ["mask", "(5, 3)", "(5, 4)"]),
        (lambda m: m.tolist(), TypeError, ["mask", "list"]),
        (lambda m: m.numpy(), TypeError, ["mask", "numpy"]),
    ],
)
def test_bad_mask_is_a_clear_error(make, error, words):
    logits, actions, mask = masked_case(5, 4, "cpu", seed=0)
    for call in (lambda m: categorical_logprob_entropy(logits, actions, mask=m),
                 lambda m: categorical_sample(logits, mask=m)):
        with pytest.raises(error) as info:
            call(make(mask))
        for word in words:
            assert word in str(info.value), (word, str(info.value))


# ---------------------------------------------------------------- low precision

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]


def assert_one_rounding(got, exact, dtype):
    """Within one rounding of the dtype of the float64 result on the same inputs, plus float32's
    own error where a result cancels to near 0 (1e-5 of the largest)."""
    got, exact = got.detach().cpu().double(), exact.detach().cpu().double()
    assert got.isfinite().all() and exact.isfinite().all()
    bound = torch.finfo(dtype).eps * exact.abs() + 1e-5 * exact.abs().max() + 1e-30
    assert ((got - exact).abs() <= bound).all(), ((got - exact).abs() - bound).max()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("A", [18, 700])
def test_masked_categorical_low_precision(device, dtype, A):
    logits, actions, mask = masked_case(97, A, device, seed=A, dtype=dtype)
    x = logits.clone().requires_grad_()
    lp, ent = categorical_logprob_entropy(x, actions, mask=mask)
    assert lp.dtype == ent.dtype == dtype
    w1, w2 = (torch.randn(97, generator=torch.Generator().manual_seed(i), dtype=F64).to(dtype).to(device)
              for i in range(2))
    (grad,) = torch.autograd.grad((lp.float() * w1.float() + ent.float() * w2.float()).sum(), x)
    y = logits.double().requires_grad_()
    exact = masked_categorical_reference(y, actions, mask)
    (exact_grad,) = torch.autograd.grad((exact[0] * w1.double() + exact[1] * w2.double()).sum(), y)
    assert_one_rounding(lp, exact[0], dtype)
    assert_one_rounding(ent, exact[1], dtype)
    assert_one_rounding(grad, exact_grad, dtype)
    assert (grad[~mask] == 0).all()


# ---------------------------------------------------------------- masked sampling


def test_masked_sample_never_illegal_and_follows_the_legal_softmax(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=g, dtype=F64).to(device)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]],
                        dtype=torch.bool, device=device)
    n = 4000
    rep_logits, rep_mask = logits.repeat(n, 1), mask.repeat(n, 1)
    gen = torch.Generator(device=device).manual_seed(1)
    action, lp, ent = categorical_sample(rep_logits, generator=gen, mask=rep_mask)
    assert rep_mask.gather(-1, action[:, None]).all()
    ref_lp, ref_ent = masked_categorical_reference(rep_logits, action, rep_mask)
    torch.testing.assert_close(lp, ref_lp, **TIGHT)
    torch.testing.assert_close(ent, ref_ent, **TIGHT)
    counts = torch.zeros(4, 6, dtype=F64)
    counts.index_put_((torch.arange(4).repeat(n), action.cpu()), torch.ones(4 * n, dtype=F64), accumulate=True)
    p = torch.where(mask.cpu(), logits.cpu(), -INF).softmax(-1)
    assert (counts / n - p).abs().max() < 0.03  # 4000 draws per row: a few standard errors


@pytest.mark.parametrize("A", [5, 1300])
def test_masked_sample_paths_agree_on_edge_rows(device, A):
    """The fused CPU kernel and the torch argmax (autograd recording) pick alike from the same
    noise: legal actions only; a row with no legal action takes 0 (log-prob and entropy 0); a row
    whose legal logits are all -inf takes its first legal action (NaN log-prob); a legal NaN is
    torch.argmax's pick."""
    logits, _, mask = masked_case(12, A, device, seed=6)
    mask[0] = False
    mask[1] = False
    mask[1, 3] = mask[1, 4] = True
    logits[1, 3:5] = -INF
    logits[2, :] = NAN  # illegal NaN everywhere...
    mask[2] = False
    mask[2, 1] = mask[2, 2] = True
    logits[2, 1], logits[2, 2] = 0.0, NAN  # ... and one legal NaN
    picks = []
    for records in (False, True):
        gen = torch.Generator(device=device).manual_seed(3)
        action, lp, ent = categorical_sample(logits.clone().requires_grad_(records), generator=gen, mask=mask)
        picks.append(action)
        assert action[0] == 0 and lp[0] == 0 and ent[0] == 0
        assert action[1] == 3 and lp[1].isnan()
        assert action[2] == 2 and lp[2].isnan()
        has_legal = mask.any(-1)
        has_legal[:3] = False
        assert mask[has_legal].gather(-1, action[has_legal, None]).all() and lp[3:].isfinite().all()
    assert torch.equal(picks[0], picks[1])


# ---------------------------------------------------------------- multi-discrete

NVECS = [pytest.param([3, 3, 3, 3], id="3x4"), pytest.param([1, 5, 2], id="1-5-2")]


def multi_case(rows, nvec, device, seed, masked, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    A = sum(nvec)
    logits = (torch.randn(rows, A, generator=g, dtype=F64) * 2).to(dtype=dtype, device=device)
    if masked:
        parts = [random_mask((rows, n), device, seed + k, fully_masked_every=5 + k) for k, n in enumerate(nvec)]
        mask = torch.cat(parts, -1)
        actions = torch.stack([legal_actions(m, seed + k) for k, m in enumerate(parts)], -1)
    else:
        mask = None
        actions = torch.stack([torch.randint(0, n, (rows,), generator=g) for n in nvec], -1).to(device)
    return logits, actions, mask


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("nvec", NVECS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("reduce", [True, False], ids=["summed", "per-component"])
def test_multi_categorical_matches_reference(device, rows, nvec, masked, reduce):
    logits, actions, mask = multi_case(rows, nvec, device, seed=rows + len(nvec), masked=masked)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = multi_categorical_logprob_entropy(x, actions, nvec, mask=mask, reduce=reduce)
    theirs = multi_categorical_reference(y, actions, nvec, mask, reduce)
    assert ours[0].shape == ((rows,) if reduce else (rows, len(nvec)))
    grad = check_against(ours, theirs, x, y)
    assert grad.isfinite().all()
    if masked:
        assert (grad[~mask] == 0).all()


def test_multi_categorical_matches_per_component_torch_distributions(device):
    nvec = [4, 2, 7]
    logits, actions, _ = multi_case(97, nvec, device, seed=1, masked=False)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    dists = [torch.distributions.Categorical(logits=part) for part in y.split(nvec, -1)]
    theirs = (torch.stack([d.log_prob(a) for d, a in zip(dists, actions.unbind(-1))], -1).sum(-1),
              torch.stack([d.entropy() for d in dists], -1).sum(-1))
    check_against(multi_categorical_logprob_entropy(x, actions, nvec), theirs, x, y)


def test_multi_categorical_wide_components_and_strided_views(device):
    """Components wider than a vector and than a tile row, logits with strided columns, actions
    as a transposed [K, rows] buffer and a transposed mask."""
    nvec, rows = [70, 1, 130, 3], 97
    logits, actions, mask = multi_case(rows, nvec, device, seed=9, masked=True)
    A = sum(nvec)
    wide = torch.zeros(rows, 3 * A, dtype=F64, device=device)
    wide[:, ::3] = logits
    x = wide[:, ::3].requires_grad_()
    actions_t = actions.T.contiguous().T
    mask_t = mask.T.contiguous().T
    y = logits.clone().requires_grad_()
    for reduce in (True, False):
        ours = multi_categorical_logprob_entropy(x, actions_t, np.array(nvec), mask=mask_t, reduce=reduce)
        check_against(ours, multi_categorical_reference(y, actions, nvec, mask, reduce), x, y)


def test_multi_categorical_leading_dims(device):
    nvec = (2, 3)
    logits, actions, mask = multi_case(4 * 6, list(nvec), device, seed=2, masked=True)
    logits, actions, mask = logits.reshape(4, 6, 5), actions.reshape(4, 6, 2), mask.reshape(4, 6, 5)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = multi_categorical_logprob_entropy(x, actions, torch.tensor(nvec), mask=mask, reduce=False)
    assert ours[0].shape == (4, 6, 2)
    check_against(ours, multi_categorical_reference(y, actions, nvec, mask, False), x, y)


def test_multi_categorical_fully_masked_component(device):
    nvec = [3, 2, 4]
    logits, actions, mask = multi_case(10, nvec, device, seed=3, masked=True)
    mask[:, 3:5] = False  # component 1: nothing legal, in every row
    logits[:, 3:5] = NAN
    x = logits.clone().requires_grad_()
    lp, ent = multi_categorical_logprob_entropy(x, actions, nvec, mask=mask, reduce=False)
    (grad,) = weighted_grads((lp, ent), [x])
    assert (lp[:, 1] == 0).all() and (ent[:, 1] == 0).all() and (grad[:, 3:5] == 0).all()
    assert lp.isfinite().all() and ent.isfinite().all() and grad.isfinite().all()


def test_multi_categorical_bad_actions_are_clear_errors():
    nvec = [3, 5, 2]
    logits, actions, mask = multi_case(8, nvec, "cpu", seed=4, masked=True)
    bad_actions = actions.clone()
    bad_actions[2, 1] = 5
    with pytest.raises(IndexError, match=r"actions holds 5 at index \(2, 1\) \(and 0 more out of range\); expected "
                                         r"component k's action in \[0, nvec\[k\]\) \(nvec = \[3, 5, 2\]\)"):
        multi_categorical_logprob_entropy(logits, bad_actions, nvec)
    row = 1
    mask[row, 3:8] = torch.tensor([True, False, True, True, True])
    bad_actions = actions.clone()
    bad_actions[row, 1] = 1
    with pytest.raises(ValueError, match=r"actions holds 1 at index \(1, 1\), an action that mask marks illegal"):
        multi_categorical_logprob_entropy(logits, bad_actions, nvec, mask=mask)
    with pytest.raises(ValueError, match=r"mask marks illegal"):
        multi_categorical_logprob_entropy(logits.clone().requires_grad_(), bad_actions, nvec, mask=mask)


@pytest.mark.parametrize(
    "nvec,error,words",
    [
        ([3, 3, 4], ValueError, ["logits has shape (8, 9)", "sum(nvec) = 10"]),
        ([3, 0, 6], ValueError, ["nvec", "every size must be >= 1", "[3, 0, 6]"]),
        ([3.0, 6], TypeError, ["nvec", "float"]),
        (9, TypeError, ["nvec", "int"]),
        (np.array([[3, 6]]), ValueError, ["nvec", "1-D", "(1, 2)"]),
        (torch.tensor([3.0, 6.0]), TypeError, ["nvec", "torch.float32"]),
    ],
)
def test_multi_categorical_bad_nvec(nvec, error, words):
    logits = torch.zeros(8, 9)
    actions = torch.zeros(8, 2, dtype=torch.long)
    with pytest.raises(error) as info:
        multi_categorical_logprob_entropy(logits, actions, nvec)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    with pytest.raises(ValueError, match=r"actions has shape \(8, 3\); expected \(8, 2\)"):
        multi_categorical_logprob_entropy(logits, torch.zeros(8, 3, dtype=torch.long), [4, 5])
    with pytest.raises(TypeError, match="reduce must be a bool"):
        multi_categorical_logprob_entropy(logits, actions, [4, 5], reduce=1)


@pytest.mark.parametrize("dtype", LOW)
def test_multi_categorical_low_precision(device, dtype):
    nvec = [3, 5, 2]
    logits, actions, mask = multi_case(97, nvec, device, seed=12, masked=True, dtype=dtype)
    x = logits.clone().requires_grad_()
    lp, ent = multi_categorical_logprob_entropy(x, actions, nvec, mask=mask, reduce=False)
    assert lp.dtype == dtype
    (grad,) = torch.autograd.grad(lp.float().sum() + 0.5 * ent.float().sum(), x)
    y = logits.double().requires_grad_()
    exact = multi_categorical_reference(y, actions, nvec, mask, False)
    (exact_grad,) = torch.autograd.grad(exact[0].sum() + 0.5 * exact[1].sum(), y)
    assert_one_rounding(lp, exact[0], dtype)
    assert_one_rounding(ent, exact[1], dtype)
    assert_one_rounding(grad, exact_grad, dtype)


@pytest.mark.parametrize("nvec", NVECS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_multi_categorical_sample(device, nvec, masked):
    """Legal actions only, each in its component's range; the fused CPU kernel and the torch argmax
    give the same actions from the same noise; log-prob and entropy are the head's."""
    logits, _, mask = multi_case(257, nvec, device, seed=5, masked=masked)
    picks = []
    for records in (False, True):
        gen = torch.Generator(device=device).manual_seed(7)
        actions, lp, ent = multi_categorical_sample(logits.clone().requires_grad_(records), nvec, mask=mask,
                                                    generator=gen)
        assert actions.shape == (257, len(nvec)) and actions.dtype == torch.int64
        assert ((actions >= 0) & (actions < torch.tensor(nvec, device=device))).all()
        ref = multi_categorical_reference(logits, actions, nvec, mask)
        torch.testing.assert_close(lp.detach(), ref[0], **TIGHT)
        torch.testing.assert_close(ent.detach(), ref[1], **TIGHT)
        if masked:
            offsets = torch.tensor([0, *np.cumsum(nvec)[:-1].tolist()], device=device)
            legal = mask.gather(-1, actions + offsets)
            has_legal = torch.stack([m.any(-1) for m in mask.split(nvec, -1)], -1)
            assert legal[has_legal].all() and (actions[~has_legal] == 0).all()
        picks.append(actions)
    assert torch.equal(picks[0], picks[1])


def test_multi_categorical_sample_frequencies(device):
    nvec = [3, 2]
    logits = torch.tensor([[0.3, -1.0, 1.2, 0.5, -0.5]], dtype=F64, device=device).repeat(6000, 1)
    mask = torch.tensor([[True, False, True, True, True]], device=device).repeat(6000, 1)
    gen = torch.Generator(device=device).manual_seed(0)
    actions, _, _ = multi_categorical_sample(logits, nvec, mask=mask, generator=gen)
    first = torch.bincount(actions[:, 0].cpu(), minlength=3).double() / 6000
    second = torch.bincount(actions[:, 1].cpu(), minlength=2).double() / 6000
    want_first = torch.tensor([0.3, -INF, 1.2], dtype=F64).softmax(-1)
    want_second = torch.tensor([0.5, -0.5], dtype=F64).softmax(-1)
    assert (first - want_first).abs().max() < 0.03 and (second - want_second).abs().max() < 0.03


# ---------------------------------------------------------------- tanh-squashed Gaussian


def tanh_case(rows, D, device, seed, shared, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(rows, D, generator=g, dtype=F64)
    log_std = torch.randn(D if shared else (rows, D), generator=g, dtype=F64) * 0.5 - 0.3
    u = mean + log_std.exp() * torch.randn(rows, D, generator=g, dtype=F64)
    to = dict(dtype=dtype, device=device)
    return mean.to(**to), log_std.to(**to), torch.tanh(u).to(**to), u.to(**to)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("D", [1, 6])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-row"])
@pytest.mark.parametrize("given", ["actions", "pre_tanh"])
def test_tanh_normal_matches_reference(device, rows, D, shared, given):
    mean, log_std, actions, u = tanh_case(rows, D, device, seed=rows + D, shared=shared)
    pre_tanh = u if given == "pre_tanh" else None
    m1, s1 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    m2, s2 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    ours = tanh_normal_logprob_entropy(m1, s1, actions, pre_tanh=pre_tanh)
    theirs = tanh_normal_reference(m2, s2, actions, pre_tanh)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TIGHT)
    for a, b in zip(weighted_grads(ours, [m1, s1]), weighted_grads(theirs, [m2, s2])):
        torch.testing.assert_close(a, b, **TIGHT)


def test_tanh_normal_matches_torch_transformed_distribution(device):
    mean, log_std, actions, u = tanh_case(97, 6, device, seed=3, shared=True)
    m1, s1 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    m2, s2 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    ours = tanh_normal_logprob_entropy(m1, s1, actions)
    base = torch.distributions.Normal(m2, s2.exp())
    dist = torch.distributions.TransformedDistribution(base, [torch.distributions.TanhTransform()])
    theirs = (dist.log_prob(actions).sum(-1), base.entropy().sum(-1))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)  # torch's atanh of the action: no clamp
    for a, b in zip(weighted_grads(ours, [m1, s1]), weighted_grads(theirs, [m2, s2])):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_tanh_normal_saturated_actions_stay_finite(device, dtype):
    """Actions at or beyond +-1 are clamped to 1 - eps of the compute dtype before atanh; a large
    pre-squash sample gives the exact log-det (-2 log cosh u), where log(1 - tanh(u)^2) is -inf."""
    mean = torch.zeros(4, 2, dtype=dtype, device=device, requires_grad=True)
    log_std = torch.zeros(2, dtype=dtype, device=device, requires_grad=True)
    actions = torch.tensor([[1.0, -1.0], [1.5, 0.0], [-1.0, 0.999], [0.0, 0.0]], dtype=dtype, device=device)
    lp, ent = tanh_normal_logprob_entropy(mean, log_std, actions)
    grads = torch.autograd.grad((lp + ent).sum(), [mean, log_std])
    assert lp.isfinite().all() and all(g.isfinite().all() for g in grads)
    eps = torch.finfo(dtype).eps
    u_max = math.atanh(1 - eps)
    assert abs(u_max - (8.317766 if dtype == torch.float32 else 18.368400)) < 1e-3
    clamped = actions.double().clamp(-1 + eps, 1 - eps)
    want = tanh_normal_reference(mean.detach().double(), log_std.detach().double(), clamped, torch.atanh(clamped))
    tol = TIGHT if dtype == F64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lp.double(), want[0], **tol)

    u = torch.tensor([[30.0, -45.0], [0.5, 300.0]], dtype=F64, device=device)
    m = torch.zeros(2, 2, dtype=F64, device=device)
    lp_u, _ = tanh_normal_logprob_entropy(m, torch.zeros(2, dtype=F64, device=device), torch.tanh(u), pre_tanh=u)
    torch.testing.assert_close(lp_u, tanh_normal_reference(m, torch.zeros(2, dtype=F64, device=device), None, u)[0],
                               **TIGHT)
    assert lp_u.isfinite().all()


def test_tanh_normal_pre_tanh_is_what_is_read(device):
    """With pre_tanh the actions are not read: NaN actions change nothing."""
    mean, log_std, actions, u = tanh_case(33, 3, device, seed=4, shared=False)
    a = tanh_normal_logprob_entropy(mean, log_std, actions, pre_tanh=u)
    b = tanh_normal_logprob_entropy(mean, log_std, torch.full_like(actions, NAN), pre_tanh=u)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_tanh_normal_entropy_is_the_gaussians(device):
    mean, log_std, actions, _ = tanh_case(97, 4, device, seed=5, shared=True)
    m1, s1 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    _, ent = tanh_normal_logprob_entropy(m1, s1, actions)
    torch.testing.assert_close(ent, normal_reference(mean, log_std, actions)[1], **TIGHT)
    grad_mean, grad_log_std = torch.autograd.grad(ent.sum(), [m1, s1])
    assert torch.equal(grad_mean, torch.zeros_like(mean))
    torch.testing.assert_close(grad_log_std, torch.full_like(log_std, 97.0), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_tanh_normal_low_precision(device, dtype):
    mean, log_std, actions, u = tanh_case(97, 6, device, seed=6, shared=True, dtype=dtype)
    actions = actions.clamp(-0.99, 0.99)  # away from the bounds, where atanh of a 16-bit action is far from u
    m1, s1 = mean.clone().requires_grad_(), log_std.clone().requires_grad_()
    lp, ent = tanh_normal_logprob_entropy(m1, s1, actions)
    assert lp.dtype == ent.dtype == dtype
    grads = torch.autograd.grad(lp.float().sum() + ent.float().sum(), [m1, s1])
    m2, s2 = mean.double().requires_grad_(), log_std.double().requires_grad_()
    exact = tanh_normal_reference(m2, s2, actions.double().clamp(-1 + 2 ** -23, 1 - 2 ** -23))
    exact_grads = torch.autograd.grad(exact[0].sum() + exact[1].sum(), [m2, s2])
    assert_one_rounding(lp, exact[0], dtype)
    assert_one_rounding(ent, exact[1], dtype)
    for g, e in zip(grads, exact_grads):
        assert_one_rounding(g, e, dtype)


def test_tanh_normal_bad_input():
    mean, log_std, actions = torch.zeros(4, 3), torch.zeros(3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"pre_tanh has shape \(4, 2\); expected \(4, 3\)"):
        tanh_normal_logprob_entropy(mean, log_std, actions, pre_tanh=torch.zeros(4, 2))
    with pytest.raises(TypeError, match=r"pre_tanh has dtype torch.float64; expected torch.float32"):
        tanh_normal_logprob_entropy(mean, log_std, actions, pre_tanh=torch.zeros(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"log_std has shape \(2,\)"):
        tanh_normal_logprob_entropy(mean, torch.zeros(2), actions)
    with pytest.raises(TypeError, match=r"fastppo.tanh_normal_logprob_entropy: mean has dtype torch.int64"):
        tanh_normal_logprob_entropy(mean.long(), log_std, actions)


# ---------------------------------------------------------------- torch integration


def test_opcheck_new_heads():
    logits, actions, mask = masked_case(9, 5, "cpu", seed=1)
    torch.library.opcheck(torch.ops.fastppo.categorical_logprob_entropy.default,
                          (logits.clone().requires_grad_(), actions, 1.1, mask))
    nvec = [1, 5, 2]
    m_logits, m_actions, m_mask = multi_case(7, nvec, "cpu", seed=2, masked=True)
    for mask_arg in (None, m_mask):
        for reduce in (True, False):
            torch.library.opcheck(torch.ops.fastppo.multi_categorical_logprob_entropy.default,
                                  (m_logits.clone().requires_grad_(), m_actions, nvec, mask_arg, reduce))
    mean, log_std, t_actions, u = tanh_case(6, 3, "cpu", seed=3, shared=True)
    for pre_tanh in (None, u):
        torch.library.opcheck(torch.ops.fastppo.tanh_normal_logprob_entropy.default,
                              (mean.clone().requires_grad_(), log_std.clone().requires_grad_(), t_actions, pre_tanh))


def test_new_heads_under_torch_compile_fullgraph():
    logits, actions, mask = masked_case(16, 9, "cpu", seed=6)
    nvec = [3, 3, 3]
    m_logits, m_actions, m_mask = multi_case(16, nvec, "cpu", seed=7, masked=True)
    mean, log_std, t_actions, u = tanh_case(16, 4, "cpu", seed=8, shared=True)

    def step(logits, m_logits, mean, log_std):
        lp, ent = categorical_logprob_entropy(logits, actions, mask=mask)
        mlp, ment = multi_categorical_logprob_entropy(m_logits, m_actions, nvec, mask=m_mask)
        clp, cent = multi_categorical_logprob_entropy(m_logits, m_actions, nvec, reduce=False)
        tlp, tent = tanh_normal_logprob_entropy(mean, log_std, t_actions)
        ulp, _ = tanh_normal_logprob_entropy(mean, log_std, t_actions, pre_tanh=u)
        return ((lp * 0.3 + ent).sum() + (mlp - 0.2 * ment).sum() + (clp[:, 1] + cent[:, 2]).sum()
                + (tlp - 0.1 * tent).sum() + 0.5 * ulp.sum())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (logits, m_logits, mean, log_std)]
        out = fn(*leaves)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0)


def test_samplers_under_torch_compile_fullgraph():
    logits, _, mask = masked_case(16, 9, "cpu", seed=6)
    nvec = [1, 5, 2]
    m_logits, _, m_mask = multi_case(16, nvec, "cpu", seed=7, masked=True)

    def sample(logits, m_logits):
        action, lp, _ = categorical_sample(logits, mask=mask)
        actions, mlp, _ = multi_categorical_sample(m_logits, nvec, mask=m_mask)
        return action, actions, lp, mlp

    compiled = torch.compile(sample, fullgraph=True, backend="aot_eager")
    action, actions, lp, mlp = compiled(logits, m_logits)
    has_legal = mask.any(-1)
    assert mask[has_legal].gather(-1, action[has_legal, None]).all() and (action[~has_legal] == 0).all()
    torch.testing.assert_close(lp, masked_categorical_reference(logits, action, mask)[0], **TIGHT)
    torch.testing.assert_close(mlp, multi_categorical_reference(m_logits, actions, nvec, m_mask)[0], **TIGHT)


def test_public_names():
    for name in ("multi_categorical_logprob_entropy", "multi_categorical_sample", "tanh_normal_logprob_entropy"):
        assert name in fastppo.__all__ and callable(getattr(fastppo, name))
