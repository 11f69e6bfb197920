"""The RLHF loop: sampling, EOS truncation, scoring, temperature-consistent log-probs, the reward
model, the PPO smoke run on the digits task, checkpoints and the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402
import tyro  # noqa: E402

from fastppo import categorical_logprob_entropy  # noqa: E402
from fastppo.rlhf import (AdaptiveKLController, PPOConfig, PPOTrainer, ScalarHeadModel, TinyGPT, bradley_terry_loss,  # noqa: E402
                          frozen_copy, lm_forward, truncate_after_eos)
from fastppo.rlhf import digits as D  # noqa: E402
from fastppo.rlhf import run as R  # noqa: E402


@pytest.fixture(scope="module")
def stages():
    """A small SFT policy and reward model, shared by the tests below (seed 1)."""
    args = R.RLHFArgs(sft_steps=300, rm_pairs=2000, rm_heldout_pairs=500, rm_epochs=2, seed=1)
    g = torch.Generator().manual_seed(args.seed)
    policy = D.new_policy(args.seed)
    D.sft(policy, args.sft_steps, 128, 1e-3, g)
    pairs = D.ranked_pairs(policy, args.rm_pairs + args.rm_heldout_pairs, g)
    train, heldout = pairs.split(args.rm_pairs)
    rm = ScalarHeadModel(copy.deepcopy(policy))
    D.train_reward_model(rm, train, args.rm_epochs, 64, 3e-4, g)
    ref_scores, ref_gold = D.reference_scores(policy, rm, 1024, g, args.ppo.temperature)
    accuracy, ceiling = D.pair_accuracy(rm, heldout), D.gold_accuracy(heldout)
    rm.normalize(ref_scores)
    return dict(args=args, sft=policy.state_dict(), rm=rm.state_dict(), accuracy=accuracy, ceiling=ceiling,
                report={"sft_gold": float(ref_gold.mean())})


def test_reward_model_beats_chance_on_heldout_pairs(stages):
    # Labels are noisy (Bradley-Terry around the gold rule), so even the gold rule is below 1.
    assert stages["accuracy"] > 0.6, stages["accuracy"]
    assert 0.6 < stages["ceiling"] < 0.95
    assert stages["accuracy"] <= stages["ceiling"] + 0.03


def test_reward_model_normalized_on_reference_samples(stages):
    rm = ScalarHeadModel(D.new_policy(1))
    rm.load_state_dict(stages["rm"])
    policy = D.new_policy(1)
    policy.load_state_dict(stages["sft"])
    scores, _ = D.reference_scores(policy, rm, 2048, torch.Generator().manual_seed(5), 0.7)
    assert abs(float(scores.mean())) < 0.15 and abs(float(scores.std()) - 1) < 0.15


def test_bradley_terry_loss_matches_formula():
    rc, rr = torch.tensor([1.0, 0.2, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.9, -3.0], dtype=torch.float64)
    expected = -torch.log(torch.sigmoid(rc - rr - 0.1)).mean() + 0.01 * ((rc + rr) ** 2).mean()
    torch.testing.assert_close(bradley_terry_loss(rc, rr, 0.1, 0.01), expected, rtol=1e-12, atol=0)


def test_truncate_after_eos_and_missing_eos():
    E, P = D.EOS, D.PAD
    response = torch.tensor([[5, E, 6, E], [E, 7, 7, 7], [5, 6, 7, 8], [5, 6, 7, E]])
    out, mask, has_eos = truncate_after_eos(response, E, P)
    assert out.tolist() == [[5, E, P, P], [E, P, P, P], [5, 6, 7, 8], [5, 6, 7, E]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False, True]


def test_score_is_read_at_the_last_real_token():
    torch.manual_seed(0)
    rm = ScalarHeadModel(D.new_policy(0))
    query, qmask = D.prompts(3, torch.Generator().manual_seed(0))
    response, rmask, _ = truncate_after_eos(torch.tensor([[5, D.EOS, 6, 6], [5, 6, 7, 8], [D.EOS, 5, 5, 5]]), D.EOS, D.PAD)
    seq, mask = torch.cat([query, response], 1), torch.cat([qmask.bool(), rmask], 1).long()
    per_position = rm.values(seq, mask)
    Lq = query.shape[1]
    expected = per_position[torch.arange(3), torch.tensor([Lq + 1, Lq + 3, Lq])]
    torch.testing.assert_close(rm.score(seq, mask), expected, rtol=0, atol=0)


def test_left_padding_does_not_change_real_tokens_logits():
    torch.manual_seed(0)
    model = TinyGPT(D.model_config()).eval()
    ids = torch.tensor([[1, 6, 7, 8, 9, 2, 5]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    plain, _ = lm_forward(model, ids, torch.ones_like(ids))
    left, _ = lm_forward(model, padded, mask)
    torch.testing.assert_close(left[:, 3:], plain, rtol=1e-5, atol=1e-6)


def _args(base=None, **overrides):
    """``base`` (default RLHFArgs) with flat overrides, PPOConfig's going into ``ppo`` as the CLI's flags do."""
    base = base or R.RLHFArgs()
    ppo = {k: overrides.pop(k) for k in list(overrides) if k in PPOConfig.__dataclass_fields__}
    return dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, **ppo), **overrides)


def _trainer(stages, **overrides):
    return R._trainer(_args(stages["args"], **overrides), stages, kl_off=False)


@pytest.mark.parametrize("fused", [True, False])
def test_first_update_ratio_is_exactly_one_with_temperature(stages, fused):
    args = _args(stages["args"], temperature=0.6)
    trainer = R._trainer(dataclasses.replace(args, lm=dataclasses.replace(args.lm, fused_logprob=fused)), stages,
                         kl_off=False)
    batch = trainer.rollout()
    Lq, mb = batch.query.shape[1], trainer.config.micro_batch_size
    idx = torch.arange(mb)  # the same micro-batch the rollout's forward saw
    new, _, _ = trainer._response_logprobs_values(batch.sequence[idx], batch.attention_mask[idx], Lq,
                                                  batch.response[idx], batch.response_mask[idx])
    assert torch.equal(new, batch.logprob[idx])  # ratio exactly 1 before the first step
    # Forgetting the temperature in training would not give ratio 1.
    logits = lm_forward(trainer.policy, batch.sequence[idx], batch.attention_mask[idx])[0][:, Lq - 1:-1]
    wrong, _ = categorical_logprob_entropy(logits, batch.response[idx], 1.0)
    assert (wrong - batch.logprob[idx])[batch.response_mask[idx]].abs().max() > 1e-2


def test_rollout_scores_kl_and_rewards_fit_together(stages):
    trainer = _trainer(stages)
    trainer.config.missing_eos_penalty = 3.0
    batch = trainer.rollout()
    mask = torch.cat([batch.query.new_ones(batch.query.shape).bool(), batch.response_mask], 1).long()
    raw = trainer.rm.score(batch.sequence, mask)
    torch.testing.assert_close(batch.scores, torch.where(batch.has_eos, raw, raw - 3.0))
    # rewards = -beta * kl everywhere, plus the score at the last real token
    last = batch.response_mask.sum(1) - 1
    expected = -trainer.beta * batch.kl
    expected[torch.arange(len(last)), last] += batch.scores
    torch.testing.assert_close(batch.rewards, expected)
    assert torch.equal(batch.kl[~batch.response_mask], torch.zeros_like(batch.kl[~batch.response_mask]))
    adv = batch.advantages[batch.response_mask]
    assert abs(float(adv.mean())) < 1e-5 and abs(float(adv.std()) - 1) < 1e-3  # whitened over real tokens


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 100)  # KL above target: error clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(5.4, 1000)  # 10% below target
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.1))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_minibatches"):
        PPOConfig(batch_size=10, num_minibatches=3).validate()
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k4").validate()
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="PPOConfig.vf_clip_coef must be > 0, got 0"):
        PPOConfig(vf_clip_coef=0).validate()
    with pytest.raises(ValueError, match="PPOConfig.gae_lambda must be in"):
        PPOConfig(gae_lambda=1.5).validate()


OLD_NAMES = [("cliprange", "clip_coef"), ("cliprange_value", "vf_clip_coef"), ("lam", "gae_lambda")]


@pytest.mark.parametrize("old,new", OLD_NAMES)
def test_config_old_names_warn_and_set_the_new_fields(old, new):
    with pytest.warns(DeprecationWarning, match=f"fastppo.rlhf.PPOConfig's keyword {old} is renamed {new}") as caught:
        config = PPOConfig(**{old: 0.125})
    assert caught[0].filename == __file__  # the warning points at the call
    assert getattr(config, new) == 0.125 != getattr(PPOConfig(), new)  # the new field is set, not left at its default
    assert config == PPOConfig(**{new: 0.125})
    with pytest.warns(DeprecationWarning, match=f"fastppo.rlhf.PPOConfig.{old} is renamed {new}"):
        assert getattr(config, old) == 0.125  # TRL's attribute reads the field
    with pytest.warns(DeprecationWarning, match=f"fastppo.rlhf.PPOConfig.{old} is renamed {new}"):
        setattr(config, old, 0.25)
    assert getattr(config, new) == 0.25
    assert old not in dataclasses.asdict(config) and old not in PPOConfig.__dataclass_fields__  # an alias, not a field
    with pytest.raises(TypeError, match=f"fastppo.rlhf.PPOConfig: got both {old}= and {new}="):
        PPOConfig(**{old: 0.125, new: 0.125})


@pytest.mark.parametrize("old,new", OLD_NAMES)
def test_cli_old_flags_warn_and_set_the_new_settings(old, new, capsys):
    old_flag, new_flag = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")

    def parse(argv):  # as fastppo rlhf parses its flags
        return tyro.cli(R.RLHFArgs, args=R.renamed_flags(argv), config=(tyro.conf.DisallowNone,))

    with pytest.warns(DeprecationWarning, match=f"fastppo rlhf's flag {old_flag} is renamed {new_flag}"):
        args = parse(["--seed", "3", old_flag, "0.125"])
    assert getattr(args.ppo, new) == 0.125 and args.seed == 3
    with pytest.warns(DeprecationWarning, match=f"fastppo rlhf's flag {old_flag} is renamed {new_flag}"):
        assert getattr(parse([f"--{old}=0.25"]).ppo, new) == 0.25  # also as --flag=value, with underscores
    assert getattr(parse([new_flag, "0.5"]).ppo, new) == 0.5  # and no warning (warnings are errors in the tests)
    with pytest.raises(ValueError, match=f"got both {old_flag} and {new_flag}"):
        R.renamed_flags([old_flag, "0.1", f"{new_flag}=0.1"])
    assert R.main([old_flag, "0.1", new_flag, "0.1"]) == 2  # both: an error naming both, before anything runs
    assert f"error: got both {old_flag} and {new_flag}" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_thirty_iterations_raise_the_gold_score(stages, seed):
    trainer = _trainer(stages, seed=seed, batch_size=32)
    history = [trainer.step() for _ in range(30)]
    gold = sum(h["objective/gold"] for h in history[-5:]) / 5
    assert gold > stages["report"]["sft_gold"] + 0.4, (gold, stages["report"]["sft_gold"])
    assert all(h["objective/kl"] < 10 for h in history)  # bounded by the penalty


def test_kill_and_resume_equals_uninterrupted(tmp_path, stages):
    small = dict(iterations=4, checkpoint_every=2, batch_size=8, compare_kl_off=False, plot=False)
    full = R.run_ppo(_args(**small), stages, tmp_path / "full", kl_off=False)
    R.run_ppo(_args(**{**small, "iterations": 2}), stages, tmp_path / "split", kl_off=False)
    resumed = R.run_ppo(_args(**{**small, "resume": True}), stages, tmp_path / "split", kl_off=False)
    assert resumed == full
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["trainer"]["policy"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["trainer"]["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3, 4]


def test_shared_critic_trains_a_value_head_on_the_policy_trunk(stages):
    trainer = _trainer(stages, critic="shared", batch_size=16)
    assert trainer.critic is None and trainer.value_head is not None
    assert torch.equal(trainer.value_head.weight, torch.zeros_like(trainer.value_head.weight))
    metrics = trainer.step()
    assert trainer.value_head.weight.abs().sum() > 0  # the value loss reached the head
    assert all(v == v for v in metrics.values())


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, stages):
    small = dict(iterations=1, checkpoint_every=1, batch_size=8)
    R.run_ppo(_args(**small), stages, tmp_path, kl_off=False)
    with pytest.raises(SystemExit, match="--resume"):
        R.run_ppo(_args(**small), stages, tmp_path, kl_off=False)


def test_cli_end_to_end_tiny(tmp_path):
    cmd = [sys.executable, "-m", "fastppo", "rlhf", "--run-dir", str(tmp_path), "--iterations", "3", "--sft-steps", "20",
           "--rm-pairs", "128", "--rm-heldout-pairs", "64", "--rm-epochs", "1", "--batch-size", "8", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "held-out accuracy" in done.stdout
    for name in ("stages.pt", "kl/checkpoint.pt", "kl_off/metrics.jsonl", "rlhf.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    again = subprocess.run(cmd + ["--resume", "--iterations", "4"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "stages loaded" in again.stdout and "resumed after iteration 3" in again.stdout
    assert len((tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()) == 4


def test_cli_help_and_bad_flags():
    help_text = subprocess.run([sys.executable, "-m", "fastppo", "rlhf", "--help"], capture_output=True, text=True).stdout
    assert "--kl-coef" in help_text and "beta of the per-token KL penalty" in help_text
    assert "--no-compare-kl-off" in help_text and "--kl-target FLOAT" in help_text and "--ppo." not in help_text
    assert "--ppo-epochs INT" in help_text and "--no-whiten-rewards" in help_text  # every PPOConfig field is a flag
    assert "--clip-coef FLOAT" in help_text and "--vf-clip-coef FLOAT" in help_text and "--gae-lambda FLOAT" in help_text
    assert "cliprange" in help_text and "--cliprange" not in help_text  # TRL's name is documented, not a flag of its own
    bad = subprocess.run([sys.executable, "-m", "fastppo", "rlhf", "--preset", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--preset" in bad.stderr


def test_transformers_causal_lm_runs_the_loop():
    transformers = pytest.importorskip("transformers")
    model = R._hf_gpt2(0)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    query = torch.tensor([[0, 0, 1, 5, 6, 2], [1, 7, 8, 9, 4, 2]])
    qmask = (query != 0).long()
    qmask[:, 2:] = 1
    logits, hidden = lm_forward(model, query, qmask)
    assert logits.shape == (2, 6, D.VOCAB_SIZE) and hidden.shape == (2, 6, 64)
    rm = ScalarHeadModel(R._hf_gpt2(1))
    trainer = PPOTrainer(model, frozen_copy(model), rm, copy.deepcopy(rm), D.prompts, D.EOS, D.PAD,
                         PPOConfig(batch_size=8, micro_batch_size=4), {"gold": D.gold_score})
    metrics = trainer.step()
    assert all(v == v for v in metrics.values())  # no NaN
