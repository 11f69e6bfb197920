"""Plain float64 references the kernels are tested against, written for clarity rather than speed.

GAE is numpy; the references of the differentiable ops (the loss, the heads) are torch, so that
their gradients come from autograd; the RLHF ones are torch because the kernels take tensors.
Where a kernel documents that a flag or a mask selects (a terminated step does not bootstrap, an
unselected element is never read), the reference selects too instead of multiplying by 0, so a
non-finite value there cannot leak in through 0 * inf = NaN.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

# torch is imported inside the functions that use it: importing torch sets OpenMP's thread count for
# the whole process, and test_gae runs the numpy references in a process with more threads.

GAMMA, GAE_LAMBDA = 0.99, 0.95


def gae_reference(rewards, values, dones, last_value, terminated=None, gamma=GAMMA, gae_lambda=GAE_LAMBDA):
    """The formula of the design card, in float64, one step at a time. Any nonzero flag counts as
    set; a terminated step does not read the next value, and a step that ends the trace (a done, or
    gamma * gae_lambda = 0) does not read the next advantage."""
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64)
    d = np.asarray(dones) != 0
    term = d if terminated is None else np.asarray(terminated) != 0
    T = r.shape[0]
    adv = np.zeros_like(r)
    next_adv = np.zeros(r.shape[1:])
    with np.errstate(all="ignore"):  # IEEE arithmetic: inf and NaN inputs give inf and NaN
        for t in reversed(range(T)):
            next_value = v[t + 1] if t + 1 < T else np.asarray(last_value, np.float64)
            delta = r[t] + np.where(term[t], 0.0, gamma * next_value) - v[t]
            ends = d[t] | (gamma * gae_lambda == 0.0)
            next_adv = delta + np.where(ends, 0.0, gamma * gae_lambda * next_adv)
            adv[t] = next_adv
        return adv, adv + v


def rollout(T, *trailing, seed=0, done_p=0.05):
    """Random float64 rollout with dones forced at t = 0 and t = T - 1 in the first env and a
    random share of the dones being truncations (terminated = 0)."""
    rng = np.random.default_rng(seed)
    shape = (T, *trailing)
    rewards = rng.normal(size=shape)
    values = rng.normal(size=shape)
    dones = rng.random(shape) < done_p
    first_env = (slice(None),) + (0,) * len(trailing)
    dones[first_env][0] = True
    dones[first_env][-1] = True
    terminated = dones & (rng.random(shape) < 0.5)
    last_value = rng.normal(size=trailing)
    return rewards, values, dones, terminated, last_value


# ---------------------------------------------------------------------------------------------
# fastppo.ppo_loss


def ppo_loss_reference(new_logprob, old_logprob, advantages, new_value=None, old_value=None, returns=None,
                       entropy=None, mask=None, clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=True,
                       vf_clip_coef=None, norm_adv=True, dual_clip=None, agg="token-mean", clip_coef_high=None,
                       is_weights=None, ratio_level="token", ref_logprob=None, kl_coef=0.0, kl_estimator="k1"):
    """The documented semantics, plainly: masked means, per-sequence aggregation, dual clip, and
    the clipped branch (no gradient) where the ratio overflows. Unselected elements are replaced by
    0 before anything reads them. The LLM options follow TRL's GRPOTrainer: the clip
    [1 - clip_coef, 1 + clip_coef_high], per-token weights of the policy term, the sequence ratio
    exp(mean of the selected log-ratios) of GSPO, the loss plus kl_coef times the aggregated KL
    estimate, the constant normalizer B * T of Dr. GRPO, and TRL's low / high clip fractions (TRL
    compares ratio < 1 - clip_coef, here 1 - ratio > clip_coef as CleanRL's clipfrac: the same but
    for rounding at the bound)."""
    import torch
    m = torch.ones_like(new_logprob, dtype=torch.bool) if mask is None else mask != 0
    zero = torch.zeros((), dtype=new_logprob.dtype)
    clip_high = clip_coef if clip_coef_high is None else clip_coef_high

    def only_selected(x):
        return None if x is None else torch.where(m, x, zero)

    new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, is_weights, ref_logprob = map(
        only_selected, (new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, is_weights,
                        ref_logprob))

    def token_mean(x):
        return torch.where(m, x, zero).sum() / m.sum() if m.any() else zero

    def aggregate(x):
        if agg == "token-mean":
            return token_mean(x)
        if agg == "seq-mean-token-sum-norm":
            return torch.where(m, x, zero).sum() / m.numel() if m.numel() else zero
        per_seq = torch.where(m, x, zero).sum(-1)
        counts = m.sum(-1)
        if agg == "seq-mean-token-mean":
            per_seq = per_seq / counts.clamp(min=1)
        keep = counts > 0
        return per_seq[keep].mean() if keep.any() else zero

    token_logratio = new_logprob - old_logprob
    logratio = token_logratio
    if ratio_level == "sequence":
        logratio = (token_logratio.sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(token_logratio)
    ratio = logratio.exp()
    overflow = torch.isposinf(ratio.detach())
    clipped_ratio = torch.where(overflow, 1 + clip_high, torch.where(overflow, zero, logratio).exp())
    adv = advantages
    if norm_adv:
        chosen = advantages[m]
        std = chosen.std() if chosen.numel() >= 2 else zero
        adv = (advantages - chosen.mean()) / (std + 1e-8) if chosen.numel() else advantages
    pg = torch.max(-adv * clipped_ratio, -adv * torch.clamp(clipped_ratio, 1 - clip_coef, 1 + clip_high))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.min(pg, -dual_clip * adv), pg)
    if is_weights is not None:
        pg = pg * is_weights
    v_loss = zero
    if new_value is not None:
        cv = clip_coef if vf_clip_coef is None else vf_clip_coef
        unclipped = (new_value - returns) ** 2
        if clip_vloss:
            clipped = (old_value + torch.clamp(new_value - old_value, -cv, cv) - returns) ** 2
            v_loss = 0.5 * aggregate(torch.max(unclipped, clipped))
        else:
            v_loss = 0.5 * aggregate(unclipped)
    entropy_loss = aggregate(entropy) if entropy is not None else zero
    pg_loss = aggregate(pg)
    kl = zero
    if ref_logprob is not None:
        d = new_logprob - ref_logprob
        per_token_kl = {"k1": d, "k2": 0.5 * d ** 2, "k3": torch.exp(-d) + d - 1}[kl_estimator]
        kl = aggregate(per_token_kl)
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss
    if kl_coef != 0:
        loss = loss + kl_coef * kl
    ratio, token_logratio, adv = ratio.detach(), token_logratio.detach(), adv.detach()
    token_ratio = token_logratio.exp()
    return dict(loss=loss, pg_loss=pg_loss, v_loss=v_loss, entropy=entropy_loss,
                approx_kl=token_mean((token_ratio - 1) - token_logratio), old_approx_kl=token_mean(-token_logratio),
                clipfrac=token_mean(((ratio - 1 > clip_high) | (1 - ratio > clip_coef)).to(ratio.dtype)),
                kl=kl.detach(), clipfrac_low=token_mean(((1 - ratio > clip_coef) & (adv < 0)).to(ratio.dtype)),
                clipfrac_high=token_mean(((ratio - 1 > clip_high) & (adv > 0)).to(ratio.dtype)))


# ---------------------------------------------------------------------------------------------
# Policy heads


def categorical_reference(logits, actions, temperature=1.0):
    """``log softmax(logits / T)[action]`` and ``-sum p log p`` over the last dimension. A -inf
    logit has p = 0 and adds nothing to the entropy; NaN anywhere in a row makes the row NaN."""
    import torch
    logp = torch.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p == 0, torch.zeros((), dtype=logp.dtype), p * logp).sum(-1)
    return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1), entropy


def normal_reference(mean, log_std, actions):
    """Diagonal Gaussian ``sum_d log N(a_d; mean_d, exp(log_std_d))`` and its entropy, with
    ``1 / sigma^2`` written as ``exp(-2 log_std)``; log_std is ``[D]`` (shared) or like mean."""
    import torch
    log_std = log_std.expand_as(mean)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    logprob = (-0.5 * (actions - mean) ** 2 * torch.exp(-2 * log_std) - log_std - half_log_2pi).sum(-1)
    entropy = (0.5 + half_log_2pi + log_std).sum(-1)
    return logprob, entropy


def masked_categorical_reference(logits, actions, mask, temperature=1.0):
    """The categorical head over the legal actions only (``mask`` True): ``log softmax`` of the
    legal logits at the action and ``-sum p log p`` over them; a row without a legal action gives
    0 and 0 with zero gradient. An illegal logit is replaced by -1e300 before anything reads it
    (its p is exactly 0, and autograd through ``p log p`` stays finite), so its gradient is 0 and
    its value, NaN included, never matters; a legal -inf logit is taken as -1e300 likewise."""
    import torch
    legal_any = mask.any(-1)
    x = torch.where(mask, (logits / temperature).clamp(min=-1e300), torch.full_like(logits, -1e300))
    x = torch.where(legal_any.unsqueeze(-1), x, torch.zeros_like(x))  # no legal action: a finite row, unused
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    entropy = -torch.where(mask, p * logp, torch.zeros_like(p)).sum(-1)
    logprob = logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(logprob)
    return torch.where(legal_any, logprob, zero), torch.where(legal_any, entropy, zero)


def multi_categorical_reference(logits, actions, nvec, mask=None, reduce=True):
    """Each component's categorical head (masked by its columns of ``mask`` when given) on its
    columns of ``logits``, one component after the other; summed over components when ``reduce``."""
    import torch
    logprobs, entropies = [], []
    start = 0
    for k, n in enumerate(nvec):
        x = logits[..., start:start + n]
        if mask is None:
            lp, ent = categorical_reference(x, actions[..., k])
        else:
            lp, ent = masked_categorical_reference(x, actions[..., k], mask[..., start:start + n])
        logprobs.append(lp)
        entropies.append(ent)
        start += n
    logprob, entropy = torch.stack(logprobs, -1), torch.stack(entropies, -1)
    return (logprob.sum(-1), entropy.sum(-1)) if reduce else (logprob, entropy)


def tanh_normal_reference(mean, log_std, actions, pre_tanh=None):
    """The tanh-squashed Gaussian at u = ``pre_tanh``, else u = atanh of the actions clamped to
    [-1 + eps, 1 - eps] (eps of their dtype): the Gaussian's log-prob at u minus sum log(1 -
    tanh(u)^2), written as -2 log cosh(u) (exact in float64 for |u| < 710); the entropy is the
    Gaussian's."""
    import torch
    if pre_tanh is None:
        eps = torch.finfo(actions.dtype).eps
        pre_tanh = torch.atanh(actions.clamp(-1 + eps, 1 - eps))
    logprob, entropy = normal_reference(mean, log_std, pre_tanh)
    log_det = -2 * torch.log(torch.cosh(pre_tanh))
    return logprob - log_det.sum(-1), entropy


# ---------------------------------------------------------------------------------------------
# RLHF kernels: float64 on the CPU, one row at a time.


def _selected(mask, B, T):
    import torch
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool)
    return mask.cpu() != 0


def kl_reference(logprob, ref_logprob, mask=None, scores=None, beta=0.05, estimator="k1", kl_clamp=None):
    """Per row: d = logprob - ref_logprob; k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d; clamped to
    [-c, c]; reward -beta * kl at selected tokens, 0 at padding, plus the row's score at its last
    selected token; last_index is that token, or -1."""
    import torch
    lp = logprob.cpu().to(torch.float64)
    rp = ref_logprob.cpu().to(torch.float64)
    B, T = lp.shape
    sel = _selected(mask, B, T)
    kl = torch.zeros(B, T, dtype=torch.float64)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    last = torch.full((B,), -1, dtype=torch.int64)
    for b in range(B):
        d = lp[b] - rp[b]
        if estimator == "k1":
            k = d
        elif estimator == "k2":
            k = d * d / 2
        else:
            k = torch.exp(-d) - 1 + d
        if kl_clamp is not None:
            k = k.clamp(-kl_clamp, kl_clamp)
        kl[b] = torch.where(sel[b], k, torch.zeros((), dtype=torch.float64))
        rewards[b] = torch.where(sel[b], -beta * kl[b], torch.zeros((), dtype=torch.float64))
        chosen = sel[b].nonzero().flatten()
        if len(chosen) > 0:
            last[b] = int(chosen[-1])
            if scores is not None:
                rewards[b, last[b]] += float(scores[b])
    return rewards, kl, last


def whiten_moments(chosen):
    """Mean and unbiased variance (0 with fewer than two) of a list of floats, summed exactly (as
    fractions) when they are finite: a constant selection has variance exactly 0."""
    n = len(chosen)
    if n == 0:
        return 0.0, 0.0
    if not all(math.isfinite(v) for v in chosen):
        mean = sum(chosen) / n
        return mean, sum((v - mean) ** 2 for v in chosen) / (n - 1) if n >= 2 else 0.0
    exact = [Fraction(v) for v in chosen]
    mean = sum(exact) / n
    return float(mean), float(sum((v - mean) ** 2 for v in exact) / (n - 1)) if n >= 2 else 0.0


def whiten_reference(x, mask=None, shift_mean=True, eps=1e-8):
    """TRL's masked_whiten written plainly: mean and unbiased variance of the selected elements
    (variance 0 with fewer than two), (x - mean) / sqrt(var + eps), mean added back when
    shift_mean is False, 0 at unselected elements."""
    import torch
    x = x.cpu().to(torch.float64)
    sel = _selected(mask, *x.shape)
    mean, var = whiten_moments(x[sel].tolist())
    with np.errstate(all="ignore"):
        scale = np.sqrt(np.float64(var) + eps)  # 0 when var + eps is: 0 / 0 is NaN, x / 0 is inf
    out = (x - mean) / scale
    if not shift_mean:
        out = out + mean
    return torch.where(sel, out, torch.zeros((), dtype=torch.float64))


def token_gae_reference(rewards, values, last_index, gamma=1.0, gae_lambda=0.95, mask=None):
    """Each row on its own: tokens 0..last_index (an index past the end counts as T - 1), the
    textbook GAE loop backwards with nothing bootstrapped after the last token (gamma * gae_lambda = 0
    does not read the next advantage); returns = adv + values there, 0 elsewhere and outside the
    mask when one is given."""
    import torch
    r = rewards.cpu().to(torch.float64).tolist()
    v = values.cpu().to(torch.float64).tolist()
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_value, next_adv = 0.0, 0.0
        for t in range(min(int(last_index[b]), T - 1), -1, -1):
            delta = r[b][t] + gamma * next_value - v[b][t]
            next_adv = delta if gamma * gae_lambda == 0.0 else delta + gamma * gae_lambda * next_adv
            adv[b][t] = next_adv
            ret[b][t] = next_adv + v[b][t]
            next_value = v[b][t]
    adv, ret = torch.tensor(adv, dtype=torch.float64).reshape(B, T), torch.tensor(ret, dtype=torch.float64).reshape(B, T)
    if mask is not None:
        keep = mask.cpu() != 0
        zero = torch.zeros((), dtype=torch.float64)
        adv, ret = torch.where(keep, adv, zero), torch.where(keep, ret, zero)
    return adv, ret


def masked_mean_reference(x, mask=None, dim=None):
    """Mean of the selected elements (all of them, or along ``dim``); 0 where none is."""
    import torch
    x = x.cpu().to(torch.float64)
    sel = torch.ones(x.shape, dtype=torch.bool) if mask is None else mask.cpu() != 0
    if dim is None:
        return torch.tensor(x[sel].sum().item() / max(int(sel.sum()), 1), dtype=torch.float64)
    # One mean per line along `dim`: move it last, then one row per line.
    lines, chosen = x.movedim(dim, -1), sel.movedim(dim, -1)
    n_lines = math.prod(lines.shape[:-1])
    rows, row_sel = lines.reshape(n_lines, x.shape[dim]), chosen.reshape(n_lines, x.shape[dim])
    means = [rows[i][row_sel[i]].sum().item() / max(int(row_sel[i].sum()), 1) for i in range(rows.shape[0])]
    return torch.tensor(means, dtype=torch.float64).reshape(lines.shape[:-1])


# ---------------------------------------------------------------------------------------------
# Language-model pieces


def logprob_entropy_reference(hidden, weight, targets, bias=None, temperature=1.0, mask=None):
    """linear_logprob_entropy in float64: the full logits, log_softmax, gather and entropy. A masked
    token reads neither its hidden state nor its target (both replaced by 0) and gives 0."""
    import torch
    m = torch.ones(targets.shape, dtype=torch.bool) if mask is None else mask != 0
    hidden = torch.where(m.unsqueeze(-1), hidden.double(), 0.0)
    logits = hidden @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    taken = logp.gather(-1, torch.where(m, targets.long(), 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(m, taken, 0.0), torch.where(m, entropy, 0.0)


def group_advantages_reference(scores, group_size: int, estimator: str, eps: float) -> np.ndarray:
    """fastppo.rlhf.group_advantages in float64, one group after the other, as the formulas read."""
    x = [float(v) for v in scores]
    out = []
    for start in range(0, len(x), group_size):
        group = x[start:start + group_size]
        g = len(group)
        mean = sum(group) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1)) if g > 1 else 0.0  # group_size 1: 0
        for i, r in enumerate(group):
            if estimator == "dr_grpo":
                out.append(r - mean)
            elif estimator == "rloo":
                others = group[:i] + group[i + 1:]
                out.append(r - sum(others) / len(others))
            elif math.isnan(r - mean):
                out.append(math.nan)
            elif std + eps == 0:  # equal scores and eps 0: defined as 0
                out.append(0.0)
            else:
                out.append((r - mean) / (std + eps))
    return np.array(out, dtype=np.float64)
