"""RLHF with PPO: the language model is the policy, a reward model trained on rankings scores its
responses, PPO updates it, and a per-token KL penalty against a frozen reference keeps it close
to what it knew. The critic-free group methods (GRPO, Dr. GRPO, RLOO) run in the same loop
without the value model (``PPOConfig.algo``).

- kernels: :func:`kl_penalty_rewards`, :func:`masked_whiten`, :func:`token_gae`, :func:`masked_mean`
- critic-free advantages: :func:`group_advantages` (GRPO, Dr. GRPO, RLOO over groups of responses)
- models: :class:`TinyGPT`, :class:`ScalarHeadModel` (reward and value models), :func:`lm_forward`
  (also any transformers causal LM), :func:`bradley_terry_loss`, :func:`frozen_copy`
- the loop: :class:`PPOConfig` (:mod:`fastppo.rlhf.config`), :class:`PPOTrainer` (:mod:`fastppo.rlhf.ppo`),
  :func:`generate`, :func:`truncate_after_eos`, :class:`Rollout` and each algorithm's advantages
  (:mod:`fastppo.rlhf.rollout`)
- the offline demo and CLI: ``fastppo rlhf`` (:mod:`fastppo.rlhf.run`, task in :mod:`fastppo.rlhf.digits`)
"""

from .config import PPOConfig
from .group import group_advantages
from .kernels import ShapedRewards, kl_penalty_rewards, masked_mean, masked_whiten, token_gae
from .models import (GPTConfig, ScalarHeadModel, TinyGPT, bradley_terry_loss, frozen_copy, lm_forward,
                     position_ids_from_mask)
from .ppo import AdaptiveKLController, PPOTrainer
from .rollout import Rollout, generate, truncate_after_eos

__all__ = [
    "AdaptiveKLController", "GPTConfig", "PPOConfig", "PPOTrainer", "Rollout", "ScalarHeadModel", "ShapedRewards",
    "TinyGPT", "bradley_terry_loss", "frozen_copy", "generate", "group_advantages", "kl_penalty_rewards",
    "lm_forward", "masked_mean", "masked_whiten", "position_ids_from_mask", "token_gae", "truncate_after_eos",
]
