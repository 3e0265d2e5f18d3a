"""Fast 4-bit generation on the CPU through PyTorch's own weight-only int4 kernel.

Profiling previews of the embedded model on a 2-core CPU showed bitsandbytes' NF4 matrix-vector
products and float32 weights both bound by memory traffic: every decode step reads every weight.
PyTorch ships a CPU kernel (`_weight_int4pack_mm_for_cpu`) for 4-bit weights in groups of 32
along the input, each group with a scale and a zero point, fed bfloat16 activations. That is the
same layout as GGUF's Q4_1, the format of the embedded model, so repacking the dequantized
checkpoint recovers the original 4-bit codes exactly (only the group scales are rounded to
bfloat16): the model behaves like the GGUF file itself and decodes about 3x faster than NF4.

The LM head (tied to the embeddings, Q8_0 in the GGUF) becomes int8 with one scale per output
row (`_weight_int8pack_mm`), computed by a bfloat16 GEMM on its decoded weights where that is
exact (`Int8Linear`); everything else runs in bfloat16. Layers whose shapes the kernel cannot
take stay as bfloat16 `nn.Linear`.

Prompt passes are another workload: many rows per product, bound by arithmetic rather than by
reading weights. There the 4-bit kernel computes about 1.4 ms per token on 2 cores, and a bfloat16
GEMM on the same weights, decoded once, about 0.55 ms (docs/serving.md). So a layer may keep a
bfloat16 copy of its decoded weights for passes that read several tokens per row (`prompt_weight`),
while decoding steps (one token per row) keep the 4-bit kernel. Each phase always uses the same
kernel, so a row's numbers still do not depend on its batch, provided the GEMM computes each row on
its own: that is checked on this machine for every shape before a copy is made.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

GROUP_SIZE = 32
"""Input elements per scale/zero pair: GGUF Q4_1's block size."""
PROMPT_WEIGHTS_BUDGET = 2 * 1024**3
"""Bytes of bfloat16 weights a model may keep beside its 4-bit and int8 ones (the embedded model
needs 0.27 GB: 0.21 for its decoder's prompt passes, 0.06 for its head); a larger model keeps
what fits, the decoder first, and computes the rest with the 4-bit and int8 kernels."""
_INVARIANCE_ROWS = (2, 3, 5, 8, 15, 16, 17, 31, 33, 64, 100, 160)
"""Row counts a GEMM is tried at: kernels switch at small counts and at block boundaries. One row
(a matrix-vector product, summed in another order) is never fed to it: a prompt pass feeds at least
two tokens, and the head computes a lone row as a pair."""
_LEVELS = 15
# Every decoding step runs through the 4-bit kernel and the head's one product, whatever the batch:
# each output row is computed on its own, with one reduction order, so a row's answer does not
# depend on how many rows share its batch (a preview's naive row, a server request with neighbours,
# a sweep's cell all get the tokens they get alone). Float32 GEMM on dequantized weights was once
# used from 64 rows on; its reduction order changes with the number of rows, so answers moved with
# the batch, and on torch 2.13 it is no faster for the decoder's products (measured in
# docs/serving.md). The bfloat16 GEMMs of prompt passes and of the head are used only where
# `rows_computed_alone` finds them row by row too.


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
    prompt_weight: PromptWeight | None
    """The decoded weights in bfloat16 for passes of several tokens per row, or None."""

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
        self.prompt_weight = None  # not a buffer: derived from `packed`, so never saved or compared

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

    def decoded(self) -> torch.Tensor:
        """The weights as the kernel decodes them, rounded to bfloat16, [out, in]."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return self.matmul(eye).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # the kernel takes no strides
        if self.prompt_weight is not None and x.dim() >= 3 and x.shape[-2] > 1:  # a prompt pass (as `steering`)
            out = self.prompt_weight.product(flat)
        else:
            out = self.matmul(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output row (the LM head).

    The int8 kernel computes each row on its own, reading the whole weight again for every row: 2.8
    ms for one row of the embedded model's head on 2 cores, 16 ms for 14. A bfloat16 GEMM on the
    same weights, decoded once (`product_weight`), takes 2.6 and 4.3 ms, so where it computes rows
    alone (`rows_computed_alone`) every product of the head uses it, prompt passes and decoding
    steps alike. One row goes through it as a pair: a lone row would take a matrix-vector kernel
    with another summation order, and its logits would then depend on whether it had neighbours.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    product_weight: PromptWeight | None
    """The decoded weights in bfloat16 for every product, or None (the int8 kernel)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("codes", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.product_weight = None  # not a buffer: derived from `codes`, so never saved or compared

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product with bfloat16 [rows, in_features] activations, no bias (hot loops use this)."""
        weight = self.product_weight
        if weight is None:
            return torch._weight_int8pack_mm(x, self.codes, self.scales)
        if x.shape[0] == 1:  # as a pair: the GEMM's own kernel, so the row gets the bits it gets in any batch
            return weight.product(x.expand(2, -1).contiguous())[:1]
        return weight.product(x)

    def decoded(self) -> torch.Tensor:
        """The weights as the int8 kernel decodes them, rounded to bfloat16, [out, in]."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.codes.device)
        return torch._weight_int8pack_mm(eye, self.codes, self.scales).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous())
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class PromptWeight:
    """A layer's decoded weights in bfloat16 [out, in], for the GEMMs of prompt passes.

    Kept in oneDNN's own blocked layout where PyTorch has it: a plain GEMM re-blocks its weight on
    every call, which for a prompt pass of a few dozen rows costs as much as the arithmetic (15
    rows through a 576 x 1536 layer: 125 us prepacked, 187 us plain, the same bits).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = _prepacked(weight)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, in] bfloat16 activations times the weights: [rows, out]."""
        if self.weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return torch.matmul(x, self.weight.t())

    def dense(self) -> torch.Tensor:
        """The weights as a plain tensor, [out, in]."""
        return self.weight.to_dense() if self.weight.is_mkldnn else self.weight

    def __deepcopy__(self, memo: dict[int, Any]) -> PromptWeight:
        return PromptWeight(self.dense().clone())  # a prepacked tensor has no storage to copy


def _prepacked(weight: torch.Tensor) -> torch.Tensor:
    if weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight, None)
        except (AttributeError, NotImplementedError, RuntimeError):
            pass  # a PyTorch without oneDNN's linear ops: the plain GEMM
    return weight


def rows_computed_alone(in_features: int, out_features: int) -> bool:
    """Whether the bfloat16 GEMM gives each row the same bits whatever rows share its product.

    oneDNN picks kernels and blockings by shape (and threads); where one of them splits the
    reduction differently for some row count, a prompt's numbers would move with its neighbours, so
    the layer keeps the 4-bit kernel for prompts too. Checked at this thread's thread count; the
    threads that run prompt passes later check their passes again (`prompt_passes.TemplateStart.exact`).
    """
    return _rows_computed_alone(in_features, out_features, torch.get_num_threads())


@functools.cache
def _rows_computed_alone(in_features: int, out_features: int, threads: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight = PromptWeight(torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16))
    x = torch.randn(max(_INVARIANCE_ROWS) + 7, in_features, generator=generator).to(torch.bfloat16)
    try:
        with torch.inference_mode():
            reference = weight.product(x)
            for rows in _INVARIANCE_ROWS:
                for offset in (0, 7):
                    if not torch.equal(weight.product(x[offset : offset + rows]), reference[offset : offset + rows]):
                        return False
    except (NotImplementedError, RuntimeError):  # a build whose GEMM cannot take these: the 4-bit kernel
        return False
    return True


def keep_prompt_weights(model: Any, budget: int = PROMPT_WEIGHTS_BUDGET) -> int:
    """Give each 4-bit layer bfloat16 weights for prompt passes, and the int8 head bfloat16 weights for
    every product, where they fit `budget` and are exact.

    Returns how many layers got them. The 4-bit layers get them all or none, so that every prompt
    pass runs one kind of product; the head decides on its own, since it runs one kind everywhere.
    """
    layers = [module for module in model.modules() if isinstance(module, Int4Linear)]
    heads = [module for module in model.modules() if isinstance(module, Int8Linear)]
    size = sum(2 * layer.in_features * layer.out_features for layer in layers)
    shapes = {(layer.in_features, layer.out_features) for layer in layers}
    kept = 0
    with torch.no_grad():
        if layers and size <= budget and all(rows_computed_alone(*shape) for shape in shapes):
            for layer in layers:
                layer.prompt_weight = PromptWeight(layer.decoded())
            kept, budget = len(layers), budget - size
        for head in heads:
            head_size = 2 * head.in_features * head.out_features
            if head_size <= budget and rows_computed_alone(head.in_features, head.out_features):
                head.product_weight = PromptWeight(head.decoded())
                kept, budget = kept + 1, budget - head_size
    return kept


def _with_bfloat16_weights(model: Any) -> list[Int4Linear | Int8Linear]:
    return [
        module
        for module in model.modules()
        if (isinstance(module, Int4Linear) and module.prompt_weight is not None)
        or (isinstance(module, Int8Linear) and module.product_weight is not None)
    ]


def drop_prompt_weights(model: Any) -> int:
    """Send every product back to the 4-bit and int8 kernels; returns how many layers had bfloat16 weights."""
    layers = _with_bfloat16_weights(model)
    for module in layers:
        if isinstance(module, Int4Linear):
            module.prompt_weight = None
        else:
            module.product_weight = None
    return len(layers)


def computed_alone_here(model: Any) -> bool:
    """Whether this thread's GEMMs compute rows alone for every layer that keeps bfloat16 weights.

    `keep_prompt_weights` checks at the loading thread's thread count; a server computes in a
    worker thread that may run another count (`prompt_passes.TemplateStart.exact` asks again there).
    """
    shapes = {(module.in_features, module.out_features) for module in _with_bfloat16_weights(model)}
    return all(rows_computed_alone(*shape) for shape in shapes)


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
    """Repack a float CPU causal LM in place: 4-bit decoder linears, int8 head, bfloat16 elsewhere,
    and bfloat16 prompt-pass weights where `keep_prompt_weights` allows.

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
    keep_prompt_weights(model)
    return swapped
