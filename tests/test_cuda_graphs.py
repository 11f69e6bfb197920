"""fastppo's ops inside a CUDA graph: no host sync, no allocation outside PyTorch's caching
allocator, work on the current stream. One graph captures GAE, both policy heads and the clipped
loss forward and backward; replayed on new inputs it must give what eager mode gives."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402
from conftest import needs_cuda  # noqa: E402

pytestmark = [needs_cuda, pytest.mark.cuda]

T, N, A, D = 64, 16, 6, 3


def _fill(inputs: dict, gen: torch.Generator) -> None:
    """New values, written in place into the captured input buffers."""
    for name, x in inputs.items():
        if name in ("dones", "terminated"):
            x.copy_(torch.rand(x.shape, generator=gen, device="cpu") < 0.1)
        elif name == "actions":
            x.copy_(torch.randint(0, A, x.shape, generator=gen))
        else:
            x.copy_(torch.randn(x.shape, generator=gen, dtype=x.dtype))


def _step(inputs: dict, params: dict):
    """What one PPO minibatch computes with fastppo's ops: advantages, both heads, the loss and its
    gradients (with respect to the head inputs, which stand in for a network's outputs)."""
    adv, ret = fastppo.gae(inputs["rewards"], inputs["values"], inputs["dones"], inputs["last_value"],
                           terminated=inputs["terminated"], gamma=0.99, gae_lambda=0.95)
    logits, mean, log_std = params["logits"], params["mean"], params["log_std"]
    lp_cat, ent_cat = fastppo.categorical_logprob_entropy(logits, inputs["actions"])
    lp_norm, ent_norm = fastppo.normal_logprob_entropy(mean, log_std.expand_as(mean), inputs["cont_actions"])
    new_logprob = (lp_cat + lp_norm).reshape(-1)
    entropy = (ent_cat + ent_norm).reshape(-1)
    out = fastppo.ppo_loss(new_logprob, inputs["old_logprob"], adv.reshape(-1), params["value"],
                           inputs["old_value"], ret.reshape(-1), entropy, clip_coef=0.2, ent_coef=0.01)
    grads = torch.autograd.grad(out.loss, [logits, mean, log_std, params["value"]])
    return (adv, ret, out.loss, out.pg_loss, out.v_loss, out.approx_kl, out.clipfrac, *grads)


def test_gae_heads_and_loss_replay_in_one_cuda_graph():
    device = torch.device("cuda")
    inputs = dict(
        rewards=torch.empty(T, N, device=device), values=torch.empty(T, N, device=device),
        dones=torch.empty(T, N, dtype=torch.bool, device=device),
        terminated=torch.empty(T, N, dtype=torch.bool, device=device), last_value=torch.empty(N, device=device),
        actions=torch.empty(T, N, dtype=torch.int64, device=device), cont_actions=torch.empty(T, N, D, device=device),
        old_logprob=torch.empty(T * N, device=device), old_value=torch.empty(T * N, device=device),
    )
    params = dict(logits=torch.empty(T, N, A, device=device), mean=torch.empty(T, N, D, device=device),
                  log_std=torch.empty(D, device=device), value=torch.empty(T * N, device=device))
    gen = torch.Generator().manual_seed(0)
    _fill(inputs, gen)
    _fill(params, gen)
    for p in params.values():
        p.requires_grad_(True)

    # Warm up on a side stream (as torch.cuda.graphs asks), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(inputs, params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(inputs, params)

    for _ in range(3):  # new values in the same buffers, replay, compare with eager mode
        _fill(inputs, gen)
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=gen))
        graph.replay()
        eager = _step(inputs, params)
        torch.cuda.synchronize()
        for got, want in zip(captured, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
