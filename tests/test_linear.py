"""fastppo.linear_logprob_entropy and fastppo.linear_ppo_loss against plain float64 references: the
full logits, log_softmax, gather and entropy, and the PPO loss written out; and linear_ppo_loss
against the logits path (full logits -> categorical_logprob_entropy -> ppo_loss)."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402
from fastppo import categorical_logprob_entropy, linear_logprob_entropy, linear_ppo_loss, ppo_loss  # noqa: E402
from references import logprob_entropy_reference  # noqa: E402


# ------------------------------------------------------------------ references, written plainly


def ppo_reference(logprob, entropy, old_logprob, advantages, mask=None, clip_coef=0.2, ent_coef=0.0, norm_adv=True,
                  agg="token-mean"):
    """ppo_loss's documented formula for the policy terms, in float64: the clipped surrogate of the
    (batch-normalized) advantages, aggregated by ``agg``, minus ent_coef times the aggregated entropy;
    approx_kl, old_approx_kl and clipfrac as token means."""
    m = torch.ones(logprob.shape, dtype=torch.bool) if mask is None else mask != 0
    adv = advantages.double()
    if norm_adv:
        chosen = adv[m]
        std = chosen.std() if chosen.numel() >= 2 else torch.zeros((), dtype=torch.float64)
        adv = (adv - chosen.mean()) / (std + 1e-8) if chosen.numel() else adv
    logratio = logprob - old_logprob.double()
    ratio = logratio.exp()
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef))

    def token_mean(x):
        return torch.where(m, x, 0.0).sum() / m.sum() if m.any() else torch.zeros((), dtype=torch.float64)

    def aggregate(x):
        if agg == "token-mean":
            return token_mean(x)
        if agg == "seq-mean-token-sum-norm":
            return torch.where(m, x, 0.0).sum() / m.numel()
        per_seq = torch.where(m, x, 0.0).sum(-1)
        counts = m.sum(-1)
        if agg == "seq-mean-token-mean":
            per_seq = per_seq / counts.clamp(min=1)
        keep = counts > 0
        return per_seq[keep].mean() if keep.any() else torch.zeros((), dtype=torch.float64)

    pg_loss, entropy_loss = aggregate(pg), aggregate(entropy)
    ratio, logratio = ratio.detach(), logratio.detach()
    return dict(loss=pg_loss - ent_coef * entropy_loss, pg_loss=pg_loss, entropy=entropy_loss,
                approx_kl=token_mean((ratio - 1) - logratio), old_approx_kl=token_mean(-logratio),
                clipfrac=token_mean(((ratio - 1).abs() > clip_coef).double()))


# ------------------------------------------------------------------ inputs


def make_inputs(shape, H, V, dtype=torch.float64, seed=0, bias=True, mask_p=None):
    """hidden [*shape, H], weight [V, H], targets [*shape], bias [V], mask [*shape] (None without
    mask_p), scaled so the logits spread over a few units."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H ** 0.5)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, shape, generator=g)
    mask = None if mask_p is None else torch.rand(shape, generator=g) > mask_p
    return hidden, weight, targets, b, mask


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def weighted_sum(logprob, entropy, seed=1):
    """A fixed random weighting of log-prob and entropy, so both gradient paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(logprob.shape, generator=g, dtype=torch.float64).to(logprob.dtype)
    total = (logprob * w1).sum()
    if entropy is not None:
        total = total + (entropy * torch.randn(entropy.shape, generator=g, dtype=torch.float64).to(entropy.dtype)).sum()
    return total


def grads_of(out, tensors):
    present = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(out, present))
    return [None if t is None else next(got) for t in tensors]


def assert_all_close(got, expected, **tol):
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a.double(), b.double(), **tol)


# ------------------------------------------------------------------ linear_logprob_entropy

# (token shape, H, V, chunk_size): V prime and not a multiple of the chunk, chunks of one token,
# one token, H = 1, a chunk larger than the batch, the default chunk.
SIZES = [((97,), 8, 101, 16), ((3, 5), 1, 97, 7), ((1,), 4, 1025, None), ((4, 33), 16, 13, 1),
         ((2, 7), 5, 1031, 1000), ((64,), 3, 2, None)]


@pytest.mark.parametrize("shape,H,V,chunk", SIZES)
@pytest.mark.parametrize("with_bias,temperature,mask_p", [(True, 1.0, None), (False, 0.7, 0.3), (True, 1.6, 0.5)])
def test_linear_logprob_entropy_matches_reference(shape, H, V, chunk, with_bias, temperature, mask_p):
    hidden, weight, targets, bias, mask = make_inputs(shape, H, V, bias=with_bias, mask_p=mask_p, seed=V + H)
    ours = leaves(hidden, weight, bias)
    theirs = leaves(hidden, weight, bias)
    lp, ent = linear_logprob_entropy(ours[0], ours[1], targets, ours[2], temperature, mask, chunk_size=chunk)
    ref_lp, ref_ent = logprob_entropy_reference(theirs[0], theirs[1], targets, theirs[2], temperature, mask)
    assert lp.shape == ent.shape == targets.shape and lp.dtype == torch.float64
    assert_all_close((lp, ent), (ref_lp, ref_ent), rtol=1e-10, atol=1e-10)
    assert_all_close(grads_of(weighted_sum(lp, ent), ours), grads_of(weighted_sum(ref_lp, ref_ent), theirs),
                     rtol=1e-9, atol=1e-10)


def test_float32_within_float32_rounding():
    hidden, weight, targets, bias, mask = make_inputs((200,), 32, 3001, seed=3, mask_p=0.2)
    ours = leaves(hidden.float(), weight.float(), bias.float())
    theirs = leaves(hidden, weight, bias)
    lp, ent = linear_logprob_entropy(*ours[:2], targets, ours[2], mask=mask, chunk_size=37)
    ref = logprob_entropy_reference(*theirs[:2], targets, theirs[2], mask=mask)
    assert lp.dtype == ent.dtype == torch.float32
    assert_all_close((lp, ent), ref, rtol=1e-5, atol=1e-4)
    assert_all_close(grads_of(weighted_sum(lp, ent), ours), grads_of(weighted_sum(*ref), theirs), rtol=1e-4, atol=1e-5)


def test_all_masked_gives_zeros_and_zero_gradients():
    hidden, weight, targets, bias, _ = make_inputs((5, 4), 6, 29)
    mask = torch.zeros(5, 4, dtype=torch.bool)
    ours = leaves(hidden, weight, bias)
    lp, ent = linear_logprob_entropy(ours[0], ours[1], targets, ours[2], mask=mask, chunk_size=3)
    assert not lp.any() and not ent.any()
    for g in grads_of(weighted_sum(lp, ent), ours):
        assert not g.any()


def test_masked_tokens_read_neither_hidden_nor_target():
    """Padding: NaN hidden states and an ignore index of -100 at masked tokens change nothing."""
    hidden, weight, targets, bias, mask = make_inputs((6, 9), 5, 41, mask_p=0.4, seed=7)
    dirty_hidden = torch.where(mask.unsqueeze(-1), hidden, float("nan"))
    dirty_targets = torch.where(mask, targets, -100)
    ours = leaves(dirty_hidden, weight, bias)
    theirs = leaves(hidden, weight, bias)
    lp, ent = linear_logprob_entropy(ours[0], ours[1], dirty_targets, ours[2], mask=mask.to(torch.uint8), chunk_size=4)
    ref = logprob_entropy_reference(theirs[0], theirs[1], targets, theirs[2], mask=mask)
    assert_all_close((lp, ent), ref, rtol=1e-10, atol=1e-10)
    got = grads_of(weighted_sum(lp, ent), ours)
    assert all(torch.isfinite(g).all() for g in got)
    assert_all_close(got, grads_of(weighted_sum(*ref), theirs), rtol=1e-9, atol=1e-10)


def test_non_contiguous_hidden_and_int32_targets():
    base, weight, targets, bias, mask = make_inputs((7, 2, 11), 9, 53, mask_p=0.2, seed=2)
    hidden = base.transpose(0, 1)[1]  # [7, 11, 9], strided
    targets, mask = targets.transpose(0, 1)[1], mask.transpose(0, 1)[1]
    assert not hidden.is_contiguous()
    ours = leaves(hidden, weight, bias)
    ours[0] = base.detach().clone().requires_grad_()
    lp, ent = linear_logprob_entropy(ours[0].transpose(0, 1)[1], ours[1], targets.to(torch.int32), ours[2],
                                     mask=mask, chunk_size=10)
    theirs = leaves(hidden, weight, bias)
    ref = logprob_entropy_reference(theirs[0], theirs[1], targets, theirs[2], mask=mask)
    assert_all_close((lp, ent), ref, rtol=1e-10, atol=1e-10)
    d_base, d_weight, d_bias = grads_of(weighted_sum(lp, ent), ours)
    ref_grads = grads_of(weighted_sum(*ref), theirs)
    assert_all_close((d_base.transpose(0, 1)[1], d_weight, d_bias), ref_grads, rtol=1e-9, atol=1e-10)
    assert not d_base.transpose(0, 1)[0].any()


def test_entropy_false_returns_none_and_the_same_logprob():
    hidden, weight, targets, bias, mask = make_inputs((50,), 4, 67, mask_p=0.3)
    ours = leaves(hidden, weight, bias)
    lp, ent = linear_logprob_entropy(ours[0], ours[1], targets, ours[2], mask=mask, entropy=False, chunk_size=8)
    assert ent is None
    theirs = leaves(hidden, weight, bias)
    ref_lp, _ = logprob_entropy_reference(theirs[0], theirs[1], targets, theirs[2], mask=mask)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-10, atol=1e-10)
    assert_all_close(grads_of(weighted_sum(lp, None), ours), grads_of(weighted_sum(ref_lp, None), theirs),
                     rtol=1e-9, atol=1e-10)


def test_no_grad_path_builds_no_graph():
    hidden, weight, targets, bias, mask = make_inputs((3, 10), 6, 101, mask_p=0.1)
    expected = logprob_entropy_reference(hidden, weight, targets, bias, mask=mask)
    for requires_grad, grad_mode in ((False, True), (True, False)):
        h, w, b = (t.clone().requires_grad_(requires_grad) for t in (hidden, weight, bias))
        with torch.set_grad_enabled(grad_mode):
            lp, ent = linear_logprob_entropy(h, w, targets, b, mask=mask, chunk_size=4)
        assert lp.grad_fn is None and not lp.requires_grad and ent.grad_fn is None
        assert_all_close((lp, ent), expected, rtol=1e-10, atol=1e-10)


def test_only_the_gradients_asked_for():
    hidden, weight, targets, bias, _ = make_inputs((20,), 4, 31)
    w = weight.clone().requires_grad_()
    lp, ent = linear_logprob_entropy(hidden, w, targets, bias, chunk_size=6)
    (d_weight,) = torch.autograd.grad(weighted_sum(lp, ent), [w])
    theirs = leaves(weight)
    ref = logprob_entropy_reference(hidden, theirs[0], targets, bias)
    (ref_d_weight,) = torch.autograd.grad(weighted_sum(*ref), theirs)
    torch.testing.assert_close(d_weight, ref_d_weight, rtol=1e-9, atol=1e-10)


def bf16_errors(dtype):
    """Max |error| against float64 of ours and of the plain path in the same low precision (the
    GEMM in that dtype, log_softmax in float32, autograd's backward): values and the 3 gradients."""
    hidden, weight, targets, bias, mask = make_inputs((300,), 64, 2053, seed=11, mask_p=0.1)
    exact = leaves(hidden, weight, bias)
    ref = logprob_entropy_reference(exact[0], exact[1], targets, exact[2], mask=mask)
    ref_grads = grads_of(weighted_sum(*ref), exact)
    ours = leaves(*(t.to(dtype) for t in (hidden, weight, bias)))
    lp, ent = linear_logprob_entropy(ours[0], ours[1], targets, ours[2], mask=mask, chunk_size=64)
    assert lp.dtype == ent.dtype == torch.float32
    our_grads = grads_of(weighted_sum(lp, ent), ours)
    assert [g.dtype for g in our_grads] == [dtype] * 3
    plain = leaves(*(t.to(dtype) for t in (hidden, weight, bias)))
    logits = torch.addmm(plain[2], plain[0], plain[1].T).float()
    logp = torch.log_softmax(logits, -1)
    p_lp = torch.where(mask, logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), 0.0)
    p_ent = torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)
    plain_grads = grads_of(weighted_sum(p_lp, p_ent), plain)

    def err(got, want):
        return [float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())
                for a, b in zip(got, want)]

    return err([lp, ent] + our_grads, list(ref) + ref_grads), err([p_lp, p_ent] + plain_grads, list(ref) + ref_grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_plain_paths_error(dtype):
    """The documented tolerance: each output within 2x the plain low-precision path's own error
    against float64 (plus 2**-9 of the largest value for d weight, rounded once per chunk)."""
    ours, plain = bf16_errors(dtype)
    for name, a, b, extra in zip(("logprob", "entropy", "d hidden", "d weight", "d bias"), ours, plain,
                                 (0, 0, 0, 2 ** -9, 2 ** -9)):
        assert a <= 2 * b + extra + 1e-6, (name, a, b)


def test_under_torch_compile_fullgraph():
    hidden, weight, targets, bias, mask = make_inputs((4, 6), 5, 37, mask_p=0.2, seed=4)

    def step(h, w, b):
        lp, ent = linear_logprob_entropy(h, w, targets, b, temperature=0.8, mask=mask, chunk_size=5)
        return (lp * 0.3 + ent).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        ins = leaves(hidden, weight, bias)
        out = fn(*ins)
        results.append([out.detach()] + list(torch.autograd.grad(out, ins)))
    assert_all_close(results[1], results[0], rtol=0, atol=0)


def test_custom_op_passes_opcheck():
    hidden, weight, targets, bias, mask = make_inputs((9,), 3, 17, mask_p=0.3)
    h, w, b = leaves(hidden, weight, bias)
    torch.library.opcheck(torch.ops.fastppo.linear_logprob_entropy.default, (h, w, targets, b, mask, 1.3, True, 4))


@pytest.mark.parametrize("change,error,words", [
    (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    (dict(hidden=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "hidden"),
    (dict(hidden=torch.zeros(4, 0)), ValueError, "H >= 1"),
    (dict(weight=torch.zeros(7, 4, dtype=torch.float64)), ValueError, "weight has shape (7, 4); expected [V, 3]"),
    (dict(weight=torch.zeros(7, 3, dtype=torch.float32)), TypeError, "weight has dtype torch.float32"),
    (dict(targets=torch.zeros(5, dtype=torch.int64)), ValueError, "targets has shape (5,)"),
    (dict(targets=torch.zeros(4)), TypeError, "targets"),
    (dict(bias=torch.zeros(6, dtype=torch.float64)), ValueError, "bias has shape (6,)"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask has shape (3,)"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1, got 0"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be None or an int >= 1, got float"),
    (dict(targets=torch.tensor([0, 1, 7, 2])), IndexError, "targets holds 7"),
])
def test_bad_inputs_name_the_argument(change, error, words):
    args = dict(hidden=torch.zeros(4, 3, dtype=torch.float64), weight=torch.zeros(7, 3, dtype=torch.float64),
                targets=torch.zeros(4, dtype=torch.int64), bias=None, mask=None, temperature=1.0, chunk_size=None)
    args.update(change)
    for fn, extra in ((linear_logprob_entropy, {}),
                      (linear_ppo_loss, dict(old_logprob=torch.zeros(4, dtype=torch.float64),
                                             advantages=torch.zeros(4, dtype=torch.float64)))):
        call = dict(args, **extra)
        if fn is linear_ppo_loss and "targets" in change and change["targets"].shape != (4,):
            continue  # old_logprob would be refused first
        with pytest.raises(error) as info:
            fn(**call)
        assert words in str(info.value)
        assert fn.__name__ in str(info.value)


def test_out_of_range_target_is_fine_where_masked():
    hidden, weight, targets, bias, mask = make_inputs((8,), 3, 11, mask_p=0.5, seed=5)
    bad = torch.where(mask, targets, 11)
    lp, _ = linear_logprob_entropy(hidden, weight, bad, bias, mask=mask)
    torch.testing.assert_close(lp, logprob_entropy_reference(hidden, weight, targets, bias, mask=mask)[0])
    with pytest.raises(IndexError, match="targets holds 11"):
        linear_logprob_entropy(hidden, weight, bad, bias)


# ------------------------------------------------------------------ linear_ppo_loss


def ppo_loss_takes(**options):
    """Whether this ppo_loss accepts these options (newer options may not have landed)."""
    parameters = inspect.signature(ppo_loss).parameters
    if any(name not in parameters for name in options):
        return False
    x = torch.zeros(2, 3, dtype=torch.float64)
    try:
        ppo_loss(x, x, x, **options)
    except (TypeError, ValueError):
        return False
    return True


def loss_inputs(B, T, H, V, seed=0, mask_p=0.3, dtype=torch.float64):
    hidden, weight, targets, bias, mask = make_inputs((B, T), H, V, seed=seed, mask_p=mask_p, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        lp, _ = logprob_entropy_reference(hidden, weight, targets, bias)
    # A policy a little off the rollout's, so a good share of the ratios is clipped.
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(lp.dtype if dtype == torch.float64
                                                                               else torch.float32)
    adv = (torch.randn(B, T, generator=g, dtype=torch.float64) + 0.2).to(old.dtype)
    return hidden, weight, targets, bias, mask, old, adv


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
STATS = ("pg_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("B,T,H,V,chunk,mask_p,ent_coef,norm_adv", [
    (6, 7, 5, 97, 15, 0.3, 0.01, True),   # chunks of 2 sequences, V prime
    (5, 4, 1, 13, 1, 0.0, 0.0, True),     # H = 1, token chunks of 1 (token-mean), 1 sequence of 4 > chunk
    (1, 1, 3, 31, None, None, 0.1, False),  # one token
    (4, 9, 6, 1031, 40, 0.6, 0.05, True),
])
def test_linear_ppo_loss_matches_reference(agg, B, T, H, V, chunk, mask_p, ent_coef, norm_adv):
    if not ppo_loss_takes(agg=agg):
        pytest.skip(f"ppo_loss does not take agg={agg!r} yet")
    hidden, weight, targets, bias, mask, old, adv = loss_inputs(B, T, H, V, seed=B * T + V, mask_p=mask_p)
    ours = leaves(hidden, weight, bias)
    out = linear_ppo_loss(ours[0], ours[1], targets, old, adv, ours[2], 0.9, mask, chunk, ent_coef=ent_coef,
                          norm_adv=norm_adv, agg=agg)
    assert isinstance(out, fastppo.PPOLossOutput) and len(tuple(out)) == 7
    theirs = leaves(hidden, weight, bias)
    lp, ent = logprob_entropy_reference(theirs[0], theirs[1], targets, theirs[2], 0.9, mask)
    ref = ppo_reference(lp, ent, old, adv, mask, ent_coef=ent_coef, norm_adv=norm_adv, agg=agg)
    torch.testing.assert_close(out.loss, ref["loss"], rtol=1e-9, atol=1e-11)
    for name in STATS:
        torch.testing.assert_close(getattr(out, name), ref[name].detach(), rtol=1e-9, atol=1e-11, msg=name)
    assert float(out.v_loss) == 0.0
    assert_all_close(grads_of(out.loss, ours), grads_of(ref["loss"], theirs), rtol=1e-8, atol=1e-11)


def logits_path(hidden, weight, targets, old, adv, bias, temperature, mask, **options):
    """The peer linear_ppo_loss replaces: full logits, fastppo's head, ppo_loss."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    lp, ent = categorical_logprob_entropy(logits, targets, temperature)
    if options.get("ent_coef", 0.0) == 0:
        ent = ent.detach()
    return ppo_loss(lp, old.to(lp.dtype), adv.to(lp.dtype), entropy=ent, mask=mask, **options)


def assert_matches_logits_path(options, B=5, T=8, H=6, V=211, chunk=17, mask_p=0.3, seed=0, rtol=1e-9):
    hidden, weight, targets, bias, mask, old, adv = loss_inputs(B, T, H, V, seed=seed, mask_p=mask_p)
    ours, theirs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    out = linear_ppo_loss(ours[0], ours[1], targets, old, adv, ours[2], 1.1, mask, chunk, **options)
    ref = logits_path(theirs[0], theirs[1], targets, old, adv, theirs[2], 1.1, mask, **options)
    torch.testing.assert_close(out.loss, ref.loss, rtol=rtol, atol=1e-11)
    for name in ref._fields[1:] + ("kl", "clipfrac_low", "clipfrac_high"):
        if hasattr(ref, name):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=rtol, atol=1e-11, msg=name)
    assert_all_close(grads_of(out.loss, ours), grads_of(ref.loss, theirs), rtol=rtol * 10, atol=1e-11)
    return out


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("chunk", [3, 17, 1000])  # 3 < T: seq aggregations take the two-phase path
def test_linear_ppo_loss_equals_the_logits_path(agg, chunk):
    if not ppo_loss_takes(agg=agg):
        pytest.skip(f"ppo_loss does not take agg={agg!r} yet")
    assert_matches_logits_path(dict(agg=agg, ent_coef=0.02, dual_clip=3.0, clip_coef=0.15), chunk=chunk)


NEW_OPTIONS = [
    dict(clip_coef_high=0.28),
    dict(clip_coef_high=0.28, agg="seq-mean-token-sum-norm"),
    dict(ratio_level="sequence"),
    dict(ratio_level="sequence", agg="seq-mean-token-mean"),
    dict(kl_coef=0.05, kl_estimator="k3", ref_logprob=True),
    dict(kl_coef=0.1, kl_estimator="k1", ref_logprob=True, agg="seq-mean-token-sum"),
    dict(is_weights=True),
]


@pytest.mark.parametrize("options", NEW_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("chunk", [3, 17])
def test_linear_ppo_loss_new_options_equal_the_logits_path(options, chunk):
    g = torch.Generator().manual_seed(9)
    B, T = 5, 8
    options = dict(options)
    if options.get("ref_logprob") is True:
        options["ref_logprob"] = -3.0 - torch.rand(B, T, generator=g, dtype=torch.float64)
    if options.get("is_weights") is True:
        options["is_weights"] = torch.rand(B, T, generator=g, dtype=torch.float64).clamp(max=0.9) + 0.2
    probe = {k: (torch.zeros(2, 3, dtype=torch.float64) if isinstance(v, torch.Tensor) else v)
             for k, v in options.items()}
    if not ppo_loss_takes(**probe):
        pytest.skip(f"ppo_loss does not take {sorted(options)} yet")
    assert_matches_logits_path(options, B=B, T=T, chunk=chunk)


def test_linear_ppo_loss_one_pass_makes_three_gemms(monkeypatch):
    """The one pass: a logits GEMM per chunk in forward and two gradient GEMMs, none in backward;
    the two-phase path (a sequence longer than a chunk under a per-sequence aggregation) recomputes."""
    import fastppo.linear as linear  # the chunk GEMM of both functions lives there

    calls = []
    original = linear._chunk_logits
    monkeypatch.setattr(linear, "_chunk_logits", lambda *a: calls.append(1) or original(*a))
    hidden, weight, targets, bias, mask, old, adv = loss_inputs(4, 5, 3, 23)
    h = hidden.clone().requires_grad_()
    out = linear_ppo_loss(h, weight, targets, old, adv, bias, mask=mask, chunk_size=10, agg="seq-mean-token-mean")
    assert len(calls) == 2  # 2 sequences of 5 per chunk
    out.loss.backward()
    assert len(calls) == 2
    calls.clear()
    h = hidden.clone().requires_grad_()
    out = linear_ppo_loss(h, weight, targets, old, adv, bias, mask=mask, chunk_size=4, agg="seq-mean-token-mean")
    out.loss.backward()
    assert len(calls) == 10  # two-phase: forward and backward each take 5 chunks of 4 tokens


def test_linear_ppo_loss_all_masked_and_no_grad():
    hidden, weight, targets, bias, _, old, adv = loss_inputs(3, 4, 5, 19)
    ours = leaves(hidden, weight, bias)
    out = linear_ppo_loss(ours[0], ours[1], targets, old, adv, ours[2], mask=torch.zeros(3, 4), chunk_size=5)
    assert all(float(x.detach()) == 0.0 for x in out)
    assert all(not g.any() for g in grads_of(out.loss, ours))
    with torch.no_grad():
        out = linear_ppo_loss(*ours[:2], targets, old, adv, ours[2], chunk_size=5, ent_coef=0.1)
    assert out.loss.grad_fn is None
    lp, ent = logprob_entropy_reference(hidden, weight, targets, bias)
    torch.testing.assert_close(out.loss, ppo_reference(lp, ent, old, adv, ent_coef=0.1)["loss"], rtol=1e-9, atol=1e-12)


def test_linear_ppo_loss_flat_tokens_and_bf16():
    """Any token shape takes the token-mean loss; bf16 inputs give float32 log-probs and bf16 gradients
    within bf16 error of the float64 loss."""
    hidden, weight, targets, bias, mask, old, adv = loss_inputs(6, 10, 16, 257, seed=3)
    hidden, targets, mask, old, adv = (x.reshape(3, 2, 10, *x.shape[2:]) for x in (hidden, targets, mask, old, adv))
    theirs = leaves(hidden, weight, bias)
    lp, ent = logprob_entropy_reference(theirs[0], theirs[1], targets, theirs[2], mask=mask)
    ref = ppo_reference(lp, ent, old, adv, mask, ent_coef=0.01)
    ref_grads = grads_of(ref["loss"], theirs)
    ours = leaves(hidden, weight, bias)
    out = linear_ppo_loss(ours[0], ours[1], targets, old, adv, ours[2], mask=mask, chunk_size=7, ent_coef=0.01)
    torch.testing.assert_close(out.loss, ref["loss"], rtol=1e-9, atol=1e-12)
    assert_all_close(grads_of(out.loss, ours), ref_grads, rtol=1e-8, atol=1e-12)
    low = leaves(*(t.bfloat16() for t in (hidden, weight, bias)))
    out = linear_ppo_loss(low[0], low[1], targets, old.float(), adv.float(), low[2], mask=mask, chunk_size=7,
                          ent_coef=0.01)
    assert out.loss.dtype == torch.float32
    grads = grads_of(out.loss, low)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    torch.testing.assert_close(out.loss.double(), ref["loss"], rtol=0.05, atol=0.02)
    for g, r in zip(grads, ref_grads):
        assert float((g.double() - r).abs().max()) <= 0.05 * float(r.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_head_sums_its_weight_gradient_over_chunks_in_float32(dtype):
    """d weight and d bias of a bf16/fp16 head add up 512 one-token chunks in float32 and are rounded
    once: within about one rounding of the float64 gradient of the same (16-bit) inputs. Summed in
    16 bits chunk by chunk, the error grows with the number of chunks (several percent here)."""
    hidden, weight, targets, bias, _ = make_inputs((512,), 8, 97, seed=4)
    low = leaves(*(t.to(dtype) for t in (hidden, weight, bias)))
    exact = leaves(*(t.double() for t in low))  # the same 16-bit values, in float64
    lp, ent = linear_logprob_entropy(low[0], low[1], targets, low[2], chunk_size=1)
    ref_lp, ref_ent = logprob_entropy_reference(exact[0], exact[1], targets, exact[2])
    got = grads_of(weighted_sum(lp.double(), ent.double()), low)
    want = grads_of(weighted_sum(ref_lp, ref_ent), exact)
    eps = torch.finfo(dtype).eps
    for name, g, r in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == dtype
        error = float((g.double() - r).norm() / r.norm())
        assert error <= 2 * eps, (name, error, eps)


COMPILE_OPTIONS = [dict(agg="seq-mean-token-mean"), dict(agg="token-mean", chunk=5), dict(agg="seq-mean-token-sum", chunk=4),
                   dict(clip_coef_high=0.28),
                   dict(ratio_level="sequence"), dict(kl_coef=0.05, kl_estimator="k3", ref_logprob=True),
                   dict(is_weights=True, agg="seq-mean-token-sum-norm")]


@pytest.mark.parametrize("options", COMPILE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_linear_ppo_loss_under_torch_compile_fullgraph(options):
    """The one pass runs as a custom op there: its chunks' autograd through the head and ppo_loss must
    hold with every option (inside a custom op only autograd.Functions are recorded)."""
    hidden, weight, targets, bias, mask, old, adv = loss_inputs(4, 6, 5, 37, seed=8)
    options = dict(options)
    chunk = options.pop("chunk", 12)
    g = torch.Generator().manual_seed(3)
    for name in ("ref_logprob", "is_weights"):
        if options.get(name) is True:
            options[name] = torch.rand(4, 6, generator=g, dtype=torch.float64) - (3.0 if name == "ref_logprob" else 0)
    probe = {k: (torch.zeros(2, 3, dtype=torch.float64) if isinstance(v, torch.Tensor) else v)
             for k, v in options.items()}
    if not ppo_loss_takes(**probe):
        pytest.skip(f"ppo_loss does not take {sorted(options)} yet")

    def step(h, w, b):
        out = linear_ppo_loss(h, w, targets, old, adv, b, 0.8, mask, chunk, ent_coef=0.01, **options)
        return out.loss, out.clipfrac

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        ins = leaves(hidden, weight, bias)
        loss, clipfrac = fn(*ins)
        results.append([loss.detach(), clipfrac] + list(torch.autograd.grad(loss, ins)))
    assert_all_close(results[1], results[0], rtol=0, atol=0)


def test_linear_ppo_loss_refuses_value_inputs():
    hidden, weight, targets, bias, mask, old, adv = loss_inputs(2, 3, 4, 11)
    for name in ("new_value", "old_value", "returns"):
        with pytest.raises(ValueError, match=f"fastppo.linear_ppo_loss: {name} is not taken"):
            linear_ppo_loss(hidden, weight, targets, old, adv, **{name: torch.zeros(2, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="old_logprob has shape"):
        linear_ppo_loss(hidden, weight, targets, old[:1], adv)
    with pytest.raises(TypeError, match="advantages"):
        linear_ppo_loss(hidden, weight, targets, old, adv.long())


def test_linear_ppo_loss_passes_other_options_to_ppo_loss():
    """An option the one pass does not know (group_moments here) takes the two-phase path, equal to the
    logits path; ppo_loss's own checks name a bad option."""
    hidden, weight, targets, bias, mask, old, adv = loss_inputs(3, 5, 4, 29, seed=6)
    chosen = adv[mask]
    moments = torch.stack([torch.tensor(float(chosen.numel() * 2)), chosen.mean() + 0.1,
                           chosen.var(unbiased=False) * chosen.numel() * 2]).double()
    assert_matches_logits_path(dict(group_moments=moments, group_size=2, ent_coef=0.01), B=3, T=5, H=4, V=29,
                               chunk=4, seed=6)
    with pytest.raises(ValueError, match="clip_coef"):
        linear_ppo_loss(hidden, weight, targets, old, adv, clip_coef=-1.0)
