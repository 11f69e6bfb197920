"""Drop-ins for single functions of LLM trainers, on fastppo's kernels: change one import.

    from trl.trainer.utils import selective_log_softmax          # before
    from fastppo.compat.trl import selective_log_softmax         # after: same call, same result

- :mod:`fastppo.compat.trl`: ``selective_log_softmax``, ``entropy_from_logits`` and
  ``selective_log_softmax_and_entropy`` (``trl.trainer.utils``).
- :mod:`fastppo.compat.verl`: ``logprobs_from_logits``, ``entropy_from_logits``
  (``verl.utils.torch_functional``), ``compute_policy_loss``, ``compute_policy_loss_vanilla`` and
  ``agg_loss`` (``verl.trainer.ppo.core_algos``), and ``logprobs_and_entropy_from_logits`` (the
  two log-prob and entropy calls of verl's actor in one pass).
- :mod:`fastppo.compat.openrlhf`: ``log_probs_from_logits`` and ``compute_entropy``
  (``openrlhf.models.utils``).

Each has the original's signature, shapes, dtypes and results (values and gradients); where
fastppo's own op differs from the original in a detail, the original's behaviour is kept and the
function's docstring says how. None of these modules imports the trainer it stands in for. Log-probs
and entropies come from :func:`fastppo.categorical_logprob_entropy` (one streaming pass per row,
no ``log_softmax`` of the logits in forward or backward); verl's policy loss from
:func:`fastppo.ppo_loss` (loss and gradient in one pass). The submodules need torch; importing this
package does not import them.
"""
