"""fastppo.rlhf kernels (KL-shaped rewards, masked whitening, token GAE, masked mean) against plain
float64 references written for clarity, on awkward sizes, every mask dtype and strided views."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

from fastppo.rlhf.kernels import kl_penalty_rewards, masked_mean, masked_whiten, token_gae  # noqa: E402

from references import kl_reference, masked_mean_reference, token_gae_reference, whiten_reference  # noqa: E402

F64 = torch.float64
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
# float32 is held to 1e-5 relative; the absolute part covers values that cancel to near zero
# (a whitened element at the mean, (exp(-d) - 1) + d of a small d).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
ESTIMATORS = ["k1", "k2", "k3"]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float64]
# [B, T]: a single token, a single row or column, odd sizes, and rows longer than a block of 1024.
SIZES = [(1, 1), (1, 97), (97, 1), (97, 97), (1025, 3), (3, 1025), (1, 1025), (2, 1025)]


# ---------------------------------------------------------------------------------------------
# Inputs.


def lengths_for(B, T, rng, offset=0):
    """Response lengths with the awkward rows first: all padding, one token at t = 0, up to T - 1."""
    lengths = rng.integers(0, T + 1, size=B)
    specials = [0, 1, T]
    for b in range(min(B, 3)):
        lengths[b] = specials[(b + offset) % 3]
    return lengths


def prefix_mask(lengths, T, device):
    return torch.arange(T, device=device).unsqueeze(0) < torch.as_tensor(lengths, device=device).unsqueeze(1)


def logprobs(B, T, seed, dtype, device, spread=0.5):
    rng = np.random.default_rng(seed)
    lp = -np.abs(rng.normal(size=(B, T))) * 3.0
    ref = lp + rng.normal(scale=spread, size=(B, T))
    scores = rng.normal(size=B) * 2.0
    return [torch.from_numpy(a).to(device=device, dtype=dtype) for a in (lp, ref, scores)]


def close(got, expected, dtype):
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().to(F64), expected, **TOL[dtype])


def check_shaped(out, expected, dtype):
    rewards, kl, last = out
    assert last.dtype == torch.int64 and last.shape == expected[2].shape
    assert torch.equal(last.cpu(), expected[2])
    close(rewards, expected[0], dtype)
    close(kl, expected[1], dtype)


# ---------------------------------------------------------------------------------------------
# kl_penalty_rewards


@pytest.mark.parametrize("B,T", SIZES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_rewards_match_reference(device, dtype, estimator, B, T):
    lp, ref, scores = logprobs(B, T, seed=B * 31 + T, dtype=dtype, device=device)
    mask = prefix_mask(lengths_for(B, T, np.random.default_rng(B + T), offset=B % 3), T, device)
    out = kl_penalty_rewards(lp, ref, mask, scores, beta=0.07, estimator=estimator)
    check_shaped(out, kl_reference(lp, ref, mask, scores, 0.07, estimator), dtype)
    assert out.rewards.device == lp.device and out.rewards.shape == (B, T)


@pytest.mark.parametrize("length", [0, 1, 50, 97])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_rewards_single_row(device, dtype, length):
    lp, ref, scores = logprobs(1, 97, seed=length, dtype=dtype, device=device)
    mask = prefix_mask([length], 97, device)
    out = kl_penalty_rewards(lp, ref, mask, scores, beta=0.1, estimator="k3")
    check_shaped(out, kl_reference(lp, ref, mask, scores, 0.1, "k3"), dtype)
    assert int(out.last_index[0]) == length - 1
    if length == 0:  # no token: no score anywhere
        assert not out.rewards.any() and not out.kl.any()


@pytest.mark.parametrize("kl_clamp", [0.05, 1.0])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_clamp(device, dtype, estimator, kl_clamp):
    lp, ref, scores = logprobs(33, 65, seed=7, dtype=dtype, device=device, spread=2.0)
    mask = prefix_mask(lengths_for(33, 65, np.random.default_rng(1)), 65, device)
    out = kl_penalty_rewards(lp, ref, mask, scores, beta=0.2, estimator=estimator, kl_clamp=kl_clamp)
    check_shaped(out, kl_reference(lp, ref, mask, scores, 0.2, estimator, kl_clamp), dtype)
    assert float(out.kl.abs().max()) <= float(torch.tensor(kl_clamp, dtype=dtype))  # the bound in the dtype
    unclamped = kl_reference(lp, ref, mask, scores, 0.2, estimator)[1]
    assert float(unclamped.abs().max()) > kl_clamp  # the bound was active somewhere


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_without_mask_or_scores(device, dtype):
    B, T = 5, 97
    lp, ref, scores = logprobs(B, T, seed=3, dtype=dtype, device=device)
    for estimator in ESTIMATORS:
        out = kl_penalty_rewards(lp, ref, estimator=estimator)
        check_shaped(out, kl_reference(lp, ref, None, None, 0.05, estimator), dtype)
        assert out.last_index.tolist() == [T - 1] * B
        out = kl_penalty_rewards(lp, ref, scores=scores, estimator=estimator)
        check_shaped(out, kl_reference(lp, ref, None, scores, 0.05, estimator), dtype)
    mask = prefix_mask(lengths_for(B, T, np.random.default_rng(0)), T, device)
    check_shaped(kl_penalty_rewards(lp, ref, mask), kl_reference(lp, ref, mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_beta_zero_leaves_only_the_scores(device, dtype):
    B, T = 6, 40
    lp, ref, scores = logprobs(B, T, seed=11, dtype=dtype, device=device)
    lengths = lengths_for(B, T, np.random.default_rng(2))
    mask = prefix_mask(lengths, T, device)
    rewards, kl, last = kl_penalty_rewards(lp, ref, mask, scores, beta=0.0, estimator="k2")
    expected = torch.zeros(B, T, dtype=F64)
    for b, n in enumerate(lengths):
        if n > 0:
            expected[b, n - 1] = float(scores[b])
    close(rewards, expected, dtype)
    close(kl, kl_reference(lp, ref, mask, estimator="k2")[1], dtype)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_every_mask_dtype(device, dtype, mask_dtype):
    B, T = 9, 130
    lp, ref, scores = logprobs(B, T, seed=5, dtype=dtype, device=device)
    # Holes in the middle of rows too: last_index is the last selected token, not a length.
    holes = torch.from_numpy(np.random.default_rng(4).random((B, T)) < 0.7).to(device)
    holes[0] = False
    holes[1, 1:] = False
    holes[2, -1] = True
    mask = holes.to(mask_dtype)
    out = kl_penalty_rewards(lp, ref, mask, scores, beta=0.05, estimator="k3")
    check_shaped(out, kl_reference(lp, ref, holes, scores, 0.05, "k3"), dtype)
    as_bool = kl_penalty_rewards(lp, ref, holes, scores, beta=0.05, estimator="k3")
    for got, want in zip(out, as_bool):
        assert torch.equal(got, want)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_strided_views_equal_contiguous_copies(device, dtype, estimator):
    B, T = 37, 101
    lp, ref, scores = logprobs(B, 2 * T, seed=9, dtype=dtype, device=device)
    lp_view = lp.T.contiguous().T[:, :T]  # a [T, B] tensor seen as [B, T]
    ref_view = ref[:, ::2]  # a step in the token dimension
    scores_full = torch.stack([scores, -scores], 1)
    scores_view = scores_full[:, 0]  # stride 2
    row = torch.from_numpy(np.random.default_rng(8).random(T) < 0.8).to(device)
    row[-1] = False
    mask_view = row.unsqueeze(0).expand(B, T)  # stride 0 over responses
    assert not (lp_view.is_contiguous() or ref_view.is_contiguous() or mask_view.is_contiguous())
    copies = [t.contiguous() for t in (lp_view, ref_view, mask_view, scores_view)]
    for mask, mask_copy in [(mask_view, copies[2]), (mask_view.T.contiguous().T, copies[2]),
                            (mask_view.to(torch.float32), copies[2].to(torch.float32))]:
        got = kl_penalty_rewards(lp_view, ref_view, mask, scores_view, beta=0.1, estimator=estimator, kl_clamp=2.0)
        want = kl_penalty_rewards(copies[0], copies[1], mask_copy, copies[3], beta=0.1, estimator=estimator, kl_clamp=2.0)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=4 * torch.finfo(dtype).eps, atol=0.0)
        check_shaped(got, kl_reference(copies[0], copies[1], copies[2], copies[3], 0.1, estimator, 2.0), dtype)
        assert got.rewards.is_contiguous() and got.kl.is_contiguous()


@pytest.mark.parametrize("kl_clamp", [None, 1.0])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_nonfinite_padding_gives_zero(device, dtype, estimator, kl_clamp):
    B, T = 8, 70
    lp, ref, scores = logprobs(B, T, seed=13, dtype=dtype, device=device)
    lengths = lengths_for(B, T, np.random.default_rng(6))
    mask = prefix_mask(lengths, T, device)
    expected = kl_reference(lp, ref, mask, scores, 0.05, estimator, kl_clamp)
    bad = [float("nan"), float("inf"), -float("inf")]
    lp_bad, ref_bad = lp.clone(), ref.clone()
    for b in range(B):
        for t in range(int(lengths[b]), T):
            lp_bad[b, t] = bad[(b + t) % 3]
            ref_bad[b, t] = bad[(b + 2 * t) % 3]
    # The contiguous byte-mask loop, the strided loop (a float mask) and transposed views.
    for args in [(lp_bad, ref_bad, mask), (lp_bad, ref_bad, mask.to(dtype)),
                 (lp_bad.T.contiguous().T, ref_bad.T.contiguous().T, mask.T.contiguous().T)]:
        out = kl_penalty_rewards(*args, scores, beta=0.05, estimator=estimator, kl_clamp=kl_clamp)
        assert torch.isfinite(out.rewards).all() and torch.isfinite(out.kl).all()
        assert not out.kl[~mask].any() and not out.rewards[~mask].any()
        check_shaped(out, expected, dtype)


# ---------------------------------------------------------------------------------------------
# masked_whiten

WHITEN_SIZES = SIZES + [(2, 9000), (3, 4097)]  # rows of several 4096-element chunks


@pytest.mark.parametrize("B,T", WHITEN_SIZES)
@pytest.mark.parametrize("shift_mean", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_whiten_matches_reference(device, dtype, shift_mean, B, T):
    rng = np.random.default_rng(B * 7 + T)
    x = torch.from_numpy(rng.normal(loc=1.5, scale=2.0, size=(B, T))).to(device=device, dtype=dtype)
    mask = prefix_mask(lengths_for(B, T, rng, offset=T % 3), T, device)
    close(masked_whiten(x, mask, shift_mean=shift_mean), whiten_reference(x, mask, shift_mean), dtype)
    close(masked_whiten(x, shift_mean=shift_mean), whiten_reference(x, None, shift_mean), dtype)


@pytest.mark.parametrize("eps", [1e-8, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_whiten_eps(device, dtype, eps):
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 33)) * 0.3).to(device=device, dtype=dtype)
    mask = prefix_mask([33, 0, 1, 20], 33, device)
    for shift_mean in (True, False):
        close(masked_whiten(x, mask, shift_mean, eps), whiten_reference(x, mask, shift_mean, eps), dtype)


@pytest.mark.parametrize("selected", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_whiten_with_few_selected(device, dtype, selected):
    x = torch.from_numpy(np.random.default_rng(selected).normal(size=(3, 17)) + 4.0).to(device=device, dtype=dtype)
    mask = torch.zeros(3, 17, dtype=torch.bool, device=device)
    mask.view(-1)[torch.tensor([20, 50, 16][:selected], dtype=torch.long)] = True
    for shift_mean in (True, False):
        out = masked_whiten(x, mask, shift_mean)
        close(out, whiten_reference(x, mask, shift_mean), dtype)
        assert torch.isfinite(out).all() and not out[~mask].any()
        if selected == 1:  # variance 0: the lone element sits at the mean
            assert float(out[mask]) == (0.0 if shift_mean else float(x[mask]))


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dtype", DTYPES)
def test_whiten_every_mask_dtype(device, dtype, mask_dtype):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(7, 300))).to(device=device, dtype=dtype)
    holes = torch.from_numpy(rng.random((7, 300)) < 0.6).to(device)
    holes[1] = False
    out = masked_whiten(x, holes.to(mask_dtype), shift_mean=False)
    close(out, whiten_reference(x, holes, shift_mean=False), dtype)
    # Wider masks take the strided loop (Welford moments instead of two sweeps): a few ulps apart.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, masked_whiten(x, holes, shift_mean=False), rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_whiten_strided_views_equal_contiguous_copies(device, dtype):
    B, T = 29, 4100
    rng = np.random.default_rng(17)
    base = torch.from_numpy(rng.normal(loc=-0.7, size=(B, 2 * T))).to(device=device, dtype=dtype)
    row = torch.from_numpy(rng.random(T) < 0.5).to(device)
    mask_expanded = row.unsqueeze(0).expand(B, T)
    views = [base[:, ::2], base.T.contiguous().T[:, T:]]
    for x in views:
        assert not x.is_contiguous()
        for mask in (None, mask_expanded, mask_expanded.to(torch.int64)):
            got = masked_whiten(x, mask)
            want = masked_whiten(x.contiguous(), None if mask is None else mask.contiguous())
            assert got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)
            close(got, whiten_reference(x, mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_whiten_ignores_nonfinite_padding(device, dtype):
    rng = np.random.default_rng(23)
    x = torch.from_numpy(rng.normal(size=(6, 50))).to(device=device, dtype=dtype)
    mask = prefix_mask(lengths_for(6, 50, rng), 50, device)
    expected = whiten_reference(x, mask)
    x_bad = x.clone()
    x_bad[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype, device=device).repeat(100)[
        : int((~mask).sum())
    ]
    for m in (mask, mask.to(torch.float32)):
        out = masked_whiten(x_bad, m)
        assert torch.isfinite(out).all()
        close(out, expected, dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_whiten_same_bits_every_run(device, masked):
    B, T = 64, 20000
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(B, T, generator=gen) * 3 + 1).to(device)
    mask = (torch.rand(B, T, generator=gen) < 0.9).to(device) if masked else None
    first = masked_whiten(x, mask)
    second = masked_whiten(x, mask)
    assert torch.equal(first, second)
    close(first, whiten_reference(x, mask), torch.float32)


# ---------------------------------------------------------------------------------------------
# token_gae

GAE_SIZES = [(1, 1), (1, 97), (97, 1), (97, 97), (1025, 3), (3, 1025), (2, 1025)]


@pytest.mark.parametrize("B,T", GAE_SIZES)
@pytest.mark.parametrize("gamma,gae_lambda", [(1.0, 0.95), (0.99, 0.9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_gae_matches_reference(device, dtype, gamma, gae_lambda, B, T):
    rng = np.random.default_rng(B * 13 + T)
    rewards = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype)
    values = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype)
    lengths = lengths_for(B, T, rng, offset=B % 3)
    last = torch.as_tensor(lengths - 1, dtype=torch.int64, device=device)
    adv, ret = token_gae(rewards, values, last, gamma=gamma, gae_lambda=gae_lambda)
    expected_adv, expected_ret = token_gae_reference(rewards, values, last.cpu(), gamma, gae_lambda)
    close(adv, expected_adv, dtype)
    close(ret, expected_ret, dtype)
    assert adv.shape == ret.shape == (B, T)


@pytest.mark.parametrize("length", [0, 1, 2, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_gae_single_row(device, dtype, length):
    rng = np.random.default_rng(length)
    rewards = torch.from_numpy(rng.normal(size=(1, 64))).to(device=device, dtype=dtype)
    values = torch.from_numpy(rng.normal(size=(1, 64))).to(device=device, dtype=dtype)
    last = torch.tensor([length - 1], device=device)
    adv, ret = token_gae(rewards, values, last)
    expected_adv, expected_ret = token_gae_reference(rewards, values, last.cpu())
    close(adv, expected_adv, dtype)
    close(ret, expected_ret, dtype)
    if length >= 1:  # the last token is not bootstrapped: A = r - V there
        close(adv[:, length - 1], (rewards[:, length - 1] - values[:, length - 1]).cpu().to(F64), dtype)


def garbage_padding(rewards, values, lengths, rng, scale):
    r, v = rewards.clone(), values.clone()
    for b, n in enumerate(lengths):
        k = r.shape[1] - int(n)
        r[b, int(n):] = torch.from_numpy(rng.normal(size=k) * scale).to(r)
        v[b, int(n):] = torch.from_numpy(rng.choice([scale, -scale], size=k)).to(v)
    return r, v


@pytest.mark.parametrize("scale", [1e6, 1e30])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_gae_padding_never_reaches_real_tokens(device, dtype, scale):
    B, T = 40, 300
    rng = np.random.default_rng(29)
    rewards = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype)
    values = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype)
    lengths = lengths_for(B, T, rng)
    last = torch.as_tensor(lengths - 1, dtype=torch.int64, device=device)
    clean_r = rewards * prefix_mask(lengths, T, device)
    clean_v = values * prefix_mask(lengths, T, device)
    dirty_r, dirty_v = garbage_padding(clean_r, clean_v, lengths, rng, scale)
    clean = token_gae(clean_r, clean_v, last)
    dirty = token_gae(dirty_r, dirty_v, last)
    for c, d in zip(clean, dirty):
        assert torch.equal(c, d)
    expected_adv, expected_ret = token_gae_reference(dirty_r, dirty_v, last.cpu())
    close(dirty[0], expected_adv, dtype)
    close(dirty[1], expected_ret, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_gae_nonfinite_padding_never_reaches_real_tokens(device, dtype):
    B, T = 6, 20
    rng = np.random.default_rng(31)
    lengths = np.array([0, 1, 20, 7, 12, 19])
    mask = prefix_mask(lengths, T, device)
    rewards = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype) * mask
    values = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype) * mask
    last = torch.as_tensor(lengths - 1, dtype=torch.int64, device=device)
    expected = token_gae(rewards, values, last)
    rewards_bad, values_bad = rewards.clone(), values.clone()
    rewards_bad[~mask] = float("nan")
    values_bad[~mask] = float("inf")
    got = token_gae(rewards_bad, values_bad, last)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_gae_mask_zeroes_outside_it(device, dtype):
    B, T = 12, 77
    rng = np.random.default_rng(37)
    rewards = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype)
    values = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype)
    lengths = lengths_for(B, T, rng)
    mask = prefix_mask(lengths, T, device)
    last = torch.as_tensor(lengths - 1, dtype=torch.int64, device=device)
    plain = token_gae(rewards, values, last)
    for m in (mask, mask.to(torch.uint8), mask.to(dtype)):
        for got, want in zip(token_gae(rewards, values, last, mask=m), plain):
            assert torch.equal(got, want)
    holes = mask & torch.from_numpy(rng.random((B, T)) < 0.7).to(device)
    adv, ret = token_gae(rewards, values, last, mask=holes)
    expected_adv, expected_ret = token_gae_reference(rewards, values, last.cpu(), mask=holes)
    close(adv, expected_adv, dtype)
    close(ret, expected_ret, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_gae_strided_views_equal_contiguous_copies(device, dtype):
    B, T = 23, 150
    rng = np.random.default_rng(41)
    base_r = torch.from_numpy(rng.normal(size=(B, 2 * T))).to(device=device, dtype=dtype)
    base_v = torch.from_numpy(rng.normal(size=(T, B))).to(device=device, dtype=dtype)
    rewards, values = base_r[:, ::2], base_v.T  # a step, and a [T, B] tensor's transpose
    last_full = torch.as_tensor(np.stack([lengths_for(B, T, rng) - 1] * 2, 1), dtype=torch.int64, device=device)
    last = last_full[:, 0]  # stride 2
    assert not (rewards.is_contiguous() or values.is_contiguous() or last.is_contiguous())
    got = token_gae(rewards, values, last, gamma=0.98, gae_lambda=0.9)
    want = token_gae(rewards.contiguous(), values.contiguous(), last.contiguous(), gamma=0.98, gae_lambda=0.9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)
    expected_adv, expected_ret = token_gae_reference(rewards, values, last.cpu(), 0.98, 0.9)
    close(got[0], expected_adv, dtype)
    close(got[1], expected_ret, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rlhf_pipeline_matches_chained_references(device, dtype):
    """KL-shaped rewards -> token GAE -> whitened advantages, as an RLHF PPO step prepares them."""
    B, T = 16, 129
    lp, ref, scores = logprobs(B, T, seed=43, dtype=dtype, device=device)
    rng = np.random.default_rng(43)
    values = torch.from_numpy(rng.normal(size=(B, T))).to(device=device, dtype=dtype)
    mask = prefix_mask(lengths_for(B, T, rng), T, device)
    rewards, kl, last = kl_penalty_rewards(lp, ref, mask, scores, beta=0.05, estimator="k3", kl_clamp=5.0)
    adv, ret = token_gae(rewards, values, last, mask=mask)
    white = masked_whiten(adv, mask)
    r_ref, _, last_ref = kl_reference(lp, ref, mask, scores, 0.05, "k3", 5.0)
    adv_ref, ret_ref = token_gae_reference(r_ref, values, last_ref, mask=mask)
    close(adv, adv_ref, dtype)
    close(ret, ret_ref, dtype)
    close(white, whiten_reference(adv_ref, mask), dtype)
    close(masked_mean(kl, mask), masked_mean_reference(kl, mask), dtype)


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0)])
def test_empty_batches(device, B, T):
    lp = torch.zeros(B, T, device=device)
    rewards, kl, last = kl_penalty_rewards(lp, lp, scores=torch.ones(B, device=device))
    assert rewards.shape == kl.shape == (B, T) and last.tolist() == [-1] * B
    assert masked_whiten(lp).shape == (B, T)
    adv, ret = token_gae(lp, lp, last)
    assert adv.shape == ret.shape == (B, T)


# ---------------------------------------------------------------------------------------------
# masked_mean


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mean(device, dtype):
    rng = np.random.default_rng(47)
    x = torch.from_numpy(rng.normal(size=(5, 31))).to(device=device, dtype=dtype)
    mask = prefix_mask([0, 1, 31, 10, 17], 31, device)
    for m in (None, mask, mask.to(torch.uint8), mask.to(dtype)):
        close(masked_mean(x, m), masked_mean_reference(x, m), dtype)
        close(masked_mean(x, m, dim=1), masked_mean_reference(x, m, dim=1), dtype)
    assert float(masked_mean(x, mask, dim=1)[0]) == 0.0  # a row with nothing selected
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mean_reads_only_the_selected_elements(device, dtype):
    # The mean was sum(x * mask) / sum(mask): a NaN or inf in padding (the exp() of a padded
    # log-ratio) made it NaN, and a mask holding 2 counted its element twice.
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), -float("inf")]], dtype=dtype, device=device)
    mask = torch.tensor([[True, True, False], [True, False, False]], device=device)
    for m in (mask, mask.to(torch.int64) * 2, mask.to(dtype) * -0.5):
        close(masked_mean(x, m), torch.tensor(2.0, dtype=F64), dtype)
        close(masked_mean(x, m, dim=1), torch.tensor([1.5, 3.0], dtype=F64), dtype)
        close(masked_mean(x, m, dim=0), torch.tensor([2.0, 2.0, 0.0], dtype=F64), dtype)
    # Nothing to average (no elements at all): 0, as with nothing selected.
    empty = torch.zeros(2, 0, dtype=dtype, device=device)
    assert float(masked_mean(empty)) == 0.0 and masked_mean(empty, dim=1).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "x,mask,error,match",
    [
        (torch.zeros(2, 3, dtype=torch.int64), None, TypeError, r"masked_mean: x has dtype torch\.int64"),
        (np.zeros((2, 3)), None, TypeError, r"masked_mean: x must be a torch\.Tensor"),
        (torch.zeros(2, 3), torch.ones(3, dtype=torch.bool), ValueError, r"masked_mean: mask has shape \(3,\)"),
        (torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.complex64), TypeError, r"masked_mean: mask has dtype"),
    ],
)
def test_masked_mean_bad_input_names_the_argument(x, mask, error, match):
    with pytest.raises(error, match=match):
        masked_mean(x, mask)


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the function and the argument.


def _kl_inputs():
    lp = torch.zeros(3, 5)
    return dict(logprob=lp, ref_logprob=torch.zeros(3, 5), mask=torch.ones(3, 5, dtype=torch.bool), scores=torch.zeros(3))


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(logprob=torch.zeros(3, 5, dtype=torch.int64), ref_logprob=torch.zeros(3, 5, dtype=torch.int64)),
         TypeError, r"kl_penalty_rewards: logprob has dtype torch\.int64"),
        (dict(logprob=torch.zeros(3, 5, dtype=torch.complex64), ref_logprob=torch.zeros(3, 5, dtype=torch.complex64)),
         TypeError, r"kl_penalty_rewards: logprob has dtype torch\.complex64"),
        (dict(logprob=torch.zeros(3, 5, dtype=torch.bfloat16)), TypeError,
         r"kl_penalty_rewards: ref_logprob has dtype torch\.float32; expected torch\.bfloat16"),
        (dict(ref_logprob=torch.zeros(3, 5, dtype=torch.float64)), TypeError, r"kl_penalty_rewards: ref_logprob has dtype"),
        (dict(ref_logprob=torch.zeros(3, 4)), ValueError, r"kl_penalty_rewards: ref_logprob has shape \(3, 4\)"),
        (dict(logprob=torch.zeros(15), ref_logprob=torch.zeros(15)), ValueError, r"kl_penalty_rewards: logprob must have shape \[B, T\]"),
        (dict(logprob=torch.zeros(3, 5, 1), ref_logprob=torch.zeros(3, 5, 1)), ValueError, r"kl_penalty_rewards: logprob must have shape"),
        (dict(logprob=[[0.0] * 5] * 3), TypeError, r"kl_penalty_rewards: logprob must be a torch\.Tensor"),
        (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, r"kl_penalty_rewards: mask has shape"),
        (dict(mask=torch.ones(3, 5, dtype=torch.float16)), TypeError, r"kl_penalty_rewards: mask has dtype"),
        (dict(scores=torch.zeros(4)), ValueError, r"kl_penalty_rewards: scores has shape \(4,\); expected \(3,\)"),
        (dict(scores=torch.zeros(3, 1)), ValueError, r"kl_penalty_rewards: scores has shape \(3, 1\)"),
        (dict(scores=torch.zeros(3, dtype=torch.float64)), TypeError, r"kl_penalty_rewards: scores has dtype torch\.float64"),
        (dict(scores=[0.0, 0.0, 0.0]), TypeError, r"kl_penalty_rewards: scores must be a torch\.Tensor"),
        (dict(estimator="k4"), ValueError, r"kl_penalty_rewards: estimator must be one of"),
        (dict(estimator="K1"), ValueError, r"kl_penalty_rewards: estimator"),
        (dict(beta=-0.1), ValueError, r"kl_penalty_rewards: beta must be"),
        (dict(beta=float("nan")), ValueError, r"kl_penalty_rewards: beta"),
        (dict(beta=float("inf")), ValueError, r"kl_penalty_rewards: beta"),
        (dict(beta=True), TypeError, r"kl_penalty_rewards: beta"),
        (dict(kl_clamp=0.0), ValueError, r"kl_penalty_rewards: kl_clamp must be"),
        (dict(kl_clamp=-1.0), ValueError, r"kl_penalty_rewards: kl_clamp"),
        (dict(kl_clamp=float("nan")), ValueError, r"kl_penalty_rewards: kl_clamp"),
    ],
)
def test_kl_bad_input_names_the_argument(changes, error, match):
    inputs = _kl_inputs()
    inputs.update(changes)
    with pytest.raises(error, match=match):
        kl_penalty_rewards(**inputs)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.zeros(7),), {}, ValueError, r"masked_whiten: x must have shape \[B, T\]"),
        ((torch.zeros(2, 7, dtype=torch.int32),), {}, TypeError, r"masked_whiten: x has dtype torch\.int32"),
        ((torch.zeros(2, 7, dtype=torch.complex64),), {}, TypeError, r"masked_whiten: x has dtype torch\.complex64"),
        ((torch.zeros(2, 7), torch.ones(7, 2, dtype=torch.bool)), {}, ValueError, r"masked_whiten: mask has shape \(7, 2\)"),
        ((torch.zeros(2, 7), torch.ones(2, 7, dtype=torch.complex64)), {}, TypeError, r"masked_whiten: mask has dtype"),
        ((torch.zeros(2, 7),), dict(eps=-1e-8), ValueError, r"masked_whiten: eps must be"),
        ((torch.zeros(2, 7),), dict(eps=float("nan")), ValueError, r"masked_whiten: eps"),
    ],
)
def test_whiten_bad_input_names_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        masked_whiten(*args, **kwargs)


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(rewards=torch.zeros(5), values=torch.zeros(5)), ValueError, r"token_gae: rewards must have shape"),
        (dict(rewards=torch.zeros(2, 5, dtype=torch.int64), values=torch.zeros(2, 5, dtype=torch.int64)),
         TypeError, r"token_gae: rewards has dtype"),
        (dict(values=torch.zeros(2, 5, dtype=torch.float64)), TypeError, r"token_gae: values has dtype"),
        (dict(values=torch.zeros(2, 6)), ValueError, r"token_gae: values has shape \(2, 6\)"),
        (dict(last_index=torch.zeros(2, dtype=torch.int32)), TypeError, r"token_gae: last_index has dtype torch\.int32; expected int64"),
        (dict(last_index=torch.zeros(2)), TypeError, r"token_gae: last_index has dtype torch\.float32; expected int64"),
        (dict(last_index=torch.zeros(3, dtype=torch.int64)), ValueError, r"token_gae: last_index has shape \(3,\); expected \(2,\)"),
        (dict(last_index=torch.zeros(2, 1, dtype=torch.int64)), ValueError, r"token_gae: last_index"),
        (dict(last_index=[4, 4]), TypeError, r"token_gae: last_index .*got list"),
    ],
)
def test_token_gae_bad_input_names_the_argument(changes, error, match):
    inputs = dict(rewards=torch.zeros(2, 5), values=torch.zeros(2, 5), last_index=torch.tensor([4, 1]))
    inputs.update(changes)
    with pytest.raises(error, match=match):
        token_gae(**inputs)


def test_token_gae_old_keyword_lam_gives_the_same_result_with_a_deprecation_warning():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    last = torch.tensor([6, 2, -1])
    want = token_gae(rewards, values, last, 0.99, 0.8)
    with pytest.warns(DeprecationWarning, match="fastppo.rlhf.token_gae's keyword lam is renamed gae_lambda"):
        got = token_gae(rewards, values, last, gamma=0.99, lam=0.8)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not torch.equal(got[0], token_gae(rewards, values, last, gamma=0.99)[0])  # 0.8 was used
    with pytest.raises(TypeError, match="fastppo.rlhf.token_gae: got both lam= and gae_lambda="):
        token_gae(rewards, values, last, lam=0.8, gae_lambda=0.8)


def test_token_gae_clamps_last_index_into_the_row(device):
    # An index past the end counts as T - 1; below -1 as -1 (an empty response): nothing is read
    # or written out of bounds.
    rewards = torch.randn(3, 6, dtype=torch.float64, device=device)
    values = torch.randn(3, 6, dtype=torch.float64, device=device)
    got = token_gae(rewards, values, torch.tensor([6, 100, -7], device=device))
    want = token_gae(rewards, values, torch.tensor([5, 5, -1], device=device))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(got[0][2], torch.zeros(6, dtype=torch.float64, device=device))


def test_masked_whiten_with_group_moments_equals_whitening_the_union():
    """Two ranks' halves whitened with the union's moments are the union whitened as one."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 7, generator=g, dtype=torch.float64) * 2 + 1
    mask = torch.rand(10, 7, generator=g) < 0.6
    sel = x[mask]
    moments = torch.stack([sel.new_tensor(float(sel.numel())), sel.mean(), ((sel - sel.mean()) ** 2).sum()])
    for shift_mean in (True, False):
        whole = masked_whiten(x, mask, shift_mean=shift_mean)
        halves = [masked_whiten(x[i:i + 5], mask[i:i + 5], shift_mean=shift_mean, group_moments=moments)
                  for i in (0, 5)]
        torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="group_moments"):
        masked_whiten(x, mask, group_moments=moments.float())
    with pytest.raises(ValueError, match="group_moments"):
        masked_whiten(x, mask, group_moments=moments[:2])
