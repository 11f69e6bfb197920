"""fastppo.trl: TRL's GRPOTrainer with fastppo's LM head and loss computes what TRL's own computes
(loss, gradients, updated parameters, metrics), for every mapped loss_type and option, on a tiny
Qwen2 built from a config and a tokenizer built in the test (nothing downloaded), on the CPU; and it
refuses, at construction, what fastppo.ppo_loss cannot compute exactly."""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"fastppo.trl is written against TRL 1.16; found {trl.__version__}", allow_module_level=True)

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from trl import GRPOTrainer as TRLGRPOTrainer  # noqa: E402

from fastppo.trl import GRPOConfig, GRPOTrainer  # noqa: E402

# TRL 1.16 uses transformers' deprecated `gradient_checkpointing` names itself.
pytestmark = pytest.mark.filterwarnings("ignore:`\\w*gradient_checkpointing\\w*` is deprecated:FutureWarning")

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(21)]
PROMPTS = ["w1 w2", "w3 w4 w5", "w6", "w7 w8 w9 w10"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A tiny model: one thread is fastest, and both trainers run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two tiny Qwen2s built from a config (seeds 0 and 3), saved to a local folder: with ``beta`` TRL
    loads its reference model from the policy's ``name_or_path``, which is then that folder."""
    config = transformers.Qwen2Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    dirs = {}
    for seed in (0, 3):
        torch.manual_seed(seed)
        dirs[seed] = tmp_path_factory.mktemp(f"qwen2_{seed}")
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(dirs[seed])
    return dirs


def load_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).train()


def reward(completions, **kwargs):
    """Varied scores, so that the groups have advantages."""
    return [float(sum(len(w) * (i + 1) for i, w in enumerate(c.split())) % 7) for c in completions]


def make_config(tmp_path, **options):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=6, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                    max_grad_norm=0.0, report_to="none", use_cpu=True, seed=7, logging_steps=1, save_strategy="no",
                    disable_tqdm=True, use_bias_correction_kl=False, bf16=False)
    settings.update(options)
    return GRPOConfig(**settings)


def make_trainer(cls, model, config, callbacks=None):
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    return cls(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=make_tokenizer(),
               callbacks=callbacks)


class RecordGradients(transformers.TrainerCallback):
    """Each optimizer step's gradients (the last callback before the step)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def case_id(value):
    """A parameter's part of a test id: the loss_type, the options as k=v, the vLLM weights' level."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "defaults"
    return value if isinstance(value, str) else f"vllm={value}"


def assert_close_dicts(got, want, rtol, atol, what):
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


# ------------------------------------------------------------------ refused at construction


@pytest.mark.parametrize("options, named", [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(loss_type="vespo"), "loss_type='vespo'"),
    (dict(beta=0.04, use_bias_correction_kl=True), "use_bias_correction_kl=True"),
    (dict(delta=1.1, epsilon_high=0.28), "delta=1.1"),
    (dict(loss_type="dapo", entropy_coef=0.01), "entropy_coef=0.01"),
    (dict(loss_type="bnpo", entropy_coef=0.01, top_entropy_quantile=0.5), "entropy_coef=0.01"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy=True"),
])
def test_refuses_what_ppo_loss_cannot_compute(tmp_path, model_dirs, options, named):
    with pytest.raises(ValueError, match=f"GRPOTrainer: {named}"):
        make_trainer(GRPOTrainer, load_model(model_dirs[0]), make_config(tmp_path, **options))


def test_refuses_a_soft_capped_head(tmp_path, model_dirs):
    model = load_model(model_dirs[0])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        make_trainer(GRPOTrainer, model, make_config(tmp_path))


# ------------------------------------------------------------------ train(): the same steps as TRL's

# (loss_type, options): every mapped loss_type, and the options on top of them.
TRAIN_CASES = [
    ("grpo", {}),
    ("bnpo", {}),
    ("dr_grpo", {}),
    ("dapo", dict(epsilon_high=0.28)),
    ("luspo", dict(importance_sampling_level="sequence")),
    ("grpo", dict(importance_sampling_level="sequence", beta=0.05, mask_truncated_completions=True)),
    ("dapo", dict(beta=0.1, delta=1.5, temperature=0.7)),
    ("bnpo", dict(entropy_coef=0.05)),
    ("dr_grpo", dict(top_entropy_quantile=0.5, gradient_accumulation_steps=2, per_device_train_batch_size=2)),
]


@pytest.mark.parametrize("loss_type, options", TRAIN_CASES, ids=case_id)
def test_train_steps_equal_trl(tmp_path, model_dirs, loss_type, options):
    """Two optimizer steps over one generation batch (num_iterations=2, so the second step's ratio is
    not 1 and the clip acts): the same losses, gradients, metrics and updated parameters."""
    runs = {}
    for name, cls in (("trl", TRLGRPOTrainer), ("fastppo", GRPOTrainer)):
        record = RecordGradients()
        config = make_config(tmp_path / name, loss_type=loss_type, num_iterations=2, max_steps=2, **options)
        trainer = make_trainer(cls, load_model(model_dirs[0]), config, callbacks=[record])
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs[name] = (logs, record.grads, params)
    (trl_logs, trl_grads, trl_params), (logs, grads, params) = runs["trl"], runs["fastppo"]
    assert len(logs) == len(trl_logs) == 2 and len(grads) == len(trl_grads) == 2
    for step, (got, want) in enumerate(zip(logs, trl_logs)):
        # every logged value but the timings: the completions' lengths and rewards (the same
        # completions), the loss, grad_norm and TRL's loss metrics
        assert got.keys() == want.keys(), step
        for key in (k for k in want if k != "step_time"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key)
    for step in range(2):
        assert_close_dicts(grads[step], trl_grads[step], 1e-4, 1e-6, f"step {step} gradient")
    assert_close_dicts(params, trl_params, 1e-4, 1e-6, "parameter")
    assert trl_logs[1]["clip_ratio/region_mean"] > 0  # the second step's ratio leaves the clip range
    initial = load_model(model_dirs[0]).state_dict()
    assert any(not torch.equal(p, initial[n]) for n, p in params.items())


# ------------------------------------------------------------------ _compute_loss on one prepared batch


def prepared_inputs(trainer, seed, per_sequence_weights=False):
    """A batch as TRL's _generate_and_score_completions prepares it, with old and reference log-probs
    away from the policy's (ratios on both sides of the clip), empty and truncated completions, a
    tool mask, vLLM's importance-sampling ratios and sampling log-probs."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = 6, 3, 5
    prompt_ids = torch.randint(3, len(WORDS), (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    prompt_ids[0, 0] = 0
    completion_ids = torch.randint(3, len(WORDS), (B, T), generator=g)
    lengths = torch.tensor([5, 3, 0, 1, 4, 5])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T)
    tool_mask = torch.ones(B, T, dtype=torch.long)
    tool_mask[1, 1] = 0
    is_shape = (B, 1) if per_sequence_weights else (B, T)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "tool_mask": tool_mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": (completion_mask * tool_mask).sum() * 2,  # the generation batch: two such
        # a shift per sequence too, so that the sequence-level ratio leaves the clip range as well
        "old_per_token_logps": (logps + 0.3 * torch.randn(B, T, generator=g) + 0.4 * torch.randn(B, 1, generator=g))
        * completion_mask,
        "ref_per_token_logps": (logps + 0.5 * torch.randn(B, T, generator=g)) * completion_mask,
        "sampling_per_token_logps": (logps + 0.2 * torch.randn(B, T, generator=g) + 0.3 * torch.randn(B, 1, generator=g))
        * completion_mask,
        "importance_sampling_ratio": torch.rand(is_shape, generator=g) * 2,
    }


# (loss_type, options, with vLLM's importance sampling: None, "token" or "sequence")
LOSS_CASES = [
    ("grpo", {}, None),
    ("bnpo", {}, None),
    ("dr_grpo", {}, None),
    ("dapo", {}, None),
    ("luspo", dict(importance_sampling_level="sequence"), None),
    ("grpo", dict(importance_sampling_level="sequence", beta=0.05), None),
    ("dapo", dict(epsilon_high=0.28, beta=0.1, delta=1.4), "token"),
    ("bnpo", dict(importance_sampling_level="sequence", delta=1.3, off_policy_mask_threshold=0.05), "sequence"),
    ("dr_grpo", dict(top_entropy_quantile=0.4, beta=0.02, temperature=0.8), "token"),
    ("bnpo", dict(entropy_coef=0.1, beta=0.03), None),
    ("luspo", dict(epsilon=0.1, epsilon_high=0.15, off_policy_mask_threshold=0.05), None),
    # TRL's default mixed precision (bf16 autocast) with the head in float32: the same bf16 backbone
    ("grpo", dict(bf16=True, cast_lm_head_to_fp32=True), None),
]


@pytest.mark.parametrize("loss_type, options, vllm", LOSS_CASES, ids=case_id)
def test_compute_loss_equals_trl(tmp_path, model_dirs, loss_type, options, vllm):
    """One batch, clip active on both sides, two accumulation steps: TRL's _compute_loss and fastppo's
    give the same loss, gradients and metrics, in training and in evaluation mode."""
    trainers = {}
    for name, cls in (("trl", TRLGRPOTrainer), ("fastppo", GRPOTrainer)):
        config = make_config(tmp_path / name, loss_type=loss_type, **options)
        trainer = make_trainer(cls, load_model(model_dirs[3]), config)
        trainer.current_gradient_accumulation_steps = 2
        if vllm is not None:  # what a vLLM run sets; the ratios come with the batch
            trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainers[name] = trainer
    inputs = prepared_inputs(trainers["trl"], seed=11, per_sequence_weights=vllm == "sequence")
    for training in (True, False):
        results = {}
        for name, trainer in trainers.items():
            trainer.model.train(training)
            trainer._metrics["train"].clear(), trainer._metrics["eval"].clear()
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            loss = trainer._compute_loss(trainer.model, inputs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            mode = "train" if training else "eval"
            results[name] = (loss.detach(), grads, dict(trainer._metrics[mode]))
        (trl_loss, trl_grads, trl_metrics), (loss, grads, metrics) = results["trl"], results["fastppo"]
        torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
        assert trl_loss.abs() > 1e-4  # a loss, not an empty mask
        for got, want in zip(grads, trl_grads):
            if want is None:
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert metrics.keys() == trl_metrics.keys()
        for key in trl_metrics:
            assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-7), key
    # the clip acts on this batch (so the comparison covers both branches of the surrogate)
    assert trl_metrics["clip_ratio/region_mean"][0] > 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_bf16_autocast_error_within_twice_trls(tmp_path, model_dirs, loss_type):
    """Under bf16 autocast (GRPOConfig's default) both heads run their GEMMs in bf16: measured against
    the float32 computation of the same batch, fastppo's loss and gradients are within twice the error
    of TRL's own bf16 computation."""
    results = {}
    for name, cls in (("trl", TRLGRPOTrainer), ("fastppo", GRPOTrainer)):
        for bf16 in (False, True):
            config = make_config(tmp_path / f"{name}{bf16}", loss_type=loss_type, bf16=bf16)
            trainer = make_trainer(cls, load_model(model_dirs[3]), config)
            trainer.current_gradient_accumulation_steps = 2
            if (name, bf16) == ("trl", False):
                inputs = prepared_inputs(trainer, seed=11)
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            loss = trainer._compute_loss(trainer.model, inputs)
            results[name, bf16] = (loss.detach(), torch.autograd.grad(loss, params))
    ref_loss, ref_grads = results["trl", False]

    def errors(name):
        loss, grads = results[name, True]
        relative = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads))
        return (loss - ref_loss).abs().item(), relative

    (trl_loss_err, trl_grad_err), (loss_err, grad_err) = errors("trl"), errors("fastppo")
    assert 0 < trl_grad_err < 0.05  # bf16 rounding, not a float32 run
    assert loss_err <= 2 * trl_loss_err + 1e-6
    assert grad_err <= 2 * trl_grad_err
