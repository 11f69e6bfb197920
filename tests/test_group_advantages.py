"""fastppo.rlhf.group_advantages against a plain float64 reference written one group at a time:
every estimator on awkward sizes, equal scores, NaN, numpy, CUDA, low precision, the per-token
broadcast under a mask, TRL's formulas, torch.compile and bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

from fastppo.rlhf import group_advantages  # noqa: E402
from references import group_advantages_reference as reference  # noqa: E402

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
# (B, group_size): one response, pairs, threes, TRL's usual 16, a prime group, a large batch
SIZES = [(1, 1), (2, 2), (6, 3), (96, 3), (80, 16), (291, 97), (1024, 2), (1024, 16), (1024, 1024)]


def random_scores(n: int, seed: int, dtype=torch.float64, device="cpu", offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).to(device)


def as_float64(x) -> np.ndarray:
    return x.double().cpu().numpy() if isinstance(x, torch.Tensor) else x.astype(np.float64)


def sizes_for(estimator: str):
    return [(n, g) for n, g in SIZES if not (estimator == "rloo" and g == 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_the_reference(estimator, dtype, tol, device):
    for n, g in sizes_for(estimator):
        for eps in (1e-6, 0.0, 0.5):
            scores = random_scores(n, seed=n + g, dtype=dtype, device=device)
            got = group_advantages(scores, g, estimator, eps=eps)
            assert got.shape == (n,) and got.dtype == dtype and got.device == scores.device
            want = reference(as_float64(scores), g, estimator, eps)
            np.testing.assert_allclose(as_float64(got), want, rtol=tol, atol=tol, err_msg=f"B {n}, group_size {g}")


def test_defaults_are_grpo_with_eps_1e6():
    scores = random_scores(48, seed=1)
    np.testing.assert_allclose(group_advantages(scores, 4).numpy(), reference(scores.numpy(), 4, "grpo", 1e-6),
                               rtol=1e-12, atol=1e-12)
    assert not torch.equal(group_advantages(scores, 4, eps=1e-1), group_advantages(scores, 4))  # eps is used


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_group_of_equal_scores_gives_exact_zeros(estimator, device):
    # Values that are not binary fractions and an offset: a mean of equal numbers need not round
    # back to them, and (r - mean) / (std + eps) would then be rounding noise blown up by 1 / eps.
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for g in (2, 3, 7, 16, 97):
            for value in (0.1, -3.3, 1e4 + 0.7, 0.0):
                scores = torch.cat([torch.full((g,), value), random_scores(g, seed=g)]).to(dtype).to(device)
                for eps in (1e-6, 0.0):
                    got = group_advantages(scores, g, estimator, eps=eps)
                    assert torch.equal(got[:g], torch.zeros_like(got[:g])), (dtype, g, value, eps, got[:g])
                    assert torch.isfinite(got).all() and got[g:].abs().sum() > 0


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
def test_group_size_one_gives_zeros(estimator):
    scores = random_scores(37, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that one number has no degree of freedom
        assert torch.isnan(torch.std(scores[:1]))  # torch's unbiased std of one number: 0/0
    for eps in (1e-6, 0.0):
        assert torch.equal(group_advantages(scores, 1, estimator, eps=eps), torch.zeros_like(scores))
    assert torch.equal(group_advantages(scores[:1], 1, estimator), torch.zeros(1, dtype=scores.dtype))  # B = 1


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nan_propagates_to_its_group_only(estimator):
    for g in (2, 3, 16):
        scores = random_scores(6 * g, seed=g)
        scores[2 * g + 1] = math.nan
        got = group_advantages(scores, g, estimator).numpy()
        assert np.isnan(got[2 * g:3 * g]).all()
        others = np.r_[0:2 * g, 3 * g:6 * g]
        want = reference(scores.numpy(), g, estimator, 1e-6)
        np.testing.assert_allclose(got[others], want[others], rtol=1e-12, atol=1e-12)
    nan = group_advantages(torch.tensor([1.0, math.nan, 3.0]), 1, "grpo", eps=0.0)  # group_size 1, eps 0 too
    assert torch.equal(torch.isnan(nan), torch.tensor([False, True, False]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_numpy_scores_give_numpy_advantages(estimator, dtype):
    scores = random_scores(2 * 96, seed=5).numpy().astype(dtype)
    view = scores[::2]  # a strided view
    view.flags.writeable = False  # read-only input is read, not written (and torch is not asked to share it)
    got = group_advantages(view, 3, estimator)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (96,)
    np.testing.assert_array_equal(got, group_advantages(torch.from_numpy(view.copy()), 3, estimator).numpy())
    tol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(got.astype(np.float64), reference(view.astype(np.float64), 3, estimator, 1e-6),
                               rtol=tol, atol=tol)
    swapped = view.astype(np.dtype(dtype).newbyteorder())  # another byte order
    np.testing.assert_array_equal(group_advantages(swapped, 3, estimator), got)


def test_strided_tensor_views_are_read_in_place():
    base = random_scores(3 * 64, seed=6, dtype=torch.float32)
    view = base[1::3]
    np.testing.assert_array_equal(group_advantages(view, 16).numpy(), group_advantages(view.contiguous(), 16).numpy())
    assert torch.equal(base, random_scores(3 * 64, seed=6, dtype=torch.float32))  # input untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_low_precision_scores_are_computed_in_float32(estimator, dtype, device):
    # Scores near 100 (bf16's spacing there is 0.5): computed in their own precision, the mean and
    # the deviations from it would be off by that spacing; computed in float32 and rounded once at
    # the end, each advantage is the float64 value of the rounded scores within one ulp of its dtype.
    scores = random_scores(1024, seed=7, dtype=dtype, device=device, offset=100.0)
    got = group_advantages(scores, 16, estimator)
    assert got.dtype == dtype and got.device == scores.device
    want = torch.from_numpy(reference(as_float64(scores), 16, estimator, 1e-6))
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    err = (got.double().cpu() - want).abs()
    assert (err <= ulp * want.abs() + 1e-6).all(), float(err.max())
    naive = scores.reshape(-1, 16) - scores.reshape(-1, 16).mean(1, keepdim=True)  # in the scores' dtype
    if estimator == "dr_grpo" and dtype == torch.bfloat16:
        assert (naive.reshape(-1).double().cpu() - want).abs().max() > 5 * err.max()  # the test tells the two apart


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_mask_broadcasts_to_tokens(estimator, device):
    n, g, T = 24, 4, 9
    scores = random_scores(n, seed=8, device=device)
    scores[5] = math.nan  # group 1 is NaN: its selected tokens are NaN, its padding still 0
    lengths = torch.arange(n) % (T + 1)  # 0 to T tokens, an empty response among them
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    per_row = group_advantages(scores, g, estimator)
    for m in (mask, mask.to(torch.uint8), mask.double()):
        got = group_advantages(scores, g, estimator, mask=m)
        assert got.shape == (n, T) and got.dtype == scores.dtype and got.device == scores.device
        for b in range(n):
            for t in range(T):
                if t < lengths[b]:
                    assert got[b, t].item() == per_row[b].item() or (math.isnan(per_row[b]) and math.isnan(got[b, t]))
                else:
                    assert got[b, t].item() == 0.0
    numpy = group_advantages(scores.cpu().numpy(), g, estimator, mask=mask.cpu().numpy())
    assert isinstance(numpy, np.ndarray)
    np.testing.assert_array_equal(numpy, group_advantages(scores, g, estimator, mask=mask).cpu().numpy())


@pytest.mark.parametrize("estimator,trl_setting", [("grpo", "group"), ("dr_grpo", "none"), ("rloo", "rloo")])
def test_equals_trls_formulas(estimator, trl_setting):
    """TRL's GRPOTrainer (scale_rewards="group" / "none", eps 1e-4) and RLOOTrainer
    (normalize_advantages=False, rewards already shaped), as their formulas read, on TRL's layout."""
    g, rewards = 8, random_scores(64, seed=9, dtype=torch.float32)
    grouped = rewards.view(-1, g)
    if trl_setting == "rloo":
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (g - 1)
        trl = (grouped - baseline).view(-1)
    else:
        mean = grouped.mean(1).repeat_interleave(g)
        trl = rewards - mean
        if trl_setting == "group":
            trl = trl / (grouped.std(1).repeat_interleave(g) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, g, estimator, eps=1e-4), trl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_compile_fullgraph_matches_eager(estimator):
    scores = random_scores(64, seed=10, dtype=torch.float32)
    mask = torch.rand((64, 5), generator=torch.Generator().manual_seed(0)) < 0.7

    def step(scores, mask):
        return group_advantages(scores, 8, estimator), group_advantages(scores, 8, estimator, mask=mask)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for eager, comp in zip(step(scores, mask), compiled(scores, mask)):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0)


FN = "fastppo.rlhf.group_advantages"


@pytest.mark.parametrize("call,error,words", [
    (lambda s: group_advantages([1.0, 2.0], 2), TypeError, ["scores must be a numpy.ndarray or a torch.Tensor", "list"]),
    (lambda s: group_advantages(s.reshape(4, 3), 3), ValueError, ["scores must have shape [B]", "(4, 3)"]),
    (lambda s: group_advantages(s.long(), 3), TypeError, ["scores has dtype torch.int64", "float32 or float64"]),
    (lambda s: group_advantages(s.numpy().astype(np.int32), 3), TypeError, ["scores has dtype int32"]),
    (lambda s: group_advantages(s, 5), ValueError, ["group_size 5 does not divide", "B = 12"]),
    (lambda s: group_advantages(s, 0), ValueError, ["group_size must be an integer >= 1, got 0"]),
    (lambda s: group_advantages(s, -3), ValueError, ["group_size must be an integer >= 1, got -3"]),
    (lambda s: group_advantages(s, 2.0), TypeError, ["group_size must be an integer >= 1, got float 2.0"]),
    (lambda s: group_advantages(s, True), TypeError, ["group_size must be an integer >= 1, got bool True"]),
    (lambda s: group_advantages(s, 3, "ppo"), ValueError, ["estimator must be one of 'grpo', 'dr_grpo', 'rloo'",
                                                           "'ppo'"]),
    (lambda s: group_advantages(s, 1, "rloo"), ValueError, ["'rloo' needs group_size >= 2", "got group_size 1"]),
    (lambda s: group_advantages(s, 3, eps=-1e-6), ValueError, ["eps must be a finite number >= 0", "-1e-06"]),
    (lambda s: group_advantages(s, 3, eps=math.nan), ValueError, ["eps must be a finite number >= 0", "nan"]),
    (lambda s: group_advantages(s, 3, eps="1e-6"), TypeError, ["eps must be a finite number >= 0", "str"]),
    (lambda s: group_advantages(s, 3, mask=np.ones((12, 4), bool)), TypeError, ["mask must be a torch.Tensor",
                                                                                "numpy.ndarray"]),
    (lambda s: group_advantages(s, 3, mask=torch.ones(11, 4, dtype=torch.bool)), ValueError,
     ["mask has shape (11, 4)", "B = 12"]),
    (lambda s: group_advantages(s, 3, mask=torch.ones((), dtype=torch.bool)), ValueError, ["mask has shape ()"]),
    (lambda s: group_advantages(s, 3, mask=torch.ones(12, 4, dtype=torch.complex64)), TypeError,
     ["mask has dtype torch.complex64"]),
    (lambda s: group_advantages(s, 3, mask=torch.ones(12, 4, dtype=torch.bool, device="meta")), ValueError,
     ["mask is on meta but scores is on cpu"]),
])
def test_bad_input_is_a_clear_error(call, error, words):
    scores = random_scores(12, seed=11, dtype=torch.float32)
    with pytest.raises(error) as info:
        call(scores)
    message = str(info.value)
    assert message.startswith(FN + ":"), message
    for word in words:
        assert word in message, (word, message)


def test_empty_batch_gives_an_empty_result():
    for estimator in ESTIMATORS:
        got = group_advantages(torch.empty(0), 4, estimator)
        assert got.shape == (0,) and got.dtype == torch.float32
