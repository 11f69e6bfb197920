"""fastppo.ppo_loss against CleanRL's loss written in torch (tests/peers.py) and a plain masked/aggregated
reference."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402
from fastppo import ppo_loss  # noqa: E402

from peers import cleanrl_loss, torch_categorical  # noqa: E402
from references import ppo_loss_reference as reference_loss  # noqa: E402

STATS = ("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac")
EXTRA_STATS = ("kl", "clipfrac_low", "clipfrac_high")  # PPOLossOutput's attributes


def batch(shape, dtype=torch.float64, device="cpu", seed=0, spread=0.3):
    """Random PPO minibatch: logprob changes large enough that many ratios clip."""
    g = torch.Generator().manual_seed(seed)

    def randn(scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    old_logprob = randn() - 1.0
    old_value = randn()
    return dict(
        new_logprob=(old_logprob + randn(spread)).requires_grad_(),
        old_logprob=old_logprob,
        advantages=randn() + 0.3,
        new_value=(old_value + randn(spread)).requires_grad_(),
        old_value=old_value,
        returns=randn(),
        entropy=(torch.rand(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)).requires_grad_(),
    )


DIFFERENTIABLE = ("new_logprob", "new_value", "entropy")


def values_and_grads(fn, inputs, **kwargs):
    """Stats and gradients of `fn(**inputs, **kwargs)` on fresh leaves."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in inputs.items()}
    out = fn(**leaves, **kwargs)
    if hasattr(out, "_asdict"):
        out = dict(out._asdict(), **{k: getattr(out, k) for k in EXTRA_STATS if hasattr(out, k)})
    present = [leaves[k] for k in DIFFERENTIABLE if k in leaves]
    grads = torch.autograd.grad(out["loss"], present, allow_unused=True)
    return {k: v.detach() for k, v in out.items()}, dict(zip([k for k in DIFFERENTIABLE if k in leaves], grads))


def assert_match(ours, theirs, rtol, atol, stats=STATS, grad_floor=1e-30):
    """Values within rtol / atol; gradients within rtol and atol times their largest magnitude (or
    grad_floor: where the gradient is a sum that cancels, as a sequence ratio's over normalized
    advantages, its rounding is relative to the terms summed, not to the near-0 result)."""
    (ov, og), (tv, tg) = ours, theirs
    for k in ("loss",) + stats:
        torch.testing.assert_close(ov[k].cpu(), tv[k].cpu().to(ov[k].dtype), rtol=rtol, atol=atol, msg=k)
    for k in tg:
        expected = tg[k] if tg[k] is not None else torch.zeros_like(og[k])
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(og[k].cpu(), expected.cpu(), rtol=rtol, atol=atol * max(scale, grad_floor), msg=k)


SIZES = [2, 97, 4096, 100003]


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("clip_vloss", [True, False])
def test_equals_cleanrl_float64(device, B, clip_vloss):
    inputs = batch(B, device=device, seed=B)
    kwargs = dict(ent_coef=0.01, clip_vloss=clip_vloss)
    assert_match(values_and_grads(ppo_loss, inputs, **kwargs), values_and_grads(cleanrl_loss, inputs, **kwargs),
                 rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("B", SIZES)
def test_equals_cleanrl_float32(device, B):
    inputs = batch(B, dtype=torch.float32, device=device, seed=B + 1)
    kwargs = dict(ent_coef=0.01, vf_coef=0.5, clip_coef=0.1)
    assert_match(values_and_grads(ppo_loss, inputs, **kwargs), values_and_grads(cleanrl_loss, inputs, **kwargs),
                 rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("parts", [("new_logprob", "old_logprob", "advantages"),
                                   ("new_logprob", "old_logprob", "advantages", "entropy"),
                                   ("new_logprob", "old_logprob", "advantages", "new_value", "returns")])
def test_optional_parts_and_no_normalization(device, parts):
    inputs = {k: v for k, v in batch(500, device=device, seed=3).items() if k in parts}
    kwargs = dict(ent_coef=0.05, norm_adv=False, clip_vloss=False)
    assert_match(values_and_grads(ppo_loss, inputs, **kwargs), values_and_grads(cleanrl_loss, inputs, **kwargs),
                 rtol=1e-9, atol=1e-12)


def test_single_element_is_finite_and_documented(device):
    inputs = batch(1, device=device, seed=5)
    values, grads = values_and_grads(ppo_loss, inputs)
    # A lone advantage normalizes to 0: no policy gradient, only the value term.
    assert values["pg_loss"].item() == 0.0
    assert all(torch.isfinite(v).all() for v in values.values())
    assert grads["new_logprob"].abs().max().item() == 0.0
    # Without normalization it is CleanRL's loss on one element.
    assert_match(values_and_grads(ppo_loss, inputs, norm_adv=False), values_and_grads(cleanrl_loss, inputs, norm_adv=False),
                 rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(97,), (8, 33), (1025, 3)])
def test_mask_equals_the_loss_on_the_selected_elements(device, shape):
    inputs = batch(shape, device=device, seed=7)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(shape, generator=g) < 0.7).to(device)
    mask.view(-1)[0] = True
    ours = values_and_grads(ppo_loss, dict(inputs, mask=mask), ent_coef=0.01)
    selected = {k: v.detach()[mask] for k, v in inputs.items()}
    theirs_values, theirs_grads = values_and_grads(cleanrl_loss, selected, ent_coef=0.01)
    # Scatter CleanRL's gradients on the selected elements back; the rest must be exactly zero.
    full_grads = {}
    for k, grad in theirs_grads.items():
        full = torch.zeros(shape, dtype=grad.dtype, device=device)
        full[mask] = grad
        full_grads[k] = full
    assert_match(ours, (theirs_values, full_grads), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 97), (33, 7), (3, 5000)])
def test_agg_modes_against_the_plain_reference(device, agg, B, T):
    inputs = batch((B, T), device=device, seed=B * T)
    g = torch.Generator().manual_seed(B)
    mask = (torch.rand((B, T), generator=g) < 0.8).to(device)
    mask[0, 0] = True
    if B > 2:
        mask[1] = False  # a sequence without a single valid token
        mask[2] = True
    kwargs = dict(mask=mask, agg=agg, ent_coef=0.01, vf_clip_coef=0.3)
    assert_match(values_and_grads(ppo_loss, inputs, **kwargs), values_and_grads(reference_loss, inputs, **kwargs),
                 rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dual_clip", [1.5, 3.0])
def test_dual_clip(device, dual_clip):
    inputs = batch(3000, device=device, seed=11, spread=1.5)
    kwargs = dict(dual_clip=dual_clip, ent_coef=0.01)
    ours = values_and_grads(ppo_loss, inputs, **kwargs)
    assert_match(ours, values_and_grads(reference_loss, inputs, **kwargs), rtol=1e-9, atol=1e-12)
    plain = values_and_grads(ppo_loss, inputs, ent_coef=0.01)
    assert ours[0]["pg_loss"].item() < plain[0]["pg_loss"].item()  # the bound is active somewhere


def test_transposed_and_strided_views(device):
    inputs = batch((64, 9), device=device, seed=13)
    as_views = {k: v.detach().t().contiguous().t().requires_grad_(k in DIFFERENTIABLE) for k, v in inputs.items()}
    assert not as_views["new_logprob"].is_contiguous()
    kwargs = dict(agg="seq-mean-token-mean", ent_coef=0.01)
    assert_match(values_and_grads(ppo_loss, as_views, **kwargs), values_and_grads(reference_loss, inputs, **kwargs),
                 rtol=1e-9, atol=1e-12)
    every_other = {k: v.detach()[::2] for k, v in batch(200, device=device, seed=14).items()}
    assert_match(values_and_grads(ppo_loss, every_other), values_and_grads(cleanrl_loss, every_other),
                 rtol=1e-9, atol=1e-12)
    flat3d = batch((4, 5, 6), device=device, seed=15)
    flat = {k: v.detach().reshape(-1) for k, v in flat3d.items()}
    ours_values, ours_grads = values_and_grads(ppo_loss, flat3d)
    theirs_values, theirs_grads = values_and_grads(cleanrl_loss, flat)
    assert_match((ours_values, {k: g.reshape(-1) for k, g in ours_grads.items()}), (theirs_values, theirs_grads),
                 rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ratio_overflow_stays_finite_and_takes_the_clipped_branch(device, dtype):
    n = 6
    old = torch.zeros(n, dtype=dtype, device=device)
    new = torch.full((n,), 800.0, dtype=dtype, device=device, requires_grad=True)  # exp overflows
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.0, 0.5], dtype=dtype, device=device)
    out = ppo_loss(new, old, adv, norm_adv=False, clip_coef=0.2)
    (grad,) = torch.autograd.grad(out.loss, new)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss, (-adv * 1.2).mean())
    assert grad.abs().max().item() == 0.0
    # CleanRL's eager formula has no such guard.
    eager = cleanrl_loss(new, old, adv, norm_adv=False).loss
    assert not torch.isfinite(eager) or not torch.isfinite(torch.autograd.grad(eager, new)[0]).all()


def test_no_selected_element_gives_zeros(device):
    inputs = batch((3, 4), device=device, seed=2)
    mask = torch.zeros((3, 4), dtype=torch.bool, device=device)
    for agg in ("token-mean", "seq-mean-token-sum"):
        values, grads = values_and_grads(ppo_loss, dict(inputs, mask=mask), agg=agg, ent_coef=0.1)
        assert all(v.item() == 0.0 for v in values.values())
        assert all(g.abs().max().item() == 0.0 for g in grads.values())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_any_nonzero_mask_value_selects_like_true(device, agg):
    # The kernel reads a nonzero mask value as "selected"; the entropy's gradient used the mask's
    # values as weights (twice the gradient where the mask held 2, the opposite sign at -1).
    inputs = batch((3, 8), device=device, seed=4)
    selected = torch.rand((3, 8), generator=torch.Generator().manual_seed(2)) < 0.6
    want = values_and_grads(ppo_loss, dict(inputs, mask=selected.to(device)), agg=agg, ent_coef=0.3)
    for on in (2, -1, 0.5):
        mask = torch.where(selected, torch.tensor(on), torch.tensor(0 * on)).to(device)
        got = values_and_grads(ppo_loss, dict(inputs, mask=mask), agg=agg, ent_coef=0.3)
        assert_match(got, want, rtol=1e-12, atol=1e-12)  # (a wider mask takes the strided loop: ulps apart)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_a_batch_of_no_sequences_gives_zeros(device, agg):
    # [0, T]: no rows. The kernel was handed the address of an empty row-scale buffer (0) and refused
    # the call with "missing output or workspace buffer".
    inputs = batch((0, 5), device=device, seed=1)
    values, grads = values_and_grads(ppo_loss, inputs, agg=agg, ent_coef=0.1)
    assert all(v.item() == 0.0 for v in values.values())
    assert all(g.shape == (0, 5) for g in grads.values())


def test_same_bits_run_after_run(device):
    inputs = batch(300001, dtype=torch.float32, device=device, seed=21)
    first = values_and_grads(ppo_loss, inputs, ent_coef=0.01)
    for _ in range(3):
        again = values_and_grads(ppo_loss, inputs, ent_coef=0.01)
        for k in first[0]:
            assert torch.equal(first[0][k], again[0][k]), k
        for k in first[1]:
            assert torch.equal(first[1][k], again[1][k]), k


def test_optimizer_update_matches_the_eager_formula():
    """A CleanRL-style update (Adam, minibatches, epochs, grad clipping) on fixed data lands on the
    same parameters with fastppo.ppo_loss as with the eager formula."""
    torch.manual_seed(0)
    obs_dim, n_actions, batch_size = 4, 3, 256
    agent = torch.nn.ModuleDict(dict(
        actor=torch.nn.Sequential(torch.nn.Linear(obs_dim, 32), torch.nn.Tanh(), torch.nn.Linear(32, n_actions)),
        critic=torch.nn.Sequential(torch.nn.Linear(obs_dim, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)),
    )).double()
    obs = torch.randn(batch_size, obs_dim, dtype=torch.float64)
    with torch.no_grad():
        dist = torch.distributions.Categorical(logits=agent["actor"](obs))
        actions = dist.sample()
        old_logprob = dist.log_prob(actions)
        old_value = agent["critic"](obs).squeeze(-1)
    advantages = torch.randn(batch_size, dtype=torch.float64)
    returns = advantages + old_value

    def train(loss_fn):
        model = copy.deepcopy(agent)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, eps=1e-5)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for idx in torch.randperm(batch_size, generator=g).split(64):
                new_logprob, entropy = torch_categorical(model["actor"](obs[idx]), actions[idx])
                out = loss_fn(new_logprob=new_logprob, old_logprob=old_logprob[idx],
                              advantages=advantages[idx], new_value=model["critic"](obs[idx]).squeeze(-1),
                              old_value=old_value[idx], returns=returns[idx], entropy=entropy, ent_coef=0.01)
                loss = out.loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                optimizer.step()
        return model

    ours, theirs = train(ppo_loss), train(cleanrl_loss)
    moved = 0.0
    for (name, p), q, p0 in zip(ours.named_parameters(), theirs.parameters(), agent.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3  # the update did something


def test_opcheck():
    inputs = {k: v.detach() for k, v in batch(50, seed=4).items()}
    mask = torch.arange(50) % 3 != 0
    for value, entropy, m, agg_shape in [(True, True, None, None), (False, False, mask, None), (True, True, None, (5, 10))]:
        args = [inputs["new_logprob"].clone().requires_grad_(), inputs["old_logprob"], inputs["advantages"]]
        args += [inputs["new_value"].clone().requires_grad_(), inputs["old_value"], inputs["returns"]] if value else [None] * 3
        args += [inputs["entropy"].clone().requires_grad_() if entropy else None, m]
        if agg_shape is not None:
            args = [a.reshape(agg_shape).detach().requires_grad_(a.requires_grad) if a is not None else None for a in args]
        args += [0.2, 0.5, 0.01, 0.2, 0.0, True, True, 1 if agg_shape else 0]
        torch.library.opcheck(torch.ops.fastppo.ppo_loss.default, tuple(args))
        if agg_shape is None:  # a data-parallel group's advantage moments
            group = torch.tensor([100.0, 0.3, 80.0], dtype=torch.float64)
            torch.library.opcheck(torch.ops.fastppo.ppo_loss.default, tuple(args) + (group, 2.0))


def test_torch_compile_fullgraph_matches_eager():
    inputs = batch((16, 12), seed=9)
    mask = torch.rand((16, 12), generator=torch.Generator().manual_seed(0)) < 0.8

    def step(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy):
        out = ppo_loss(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask=mask,
                       ent_coef=0.01, agg="seq-mean-token-mean")
        return out.loss, out.approx_kl, out.clipfrac

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = {k: (v.detach().clone().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in inputs.items()}
        loss, kl, clipfrac = fn(**leaves)
        grads = torch.autograd.grad(loss, [leaves[k] for k in DIFFERENTIABLE])
        results.append((loss.detach(), kl, clipfrac) + grads)
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


def good():
    return {k: v.detach() for k, v in batch(8, seed=0).items()}


@pytest.mark.parametrize(
    "changes,kwargs,error,words",
    [
        (dict(new_logprob=[0.0] * 8), {}, TypeError, ["new_logprob", "list"]),
        (dict(new_logprob=torch.zeros(8, dtype=torch.int64)), {}, TypeError, ["new_logprob", "int64"]),
        (dict(old_logprob=torch.zeros(8, dtype=torch.float32)), {}, TypeError, ["old_logprob", "float32", "float64"]),
        (dict(advantages=torch.zeros(7, dtype=torch.float64)), {}, ValueError, ["advantages", "(7,)", "(8,)"]),
        (dict(advantages=torch.zeros(8, dtype=torch.complex128)), {}, TypeError, ["advantages", "complex128"]),
        (dict(returns=None), {}, ValueError, ["new_value", "returns"]),
        (dict(old_value=None), {}, ValueError, ["clip_vloss", "old_value"]),
        (dict(new_value=None), {}, ValueError, ["without new_value"]),
        (dict(entropy=torch.zeros(8, 1, dtype=torch.float64)), {}, ValueError, ["entropy", "(8, 1)"]),
        (dict(mask=torch.zeros(8, dtype=torch.complex64)), {}, TypeError, ["mask", "complex64"]),
        (dict(old_logprob=torch.zeros(8, dtype=torch.float64, device="meta")), {}, ValueError, ["old_logprob", "meta"]),
        ({}, dict(clip_coef=0.0), ValueError, ["clip_coef", "> 0"]),
        ({}, dict(clip_coef=float("nan")), ValueError, ["clip_coef"]),
        ({}, dict(dual_clip=1.0), ValueError, ["dual_clip", "> 1"]),
        ({}, dict(vf_clip_coef=-1.0), ValueError, ["vf_clip_coef"]),
        ({}, dict(ent_coef="0.01"), TypeError, ["ent_coef", "str"]),
        ({}, dict(agg="mean"), ValueError, ["agg", "token-mean"]),
        ({}, dict(agg="seq-mean-token-sum"), ValueError, ["agg", "2-D", "(8,)"]),
    ],
)
def test_bad_input_names_the_argument(changes, kwargs, error, words):
    inputs = good()
    inputs.update(changes)
    assert_refused(inputs, kwargs, error, words)


def assert_refused(inputs, kwargs, error, words):
    with pytest.raises(error) as info:
        ppo_loss(**inputs, **kwargs)
    message = str(info.value)
    assert message.startswith("fastppo.ppo_loss:")
    for word in words:
        assert word in message, (word, message)


def test_lazy_torch_import_exposes_the_loss():
    assert fastppo.ppo_loss is ppo_loss
    assert fastppo.PPOLossOutput._fields == ("loss",) + STATS


def test_incoming_gradient_scales_the_saved_gradients(device):
    inputs = batch(300, device=device, seed=31)
    grads = []
    for factor in (1.0, -2.5):
        leaves = {k: (v.detach().clone().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in inputs.items()}
        out = ppo_loss(**leaves, ent_coef=0.01)
        grads.append(torch.autograd.grad(out.loss * factor, [leaves[k] for k in DIFFERENTIABLE]))
    for one, scaled in zip(*grads):
        torch.testing.assert_close(scaled, -2.5 * one, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_group_moments_make_the_mean_of_ranks_the_loss_over_their_union(ranks):
    """K calls, each on one rank's rows with the union's advantage moments and group_size K, average
    to the one call on all the rows: loss, stats and gradients (masks give the ranks unequal counts)."""
    rows = 97
    inputs = batch(rows, seed=21)
    mask = torch.rand(rows, generator=torch.Generator().manual_seed(5)) < 0.7
    whole = ppo_loss(**inputs, mask=mask, ent_coef=0.01)
    whole.loss.backward()
    want = {k: inputs[k].grad.clone() for k in ("new_logprob", "new_value", "entropy")}
    sel = inputs["advantages"][mask]
    moments = torch.stack([sel.new_tensor(float(sel.numel())), sel.mean(), ((sel - sel.mean()) ** 2).sum()])
    parts = torch.tensor_split(torch.arange(rows), ranks)
    outs, grads = [], {k: torch.zeros_like(v) for k, v in want.items()}
    for part in parts:
        leaves = {k: inputs[k].detach()[part].clone().requires_grad_() for k in want}
        data = {k: v.detach()[part] for k, v in inputs.items() if k not in want}
        out = ppo_loss(**leaves, **data, mask=mask[part], ent_coef=0.01, group_moments=moments, group_size=ranks)
        out.loss.backward()
        outs.append(torch.stack(list(out)).detach())
        for k in want:
            grads[k][part] = leaves[k].grad / ranks  # the all-reduce's mean
    torch.testing.assert_close(torch.stack(outs).mean(0), torch.stack(list(whole)).detach(), rtol=1e-12, atol=1e-12)
    for k in want:
        torch.testing.assert_close(grads[k], want[k], rtol=1e-12, atol=1e-12)


def test_group_moments_bad_input():
    inputs = batch(16, seed=2)
    good = torch.tensor([16.0, 0.1, 3.0], dtype=torch.float64)
    with pytest.raises(TypeError, match="group_moments"):
        ppo_loss(**inputs, group_moments=good.float())
    with pytest.raises(ValueError, match="group_moments"):
        ppo_loss(**inputs, group_moments=good[:2])
    with pytest.raises(ValueError, match="group_size"):
        ppo_loss(**inputs, group_moments=good, group_size=0)
    for wrong_kind in (2.0, "2", True):  # not an int: the wrong kind of object
        with pytest.raises(TypeError, match="group_size"):
            ppo_loss(**inputs, group_moments=good, group_size=wrong_kind)
    two_d = batch((4, 4), seed=2)
    with pytest.raises(ValueError, match="token-mean"):
        ppo_loss(**two_d, group_moments=good, agg="seq-mean-token-mean")


# ---------------------------------------------------------------- the loss family of LLM training

ALL_STATS = STATS + EXTRA_STATS


def llm_batch(shape, dtype=torch.float64, device="cpu", seed=0, spread=0.3, masked=0.2):
    """batch() plus what the LLM options read: the reference policy's log-probs, truncated importance
    weights (some at the truncation bound), and a mask with an empty sequence when there are rows
    enough (padding after each response is what it stands for)."""
    inputs = batch(shape, dtype=dtype, device=device, seed=seed, spread=spread)
    g = torch.Generator().manual_seed(seed + 1)
    old = inputs["old_logprob"].detach().cpu().double()
    ref = old + torch.randn(shape, generator=g, dtype=torch.float64) * 0.4
    weights = torch.exp(torch.randn(shape, generator=g, dtype=torch.float64) * 0.3).clamp(max=1.3)
    mask = torch.rand(shape, generator=g) >= masked
    if len(shape) == 2 and shape[0] > 2:
        mask[1] = False
    return dict(inputs, ref_logprob=ref.to(dtype=dtype, device=device),
                is_weights=weights.to(dtype=dtype, device=device), mask=mask.to(device))


# Each option alone, with the arguments that switch it on.
OPTIONS = {
    "clip_coef_high": dict(clip_coef=0.2, clip_coef_high=0.28),
    "clip_coef_high_below": dict(clip_coef=0.3, clip_coef_high=0.1),
    "is_weights": dict(use=("is_weights",)),
    "agg_norm": dict(agg="seq-mean-token-sum-norm"),
    "kl_k1": dict(use=("ref_logprob",), kl_coef=0.1, kl_estimator="k1"),
    "kl_k2": dict(use=("ref_logprob",), kl_coef=0.1, kl_estimator="k2"),
    "kl_k3": dict(use=("ref_logprob",), kl_coef=0.04, kl_estimator="k3"),
    "kl_reported_only": dict(use=("ref_logprob",), kl_estimator="k3"),
    "sequence": dict(ratio_level="sequence"),
    "sequence_clip_high": dict(ratio_level="sequence", clip_coef=3e-4, clip_coef_high=4e-4),
}
PLAIN = ("new_logprob", "old_logprob", "advantages", "mask")


def family_case(inputs, option, **more):
    """The inputs the option reads and its keyword arguments."""
    kwargs = dict(OPTIONS[option], **more)
    use = PLAIN + kwargs.pop("use", ())
    return {k: v for k, v in inputs.items() if k in use}, kwargs


def family_values_and_grads(inputs, option):
    case, kwargs = family_case(inputs, option)
    return values_and_grads(ppo_loss, case, **kwargs)


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("B,T", [(1, 1), (4, 97), (3, 1025), (97, 5), (1, 4099)])
def test_each_option_alone_against_the_reference(device, option, B, T):
    inputs, kwargs = family_case(llm_batch((B, T), device=device, seed=B + T), option)
    ours = values_and_grads(ppo_loss, inputs, **kwargs)
    assert_match(ours, values_and_grads(reference_loss, inputs, **kwargs), rtol=1e-9, atol=1e-12, stats=ALL_STATS, grad_floor=1e-6)


def test_each_option_changes_the_result():
    # So the comparisons above can fail: every option moves the loss, a stat or the gradient.
    inputs = llm_batch((6, 50), seed=3, spread=0.6)
    plain_values, plain_grads = values_and_grads(ppo_loss, {k: inputs[k] for k in PLAIN})
    for option in OPTIONS:
        if option == "kl_reported_only":
            continue
        values, grads = family_values_and_grads(inputs, option)
        moved = [k for k in ("loss",) + ALL_STATS if not torch.equal(values[k], plain_values[k])]
        assert moved and not torch.equal(grads["new_logprob"], plain_grads["new_logprob"]), option
    values, grads = family_values_and_grads(inputs, "kl_reported_only")
    assert values["kl"].item() > 0 and torch.equal(values["loss"], plain_values["loss"])
    assert torch.equal(grads["new_logprob"], plain_grads["new_logprob"])


@pytest.mark.parametrize("agg", sorted(fastppo.loss.AGG_MODES))
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("B,T", [(1, 97), (5, 33), (2, 1025)])
def test_options_combined_against_the_reference(device, agg, ratio_level, B, T):
    inputs = llm_batch((B, T), device=device, seed=B * T, spread=0.5)
    kwargs = dict(agg=agg, ratio_level=ratio_level, clip_coef=0.2, clip_coef_high=0.28, kl_coef=0.05,
                  kl_estimator="k3", ent_coef=0.01, vf_clip_coef=0.3, dual_clip=3.0)
    ours = values_and_grads(ppo_loss, inputs, **kwargs)
    assert_match(ours, values_and_grads(reference_loss, inputs, **kwargs), rtol=1e-9, atol=1e-12, stats=ALL_STATS, grad_floor=1e-6)
    without_value = {k: v for k, v in inputs.items() if k not in ("new_value", "old_value", "returns")}
    kwargs.update(norm_adv=False, kl_estimator="k2")  # GRPO: group advantages, no critic
    assert_match(values_and_grads(ppo_loss, without_value, **kwargs),
                 values_and_grads(reference_loss, without_value, **kwargs), rtol=1e-9, atol=1e-12, stats=ALL_STATS, grad_floor=1e-6)


@pytest.mark.parametrize("option", ["is_weights", "kl_k3", "sequence", "agg_norm"])
def test_float32_against_the_reference(device, option):
    inputs = llm_batch((7, 300), dtype=torch.float32, device=device, seed=5)
    inputs, kwargs = family_case(inputs, option)
    as64 = {k: v.detach().double() if v.is_floating_point() else v for k, v in inputs.items()}
    ours = values_and_grads(ppo_loss, inputs, **kwargs)
    want_values, want_grads = values_and_grads(reference_loss, as64, **kwargs)
    assert_match(ours, ({k: v.float() for k, v in want_values.items()}, {k: g.float() for k, g in want_grads.items()}),
                 rtol=1e-4, atol=1e-5, stats=ALL_STATS)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("layout", ["one_chunk_rows", "rows_over_chunks", "strided", "unmasked"])
def test_float32_critic_free_loops_against_the_reference(device, kl_estimator, ratio_level, layout):
    """The float32 loops without a value model (the KL term and the sequence ratio's last pass inside
    the main sweep when a row is one chunk) against the float64 reference: rows of one chunk, rows
    over several (4099 > the 4096-element chunk), a strided view (the element loop), no mask."""
    shape = (5, 4099) if layout == "rows_over_chunks" else (6, 300)
    inputs = llm_batch(shape, dtype=torch.float32, device=device, seed=11)
    inputs = {k: v for k, v in inputs.items() if k in PLAIN + ("ref_logprob", "is_weights")}
    if layout == "unmasked":
        del inputs["mask"]
    if layout == "strided":
        inputs = {k: torch.stack([v.detach(), v.detach()], -1)[..., 0].requires_grad_(v.requires_grad)
                  for k, v in inputs.items()}
        assert inputs["new_logprob"].stride(-1) == 2
    kwargs = dict(ratio_level=ratio_level, kl_estimator=kl_estimator, kl_coef=0.05, clip_coef_high=0.28, dual_clip=3.0,
                  agg="seq-mean-token-mean", norm_adv=False)
    as64 = {k: v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v for k, v in inputs.items()}
    want_values, want_grads = values_and_grads(reference_loss, as64, **kwargs)
    assert_match(values_and_grads(ppo_loss, inputs, **kwargs),
                 ({k: v.float() for k, v in want_values.items()}, {k: g.float() for k, g in want_grads.items()}),
                 rtol=1e-4, atol=1e-5, stats=ALL_STATS)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_token_masked_gives_zeros(device, option):
    inputs = llm_batch((3, 9), device=device, seed=8)
    inputs["mask"] = torch.zeros((3, 9), dtype=torch.bool, device=device)
    values, grads = family_values_and_grads(inputs, option)
    assert all(v.item() == 0.0 for v in values.values())
    assert grads["new_logprob"].abs().max().item() == 0.0


def test_non_contiguous_views_against_the_reference(device):
    inputs = llm_batch((40, 7), device=device, seed=13, spread=0.5)
    # [B, T] views of [T, B] storage, as a time-major buffer read batch-major
    views = {k: v.detach().t().contiguous().t().requires_grad_(k in DIFFERENTIABLE) for k, v in inputs.items()}
    assert not views["ref_logprob"].is_contiguous() and not views["is_weights"].is_contiguous()
    kwargs = dict(ratio_level="sequence", clip_coef_high=0.28, kl_coef=0.05, kl_estimator="k3",
                  agg="seq-mean-token-sum-norm", ent_coef=0.01)
    assert_match(values_and_grads(ppo_loss, views, **kwargs), values_and_grads(reference_loss, inputs, **kwargs),
                 rtol=1e-9, atol=1e-12, stats=ALL_STATS, grad_floor=1e-6)
    # every other column: a stride of 2 along T
    wide = llm_batch((6, 64), device=device, seed=14)
    strided = {k: v.detach()[:, ::2] for k, v in wide.items()}
    assert_match(values_and_grads(ppo_loss, strided, **kwargs), values_and_grads(reference_loss, strided, **kwargs),
                 rtol=1e-9, atol=1e-12, stats=ALL_STATS, grad_floor=1e-6)


def test_sequence_ratio_is_one_ratio_per_sequence():
    # One token per sequence: the sequence ratio is the token's. And a sequence's tokens all get the
    # same d loss / d log-prob from the policy term when their advantages are equal (GRPO).
    inputs = llm_batch((9, 1), seed=2, masked=0.0)
    assert_match(values_and_grads(ppo_loss, inputs, ratio_level="sequence"), values_and_grads(ppo_loss, inputs),
                 rtol=1e-12, atol=1e-15, stats=ALL_STATS)
    inputs = llm_batch((4, 30), seed=3, masked=0.3)
    inputs["advantages"] = torch.randn(4, 1, dtype=torch.float64).expand(4, 30)
    _, grads = values_and_grads(ppo_loss, inputs, ratio_level="sequence", norm_adv=False)
    for row, sel in zip(grads["new_logprob"], inputs["mask"]):
        assert (row[~sel] == 0).all()
        if sel.any():
            torch.testing.assert_close(row[sel], row[sel][:1].expand(int(sel.sum())), rtol=0, atol=0)


def test_unpacks_into_seven_values_with_the_new_stats_as_attributes():
    inputs = llm_batch((3, 8), seed=1)
    out = ppo_loss(inputs["new_logprob"], inputs["old_logprob"], inputs["advantages"], mask=inputs["mask"],
                   ref_logprob=inputs["ref_logprob"], kl_coef=0.1)
    loss, pg_loss, v_loss, entropy, approx_kl, old_approx_kl, clipfrac = out
    assert loss is out.loss and clipfrac is out.clipfrac and len(out) == 7
    for name in EXTRA_STATS:
        value = getattr(out, name)
        assert value.shape == () and not value.requires_grad
    assert out.kl.item() != 0.0
    plain = ppo_loss(inputs["new_logprob"], inputs["old_logprob"], inputs["advantages"])
    assert plain.kl.item() == 0.0  # no reference: no KL


def test_torch_compile_fullgraph_matches_eager_with_the_family():
    inputs = llm_batch((16, 12), seed=9)
    mask, ref, weights = inputs.pop("mask"), inputs.pop("ref_logprob"), inputs.pop("is_weights")

    def step(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy):
        out = ppo_loss(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask=mask,
                       ent_coef=0.01, agg="seq-mean-token-sum-norm", clip_coef_high=0.28, is_weights=weights,
                       ratio_level="sequence", ref_logprob=ref, kl_coef=0.05, kl_estimator="k3")
        return out.loss, out.clipfrac, out.kl, out.clipfrac_low, out.clipfrac_high

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = {k: (v.detach().clone().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in inputs.items()}
        outs = fn(**leaves)
        grads = torch.autograd.grad(outs[0], [leaves[k] for k in DIFFERENTIABLE])
        results.append((outs[0].detach(),) + outs[1:] + grads)
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0)


def test_opcheck_with_the_family():
    inputs = llm_batch((5, 10), seed=4)
    args = [inputs["new_logprob"].detach().clone().requires_grad_(), inputs["old_logprob"], inputs["advantages"],
            None, None, None, None, inputs["mask"], 0.2, 0.5, 0.0, 0.2, 0.0, True, False, 3, None, 1.0,
            inputs["is_weights"], inputs["ref_logprob"], 0.28, 0.05, 2, True]
    torch.library.opcheck(torch.ops.fastppo.ppo_loss.default, tuple(args))


def low_precision_errors(fn, inputs, dtype, **kwargs):
    """The max abs error of fn on `dtype` inputs against the float64 reference on the same (rounded)
    inputs: of the loss, of each stat, and of the gradient."""
    rounded = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    exact = {k: v.double() if v.is_floating_point() else v for k, v in rounded.items()}
    want_values, want_grads = values_and_grads(reference_loss, exact, **kwargs)
    got_values, got_grads = values_and_grads(fn, rounded, **kwargs)
    assert got_grads["new_logprob"].dtype == dtype
    errors = {k: (got_values[k].double() - want_values[k]).abs().item() for k in ("loss", "pg_loss", "kl")}
    errors["grad"] = (got_grads["new_logprob"].double() - want_grads["new_logprob"]).abs().max().item()
    return errors, got_values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_low_precision_within_the_error_of_torch_in_that_precision(device, dtype, ratio_level):
    # The error budget is torch's own: the same formula (the reference) run in bf16 / fp16.
    inputs = llm_batch((8, 257), device=device, seed=6, spread=0.2)
    kwargs = dict(ratio_level=ratio_level, clip_coef_high=0.28, kl_coef=0.05, kl_estimator="k3", ent_coef=0.01,
                  agg="seq-mean-token-mean")
    ours, values = low_precision_errors(ppo_loss, inputs, dtype, **kwargs)
    torchs, _ = low_precision_errors(reference_loss, inputs, dtype, **kwargs)
    for k in ours:
        assert ours[k] <= 2 * torchs[k] + 1e-6, (k, ours[k], torchs[k])
    assert all(values[k].dtype == torch.float32 for k in ("loss",) + ALL_STATS)  # stats in float32


def test_low_precision_gradients_flow_to_value_and_entropy(device):
    inputs = {k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v
              for k, v in llm_batch((4, 16), device=device, seed=7).items()}
    values, grads = values_and_grads(ppo_loss, inputs, ent_coef=0.01, kl_coef=0.1)
    assert all(grads[k].dtype == torch.bfloat16 and grads[k].abs().max() > 0 for k in DIFFERENTIABLE)
    want_values, want_grads = values_and_grads(
        ppo_loss, {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}, ent_coef=0.01, kl_coef=0.1)
    for k in DIFFERENTIABLE:  # the float32 kernel on the same values, its gradients rounded once
        torch.testing.assert_close(grads[k], want_grads[k].to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(values["loss"], want_values["loss"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(clip_coef_high=0.0), ValueError, ["clip_coef_high", "> 0"]),
        (dict(clip_coef_high=-0.1), ValueError, ["clip_coef_high", "-0.1"]),
        (dict(clip_coef_high=float("inf")), ValueError, ["clip_coef_high"]),
        (dict(clip_coef_high="0.28"), TypeError, ["clip_coef_high", "str"]),
        (dict(kl_estimator="k4"), ValueError, ["kl_estimator", "'k4'", "k1", "k3"]),
        (dict(kl_estimator=3), ValueError, ["kl_estimator", "3"]),
        (dict(ratio_level="seq"), ValueError, ["ratio_level", "'seq'", "sequence"]),
        (dict(ratio_level="sequence", flat=True), ValueError, ["ratio_level", "2-D", "(24,)"]),
        (dict(ref_logprob=torch.zeros(4, 5, dtype=torch.float64)), ValueError, ["ref_logprob", "(4, 5)", "(4, 6)"]),
        (dict(ref_logprob=torch.zeros(4, 6, dtype=torch.float32)), TypeError, ["ref_logprob", "float32", "float64"]),
        (dict(is_weights=torch.zeros(4, 6, 1, dtype=torch.float64)), ValueError, ["is_weights", "(4, 6, 1)"]),
        (dict(is_weights=torch.zeros(4, 6, dtype=torch.int64)), TypeError, ["is_weights", "int64"]),
        (dict(kl_coef=-0.1, ref=True), ValueError, ["kl_coef", ">= 0", "-0.1"]),
        (dict(kl_coef=float("nan"), ref=True), ValueError, ["kl_coef", "nan"]),
        (dict(kl_coef=float("inf"), ref=True), ValueError, ["kl_coef", "inf"]),
        (dict(kl_coef=0.1), ValueError, ["kl_coef", "ref_logprob"]),
        (dict(agg="seq-mean-token-sum-norm", flat=True), ValueError, ["agg", "2-D"]),
    ],
)
def test_family_bad_input_names_the_argument(kwargs, error, words):
    kwargs = dict(kwargs)
    inputs = {k: v.detach() for k, v in batch((4, 6), seed=0).items() if k in ("new_logprob", "old_logprob", "advantages")}
    if kwargs.pop("flat", False):
        inputs = {k: v.reshape(-1) for k, v in inputs.items()}
    if kwargs.pop("ref", False):
        kwargs["ref_logprob"] = inputs["old_logprob"]
    assert_refused(inputs, kwargs, error, words)
