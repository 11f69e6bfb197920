"""fastppo rlhf's models: --model (TinyGPT, a transformers model type, a local Hugging Face directory
with or without weights), --dtype (float32 master weights for bf16/fp16), --gradient-checkpointing
and the fused log-prob path (hidden state and LM head, no [tokens, V] logits)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

from fastppo import ppo_loss  # noqa: E402
from fastppo.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from fastppo.rlhf import PPOConfig, PPOTrainer, ScalarHeadModel, frozen_copy  # noqa: E402
from fastppo.rlhf import digits as D  # noqa: E402
from fastppo.rlhf import ppo as P  # noqa: E402
from fastppo.rlhf import run as R  # noqa: E402
from fastppo.rlhf.build import ModelConfig, build_causal_lm, resolve_model  # noqa: E402
from fastppo.rlhf.models import enable_gradient_checkpointing, lm_forward, response_logprobs  # noqa: E402
from fastppo.rlhf.precision import MasterWeights  # noqa: E402

transformers = pytest.importorskip("transformers")

VOCAB = 40  # the saved models' vocabulary: more than the task's 14, so the task keeps the first 14 rows
SMALL = ["--sft-steps", "4", "--rm-pairs", "16", "--rm-heldout-pairs", "8", "--rm-epochs", "1", "--batch-size", "8",
         "--micro-batch-size", "4", "--ppo-epochs", "1", "--threads", "1", "--no-plot", "--no-compare-kl-off"]


def _qwen2_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.Qwen2Config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny Qwen2 saved as config.json only, and with its weights."""
    root = tmp_path_factory.mktemp("models")
    _qwen2_config().save_pretrained(root / "config_only")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_qwen2_config()).save_pretrained(root / "with_weights")
    return root


def _batch(seed: int = 0, n: int = 6):
    """Prompts with responses of several lengths (padding after EOS): ``(sequence, mask, Lq, response, rmask)``."""
    g = torch.Generator().manual_seed(seed)
    query, qmask = D.prompts(n, g)
    response = D.sft_responses(n, g)
    rmask = response != D.PAD
    return torch.cat([query, response], 1), torch.cat([qmask, rmask.long()], 1), query.shape[1], response, rmask


def _reference_logprobs(model, sequence, mask, Lq, response, rmask, temperature):
    """float64 log_softmax of the model's own logits / T, read at the response tokens (0 at padding)."""
    logits = lm_forward(model, sequence, mask)[0][:, Lq - 1:-1].double() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, response[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(rmask, lp, 0.0), torch.where(rmask, ent, 0.0)


def _models():
    return {"tinygpt": build_causal_lm("tinygpt", D.VOCAB_SIZE, seed=0),
            "qwen2": build_causal_lm("qwen2", D.VOCAB_SIZE, {"hidden_size": 32}, seed=0, special_ids=D.SPECIAL_IDS)}


# ------------------------------------------------------------------ --model


def test_model_sources_and_what_they_build(model_dirs, tmp_path):
    logs = []
    lm = build_causal_lm(str(model_dirs / "config_only"), D.VOCAB_SIZE, seed=3, log=logs.append)
    assert isinstance(lm, transformers.Qwen2ForCausalLM) and not lm.training
    assert lm.config.vocab_size == D.VOCAB_SIZE and lm.get_output_embeddings().weight.shape == (D.VOCAB_SIZE, 32)
    assert "holds a config.json and no weights" in logs[0] and "randomly initialized" in logs[0]
    assert f"vocabulary of {VOCAB} cut to the task's 14 tokens" in logs[0]
    again = build_causal_lm(str(model_dirs / "config_only"), D.VOCAB_SIZE, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))  # the seed's

    loaded = build_causal_lm(str(model_dirs / "with_weights"), D.VOCAB_SIZE, seed=3, log=logs.append)
    assert "loaded with its weights" in logs[1] and "randomly" not in logs[1]
    saved = transformers.AutoModelForCausalLM.from_pretrained(model_dirs / "with_weights", local_files_only=True)
    for name, value in loaded.state_dict().items():  # the saved weights, the vocabulary's first 14 rows
        expected = saved.state_dict()[name]
        expected = expected[:D.VOCAB_SIZE] if expected.shape[0] == VOCAB else expected
        assert torch.equal(value, expected), name

    llama = build_causal_lm("llama", D.VOCAB_SIZE, {"hidden_size": 32, "num_hidden_layers": 1},
                            dtype=torch.bfloat16, special_ids=D.SPECIAL_IDS, log=logs.append)
    c = llama.config
    assert isinstance(llama, transformers.LlamaForCausalLM) and next(llama.parameters()).dtype == torch.bfloat16
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings, c.eos_token_id) == (14, 32, 1, 4, 4, 128, 32, D.EOS)
    assert "a transformers llama (LlamaForCausalLM) built from its config" in logs[2] and "bfloat16" in logs[2]
    tiny = build_causal_lm("tinygpt", D.VOCAB_SIZE, {"n_embd": 32, "n_layer": 1}, seed=1)
    assert tiny.config.n_embd == 32 and len(tiny.blocks) == 1
    assert all(torch.equal(a, b) for a, b in zip(build_causal_lm("tinygpt", D.VOCAB_SIZE, seed=1).state_dict().values(),
                                                 D.new_policy(1).state_dict().values()))  # the preset's, bit for bit


BAD_MODELS = [
    (["--model", "/no/such/dir"], "--model must be tinygpt, a transformers model type"),
    (["--model", "no-such-org/no-such-model"], "no snapshot of it in the local Hugging Face cache (nothing is downloaded"),
    (["--model", "@empty"], "has no config.json"),
    (["--model", "@t5"], "its config T5Config (model_type 't5') is not a causal language model"),
    (["--model", "@small_vocab"], "its vocabulary of 10 tokens is smaller than the task's 14"),
    (["--model", "@gemma2"], "final_logit_softcapping=30.0 changes the logits"),
    (["--model", "qwen2", "--model-kwargs", "hidden_size=32"], "--model-kwargs must be a JSON object"),
    (["--model", "qwen2", "--model-kwargs", '{"no_such_field": 1}'],
     "model_kwargs ['no_such_field'] are not fields of qwen2's config Qwen2Config (--model-kwargs)"),
    (["--model-kwargs", '{"hidden_size": 8}'], "model_kwargs ['hidden_size'] are not fields of TinyGPT's config"),
    (["--dtype", "float8"], "--dtype must be one of float32, bf16, fp16, got 'float8'"),
    (["--preset", "digits-hf", "--model", "qwen2"], "--preset digits-hf builds --model gpt2; for --model qwen2 use "
                                                    "--preset digits"),
    (["--response-length", "27"], "--response-length must be <= 26 (the model's 32 positions)"),
]


@pytest.mark.parametrize("argv,message", BAD_MODELS)
def test_bad_model_settings_are_clear_errors(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    transformers.T5Config().save_pretrained(tmp_path / "t5")
    _qwen2_config(vocab_size=10).save_pretrained(tmp_path / "small_vocab")
    transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, intermediate_size=64).save_pretrained(tmp_path / "gemma2")
    argv = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    assert R.main(["--run-dir", str(tmp_path / "run"), *argv]) == 2  # before anything runs or is written
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_model_errors_from_the_python_api(tmp_path):
    with pytest.raises(ValueError, match="--model must be tinygpt"):
        build_causal_lm("no_such_model_type", D.VOCAB_SIZE)
    with pytest.raises(ValueError, match="vocabulary of 14 tokens is smaller than the task's 20"):
        build_causal_lm("qwen2", 20, {"vocab_size": 14})
    transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, intermediate_size=64).save_pretrained(tmp_path)
    R.RLHFArgs(lm=ModelConfig(model=str(tmp_path), fused_logprob=False)).validate()  # its own logits: fine
    gemma = build_causal_lm(str(tmp_path), D.VOCAB_SIZE)
    rm = ScalarHeadModel(copy.deepcopy(gemma))
    with pytest.raises(ValueError, match="PPOTrainer: policy's Gemma2Config.final_logit_softcapping=30.0.*"
                                         "fused_logprob=False"):
        PPOTrainer(gemma, frozen_copy(gemma), rm, None, D.prompts, D.EOS, D.PAD,
                   PPOConfig(algo="grpo", batch_size=4, group_size=4, micro_batch_size=2))


# ------------------------------------------------------------------ the fused log-prob path


@pytest.mark.parametrize("name", ["tinygpt", "qwen2"])
def test_fused_and_logits_paths_give_the_same_logprobs_and_gradients(name):
    model = _models()[name].train()
    sequence, mask, Lq, response, rmask = _batch()
    expected_lp, expected_ent = _reference_logprobs(model, sequence, mask, Lq, response, rmask, 0.7)
    adv = torch.randn(rmask.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        lp, ent, hidden = response_logprobs(model, sequence, mask, Lq, response, rmask, 0.7, fused)
        assert lp.dtype == ent.dtype == torch.float32 and hidden.shape == (*sequence.shape, 64 if name == "tinygpt" else 32)
        # against the float64 reference: float32 rounding
        torch.testing.assert_close(lp.double(), expected_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), expected_ent, rtol=1e-5, atol=1e-5)
        assert torch.equal(lp[~rmask], torch.zeros_like(lp[~rmask]))
        out = ppo_loss(lp, lp.detach() - 0.05, adv, entropy=ent, mask=rmask, ent_coef=0.01, norm_adv=False,
                       agg="seq-mean-token-mean")
        out.loss.backward()
        results[fused] = (lp.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None})
    (lp_f, loss_f, grads_f), (lp_l, loss_l, grads_l) = results[True], results[False]
    torch.testing.assert_close(lp_f, lp_l, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(loss_f, loss_l, rtol=1e-6, atol=1e-7)
    assert grads_f.keys() == grads_l.keys() and len(grads_f) > 4
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_l[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_and_logits_trainers_roll_out_and_update_alike(monkeypatch):
    calls = {True: [], False: []}
    real = P.ppo_loss
    base = _models()["qwen2"]
    batches = {}
    for fused in (True, False):
        policy = copy.deepcopy(base)
        torch.manual_seed(1)  # the same reward head for both
        rm = ScalarHeadModel(copy.deepcopy(base))
        trainer = PPOTrainer(policy, frozen_copy(policy), rm, copy.deepcopy(rm), D.prompts, D.EOS, D.PAD,
                             PPOConfig(batch_size=8, micro_batch_size=4, ppo_epochs=1, num_minibatches=1,
                                       response_length=6),
                             generator=torch.Generator().manual_seed(5), fused_logprob=fused)
        batches[fused] = trainer.rollout()
        monkeypatch.setattr(P, "ppo_loss", lambda *a, _c=calls[fused], **k: _c.append(real(*a, **k)) or _c[-1])
        trainer.update(batches[True], orders=[torch.arange(8)])  # the same batch for both
    a, b = batches[True], batches[False]
    assert torch.equal(a.sequence, b.sequence)  # sampling is the same
    for name in ("logprob", "ref_logprob", "values", "advantages"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, msg=name)
    assert len(calls[True]) == len(calls[False]) == 2
    for x, y in zip(calls[True], calls[False]):
        torch.testing.assert_close(x.loss, y.loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("name", ["tinygpt", "qwen2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    plain = _models()[name].train()
    checkpointed = enable_gradient_checkpointing(copy.deepcopy(plain)).train()
    sequence, mask, Lq, response, rmask = _batch(2)
    grads, saved = [], []
    for model in (plain, checkpointed):
        kept = []  # what autograd keeps for backward during the forward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            lp, ent, _ = response_logprobs(model, sequence, mask, Lq, response, rmask, 1.0)
        (-(lp.sum() + 0.1 * ent.sum())).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        saved.append(sum(kept))
    assert saved[1] < saved[0] / 4  # the blocks' activations are recomputed in backward, not stored
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-7, msg=n)
    with torch.no_grad():  # and outside training nothing changes
        checkpointed.eval()
        torch.testing.assert_close(lm_forward(checkpointed, sequence, mask)[0], lm_forward(plain, sequence, mask)[0],
                                   rtol=0, atol=0)


# ------------------------------------------------------------------ dtypes


def test_master_weights_step_as_float32_adam_on_the_same_gradients():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(97).to(torch.bfloat16))
    ref = torch.nn.Parameter(p.detach().double())
    weights = MasterWeights([p])
    opt = torch.optim.AdamW(weights.master, lr=1e-4)
    ref_opt = torch.optim.AdamW([ref], lr=1e-4)
    start = p.detach().float().clone()
    for step in range(3):
        g = torch.randn(97, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        weights.zero_grad()
        p.grad = g.clone()
        weights.step(opt, max_grad_norm=1e9)
        ref.grad = g.double()
        ref_opt.step()
    master = weights.master[0]
    assert master.dtype == torch.float32 and opt.state[master]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(master.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(p.detach(), master.detach().to(torch.bfloat16))  # rounded once from the master
    # every weight moved in the master (steps of about 1e-4, below bfloat16's spacing at most weights)
    assert (master.detach() != start).all()


def test_fp16_scales_the_loss_so_small_gradients_survive():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    weights = MasterWeights([p])
    opt = torch.optim.SGD(weights.master, lr=1.0)
    x = torch.full((4,), 2.0 ** -26)  # below float16's smallest subnormal (2**-24): an unscaled gradient is 0
    weights.zero_grad()
    weights.backward((p.float() * x).sum())
    weights.step(opt)
    torch.testing.assert_close(weights.master[0].detach(), torch.full((4,), -2.0 ** -26), rtol=0, atol=0)
    assert weights.scaler is not None and weights.state_dict()["scaler"]["scale"] == 2.0 ** 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_trainer_keeps_float32_masters(dtype):
    policy = build_causal_lm("tinygpt", D.VOCAB_SIZE, dtype=dtype, seed=0)
    rm = ScalarHeadModel(copy.deepcopy(policy))
    trainer = PPOTrainer(policy, frozen_copy(policy), rm, None, D.prompts, D.EOS, D.PAD,
                         PPOConfig(batch_size=8, micro_batch_size=4, ppo_epochs=1, num_minibatches=1),
                         generator=torch.Generator().manual_seed(0))
    assert trainer.value_head.weight.dtype == dtype
    batch = trainer.rollout()
    assert batch.logprob.dtype == batch.values.dtype == batch.scores.dtype == torch.float32
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = trainer.step()
    assert all(v == v for v in metrics.values())
    assert all(p.dtype == dtype for p in policy.parameters())
    assert all(m.dtype == torch.float32 for m in trainer.weights.master)
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))
    assert all(torch.equal(p.detach(), m.detach().to(dtype)) for p, m in zip(trainer.weights.params, trainer.weights.master))
    state = trainer.state_dict()
    assert len(state["master_weights"]["master"]) == len(trainer.weights.master)
    assert (state["master_weights"]["scaler"] is not None) == (dtype == torch.float16)


def test_bf16_fused_and_logits_paths_agree_to_bf16_rounding():
    model = build_causal_lm("qwen2", D.VOCAB_SIZE, {"hidden_size": 32}, dtype=torch.bfloat16, seed=0)
    sequence, mask, Lq, response, rmask = _batch()
    with torch.no_grad():
        fused = response_logprobs(model, sequence, mask, Lq, response, rmask, 1.0, True)
        logits = response_logprobs(model, sequence, mask, Lq, response, rmask, 1.0, False)
        expected, _ = _reference_logprobs(model, sequence, mask, Lq, response, rmask, 1.0)
    assert fused[0].dtype == logits[0].dtype == torch.float32
    # the logits are rounded to bfloat16 by the head's GEMM on both paths: about |logit| * 2**-8
    torch.testing.assert_close(fused[0], logits[0], rtol=0, atol=2e-2)
    torch.testing.assert_close(fused[0].double(), expected, rtol=0, atol=2e-2)


# ------------------------------------------------------------------ the CLI and resume


def _checkpoint(run_dir):
    return torch.load(run_dir / "kl" / "checkpoint.pt", weights_only=False)


def test_cli_trains_a_qwen2_directory_in_bf16_and_resume_checks_the_model(model_dirs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--model", str(model_dirs / "config_only"), "--dtype", "bf16",
            "--gradient-checkpointing", "--algo", "grpo", "--group-size", "4", "--iterations", "1", *SMALL]
    assert R.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "holds a config.json and no weights: Qwen2ForCausalLM built from it, randomly initialized" in out
    assert "bfloat16" in out and "last 1 iterations" in out
    state = _checkpoint(run_dir)
    settings = state["settings"]
    assert settings["model"] == str((model_dirs / "config_only").resolve())
    assert (settings["model_kwargs"], settings["dtype"]) == ("{}", "bf16")
    assert all(v.dtype == torch.bfloat16 for v in state["trainer"]["policy"].values())
    assert state["trainer"]["policy"]["lm_head.weight"].shape == (D.VOCAB_SIZE, 32)
    assert all(m.dtype == torch.float32 for m in state["trainer"]["master_weights"]["master"])
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["trainer"]["optimizer"]["state"].values())
    assert json.loads((run_dir / "args.json").read_text())["lm"]["gradient_checkpointing"] is True

    for flags, message in [(["--dtype", "float32"], "--dtype bf16 (asked: float32)"),
                           (["--model", str(model_dirs / "with_weights")],
                            f"--model {(model_dirs / 'config_only').resolve()} (asked: "
                            f"{(model_dirs / 'with_weights').resolve()})"),
                           (["--model-kwargs", '{"num_hidden_layers": 1}'], '--model-kwargs {} (asked: {"num_hidden_layers": 1})')]:
        changed = argv + ["--resume", *flags]  # the last of a repeated flag counts
        assert R.main(changed) == 2
        assert message in capsys.readouterr().err
    # gradient checkpointing and the log-prob path change memory and speed only: a resume may change them
    assert R.main(argv + ["--resume", "--iterations", "2", "--no-gradient-checkpointing", "--no-fused-logprob"]) == 0
    assert "resumed after iteration 1" in capsys.readouterr().out
    assert [r["iteration"] for r in _checkpoint(run_dir)["history"]] == [1, 2]


def test_cli_model_type_with_weights_directory_and_python_api(model_dirs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert R.main(["--run-dir", str(run_dir), "--model", str(model_dirs / "with_weights"), "--iterations", "1",
                   *SMALL]) == 0, capsys.readouterr().err
    assert "Qwen2ForCausalLM loaded with its weights from" in capsys.readouterr().out
    assert _checkpoint(run_dir)["settings"]["dtype"] == "float32"
    # the Python API: the same model, four models, two PPO iterations
    policy = build_causal_lm(str(model_dirs / "with_weights"), D.VOCAB_SIZE, gradient_checkpointing=True)
    rm = ScalarHeadModel(copy.deepcopy(policy))
    trainer = PPOTrainer(policy, frozen_copy(policy), rm, copy.deepcopy(rm), D.prompts, D.EOS, D.PAD,
                         PPOConfig(batch_size=8, micro_batch_size=4, ppo_epochs=1), {"gold": D.gold_score})
    history = [trainer.step() for _ in range(2)]
    assert all(v == v for h in history for v in h.values()) and history[1]["objective/kl"] != 0


def test_stages_saved_before_model_resume_as_tinygpt_float32(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--iterations", "1", *SMALL]
    assert R.main(argv) == 0, capsys.readouterr().err
    for name in ("stages.pt", "kl/checkpoint.pt"):  # as a run made before --model wrote them
        state = torch.load(run_dir / name, weights_only=False)
        key = "settings"
        if name == "stages.pt":
            del state[key]
            del state["args"]["lm"]
        else:
            for field in ("model", "model_kwargs", "dtype"):
                del state[key][field]
        save_checkpoint(run_dir / name, state)
    asked = R.RLHFArgs(sft_steps=4, rm_pairs=16, rm_heldout_pairs=8, rm_epochs=1, lm=ModelConfig(dtype="bf16"))
    with pytest.raises(CheckpointError, match=r"other settings than asked: --dtype float32 \(asked: bf16\);"):
        R.read_stages(run_dir / "stages.pt", asked)
    assert R.main(argv + ["--resume", "--iterations", "2"]) == 0, capsys.readouterr().err
    assert "resumed after iteration 1" in capsys.readouterr().out


def test_resolve_model_needs_no_weights_or_network(model_dirs):
    source = resolve_model(str(model_dirs / "config_only"), D.VOCAB_SIZE)
    assert (source.kind, source.weights, source.vocab_size, source.max_positions) == ("directory", False, VOCAB, 64)
    assert resolve_model(str(model_dirs / "with_weights"), D.VOCAB_SIZE).weights
