"""Property tests of the language-model pieces: hypothesis draws the sizes, layouts, options and
masks, and every draw must equal the plain float64 references of tests/references.py (values and
gradients).

- ``linear_logprob_entropy``: token shapes of 1 or 2 dims (with 1s), H from 1, V from 1 (primes,
  not multiples of the chunk), any chunk size, bias or not, temperature, masks (random, none
  selected, all selected), float32 / float64, ``hidden`` and ``weight`` as non-contiguous views;
- ``linear_ppo_loss``: ``[B, T]`` tokens with ppo_loss's LLM options drawn together (clip-higher,
  dual clip, importance weights, every aggregation, the sequence ratio, a KL term of each
  estimator, the entropy bonus), against ``ppo_loss_reference`` on the reference log-probs;
- ``rlhf.group_advantages``: groups with ties, one-element groups, every estimator and eps.

The example-based tests beside each (tests/test_linear.py, tests/test_group_advantages.py) pin the
named awkward cases; these search the space between them.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastppo  # noqa: E402
from fastppo.rlhf import group_advantages  # noqa: E402
from references import group_advantages_reference, logprob_entropy_reference, ppo_loss_reference  # noqa: E402

SETTINGS = settings(max_examples=int(__import__("os").environ.get("LLM_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}
VOCABS = (1, 2, 3, 13, 31, 97, 101, 257)


def draw_tokens_shape(data, max_dims=2):
    ndim = data.draw(st.integers(1, max_dims), label="token dims")
    return tuple(data.draw(st.sampled_from((1, 1, 2, 3, 5, 9)), label=f"dim {i}") for i in range(ndim))


def draw_mask(data, rng, shape):
    mode = data.draw(st.sampled_from(("none", "random", "none selected", "all selected")), label="mask")
    if mode == "none":
        return None
    if mode == "none selected":
        return torch.zeros(shape, dtype=torch.bool)
    if mode == "all selected":
        return torch.ones(shape, dtype=torch.bool)
    return torch.from_numpy(rng.random(shape) < 0.7)


def view_of(x: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """x itself, or the same values as a view of every other column of a wider buffer (non-contiguous
    unless every dim but one is 1, where torch calls any strides contiguous)."""
    if contiguous:
        return x
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def draw_head(data, rng, shape, dtype):
    """hidden [*shape, H], weight [V, H], bias [V] or None, targets [*shape], leaves of `dtype`,
    hidden and weight possibly non-contiguous."""
    H = data.draw(st.sampled_from((1, 2, 5, 8)), label="H")
    V = data.draw(st.sampled_from(VOCABS), label="V")
    hidden = torch.from_numpy(rng.normal(size=(*shape, H))).to(dtype)
    weight = torch.from_numpy(rng.normal(size=(V, H)) * (2.0 / H ** 0.5)).to(dtype)
    bias = torch.from_numpy(rng.normal(size=V) * 0.5).to(dtype) if data.draw(st.booleans(), label="bias") else None
    hidden = view_of(hidden, data.draw(st.booleans(), label="hidden contiguous")).requires_grad_()
    weight = view_of(weight, data.draw(st.booleans(), label="weight contiguous")).requires_grad_()
    if bias is not None:
        bias.requires_grad_()
    targets = torch.from_numpy(rng.integers(0, V, size=shape))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, V + 3)), label="chunk_size")
    return hidden, weight, bias, targets, chunk


def reference_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def grads(output, tensors):
    """d output / d each tensor (None for an absent one); zeros where output does not depend on it
    (the references' loss over no selected token is a constant)."""
    present = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(output, present, allow_unused=True) if output.requires_grad else [None] * len(present))
    out = []
    for t in tensors:
        if t is not None:
            g = next(got)
            out.append(torch.zeros_like(t) if g is None else g)
        else:
            out.append(None)
    return out


def assert_close(got, want, dtype, what):
    if want is None:
        assert got is None, what
        return
    torch.testing.assert_close(got.detach().double(), want.detach().double(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


@SETTINGS
@given(data=st.data())
def test_linear_logprob_entropy_equals_the_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)), label="dtype")
    shape = draw_tokens_shape(data)
    hidden, weight, bias, targets, chunk = draw_head(data, rng, shape, dtype)
    mask = draw_mask(data, rng, shape)
    temperature = data.draw(st.sampled_from((1.0, 0.7, 1.3)), label="temperature")
    want_entropy = data.draw(st.booleans(), label="entropy")

    logprob, entropy = fastppo.linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                                      mask=mask, entropy=want_entropy, chunk_size=chunk)
    h64, w64, b64 = reference_leaves(hidden, weight, bias)
    ref_logprob, ref_entropy = logprob_entropy_reference(h64, w64, targets, b64, temperature, mask)
    assert logprob.shape == shape and logprob.dtype == dtype
    assert_close(logprob, ref_logprob, dtype, "logprob")
    if want_entropy:
        assert_close(entropy, ref_entropy, dtype, "entropy")
    else:
        assert entropy is None
    if mask is not None:
        assert (logprob[~mask] == 0).all()

    # Gradients of a random weighting of the outputs.
    w_lp = torch.from_numpy(rng.normal(size=shape))
    w_ent = torch.from_numpy(rng.normal(size=shape))
    total = (logprob.double() * w_lp).sum() + ((entropy.double() * w_ent).sum() if want_entropy else 0.0)
    ref_total = (ref_logprob * w_lp).sum() + ((ref_entropy * w_ent).sum() if want_entropy else 0.0)
    got = grads(total, [hidden, weight, bias])
    want = grads(ref_total, [h64, w64, b64])
    for name, g, r in zip(("hidden", "weight", "bias"), got, want):
        assert_close(g, r, dtype, f"d {name}")
    if mask is not None and not mask.any():
        assert not got[0].any() and not got[1].any()


def draw_loss_options(data, rng, shape):
    """ppo_loss's LLM options, drawn together, with the per-token tensors they take."""
    options = dict(
        clip_coef=data.draw(st.sampled_from((0.2, 0.1)), label="clip_coef"),
        clip_coef_high=data.draw(st.sampled_from((None, 0.28)), label="clip_coef_high"),
        dual_clip=data.draw(st.sampled_from((None, 3.0)), label="dual_clip"),
        norm_adv=data.draw(st.booleans(), label="norm_adv"),
        ent_coef=data.draw(st.sampled_from((0.0, 0.01)), label="ent_coef"),
        agg=data.draw(st.sampled_from(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                       "seq-mean-token-sum-norm")), label="agg"),
        ratio_level=data.draw(st.sampled_from(("token", "sequence")), label="ratio_level"),
    )
    if data.draw(st.booleans(), label="is_weights"):
        options["is_weights"] = torch.from_numpy(rng.uniform(0.2, 1.5, size=shape))
    if data.draw(st.booleans(), label="KL term"):
        options["kl_estimator"] = data.draw(st.sampled_from(("k1", "k2", "k3")), label="kl_estimator")
        options["kl_coef"] = data.draw(st.sampled_from((0.0, 0.04)), label="kl_coef")
    return options


@SETTINGS
@given(data=st.data())
def test_linear_ppo_loss_equals_the_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)), label="dtype")
    shape = (data.draw(st.integers(1, 4), label="B"), data.draw(st.sampled_from((1, 2, 7, 9)), label="T"))
    hidden, weight, bias, targets, chunk = draw_head(data, rng, shape, dtype)
    mask = draw_mask(data, rng, shape)
    options = draw_loss_options(data, rng, shape)
    h64, w64, b64 = reference_leaves(hidden, weight, bias)
    ref_logprob, ref_entropy = logprob_entropy_reference(h64, w64, targets, b64, 1.0, mask)
    # The rollout's log-probs near the current ones, so some ratios clip and some do not.
    old_logprob = ref_logprob.detach() + torch.from_numpy(rng.normal(size=shape) * 0.3)
    advantages = torch.from_numpy(rng.normal(size=shape))
    tensors = {k: options[k] for k in ("is_weights",) if k in options}
    if "kl_estimator" in options:
        tensors["ref_logprob"] = ref_logprob.detach() + torch.from_numpy(rng.normal(size=shape) * 0.2)
    kwargs = {k: v for k, v in options.items() if k != "is_weights"}

    out = fastppo.linear_ppo_loss(hidden, weight, targets, old_logprob.to(dtype), advantages.to(dtype), bias=bias,
                                  mask=mask, chunk_size=chunk, **kwargs, **{k: v.to(dtype) for k, v in tensors.items()})
    ref = ppo_loss_reference(ref_logprob, old_logprob, advantages, entropy=ref_entropy, mask=mask, **kwargs, **tensors)
    for name in ("loss", "pg_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac", "kl", "clipfrac_low",
                 "clipfrac_high"):
        assert_close(getattr(out, name), ref[name], dtype, name)
    got = grads(out.loss, [hidden, weight, bias])
    want = grads(ref["loss"], [h64, w64, b64])
    for name, g, r in zip(("hidden", "weight", "bias"), got, want):
        assert_close(g, r, dtype, f"d {name}")


@SETTINGS
@given(data=st.data())
def test_group_advantages_equals_the_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    estimator = data.draw(st.sampled_from(("grpo", "dr_grpo", "rloo")), label="estimator")
    group_size = data.draw(st.integers(2 if estimator == "rloo" else 1, 17), label="group_size")
    groups = data.draw(st.integers(1, 6), label="groups")
    # Scores with ties (a small set of values, as pass/fail rewards give) or continuous.
    if data.draw(st.booleans(), label="ties"):
        scores = rng.integers(0, 3, size=groups * group_size).astype(np.float64)
    else:
        scores = rng.normal(size=groups * group_size) * data.draw(st.sampled_from((1e-3, 1.0, 1e3)), label="scale")
    eps = data.draw(st.sampled_from((0.0, 1e-6, 1e-4)), label="eps")
    dtype = data.draw(st.sampled_from((torch.float64, torch.float32)), label="dtype")
    x = torch.from_numpy(scores).to(dtype)
    got = group_advantages(x, group_size, estimator, eps=eps)
    want = group_advantages_reference(x.double(), group_size, estimator, eps)
    assert got.dtype == dtype and got.shape == x.shape
    assert not torch.isnan(got).any()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
    np.testing.assert_allclose(got.double().numpy(), want, **tol)
    for start in range(0, len(scores), group_size):  # a group of equal scores: exact zeros
        group = x[start:start + group_size]
        if (group == group[0]).all():
            assert (got[start:start + group_size] == 0).all()
