"""The end-to-end baseline: fastppo's trainer with CleanRL's eager torch computations in place of
the kernels, so the two runs differ in nothing but the kernels (same envs, network, seeds,
hyperparameters, env boundary).

Each function is a peer of tests/peers.py, CleanRL's ppo.py / ppo_continuous_action.py lines
adapted only to the conventions of the function it replaces (fastppo's ``dones`` / ``terminated``
semantics, and the mask that drops EnvPool's dummy reset steps: CleanRL's formula is applied to the
selected elements).
"""

from __future__ import annotations

try:
    from benchmarks import _common as common  # python -m benchmarks.e2e
except ImportError:
    import _common as common  # python benchmarks/e2e.py

from fastppo.train import Kernels

peers = common.import_peers()

EAGER = Kernels(gae=peers.cleanrl_gae_as_fastppo, ppo_loss=peers.cleanrl_loss,
                categorical_logprob_entropy=peers.torch_categorical, normal_logprob_entropy=peers.torch_normal,
                channels_last=False)
