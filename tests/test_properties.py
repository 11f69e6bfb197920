"""Property-based tests (hypothesis) of every public kernel against the float64 references.

The contract, for every generated case: the call either raises the documented error (TypeError
for a wrong kind of object or a wrong dtype, ValueError for a wrong shape or value, IndexError for
a categorical action out of range on the CPU) with a message that starts with the public
function's name and names the argument, or its outputs equal the float64 reference of
tests/references.py within the error budget of the dtype. Inputs are never written.

What is generated: shapes with 0 and 1 along every dimension (and a few long horizons); float32
and float64, and dtypes that must be refused; numpy arrays and torch tensors (on every device the
`device` fixture gives); every argument in one of these memory layouts: contiguous, transposed,
a strided slice of a larger array whose gaps hold values that would show if read (NaN, a set
flag, an index out of range), reversed (negative numpy strides), broadcast (stride 0:
np.broadcast_to, Tensor.expand) and rows overlapping in memory (as_strided); flags and masks all
zero, all one or random, any nonzero value meaning set; dones at t = 0 and t = T - 1 and all-done
rows; NaN and +-inf at random positions.

Non-finite values (read from the wrappers' docstrings and the kernels' comments): arithmetic is
IEEE wherever a value is used, so NaN and inf come out exactly where the float64 reference has
them (compared position by position: NaN for NaN, the same infinity for an infinity), and a value
that a flag or mask says is not used is never read: the next value of a terminated step, the
next advantage where a trace ends, an unselected element of ppo_loss, masked_mean or the RLHF
kernels, a token after a response's last, the log-prob term of a Gaussian's gradient when only the
entropy is differentiated. ppo_loss takes the clipped branch where the ratio overflows
(documented). Gradients are compared the same way, element by element, wherever the inputs the
element is computed from are finite; where one is NaN the loss is NaN and the value of its
gradient a convention (torch's max passes the whole gradient to both sides of a comparison with
NaN, the kernel half of it), so there only an unselected element's zero gradient is required.
The categorical head gives a row with a NaN or +inf logit, or only -inf logits, NaN as
log_softmax does (documented).

Error budgets: an output may differ from the reference by K * eps(dtype) times a bound on the
magnitudes that enter it (as flash-attention bounds low-precision error rather than hand-tuning
an atol), so a float32 result built from large intermediates is held to what float32 can give
and a small one is held tightly; float64 sums add their length times float64's eps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastppo  # noqa: E402
from fastppo.rlhf import kl_penalty_rewards, masked_mean, masked_whiten, token_gae  # noqa: E402

from references import (categorical_reference, gae_reference, kl_reference, masked_mean_reference,  # noqa: E402
                        normal_reference, ppo_loss_reference, token_gae_reference, whiten_moments, whiten_reference)

# The `device` fixture is a constant string (no state to reset between examples), so running every
# example under one fixture value is what is meant: the function-scoped-fixture check is off.
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
REFUSALS = settings(PROPERTY, max_examples=10)  # per kind of defect (parametrized, so that each one is generated)

F64 = np.float64
K = 16  # error budget: K * eps(dtype) * magnitude bound
EPS = {"float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0 ** -7, "float32": float(np.finfo(np.float32).eps),
       "float64": float(np.finfo(np.float64).eps)}
FLOATS = ("float32", "float64")
FLAGS = ("bool", "uint8", "int8", "int32", "int64", "float32", "float64")
NOT_FLOATS = ("float16", "int32", "int64", "bool", "complex64")  # refused where float32/float64 is expected
# refused where float16/bfloat16 are taken too (the heads, GAE, the RLHF kernels)
NOT_FLOATS_OR_HALVES = ("int32", "int64", "bool", "complex64")
NOT_FLAGS = ("float16", "complex64")
SPECIALS = (math.nan, math.inf, -math.inf)
NONFINITE_COUNTS = st.sampled_from((0, 1, 3))  # how many elements of an input are NaN or +-inf

NUMPY_LAYOUTS = ("contiguous", "transposed", "sliced", "reversed", "broadcast", "overlapping")
TORCH_LAYOUTS = ("contiguous", "transposed", "sliced", "broadcast", "overlapping")  # torch has no negative strides


# ---------------------------------------------------------------------------------------------
# Arguments in chosen memory layouts


class Placed(NamedTuple):
    """An argument in a memory layout: ``base`` is the memory, ``view(base)`` the argument (for a
    numpy base or the same memory as a torch tensor)."""

    base: np.ndarray
    view: Callable[[Any], Any]


def _permute(x, perm):
    return x.transpose(perm) if isinstance(x, np.ndarray) else x.permute(perm)


def _as_strided(x, shape, strides):
    if isinstance(x, np.ndarray):
        return np.lib.stride_tricks.as_strided(x, shape, [s * x.itemsize for s in strides], writeable=False)
    return x.as_strided(shape, strides)


def place(values: np.ndarray, layout: str, axis: int, gap: Any) -> Placed:
    """``values`` laid out in memory as ``layout`` says. A broadcast or overlapping layout cannot
    hold arbitrary values: the argument then holds its own (read them back from the view)."""
    shape, nd = values.shape, values.ndim
    if layout == "transposed" and nd >= 2:
        perm = tuple(reversed(range(nd)))
        return Placed(np.ascontiguousarray(values.transpose(perm)), lambda b: _permute(b, perm))
    if layout == "sliced" and nd >= 1:
        with np.errstate(over="ignore"):  # a gap past float16's range is inf there (never read all the same)
            base = np.full(tuple(2 * s + 1 for s in shape), gap, dtype=values.dtype)
        every_other = (slice(1, None, 2),) * nd
        base[every_other] = values
        return Placed(base, lambda b: b[every_other])
    if layout == "reversed" and nd >= 1:
        return Placed(np.flip(values).copy(), np.flip)
    if layout == "broadcast" and nd >= 1 and shape[axis] > 0:
        return Placed(values.take([0], axis=axis), lambda b: np.broadcast_to(b, shape) if isinstance(b, np.ndarray)
                      else b.expand(shape))
    if layout == "overlapping" and nd >= 1 and values.size > 0:
        inner = math.prod(shape[1:])
        row_stride = inner // 2  # each row starts halfway through the one before (0 for rows of one element)
        strides = [row_stride] + [math.prod(shape[i + 1:]) for i in range(1, nd)]
        length = (shape[0] - 1) * row_stride + inner
        return Placed(values.reshape(-1)[:length].copy(), lambda b: _as_strided(b, shape, strides))
    return Placed(values.copy(order="C"), lambda b: b)


class Arg(NamedTuple):
    value: Any  # what the function is called with
    base: Any  # its memory: a numpy array or a tensor (a leaf when it requires grad)
    logical: np.ndarray  # the values the argument holds, as a numpy array of its dtype
    view: Callable[[Any], Any]


GAPS = {"b": True, "u": 1, "i": 1, "f": math.nan, "c": math.nan}


def make_arg(values: np.ndarray, layout: str, axis: int, kind: str, device: str, dtype: str,
             requires_grad: bool = False, gap: Any = None) -> Arg:
    """``values`` (numbers of any dtype) cast to ``dtype`` and placed as ``layout`` says, as a
    numpy array or a tensor on ``device``."""
    torch_only = dtype == "bfloat16"
    np_dtype = np.dtype("float32" if torch_only else dtype)
    if np_dtype.kind in "fc" or values.dtype.kind in "biu":
        with np.errstate(all="ignore"):
            cast = values.astype(np_dtype)
    else:
        cast = np.zeros(values.shape, np_dtype)  # a non-float dtype that must be refused: values do not matter
    if torch_only:  # numpy has no bfloat16: float32 memory holding bfloat16 values, converted below
        cast = torch.from_numpy(cast).to(torch.bfloat16).float().numpy()
    placed = place(cast, layout, axis, GAPS[np_dtype.kind] if gap is None else gap)
    logical = np.array(placed.view(placed.base))
    if kind == "numpy":
        return Arg(placed.view(placed.base), placed.base, logical, placed.view)
    base = torch.from_numpy(placed.base.copy()).to(device)
    if torch_only:
        base = base.to(torch.bfloat16)
    if requires_grad:
        base.requires_grad_()
    return Arg(placed.view(base), base, logical, placed.view)


def layout_of(data, kind: str, ndim: int) -> tuple[str, int]:
    layout = data.draw(st.sampled_from(NUMPY_LAYOUTS if kind == "numpy" else TORCH_LAYOUTS))
    return layout, data.draw(st.integers(0, max(ndim - 1, 0)))


def with_specials(rng: np.random.Generator, x: np.ndarray, count: int, specials=SPECIALS) -> np.ndarray:
    """``x`` with ``count`` random elements set to one of ``specials`` (NaN, inf or -inf)."""
    x = np.array(x, dtype=F64)
    if x.size and count:
        x.reshape(-1)[rng.integers(0, x.size, size=count)] = rng.choice(specials, size=count)
    return x


def flags(rng: np.random.Generator, shape, mode: str, p: float = 0.5) -> np.ndarray:
    """Boolean flags: none, all, or random with probability p."""
    if mode == "zeros":
        return np.zeros(shape, bool)
    if mode == "ones":
        return np.ones(shape, bool)
    return rng.random(shape) < p


def flag_values(data, set_flags: np.ndarray, dtype: str) -> np.ndarray:
    """Flags as ``dtype`` holding 0 where unset and a nonzero value (not always 1) where set."""
    if dtype == "bool":
        return set_flags
    on = data.draw(st.sampled_from((1, 1, 2, -1) if dtype not in ("float32", "float64") else (1.0, 1.0, 0.5, -2.0)))
    return np.where(set_flags, on, 0).astype(dtype)


def finite_abs(x) -> np.ndarray:
    """|x| with NaN and infinities as 0: the magnitudes an error budget is built from."""
    return np.nan_to_num(np.abs(np.asarray(x, F64)), nan=0.0, posinf=0.0, neginf=0.0)


def to_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy().astype(F64)
    return np.asarray(x, F64)


def assert_matches(got, want, tol, what: str) -> None:
    """``got`` equals the float64 ``want`` within ``tol`` (a scalar or an array of ``want``'s shape):
    NaN exactly where ``want`` is NaN, the same infinity where it is infinite."""
    got, want = to_f64(got), np.asarray(want, F64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    tol = np.broadcast_to(np.asarray(tol, F64), want.shape)
    with np.errstate(all="ignore"):
        close = np.isfinite(want) & (np.abs(got - want) <= tol)
    same_nonfinite = (np.isnan(want) & np.isnan(got)) | (np.isinf(want) & (got == want))
    bad = ~(close | same_nonfinite)
    if bad.any():
        where = np.argwhere(bad)[:4].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements differ, first at {where}: got "
                             f"{got[bad][:4].tolist()}, expected {want[bad][:4].tolist()} (tolerance "
                             f"{tol[bad][:4].tolist()})")


def expect_error(call: Callable[[], Any], fn: str, error: type, name: str) -> None:
    """``call()`` raises ``error`` with a message that starts with ``fn`` and names ``name``."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{fn}:"), message
    assert name in message, (name, message)


def unchanged(args: dict) -> dict:
    """Copies of the memory of every array argument, to check after the call that none was written."""
    return {k: to_f64(a.base).copy() for k, a in args.items() if isinstance(a, Arg) and a.logical.dtype.kind != "c"}


def assert_unchanged(before: dict, args: dict) -> None:
    for k, copy in before.items():
        np.testing.assert_array_equal(to_f64(args[k].base), copy, err_msg=f"{k} was written")


def refused_dtype(data, choices=NOT_FLOATS) -> str:
    """A dtype the function refuses for its first float argument."""
    return data.draw(st.sampled_from(choices))


def other_dtype(data, good: str) -> str:
    """A dtype refused for an argument that must have the dtype ``good`` of another argument."""
    return data.draw(st.sampled_from(tuple(d for d in NOT_FLOATS + FLOATS if d != good)))


def wrong_shape(data, shape: tuple) -> tuple:
    """A shape that is not ``shape``: one dimension one longer, or one more dimension of size 1."""
    if shape and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(shape) - 1))
        return shape[:i] + (shape[i] + 1,) + shape[i + 1:]
    return shape + (1,)


def gradients(output, inputs) -> list:
    """d output / d each input, 0 where the output does not depend on it (or on nothing at all)."""
    grads = torch.autograd.grad(output, inputs, allow_unused=True) if output.requires_grad else [None] * len(inputs)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def scatter_to_base(arg: Arg, per_element: np.ndarray) -> np.ndarray:
    """``per_element`` (one number per element of the argument) summed onto the argument's memory,
    as autograd sums a view's gradient onto its base: the error budget of a base's gradient."""
    base = torch.zeros(tuple(arg.base.shape), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((arg.view(base) * torch.from_numpy(np.array(per_element, F64))).sum(), base)
    return grad.numpy()


def gammas() -> st.SearchStrategy:
    return st.sampled_from((0.0, 0.5, 0.9, 0.95, 0.99, 1.0)) | st.floats(0.01, 1.0)


def bad_real(data) -> tuple[Any, type]:
    """A value a [0, 1] (or > 0) real argument refuses, and the error it gets."""
    value = data.draw(st.sampled_from((1.5, -0.1, math.nan, math.inf, -math.inf, "0.9", True, None)))
    return value, (ValueError if isinstance(value, float) else TypeError)


# ---------------------------------------------------------------------------------------------
# fastppo.gae


GAE_DEFECTS = ("dtype:rewards", "dtype:values", "dtype:last_value", "dtype:dones", "dtype:terminated", "shape:values",
               "shape:dones", "shape:terminated", "shape:last_value", "kind:rewards", "kind:values", "rank0:rewards",
               "value:gamma", "value:gae_lambda", "out:strides", "out:overlaps_input", "out:same", "out:dtype", "out:shape",
               "out:readonly", "out:unaligned", "out:byteorder", "out:kind", "out:pair")


def gae_budget(r, v, d, term, last, gamma, gae_lambda, adv) -> np.ndarray:
    """For each A_t, the magnitudes whose rounding reaches it: each step's reward, values and
    advantages, carried back along the trace as the recursion carries their errors."""
    ar, av, aa = finite_abs(r), finite_abs(v), finite_abs(adv)
    al = np.broadcast_to(finite_abs(last), r.shape[1:])
    bound, carried = np.zeros_like(ar), np.zeros(r.shape[1:])
    T = r.shape[0]
    for t in reversed(range(T)):
        next_v, next_a = (av[t + 1], aa[t + 1]) if t + 1 < T else (al, 0.0)
        decay = np.where(d[t] != 0, 0.0, gamma * gae_lambda)
        carried = (ar[t] + np.where(term[t] != 0, 0.0, gamma * next_v) + av[t] + aa[t] + decay * next_a
                   + decay * carried)
        bound[t] = carried
    return bound


@PROPERTY
@given(data=st.data())
def test_gae_equals_the_reference(device, data):
    check_gae(device, data, None)


@pytest.mark.parametrize("defect", GAE_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_gae_refuses_bad_input(device, defect, data):
    check_gae(device, data, defect)


def check_gae(device: str, data, defect: str | None) -> None:
    fn = "fastppo.gae"
    kind = data.draw(st.sampled_from(("numpy", "torch") if device == "cpu" else ("torch",)), label="kind")
    if data.draw(st.integers(0, 9)) == 0:  # a long horizon: the CPU cuts it into chunks when N < threads
        T, trailing = data.draw(st.sampled_from((33, 2049))), data.draw(st.sampled_from(((), (1,), (2,), (3, 1))))
    else:
        T, trailing = data.draw(st.integers(0, 7)), tuple(data.draw(st.lists(st.integers(0, 4), max_size=2)))
    shape = (T, *trailing)
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    nonfinite = NONFINITE_COUNTS

    def arg(values, dtype, ndim=len(shape)):
        return make_arg(values, *layout_of(data, kind, ndim), kind, device, dtype)

    def shape_of(name, good):
        return wrong_shape(data, good) if defect == f"shape:{name}" else good

    # rewards, values, last_value
    r_dtype = refused_dtype(data, NOT_FLOATS_OR_HALVES) if defect == "dtype:rewards" else dtype
    rewards = arg(with_specials(rng, rng.normal(size=shape), data.draw(nonfinite)), r_dtype)
    v_dtype = other_dtype(data, dtype) if defect == "dtype:values" else dtype
    v_shape = shape_of("values", shape)
    values = arg(with_specials(rng, rng.normal(size=v_shape), data.draw(nonfinite)), v_dtype, len(v_shape))
    scalar_last = defect not in ("dtype:last_value", "shape:last_value") and data.draw(st.integers(0, 4)) == 0
    if scalar_last:
        last_number = data.draw(st.sampled_from((0.0, -1.5, 2.25, 1e-3)) | st.sampled_from(SPECIALS))
        last = None
        last_logical = np.full(trailing, float(np.asarray(last_number, dtype)))
    else:
        l_shape = shape_of("last_value", trailing)
        l_dtype = other_dtype(data, dtype) if defect == "dtype:last_value" else dtype
        last = arg(with_specials(rng, rng.normal(size=l_shape), data.draw(nonfinite)), l_dtype,
                   len(l_shape))
        last_logical = last.logical

    # dones and terminated: none, all, random, forced at t = 0 and t = T - 1, or one env done at every step
    mode = data.draw(st.sampled_from(("random", "zeros", "ones", "ends", "row")), label="dones")
    d_shape = shape_of("dones", shape)
    p_done = data.draw(st.sampled_from((0.1, 0.5)))
    done_flags = flags(rng, d_shape, "random" if mode in ("ends", "row") else mode, p=p_done)
    if mode == "ends" and T > 0 and d_shape == shape:
        done_flags[0] = done_flags[-1] = True
    if mode == "row" and done_flags.size:
        done_flags.reshape(d_shape[0], -1)[:, 0] = True
    d_dtype = refused_dtype(data, NOT_FLAGS) if defect == "dtype:dones" else data.draw(st.sampled_from(FLAGS))
    dones = arg(flag_values(data, done_flags, d_dtype) if d_dtype in FLAGS else done_flags, d_dtype,
                len(d_shape))
    terminated = None
    if defect in ("dtype:terminated", "shape:terminated") or data.draw(st.booleans()):
        m_shape = shape_of("terminated", shape)
        truncations = rng.random(m_shape) < 0.5
        term_flags = (done_flags & truncations) if m_shape == d_shape else truncations
        m_dtype = refused_dtype(data, NOT_FLAGS) if defect == "dtype:terminated" else data.draw(st.sampled_from(FLAGS))
        terminated = arg(flag_values(data, term_flags, m_dtype) if m_dtype in FLAGS else term_flags,
                         m_dtype, len(m_shape))
    gamma, gae_lambda = data.draw(gammas(), label="gamma"), data.draw(gammas(), label="gae_lambda")

    kwargs = dict(rewards=rewards.value, values=values.value, dones=dones.value,
                  last_value=last_number if scalar_last else last.value,
                  terminated=None if terminated is None else terminated.value, gamma=gamma, gae_lambda=gae_lambda)
    expected = None  # (error, argument named)
    if defect is not None and defect.startswith(("dtype:", "shape:")):
        name = defect.split(":")[1]
        expected = (TypeError if defect.startswith("dtype:") else ValueError, name)
    elif defect == "kind:rewards":
        kwargs["rewards"], expected = rewards.logical.tolist(), (TypeError, "rewards")
    elif defect == "kind:values":
        other = values.logical if kind == "torch" else torch.from_numpy(values.logical.copy())
        kwargs["values"] = data.draw(st.sampled_from((values.logical.tolist(), other)))
        expected = (TypeError, "values")
    elif defect == "rank0:rewards":
        kwargs["rewards"] = make_arg(np.array(1.0), "contiguous", 0, kind, device, dtype).value
        expected = (ValueError, "rewards")
    elif defect in ("value:gamma", "value:gae_lambda"):
        name = defect.split(":")[1]
        kwargs[name], error = bad_real(data)
        expected = (error, name)

    # out: a fresh contiguous pair, or one of the pairs that must be refused
    out = None
    if (defect or "").startswith("out:") or data.draw(st.integers(0, 3)) == 0:
        def fresh(dt=dtype, shp=shape):
            if kind == "numpy":
                return np.zeros(shp, dt)
            return torch.zeros(shp, dtype=getattr(torch, dt), device=device)

        out = (fresh(), fresh())
        n = math.prod(shape)
        if defect == "out:strides" and n >= 2:
            bigger = fresh(shp=tuple(2 * s for s in shape))
            out, expected = (out[0], bigger[(slice(None, None, 2),) * len(shape)]), (ValueError, "out[1]")
        elif defect == "out:overlaps_input" and n >= 1:
            rewards = make_arg(rewards.logical, "contiguous", 0, kind, device, dtype)
            kwargs["rewards"] = rewards.value
            out, expected = (rewards.value, out[1]), (ValueError, "out[0]")
        elif defect == "out:same" and n >= 1:
            out, expected = (out[0], out[0]), (ValueError, "out[0]")
        elif defect == "out:dtype":
            out, expected = (out[0], fresh(dt=other_dtype(data, dtype))), (TypeError, "out[1]")
        elif defect == "out:shape":
            out, expected = (out[0], fresh(shp=wrong_shape(data, shape))), (ValueError, "out[1]")
        elif defect == "out:readonly":  # a read-only array, or a tensor that requires grad
            if kind == "numpy":
                out[0].flags.writeable = False
            else:
                out[0].requires_grad_()
            expected = (ValueError, "out[0]")
        elif defect == "out:unaligned" and kind == "numpy" and n >= 1:
            raw = np.frombuffer(bytearray(out[1].nbytes + 1), dtype=np.uint8)[1:]  # writeable, off by one byte
            out, expected = (out[0], raw.view(out[1].dtype).reshape(shape)), (ValueError, "out[1]")
        elif defect == "out:byteorder" and kind == "numpy":
            out, expected = (out[0].astype(out[0].dtype.newbyteorder()), out[1]), (TypeError, "out[0]")
        elif defect == "out:kind":
            other = torch.from_numpy(out[0]) if kind == "numpy" else out[0].cpu().numpy()
            out, expected = (other, out[1]), (TypeError, "out[0]")
        elif defect == "out:pair":
            out, expected = out[0], (TypeError, "out")
        kwargs["out"] = out

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: fastppo.gae(**kwargs), fn, *expected)
        return
    before = unchanged(dict(rewards=rewards, values=values, dones=dones, last=last, terminated=terminated))
    adv, ret = fastppo.gae(**kwargs)
    assert_unchanged(before, dict(rewards=rewards, values=values, dones=dones, last=last, terminated=terminated))
    for result in (adv, ret):
        assert (isinstance(result, np.ndarray) if kind == "numpy" else isinstance(result, torch.Tensor))
        assert tuple(result.shape) == shape and str(result.dtype).endswith(dtype)
        if kind == "torch":
            assert result.device == rewards.value.device
    if out is not None:
        assert adv is out[0] and ret is out[1]
    term_logical = dones.logical if terminated is None else terminated.logical
    want_adv, want_ret = gae_reference(rewards.logical, values.logical, dones.logical, last_logical, term_logical,
                                       gamma, gae_lambda)
    tol = K * EPS[dtype] * gae_budget(rewards.logical, values.logical, dones.logical, term_logical, last_logical,
                                      gamma, gae_lambda, want_adv)
    event("computed, with non-finite results" if not np.isfinite(want_adv).all() else "computed")
    assert_matches(adv, want_adv, tol, "advantages")
    assert_matches(ret, want_ret, tol + K * EPS[dtype] * (finite_abs(want_adv) + finite_abs(values.logical)), "returns")


# ---------------------------------------------------------------------------------------------
# fastppo.ppo_loss

LOSS_STATS = ("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac")
LOSS_INPUTS = ("new_logprob", "old_logprob", "advantages", "new_value", "old_value", "returns", "entropy", "is_weights",
               "ref_logprob")
LOSS_EXTRA_STATS = ("kl", "clipfrac_low", "clipfrac_high")
LOSS_NOT_FLOATS = tuple(d for d in NOT_FLOATS if d != "float16")  # ppo_loss takes float16 (through float32)
DIFFERENTIABLE = ("new_logprob", "new_value", "entropy")
LOSS_DEFECTS = ("dtype:new_logprob", "dtype:old_logprob", "dtype:advantages", "dtype:new_value", "dtype:entropy",
                "dtype:mask", "shape:old_logprob", "shape:returns", "shape:entropy", "shape:mask", "kind:new_logprob",
                "kind:advantages", "missing:returns", "missing:old_value", "missing:new_value", "value:clip_coef",
                "value:vf_clip_coef", "value:dual_clip", "value:ent_coef", "value:agg", "value:agg_ndim",
                "value:group_size", "dtype:group_moments", "shape:group_moments", "dtype:is_weights",
                "shape:ref_logprob", "value:clip_coef_high", "value:kl_coef", "value:kl_estimator")


def loss_weights(sel: np.ndarray, agg: str) -> np.ndarray:
    """d loss / d term of each element under ``agg`` (the mean's weights); 0 where unselected."""
    n = sel.sum()
    if agg == "token-mean" or sel.ndim != 2:
        return sel / max(n, 1)
    if agg == "seq-mean-token-sum-norm":
        return sel / max(sel.size, 1)
    counts = sel.sum(-1, keepdims=True)
    rows = max(int((counts > 0).sum()), 1)
    per_token = 1.0 / np.maximum(counts, 1) if agg == "seq-mean-token-mean" else np.ones_like(counts, F64)
    return sel * per_token / rows


@PROPERTY
@given(data=st.data())
def test_ppo_loss_equals_the_reference(device, data):
    check_ppo_loss(device, data, None)


@pytest.mark.parametrize("defect", LOSS_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_ppo_loss_refuses_bad_input(device, defect, data):
    check_ppo_loss(device, data, defect)


def check_ppo_loss(device: str, data, defect: str | None) -> None:
    fn = "fastppo.ppo_loss"
    ndim = data.draw(st.sampled_from((1, 2, 2, 3)), label="ndim")
    if ndim == 1:
        shape = (data.draw(st.integers(0, 6) | st.just(37)),)
    else:
        shape = tuple(data.draw(st.integers(0, 5 if ndim == 2 else 3)) for _ in range(ndim))
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    has_value = data.draw(st.booleans()) or (defect or "").endswith(("returns", "old_value", "new_value", "vf_clip_coef"))
    clip_vloss = data.draw(st.booleans()) or defect == "missing:old_value"
    has_entropy = data.draw(st.booleans()) or defect in ("dtype:entropy", "shape:entropy")
    has_mask = data.draw(st.booleans()) or defect in ("dtype:mask", "shape:mask")
    options = dict(
        clip_coef=data.draw(st.sampled_from((0.2, 0.1, 0.5))), vf_coef=data.draw(st.sampled_from((0.5, 0.0, 1.3))),
        ent_coef=data.draw(st.sampled_from((0.0, 0.01, -0.3))), clip_vloss=clip_vloss,
        vf_clip_coef=data.draw(st.sampled_from((None, 0.3, 10.0))), norm_adv=data.draw(st.booleans()),
        dual_clip=data.draw(st.sampled_from((None, 1.5, 3.0))),
        agg=data.draw(st.sampled_from(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                       "seq-mean-token-sum-norm"))) if ndim == 2 else "token-mean",
        clip_coef_high=data.draw(st.sampled_from((None, 0.28, 0.05))))
    # The LLM options: truncated importance weights, a KL term against a reference (its log-probs
    # near the new ones wherever those are finite, so that k3's exp stays finite). The sequence
    # ratio is tested in test_loss.py.
    has_weights = data.draw(st.booleans(), label="is_weights") or defect == "dtype:is_weights"
    has_ref = data.draw(st.booleans(), label="ref_logprob") or defect == "shape:ref_logprob"
    if has_ref:
        options.update(kl_coef=data.draw(st.sampled_from((0.0, 0.05, 1.0))),
                       kl_estimator=data.draw(st.sampled_from(("k1", "k2", "k3"))))
    nonfinite = NONFINITE_COUNTS

    old = -np.abs(rng.normal(size=shape)) * 3
    spread = data.draw(st.sampled_from((0.1, 0.5, 2.0)))
    old_value = rng.normal(size=shape)
    logical = dict(
        # +-1000 in a log-prob overflows or underflows the ratio in float32 and float64 alike
        new_logprob=with_specials(rng, old + rng.normal(size=shape) * spread, data.draw(nonfinite),
                                  SPECIALS + (1000.0, -1000.0)),
        old_logprob=with_specials(rng, old, data.draw(nonfinite)),
        advantages=with_specials(rng, rng.normal(size=shape) + 0.3, data.draw(nonfinite)),
        new_value=with_specials(rng, old_value + rng.normal(size=shape) * 0.3, data.draw(nonfinite)) if has_value else None,
        old_value=with_specials(rng, old_value, data.draw(nonfinite))
        if has_value and (clip_vloss or data.draw(st.booleans())) else None,
        returns=with_specials(rng, rng.normal(size=shape), data.draw(nonfinite)) if has_value else None,
        entropy=with_specials(rng, rng.random(shape), data.draw(nonfinite)) if has_entropy else None,
        is_weights=rng.uniform(0.2, 1.5, size=shape) if has_weights else None,
        ref_logprob=None,
    )
    if has_ref:
        new = logical["new_logprob"]
        with np.errstate(all="ignore"):
            logical["ref_logprob"] = np.where(np.isfinite(new), new + rng.normal(size=shape) * 0.5, old)
    requires_grad = {k: data.draw(st.booleans()) for k in DIFFERENTIABLE}
    dtypes = {k: dtype for k in LOSS_INPUTS}
    shapes = {k: shape for k in LOSS_INPUTS + ("mask",)}
    expected = None
    if defect is not None and defect.startswith(("dtype:", "shape:")) and not defect.endswith("group_moments"):
        name = defect.split(":")[1]
        if defect.startswith("dtype:") and name != "mask":
            dtypes[name] = refused_dtype(data, LOSS_NOT_FLOATS) if name == "new_logprob" else other_dtype(data, dtype)
            requires_grad[name] = False  # integer tensors cannot require grad
        elif name != "mask":
            shapes[name] = wrong_shape(data, shape)
            logical[name] = with_specials(rng, rng.normal(size=shapes[name]), 0)
        expected = (TypeError if defect.startswith("dtype:") else ValueError, name)

    args = {}
    for name in LOSS_INPUTS:
        if logical[name] is not None:
            layout = layout_of(data, "torch", len(shapes[name]))
            args[name] = make_arg(logical[name], *layout, "torch", device, dtypes[name],
                                  requires_grad=requires_grad.get(name, False))
    alias = data.draw(st.sampled_from((None, "new_value", "entropy")), label="alias")
    if alias in args and defect is None:  # the same tensor passed twice: its gradient is the sum of both
        args[alias] = args["new_logprob"]

    mask = None
    if has_mask:
        mode = data.draw(st.sampled_from(("random", "zeros", "ones")), label="mask")
        mask_dtype = refused_dtype(data, NOT_FLAGS) if defect == "dtype:mask" else data.draw(st.sampled_from(FLAGS))
        set_flags = flags(rng, wrong_shape(data, shape) if defect == "shape:mask" else shape, mode,
                          p=data.draw(st.sampled_from((0.3, 0.8))))
        mask = make_arg(flag_values(data, set_flags, mask_dtype) if mask_dtype in FLAGS else set_flags,
                        *layout_of(data, "torch", set_flags.ndim), "torch", device, mask_dtype)
    group = None
    sel = np.ones(shape, bool) if mask is None or defect in ("shape:mask", "dtype:mask") else mask.logical != 0
    if defect in ("dtype:group_moments", "shape:group_moments") or (
            options["agg"] == "token-mean" and data.draw(st.integers(0, 5)) == 0):
        # a group of one: this call's own moments of the selected advantages change nothing
        chosen = args["advantages"].logical.astype(F64)[sel] if defect != "dtype:advantages" else np.zeros(0)
        with np.errstate(all="ignore"):
            moments = [chosen.size, chosen.mean() if chosen.size else 0.0, ((chosen - chosen.mean()) ** 2).sum()
                       if chosen.size else 0.0]
        group = torch.tensor(moments, dtype=torch.float64, device=device)
        if defect == "dtype:group_moments":
            group, expected = group.float(), (TypeError, "group_moments")
        elif defect == "shape:group_moments":
            group, expected = group[:2], (ValueError, "group_moments")

    kwargs = {name: a.value for name, a in args.items()}
    kwargs.update(options, mask=None if mask is None else mask.value, group_moments=group)
    if defect == "kind:new_logprob":
        logical_new = args["new_logprob"].logical
        kwargs["new_logprob"] = data.draw(st.sampled_from((logical_new, logical_new.tolist())))
        expected = (TypeError, "new_logprob")
    elif defect == "kind:advantages":
        kwargs["advantages"], expected = args["advantages"].logical, (TypeError, "advantages")
    elif defect == "missing:returns":
        kwargs["returns"], expected = None, (ValueError, "returns")
    elif defect == "missing:old_value":
        kwargs["old_value"], expected = None, (ValueError, "old_value")
    elif defect == "missing:new_value":
        kwargs["new_value"], expected = None, (ValueError, "new_value")
    elif defect in ("value:clip_coef", "value:vf_clip_coef", "value:ent_coef"):
        name = defect.split(":")[1]
        bad = (0.0, -0.5, math.nan, math.inf, "0.2", True) if name != "ent_coef" else (math.nan, math.inf, "0.01", False)
        kwargs[name] = data.draw(st.sampled_from(bad))
        expected = (ValueError if isinstance(kwargs[name], float) else TypeError, name)
    elif defect == "value:dual_clip":
        kwargs["dual_clip"] = data.draw(st.sampled_from((1.0, 0.5, -2.0, math.nan)))
        expected = (ValueError, "dual_clip")
    elif defect == "value:agg":
        kwargs["agg"], expected = data.draw(st.sampled_from(("mean", "token_mean", "", None))), (ValueError, "agg")
    elif defect == "value:agg_ndim":
        if ndim != 2:
            kwargs["agg"], expected = "seq-mean-token-sum", (ValueError, "agg")
    elif defect in ("value:clip_coef_high", "value:kl_coef"):
        name = defect.split(":")[1]
        bad = (0.0, -0.5, math.nan, math.inf, "0.2", True) if name == "clip_coef_high" else (-0.1, math.nan, math.inf, "0.1")
        kwargs[name] = data.draw(st.sampled_from(bad))
        expected = (ValueError if isinstance(kwargs[name], float) else TypeError, name)
    elif defect == "value:kl_estimator":
        kwargs["kl_estimator"] = data.draw(st.sampled_from(("k4", "K1", "", None)))
        expected = (ValueError, "kl_estimator")
    elif defect == "value:group_size":
        kwargs["group_size"] = data.draw(st.sampled_from((0, -1, 1.0, True, "2")))
        expected = (ValueError if isinstance(kwargs["group_size"], int) and not isinstance(kwargs["group_size"], bool)
                    else TypeError, "group_size")

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: fastppo.ppo_loss(**kwargs), fn, *expected)
        return
    before = unchanged(dict(args, mask=mask))
    out = fastppo.ppo_loss(**kwargs)
    assert_unchanged(before, dict(args, mask=mask))
    leaves = {name: args[name].base for name in DIFFERENTIABLE if name in args and args[name].base.requires_grad}
    upstream = data.draw(st.sampled_from((1.0, -2.5)), label="upstream gradient")
    unique = {id(v): v for v in leaves.values()}  # an aliased leaf once
    got_grads = dict(zip(unique, gradients(out.loss * upstream, list(unique.values()))))
    assert out.loss.requires_grad == bool(leaves)
    assert out._fields == ("loss",) + LOSS_STATS
    for name, value in list(zip(out._fields, out)) + [(k, getattr(out, k)) for k in LOSS_EXTRA_STATS]:
        assert value.shape == () and value.dtype == getattr(torch, dtype) and value.device.type == device
        if name != "loss":
            assert not value.requires_grad

    # The reference on float64 copies of the same memory, through the same views.
    ref_bases, ref_args = {}, {}
    for name, a in args.items():
        if id(a.base) not in ref_bases:
            ref_bases[id(a.base)] = a.base.detach().cpu().double().requires_grad_(a.base.requires_grad)
        ref_args[name] = a.view(ref_bases[id(a.base)])
    ref_mask = None if mask is None else torch.from_numpy(mask.logical.copy())
    want = ppo_loss_reference(**ref_args, mask=ref_mask, **options)
    ref_leaves = [ref_bases[i] for i in got_grads]
    want_grads = gradients(want["loss"] * upstream, ref_leaves)  # nothing selected: the loss is the constant 0
    want = {k: v.detach() for k, v in want.items()}

    # Error budget: each term's magnitude, weighted as the mean weighs it.
    x = {k: a.logical.astype(F64) for k, a in args.items()}
    c = options["clip_coef"]
    c_high = c if options["clip_coef_high"] is None else options["clip_coef_high"]
    cv = c if options["vf_clip_coef"] is None else options["vf_clip_coef"]
    with np.errstate(all="ignore"):
        logratio = finite_abs(x["new_logprob"] - x["old_logprob"])
        ratio = np.maximum(np.exp(np.minimum(logratio, 700.0)), 1 + max(c, c_high))
        adv = finite_abs(x["advantages"])
        if options["norm_adv"] and sel.any():  # (A - mean) / (std + 1e-8) rounds relative to |A| + |mean|
            chosen = x["advantages"][sel]
            std = chosen.std(ddof=1) if chosen.size >= 2 else 0.0
            adv = finite_abs(2 * (adv + abs(chosen.mean())) / (std + 1e-8))
        pg_mag = adv * ratio * (2 + logratio) * max(1.0, options["dual_clip"] or 1.0)  # (may overflow to inf)
        if has_weights:
            pg_mag = pg_mag * x["is_weights"]
        kl_mag = ratio + 1 + logratio
        # the reference KL: each estimate and its derivative are bounded by 1 + |d| + d^2 + e^|d|
        d = finite_abs(x["ref_logprob"] - x["new_logprob"]) if has_ref else 0 * adv
        ref_kl_mag = 1 + d + d * d + np.exp(np.minimum(d, 700.0))
        kl_coef = options.get("kl_coef", 0.0)
    v_grad_mag = sum(finite_abs(x[k]) for k in ("new_value", "old_value", "returns") if k in x) + cv if has_value else 0 * adv
    ent_mag = finite_abs(x["entropy"]) if "entropy" in x else 0 * adv
    eps = EPS[dtype]
    w, w_tok = loss_weights(sel, options["agg"]), loss_weights(sel, "token-mean")
    count = int(sel.sum())

    def budget(weights, mag):
        with np.errstate(all="ignore"):
            terms = np.where(weights > 0, weights * mag, 0.0)  # (an unselected element's inf has weight 0)
            return K * (eps * terms.sum() + EPS["float64"] * (count + 1) * (terms.max(initial=0.0)))

    tol = dict(pg_loss=budget(w, pg_mag), v_loss=budget(w, v_grad_mag ** 2), entropy=budget(w, ent_mag),
               approx_kl=budget(w_tok, kl_mag), old_approx_kl=budget(w_tok, logratio), clipfrac=K * eps,
               kl=budget(w, ref_kl_mag), clipfrac_low=K * eps, clipfrac_high=K * eps)
    parts = [float(v) for v in (want["pg_loss"], options["ent_coef"] * want["entropy"], options["vf_coef"] * want["v_loss"],
                                kl_coef * want["kl"])]
    tol["loss"] = (tol["pg_loss"] + abs(options["ent_coef"]) * tol["entropy"] + abs(options["vf_coef"]) * tol["v_loss"]
                   + (kl_coef * tol["kl"] if kl_coef else 0.0) + K * eps * sum(abs(v) for v in parts if math.isfinite(v)))
    # The clip fractions by sign read the normalized advantages' signs, which are a convention where
    # the normalization's statistics are not finite (torch's are NaN, the kernel's std then 0) and
    # where the selected advantages are all equal (each normalized advantage is then 0, and its sign
    # is the rounding of ``A - mean``: torch's mean of 37 equal float64 values need not be the value).
    chosen_adv = x["advantages"][sel]
    stats_finite = not options["norm_adv"] or bool(
        np.isfinite(chosen_adv).all() and (chosen_adv.size < 2 or chosen_adv.max() > chosen_adv.min()))
    for name, value in list(zip(out._fields, out)) + [(k, getattr(out, k)) for k in LOSS_EXTRA_STATS]:
        if stats_finite or name not in ("clipfrac_low", "clipfrac_high"):
            assert_matches(value, float(want[name]), tol[name], name)

    finite_inputs = all(np.isfinite(v[sel]).all() for v in x.values())
    event("computed" if finite_inputs else "computed, non-finite inputs")
    # A gradient element is compared where the inputs it is computed from are finite (where one is NaN
    # the loss is NaN, and the value of its gradient is a convention: torch's max passes the whole
    # gradient to both sides of a comparison with NaN, the kernel half): the element's own inputs, the
    # normalization's statistics, and any element that is not selected (its gradient is 0).
    def finite(*names):
        return np.logical_and.reduce([np.isfinite(x[k]) for k in names if k in x] + [np.ones(shape, bool)])

    defined = dict(new_logprob=finite("new_logprob", "old_logprob", "advantages", "ref_logprob") & stats_finite | ~sel,
                   new_value=finite("new_value", "old_value", "returns") | ~sel, entropy=np.ones(shape, bool))
    grad_mags = dict(new_logprob=pg_mag + kl_coef * ref_kl_mag, new_value=v_grad_mag,
                     entropy=abs(options["ent_coef"]) + 0 * adv)
    for (leaf_id, got), wanted in zip(got_grads.items(), want_grads):
        users = [k for k in DIFFERENTIABLE if k in args and id(args[k].base) == leaf_id]
        with np.errstate(all="ignore"):
            leaf_tol = sum(scatter_to_base(args[k], K * eps * abs(upstream) * np.where(w > 0, w * grad_mags[k], 0.0))
                           for k in users)
        compared = sum(scatter_to_base(args[k], ~defined[k]) for k in users) == 0
        assert_matches(to_f64(got)[compared], to_f64(wanted)[compared], leaf_tol[compared],
                       f"gradient of {'/'.join(users)}")
        # Unselected elements are never read: their gradient is exactly 0.
        reached = sum(scatter_to_base(args[k], sel.astype(F64)) for k in users) > 0
        assert (to_f64(got)[~reached] == 0).all(), f"gradient of {'/'.join(users)} at unselected elements"


# ---------------------------------------------------------------------------------------------
# fastppo.categorical_logprob_entropy and fastppo.normal_logprob_entropy

CATEGORICAL_DEFECTS = ("dtype:logits", "dtype:actions", "shape:actions", "shape:logits", "kind:logits", "kind:actions",
                       "range:actions", "value:temperature")
NORMAL_DEFECTS = ("dtype:mean", "dtype:log_std", "dtype:actions", "shape:log_std", "shape:actions", "shape:mean",
                  "kind:mean", "kind:log_std")


def leading_shape(data) -> tuple:
    return tuple(data.draw(st.lists(st.integers(0, 4), max_size=2), label="leading shape"))


def output_weights(data, rng, shape, names=("logprob", "entropy")) -> dict:
    """Random weights of the outputs a gradient is taken of (sometimes only one of them)."""
    used = data.draw(st.sampled_from((names, names[:1], names[1:])), label="outputs differentiated")
    return {k: rng.normal(size=shape) for k in used}


def weighted_sum(outputs: dict, weights: dict):
    return sum((outputs[k].double() * torch.from_numpy(w).to(outputs[k].device)).sum() for k, w in weights.items())


@PROPERTY
@given(data=st.data())
def test_categorical_equals_the_reference(device, data):
    check_categorical(device, data, None)


@pytest.mark.parametrize("defect", CATEGORICAL_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_categorical_refuses_bad_input(device, defect, data):
    check_categorical(device, data, defect)


def check_categorical(device: str, data, defect: str | None) -> None:
    fn = "fastppo.categorical_logprob_entropy"
    lead = leading_shape(data)
    A = data.draw(st.integers(1, 6) | st.just(33), label="A")
    shape = lead + (A,)
    halves = ("float16", "bfloat16")  # read as stored, accumulated in float32
    dtype = data.draw(st.sampled_from(FLOATS + halves), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    logits = rng.normal(size=shape) * data.draw(st.sampled_from((1.0, 30.0)))
    if data.draw(st.booleans()):
        # Masked actions (-inf). Action 0 stays finite, so that every row keeps a finite logit in every
        # layout: a broadcast row is a copy of logits[..., 0], an overlapping one is A consecutive
        # elements of the array, one of which is some row's action 0. (Rows of only -inf: see below.)
        masked = rng.random(shape) < 0.4
        masked[..., 0] = False
        logits[masked] = -math.inf
    actions = rng.integers(0, A, size=lead)
    action_dtype = data.draw(st.sampled_from(("int64", "int32")))
    temperature = data.draw(st.sampled_from((1.0, 0.7, 2.5)), label="temperature")
    requires_grad = data.draw(st.booleans())
    expected = None
    if defect == "dtype:logits":
        dtype = refused_dtype(data, NOT_FLOATS_OR_HALVES)
        requires_grad, expected = False, (TypeError, "logits")
    elif defect == "dtype:actions":
        action_dtype, expected = data.draw(st.sampled_from(("float32", "int16", "uint8", "bool"))), (TypeError, "actions")
    elif defect == "shape:actions":
        actions, expected = rng.integers(0, A, size=wrong_shape(data, lead)), (ValueError, "actions")
    elif defect == "shape:logits":  # no action to choose from, or no action dimension at all
        shape = data.draw(st.sampled_from((lead + (0,), ())))
        logits, actions, expected = rng.normal(size=shape), rng.integers(0, 1, size=lead), (ValueError, "logits")
    elif defect == "range:actions" and actions.size:
        actions.reshape(-1)[rng.integers(0, actions.size)] = data.draw(st.sampled_from((A, -1, A + 100)))
    logits_arg = make_arg(logits, *layout_of(data, "torch", len(shape)), "torch", device, dtype,
                          requires_grad=requires_grad, gap=1e6)
    actions_arg = make_arg(actions, *layout_of(data, "torch", len(lead)), "torch", device, action_dtype, gap=A + 7)
    kwargs = dict(logits=logits_arg.value, actions=actions_arg.value, temperature=temperature)
    if defect == "range:actions" and device == "cpu" and ((actions_arg.logical < 0) | (actions_arg.logical >= A)).any():
        expected = (IndexError, "actions")  # (a broadcast layout may not show the bad action); on CUDA: NaN rows
    if defect == "kind:logits":
        kwargs["logits"], expected = data.draw(st.sampled_from((logits_arg.logical, logits_arg.logical.tolist()))), \
            (TypeError, "logits")
    elif defect == "kind:actions":
        kwargs["actions"], expected = data.draw(st.sampled_from((actions_arg.logical, actions_arg.logical.tolist()))), \
            (TypeError, "actions")
    elif defect == "value:temperature":
        kwargs["temperature"] = data.draw(st.sampled_from((0.0, -1.0, math.nan, math.inf, "1.0", True)))
        expected = (ValueError if isinstance(kwargs["temperature"], float) else TypeError, "temperature")

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: fastppo.categorical_logprob_entropy(**kwargs), fn, *expected)
        return
    before = unchanged(dict(logits=logits_arg, actions=actions_arg))
    logprob, entropy = fastppo.categorical_logprob_entropy(**kwargs)
    assert_unchanged(before, dict(logits=logits_arg, actions=actions_arg))
    out_dtype = dtype  # the logits' dtype, bfloat16 and float16 included
    for result in (logprob, entropy):
        assert result.shape == lead and result.dtype == getattr(torch, out_dtype)
        assert result.device == logits_arg.value.device

    x = torch.from_numpy(logits_arg.logical.astype(F64))
    a = torch.from_numpy(actions_arg.logical.astype(np.int64))
    in_range = (a >= 0) & (a < A)
    want_logprob, want_entropy = categorical_reference(x, a.clamp(0, A - 1), temperature)
    if defect == "range:actions":  # CUDA: a row whose action is out of range is NaN
        nan = torch.tensor(math.nan, dtype=torch.float64)
        want_logprob, want_entropy = torch.where(in_range, want_logprob, nan), torch.where(in_range, want_entropy, nan)
    event("computed")
    # Error budget: A terms of the row's magnitude (logits / temperature, and the log-sum-exp).
    eps = EPS[out_dtype]
    row_mag = 1.0 + finite_abs(logits_arg.logical.astype(F64) / temperature).max(axis=-1, initial=0.0)
    tol = K * eps * (A + 1) * row_mag
    assert_matches(logprob, want_logprob.numpy(), tol, "logprob")
    assert_matches(entropy, want_entropy.numpy(), tol, "entropy")

    if requires_grad and defect is None:
        weights = output_weights(data, rng, lead)
        (got,) = gradients(weighted_sum(dict(logprob=logprob, entropy=entropy), weights), [logits_arg.base])
        # -inf logits as -1e300: p = 0 there exactly, autograd stays finite (no 0 * inf), and the
        # gradient of a log-prob of a masked action is still 1 - p = 1 there
        ref_base = logits_arg.base.detach().cpu().double().clamp(min=-1e300).requires_grad_()
        ref_lp, ref_ent = categorical_reference(logits_arg.view(ref_base), a, temperature)
        (want,) = gradients(weighted_sum(dict(logprob=ref_lp, entropy=ref_ent), weights), [ref_base])
        w1, w2 = (np.abs(weights.get(k, np.zeros(lead)))[..., None] for k in ("logprob", "entropy"))
        grad_eps = EPS[dtype]  # the gradient has the logits' dtype (float16/bfloat16 too)
        per_element = K * grad_eps * (A + 1) * (w1 + w2 * (3 * row_mag[..., None] + math.log(A + 1))) / temperature
        assert_matches(got, want, scatter_to_base(logits_arg, np.broadcast_to(per_element, shape)), "gradient of logits")


@settings(PROPERTY, max_examples=40)
@given(row=st.lists(st.sampled_from((0.0, 1.5, -2.0, -math.inf, math.inf, math.nan)), min_size=1, max_size=5),
       action=st.integers(0, 4), dtype=st.sampled_from(FLOATS))
@example(row=[0.0, math.nan, 1.0], action=0, dtype="float64")
def test_categorical_nonfinite_logits_propagate(device, row, action, dtype):
    logits = torch.tensor([row], dtype=getattr(torch, dtype), device=device)
    actions = torch.tensor([action % len(row)], device=device)
    logprob, entropy = fastppo.categorical_logprob_entropy(logits, actions)
    want_logprob, want_entropy = categorical_reference(logits.cpu().double(), actions.cpu())
    assert_matches(logprob, want_logprob.numpy(), 1e-5, "logprob")
    assert_matches(entropy, want_entropy.numpy(), 1e-5, "entropy")


@PROPERTY
@given(data=st.data())
def test_normal_equals_the_reference(device, data):
    check_normal(device, data, None)


@pytest.mark.parametrize("defect", NORMAL_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_normal_refuses_bad_input(device, defect, data):
    check_normal(device, data, defect)


def check_normal(device: str, data, defect: str | None) -> None:
    fn = "fastppo.normal_logprob_entropy"
    lead = leading_shape(data)
    D = data.draw(st.integers(1, 5), label="D")
    shape = lead + (D,)
    shared = data.draw(st.booleans(), label="shared log_std")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    nonfinite = NONFINITE_COUNTS
    shapes = dict(mean=shape, log_std=(D,) if shared else shape, actions=shape)
    dtypes = dict(mean=dtype, log_std=dtype, actions=dtype)
    requires_grad = dict(mean=data.draw(st.booleans()), log_std=data.draw(st.booleans()), actions=False)
    expected = None
    if defect is not None and defect.startswith(("dtype:", "shape:")):
        name = defect.split(":")[1]
        if defect.startswith("dtype:"):
            dtypes[name] = refused_dtype(data, NOT_FLOATS_OR_HALVES) if name == "mean" else other_dtype(data, dtype)
            requires_grad[name] = False
        elif name == "mean":  # no dimension to sum over, or a 0-d mean
            shapes = dict.fromkeys(shapes, data.draw(st.sampled_from((lead + (0,), ()))))
        else:
            shapes[name] = wrong_shape(data, shapes[name])
        expected = (TypeError if defect.startswith("dtype:") else ValueError, name)
    logical = dict(mean=rng.normal(size=shapes["mean"]), log_std=rng.normal(size=shapes["log_std"]) * 0.5,
                   actions=rng.normal(size=shapes["actions"]) * 1.5)
    args = {k: make_arg(with_specials(rng, v, data.draw(nonfinite)), *layout_of(data, "torch", v.ndim), "torch",
                        device, dtypes[k], requires_grad=requires_grad[k])
            for k, v in logical.items()}
    kwargs = {k: a.value for k, a in args.items()}
    if defect in ("kind:mean", "kind:log_std"):
        name = defect.split(":")[1]
        kwargs[name] = data.draw(st.sampled_from((args[name].logical, args[name].logical.tolist())))
        expected = (TypeError, name)

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: fastppo.normal_logprob_entropy(**kwargs), fn, *expected)
        return
    before = unchanged(args)
    logprob, entropy = fastppo.normal_logprob_entropy(**kwargs)
    assert_unchanged(before, args)
    for result in (logprob, entropy):
        assert result.shape == lead and result.dtype == getattr(torch, dtype) and result.device == args["mean"].value.device

    x = {k: a.logical.astype(F64) for k, a in args.items()}
    want = normal_reference(*(torch.from_numpy(x[k]) for k in ("mean", "log_std", "actions")))
    eps = EPS[dtype]
    with np.errstate(all="ignore"):
        log_std = finite_abs(np.broadcast_to(x["log_std"], shape))
        z = finite_abs(x["actions"] - x["mean"])
        inv_var = np.exp(np.minimum(2 * log_std, 700.0))  # a bound on exp(-2 log_std)
        logprob_terms = 0.5 * z * z * inv_var * (2 + 2 * log_std) + log_std + 1
    tol = dict(logprob=K * eps * (D + 1) * logprob_terms.sum(-1), entropy=K * eps * (D + 1) * (log_std + 1.5).sum(-1))
    finite = all(np.isfinite(v).all() for v in x.values())
    event("computed" if finite else "computed, non-finite inputs")
    assert_matches(logprob, want[0].numpy(), tol["logprob"], "logprob")
    assert_matches(entropy, want[1].numpy(), tol["entropy"], "entropy")

    leaves = [k for k in ("mean", "log_std") if requires_grad[k]]
    if leaves:
        weights = output_weights(data, rng, lead)
        got = gradients(weighted_sum(dict(logprob=logprob, entropy=entropy), weights), [args[k].base for k in leaves])
        ref_bases = {k: a.base.detach().cpu().double().requires_grad_(k in leaves) for k, a in args.items()}
        ref = normal_reference(*(args[k].view(ref_bases[k]) for k in ("mean", "log_std", "actions")))
        wanted = gradients(weighted_sum(dict(logprob=ref[0], entropy=ref[1]), weights), [ref_bases[k] for k in leaves])
        w1, w2 = (np.abs(weights.get(k, np.zeros(lead)))[..., None] for k in ("logprob", "entropy"))
        grad_mag = dict(mean=w1 * z * inv_var * (2 + 2 * log_std),
                        log_std=w1 * (z * z * inv_var * (2 + 2 * log_std) + 1) + w2)
        for k, g, w in zip(leaves, got, wanted):
            assert_matches(g, w, scatter_to_base(args[k], K * eps * (D + 1) * grad_mag[k]), f"gradient of {k}")


# ---------------------------------------------------------------------------------------------
# fastppo.rlhf: kl_penalty_rewards, masked_whiten, token_gae, masked_mean

KL_DEFECTS = ("dtype:logprob", "dtype:ref_logprob", "dtype:scores", "dtype:mask", "shape:ref_logprob", "shape:scores",
              "shape:mask", "ndim:logprob", "kind:logprob", "kind:scores", "value:estimator", "value:beta",
              "value:kl_clamp")
WHITEN_DEFECTS = ("dtype:x", "dtype:mask", "shape:mask", "ndim:x", "kind:x", "value:eps", "dtype:group_moments",
                  "shape:group_moments")
TOKEN_GAE_DEFECTS = ("dtype:rewards", "dtype:values", "dtype:last_index", "dtype:mask", "shape:values",
                     "shape:last_index", "shape:mask", "ndim:rewards", "kind:last_index", "value:gamma", "value:gae_lambda")
MEAN_DEFECTS = ("dtype:x", "dtype:mask", "shape:mask", "kind:x")


def batch_shape(data) -> tuple:
    """[B, T]: 0 and 1 along each dimension, and a few longer rows."""
    return (data.draw(st.integers(0, 5) | st.just(33), label="B"), data.draw(st.integers(0, 6) | st.just(70), label="T"))


def token_mask(data, rng, shape) -> np.ndarray:
    """Real tokens: none, all, a prefix of each row (right padding) or random holes."""
    mode = data.draw(st.sampled_from(("prefix", "random", "zeros", "ones")), label="mask")
    if mode == "prefix":
        return np.arange(shape[1])[None, :] < rng.integers(0, shape[1] + 1, size=(shape[0], 1))
    return flags(rng, shape, mode, p=data.draw(st.sampled_from((0.3, 0.8))))


def rlhf_arg(data, rng, values, dtype, device):
    """A tensor argument holding ``values`` with a few NaN or +-inf, in a drawn layout."""
    return make_arg(with_specials(rng, values, data.draw(NONFINITE_COUNTS)), *layout_of(data, "torch", values.ndim),
                    "torch", device, dtype)


def mask_arg(data, rng, shape, device, defect):
    """An optional mask of ``shape`` (None, or flags of a dtype the kernels take unless ``defect`` says)."""
    if defect not in ("dtype:mask", "shape:mask") and data.draw(st.booleans()):
        return None
    mask_shape = wrong_shape(data, shape) if defect == "shape:mask" else shape
    set_flags = token_mask(data, rng, mask_shape) if len(mask_shape) == 2 else flags(rng, mask_shape, "random")
    dtype = refused_dtype(data, NOT_FLAGS) if defect == "dtype:mask" else data.draw(st.sampled_from(FLAGS))
    return make_arg(flag_values(data, set_flags, dtype) if dtype in FLAGS else set_flags,
                    *layout_of(data, "torch", len(mask_shape)), "torch", device, dtype)


def rlhf_defect(data, defect, args, kwargs, first, device):
    """Applies the defects every RLHF kernel shares; returns the expected (error, argument) or None."""
    if defect is None:
        return None
    kind, name = defect.split(":")
    if kind in ("dtype", "shape"):
        return (TypeError if kind == "dtype" else ValueError, name)
    if kind == "ndim":  # [T] or [B, T, 1] instead of [B, T]
        x = args[first].logical
        kwargs[first] = torch.from_numpy(data.draw(st.sampled_from((x.reshape(-1), x[..., None]))).copy()).to(device)
        for other in ("ref_logprob", "values"):  # so that only the first argument's rank is wrong
            if other in kwargs:
                kwargs[other] = kwargs[first].clone()
        return (ValueError, first)
    if kind == "kind":
        kwargs[name] = data.draw(st.sampled_from((args[name].logical, args[name].logical.tolist())))
        return (TypeError, name)
    return None


@PROPERTY
@given(data=st.data())
def test_kl_penalty_rewards_equal_the_reference(device, data):
    check_kl_penalty_rewards(device, data, None)


@pytest.mark.parametrize("defect", KL_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_kl_penalty_rewards_refuse_bad_input(device, defect, data):
    check_kl_penalty_rewards(device, data, defect)


def check_kl_penalty_rewards(device: str, data, defect: str | None) -> None:
    fn = "fastppo.rlhf.kl_penalty_rewards"
    shape = batch_shape(data)
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtypes = dict(logprob=dtype, ref_logprob=dtype, scores=dtype)
    if defect == "dtype:logprob":
        dtypes = dict.fromkeys(dtypes, refused_dtype(data, NOT_FLOATS_OR_HALVES))
    elif defect in ("dtype:ref_logprob", "dtype:scores"):
        dtypes[defect.split(":")[1]] = other_dtype(data, dtype)
    logprob = -np.abs(rng.normal(size=shape)) * 3
    ref_shape = wrong_shape(data, shape) if defect == "shape:ref_logprob" else shape
    args = dict(logprob=rlhf_arg(data, rng, logprob, dtypes["logprob"], device),
                ref_logprob=rlhf_arg(data, rng, logprob + rng.normal(size=ref_shape) * data.draw(
                    st.sampled_from((0.1, 2.0))) if ref_shape == shape else rng.normal(size=ref_shape),
                    dtypes["ref_logprob"], device))
    if defect in ("dtype:scores", "shape:scores", "kind:scores") or data.draw(st.booleans()):
        scores_shape = wrong_shape(data, shape[:1]) if defect == "shape:scores" else shape[:1]
        args["scores"] = rlhf_arg(data, rng, rng.normal(size=scores_shape) * 2, dtypes["scores"], device)
    mask = mask_arg(data, rng, shape, device, defect)
    options = dict(beta=data.draw(st.sampled_from((0.05, 0.0, 1.0))),
                   estimator=data.draw(st.sampled_from(("k1", "k2", "k3"))),
                   kl_clamp=data.draw(st.sampled_from((None, 0.05, 1.0, math.inf))))
    kwargs = dict({k: a.value for k, a in args.items()}, mask=None if mask is None else mask.value, **options)
    expected = rlhf_defect(data, defect, args, kwargs, "logprob", device)
    if defect == "value:estimator":
        kwargs["estimator"], expected = data.draw(st.sampled_from(("k4", "K1", "", None))), (ValueError, "estimator")
    elif defect in ("value:beta", "value:kl_clamp"):
        name = defect.split(":")[1]
        refused = (-0.1, math.nan, "0.1", True) + ((math.inf,) if name == "beta" else (0.0,))
        kwargs[name] = data.draw(st.sampled_from(refused))
        expected = (ValueError if isinstance(kwargs[name], float) else TypeError, name)

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: kl_penalty_rewards(**kwargs), fn, *expected)
        return
    before = unchanged(dict(args, mask=mask))
    rewards, kl, last = kl_penalty_rewards(**kwargs)
    assert_unchanged(before, dict(args, mask=mask))
    assert rewards.shape == kl.shape == shape and rewards.dtype == kl.dtype == getattr(torch, dtype)
    assert last.shape == shape[:1] and last.dtype == torch.int64

    x = {k: torch.from_numpy(a.logical.astype(F64)) for k, a in args.items()}
    want_rewards, want_kl, want_last = kl_reference(
        x["logprob"], x["ref_logprob"], None if mask is None else torch.from_numpy(mask.logical.copy()),
        x.get("scores"), options["beta"], options["estimator"], options["kl_clamp"])
    assert torch.equal(last.cpu(), want_last), (last, want_last)
    lp, rp = finite_abs(x["logprob"]), finite_abs(x["ref_logprob"])
    with np.errstate(all="ignore"):
        d = finite_abs(x["logprob"] - x["ref_logprob"])
        growth = dict(k1=1.0, k2=1.0 + d, k3=1.0 + d + np.exp(np.minimum(d, 700.0)))[options["estimator"]]
    eps = EPS[dtype]
    tol_kl = K * eps * (1 + lp + rp) * growth
    scores = np.zeros(shape[:1]) if "scores" not in x else finite_abs(x["scores"])
    tol_rewards = options["beta"] * tol_kl + K * eps * (options["beta"] * finite_abs(want_kl) + scores[:, None])
    event("computed" if all(np.isfinite(v.numpy()).all() for v in x.values()) else "computed, non-finite inputs")
    assert_matches(kl, want_kl.numpy(), tol_kl, "kl")
    assert_matches(rewards, want_rewards.numpy(), tol_rewards, "rewards")


@PROPERTY
@given(data=st.data())
def test_masked_whiten_equals_the_reference(device, data):
    check_masked_whiten(device, data, None)


@pytest.mark.parametrize("defect", WHITEN_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_masked_whiten_refuses_bad_input(device, defect, data):
    check_masked_whiten(device, data, defect)


def check_masked_whiten(device: str, data, defect: str | None) -> None:
    fn = "fastppo.rlhf.masked_whiten"
    shape = batch_shape(data)
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x_dtype = refused_dtype(data, NOT_FLOATS_OR_HALVES) if defect == "dtype:x" else dtype
    x = rlhf_arg(data, rng, rng.normal(loc=1.5, scale=2.0, size=shape), x_dtype, device)
    mask = mask_arg(data, rng, shape, device, defect)
    options = dict(shift_mean=data.draw(st.booleans()), eps=data.draw(st.sampled_from((1e-8, 0.5, 0.0))))
    kwargs = dict(x=x.value, mask=None if mask is None else mask.value, **options)
    sel = np.ones(shape, bool) if mask is None or defect in ("dtype:mask", "shape:mask") else mask.logical != 0
    chosen = np.real(x.logical).astype(F64)[sel]
    mean, var = whiten_moments(chosen.tolist())
    moments = (chosen.size, mean, var * max(chosen.size - 1, 0))  # count, mean, sum of squared deviations
    if defect in ("dtype:group_moments", "shape:group_moments") or data.draw(st.integers(0, 5)) == 0:
        # a group of one: this call's own moments change nothing
        group = torch.tensor(moments, dtype=torch.float64, device=device)
        kwargs["group_moments"] = group.float() if defect == "dtype:group_moments" else (
            group[:2] if defect == "shape:group_moments" else group)
    expected = rlhf_defect(data, defect, dict(x=x), kwargs, "x", device)
    if defect == "value:eps":
        kwargs["eps"] = data.draw(st.sampled_from((-1e-8, math.nan, math.inf, "1e-8", True)))
        expected = (ValueError if isinstance(kwargs["eps"], float) else TypeError, "eps")

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: masked_whiten(**kwargs), fn, *expected)
        return
    before = unchanged(dict(x=x, mask=mask))
    out = masked_whiten(**kwargs)
    assert_unchanged(before, dict(x=x, mask=mask))
    assert out.shape == shape and out.dtype == getattr(torch, dtype) and out.device == x.value.device
    want = whiten_reference(torch.from_numpy(x.logical.astype(F64)), None if mask is None else
                            torch.from_numpy(mask.logical.copy()), **options)
    n, eps = chosen.size, options["eps"]
    with np.errstate(all="ignore"):
        inv_std = finite_abs(1 / np.sqrt(F64(var + eps)))
        conditioning = finite_abs((var + mean * mean) / F64(var + eps))  # how float64 sums' rounding grows in 1 / std
    mean = float(finite_abs(mean))
    # (x - mean) * inv_std rounds relative to |x| + |mean|; the statistics are summed in float64.
    tol = (K * (EPS[dtype] + EPS["float64"] * (n + 1)) * ((finite_abs(x.logical) + mean) * inv_std + 2 * mean)
           + K * EPS["float64"] * (n + 1) * conditioning * finite_abs(want))
    if n and var + eps == 0:  # every selected element is 0 / 0: only the unselected ones (0) are defined
        event("computed, selected elements 0 / 0")
        assert (to_f64(out)[~sel] == 0).all()
        return
    event("computed" if np.isfinite(chosen).all() else "computed, non-finite inputs")
    assert_matches(out, want.numpy(), tol, "whitened")


@PROPERTY
@given(data=st.data())
def test_token_gae_equals_the_reference(device, data):
    check_token_gae(device, data, None)


@pytest.mark.parametrize("defect", TOKEN_GAE_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_token_gae_refuses_bad_input(device, defect, data):
    check_token_gae(device, data, defect)


def token_gae_budget(r, v, last, gamma, gae_lambda, adv) -> np.ndarray:
    """As gae_budget, per row over tokens 0..last."""
    ar, av, aa = finite_abs(r), finite_abs(v), finite_abs(adv)
    bound = np.zeros_like(ar)
    for b in range(r.shape[0]):
        carried, next_v, next_a = 0.0, 0.0, 0.0
        for t in range(min(int(last[b]), r.shape[1] - 1), -1, -1):
            carried = ar[b, t] + gamma * next_v + av[b, t] + aa[b, t] + gamma * gae_lambda * (next_a + carried)
            bound[b, t], next_v, next_a = carried, av[b, t], aa[b, t]
    return bound


def check_token_gae(device: str, data, defect: str | None) -> None:
    fn = "fastppo.rlhf.token_gae"
    shape = batch_shape(data)
    B, T = shape
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    r_dtype = refused_dtype(data, NOT_FLOATS_OR_HALVES) if defect == "dtype:rewards" else dtype
    v_dtype = other_dtype(data, dtype) if defect == "dtype:values" else dtype
    v_shape = wrong_shape(data, shape) if defect == "shape:values" else shape
    args = dict(rewards=rlhf_arg(data, rng, rng.normal(size=shape), r_dtype, device),
                values=rlhf_arg(data, rng, rng.normal(size=v_shape), v_dtype, device))
    # last real token: none (-1, or below), the first, the last, past the end (counts as T - 1), anywhere
    l_shape = wrong_shape(data, (B,)) if defect == "shape:last_index" else (B,)
    last_index = rng.integers(-3, T + 3, size=l_shape)
    if last_index.size:
        last_index.reshape(-1)[: 3] = np.array([-1, T - 1, 0])[: min(3, last_index.size)]
    l_dtype = data.draw(st.sampled_from(("int32", "float32", "float64"))) if defect == "dtype:last_index" else "int64"
    args["last_index"] = make_arg(last_index, *layout_of(data, "torch", len(l_shape)), "torch", device, l_dtype, gap=T + 5)
    mask = mask_arg(data, rng, shape, device, defect)
    gamma, gae_lambda = data.draw(gammas(), label="gamma"), data.draw(gammas(), label="gae_lambda")
    kwargs = dict({k: a.value for k, a in args.items()}, gamma=gamma, gae_lambda=gae_lambda, mask=None if mask is None else mask.value)
    expected = rlhf_defect(data, defect, args, kwargs, "rewards", device)
    if defect in ("value:gamma", "value:gae_lambda"):
        name = defect.split(":")[1]
        kwargs[name], error = bad_real(data)
        expected = (error, name)

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: token_gae(**kwargs), fn, *expected)
        return
    before = unchanged(dict(args, mask=mask))
    adv, ret = token_gae(**kwargs)
    assert_unchanged(before, dict(args, mask=mask))
    for result in (adv, ret):
        assert result.shape == shape and result.dtype == getattr(torch, dtype) and result.device == adv.device
    r, v = (torch.from_numpy(args[k].logical.astype(F64)) for k in ("rewards", "values"))
    last = args["last_index"].logical
    want_adv, want_ret = token_gae_reference(r, v, last, gamma, gae_lambda,
                                             None if mask is None else torch.from_numpy(mask.logical.copy()))
    tol = K * EPS[dtype] * token_gae_budget(r.numpy(), v.numpy(), last, gamma, gae_lambda, want_adv.numpy())
    event("computed" if np.isfinite(want_adv.numpy()).all() else "computed, with non-finite results")
    assert_matches(adv, want_adv.numpy(), tol, "advantages")
    assert_matches(ret, want_ret.numpy(), tol + K * EPS[dtype] * (finite_abs(want_adv) + finite_abs(v)), "returns")


@PROPERTY
@given(data=st.data())
def test_masked_mean_equals_the_reference(device, data):
    check_masked_mean(device, data, None)


@pytest.mark.parametrize("defect", MEAN_DEFECTS)
@REFUSALS
@given(data=st.data())
def test_masked_mean_refuses_bad_input(device, defect, data):
    check_masked_mean(device, data, defect)


def check_masked_mean(device: str, data, defect: str | None) -> None:
    fn = "fastppo.rlhf.masked_mean"
    shape = data.draw(st.sampled_from((batch_shape(data), (data.draw(st.integers(0, 5)),))), label="shape")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x_dtype = data.draw(st.sampled_from(("int64", "int32", "bool"))) if defect == "dtype:x" else dtype
    x = rlhf_arg(data, rng, rng.normal(size=shape), x_dtype, device)
    mask = mask_arg(data, rng, shape, device, defect)
    dim = data.draw(st.sampled_from((None,) + tuple(range(-len(shape), len(shape)))), label="dim")
    kwargs = dict(x=x.value, mask=None if mask is None else mask.value, dim=dim)
    expected = (TypeError, "x") if defect == "dtype:x" else rlhf_defect(data, defect, dict(x=x), kwargs, "x", device)

    if expected is not None:
        event(f"refused: {defect}")
        expect_error(lambda: masked_mean(**kwargs), fn, *expected)
        return
    before = unchanged(dict(x=x, mask=mask))
    got = masked_mean(**kwargs)
    assert_unchanged(before, dict(x=x, mask=mask))
    x64 = torch.from_numpy(x.logical.astype(F64))
    mask_logical = None if mask is None else torch.from_numpy(mask.logical.copy())
    want = masked_mean_reference(x64, mask_logical, dim)
    assert got.dtype == getattr(torch, dtype) and got.device == x.value.device
    sel = np.ones(shape, bool) if mask is None else mask.logical != 0
    biggest = finite_abs(np.where(sel, x.logical.astype(F64), 0.0)).max(initial=0.0)
    tol = K * EPS[dtype] * (x.logical.size + 1) * biggest  # a float sum of up to x.size terms
    event("computed" if np.isfinite(x.logical[sel]).all() else "computed, non-finite selected")
    assert_matches(got, want.numpy(), tol, "mean")


def test_ppo_loss_zero_ratio_and_infinite_advantage_is_nan(device):
    new_logprob = torch.tensor([-math.inf, -1.0], device=device)
    advantages = torch.tensor([math.inf, 0.3], device=device)
    out = fastppo.ppo_loss(new_logprob, torch.zeros(2, device=device), advantages, norm_adv=False)
    want = ppo_loss_reference(new_logprob.cpu().double(), torch.zeros(2, dtype=torch.float64),
                              advantages.cpu().double(), norm_adv=False)
    assert math.isnan(want["pg_loss"])
    assert math.isnan(out.pg_loss) and math.isnan(out.loss), (out.pg_loss, out.loss)
