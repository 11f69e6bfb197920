"""Benchmark ``fastppo.gae`` against the usual Python GAE loops and TorchRL.

Run from the repository root: ``python -m benchmarks.bench_gae`` writes benchmarks/results/gae_cpu.md;
``--quick``, ``--tiny``, ``--threads``, ``--device cuda``, ``--out`` and ``--json`` as every bench
script takes them (see benchmarks/_common.py).

For each rollout size (T, N) it times, on the same random float32 inputs (dones ~ Bernoulli(0.02)):
``fastppo.gae`` on numpy arrays and on torch tensors; a CleanRL-style backward loop over torch
tensors; stable-baselines3's backward loop over numpy rows (both from tests/peers.py); stable-baselines3's
own ``RolloutBuffer.compute_returns_and_advantage`` (when stable-baselines3 is installed); TorchRL's
``generalized_advantage_estimate`` and ``vec_generalized_advantage_estimate`` (when torchrl is
installed); and the memory-traffic floor, 5 float32 arrays of T*N divided by the memcpy bandwidth
measured in the same run. Every contender's output is checked against fastppo's before it is timed.
"""

from __future__ import annotations

import sys

import numpy as np

try:
    from benchmarks import _common as common  # python -m benchmarks.bench_gae
except ImportError:
    import _common as common  # python benchmarks/bench_gae.py

# Imported by import_libraries(), after --threads has set OMP_NUM_THREADS.
torch = None
fastppo = None
peers = None

SIZES = [(128, 8), (2048, 1), (128, 64), (256, 1024), (1024, 4096)]
TINY_SIZES = [min(SIZES, key=lambda size: size[0] * size[1])]
CHECK_ONLY_SIZE = (200, 8)  # also checked (not timed) first
GAMMA = 0.99
GAE_LAMBDA = 0.95
DONE_PROB = 0.02
TOLERANCE = 1e-4  # max |difference| allowed between a contender's advantages and fastppo's

FP_NUMPY = "fastppo numpy"
FP_NUMPY_OUT = "fastppo numpy, out="
FP_TORCH = "fastppo torch"
CLEANRL = "CleanRL loop (torch)"
SB3 = "SB3 loop re-implemented (numpy)"
SB3_BUFFER = "SB3 RolloutBuffer"
TORCHRL_LOOP = "TorchRL GAE"
TORCHRL_VEC = "TorchRL vec GAE"
FLOOR = "memory floor"
FASTPPO_COLUMNS = [FP_NUMPY, FP_NUMPY_OUT, FP_TORCH]
# Each peer and the fastppo column its speed-up is taken against: torch peers against fastppo on
# torch tensors, numpy peers against fastppo on numpy arrays.
PEER_BASELINES = {CLEANRL: FP_TORCH, SB3: FP_NUMPY, SB3_BUFFER: FP_NUMPY, TORCHRL_LOOP: FP_TORCH, TORCHRL_VEC: FP_TORCH}
TIME_COLUMNS = FASTPPO_COLUMNS + list(PEER_BASELINES) + [FLOOR]


# --- The peers ----------------------------------------------------------------------------------
#
# The CleanRL and SB3 loops come from tests/peers.py (common.import_peers, in import_libraries).


def load_peer_libraries():
    """``(torchrl, sb3)``: TorchRL's GAE functions module and stable-baselines3's buffers module,
    each or a string saying why it cannot be used."""
    torchrl = common.import_peer("torchrl.objectives.value.functional")
    sb3 = common.import_peer("gymnasium")
    return torchrl, (sb3 if isinstance(sb3, str) else common.import_peer("stable_baselines3.common.buffers"))


def peer_version(peer, package):
    return peer if isinstance(peer, str) else sys.modules[package].__version__


# --- Inputs and contenders -----------------------------------------------------------------------


def make_inputs(T, N, seed):
    """Random float32 rollout, time-major [T, N], in fastppo's convention (dones[t]: ended at t)."""
    rng = np.random.default_rng(seed)
    rewards = rng.standard_normal((T, N), dtype=np.float32)
    values = rng.standard_normal((T, N), dtype=np.float32)
    dones = (rng.random((T, N)) < DONE_PROB).astype(np.float32)
    last_value = rng.standard_normal(N, dtype=np.float32)
    return rewards, values, dones, last_value


def outputs_of(column, out):
    """A contender's (advantages, returns) as [T, N] numpy arrays, copied (for the check)."""
    if column in (TORCHRL_LOOP, TORCHRL_VEC):
        out = [x.squeeze(-1).T for x in out]  # back from TorchRL's [N, T, 1]
    return {name: x.detach().cpu().numpy().copy() if hasattr(x, "detach") else x.copy()
            for name, x in zip(("advantages", "returns"), out)}


def build_contenders(rewards, values, dones, last_value, device, libraries):
    """The case's contenders. Every conversion a peer needs (the convention shift, TorchRL's
    batch-major layout, filling SB3's buffer) is done here, before timing."""
    torchrl, sb3 = libraries
    N = rewards.shape[1]
    r, v, d, last = (torch.from_numpy(x).to(device) for x in (rewards, values, dones, last_value))
    calls = {}
    if device == "cpu":
        calls[FP_NUMPY] = lambda: fastppo.gae(rewards, values, dones, last_value, gamma=GAMMA, gae_lambda=GAE_LAMBDA)
        # Writing into a reused rollout buffer skips allocating (and first-touching) two outputs.
        buffers = (np.empty_like(rewards), np.empty_like(rewards))
        calls[FP_NUMPY_OUT] = lambda: fastppo.gae(rewards, values, dones, last_value, gamma=GAMMA, gae_lambda=GAE_LAMBDA, out=buffers)
    else:
        calls[FP_NUMPY] = calls[FP_NUMPY_OUT] = "n/a (CPU)"
    calls[FP_TORCH] = lambda: fastppo.gae(r, v, d, last, gamma=GAMMA, gae_lambda=GAE_LAMBDA)

    # CleanRL and SB3 store "observation t starts an episode": fastppo's dones shifted one step later.
    starts = np.concatenate([np.zeros((1, N), np.float32), dones[:-1]])
    next_done = dones[-1].copy()
    starts_t, next_done_t = torch.from_numpy(starts).to(device), torch.from_numpy(next_done).to(device)
    calls[CLEANRL] = lambda: peers.cleanrl_gae(r, v, starts_t, last, next_done_t, GAMMA, GAE_LAMBDA)
    if device != "cpu":
        calls[SB3] = calls[SB3_BUFFER] = "n/a (numpy)"
    else:
        calls[SB3] = lambda: peers.sb3_gae(rewards, values, starts, last_value, next_done, GAMMA, GAE_LAMBDA)
        calls[SB3_BUFFER] = sb3 if isinstance(sb3, str) else sb3_buffer_call(sb3, rewards, values, starts, last_value,
                                                                              next_done)
    if isinstance(torchrl, str):
        calls[TORCHRL_LOOP] = calls[TORCHRL_VEC] = torchrl
    else:
        # TorchRL wants [*B, T, F] (time at dim -2, features last): [T, N] -> [N, T, 1], contiguous.
        def batch_major(x):
            return x.T.contiguous().unsqueeze(-1)

        reward, state_value, done = batch_major(r), batch_major(v), batch_major(d.bool())
        next_state_value, terminated = batch_major(torch.cat([v[1:], last[None]])), done.clone()
        for column, fn in ((TORCHRL_LOOP, torchrl.generalized_advantage_estimate),
                           (TORCHRL_VEC, torchrl.vec_generalized_advantage_estimate)):
            calls[column] = lambda fn=fn: fn(GAMMA, GAE_LAMBDA, state_value, next_state_value, reward, done, terminated)
    reference = FP_NUMPY if device == "cpu" else FP_TORCH
    return common.Contenders(calls, reference, TOLERANCE, relative=False, outputs_of=outputs_of)


def sb3_buffer_call(sb3, rewards, values, starts, last_value, next_done):
    """stable-baselines3's own RolloutBuffer(buffer_size=T, n_envs=N), filled at once (a rollout
    fills its [T, N] float32 arrays step by step); the call computes advantages and returns."""
    import gymnasium

    buffer = sb3.RolloutBuffer(buffer_size=rewards.shape[0], observation_space=gymnasium.spaces.Box(-1, 1, (1,)),
                               action_space=gymnasium.spaces.Discrete(2), device="cpu", gae_lambda=GAE_LAMBDA, gamma=GAMMA,
                               n_envs=rewards.shape[1])
    buffer.rewards[:], buffer.values[:], buffer.episode_starts[:] = rewards, values, starts
    last_values_t = torch.from_numpy(last_value.copy())

    def call():
        buffer.compute_returns_and_advantage(last_values=last_values_t, dones=next_done)
        return buffer.advantages, buffer.returns

    return call


def floor_ms(T, N, bandwidth):
    """Time to move rewards, values, dones, advantages and returns (5 float32 [T, N] arrays) once."""
    return 5 * T * N * 4 / bandwidth * 1e3


# --- Report --------------------------------------------------------------------------------------


def report(result):
    device, mode = result["device"], result["mode"]
    fp = FP_NUMPY_OUT if device == "cpu" else FP_TORCH  # the fastppo column the floor ratio uses
    ratio_columns = [(f"{p} / {PEER_BASELINES[p]}", p, PEER_BASELINES[p]) for p in (CLEANRL, SB3, SB3_BUFFER)]
    ratio_columns += [(f"best TorchRL / {FP_TORCH}", "best TorchRL", FP_TORCH), (f"{fp} / {FLOOR}", fp, FLOOR)]
    lines = [f"# fastppo.gae benchmark ({device})", ""] + common.mode_banner(mode, f"(T, N) in {result['sizes']}")
    lines += ["## Machine", ""] + common.machine_head(
        result["machine"], f"torchrl {result['torchrl_version']}, stable-baselines3 {result['sb3_version']}, ")
    lines += [common.bandwidth_line(device, result["bandwidth"]), ""]
    lines += ["## Median time per call (ms, lower is better)", ""]
    cells = []
    for (T, N), row in result["rows"].items():
        torchrl = [row[c] for c in (TORCHRL_LOOP, TORCHRL_VEC) if isinstance(row[c], float)]
        row = dict(row, **{"best TorchRL": min(torchrl) if torchrl else "-"})
        cells.append([str(T), str(N)] + [common.fmt(row[c]) for c in TIME_COLUMNS]
                     + [common.ratio(row, num, den) for _, num, den in ratio_columns])
    lines += common.table(["T", "N"] + TIME_COLUMNS + [name for name, _, _ in ratio_columns],
                          "|---:|---:|" + "---:|" * (len(TIME_COLUMNS) + len(ratio_columns)), cells)
    lines += ["", "## Checks", ""] + ([f"- **{w}**" for w in result["warnings"]] or [
        f"- Every contender's advantages and returns matched fastppo's to {TOLERANCE:g} "
        f"(at T={CHECK_ONLY_SIZE[0]}, N={CHECK_ONLY_SIZE[1]} and at every size above)."])
    lines += [
        "",
        "## Notes",
        "",
        f"- Inputs: float32 rewards and values ~ N(0, 1), dones ~ Bernoulli({DONE_PROB}) stored as "
        f"float32 0/1, gamma={GAMMA}, gae_lambda={GAE_LAMBDA}, terminated = dones. Each case is the median of "
        + common.TIMING_NOTES[mode],
        common.threads_note(device, "the Python loops and TorchRL's GAE loop issue one op at a time (torch ops may "
                                    "use torch's threads)"),
        f"- Ratios: the CleanRL loop and TorchRL (torch peers) are divided by `{FP_TORCH}`, the SB3 "
        f"loop and buffer (numpy peers) by `{FP_NUMPY}`; the floor ratio uses `{fp}`.",
        "- CleanRL and SB3 store dones as \"observation t starts an episode\"; their inputs are "
        "shifted to that convention before timing (`starts = cat([0, dones[:-1]])`, `next_done = dones[-1]`).",
        f"- `{SB3}`: stable-baselines3's backward loop written out in tests/peers.py over numpy rows. "
        f"`{SB3_BUFFER}`: stable-baselines3's own `RolloutBuffer(buffer_size=T, n_envs=N)` "
        "(Box(-1, 1, (1,)) observations, Discrete(2) actions) with its `rewards`, `values` and "
        "`episode_starts` arrays filled before timing; the timed call is "
        "`compute_returns_and_advantage(last_values=<torch tensor>, dones=<numpy array>)`, which also "
        "copies last_values to numpy and allocates `returns = advantages + values`.",
        "- TorchRL gets contiguous [N, T, 1] tensors, `next_state_value = cat([values[1:], last_value])`, "
        "and bool `done` and `terminated`, all built before timing.",
        f"- `{FP_NUMPY_OUT}` writes into two preallocated arrays (as a reused rollout buffer does); "
        f"`{FP_NUMPY}` allocates its outputs, and at large sizes part of its time is the kernel "
        "zeroing the fresh pages on first touch.",
        f"- `{FLOOR}`: 5 float32 arrays of T*N (rewards, values, dones, advantages, returns) divided by "
        "the copy bandwidth above. Small cases fit in cache, where the real floor is lower.",
    ]
    return "\n".join(lines) + "\n"


def to_json(result):
    """This benchmark's summary and rows, for the --json file (``common.write_reports``)."""
    rows = [common.json_row("gae", f"T={T}, N={N}", {"T": T, "N": N}, row, FASTPPO_COLUMNS, PEER_BASELINES,
                            floor_ms=row[FLOOR])
            for (T, N), row in result["rows"].items()]
    details = {"copy_bandwidth_gb_s": result["bandwidth"] / 1e9, "torchrl": result["torchrl_version"],
               "stable_baselines3": result["sb3_version"], "gamma": GAMMA, "gae_lambda": GAE_LAMBDA, "tolerance": TOLERANCE}
    return {"name": "gae", "title": "fastppo.gae", "script": "benchmarks/bench_gae.py",
            "warnings": result["warnings"], "details": details, "rows": rows}


# --- Main ----------------------------------------------------------------------------------------


def import_libraries():
    global torch, fastppo, peers
    import torch
    import fastppo
    peers = common.import_peers()


def case_contenders(T, N, device, libraries):
    return build_contenders(*make_inputs(T, N, seed=T * 100_003 + N), device, libraries)


def benchmark_cases(mode, device):
    """The pytest benchmarks' cases (benchmarks/test_kernels.py)."""
    import_libraries()
    libraries = load_peer_libraries()
    vs = {**dict.fromkeys(FASTPPO_COLUMNS), **PEER_BASELINES}
    return [common.Case("gae", "gae", f"T={T}, N={N}", {"T": T, "N": N}, vs,
                        lambda T=T, N=N: case_contenders(T, N, device, libraries))
            for T, N in (TINY_SIZES if mode == "tiny" else SIZES)]


def collect(args):
    """Runs the benchmark that ``args`` describes and returns its measurements."""
    common.threads_env(args)
    import_libraries()
    device, mode, sync = common.setup_device(args)
    libraries = load_peer_libraries()
    bandwidth = common.copy_bandwidth(device, mode)
    sizes = TINY_SIZES if mode == "tiny" else SIZES
    warnings = []
    rows = {}
    for T, N in [CHECK_ONLY_SIZE] + sizes:
        contenders = case_contenders(T, N, device, libraries)
        if (T, N) == CHECK_ONLY_SIZE:
            warnings += contenders.check(f"T={T}, N={N}")[0]
        else:
            rows[(T, N)] = common.measure_case(contenders, device, f"T={T}, N={N}", sync, common.TIMING[mode], warnings,
                                               memory=False)
            rows[(T, N)][FLOOR] = floor_ms(T, N, bandwidth)
    return dict(device=device, mode=mode, machine=common.machine_info(device), sizes=sizes, rows=rows,
                bandwidth=bandwidth, warnings=warnings, torchrl_version=peer_version(libraries[0], "torchrl"),
                sb3_version=peer_version(libraries[1], "stable_baselines3"))


def main(argv=None):
    args = common.bench_parser(__doc__.splitlines()[0], "gae").parse_args(argv)
    result = collect(args)
    return common.write_reports(args, result, "gae", report(result), to_json(result))


if __name__ == "__main__":
    sys.exit(main())
