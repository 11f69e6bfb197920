"""fastppo.gae against a plain float64 reference of the formula, and against CleanRL's loop. The
numpy cases run without torch installed (a numpy-only install), the torch ones then skip."""

from __future__ import annotations

import numpy as np
import pytest

import fastppo
from fastppo import _buffers, _C

from conftest import needs_cuda
from references import GAE_LAMBDA, GAMMA, gae_reference, rollout

try:
    import torch
except ModuleNotFoundError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


def to_kind(kind, device, *arrays, dtype=np.float64):
    """Converts float arrays to `dtype` and moves everything to numpy or torch on `device`."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = a.astype(dtype)
        out.append(a if kind == "numpy" else torch.from_numpy(a.copy()).to(device))
    return out


def as_numpy(x):
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


KINDS = ["numpy", pytest.param("torch", marks=needs_torch)]
SIZES = [(1, 1), (1, 97), (97, 1), (97, 97), (1025, 3), (3, 1025), (2048, 1), (4099, 2), (1025, 1025)]


def kinds_for(device):
    return ["torch"] if device == "cuda" else ["numpy", "torch"] if torch is not None else ["numpy"]


@pytest.mark.parametrize("T,N", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_float64_matches_reference(device, kind, T, N):
    if kind not in kinds_for(device):
        pytest.skip("numpy arrays live on the CPU")
    r, v, d, term, last = rollout(T, N, seed=T * 7 + N)
    expected_adv, expected_ret = gae_reference(r, v, d, last, term)
    adv, ret = fastppo.gae(*to_kind(kind, device, r, v, d, last), terminated=to_kind(kind, device, term)[0])
    np.testing.assert_allclose(as_numpy(adv), expected_adv, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(as_numpy(ret), expected_ret, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T,N", SIZES)
def test_float32_within_1e5_of_float64(device, T, N):
    r, v, d, term, last = rollout(T, N, seed=T + N)
    expected_adv, expected_ret = gae_reference(r, v, d, last, term)
    kind = kinds_for(device)[0]
    adv, ret = fastppo.gae(*to_kind(kind, device, r, v, d, last, dtype=np.float32),
                           terminated=to_kind(kind, device, term)[0])
    assert adv.dtype == ret.dtype and str(adv.dtype).endswith("float32")
    np.testing.assert_allclose(as_numpy(adv), expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_numpy(ret), expected_ret, rtol=1e-5, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("T,N", [(1, 1), (97, 8), (1025, 4), (2048, 1)])
def test_equals_cleanrl_loop_with_the_convention_shift(device, T, N):
    from peers import cleanrl_gae  # a torch module

    rng = np.random.default_rng(T)
    rewards = torch.tensor(rng.normal(size=(T, N)), device=device)
    values = torch.tensor(rng.normal(size=(T, N)), device=device)
    cleanrl_dones = torch.tensor(rng.random((T, N)) < 0.1, device=device).double()
    cleanrl_dones[0] = 1.0  # CleanRL: the first observation of a rollout may start an episode
    next_done = torch.tensor(rng.random(N) < 0.5, device=device).double()
    next_value = torch.tensor(rng.normal(size=N), device=device)
    expected_adv, expected_ret = cleanrl_gae(rewards, values, cleanrl_dones, next_value, next_done, GAMMA, GAE_LAMBDA)

    dones = torch.cat([cleanrl_dones[1:], next_done[None]])  # the one-line mapping of the docs
    adv, ret = fastppo.gae(rewards, values, dones, next_value)
    torch.testing.assert_close(adv, expected_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, expected_ret, rtol=1e-10, atol=1e-10)


@needs_torch
def test_truncation_cuts_the_trace_but_bootstraps(device):
    # One env, three steps; the episode is truncated at t = 1 and a new one starts at t = 2.
    r = torch.tensor([1.0, 2.0, 3.0], device=device, dtype=torch.float64)
    v = torch.tensor([0.5, 0.25, 4.0], device=device, dtype=torch.float64)
    dones = torch.tensor([0, 1, 0], device=device, dtype=torch.bool)
    terminated = torch.zeros(3, device=device, dtype=torch.bool)
    last = torch.tensor(2.0, device=device, dtype=torch.float64)
    g, gl = GAMMA, GAMMA * GAE_LAMBDA
    adv2 = 3.0 + g * 2.0 - 4.0
    adv1 = 2.0 + g * 4.0 - 0.25  # bootstraps from values[2], but does not carry adv2
    adv0 = (1.0 + g * 0.25 - 0.5) + gl * adv1
    adv, ret = fastppo.gae(r, v, dones, last, terminated=terminated)
    torch.testing.assert_close(adv.cpu(), torch.tensor([adv0, adv1, adv2], dtype=torch.float64))
    torch.testing.assert_close(ret.cpu(), torch.tensor([adv0 + 0.5, adv1 + 0.25, adv2 + 4.0], dtype=torch.float64))

    # Treated as a termination instead, step 1 no longer bootstraps.
    adv_term, _ = fastppo.gae(r, v, dones, last)
    assert adv_term[1].item() == pytest.approx(2.0 - 0.25)


@pytest.mark.parametrize("T", [1, 97, 2048])
def test_all_done_rows_are_one_step_td_errors(device, T):
    r, v, _, _, last = rollout(T, 5, seed=3)
    dones = np.ones((T, 5), bool)
    kind = kinds_for(device)[-1]
    adv, _ = fastppo.gae(*to_kind(kind, device, r, v, dones, last))
    np.testing.assert_allclose(as_numpy(adv), r - v, rtol=1e-12, atol=1e-12)
    # Truncated everywhere: each step is its own one-step bootstrap.
    adv_trunc, _ = fastppo.gae(*to_kind(kind, device, r, v, dones, last),
                               terminated=to_kind(kind, device, np.zeros((T, 5), bool))[0])
    next_values = np.concatenate([v[1:], last[None]])
    np.testing.assert_allclose(as_numpy(adv_trunc), r + GAMMA * next_values - v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trailing", [(), (4, 3), (2, 3, 2)])
def test_trailing_shapes(device, trailing):
    r, v, d, term, last = rollout(33, *trailing, seed=len(trailing))
    expected_adv, _ = gae_reference(r, v, d, last, term)
    for kind in kinds_for(device):
        adv, ret = fastppo.gae(*to_kind(kind, device, r, v, d, last), terminated=to_kind(kind, device, term)[0])
        assert tuple(adv.shape) == tuple(ret.shape) == (33, *trailing)
        np.testing.assert_allclose(as_numpy(adv), expected_adv, rtol=1e-10, atol=1e-10)


@needs_torch
@pytest.mark.parametrize("T,Bsz", [(97, 5), (2048, 1), (1025, 3)])
def test_transposed_batch_major_views_are_read_in_place(device, T, Bsz):
    r, v, d, term, last = rollout(T, Bsz, seed=11)
    expected_adv, _ = gae_reference(r, v, d, last, term)
    # Batch-major [B, T] storage (RLHF layout), passed as its transpose [T, B].
    rb, vb, db, tb = (torch.from_numpy(np.ascontiguousarray(x.T)).to(device) for x in (r, v, d, term))
    assert Bsz == 1 or not rb.T.is_contiguous()
    adv, _ = fastppo.gae(rb.T, vb.T, db.T, torch.from_numpy(last).to(device), terminated=tb.T)
    np.testing.assert_allclose(as_numpy(adv), expected_adv, rtol=1e-10, atol=1e-10)
    # The kernel is handed the caller's own memory, not a copy.
    buf = _buffers.rows(rb.T, T, Bsz)
    assert buf.data == rb.data_ptr() and buf.strides[0] == 1
    if device == "cpu":
        an = np.ascontiguousarray(r.T).T
        adv_np, _ = fastppo.gae(an, np.ascontiguousarray(v.T).T, np.ascontiguousarray(d.T).T, last,
                                terminated=np.ascontiguousarray(term.T).T)
        np.testing.assert_allclose(adv_np, expected_adv, rtol=1e-10, atol=1e-10)
        assert _buffers.address(_buffers.rows(an, T, Bsz).data) == an.ctypes.data


def test_other_strided_views():
    r, v, d, term, last = rollout(64, 6, seed=5)
    expected_adv, _ = gae_reference(r[::2, 1::2], v[::2, 1::2], d[::2, 1::2], last[1::2], term[::2, 1::2])
    adv, _ = fastppo.gae(r[::2, 1::2], v[::2, 1::2], d[::2, 1::2], last[1::2], terminated=term[::2, 1::2])
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-12, atol=1e-12)
    # Negative strides (reversed views) and non-native byte order.
    rev = (slice(None), slice(None, None, -1))
    expected_adv, _ = gae_reference(r[rev], v[rev], d[rev], last[::-1], term[rev])
    adv, _ = fastppo.gae(r[rev].astype(">f8"), v[rev], d[rev], last[::-1], terminated=term[rev])
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-12, atol=1e-12)


@needs_torch
def test_numpy_and_torch_give_the_same_bits():
    r, v, d, term, last = rollout(300, 7, seed=9)
    for dtype in (np.float32, np.float64):
        a_np, r_np = fastppo.gae(*to_kind("numpy", "cpu", r, v, d, last, dtype=dtype), terminated=term)
        a_t, r_t = fastppo.gae(*to_kind("torch", "cpu", r, v, d, last, dtype=dtype),
                               terminated=torch.from_numpy(term))
        assert isinstance(a_np, np.ndarray) and isinstance(a_t, torch.Tensor)
        np.testing.assert_array_equal(a_np, a_t.numpy())
        np.testing.assert_array_equal(r_np, r_t.numpy())


@pytest.mark.parametrize("flag_dtype", ["bool", "uint8", "int8", "int32", "int64", "float32", "float64"])
def test_flag_dtypes(device, flag_dtype):
    r, v, d, term, last = rollout(50, 4, seed=2)
    expected_adv, _ = gae_reference(r, v, d, last, term)
    for kind in kinds_for(device):
        rr, vv, ll = to_kind(kind, device, r, v, last)
        dd, tt = to_kind(kind, device, d.astype(flag_dtype), term.astype(flag_dtype))
        adv, _ = fastppo.gae(rr, vv, dd, ll, terminated=tt)
        np.testing.assert_allclose(as_numpy(adv), expected_adv, rtol=1e-12, atol=1e-12)


def test_scalar_last_value_and_gamma_lam_edges(device):
    r, v, d, term, _ = rollout(40, 3, seed=4)
    kind = kinds_for(device)[-1]
    rr, vv, dd, tt = to_kind(kind, device, r, v, d, term)
    for gamma, gae_lambda in [(0.0, 0.0), (1.0, 1.0), (0.9, 0.0), (1.0, 0.5)]:
        expected_adv, _ = gae_reference(r, v, d, np.full(3, 0.5), term, gamma=gamma, gae_lambda=gae_lambda)
        adv, _ = fastppo.gae(rr, vv, dd, 0.5, terminated=tt, gamma=gamma, gae_lambda=gae_lambda)
        np.testing.assert_allclose(as_numpy(adv), expected_adv, rtol=1e-12, atol=1e-12)


@needs_torch
def test_terminated_step_ignores_a_nonfinite_next_value(device):
    r = torch.ones(3, 2, dtype=torch.float64, device=device)
    v = torch.zeros(3, 2, dtype=torch.float64, device=device)
    dones = torch.zeros(3, 2, dtype=torch.bool, device=device)
    dones[-1] = True
    adv, _ = fastppo.gae(r, v, dones, torch.full((2,), float("inf"), dtype=torch.float64, device=device))
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("shape", [(0,), (0, 4), (5, 0), (3, 0, 2)])
def test_empty_inputs(device, shape):
    for kind in kinds_for(device):
        r, v, d = to_kind(kind, device, np.zeros(shape), np.zeros(shape), np.zeros(shape, bool))
        last = to_kind(kind, device, np.zeros(shape[1:]))[0]
        adv, ret = fastppo.gae(r, v, d, last)
        assert tuple(adv.shape) == tuple(ret.shape) == shape


def test_outputs_are_new_arrays_of_the_callers_kind_and_inputs_are_untouched(device):
    r, v, d, term, last = rollout(20, 3, seed=8)
    for kind in kinds_for(device):
        inputs = to_kind(kind, device, r, v, d, last, dtype=np.float32)
        before = [as_numpy(x).copy() for x in inputs]
        adv, ret = fastppo.gae(*inputs)
        assert type(adv) is type(inputs[0]) and type(ret) is type(inputs[0])
        if kind == "torch":
            assert adv.device == inputs[0].device and adv.dtype == torch.float32
            assert adv.data_ptr() != ret.data_ptr() != inputs[0].data_ptr()
        else:
            assert adv.dtype == np.float32 and not np.shares_memory(adv, inputs[0])
        for x, b in zip(inputs, before):
            np.testing.assert_array_equal(as_numpy(x), b)


# ---------------------------------------------------------------- bad input


def good_inputs(T=4, N=3):
    return [np.zeros((T, N), np.float32), np.zeros((T, N), np.float32), np.zeros((T, N), bool), np.zeros(N, np.float32)]


def call_with(**changes):
    r, v, d, last = good_inputs()
    kwargs = dict(rewards=r, values=v, dones=d, last_value=last)
    kwargs.update(changes)
    return fastppo.gae(**kwargs)


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(rewards=[[0.0] * 3] * 4), TypeError, ["rewards", "list"]),
        (dict(rewards=np.zeros((4, 3), np.int64)), TypeError, ["rewards", "int64", "float32, float64, bfloat16 or float16"]),
        (dict(rewards=np.zeros((4, 3), np.complex64)), TypeError, ["rewards", "complex64"]),
        (dict(rewards=np.zeros((), np.float32)), ValueError, ["rewards", "time dimension"]),
        (dict(values=np.zeros((4, 3), np.float64)), TypeError, ["values", "float64", "float32"]),
        (dict(values=np.zeros((4, 2), np.float32)), ValueError, ["values", "(4, 2)", "(4, 3)"]),
        (dict(values=np.zeros((4, 3), np.complex128)), TypeError, ["values", "complex128"]),
        (dict(dones=np.zeros((4, 3), np.complex64)), TypeError, ["dones", "complex64", "bool"]),
        (dict(dones=np.zeros((4, 3), np.float16)), TypeError, ["dones", "float16"]),
        (dict(dones=np.zeros((3, 3), bool)), ValueError, ["dones", "(3, 3)", "(4, 3)"]),
        (dict(terminated=np.zeros((4, 1), bool)), ValueError, ["terminated", "(4, 1)"]),
        (dict(terminated=np.zeros((4, 3), "U1")), TypeError, ["terminated", "str"]),
        (dict(last_value=np.zeros((1, 3), np.float32)), ValueError, ["last_value", "(1, 3)", "(3,)"]),
        (dict(last_value=np.zeros(4, np.float32)), ValueError, ["last_value", "(4,)", "(3,)"]),
        (dict(last_value=np.zeros(3, np.float64)), TypeError, ["last_value", "float64"]),
        (dict(last_value=None), TypeError, ["last_value", "NoneType"]),
        (dict(gamma=1.5), ValueError, ["gamma", "[0, 1]", "1.5"]),
        (dict(gamma=float("nan")), ValueError, ["gamma", "nan"]),
        (dict(gae_lambda=-0.1), ValueError, ["gae_lambda", "-0.1"]),
        (dict(gae_lambda="0.9"), TypeError, ["gae_lambda", "str"]),
        pytest.param(dict(values=lambda: torch.zeros(4, 3)), TypeError, ["values", "torch.Tensor", "numpy.ndarray"],
                     marks=needs_torch, id="torch-values-with-numpy-rewards"),
    ],
)
def test_bad_input_names_the_argument(changes, error, words):
    changes = {k: v() if callable(v) else v for k, v in changes.items()}  # a torch value is made only with torch
    with pytest.raises(error) as info:
        call_with(**changes)
    message = str(info.value)
    assert message.startswith("fastppo.gae:")
    for word in words:
        assert word in message, (word, message)


def test_old_keyword_lam_gives_the_same_result_with_a_deprecation_warning():
    r, v, d, term, last = rollout(37, 3, seed=4)
    want = fastppo.gae(r, v, d, last, term, 0.9, 0.8)
    with pytest.warns(DeprecationWarning, match="fastppo.gae's keyword lam is renamed gae_lambda") as caught:
        got = fastppo.gae(r, v, d, last, terminated=term, gamma=0.9, lam=0.8)
    assert caught[0].filename == __file__  # the warning points at the call
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    default, _ = fastppo.gae(r, v, d, last, terminated=term, gamma=0.9)
    assert not np.array_equal(got[0], default)  # lam=0.8 was used, not the default 0.95
    with pytest.raises(TypeError, match="fastppo.gae: got both lam= and gae_lambda="):
        fastppo.gae(r, v, d, last, terminated=term, lam=0.8, gae_lambda=0.8)
    with pytest.raises(TypeError, match="got both lam= and gae_lambda="):  # by position and by its old name
        fastppo.gae(r, v, d, last, term, 0.9, 0.8, lam=0.8)


@needs_torch
def test_mixed_devices_are_refused():
    r, v, d, last = (torch.from_numpy(x) for x in good_inputs())
    with pytest.raises(ValueError, match=r"values is on meta but rewards is on cpu"):
        fastppo.gae(r, v.to("meta"), d, last)
    with pytest.raises(TypeError, match="dense"):
        fastppo.gae(r, v.to_sparse(), d, last)


def test_cuda_tensor_on_a_build_without_cuda_is_refused(monkeypatch):
    class CudaTensor:  # the attributes the device check reads
        device, is_cpu, is_cuda = "cuda:0", False, True

    monkeypatch.setattr(_C, "WITH_CUDA", False)
    with pytest.raises(ValueError, match=r"rewards is on cuda:0 but this build of fastppo has no CUDA support"):
        _buffers.check_device("fastppo.gae", "rewards", CudaTensor())


# ---------------------------------------------------------------- CUDA specifics


@pytest.mark.cuda
@needs_cuda
class TestCuda:
    def test_runs_on_the_current_stream(self):
        r, v, d, term, last = rollout(4096, 2, seed=1)
        expected_adv, _ = gae_reference(r, v, d, last, term)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            inputs = to_kind("torch", "cuda", r, v, d, last)
            adv, _ = fastppo.gae(*inputs, terminated=to_kind("torch", "cuda", term)[0])
            host = adv.to("cpu", non_blocking=False)
        side.synchronize()
        np.testing.assert_allclose(host.numpy(), expected_adv, rtol=1e-10, atol=1e-10)

    def test_cuda_and_cpu_tensors_do_not_mix(self):
        r, v, d, last = (torch.from_numpy(x) for x in good_inputs())
        with pytest.raises(ValueError, match=r"values is on cuda:0 but rewards is on cpu"):
            fastppo.gae(r, v.cuda(), d, last)
        with pytest.raises(ValueError, match=r"last_value is on cpu but rewards is on cuda:0"):
            fastppo.gae(r.cuda(), v.cuda(), d.cuda(), last)

    @pytest.mark.parametrize("T,N", [(100000, 1), (128, 1023), (129, 1024), (5000, 7)])
    def test_split_and_column_kernels_at_their_thresholds(self, T, N):
        r, v, d, term, last = rollout(T, N, seed=T)
        expected_adv, _ = gae_reference(r, v, d, last, term)
        adv, _ = fastppo.gae(*to_kind("torch", "cuda", r, v, d, last), terminated=to_kind("torch", "cuda", term)[0])
        np.testing.assert_allclose(adv.cpu().numpy(), expected_adv, rtol=1e-10, atol=1e-10)

    def test_second_device(self):
        if torch.cuda.device_count() < 2:
            pytest.skip("needs two CUDA devices")
        r, v, d, term, last = rollout(300, 5, seed=1)
        expected_adv, _ = gae_reference(r, v, d, last, term)
        adv, _ = fastppo.gae(*to_kind("torch", "cuda:1", r, v, d, last), terminated=to_kind("torch", "cuda:1", term)[0])
        assert adv.device == torch.device("cuda:1")
        np.testing.assert_allclose(adv.cpu().numpy(), expected_adv, rtol=1e-10, atol=1e-10)


def test_chunked_horizon_scan_with_many_threads():
    # With more threads than environments and a long horizon, the CPU path cuts the horizon
    # into one chunk per thread; five threads give chunk boundaries this machine's default lacks.
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, fastppo, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from references import rollout, gae_reference\n"
        "assert fastppo._C.build_info()['threads'] == 5\n"
        "for T, N in [(2048, 1), (4099, 3), (10007, 4)]:\n"
        "    r, v, d, term, last = rollout(T, N, seed=T)\n"
        "    expected, _ = gae_reference(r, v, d, last, term)\n"
        "    adv, _ = fastppo.gae(r, v, d, last, terminated=term)\n"
        "    np.testing.assert_allclose(adv, expected, rtol=1e-10, atol=1e-10)\n"
        "    adv32, _ = fastppo.gae(r.astype('f4'), v.astype('f4'), d, last.astype('f4'), terminated=term)\n"
        "    np.testing.assert_allclose(adv32, expected, rtol=1e-5, atol=1e-5)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="5")
    subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], check=True, env=env)


def test_out_arrays_are_written_in_place(device):
    r, v, d, term, last = rollout(65, 3, 2, seed=12)
    expected_adv, expected_ret = gae_reference(r, v, d, last, term)
    for kind in kinds_for(device):
        rr, vv, dd, tt, ll = to_kind(kind, device, r, v, d, term, last)
        adv_out, ret_out = (x * 0 + 7 for x in (rr, rr))
        adv, ret = fastppo.gae(rr, vv, dd, ll, terminated=tt, out=(adv_out, ret_out))
        assert adv is adv_out and ret is ret_out
        np.testing.assert_allclose(as_numpy(adv_out), expected_adv, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(as_numpy(ret_out), expected_ret, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make_out,error,words",
    [
        (lambda r: r, TypeError, ["out must be an (advantages, returns) pair"]),
        (lambda r: (r.copy(), r.astype(np.float64)), TypeError, ["out[1]", "float64"]),
        (lambda r: (r.copy(), r.copy()[:2]), ValueError, ["out[1]", "(2, 3)", "(4, 3)"]),
        (lambda r: (np.zeros((3, 4), np.float32).T, r.copy()), ValueError, ["out[0]", "C-contiguous"]),
        (lambda r: (r, r.copy()), ValueError, ["out[0]", "overlaps an input"]),
        (lambda r: (lambda o: (o, o))(r.copy()), ValueError, ["out[0] and out[1] overlap"]),
        pytest.param(lambda r: (torch.zeros(4, 3), torch.zeros(4, 3)), TypeError, ["out[0]", "torch.Tensor"],
                     marks=needs_torch, id="torch-out-with-numpy-inputs"),
        # Outputs the kernel would write wrongly or where it must not: refused, not written.
        (lambda r: (r.copy(), np.zeros((4, 3), ">f4")), TypeError, ["out[1]", ">f4", "byte order"]),
        (lambda r: (read_only(r.copy()), r.copy()), ValueError, ["out[0]", "read-only"]),
        (lambda r: (r.copy(), unaligned(r)), ValueError, ["out[1]", "aligned"]),
    ],
)
def test_bad_out_names_the_argument(make_out, error, words):
    r, v, d, last = good_inputs()
    out = make_out(r)
    before = [o.copy() for o in out if isinstance(o, np.ndarray)]
    with pytest.raises(error) as info:
        fastppo.gae(r, v, d, last, out=out)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    for o, b in zip([o for o in out if isinstance(o, np.ndarray)], before):
        np.testing.assert_array_equal(o, b)  # nothing was written


def read_only(x):
    x.flags.writeable = False
    return x


def unaligned(like):
    raw = np.frombuffer(bytearray(like.nbytes + 1), dtype=np.uint8)[1:]  # writeable memory one byte off
    return raw.view(like.dtype).reshape(like.shape)


@needs_torch
def test_out_tensor_that_requires_grad_is_refused():
    r, v, d, last = (torch.from_numpy(x) for x in good_inputs())
    adv = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"fastppo.gae: out\[0\] requires grad"):
        fastppo.gae(r, v, d, last, out=(adv, torch.zeros(4, 3)))
    assert not adv.detach().any()
