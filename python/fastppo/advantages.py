"""Generalized advantage estimation (``fastppo.gae``)."""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

from . import _C
from . import _buffers as B
from ._deprecation import renamed_keywords

_FN = "fastppo.gae"


@renamed_keywords(_FN, lam="gae_lambda")
def gae(
    rewards: Any,
    values: Any,
    dones: Any,
    last_value: Any,
    terminated: Any = None,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
    *,
    out: Optional[Tuple[Any, Any]] = None,
) -> Tuple[Any, Any]:
    """Generalized advantage estimation over a time-major rollout.

    Args:
        rewards: ``[T, ...]`` float32 or float64 (numpy array, or torch tensor on CPU or CUDA), or
            bfloat16 / float16 (torch; numpy's float16 too), computed through float32: see below.
            Any trailing shape: ``[T]``, ``[T, N]``, ``[T, N, K]``. Strided views (for example a
            batch-major ``[B, T]`` tensor passed as ``x.T``) are read in place.
        values: ``[T, ...]``, same dtype as ``rewards``: V(s_t), the critic's value of the
            observation each transition started from.
        dones: ``[T, ...]``, bool or 0/1 integers or floats: the episode ended at transition t
            (terminated or truncated). It cuts the advantage trace.
        last_value: ``[...]`` (``rewards.shape[1:]``), same dtype as ``rewards``: the value of the
            observation after the last transition. A Python number is used for every env.
        terminated: ``[T, ...]`` like ``dones``, or None: the episode really terminated at t, so
            nothing is bootstrapped. None means ``terminated = dones`` (truncation treated as
            termination, as CleanRL does). With ``dones[t] = 1`` and ``terminated[t] = 0`` (a
            time-limit truncation) the trace is cut but ``values[t + 1]`` is still bootstrapped;
            with EnvPool's next-step auto-reset that is the value of the final observation.
        gamma: discount in [0, 1].
        gae_lambda: GAE lambda in [0, 1]. ``lam``, its name before, still works this release with a
            DeprecationWarning.
        out: optional ``(advantages, returns)`` pair of C-contiguous ``[T, ...]`` arrays of the
            kind, dtype and device of ``rewards`` to write into (a rollout buffer reused every
            iteration saves allocating and first-touching two arrays per call). They must not
            overlap the inputs or each other; numpy arrays must be writeable and of native byte
            order, tensors must not require grad.

    Returns:
        ``(advantages, returns)``, each ``[T, ...]`` with the dtype of ``rewards``, as the same kind
        of array on the same device: new contiguous arrays, or the ``out`` pair.
        ``returns = advantages + values``.

    Per transition t, with ``next_value = values[t + 1]`` (``last_value`` at ``t = T - 1``)::

        delta[t] = rewards[t] + gamma * (1 - terminated[t]) * next_value - values[t]
        adv[t]   = delta[t] + gamma * gae_lambda * (1 - dones[t]) * adv[t + 1],   adv[T] = 0

    Any nonzero flag counts as 1. CleanRL stores ``dones[t]`` as "observation t starts a new
    episode"; the mapping to this function is one line::

        fastppo_dones = torch.cat([cleanrl_dones[1:], next_done[None]])

    CUDA tensors are processed on the current stream of their device, without a host sync.

    bfloat16 / float16 rewards (and then values and last_value of that dtype, and ``out`` too):
    rewards, values and last_value are widened to float32 (exact), the float32 kernel runs, and the
    advantages and returns are rounded once to the input dtype, so they are within one rounding of
    that dtype (a relative 2^-8 for bfloat16, 2^-11 for float16) of the float64 result on the same
    inputs. The float32 copies cost two ``[T, ...]`` float32 arrays in and two out.
    """
    kind = B.require_array(_FN, "rewards", rewards, dtypes=B.FLOAT_DTYPES + B.LOW_PRECISION_DTYPES)
    if rewards.ndim == 0:
        raise ValueError(f"{_FN}: rewards must have a time dimension [T, ...], got a 0-d array")
    shape = tuple(rewards.shape)
    T, trailing = shape[0], shape[1:]
    N = 1
    for d in trailing:
        N *= d
    B.require_like(_FN, "values", values, rewards, "rewards")
    B.require_like(_FN, "dones", dones, rewards, "rewards", B.FLAG_DTYPES)
    if terminated is None:
        terminated = dones
    else:
        B.require_like(_FN, "terminated", terminated, rewards, "rewards", B.FLAG_DTYPES)
    if isinstance(last_value, numbers.Real) and not isinstance(last_value, bool):
        last = B.full_like_scalar(rewards, float(last_value))
        last_stride = 0  # one value read for every env
    else:
        B.require_like(_FN, "last_value", last_value, rewards, "rewards", shape=trailing,
                       shape_what="rewards.shape[1:] (the value of the observation after the last step)")
        last = last_value
        last_stride = None
    gamma = B.require_real(_FN, "gamma", gamma, "a number in [0, 1]", 0.0, 1.0)
    gae_lambda = B.require_real(_FN, "gae_lambda", gae_lambda, "a number in [0, 1]", 0.0, 1.0)
    B.check_device(_FN, "rewards", rewards)
    if B.is_low_precision(rewards):
        if out is not None:
            _check_out(out, rewards, (rewards, values, dones, terminated, last))
        adv, ret = gae(B.widen(rewards), B.widen(values), dones, B.widen(last_value), terminated, gamma, gae_lambda)
        if out is None:
            return B.narrow(adv, rewards), B.narrow(ret, rewards)
        return B.narrow(adv, rewards, out[0]), B.narrow(ret, rewards, out[1])

    if out is None:
        adv, ret = B.empty_like_rows(rewards, T, N), B.empty_like_rows(rewards, T, N)
    else:
        adv, ret = _check_out(out, rewards, (rewards, values, dones, terminated, last))
    r, v, d, m = (B.rows(x, T, N) for x in (rewards, values, dones, terminated))
    if last_stride is None and last.ndim == 1 and kind == "torch":
        last_buf = B.Buffer(last, B.data_arg(last), (0, B.strides_of(last)[0]), r.dtype)
    else:
        last_buf = B.rows(last, 1, N if last_stride is None else 1)
    if last_stride is None:
        last_stride = last_buf.strides[1]
    _C.gae(
        T, N, r.dtype, (r.data, *r.strides), (v.data, *v.strides), (d.data, *d.strides), d.dtype,
        (m.data, *m.strides), m.dtype, (last_buf.data, last_stride), B.data_arg(adv), B.data_arg(ret),
        gamma, gae_lambda, *B.device_stream(rewards),
    )
    if out is not None:
        return out[0], out[1]
    if len(shape) != 2:
        adv, ret = adv.reshape(shape), ret.reshape(shape)
    return adv, ret


def _check_out(out: Any, rewards: Any, inputs: tuple) -> Tuple[Any, Any]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{_FN}: out must be an (advantages, returns) pair of arrays, got {B.describe(out)}")
    for name, x in zip(("out[0]", "out[1]"), out):
        B.require_like(_FN, name, x, rewards, "rewards")
        B.require_writable(_FN, name, x)
        if not B.is_c_contiguous(x):
            raise ValueError(f"{_FN}: {name} must be C-contiguous, got strides {B.strides_of(x)}")
        if any(B.may_overlap(x, i) for i in inputs):
            raise ValueError(f"{_FN}: {name} overlaps an input array; the outputs must be separate memory")
    if B.may_overlap(out[0], out[1]):
        raise ValueError(f"{_FN}: out[0] and out[1] overlap; the outputs must be separate memory")
    return out[0], out[1]
