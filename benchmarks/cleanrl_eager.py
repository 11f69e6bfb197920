"""The end-to-end baseline: fastppo's trainer with CleanRL's eager torch computations in place of
the kernels, so the two runs differ in nothing but the kernels (same envs, network, seeds,
hyperparameters, env boundary).

Each function follows CleanRL's ppo.py / ppo_continuous_action.py lines, adapted only to the
conventions of the function it replaces (fastppo's ``dones`` / ``terminated`` semantics, and the
mask that drops EnvPool's dummy reset steps: CleanRL's formula is applied to the selected
elements).
"""

from __future__ import annotations

import torch

from fastppo import PPOLossOutput
from fastppo.train import Kernels


def gae(rewards, values, dones, last_value, terminated=None, gamma=0.99, lam=0.95):
    """CleanRL's backward loop, one time step per iteration, in fastppo's convention."""
    terminated = dones if terminated is None else terminated
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(T)):
        nextvalues = last_value if t == T - 1 else values[t + 1]
        nextnonterminal = 1.0 - terminated[t].to(values.dtype)
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * lam * (1.0 - dones[t].to(values.dtype)) * lastgaelam
    return advantages, advantages + values


def ppo_loss(new_logprob, old_logprob, advantages, new_value=None, old_value=None, returns=None, entropy=None,
             mask=None, clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=True, norm_adv=True, **_):
    """CleanRL's loss lines on the selected elements."""
    if mask is not None:
        new_logprob, old_logprob, advantages = new_logprob[mask], old_logprob[mask], advantages[mask]
        new_value, old_value, returns, entropy = new_value[mask], old_value[mask], returns[mask], entropy[mask]
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    mb_advantages = advantages
    if norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    if clip_vloss:
        v_loss_unclipped = (new_value - returns) ** 2
        v_clipped = old_value + torch.clamp(new_value - old_value, -clip_coef, clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((new_value - returns) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + v_loss * vf_coef
    return PPOLossOutput(loss, pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), approx_kl, old_approx_kl, clipfrac)


def categorical_logprob_entropy(logits, actions, temperature=1.0):
    dist = torch.distributions.Categorical(logits=logits / temperature)
    return dist.log_prob(actions), dist.entropy()


def normal_logprob_entropy(mean, log_std, actions):
    dist = torch.distributions.Normal(mean, log_std.expand_as(mean).exp())
    return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)


EAGER = Kernels(gae=gae, ppo_loss=ppo_loss, categorical_logprob_entropy=categorical_logprob_entropy,
                normal_logprob_entropy=normal_logprob_entropy, channels_last=False)
