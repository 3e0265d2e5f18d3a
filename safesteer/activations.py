"""Recording activations at every layer in one batched forward pass.

One forward pass per batch fills a `[n_prompts, n_layers, hidden]` tensor: hooks on every
layer reduce each sequence to one vector as it flows past (last prompt token, or the mean over
prompt tokens), so nothing bigger than that is ever kept. The pass runs the decoder without the
LM head, which saves the vocabulary projection that recording never needs.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal

import torch

from .architectures import Site
from .models import LoadedModel
from .progress import ProgressCallback, no_progress

Token = Literal["last", "mean"]
TOKENS: tuple[Token, ...] = ("last", "mean")


def primary_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor in a module's output (decoder layers return a tensor, attention a tuple)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift a prompt's positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def record_activations(
    lm: LoadedModel,
    prompts: list[str],
    site: Site = "residual",
    token: Token = "last",
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Activations of every prompt at every layer: float32 `[n_prompts, n_layers, hidden]` on the CPU.

    Prompts are batched by length (less padding, same results) and written back in input order.
    """
    report = progress or no_progress
    n_layers, hidden = lm.architecture.n_layers, lm.identity.hidden_size
    result = torch.zeros(len(prompts), n_layers, hidden, dtype=torch.float32)
    if not prompts:
        return result
    texts = [lm.chat_text(p) for p in prompts]
    lengths = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    batch: dict[str, torch.Tensor] = {}
    rows: list[int] = []

    def capture(layer: int):
        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            hidden_states = primary_tensor(output).float()
            if token == "last":
                reduced = hidden_states[:, -1, :]  # left padding: the last position is the last prompt token
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden_states.dtype)
                reduced = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)
            result[rows, layer] = reduced.to("cpu")

        return hook

    with ExitStack() as stack, torch.inference_mode():
        for layer in range(n_layers):
            handle = lm.architecture.module(layer, site).register_forward_hook(capture(layer))
            stack.callback(handle.remove)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            encoded = lm.tokenizer(
                [texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False
            )
            batch = {k: v.to(lm.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            lm.architecture.decoder(**batch, position_ids=position_ids_for(batch["attention_mask"]), use_cache=False)
            done = min(start + batch_size, len(order))
            report(done / len(order), f"recorded {done}/{len(order)} prompts")
    return result
