"""fastppo.compat (TRL, verl and OpenRLHF drop-ins) against plain float64 torch written from each
original's definition, and against TRL's own functions where TRL is installed."""

from __future__ import annotations

import math

from types import SimpleNamespace

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

from fastppo.compat import openrlhf, trl, verl  # noqa: E402

# ------------------------------------------------------------------ references (float64, plain)


def ref_logp(logits, index, temperature=1.0):
    """log_softmax(logits / T) at index ([...] or [..., K])."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    if index.dim() == logits.dim():
        return logp.gather(-1, index.long())
    return logp.gather(-1, index.long().unsqueeze(-1)).squeeze(-1)


def ref_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def verl_count(counts, mask):
    """A mask's count as verl divides by it, count + 1e-8: torch keeps the 1e-8 only for a float64
    mask; an integer or bool count plus 1e-8 is a float32, where it rounds away for a count >= 1."""
    if mask.dtype == torch.float64:
        return counts + 1e-8
    return torch.where(counts > 0, counts, 1e-8)


def ref_agg(loss, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's four aggregation modes of a [B, T] loss, 0/1 mask, with verl's global batch sizes."""
    m = mask.double()
    if mode == "token-mean":  # NaN with no selected token; the where() keeps that row's gradient 0, as in verl
        total = torch.where(m > 0, loss, 0.0).sum()
        return total / (m.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "seq-mean-token-sum-norm":
        return (loss * m).sum() / (loss.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    counts = m.sum(-1)
    rows = (loss * m).sum(-1)
    if mode == "seq-mean-token-mean":
        rows = rows / verl_count(counts, mask)
    kept = counts > 0
    return rows[kept].sum() / (kept.sum() if global_batch_size is None else global_batch_size) * dp_size


def ref_policy_loss(old, new, adv, mask, low, high, c, mode, weights=None, **batch):
    """verl's vanilla PPO policy loss in float64: (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)."""
    old, new, adv = old.double(), new.double(), adv.double()
    log_ratio = (new - old).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - low, 1 + high)
    loss = torch.maximum(unclipped, clipped)
    dual_binds = (adv < 0) & (loss > -adv * c)
    loss = torch.where(dual_binds, -adv * c, loss)
    m = mask.double()
    n = m.sum()
    count = verl_count(n, mask)

    def mean(x):
        return (x.double() * m).sum() / count

    weighted = loss if weights is None else loss * weights.double()
    return ref_agg(weighted, mask, mode, **batch), mean(clipped > unclipped), mean(-log_ratio), mean(dual_binds)


def weighted_grad(out, leaf, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return torch.autograd.grad((out * w).sum(), leaf)[0]


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def make_logits(shape, device, dtype=torch.float64, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if strided:  # the same values with a non-unit last stride
        x = x.movedim(-1, 0).contiguous().movedim(0, -1)
    return x.to(device=device, dtype=dtype)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


# (leading shape, V): one token, V = 1, a prime V, two leading dims
SIZES = [((1,), 5), ((7,), 1), ((4,), 1009), ((3, 5), 257)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# ------------------------------------------------------------------ log-probs and entropy


LOGP_FUNCTIONS = {
    "trl": lambda x, i, t: trl.selective_log_softmax(x, i, t),
    "verl": lambda x, i, t: verl.logprobs_from_logits(x, i),  # verl's has no temperature
    "openrlhf": lambda x, i, t: openrlhf.log_probs_from_logits(x, i, temperature=t),
}


@pytest.mark.parametrize("which", sorted(LOGP_FUNCTIONS))
@pytest.mark.parametrize("lead,V", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_logprobs_match_reference(device, which, lead, V, dtype, strided):
    logits = make_logits(lead + (V,), device, dtype, seed=V, strided=strided)
    index = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(1)).to(device)
    temperature = 0.7 if which != "verl" else 1.0
    x = logits.clone().requires_grad_()
    y = logits.double().clone().requires_grad_()
    ours = LOGP_FUNCTIONS[which](x, index, temperature)
    exact = ref_logp(y, index, temperature)
    assert ours.dtype == dtype and ours.shape == index.shape
    torch.testing.assert_close(ours.double(), exact, rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(weighted_grad(ours, x).double(), weighted_grad(exact, y), rtol=tol(dtype),
                               atol=tol(dtype))
    assert logits.equal(x.detach())  # the caller's logits are left as they were


ENTROPY_FUNCTIONS = {"trl": trl.entropy_from_logits, "verl": verl.entropy_from_logits,
                     "openrlhf": openrlhf.compute_entropy}


@pytest.mark.parametrize("which", sorted(ENTROPY_FUNCTIONS))
@pytest.mark.parametrize("lead,V", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_matches_reference(device, which, lead, V, dtype):
    logits = make_logits(lead + (V,), device, dtype, seed=V + 1, strided=True)
    x = logits.clone().requires_grad_()
    y = logits.double().clone().requires_grad_()
    ours, exact = ENTROPY_FUNCTIONS[which](x), ref_entropy(y)
    assert ours.dtype == dtype and ours.shape == lead
    torch.testing.assert_close(ours.double(), exact, rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(weighted_grad(ours, x).double(), weighted_grad(exact, y), rtol=tol(dtype),
                               atol=tol(dtype))


@pytest.mark.parametrize("K", [0, 1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_top_k_index(device, K, dtype):
    logits = make_logits((2, 3, 97), device, dtype, seed=K, strided=True)
    index = torch.randint(0, 97, (2, 3, K), generator=torch.Generator().manual_seed(K)).to(device)
    if K > 1:
        index[..., 1] = index[..., 0]  # a duplicate index: its gradient is the sum of both
    x = logits.clone().requires_grad_()
    y = logits.double().clone().requires_grad_()
    ours, exact = trl.selective_log_softmax(x, index, 1.3), ref_logp(y, index, 1.3)
    assert ours.dtype == dtype and ours.shape == index.shape
    torch.testing.assert_close(ours.double(), exact, rtol=tol(dtype), atol=tol(dtype))
    if K > 0:
        torch.testing.assert_close(weighted_grad(ours, x).double(), weighted_grad(exact, y), rtol=tol(dtype),
                                   atol=tol(dtype))


def test_trl_top_k_op_passes_opcheck():
    logits = make_logits((2, 3, 11), "cpu", seed=6).requires_grad_()
    top = torch.randint(0, 11, (2, 3, 4), generator=torch.Generator().manual_seed(6))
    torch.library.opcheck(torch.ops.fastppo.compat_gathered_log_softmax, (logits, top, 0.8))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_trl_row_mask_and_fused_pair(device, requires_grad):
    logits = make_logits((4, 6, 33), device, seed=3)
    index = torch.randint(0, 33, (4, 6), generator=torch.Generator().manual_seed(3)).to(device)
    row_mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(4)).to(device) > 0.3
    index_masked = torch.where(row_mask, index, 1000)  # a masked row's index is not read
    x = logits.clone().requires_grad_()
    logp, ent = trl.selective_log_softmax_and_entropy(x, index_masked, requires_grad, 0.9, row_mask)
    assert ent.requires_grad == requires_grad
    exact_logp = torch.where(row_mask, ref_logp(logits, index, 0.9), 0.0)
    exact_ent = torch.where(row_mask, ref_entropy(logits, 0.9), 0.0)
    torch.testing.assert_close(logp, exact_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, exact_ent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trl.selective_log_softmax(x, index_masked, 0.9, row_mask).detach(), exact_logp)
    grad = torch.autograd.grad(logp.sum(), x)[0]
    assert grad[~row_mask].abs().max() == 0


def test_verl_logprobs_and_entropy_in_one_call(device):
    logits = make_logits((3, 4, 50), device, seed=9)
    labels = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(9)).to(device)
    logp, ent = verl.logprobs_and_entropy_from_logits(logits, labels)
    torch.testing.assert_close(logp, verl.logprobs_from_logits(logits, labels), rtol=0, atol=0)
    torch.testing.assert_close(ent, verl.entropy_from_logits(logits), rtol=0, atol=0)


# ------------------------------------------------------------------ against TRL itself


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_trl(device, dtype):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = make_logits((3, 5, 257), device, dtype, seed=2)
    index = torch.randint(0, 257, (3, 5), generator=torch.Generator().manual_seed(2)).to(device)
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    ours, theirs = trl.selective_log_softmax(x, index), trl_utils.selective_log_softmax(y, index)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(weighted_grad(ours, x).double(), weighted_grad(theirs, y).double(),
                               rtol=tol(dtype), atol=tol(dtype))
    top = torch.randint(0, 257, (3, 5, 4), generator=torch.Generator().manual_seed(5)).to(device)
    torch.testing.assert_close(trl.selective_log_softmax(logits, top).double(),
                               trl_utils.selective_log_softmax(logits, top).double(), rtol=tol(dtype), atol=tol(dtype))
    ent, ent_theirs = trl.entropy_from_logits(logits), trl_utils.entropy_from_logits(logits)
    assert ent.dtype == ent_theirs.dtype
    torch.testing.assert_close(ent.double(), ent_theirs.double(), rtol=tol(dtype), atol=tol(dtype))
    if hasattr(trl_utils, "selective_log_softmax_and_entropy"):
        pairs = zip(trl.selective_log_softmax_and_entropy(logits, index, temperature=0.8),
                    trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=0.8))
        for a, b in pairs:
            torch.testing.assert_close(a.double(), b.double(), rtol=tol(dtype), atol=tol(dtype))


# ------------------------------------------------------------------ verl's policy loss and agg_loss


def policy_inputs(shape, device, dtype=torch.float64, mask_dtype=torch.bool, seed=0, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.3
    if empty_rows and len(shape) == 2 and shape[0] > 1:
        mask[1] = False  # a sequence with no response token
    to = dict(device=device)
    return (old.to(dtype=dtype, **to), new.to(dtype=dtype, **to), adv.to(dtype=dtype, **to),
            mask.to(dtype=mask_dtype, **to))


MODES = list(verl.AGG_MODES)
CLIPS = [dict(cliprange=0.2), dict(cliprange=0.2, cliprange_high=0.28, clip_ratio_c=1.5),
         dict(cliprange_low=0.1, cliprange_high=0.3, clip_ratio_c=math.inf)]
SHAPES = [(1, 1), (2, 1), (4, 37), (5, 128)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", CLIPS, ids=["sym", "dapo", "nodual"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float64])
def test_policy_loss_matches_verl_definition(device, mode, clip, shape, mask_dtype):
    old, new, adv, mask = policy_inputs(shape, device, mask_dtype=mask_dtype, seed=shape[1],
                                        empty_rows=shape != (2, 1))
    x = new.clone().requires_grad_()
    y = new.clone().requires_grad_()
    ours = verl.compute_policy_loss(old, x, adv, mask, loss_agg_mode=mode, **clip)
    low = clip.get("cliprange_low", clip.get("cliprange"))
    high = clip.get("cliprange_high", clip.get("cliprange"))
    exact = ref_policy_loss(old, y, adv, mask, low, high, clip.get("clip_ratio_c", 3.0), mode)
    # the clip fractions are float32 unless the mask is float64 (verl's .float() of a comparison)
    for name, a, b, t in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), ours, exact,
                             (1e-12, 1e-6, 1e-12, 1e-6)):
        torch.testing.assert_close(a.double(), b, rtol=t, atol=t, equal_nan=True, msg=name)
    assert ours[2].requires_grad and not ours[1].requires_grad
    g_ours = torch.autograd.grad(ours[0], x)[0]
    g_exact = torch.autograd.grad(exact[0], y)[0]
    torch.testing.assert_close(g_ours, g_exact, rtol=1e-12, atol=1e-12)


BATCHES = [{}, dict(dp_size=2, batch_num_tokens=50, global_batch_size=6, loss_scale_factor=64)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", BATCHES, ids=["local", "global"])
@pytest.mark.parametrize("as_object", [False, True])
def test_policy_loss_vanilla_reads_verls_config(device, mode, batch, as_object):
    old, new, adv, mask = policy_inputs((4, 37), device, mask_dtype=torch.float64, seed=3)
    weights = torch.rand(4, 37, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device) + 0.5
    config = dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=2.0, global_batch_info=batch)
    if as_object:  # verl's ActorConfig is read by attribute
        config = SimpleNamespace(**config)
    x = new.clone().requires_grad_()
    y = new.clone().requires_grad_()
    pg_loss, metrics = verl.compute_policy_loss_vanilla(old, x, adv, mask, mode, config, weights)
    exact = ref_policy_loss(old, y, adv, mask, 0.2, 0.28, 2.0, mode, weights, **batch)
    torch.testing.assert_close(pg_loss, exact[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(pg_loss, x)[0], torch.autograd.grad(exact[0], y)[0], rtol=1e-12,
                               atol=1e-12)
    names = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
    assert list(metrics) == list(names) and all(type(v) is float for v in metrics.values())
    for name, value in zip(names, exact[1:]):
        assert metrics[name] == pytest.approx(value.item(), rel=1e-12, abs=1e-12), name


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_with_no_selected_token_is_verls(device, mode):
    old, new, adv, mask = policy_inputs((3, 8), device)
    x = new.clone().requires_grad_()
    pg_loss, clipfrac, kl, lower = verl.compute_policy_loss(old, x, adv, torch.zeros_like(mask), cliprange=0.2,
                                                            loss_agg_mode=mode)
    assert (pg_loss == 0) if mode == "seq-mean-token-sum-norm" else pg_loss.isnan()  # verl's 0/0
    assert clipfrac == kl == lower == 0
    assert torch.autograd.grad(pg_loss, x)[0].abs().max() == 0


def test_policy_loss_clamps_the_log_ratio_as_verl(device):
    old = torch.zeros(2, 3, dtype=torch.float64, device=device)
    new = torch.tensor([[-25.0, -19.0, 0.1], [25.0, 0.0, -30.0]], dtype=torch.float64, device=device)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, -2.0]], dtype=torch.float64, device=device)
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    x = new.clone().requires_grad_()
    y = new.clone().requires_grad_()
    ours = verl.compute_policy_loss(old, x, adv, mask, cliprange=0.2)
    exact = ref_policy_loss(old, y, adv, mask, 0.2, 0.2, 3.0, "token-mean")
    for a, b, t in zip(ours, exact, (1e-13, 1e-7, 1e-13, 1e-7)):  # float32 clip fractions (a bool mask)
        torch.testing.assert_close(a.double(), b, rtol=t, atol=1e-15)
    g = torch.autograd.grad(ours[0], x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(exact[0], y)[0], rtol=1e-13, atol=1e-15)
    assert g[0, 0] == 0 and g[0, 1] != 0  # beyond -20 the clamp takes the gradient away


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_low_precision(device, dtype, mode):
    old, new, adv, mask = policy_inputs((6, 41), device, dtype=dtype, seed=7)
    x = new.clone().requires_grad_()
    y = new.double().clone().requires_grad_()
    ours = verl.compute_policy_loss(old, x, adv, mask, cliprange=0.2, loss_agg_mode=mode)
    exact = ref_policy_loss(old, y, adv, mask, 0.2, 0.2, 3.0, mode)
    seq = mode in ("seq-mean-token-sum", "seq-mean-token-mean")
    assert ours[0].dtype == (torch.float32 if seq else dtype)  # verl's dtype for these inputs
    torch.testing.assert_close(ours[0].double(), exact[0], rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(ours[2].double(), exact[2], rtol=tol(dtype), atol=tol(dtype))
    g = torch.autograd.grad(ours[0], x)[0]
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), torch.autograd.grad(exact[0], y)[0], rtol=tol(dtype), atol=tol(dtype))


def test_policy_loss_mixed_dtypes_promote(device):
    old, new, adv, mask = policy_inputs((3, 9), device, dtype=torch.float32)
    pg_loss = verl.compute_policy_loss(old, new.bfloat16(), adv, mask.float(), cliprange=0.2)[0]
    assert pg_loss.dtype == torch.float32
    pg_loss = verl.compute_policy_loss(old, new, adv, mask.double(), cliprange=0.2)[0]
    assert pg_loss.dtype == torch.float64  # a float64 mask promotes, as in verl


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.float64])
def test_agg_loss_matches_verl_definition(device, mode, mask_dtype):
    _, _, loss, mask = policy_inputs((5, 13), device, mask_dtype=mask_dtype, seed=11)
    x = loss.clone().requires_grad_()
    y = loss.clone().requires_grad_()
    ours, exact = verl.agg_loss(x, mask, mode), ref_agg(y, mask, mode)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(exact, y)[0])
    if mode == "token-mean":
        torch.testing.assert_close(verl.agg_loss(x, mask, mode, dp_size=4, batch_num_tokens=20).double(),
                                   (y * mask.double()).sum() / 20 * 4)
    if mode == "seq-mean-token-sum-norm":
        torch.testing.assert_close(verl.agg_loss(x, mask, mode, loss_scale_factor=7).double(),
                                   (y * mask.double()).sum() / 7)
    assert verl.agg_loss(loss.bfloat16(), mask, mode).dtype == verl._agg_dtype(torch.bfloat16, mask.dtype, mode)


def test_agg_loss_empty_mask_is_nan_as_verl(device):
    loss = torch.randn(3, 4, dtype=torch.float64, device=device)
    mask = torch.zeros(3, 4, dtype=torch.bool, device=device)
    assert verl.agg_loss(loss, mask, "token-mean").isnan()
    assert verl.agg_loss(loss, mask, "seq-mean-token-mean").isnan()
    assert verl.agg_loss(loss, mask, "seq-mean-token-sum-norm") == 0


# ------------------------------------------------------------------ torch.compile


def test_under_torch_compile_fullgraph():
    """Each function traces into one graph (the kernels as custom ops); the eager backend keeps the
    test to tracing, which is where a graph break would come from."""
    logits = make_logits((3, 5, 11), "cpu", seed=4).requires_grad_()
    index = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(4))
    top = torch.randint(0, 11, (3, 5, 4), generator=torch.Generator().manual_seed(5))
    old, new, adv, mask = policy_inputs((4, 9), "cpu", seed=4)
    new.requires_grad_()
    calls = [(trl.selective_log_softmax, (logits, index)), (trl.selective_log_softmax, (logits, top)),
             (verl.entropy_from_logits, (logits,)), (openrlhf.log_probs_from_logits, (logits, index, 0.5)),
             (verl.compute_policy_loss, (old, new, adv, mask, 0.2))]
    for fn, args in calls:
        compiled = as_tuple(torch.compile(fn, fullgraph=True, backend="eager")(*args))
        eager = as_tuple(fn(*args))
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        leaf = new if fn is verl.compute_policy_loss else logits
        torch.testing.assert_close(weighted_grad(compiled[0], leaf), weighted_grad(eager[0], leaf), rtol=1e-12,
                                   atol=1e-12)


# ------------------------------------------------------------------ errors name the argument


def test_errors_name_the_argument():
    logits = torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="labels has dtype"):
        verl.logprobs_from_logits(logits, labels.float())
    with pytest.raises(ValueError, match="labels has shape"):
        openrlhf.log_probs_from_logits(logits, labels[:3])
    with pytest.raises(IndexError, match="labels holds 10"):
        verl.logprobs_from_logits(logits, torch.full((4,), 10))
    with pytest.raises(IndexError, match="index holds -1"):
        trl.selective_log_softmax(logits, torch.full((4, 3), -1))
    with pytest.raises(ValueError, match="temperature"):
        trl.selective_log_softmax(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        openrlhf.log_probs_from_logits(logits, labels, temperature=-1.0)
    with pytest.raises(TypeError, match="logits has dtype"):
        trl.entropy_from_logits(logits.long())
    with pytest.raises(ValueError, match="row_mask has shape"):
        trl.selective_log_softmax(logits, labels, row_mask=torch.ones(3, dtype=torch.bool))
    old, new, adv, mask = policy_inputs((3, 5), "cpu")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl.compute_policy_loss(old, new, adv, mask, cliprange=0.2, loss_agg_mode="seq-sum")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        verl.compute_policy_loss(old, new, adv, mask, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="cliprange"):
        verl.compute_policy_loss(old, new, adv, mask)
    with pytest.raises(ValueError, match="response_mask has shape"):
        verl.compute_policy_loss(old, new, adv, mask[:2], cliprange=0.2)
    with pytest.raises(ValueError, match="advantages has shape"):
        verl.compute_policy_loss(old, new, adv[:, :1], mask, cliprange=0.2)
    with pytest.raises(ValueError, match="config is None"):
        verl.compute_policy_loss_vanilla(old, new, adv, mask)
    with pytest.raises(ValueError, match="global_batch_info has keys"):
        verl.compute_policy_loss_vanilla(old, new, adv, mask, config=dict(clip_ratio=0.2, global_batch_info=dict(x=1)))
    with pytest.raises(ValueError, match="rollout_is_weights has shape"):
        verl.compute_policy_loss_vanilla(old, new, adv, mask, config=dict(clip_ratio=0.2), rollout_is_weights=adv[:1])
    with pytest.raises(ValueError, match="needs 2-D"):
        verl.agg_loss(adv.reshape(-1), mask.reshape(-1), "seq-mean-token-sum")
