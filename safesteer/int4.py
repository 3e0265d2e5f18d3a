"""Fast 4-bit generation on the CPU through PyTorch's own weight-only int4 kernel.

Profiling previews of the embedded model on a 2-core CPU showed bitsandbytes' NF4 matrix-vector
products and float32 weights both bound by memory traffic: every decode step reads every weight.
PyTorch ships a CPU kernel (`_weight_int4pack_mm_for_cpu`) for 4-bit weights in groups of 32
along the input, each group with a scale and a zero point, fed bfloat16 activations. That is the
same layout as GGUF's Q4_1, the format of the embedded model, so repacking the dequantized
checkpoint recovers the original 4-bit codes exactly (only the group scales are rounded to
bfloat16): the model behaves like the GGUF file itself and decodes about 3x faster than NF4.

The LM head (tied to the embeddings, Q8_0 in the GGUF) becomes int8 with one scale per output
row (`_weight_int8pack_mm`); everything else runs in bfloat16. Layers whose shapes the kernel
cannot take stay as bfloat16 `nn.Linear`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

GROUP_SIZE = 32
"""Input elements per scale/zero pair: GGUF Q4_1's block size."""
_LEVELS = 15
# Every product runs through the 4-bit and int8 kernels, whatever the batch: each output row is
# computed on its own, with one reduction order, so a row's answer does not depend on how many rows
# share its batch (a preview's naive row, a server request with neighbours, a sweep's cell all get
# the tokens they get alone). Float32 GEMM on dequantized weights was once used from 64 rows on; its
# reduction order changes with the number of rows, so answers moved with the batch, and on
# torch 2.13 it is no faster for the decoder's products (measured in docs/serving.md).


def _pack_codes(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes and per-group (scale, zero) for `weight` [out, in], min-max per group like Q4_1.

    The kernel decodes a code q as `(q - 8) * scale + zero`; Q4_1 decodes it as `q * d + m`, so
    `scale = d` and `zero = m + 8 d`. The group's minimum is m and its maximum m + 15 d.
    """
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / _LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((groups - low) / scale).round().clamp(0, _LEVELS).to(torch.int32).reshape(out_features, in_features)
    zero = low + 8 * scale
    scales_and_zeros = torch.stack([scale.reshape(out_features, -1), zero.reshape(out_features, -1)], dim=-1).transpose(
        0, 1
    )  # [in // group, out, 2], the kernel's layout
    return codes, scales_and_zeros.contiguous()


class Int4Linear(nn.Module):
    """A bias-optional linear layer with 4-bit grouped weights, computed by PyTorch's CPU kernel."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
        group_size: int = GROUP_SIZE,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE) -> Int4Linear:
        codes, scales_and_zeros = _pack_codes(linear.weight.detach(), group_size)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(
            packed, scales_and_zeros.to(torch.bfloat16), linear.out_features, linear.in_features, bias, group_size
        )

    @staticmethod
    def fits(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
        """The kernel needs whole groups along the input and outputs in multiples of 16."""
        return linear.in_features % group_size == 0 and linear.out_features % 16 == 0

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product with bfloat16 [rows, in_features] activations, no bias (hot loops use this)."""
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features).to(torch.bfloat16))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output row (the LM head)."""

    codes: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("codes", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product with bfloat16 [rows, in_features] activations, no bias (hot loops use this)."""
        return torch._weight_int8pack_mm(x, self.codes, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features).to(torch.bfloat16))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


@functools.cache
def int4_problem() -> str | None:
    """Why the int4 CPU kernel cannot run in this PyTorch build, or None when it can."""
    try:
        layer = Int4Linear.from_linear(nn.Linear(GROUP_SIZE, 16, bias=False))
        head = Int8Linear(nn.Linear(16, 16, bias=False))
        head(layer(torch.ones(1, GROUP_SIZE)))
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def quantize_int4(model: Any, group_size: int = GROUP_SIZE) -> int:
    """Repack a float CPU causal LM in place: 4-bit decoder linears, int8 head, bfloat16 elsewhere.

    Returns how many layers became 4-bit. The head gets its own int8 copy, so a head tied to the
    input embeddings is untied (the embeddings stay bfloat16 for lookups).
    """
    head = model.get_output_embeddings()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head or type(child) is not nn.Linear or not Int4Linear.fits(child, group_size):
                continue
            setattr(parent, name, Int4Linear.from_linear(child, group_size))
            swapped += 1
    int8_head = Int8Linear(head) if isinstance(head, nn.Linear) else None
    model.to(torch.bfloat16)
    if int8_head is not None:
        model.config.tie_word_embeddings = False
        model.set_output_embeddings(int8_head)
    return swapped
