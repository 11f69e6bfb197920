"""fastppo rlhf's algorithms: PPO, and the critic-free GRPO, Dr. GRPO and RLOO (group advantages,
no value model), with the KL against the reference in the rewards or in the loss."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

from fastppo.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from fastppo.rlhf import PPOConfig, PPOTrainer, ScalarHeadModel, frozen_copy, group_advantages  # noqa: E402
from fastppo.rlhf import digits as D  # noqa: E402
from fastppo.rlhf import ppo as P  # noqa: E402
from fastppo.rlhf import run as R  # noqa: E402
from fastppo.rlhf.config import GROUP_EPS, LOSS_AGG  # noqa: E402

ALGOS = ("ppo", "grpo", "dr_grpo", "rloo")
GROUP_ALGOS = ("grpo", "dr_grpo", "rloo")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Small stages (SFT policy, reward model) made as fastppo rlhf makes them: a toy, not a good model."""
    args = R.RLHFArgs(sft_steps=20, rm_pairs=128, rm_heldout_pairs=64, rm_epochs=1, seed=1, plot=False,
                      compare_kl_off=False, checkpoint_every=1)
    return R.build_stages(args, tmp_path_factory.mktemp("stages")) | {"base": args}


def _args(stages, **overrides):
    """The stages' RLHFArgs with flat overrides, PPOConfig's going into ``ppo`` as the CLI's flags do."""
    base = stages["base"]
    ppo = {k: overrides.pop(k) for k in list(overrides) if k in PPOConfig.__dataclass_fields__}
    return dataclasses.replace(base, ppo=dataclasses.replace(base.ppo, **ppo), **overrides)


def _trainer(stages, **overrides) -> PPOTrainer:
    return R._trainer(_args(stages, **overrides), stages, kl_off=False)


def _record_loss(monkeypatch) -> list:
    """Every ``ppo_loss`` call of the trainer: ``(args, kwargs, out)``."""
    calls = []
    real = P.ppo_loss

    def recorder(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(P, "ppo_loss", recorder)
    return calls


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algo_runs_end_to_end(stages, tmp_path, algo):
    args = _args(stages, algo=algo, iterations=2, batch_size=8, **({"group_size": 4} if algo != "ppo" else {}))
    history = R.run_ppo(args, stages, tmp_path, kl_off=False)
    assert [r["iteration"] for r in history] == [1, 2]
    assert all(v == v for r in history for v in r.values())  # no NaN
    assert ("loss/value_avg" in history[0]) == (algo == "ppo")
    assert ("loss/kl_avg" in history[0]) == (algo != "ppo")  # the group methods put the KL in the loss
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    settings = state["settings"]
    assert settings["algo"] == algo and settings["group_size"] == (1 if algo == "ppo" else 4)
    assert (settings["kl_in"], settings["kl_estimator"]) == (("reward", "k1") if algo == "ppo" else ("loss", "k3"))


@pytest.mark.parametrize("algo", GROUP_ALGOS)
def test_group_methods_build_no_value_model(stages, tmp_path, algo):
    trainer = _trainer(stages, algo=algo, batch_size=8, group_size=4)
    assert trainer.critic is None and trainer.value_head is None and trainer.value_module is None
    policy = {id(p) for p in trainer.policy.parameters()}
    assert {id(p) for p in trainer.trainable_parameters()} == policy
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == policy
    ppo = _trainer(stages, batch_size=8)  # PPO's value model is a copy of the reward model: as many parameters again
    assert len(ppo.trainable_parameters()) > len(policy) and ppo.critic is not None
    trainer.step()
    state = trainer.state_dict()
    assert set(state) == {"policy", "optimizer", "generator", "beta", "config"}  # no "critic"
    assert len(state["optimizer"]["state"]) == len(policy)  # Adam moments of the policy's parameters only
    assert "critic" in ppo.state_dict()
    R.run_ppo(_args(stages, algo=algo, group_size=4, batch_size=8, iterations=1), stages, tmp_path, kl_off=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trainer"]
    assert "critic" not in saved and set(saved["policy"]) == set(trainer.policy.state_dict())


def test_group_methods_refuse_a_value_model(stages):
    trainer = _trainer(stages, batch_size=8)
    with pytest.raises(ValueError, match="critic-free; pass value_model=None"):
        PPOTrainer(trainer.policy, trainer.ref, trainer.rm, trainer.critic, D.prompts, D.EOS, D.PAD,
                   PPOConfig(algo="grpo", batch_size=8, group_size=4, micro_batch_size=4))


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
@pytest.mark.parametrize("algo", GROUP_ALGOS)
def test_loss_takes_the_group_advantages_of_the_scores(stages, monkeypatch, algo, kl_in):
    G, B, mb = 4, 16, 4
    trainer = _trainer(stages, algo=algo, kl_in=kl_in, batch_size=B, group_size=G, micro_batch_size=mb)
    trainer.step()  # the policy leaves the reference, so the KL is not 0
    batch = trainer.rollout()
    query = batch.query.view(B // G, G, -1)
    assert torch.equal(query, query[:, :1].expand_as(query))  # each prompt's responses one after the other
    kl = batch.kl.sum(1)
    assert kl.abs().max() > 0
    scores = batch.scores - trainer.beta * kl if kl_in == "reward" else batch.scores
    expected = group_advantages(scores, G, estimator=algo, eps=GROUP_EPS, mask=batch.response_mask)
    assert torch.equal(batch.advantages, expected)
    calls = _record_loss(monkeypatch)
    trainer.update(batch, orders=[torch.arange(B)] * trainer.config.ppo_epochs)
    assert len(calls) == trainer.config.ppo_epochs * B // mb
    for i, (args, kwargs, _) in enumerate(calls[:B // mb]):
        assert torch.equal(args[2], expected[i * mb:(i + 1) * mb])
        assert kwargs["norm_adv"] is False and kwargs.get("agg", "token-mean") == LOSS_AGG[algo]
        assert not {"new_value", "old_value", "returns"} & kwargs.keys()  # no value loss


def test_dr_grpo_and_rloo_aggregate_as_their_papers():
    assert LOSS_AGG == {"ppo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                        "rloo": "seq-mean-token-sum"}


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_kl_in_loss_adds_a_kl_term_and_kl_in_reward_does_not(stages, monkeypatch, algo):
    terms = {}
    for kl_in in ("loss", "reward"):
        trainer = _trainer(stages, algo=algo, kl_in=kl_in, batch_size=16, group_size=4 if algo == "grpo" else 1)
        trainer.step()
        calls = _record_loss(monkeypatch)
        batch = trainer.rollout()
        trainer.update(batch)
        beta, vf_coef = trainer.beta, trainer.config.vf_coef
        last = batch.response_mask.sum(1) - 1
        not_last = batch.response_mask.clone()
        not_last[torch.arange(len(last)), last] = False
        if kl_in == "loss":
            assert all(k["kl_coef"] == beta > 0 and k["kl_estimator"] == "k3" and k["ref_logprob"] is not None
                       for _, k, _ in calls)
            assert torch.equal(batch.rewards[not_last], torch.zeros_like(batch.rewards[not_last]))  # score only
        else:
            assert all("ref_logprob" not in k and "kl_coef" not in k for _, k, _ in calls)
            torch.testing.assert_close(batch.rewards[not_last], -beta * batch.kl[not_last])
            assert batch.rewards[not_last].abs().max() > 0
        # loss = pg_loss + vf_coef * v_loss (ppo) + kl_coef * kl, the entropy bonus being 0
        term = torch.stack([out.loss - out.pg_loss - (vf_coef * out.v_loss if algo == "ppo" else 0) for _, _, out in calls])
        kl = torch.stack([out.kl for _, _, out in calls])
        terms[kl_in] = term
        if kl_in == "loss":
            torch.testing.assert_close(term, beta * kl, rtol=1e-4, atol=1e-7)
        monkeypatch.undo()
    assert terms["loss"].max() > 0
    torch.testing.assert_close(terms["reward"], torch.zeros_like(terms["reward"]), rtol=0, atol=1e-6)


def test_bad_settings_are_clear_errors(stages, capsys):
    cases = [
        (dict(algo="a2c"), r"PPOConfig.algo must be one of ppo, grpo, dr_grpo, rloo, got 'a2c' \(--algo\)"),
        (dict(algo="rloo", group_size=1), r"PPOConfig.group_size must be >= 2 with algo 'rloo'.*got 1 \(--group-size\)"),
        (dict(algo="grpo", group_size=0), r"PPOConfig.group_size must be an integer >= 1, got 0 \(--group-size\)"),
        (dict(algo="grpo", batch_size=12), r"batch_size must be a multiple of group_size=8.*got 12 \(--batch-size"),
        (dict(algo="grpo", kl_in="both"), r"PPOConfig.kl_in must be reward or loss, got 'both' \(--kl-in\)"),
        (dict(algo="grpo", vf_coef=0.5), r"PPOConfig.vf_coef is a setting of the value model, which algo 'grpo' does "
                                         r"not have; got 0.5 \(--vf-coef\)"),
        (dict(algo="rloo", gae_lambda=0.9), r"gae_lambda.*\(--gae-lambda\)"),
        (dict(algo="grpo", kl_clamp=5.0), r"PPOConfig.kl_clamp must be None with the KL in the loss.*\(--kl-clamp\)"),
        (dict(kl_estimator="k4"), r"kl_estimator must be one of .*got 'k4' \(--kl-estimator\)"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            PPOConfig(**settings).validate()
    PPOConfig(algo="ppo", kl_in="reward", kl_clamp=5.0).validate()  # the clamp bounds the penalty in the rewards
    PPOConfig(algo="grpo", kl_in="reward", kl_clamp=5.0).validate()
    for argv, message in [
        (["--algo", "grpo", "--critic", "shared"], "--critic shared chooses the value model, but --algo grpo builds none"),
        (["--algo", "grpo", "--batch-size", "12"], "--batch-size (12) must hold whole groups of --group-size (8)"),
        (["--algo", "rloo", "--group-size", "1"], "(--group-size)"),
        (["--algo", "ppo", "--kl-in", "everywhere"], "(--kl-in)"),
    ]:
        assert R.main(argv) == 2  # before anything runs or is written
        assert message in capsys.readouterr().err


def test_grpo_kill_and_resume_equals_uninterrupted(tmp_path, stages):
    small = dict(algo="grpo", group_size=4, iterations=4, checkpoint_every=2, batch_size=8)
    full = R.run_ppo(_args(stages, **small), stages, tmp_path / "full", kl_off=False)
    R.run_ppo(_args(stages, **{**small, "iterations": 2}), stages, tmp_path / "split", kl_off=False)
    resumed = R.run_ppo(_args(stages, **{**small, "resume": True}), stages, tmp_path / "split", kl_off=False)
    assert resumed == full
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["trainer"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["trainer"]
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    with pytest.raises(CheckpointError, match=r"--algo grpo \(asked: rloo\)"):
        R.run_ppo(_args(stages, **{**small, "algo": "rloo", "resume": True}), stages, tmp_path / "split", kl_off=False)
    with pytest.raises(CheckpointError, match=r"--kl-in loss \(asked: reward\)"):
        R.run_ppo(_args(stages, **{**small, "kl_in": "reward", "resume": True}), stages, tmp_path / "split",
                  kl_off=False)
    # The settings left to the algorithm are recorded as it chose them: naming them changes nothing.
    same = dict(small, kl_in="loss", kl_estimator="k3", iterations=5, resume=True)
    assert len(R.run_ppo(_args(stages, **same), stages, tmp_path / "split", kl_off=False)) == 5


def test_a_checkpoint_from_before_algo_resumes_as_ppo(tmp_path, stages):
    small = dict(iterations=1, checkpoint_every=1, batch_size=8)
    R.run_ppo(_args(stages, **small), stages, tmp_path, kl_off=False)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    for name in ("algo", "group_size", "kl_in"):
        del state["settings"][name]
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=r"--algo ppo \(asked: grpo\)"):
        R.run_ppo(_args(stages, **small, algo="grpo", group_size=4, resume=True), stages, tmp_path, kl_off=False)
    history = R.run_ppo(_args(stages, **{**small, "iterations": 2, "resume": True}), stages, tmp_path, kl_off=False)
    assert [r["iteration"] for r in history] == [1, 2]


def test_ppo_default_is_unchanged_by_the_new_settings(stages):
    """PPO's defaults are one response per prompt and the k1 penalty in the rewards: naming them gives
    the same run, bit for bit."""
    default = _trainer(stages, batch_size=8)
    named = _trainer(stages, batch_size=8, algo="ppo", group_size=1, kl_in="reward", kl_estimator="k1")
    assert [default.step() for _ in range(2)] == [named.step() for _ in range(2)]


def test_transformers_causal_lm_runs_grpo():
    pytest.importorskip("transformers")
    model = R._hf_gpt2(0)
    rm = ScalarHeadModel(R._hf_gpt2(1))
    trainer = PPOTrainer(model, frozen_copy(model), rm, None, D.prompts, D.EOS, D.PAD,
                         PPOConfig(algo="rloo", batch_size=8, group_size=4, micro_batch_size=4), {"gold": D.gold_score})
    metrics = trainer.step()
    assert all(v == v for v in metrics.values()) and "loss/value_avg" not in metrics


def test_cli_grpo_tiny(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "fastppo", "rlhf", "--help"], capture_output=True, text=True).stdout
    for flag in ("--algo STR", "--group-size INT", "--kl-in STR"):
        assert flag in help_text, flag
    cmd = [sys.executable, "-m", "fastppo", "rlhf", "--run-dir", str(tmp_path), "--algo", "grpo", "--group-size", "4",
           "--iterations", "2", "--sft-steps", "20", "--rm-pairs", "128", "--rm-heldout-pairs", "64", "--rm-epochs", "1",
           "--batch-size", "8", "--threads", "1", "--no-plot"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "grpo (group 4), KL loss term (beta 0.05): last 2 iterations" in done.stdout
    assert "grpo (group 4), no KL loss term: last 2 iterations" in done.stdout
    state = torch.load(tmp_path / "kl" / "checkpoint.pt", weights_only=False)
    assert "critic" not in state["trainer"] and state["settings"]["algo"] == "grpo"
