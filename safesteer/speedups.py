"""CPU decode speed-ups applied to models this package loads itself.

Profiling generation of the embedded model on a 2-core CPU showed the float32 LM head (a
49152 x 576 projection, tied to the embeddings) taking a third of every decode step, and more
than twice as long for a batch of two rows as for one: PyTorch's `x @ W.T` path for a few rows
is slow there. Computing `W @ x.T` with at least two columns instead runs the same product
3-6x faster for one or two rows, which is what previews (naive + steered) need. The weights are
shared, not copied, so tying and memory stay as they were.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ColumnHead(nn.Linear):
    """An `nn.Linear` computed as `(W @ x.T).T`, padding a single row to two."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if rows == 1:
            flat = torch.cat([flat, flat])
        out = (self.weight @ flat.T).T[:rows]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def use_column_head(model: Any) -> bool:
    """Swap a CPU float32 `nn.Linear` LM head for `ColumnHead`; True when swapped."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return False
    swapped = ColumnHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    swapped.weight = head.weight  # the same Parameter: still tied to the input embeddings
    swapped.bias = head.bias
    model.set_output_embeddings(swapped)
    return True
