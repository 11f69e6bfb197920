"""The policy's language model from a name: ``fastppo rlhf --model`` and :func:`build_causal_lm`.

A model is one of:

- ``tinygpt``: the built-in :class:`~fastppo.rlhf.TinyGPT` in plain torch;
- a transformers model type (``gpt2``, ``llama``, ``qwen2``, ``mistral``, ... any with a causal-LM
  class): its config with the task's vocabulary and a small shape (:data:`SMALL_SHAPE`: hidden 64,
  2 layers, 4 heads, 32 positions), randomly initialized;
- a local directory holding a Hugging Face ``config.json``: with weights (``*.safetensors``,
  ``pytorch_model*.bin``) loaded by ``from_pretrained(local_files_only=True)``, without them built by
  ``from_config`` and randomly initialized;
- a Hub id (``org/name``) whose snapshot is already in the local Hugging Face cache: that snapshot's
  directory, as above.

Nothing is downloaded and no code from a model's directory is run (``trust_remote_code`` stays off).
``model_kwargs`` overrides fields of the config (TinyGPT's: ``n_layer``, ``n_head``, ``n_embd``,
``max_positions``; a transformers config's by their names, such as ``hidden_size`` or
``num_hidden_layers``); a field the config does not have is an error.

Vocabulary: a task brings its own token ids ``0 .. vocab_size - 1`` and no tokenizer; they are the
first ``vocab_size`` ids of the model's vocabulary. A model with fewer is an error; one with more
keeps only those rows of its embeddings and LM head (``resize_token_embeddings``), so it never
samples a token the task does not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .models import GPTConfig, TinyGPT, disable_dropout, enable_gradient_checkpointing

BUILTIN = "tinygpt"

# The digits demo's model shape, for TinyGPT and for a config built from a model type.
SMALL_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32}
_TINY_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
               "max_position_embeddings": "max_positions"}

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def tiny_gpt_config(vocab_size: int, **overrides) -> GPTConfig:
    """TinyGPT's shape in :data:`SMALL_SHAPE`, with ``overrides`` (GPTConfig's field names)."""
    fields = {_TINY_NAMES[k]: v for k, v in SMALL_SHAPE.items()}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"model_kwargs {unknown} are not fields of TinyGPT's config; expected some of "
                         f"{sorted(fields)} (--model-kwargs)")
    return GPTConfig(vocab_size=vocab_size, **{**fields, **overrides})


def parse_model_kwargs(text: str) -> dict:
    """``--model-kwargs``: a JSON object of config fields; anything else is a ValueError naming the flag."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ValueError(f"--model-kwargs must be a JSON object such as '{{\"hidden_size\": 128}}', got {text!r} "
                         f"({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs must be a JSON object such as '{{\"hidden_size\": 128}}', got {text!r}")
    return value


class ModelSource(NamedTuple):
    """What :func:`resolve_model` found: ``kind`` is ``"tinygpt"``, ``"type"`` (a transformers model
    type) or ``"directory"``; ``config`` the GPTConfig or transformers config the model is built from;
    ``weights`` whether a directory holds weights; ``vocab_size`` the config's own vocabulary."""

    kind: str
    name: str
    config: object
    weights: bool
    vocab_size: int

    @property
    def max_positions(self) -> int:
        """The longest sequence the config takes (for a rotary model, the length it was made for)."""
        if self.kind == BUILTIN:
            return self.config.max_positions
        for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(getattr(self.config, name, None), int):
                return getattr(self.config, name)
        return 1 << 30

    def describe(self, vocab_size: int, dtype: torch.dtype) -> str:
        """One line for the log: what is built, from where, and how it is initialized."""
        dtype_name = str(dtype).replace("torch.", "")
        if self.kind == BUILTIN:
            c = self.config
            return (f"model: the built-in TinyGPT ({c.n_layer} layers, width {c.n_embd}, {c.n_head} heads), "
                    f"randomly initialized, {dtype_name}")
        arch = (getattr(self.config, "architectures", None) or [_causal_lm_classes()[2][type(self.config)].__name__])[0]
        if self.kind == "type":
            line = f"model: a transformers {self.name} ({arch}) built from its config, randomly initialized"
        elif self.weights:
            line = f"model: {arch} loaded with its weights from {self.name}"
        else:
            line = (f"model: {self.name} holds a config.json and no weights: {arch} built from it, randomly "
                    "initialized")
        if self.vocab_size > vocab_size:
            line += (f"; its vocabulary of {self.vocab_size} cut to the task's {vocab_size} tokens (ids 0-"
                     f"{vocab_size - 1})")
        return f"{line}, {dtype_name}"


def _causal_lm_classes():
    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    except ImportError as err:
        raise ValueError("--model other than tinygpt needs transformers (pip install transformers)") from err
    return AutoConfig, CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING


def _check_kwargs(config_cls, reference, kwargs: dict, what: str) -> dict:
    """``kwargs`` in the config's own field names; a field the config does not have is a ValueError."""
    unknown = sorted(k for k in kwargs if not hasattr(reference, k))
    if unknown:
        raise ValueError(f"model_kwargs {unknown} are not fields of {what}'s config {config_cls.__name__} "
                         f"(--model-kwargs)")
    names = getattr(config_cls, "attribute_map", {})
    return {names.get(k, k): v for k, v in kwargs.items()}


def _type_config(model_type: str, vocab_size: int, kwargs: dict, special_ids: dict):
    """A small config of ``model_type`` with the task's vocabulary and token ids: :data:`SMALL_SHAPE`,
    a 4x MLP and as many key-value heads as heads where the config has them, then ``kwargs``."""
    _, CONFIG_MAPPING, _ = _causal_lm_classes()
    cls = CONFIG_MAPPING[model_type]
    reference = cls()
    asked = _check_kwargs(cls, reference, kwargs, model_type)
    names = getattr(cls, "attribute_map", {})
    own = lambda key: names.get(key, key)  # noqa: E731
    fields = {own(k): v for k, v in {**SMALL_SHAPE, "vocab_size": vocab_size, **special_ids}.items()
              if hasattr(reference, k)}
    fields.update(asked)
    if hasattr(reference, "intermediate_size") and own("intermediate_size") not in asked:
        fields[own("intermediate_size")] = 4 * fields[own("hidden_size")]
    if hasattr(reference, "num_key_value_heads") and own("num_key_value_heads") not in asked:
        fields[own("num_key_value_heads")] = fields[own("num_attention_heads")]
    return cls(**fields)


def resolve_model(model: str, vocab_size: int, model_kwargs: Optional[dict] = None,
                  special_ids: Optional[dict] = None) -> ModelSource:
    """What ``model`` names (see the module docstring) and the config it is built from, without
    building it; a name that is none of them, a config that is no causal LM or a vocabulary smaller
    than ``vocab_size`` is a ValueError naming ``--model``. ``special_ids``: the task's
    ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` for a config built from a model type."""
    kwargs = dict(model_kwargs or {})
    if model == BUILTIN:
        return ModelSource(BUILTIN, BUILTIN, tiny_gpt_config(vocab_size, **kwargs), False, vocab_size)
    path = Path(model).expanduser()
    AutoConfig, CONFIG_MAPPING, CAUSAL = _causal_lm_classes()
    if not path.is_dir() and model in CONFIG_MAPPING:
        config = _type_config(model, vocab_size, kwargs, special_ids or {})
        kind = "type"
    else:
        if not path.is_dir() and "/" in model and not model.startswith((".", "/", "~")):
            path = _cached_snapshot(model) or path
        if not path.is_dir():
            raise ValueError(f"--model must be {BUILTIN}, a transformers model type (such as gpt2, llama, qwen2) or a "
                             f"local directory holding a Hugging Face config.json, got {model!r}: no such directory "
                             "or model type, and no snapshot of it in the local Hugging Face cache (nothing is "
                             "downloaded: fetch it first, e.g. with `huggingface-cli download`)")
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: the directory {path} has no config.json (a Hugging Face model "
                             "directory, as save_pretrained writes it, is expected)")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--model {model}: {path / 'config.json'} cannot be read as a transformers config "
                             f"({err})") from err
        for key, value in _check_kwargs(type(config), config, kwargs, str(path)).items():
            setattr(config, key, value)
        kind = "directory"
    if type(config) not in CAUSAL:
        raise ValueError(f"--model {model}: its config {type(config).__name__} (model_type "
                         f"{getattr(config, 'model_type', '?')!r}) is not a causal language model (transformers has "
                         "no AutoModelForCausalLM class for it)")
    own_vocab = getattr(config, "vocab_size", None)
    if not isinstance(own_vocab, int) or own_vocab < vocab_size:
        raise ValueError(f"--model {model}: its vocabulary of {own_vocab} tokens is smaller than the task's "
                         f"{vocab_size}; the task's token ids must be ids of the model's")
    weights = kind == "directory" and any(any(path.glob(pattern)) for pattern in _WEIGHT_FILES)
    return ModelSource(kind, str(path.resolve()) if kind == "directory" else model, config, weights, own_vocab)


def _cached_snapshot(repo_id: str) -> Optional[Path]:
    """The local snapshot directory of a Hub id already in the Hugging Face cache, else None (no
    network: ``local_files_only``)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, not a valid id, or no huggingface_hub: not a cached snapshot
        return None


def _dtype_keyword() -> str:
    """transformers' keyword for a model's dtype: ``dtype`` from 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def build_causal_lm(model: str, vocab_size: int, model_kwargs: Optional[dict] = None, *,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
                    gradient_checkpointing: bool = False, special_ids: Optional[dict] = None,
                    log: Optional[Callable[[str], None]] = None) -> nn.Module:
    """A causal LM for a task of ``vocab_size`` tokens, from a name (see the module docstring).

    Args:
        model: ``"tinygpt"``, a transformers model type, a local directory with a ``config.json``, or
            a Hub id already in the local cache.
        vocab_size: the task's vocabulary (its token ids are the model's first ``vocab_size``).
        model_kwargs: config fields to override.
        dtype: the parameters' dtype (float32, float64, bfloat16, float16).
        device: where the model lives.
        seed: ``torch.manual_seed`` before a random initialization.
        gradient_checkpointing: recompute each block's activations in backward
            (:func:`~fastppo.rlhf.models.enable_gradient_checkpointing`).
        special_ids: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of a config built from a
            model type.
        log: called with one line saying what was built (:meth:`ModelSource.describe`).

    Returns:
        The model in eval mode, dropout off, on ``device`` in ``dtype``: a :class:`TinyGPT` or a
        transformers ``*ForCausalLM`` whose vocabulary is ``vocab_size``.
    """
    source = resolve_model(model, vocab_size, model_kwargs, special_ids)
    torch.manual_seed(seed)
    if source.kind == BUILTIN:
        lm = TinyGPT(source.config)
    else:
        from transformers import AutoModelForCausalLM

        if source.kind == "type":  # small: made in float32, so a seed gives the same weights in any dtype
            lm = AutoModelForCausalLM.from_config(source.config)
        elif source.weights:
            lm = AutoModelForCausalLM.from_pretrained(source.name, config=source.config, local_files_only=True,
                                                      **{_dtype_keyword(): dtype})
        else:
            lm = AutoModelForCausalLM.from_config(source.config, **{_dtype_keyword(): dtype})
        if source.vocab_size > vocab_size:
            lm.resize_token_embeddings(vocab_size)
    lm = disable_dropout(lm).to(device=device, dtype=dtype).eval()
    if gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if log is not None:
        log(source.describe(vocab_size, dtype))
    return lm


@dataclass
class ModelConfig:
    """``fastppo rlhf``'s model settings: which model, its dtype, and how its log-probs and gradients
    are computed (each a flag without a prefix)."""

    model: Optional[str] = None
    """tinygpt (the built-in TinyGPT), a transformers model type built from its config (gpt2, llama, qwen2, ...), a local directory holding a Hugging Face config.json (with weights: loaded; without: randomly initialized), or a Hub id already in the local cache; nothing is downloaded (None: --preset's, tinygpt for digits, gpt2 for digits-hf)"""
    model_kwargs: str = "{}"
    """JSON object of config fields overriding the model's, e.g. '{"hidden_size": 128, "num_hidden_layers": 4}' (TinyGPT's: n_layer, n_head, n_embd, max_positions)"""
    dtype: str = "float32"
    """float32, bf16 or fp16: every model's parameters and activations (the optimizer keeps float32 master weights and moments; fp16 adds a dynamic loss scale)"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in backward instead of storing them (less memory, one more forward pass of each block)"""
    fused_logprob: bool = True
    """log-probs from the last hidden state and the LM head with fastppo.linear_logprob_entropy, never the [tokens, vocab] logits (--no-fused-logprob: the model's logits and fastppo.categorical_logprob_entropy)"""

    def name(self, default: str) -> str:
        """The model asked for: ``model``, or ``default`` (the preset's) when it is None."""
        return default if self.model is None else self.model

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def kwargs(self) -> dict:
        return parse_model_kwargs(self.model_kwargs)

    def source(self, default: str, vocab_size: int, special_ids: Optional[dict] = None) -> ModelSource:
        """:func:`resolve_model` of these settings (a ValueError naming the flag for a bad one)."""
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return resolve_model(self.name(default), vocab_size, self.kwargs(), special_ids)

    def settings(self, default: str) -> dict:
        """What a run records of them and a resume must ask for again: the model (a directory as an
        absolute path), its config overrides (canonical JSON) and the dtype. Gradient checkpointing
        and the fused log-prob path change memory and speed, not what is computed beyond float
        rounding, so a resume may change them (as it may change --device)."""
        name = self.name(default)
        path = Path(name).expanduser()
        return {"model": str(path.resolve()) if path.is_dir() else name,
                "model_kwargs": json.dumps(self.kwargs(), sort_keys=True), "dtype": self.dtype}

