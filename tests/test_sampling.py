"""fastppo.categorical_sample: Gumbel-max sampling with the log-prob and entropy of the sample, against
a plain float64 reference that draws the same uniform noise from the same generator."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402


def reference(logits: torch.Tensor, temperature: float, seed: int):
    """The same draw in plain torch, float64: u from a generator seeded alike, then
    argmax(x / T - log(-log u)), log_softmax and the entropy."""
    g = torch.Generator(device=logits.device).manual_seed(seed)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    u = torch.rand(logits.shape, generator=g, dtype=acc, device=logits.device)
    x = logits.double() / temperature
    tiny = torch.finfo(acc).tiny
    action = (x - torch.log(-torch.log(u.double().clamp(min=tiny)))).argmax(-1)
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return action, logp.gather(-1, action[..., None])[..., 0], entropy


@pytest.mark.parametrize("rows,A", [(1, 1), (1, 7), (97, 2), (1025, 6), (3, 1025)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_matches_reference(device, rows, A, dtype, temperature):
    torch.manual_seed(rows * 131 + A)
    logits = (3 * torch.randn(rows, A, dtype=dtype)).to(device)
    g = torch.Generator(device=device).manual_seed(7)
    action, logprob, entropy = fastppo.categorical_sample(logits, temperature=temperature, generator=g)
    ref_action, ref_logprob, ref_entropy = reference(logits, temperature, 7)
    assert action.dtype == torch.int64 and action.shape == (rows,)
    # float32 scores may order two near-equal candidates differently from float64: allow a few rows
    agree = (action == ref_action).double().mean().item()
    assert agree == 1.0 if dtype == torch.float64 else agree > 0.99
    # log-prob and entropy of the action actually taken
    want_lp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, action[:, None])[:, 0]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logprob.double(), want_lp, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=tol, atol=tol * 10)
    assert logprob.dtype == dtype and entropy.dtype == dtype


def test_leading_shape_and_strided_logits(device):
    torch.manual_seed(0)
    base = torch.randn(6, 5, 4, dtype=torch.float64, device=device)
    logits = base.transpose(0, 1)  # [5, 6, 4], non-contiguous rows
    g = torch.Generator(device=device).manual_seed(3)
    action, logprob, entropy = fastppo.categorical_sample(logits, generator=g)
    ref_action, ref_logprob, ref_entropy = reference(logits, 1.0, 3)
    assert action.shape == (5, 6)
    torch.testing.assert_close(action, ref_action)
    torch.testing.assert_close(logprob, ref_logprob)
    torch.testing.assert_close(entropy, ref_entropy)


def test_frequencies_follow_softmax():
    torch.manual_seed(1)
    probs = torch.tensor([0.05, 0.5, 0.2, 0.25], dtype=torch.float64)
    n = 200_000
    logits = probs.log().expand(n, 4).contiguous()
    action, _, _ = fastppo.categorical_sample(logits)
    freq = torch.bincount(action, minlength=4).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 5 * sigma).all(), (freq, probs)


def test_masked_actions_are_never_sampled():
    logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf]]).expand(10_000, 4).contiguous()
    action, logprob, entropy = fastppo.categorical_sample(logits)
    assert set(action.unique().tolist()) <= {0, 2}
    assert torch.isfinite(logprob).all() and torch.isfinite(entropy).all()


def test_seeded_by_torch_default_generator():
    logits = torch.randn(64, 9)
    torch.manual_seed(5)
    a1 = fastppo.categorical_sample(logits)
    torch.manual_seed(5)
    a2 = fastppo.categorical_sample(logits)
    for x, y in zip(a1, a2):
        assert torch.equal(x, y)


def test_gradients_when_autograd_records(device):
    torch.manual_seed(2)
    logits = torch.randn(33, 5, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.Generator(device=device).manual_seed(11)
    action, logprob, entropy = fastppo.categorical_sample(logits, temperature=0.9, generator=g)
    w1, w2 = torch.randn(33, dtype=torch.float64, device=device), torch.randn(33, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad((w1 * logprob + w2 * entropy).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(ref_logits / 0.9, -1)
    ref_entropy = -(logp.exp() * logp).sum(-1)
    ref = (w1 * logp.gather(-1, action[:, None])[:, 0] + w2 * ref_entropy).sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="logits has dtype torch.int64"):
        fastppo.categorical_sample(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fastppo.categorical_sample([[0.0, 1.0]])
    with pytest.raises(ValueError, match="A >= 1"):
        fastppo.categorical_sample(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fastppo.categorical_sample(torch.zeros(3, 4), temperature=0.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastppo.categorical_sample(torch.zeros(3, 4), generator="seed")
