"""What a vector was computed on, and whether it may be applied to another model.

These value types travel with vectors, policies, bundles and the store, which need them
without loading any model, so they live apart from the loading code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import SafeSteerError


@dataclass(frozen=True)
class ModelIdentity:
    """What a vector was computed on; travels with vectors, policies and bundles."""

    model_id: str
    revision: str | None
    precision: str
    model_type: str
    n_layers: int
    hidden_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(
            model_id=str(data["model_id"]),
            revision=data.get("revision"),
            precision=str(data.get("precision", "unknown")),
            model_type=str(data.get("model_type", "unknown")),
            n_layers=int(data["n_layers"]),
            hidden_size=int(data["hidden_size"]),
        )

    def describe(self) -> str:
        return f"{self.model_id} ({self.model_type}, {self.n_layers} layers, hidden size {self.hidden_size})"


def check_compatible(vectors_model: ModelIdentity, target: ModelIdentity) -> None:
    """Refuse vectors whose shape cannot fit the target model; a different id alone is allowed.

    A fine-tune or another quantization of the same base keeps the shapes and often the
    directions, so only a shape mismatch is an error.
    """
    if (vectors_model.hidden_size, vectors_model.n_layers) != (target.hidden_size, target.n_layers):
        raise SafeSteerError(
            f"these vectors were made for {vectors_model.describe()} and cannot be applied to {target.describe()}"
        )


def check_made_for(made_for: ModelIdentity, target: ModelIdentity, *, allow_other_model: bool = False) -> None:
    """Refuse vectors made for another model, even one of the same shape, unless explicitly allowed.

    Directions found in one model's activations mean nothing in another model's, and a bundle
    naming a model id must never lead to that id being loaded (or downloaded) unasked.
    """
    check_compatible(made_for, target)
    if allow_other_model:
        return
    if (made_for.model_id, made_for.model_type) != (target.model_id, target.model_type):
        raise SafeSteerError(
            f"these vectors were made for {made_for.describe()}, not for {target.describe()}; "
            "import them for this model only on purpose, with --allow-other-model (it is recorded in the history)"
        )
