"""One GRPO training step of TRL's ``GRPOTrainer`` against ``fastppo.trl.GRPOTrainer``, on the CPU.

    python -m benchmarks.bench_trl            # writes benchmarks/results/trl_cpu.md (+ .json)
    python -m benchmarks.bench_trl --quick    # a small vocabulary and short completions; prints only

The model is a Qwen2 built from a config with Qwen2's real vocabulary (151,936 tokens) and a tiny
body (hidden 64, one layer), so the LM head and the loss are most of the step, as they are of the
memory of a real model's loss step; nothing is downloaded (the tokenizer is a word-level one built
here with as many words). Each step generates ``--completions`` completions (4 per prompt) of
``--length`` tokens (the end-of-sequence token is never sampled: its logit is pushed down), scores
them with a Python reward, and takes one optimizer step (``loss_type="dapo"``, TRL's default;
``beta=0``). Each contender runs in a fresh process, alternately, ``--rounds`` times; reported: the
whole ``train()`` step, the loss's share of it (``compute_loss`` + its backward, timed by wrapping
them), and the peak resident memory during ``train()`` above the resident set before it (VmHWM after
clearing it; glibc's mmap threshold fixed at 128 KiB so freed buffers leave the resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = {"TRL GRPOTrainer": "trl", "fastppo.trl.GRPOTrainer": "fastppo.trl"}


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(module: str, vocab: int, length: int, completions: int, threads: int) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.set_num_threads(threads)
    trainer_module = __import__(module, fromlist=["GRPOTrainer"])
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>")
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=length + 64,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the end-of-sequence token is never sampled: every completion has `length` tokens
        model.lm_head.bias = None
        model.lm_head.weight[1].zero_()
        model.model.norm.weight.fill_(1.0)
    prompts = [" ".join(f"w{(7 * i + j) % (vocab - 3)}" for j in range(8)) for i in range(completions // 4)]

    def reward(completions, **kwargs):
        return [float(len(c) % 7) for c in completions]

    args = trainer_module.GRPOConfig(
        output_dir="/tmp/bench_trl_out", per_device_train_batch_size=completions, num_generations=4,
        max_completion_length=length, max_steps=1, learning_rate=1e-4, report_to="none", use_cpu=True, seed=0,
        logging_steps=1, save_strategy="no", disable_tqdm=True, bf16=False, loss_type="dapo", beta=0.0)
    trainer = trainer_module.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                                         train_dataset=Dataset.from_dict({"prompt": prompts}),
                                         processing_class=tokenizer)
    loss_s = [0.0]
    compute_loss, backward = trainer.compute_loss, trainer.accelerator.backward

    def timed(fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            loss_s[0] += time.perf_counter() - t0
            return out
        return call

    trainer.compute_loss, trainer.accelerator.backward = timed(compute_loss), timed(backward)
    from benchmarks._common import reset_peak_rss

    before = rss_kib("VmRSS")
    if not reset_peak_rss():
        raise RuntimeError("the peak resident set cannot be reset here (/proc/self/clear_refs)")
    t0 = time.perf_counter()
    trainer.train()
    step_s = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    lengths = trainer.state.log_history[0].get("completions/mean_length")
    return dict(step_s=step_s, loss_s=loss_s[0], peak_extra_mib=(peak - before) / 1024, rss_before_mib=before / 1024,
                mean_completion_length=lengths, loss=trainer.state.log_history[0].get("loss"))


def run_one(module, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "benchmarks.bench_trl", "--worker", module, "--vocab", str(args.vocab), "--length",
           str(args.length), "--completions", str(args.completions), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{module} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(runs: dict, path: Path) -> None:
    """Bars of each trainer's step time, loss time and peak extra memory, every run's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title) in zip(axes, (("step_s", "train() step (s)"), ("loss_s", "loss forward + backward (s)"),
                                       ("peak_extra_mib", "peak memory beyond the start (MiB)"))):
        medians = [statistics.median(r[key] for r in runs[n]) for n in names]
        ax.bar(range(len(names)), medians, color=["tab:gray", "tab:blue"][:len(names)])
        for i, n in enumerate(names):
            ax.plot([i] * len(runs[n]), [r[key] for r in runs[n]], "k.", markersize=4)
            ax.text(i, medians[i], f"{medians[i]:,.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace(".GRPOTrainer", "").replace(" GRPOTrainer", "") for n in names])
        ax.set_title(title, fontsize=10)
    fig.suptitle("One GRPO step, Qwen2 vocabulary (151,936), 8 completions of 512 tokens, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plot-from", type=Path, default=None,
                        help="only draw the figure (trl_cpu.png) from a saved trl_cpu.json")
    args = parser.parse_args(argv)
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text())["runs"], RESULTS / "trl_cpu.png")
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab, args.length, args.completions, args.threads)))
        return
    if args.quick:
        args.vocab, args.length, args.rounds = 4096, 32, 1
    runs = {name: [] for name in CONTENDERS}
    for _ in range(args.rounds):
        for name, module in CONTENDERS.items():
            runs[name].append(run_one(module, args))
            print(name, runs[name][-1], flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "loss_s", "peak_extra_mib")}
           for name, rs in runs.items()}
    trl_row = med["TRL GRPOTrainer"]
    lines = ["| trainer | train() step s | loss (fwd + bwd) s | peak extra memory MiB | step / TRL's | loss / TRL's | "
             "memory / TRL's |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['step_s']:.2f} | {m['loss_s']:.2f} | {m['peak_extra_mib']:.0f} | "
                     f"{m['step_s'] / trl_row['step_s']:.2f} | {m['loss_s'] / trl_row['loss_s']:.2f} | "
                     f"{m['peak_extra_mib'] / trl_row['peak_extra_mib']:.2f} |")
    import torch
    import trl

    import fastppo
    text = "\n".join([
        "# One GRPO step: TRL's GRPOTrainer against fastppo.trl.GRPOTrainer (CPU)", "",
        f"- Date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; {os.cpu_count()} cores, {args.threads} torch threads",
        f"- torch {torch.__version__}, TRL {trl.__version__}, fastppo {fastppo.__version__}: `{fastppo.build_info()}`",
        f"- Qwen2 from a config: vocab {args.vocab}, hidden 64, 1 layer; {args.completions} completions of "
        f"{args.length} tokens ({args.completions // 4} prompts x 4), loss_type dapo, beta 0, float32", "",
        f"Medians of {args.rounds} fresh processes per trainer, run alternately:", "", *lines, "",
        "Every run: " + "; ".join(f"{n}: " + ", ".join(f"{r['step_s']:.2f} s / {r['loss_s']:.2f} s / "
                                                         f"{r['peak_extra_mib']:.0f} MiB (loss {r['loss']:.4g}, "
                                                         f"mean length {r['mean_completion_length']})" for r in rs)
                                  for n, rs in runs.items()), "",
        "See the module docstring of benchmarks/bench_trl.py for what is timed and how memory is read.", ""])
    print(text)
    if not args.quick:
        (RESULTS / "trl_cpu.md").write_text(text)
        (RESULTS / "trl_cpu.json").write_text(json.dumps(dict(args={k: (str(v) if isinstance(v, Path) else v)
                                                                   for k, v in vars(args).items()},
                                                             runs=runs, medians=med), indent=1))
        plot(runs, RESULTS / "trl_cpu.png")


if __name__ == "__main__":
    main()
