"""``fastppo rlhf``: the whole RLHF story on the offline digits task, with checkpoints and resume.

Stages, each saved in the run directory so a resumed run skips what is done:

1. ``stages.pt``: the policy fine-tuned on valid sequences (SFT); ranked pairs of its responses
   (Bradley-Terry noise around the hidden gold rule); the reward model trained on them, its
   held-out accuracy against the noise-free ceiling, then normalized to mean 0 / std 1 on
   reference-policy samples.
2. ``kl/``: the RL run with the KL against the reference (``metrics.jsonl``, ``checkpoint.pt``):
   ``--algo ppo`` (the default: a value model, the per-token KL penalty in the rewards) or the
   critic-free ``grpo``, ``dr_grpo``, ``rloo`` (``--group-size`` responses per prompt, group
   advantages, the KL as a loss term unless ``--kl-in reward``; no value model is built).
3. ``kl_off/`` (with ``--compare-kl-off``): the same run with beta = 0, which over-optimizes the
   reward model: its score keeps rising while the hidden gold score falls.
4. ``rlhf.png``: proxy (reward-model) and gold scores and the KL of both runs per iteration.

The model (``--model``, :mod:`fastppo.rlhf.build`) is the built-in TinyGPT, a transformers model type
built from a config, or a local Hugging Face directory, in ``--dtype``; every stage trains it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Optional

import torch
import tyro

from .. import runs
from .._deprecation import warn_renamed
from ..checkpoint import CheckpointError, checkpoint_kind, describe, read_checkpoint, save_checkpoint
from ..distributed import Group, in_torchrun
from ..progress import Progress
from . import digits as D
from .build import BUILTIN, ModelConfig, ModelSource, build_causal_lm
from .config import RENAMED, PPOConfig, current_settings
from .models import ScalarHeadModel, frozen_copy, logit_transform
from .plot import plot
from .ppo import PPOTrainer


@dataclass
class RLHFArgs:
    """Settings of ``fastppo rlhf`` (every field is a --kebab-case flag)."""

    run_dir: str = "runs/rlhf"
    """directory for the stages, checkpoints, metrics and plots"""
    preset: str = "digits"
    """digits: the built-in TinyGPT; digits-hf: a transformers GPT-2 built from a config (as --model gpt2); --model picks another"""
    seed: int = 1
    """seed of every stage"""
    iterations: int = 150
    """iterations (rollout and update) per run"""
    compare_kl_off: bool = True
    """also run without the KL (beta 0), to show reward-model over-optimization"""
    resume: bool = False
    """continue the run in run_dir from its stages and checkpoints"""
    checkpoint_every: int = 10
    """iterations between checkpoints"""
    sft_steps: int = 600
    """fine-tuning steps on valid sequences"""
    rm_pairs: int = 4000
    """ranked pairs the reward model is trained on"""
    rm_heldout_pairs: int = 1000
    """ranked pairs held out to measure its accuracy"""
    rm_epochs: int = 4
    """passes of Bradley-Terry training over the pairs"""
    ppo: Annotated[PPOConfig, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: PPOConfig(response_length=D.RESPONSE_LENGTH))
    """PPO and group-method settings (flags without a prefix); minibatches and micro-batches are capped by the batch"""
    lm: Annotated[ModelConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelConfig)
    """the model: --model, --model-kwargs, --dtype, --gradient-checkpointing, --no-fused-logprob"""
    critic: str = "separate"
    """value model of --algo ppo: separate (a copy of the reward model) or shared (a zero-initialized value head on the policy trunk)"""
    device: str = "cpu"
    """where the models run (four with ppo, three with the critic-free methods): cpu or cuda"""
    fsdp: bool = False
    """under torchrun: shard the policy (and value model) over the ranks with FSDP2 (for models that do not fit one device)"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    plot: bool = True
    """write rlhf.png (needs matplotlib)"""

    def validate(self, world_size: int = 1) -> None:
        if self.critic not in ("separate", "shared"):
            raise ValueError(f"--critic must be separate or shared, got {self.critic!r}")
        if self.ppo.critic_free and self.critic != "separate":
            raise ValueError(f"--critic {self.critic} chooses the value model, but --algo {self.ppo.algo} builds none; "
                             "drop --critic")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.lm.model not in (None, PRESETS[self.preset]) and self.preset != "digits":
            raise ValueError(f"--preset {self.preset} builds --model {PRESETS[self.preset]}; for --model "
                             f"{self.lm.model} use --preset digits")
        for name in ("iterations", "checkpoint_every", "sft_steps", "rm_pairs", "rm_heldout_pairs", "rm_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        source = self.model_source()
        if self.lm.fused_logprob and logit_transform(source.config):
            raise ValueError(f"--model {self.lm.name(PRESETS[self.preset])}: {logit_transform(source.config)} changes "
                             "the logits, which the fused log-prob path computes as hidden @ lm_head.weight.T; pass "
                             "--no-fused-logprob to take the model's own logits")
        longest = source.max_positions - D.PROMPT_DIGITS - 2  # the prompt is BOS d d d d SEP
        if self.ppo.response_length > longest:
            raise ValueError(f"--response-length must be <= {longest} (the model's {source.max_positions} positions), "
                             f"got {self.ppo.response_length}")
        if self.fsdp and world_size == 1:
            raise ValueError("--fsdp shards the models over the ranks of a torchrun group; run it under torchrun")
        if self.fsdp and self.lm.dtype != "float32":
            raise ValueError(f"--fsdp shards float32 models only; got --dtype {self.lm.dtype} (its float32 master "
                             "weights are not sharded)")
        if self.ppo.batch_size % world_size:
            raise ValueError(f"--batch-size ({self.ppo.batch_size}) must be divisible by the world size ({world_size}): "
                             "each rank rolls out batch_size / world_size responses")
        group_size = self.ppo.resolved().group_size
        if isinstance(group_size, int) and group_size >= 1 and self.ppo.batch_size % (group_size * world_size):
            where = "" if world_size == 1 else f" on each of the {world_size} ranks"
            raise ValueError(f"--batch-size ({self.ppo.batch_size}) must hold whole groups of --group-size "
                             f"({group_size}) responses to a prompt{where}: make it a multiple of "
                             f"{group_size * world_size}")
        self.ppo_config(world_size=world_size).validate()

    def model_source(self) -> ModelSource:
        """What ``--model`` names, its config not yet built into a model (a ValueError naming the flag)."""
        return self.lm.source(PRESETS[self.preset], D.VOCAB_SIZE, D.SPECIAL_IDS)

    def make_model(self, log=None) -> torch.nn.Module:
        """The policy's model as ``--model``, ``--model-kwargs``, ``--dtype`` and
        ``--gradient-checkpointing`` ask, on ``--device``, initialized from ``--seed``."""
        return build_causal_lm(self.lm.name(PRESETS[self.preset]), D.VOCAB_SIZE, self.lm.kwargs(),
                               dtype=self.lm.torch_dtype, device=self.device, seed=self.seed,
                               gradient_checkpointing=self.lm.gradient_checkpointing, special_ids=D.SPECIAL_IDS,
                               log=log)

    def ppo_config(self, kl_off: bool = False, world_size: int = 1) -> PPOConfig:
        """``ppo`` for one of ``world_size`` ranks (its share of the batch), with minibatches and
        micro-batches capped by that batch, and no KL penalty when ``kl_off``."""
        batch = self.ppo.batch_size // world_size
        minibatches = min(self.ppo.num_minibatches, batch)
        micro = min(self.ppo.micro_batch_size, batch // minibatches)
        off = dict(kl_coef=0.0, kl_target=None) if kl_off else {}
        return replace(self.ppo, batch_size=batch, num_minibatches=minibatches, micro_batch_size=micro, **off)


def _hf_gpt2(seed: int) -> torch.nn.Module:
    """``--preset digits-hf``'s model: a transformers GPT-2 of TinyGPT's shape, built from a config."""
    return build_causal_lm("gpt2", D.VOCAB_SIZE, seed=seed, special_ids=D.SPECIAL_IDS)


PRESETS = {"digits": BUILTIN, "digits-hf": "gpt2"}  # each preset's --model

# The settings that make the stages (with the model's: --model, --model-kwargs, --dtype), and with the
# critic and every PPO setting (algo, group_size, kl_in and kl_estimator as the run resolved them), an
# RL run: a resume must give the same (the rest, such as --iterations, --threads or
# --gradient-checkpointing, may change).
STAGE_SETTINGS = ("preset", "seed", "sft_steps", "rm_pairs", "rm_heldout_pairs", "rm_epochs")


def stage_settings(args: RLHFArgs) -> dict:
    """What the stages record of the settings that made them."""
    return {**{name: getattr(args, name) for name in STAGE_SETTINGS}, **args.lm.settings(PRESETS[args.preset])}


def saved_settings(saved: dict) -> dict:
    """A saved run's settings with those it predates filled in: the preset's model in float32 (before
    --model), PPO with the KL in the rewards (before --algo), PPOConfig's new names for its old ones."""
    return current_settings({"model": PRESETS.get(saved.get("preset"), BUILTIN), "model_kwargs": "{}",
                             "dtype": "float32", **saved})


def run_settings(args: RLHFArgs) -> dict:
    """What a PPO checkpoint records of the settings that made its run (PPO settings by flag name,
    the ones left to the algorithm as it chose them)."""
    return {**stage_settings(args), "critic": args.critic, **asdict(args.ppo.resolved())}


def _check_settings(path: Path, saved: dict, asked: dict) -> None:
    """``saved`` (a checkpoint's settings) against ``asked`` (this run's): a difference is a
    ``CheckpointError`` naming the checkpoint's task (preset and seed), the one asked and each flag."""
    runs.check_same_settings(f"checkpoint {path}", saved, asked, task="a {preset} run (seed {seed})",
                             task_keys=("preset", "seed"),
                             remedy="resume it with the flags that made it, or choose another --run-dir")


def read_stages(path: Path, args: RLHFArgs) -> dict:
    """``stages.pt`` of this run's settings; anything else (damaged, another kind of checkpoint,
    other stage settings) is a ``CheckpointError`` that says so."""
    state = read_checkpoint(path)
    if checkpoint_kind(state) != "rlhf stages":
        raise CheckpointError(f"{path} is {describe(state, path)}, not the stages of a fastppo rlhf run")
    saved = state.get("settings", {name: state["args"][name] for name in STAGE_SETTINGS})
    _check_settings(path, saved_settings(saved), stage_settings(args))
    return state


def read_ppo_checkpoint(path: Path, args: RLHFArgs, world_size: int) -> dict:
    """A PPO run's ``checkpoint.pt`` made with this run's settings and world size; anything else is
    a ``CheckpointError`` that says what it is."""
    state = read_checkpoint(path)
    if checkpoint_kind(state) != "rlhf PPO":
        raise CheckpointError(f"checkpoint {path} is {describe(state, path)}, not the checkpoint of a fastppo rlhf PPO run")
    runs.check_world_size(state, world_size, path)
    if "settings" in state:  # written before they were recorded: not checked
        # A run saved before PPOConfig's renames holds cliprange, cliprange_value and lam: the same
        # settings as clip_coef, vf_clip_coef and gae_lambda; one saved before --algo was PPO, one
        # saved before --model the preset's model in float32.
        _check_settings(path, saved_settings(state["settings"]), run_settings(args))
    return state


def check_run_dir(args: RLHFArgs, run_dir: Path, world_size: int) -> None:
    """Before anything is written: ``run_dir`` is not a ``fastppo train`` run, and every stage and PPO
    checkpoint in it can be continued by this run (``--resume``; without it a PPO checkpoint there is
    an error, as ``run_ppo`` says)."""
    if runs.is_train_run(run_dir):
        raise CheckpointError(f"{run_dir} holds a fastppo train run (config.json, checkpoint.pt); fastppo rlhf needs a "
                              "--run-dir of its own")
    if (run_dir / "stages.pt").exists():
        read_stages(run_dir / "stages.pt", args)
    for name in ("kl", "kl_off") if args.resume else ():
        if runs.checkpoint_path(run_dir / name).exists():
            read_ppo_checkpoint(runs.checkpoint_path(run_dir / name), args, world_size)


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_stages(args: RLHFArgs, run_dir: Path) -> dict:
    """SFT, ranked pairs, reward model; loaded from ``stages.pt`` when it exists."""
    path = run_dir / "stages.pt"
    if path.exists():
        state = read_stages(path, args)
        _log(f"stages loaded from {path}")
        return state
    g = torch.Generator().manual_seed(args.seed)
    policy = args.make_model()
    start = time.perf_counter()
    sft_loss = D.sft(policy, args.sft_steps, 128, 1e-3, g, fused=args.lm.fused_logprob)
    _log(f"SFT: {args.sft_steps} steps, loss {sft_loss:.3f} ({time.perf_counter() - start:.0f}s)")
    start = time.perf_counter()
    pairs = D.ranked_pairs(policy, args.rm_pairs + args.rm_heldout_pairs, g)
    train_pairs, heldout = pairs.split(args.rm_pairs)
    rm = ScalarHeadModel(copy.deepcopy(policy))
    rm_loss = D.train_reward_model(rm, train_pairs, args.rm_epochs, 64, 3e-4, g)
    report = {
        "sft_loss": sft_loss,
        "rm_loss": rm_loss,
        "rm_train_accuracy": D.pair_accuracy(rm, train_pairs),
        "rm_heldout_accuracy": D.pair_accuracy(rm, heldout),
        "rm_heldout_ceiling": D.gold_accuracy(heldout),
    }
    ref_scores, ref_gold = D.reference_scores(policy, rm, 1024, g, args.ppo.temperature)
    rm.normalize(ref_scores)
    report["sft_gold"] = float(ref_gold.mean())
    _log(f"reward model: held-out accuracy {report['rm_heldout_accuracy']:.3f} (chance 0.5, noise-free ceiling "
         f"{report['rm_heldout_ceiling']:.3f}); SFT gold score {report['sft_gold']:.3f} "
         f"({time.perf_counter() - start:.0f}s)")
    state = {"args": asdict(args), "settings": stage_settings(args), "sft": policy.state_dict(), "rm": rm.state_dict(),
             "report": report}
    save_checkpoint(path, state)
    return state


def _trainer(args: RLHFArgs, stages: dict, kl_off: bool, group: Optional[Group] = None) -> PPOTrainer:
    policy = args.make_model()
    policy.load_state_dict(stages["sft"])
    rm = ScalarHeadModel(copy.deepcopy(policy))  # its trunk and head come from the stages
    rm.load_state_dict(stages["rm"])
    rm.eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    critic = None  # shared: PPOTrainer puts a zero-initialized value head on the policy trunk; none for group methods
    if args.critic == "separate" and not args.ppo.critic_free:
        critic = copy.deepcopy(rm)  # the value model starts as the reward model
        for p in critic.parameters():
            p.requires_grad_(True)
    # Every rank starts from the same stages; each draws its own prompts, responses and minibatches.
    rank, size = (0, 1) if group is None else (group.rank, group.size)
    g = torch.Generator().manual_seed(args.seed + (1000 if kl_off else 0) + 7919 * rank)
    return PPOTrainer(policy.eval(), frozen_copy(policy), rm, critic, D.prompts, D.EOS, D.PAD,
                      args.ppo_config(kl_off, size), {"gold": D.gold_score}, g, group, fsdp=args.fsdp,
                      fused_logprob=args.lm.fused_logprob)


def run_ppo(args: RLHFArgs, stages: dict, out: Path, kl_off: bool, group: Optional[Group] = None) -> list:
    """PPO iterations with checkpoints every ``checkpoint_every``; resumes from ``out/checkpoint.pt``.
    Under torchrun rank 0 alone writes; the checkpoint keeps every rank's random stream."""
    is_main, size = group is None or group.is_main, 1 if group is None else group.size
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    trainer = _trainer(args, stages, kl_off, group)
    ckpt, metrics_path = runs.checkpoint_path(out), runs.metrics_path(out)
    history, first = [], 1
    if args.resume and ckpt.exists():
        state = read_ppo_checkpoint(ckpt, args, size)
        trainer.load_state_dict(state["trainer"])
        if group is not None:
            trainer.generator.set_state(state["generators"][group.rank])
        history, first = state["history"], state["iteration"] + 1
        if is_main:
            _log(f"{out.name}: resumed after iteration {state['iteration']}")
    elif ckpt.exists() and not args.resume:
        raise SystemExit(f"error: {ckpt} exists; pass --resume to continue it or choose another --run-dir")
    if is_main:  # metrics.jsonl holds exactly the checkpointed iterations (a killed run may have written more)
        runs.write_log(metrics_path, history)
    progress = Progress(args.iterations, first - 1, every=10 if is_main else 0, name=out.name)
    try:
        for it in range(first, args.iterations + 1):
            record = {"iteration": it, **trainer.step()}
            history.append(record)
            if is_main:
                runs.append_record(metrics_path, record)
            progress.update(it, f"score {record['objective/scores']:.3f} | gold {record['objective/gold']:.3f} | "
                            f"kl {record['objective/kl']:.3f} | len {record['val/response_length']:.1f} | "
                            f"{time.perf_counter() - progress.start:.0f}s")
            if it % args.checkpoint_every == 0 or it == args.iterations:
                generators = None if group is None else group.gather_objects(trainer.generator.get_state())
                state = trainer.state_dict()  # with FSDP a collective: every rank gathers
                if is_main:
                    save_checkpoint(ckpt, {"trainer": state, "history": history, "iteration": it,
                                           "settings": run_settings(args),
                                           **({} if group is None else dict(world_size=size, generators=generators))})
    finally:
        progress.close()
    return history


def run_label(ppo: PPOConfig, kl_off: bool) -> str:
    """The name of a run in the log and the plot: PPO's as before, the group methods' with theirs."""
    cfg = ppo.resolved()
    where = "penalty" if cfg.kl_in == "reward" else "loss term"
    label = f"no KL {where}" if kl_off else f"KL {where} (beta {cfg.kl_coef:g})"
    if cfg.algo == "ppo" and cfg.kl_in == "reward":
        return label
    return f"{cfg.algo} (group {cfg.group_size}), {label}" if cfg.critic_free else f"{cfg.algo}, {label}"


def renamed_flags(argv: list) -> list:
    """``argv`` with PPOConfig's old flags (``--cliprange``, ``--cliprange-value``, ``--lam``, also
    as ``--flag=value``) given as their new names, each with a DeprecationWarning naming the new
    one; an old flag together with its new one is a ValueError naming both."""
    renamed = {f"--{old}".replace("_", "-"): f"--{new}".replace("_", "-") for old, new in RENAMED.items()}
    flags = [arg.partition("=")[0].replace("_", "-") if arg.startswith("--") else None for arg in argv]
    out = []
    for arg, flag in zip(argv, flags):
        new = renamed.get(flag)
        if new is None:
            out.append(arg)
            continue
        if new in flags:
            raise ValueError(f"got both {flag} and {new}; {flag} is the old name of {new}, pass {new} only")
        warn_renamed(f"fastppo rlhf's flag {flag}", new)
        _, equals, value = arg.partition("=")
        out.append(new + equals + value)
    return out


def main(argv=None) -> int:
    """``fastppo rlhf``: a flag per ``RLHFArgs`` field (PPOConfig's old flags still work this release)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        if not sys.warnoptions:  # a command line's user sees its DeprecationWarnings (hidden by default)
            warnings.simplefilter("default", DeprecationWarning)
        try:
            argv = renamed_flags(argv)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args = tyro.cli(RLHFArgs, args=argv, prog="fastppo rlhf", config=(tyro.conf.DisallowNone,),
                    description="The whole RLHF story on the offline digits task, with checkpoints and resume.")
    world_size = int(os.environ["WORLD_SIZE"]) if in_torchrun() else 1
    try:
        args.validate(world_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    group = Group(args.device) if in_torchrun() else None
    try:
        return _run(args, group)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if group is not None:
            group.close()


def _run(args: RLHFArgs, group: Optional[Group]) -> int:
    """The stages (rank 0 makes them and hands them to the others), the PPO runs, the report."""
    is_main = group is None or group.is_main
    run_dir = Path(args.run_dir)
    stages = None
    if is_main:
        check_run_dir(args, run_dir, 1 if group is None else group.size)
        _log(args.model_source().describe(D.VOCAB_SIZE, args.lm.torch_dtype))
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_settings(run_dir / runs.ARGS, asdict(args), indent=1)
        stages = build_stages(args, run_dir)
    if group is not None:  # the reference, reward and starting models are rank 0's on every rank
        stages = group.broadcast_object(stages)
    histories = {run_label(args.ppo, False): run_ppo(args, stages, run_dir / "kl", False, group)}
    if args.compare_kl_off:
        histories[run_label(args.ppo, True)] = run_ppo(args, stages, run_dir / "kl_off", True, group)
    if not is_main:
        return 0
    sft_gold = stages["report"]["sft_gold"]
    for name, history in histories.items():
        last = history[-10:]
        mean = lambda key: sum(r[key] for r in last) / len(last)  # noqa: E731
        _log(f"{name}: last {len(last)} iterations: score {mean('objective/scores'):.3f}, gold "
             f"{mean('objective/gold'):.3f} (SFT {sft_gold:.3f}), kl {mean('objective/kl'):.3f}")
    if args.plot:
        path = plot(run_dir, histories, sft_gold)
        if path:
            _log(f"wrote {path}")
    summary = {"report": stages["report"], "final": {k: h[-1] for k, h in histories.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0

