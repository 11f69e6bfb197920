"""A PPO training script shaped like CleanRL's ppo.py / ppo_continuous_action.py: the same variable
names, the same loop structure and, in the places the recipes of docs/recipes.md replace, the same
lines, so that tests/test_recipes.py can splice those blocks into it and compare a swapped run with
an unswapped one. Written for the tests (short runs on gymnasium's CartPole-v1 / Pendulum-v1); it is
not a training script to use.

Run as ``exec`` of its source with ``SETTINGS`` (a dict) in the namespace; it leaves ``RESULTS``:
per iteration the actions, dones, advantages, returns, losses and the learning rate CleanRL logs
(``charts/learning_rate``), and the final parameters.
"""

import random
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from torch.distributions.categorical import Categorical
from torch.distributions.normal import Normal

import fastppo


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    seed: int = 1
    num_envs: int = 4
    num_steps: int = 128
    num_iterations: int = 2
    learning_rate: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float = None
    shared_trunk: bool = False  # ppo_atari_envpool.py's layout: a `network` trunk, heads on `hidden`


def make_env(env_id, idx):
    def thunk():
        return gym.make(env_id)

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(n_in, n_out, out_std):
    return nn.Sequential(
        layer_init(nn.Linear(n_in, 64)), nn.Tanh(),
        layer_init(nn.Linear(64, 64)), nn.Tanh(),
        layer_init(nn.Linear(64, n_out), std=out_std),
    )


class Agent(nn.Module):  # ppo.py's
    def __init__(self, envs):
        super().__init__()
        n_obs = int(np.array(envs.single_observation_space.shape).prod())
        self.critic = mlp(n_obs, 1, 1.0)
        self.actor = mlp(n_obs, envs.single_action_space.n, 0.01)

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        logits = self.actor(x)
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


class TrunkAgent(nn.Module):  # ppo_atari_envpool.py's layout, with an MLP trunk in place of the CNN
    def __init__(self, envs):
        super().__init__()
        n_obs = int(np.array(envs.single_observation_space.shape).prod())
        self.network = nn.Sequential(layer_init(nn.Linear(n_obs, 64)), nn.Tanh())
        self.actor = layer_init(nn.Linear(64, envs.single_action_space.n), std=0.01)
        self.critic = layer_init(nn.Linear(64, 1), std=1)

    def get_value(self, x):
        return self.critic(self.network(x))

    def get_action_and_value(self, x, action=None):
        hidden = self.network(x)
        logits = self.actor(hidden)
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden)


class ContinuousAgent(nn.Module):  # ppo_continuous_action.py's
    def __init__(self, envs):
        super().__init__()
        n_obs = int(np.array(envs.single_observation_space.shape).prod())
        n_act = int(np.prod(envs.single_action_space.shape))
        self.critic = mlp(n_obs, 1, 1.0)
        self.actor_mean = mlp(n_obs, n_act, 0.01)
        self.actor_logstd = nn.Parameter(torch.zeros(1, n_act))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        action_mean = self.actor_mean(x)
        action_logstd = self.actor_logstd.expand_as(action_mean)
        action_std = torch.exp(action_logstd)
        probs = Normal(action_mean, action_std)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)


if __name__ == "__main__":
    args = Args(**SETTINGS)  # noqa: F821 (given by the test)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    RESULTS = dict(advantages=[], returns=[], pg_loss=[], v_loss=[], entropy_loss=[], approx_kl=[],
                   old_approx_kl=[], clipfrac=[], learning_rate=[], actions=[], dones=[])

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")

    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i) for i in range(args.num_envs)])
    continuous = isinstance(envs.single_action_space, gym.spaces.Box)
    agent = (ContinuousAgent if continuous else TrunkAgent if args.shared_trunk else Agent)(envs).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)

    global_step = 0
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.Tensor(next_obs).to(device)
    next_done = torch.zeros(args.num_envs).to(device)

    for iteration in range(1, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob
            env_action = action.cpu().numpy()
            if continuous:
                env_action = np.clip(env_action, envs.single_action_space.low, envs.single_action_space.high)
            next_obs, reward, terminations, truncations, infos = envs.step(env_action)
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.tensor(reward).to(device).view(-1)
            next_obs, next_done = torch.Tensor(next_obs).to(device), torch.Tensor(next_done).to(device)
        RESULTS["actions"].append(actions.clone())
        RESULTS["dones"].append(dones.clone())

        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards).to(device)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - dones[t + 1]
                    nextvalues = values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values
        RESULTS["advantages"].append(advantages.clone())
        RESULTS["returns"].append(returns.clone())

        b_obs = obs.reshape((-1,) + envs.single_observation_space.shape)
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        b_inds = np.arange(args.batch_size)
        clipfracs = []
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]

                mb_actions = b_actions[mb_inds] if continuous else b_actions.long()[mb_inds]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], mb_actions)
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                surrogate = -mb_advantages * ratio
                surrogate_clipped = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(surrogate, surrogate_clipped).mean()

                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    value_error = (newvalue - b_returns[mb_inds]) ** 2
                    value_step = torch.clamp(newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef)
                    value_error_clipped = (b_values[mb_inds] + value_step - b_returns[mb_inds]) ** 2
                    v_loss = 0.5 * torch.max(value_error, value_error_clipped).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        for name, value in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy_loss", entropy_loss),
                            ("approx_kl", approx_kl), ("old_approx_kl", old_approx_kl)):
            RESULTS[name].append(value.item())
        RESULTS["clipfrac"].append(float(np.mean(clipfracs)))
        RESULTS["learning_rate"].append(optimizer.param_groups[0]["lr"])  # CleanRL's charts/learning_rate

    RESULTS["parameters"] = {k: v.detach().clone() for k, v in agent.state_dict().items()}
    envs.close()
