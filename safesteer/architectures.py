"""Where decoder layers and attention modules live, per model architecture.

Steering and recording only need two things from a model: its list of decoder layers and, in
each layer, the self-attention module. This table is the single place that knows where they
are and which fast paths (CPU attention, the lean decode loop) fit a family, so supporting a new
family is one line here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import SafeSteerError

Site = Literal["attention", "residual"]
SITES: tuple[Site, ...] = ("residual", "attention")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything the project knows about a model family: where its parts are, and which fast paths fit it."""

    decoder: str  # the base model without the LM head (used for head-free forward passes)
    layers: str  # the ModuleList of decoder layers
    attention: str  # attribute of one decoder layer holding its self-attention
    plain_attention: bool = False  # softmax(q k^T) v over the mask, no sinks, biases or soft caps (`cpu_attention`)
    lean_layer: str | None = None  # decoder-layer class the lean decode loop reproduces exactly (`decoding`)
    lean_mlp: str | None = None  # its MLP class, gate/up/down with one activation


_LLAMA_LIKE = ArchitectureSpec(decoder="model", layers="model.layers", attention="self_attn")


def _plain(family: str) -> ArchitectureSpec:
    """A Llama-like family whose layers are plain pre-norm blocks: every fast path applies."""
    return ArchitectureSpec(
        decoder="model",
        layers="model.layers",
        attention="self_attn",
        plain_attention=True,
        lean_layer=f"{family}DecoderLayer",
        lean_mlp=f"{family}MLP",
    )


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _plain("Llama"),
    "mistral": _plain("Mistral"),
    "qwen2": _plain("Qwen2"),
    **{
        name: _LLAMA_LIKE
        for name in (
            "mixtral",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "phi",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "starcoder2",
            "smollm3",
            "stablelm",
            "internlm2",
        )
    },
    "gpt2": ArchitectureSpec(decoder="transformer", layers="transformer.h", attention="attn"),
    "gpt_neox": ArchitectureSpec(decoder="gpt_neox", layers="gpt_neox.layers", attention="attention"),
    "falcon": ArchitectureSpec(decoder="transformer", layers="transformer.h", attention="self_attention"),
}


def _get_path(root: nn.Module, dotted: str) -> nn.Module | None:
    node: object = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


@dataclass(frozen=True)
class ResolvedArchitecture:
    """The located parts of one loaded model."""

    spec: ArchitectureSpec
    decoder: nn.Module
    layers: nn.ModuleList

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def module(self, layer: int, site: Site) -> nn.Module:
        """The module whose output is read (recording) or shifted (steering) at a site."""
        if not 0 <= layer < self.n_layers:
            raise SafeSteerError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}")
        block = self.layers[layer]
        if site == "residual":
            return block
        if site == "attention":
            attention = getattr(block, self.spec.attention, None)
            if not isinstance(attention, nn.Module):
                raise SafeSteerError(f"layer {layer} has no attention module '{self.spec.attention}'")
            return attention
        raise SafeSteerError(f"unknown site '{site}': use one of {', '.join(SITES)}")


def resolve_architecture(model: nn.Module) -> ResolvedArchitecture:
    """Locate decoder and layers of a causal LM, by its `model_type` or by the common layouts."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    candidates = [ARCHITECTURES[model_type]] if model_type in ARCHITECTURES else []
    candidates += [spec for spec in dict.fromkeys(ARCHITECTURES.values()) if spec not in candidates]
    for spec in candidates:
        decoder = _get_path(model, spec.decoder)
        layers = _get_path(model, spec.layers)
        found = decoder is not None and isinstance(layers, nn.ModuleList) and len(layers) > 0
        if found and isinstance(layers, nn.ModuleList) and decoder is not None and hasattr(layers[0], spec.attention):
            return ResolvedArchitecture(spec=spec, decoder=decoder, layers=layers)
    raise SafeSteerError(
        f"unsupported model architecture '{model_type}': add its layer paths to safesteer.architectures.ARCHITECTURES"
    )


def family(model_type: str | None) -> ArchitectureSpec | None:
    """The known facts of a model family, or None for one not in the table."""
    return ARCHITECTURES.get(model_type or "")
