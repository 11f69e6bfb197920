"""Resume cost against the run's length: a 500k-step CartPole run (976 iterations) stopped after
iteration 975, then resumed, with --resume-replay (replays every logged action) and without (fresh
environments, the default). Prints the seconds and the checkpoint size of each
(benchmarks/results/resume_cpu.md)."""
import json
import os
import time

from fastppo import train as T
out = {}
for replay in (True, False):
    name = f"long_{'replay' if replay else 'fresh'}"
    args = T.Args(env_id="CartPole-v1", preset="classic", total_timesteps=500_000, checkpoint_every=50,
                  run_dir="/tmp/rt", run_name=name, log_every=100000, resume_replay=replay)
    t = time.perf_counter(); s = T.train(args, stop_after=975); first = time.perf_counter() - t
    size = os.path.getsize(f"/tmp/rt/{name}/checkpoint.pt")
    t = time.perf_counter(); r = T.train(T.Args(), resume=f"/tmp/rt/{name}"); resume = time.perf_counter() - t
    out[name] = dict(first_975_iterations_s=round(first, 1), checkpoint_bytes=size, resume_and_last_iteration_s=round(resume, 2), global_step=r["global_step"])
print(json.dumps(out, indent=1))
