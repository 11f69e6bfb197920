"""The peers fastppo's kernels replace, written as their users write them: CleanRL's GAE loop and
loss lines, torch.distributions' heads and stable-baselines3's GAE loop. The tests check the kernels
against them and the benchmarks time them (benchmarks/_common.py's ``import_peers``).

They are not references: tests/references.py holds the float64 reference of each kernel, written for
clarity (selecting where a flag or mask selects, exact where the peers overflow). These keep the
peers' own operations, in their order, so that what is timed is what users run; each follows its
project's published formulas, with fastppo's argument names where it stands in for a kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from fastppo import PPOLossOutput

# --- GAE -------------------------------------------------------------------------------------------


def cleanrl_gae(rewards, values, starts, next_value, next_done, gamma=0.99, gae_lambda=0.95):
    """CleanRL ppo.py's backward loop over ``[T, N]`` torch tensors, in CleanRL's convention:
    ``starts[t]`` (its ``dones[t]``) says observation t starts an episode, ``next_done`` says the
    observation after the rollout does, and ``next_value`` is that observation's value.

    On numpy arrays it is stable-baselines3's ``RolloutBuffer.compute_returns_and_advantage`` (its
    ``episode_starts``, ``last_values`` and ``dones``): the same recursion and operations, row by row.
    """
    T = rewards.shape[0]
    advantages = np.zeros_like(rewards) if isinstance(rewards, np.ndarray) else torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(T)):
        if t == T - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - starts[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


sb3_gae = cleanrl_gae  # SB3's loop over numpy rows is this one (see above)


def cleanrl_gae_as_fastppo(rewards, values, dones, last_value, terminated=None, gamma=0.99, gae_lambda=0.95):
    """CleanRL's loop with ``fastppo.gae``'s arguments and convention: ``dones[t]`` (the episode
    ended at step t) cuts the trace, ``terminated[t]`` (default ``dones``) the bootstrap."""
    terminated = dones if terminated is None else terminated
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(T)):
        nextvalues = last_value if t == T - 1 else values[t + 1]
        nextnonterminal = 1.0 - terminated[t].to(values.dtype)
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * (1.0 - dones[t].to(values.dtype)) * lastgaelam
    return advantages, advantages + values


# --- The loss --------------------------------------------------------------------------------------


def cleanrl_loss(new_logprob, old_logprob, advantages, new_value=None, old_value=None, returns=None, entropy=None,
                 mask=None, clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=True, norm_adv=True):
    """CleanRL ppo.py's minibatch loss lines in eager torch, with ``fastppo.ppo_loss``'s arguments:
    the stats under no_grad as CleanRL computes them, kept as tensors (CleanRL's ``.item()`` would
    synchronize; fastppo returns tensors too). ``mask`` applies the same lines to the selected
    elements; a missing value or entropy term is 0. Returns a :class:`fastppo.PPOLossOutput`."""
    if mask is not None:
        new_logprob, old_logprob, advantages = new_logprob[mask], old_logprob[mask], advantages[mask]
        new_value, old_value, returns, entropy = (None if x is None else x[mask]
                                                  for x in (new_value, old_value, returns, entropy))
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).to(ratio.dtype).mean()  # CleanRL: .float()
    mb_advantages = advantages
    if norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    if new_value is None:
        v_loss = new_logprob.new_zeros(())
    elif clip_vloss:
        v_loss_unclipped = (new_value - returns) ** 2
        v_clipped = old_value + torch.clamp(new_value - old_value, -clip_coef, clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((new_value - returns) ** 2).mean()
    entropy_loss = new_logprob.new_zeros(()) if entropy is None else entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + v_loss * vf_coef
    return PPOLossOutput(loss, pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), approx_kl,
                         old_approx_kl, clipfrac)


# --- Policy heads ----------------------------------------------------------------------------------


def torch_categorical(logits, actions, temperature=1.0, validate_args=None):
    """``Categorical(logits=logits / temperature)``'s ``log_prob(actions)`` and ``entropy()``
    (logits ``[..., A]``, int64 actions ``[...]``); ``validate_args`` is torch.distributions'."""
    if temperature != 1.0:
        logits = logits / temperature
    dist = torch.distributions.Categorical(logits=logits, validate_args=validate_args)
    return dist.log_prob(actions), dist.entropy()


def maskable_categorical(logits, actions, mask, validate_args=None):
    """sb3-contrib's ``MaskableCategorical``: a copy of the logits with -1e8 where ``mask`` is False,
    ``Categorical`` over it for the log-prob, and the entropy summed over the legal actions only."""
    masked = torch.where(mask, logits, torch.tensor(-1e8, dtype=logits.dtype, device=logits.device))
    dist = torch.distributions.Categorical(logits=masked, validate_args=validate_args)
    p_log_p = torch.where(mask, dist.logits * dist.probs, torch.tensor(0.0, dtype=logits.dtype, device=logits.device))
    return dist.log_prob(actions), -p_log_p.sum(-1)


def torch_multi_categorical(logits, actions, nvec, validate_args=None):
    """SB3's ``MultiCategoricalDistribution``: a ``Categorical`` per component over its split of the
    logits ``[..., sum(nvec)]``; log-probs of the actions ``[..., len(nvec)]`` and entropies
    stacked and summed over the components."""
    dists = [torch.distributions.Categorical(logits=part, validate_args=validate_args)
             for part in torch.split(logits, list(nvec), dim=-1)]
    logprob = torch.stack([d.log_prob(a) for d, a in zip(dists, torch.unbind(actions, dim=-1))], dim=-1).sum(-1)
    entropy = torch.stack([d.entropy() for d in dists], dim=-1).sum(-1)
    return logprob, entropy


def torch_tanh_normal(mean, log_std, actions, validate_args=None):
    """``TransformedDistribution(Normal(mean, log_std.exp()), TanhTransform())``: the log-prob of the
    squashed actions summed over the last dimension, and the base Normal's entropy (the transformed
    distribution has none; fastppo.tanh_normal_logprob_entropy returns that one)."""
    base = torch.distributions.Normal(mean, log_std.exp(), validate_args=validate_args)
    dist = torch.distributions.TransformedDistribution(base, [torch.distributions.TanhTransform()],
                                                       validate_args=validate_args)
    return dist.log_prob(actions).sum(-1), base.entropy().sum(-1)


def torch_normal(mean, log_std, actions, validate_args=None):
    """``Normal(mean, log_std.exp())``'s log-prob and entropy summed over the last dimension, as
    CleanRL's continuous agent takes them (``log_std`` ``[..., D]`` or shared ``[D]``)."""
    dist = torch.distributions.Normal(mean, log_std.exp(), validate_args=validate_args)
    return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)
