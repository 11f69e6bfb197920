"""Large numpy outputs reuse the memory of outputs that are gone, and never of one still alive."""

from __future__ import annotations

import gc

import numpy as np

import fastppo
from fastppo._buffers import _RecyclingPool


def address(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


def test_a_block_is_reused_only_when_no_view_of_it_is_alive():
    pool = _RecyclingPool(min_bytes=1024)
    a = pool.empty((64, 64), np.dtype(np.float32))
    first = address(a)
    view = a[3:, ::2]  # any view keeps the block
    del a
    gc.collect()
    b = pool.empty((64, 64), np.dtype(np.float32))
    assert address(b) != first
    del view
    c = pool.empty((64, 64), np.dtype(np.float32))
    assert address(c) == first
    d = pool.empty((32, 128), np.dtype(np.float64))  # another size: its own block
    assert address(d) not in (address(b), address(c))
    assert c.flags.c_contiguous and c.flags.writeable and c.shape == (64, 64) and c.dtype == np.float32


def test_small_outputs_and_a_full_pool_are_plain_arrays():
    pool = _RecyclingPool(min_bytes=1 << 20, max_blocks=2)
    small = pool.empty((8, 8), np.dtype(np.float64))
    assert small.base is None and not pool.blocks
    live = [pool.empty((512, 512), np.dtype(np.float32)) for _ in range(3)]  # 1 MiB each, all alive
    assert len(pool.blocks) == 2 and len({address(x) for x in live}) == 3
    live[0][:] = 1.0
    del live[1:]
    again = pool.empty((512, 512), np.dtype(np.float32))
    assert address(again) != address(live[0])
    assert np.all(live[0] == 1.0)  # a forgotten block still serves its output


def test_gae_outputs_from_the_pool_are_independent_and_correct(monkeypatch):
    import fastppo._buffers as buffers

    monkeypatch.setattr(buffers, "_POOL", _RecyclingPool())
    T, N = 256, 2048  # 2 MiB per output: pooled
    rng = np.random.default_rng(0)
    rewards, values = rng.standard_normal((T, N)), rng.standard_normal((T, N))
    dones = rng.random((T, N)) < 0.05
    last = rng.standard_normal(N)
    adv1, ret1 = fastppo.gae(rewards, values, dones, last)
    keep = adv1.copy(), ret1.copy()
    adv2, ret2 = fastppo.gae(rewards * 2, values, dones, last)  # adv1 alive: fresh memory
    assert len({address(x) for x in (adv1, ret1, adv2, ret2)}) == 4
    np.testing.assert_array_equal(adv1, keep[0])
    np.testing.assert_array_equal(ret1, keep[1])
    freed = {address(x) for x in (adv1, ret1, adv2, ret2)}
    del adv1, ret1, adv2, ret2
    adv3, ret3 = fastppo.gae(rewards, values, dones, last)  # reuses freed memory, same answer
    assert {address(adv3), address(ret3)} <= freed and address(adv3) != address(ret3)
    np.testing.assert_array_equal(adv3, keep[0])
    np.testing.assert_array_equal(ret3, keep[1])
