"""RLHF with PPO: the language model is the policy, a reward model trained on rankings scores its
responses, PPO updates it, and a per-token KL penalty against a frozen reference keeps it close
to what it knew. The critic-free group methods (GRPO, Dr. GRPO, RLOO) run in the same loop
without the value model (``PPOConfig.algo``).

- kernels: :func:`kl_penalty_rewards`, :func:`masked_whiten`, :func:`token_gae`, :func:`masked_mean`
- critic-free advantages: :func:`group_advantages` (GRPO, Dr. GRPO, RLOO over groups of responses)
- models: :class:`TinyGPT`, :class:`ScalarHeadModel` (reward and value models), :func:`lm_forward`
  (also any transformers causal LM), :func:`response_logprobs` (fused from the hidden state and the LM
  head, or from the logits), :func:`enable_gradient_checkpointing`, :func:`bradley_terry_loss`,
  :func:`frozen_copy`; :func:`build_causal_lm` (:mod:`fastppo.rlhf.build`: TinyGPT, a transformers model
  type or a local Hugging Face directory, nothing downloaded); :class:`MasterWeights`
  (:mod:`fastppo.rlhf.precision`: float32 master weights of a bf16/fp16 model)
- the loop: :class:`PPOConfig` (:mod:`fastppo.rlhf.config`), :class:`PPOTrainer` (:mod:`fastppo.rlhf.ppo`),
  :func:`generate`, :func:`truncate_after_eos`, :class:`Rollout` and each algorithm's advantages
  (:mod:`fastppo.rlhf.rollout`)
- the offline demo and CLI: ``fastppo rlhf`` (:mod:`fastppo.rlhf.run`, task in :mod:`fastppo.rlhf.digits`)
"""

from .build import build_causal_lm
from .config import PPOConfig
from .group import group_advantages
from .kernels import ShapedRewards, kl_penalty_rewards, masked_mean, masked_whiten, token_gae
from .models import (GPTConfig, ScalarHeadModel, TinyGPT, bradley_terry_loss, enable_gradient_checkpointing,
                     frozen_copy, lm_forward, position_ids_from_mask, response_logprobs)
from .ppo import AdaptiveKLController, PPOTrainer
from .precision import MasterWeights
from .rollout import Rollout, generate, truncate_after_eos

__all__ = [
    "AdaptiveKLController", "GPTConfig", "MasterWeights", "PPOConfig", "PPOTrainer", "Rollout", "ScalarHeadModel",
    "ShapedRewards", "TinyGPT", "bradley_terry_loss", "build_causal_lm", "enable_gradient_checkpointing", "frozen_copy",
    "generate", "group_advantages", "kl_penalty_rewards", "lm_forward", "masked_mean", "masked_whiten",
    "position_ids_from_mask", "response_logprobs", "token_gae", "truncate_after_eos",
]
