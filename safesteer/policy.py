"""A policy version as data: categories with their examples, vectors and operating point.

These objects cross every boundary (store, bundles, CLI, app), so they are plain dataclasses
with no database or UI attached.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SafeSteerError
from .gates import Gate
from .identity import ModelIdentity
from .limits import check_layer, check_strength
from .operations import ANSWER_DEFAULT, DEFAULT, SUGGESTED, SteeringOptions
from .steering import SteeringSpec
from .vectors import CategoryVectors

NAME_PATTERN = re.compile(r"^[\w][\w .\-]{0,99}$")
SIDES = ("harmful", "safe")


def check_name(kind: str, name: str) -> str:
    """Names appear in files, URLs and tables: letters, digits, spaces, '.', '_', '-'; at most 100."""
    name = name.strip()
    if not NAME_PATTERN.fullmatch(name):
        raise SafeSteerError(
            f"invalid {kind} name {name!r}: use 1-100 letters, digits, spaces, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return name


@dataclass
class PolicyCategory:
    """One harm category inside a policy, with the layer, strength and options it is applied with.

    A new category steers as `suggested_point` says for its vectors; one loaded from a store or bundle keeps the
    options it was saved with (`operations.LEGACY` when it was saved before options existed).
    """

    name: str
    harmful: list[str]
    safe: list[str]
    vectors: CategoryVectors
    layer: int
    strength: float
    description: str = ""
    options: SteeringOptions = SUGGESTED

    def __post_init__(self) -> None:
        self.name = check_name("category", self.name)
        if self.options is SUGGESTED:
            self.options = suggested_point(self.vectors).options
        self.layer = check_layer(self.layer, self.vectors.n_layers)
        self.strength = check_strength(self.strength)
        check_options(self.options, self.vectors)

    @property
    def gate(self) -> Gate | None:
        return self.vectors.gate

    @property
    def mode(self) -> str:
        """ "gated": steer only prompts the category's gate fires on; "always": every prompt (the papers' way)."""
        return self.vectors.mode

    def operating_point(self) -> dict[str, Any]:
        """Every setting that decides how this category steers (what `policy diff` compares)."""
        gate = self.gate
        return {
            **self.vectors.metadata()["settings"],
            "layer": self.layer,
            "strength": self.strength,
            **{f"steer_{k}": v for k, v in self.options.to_dict().items()},
            "mode": self.mode,
            "gate_layer": gate.layer if gate else None,
            "gate_threshold": round(gate.threshold, 6) if gate else None,
            "gate_fpr": gate.target_fpr if gate else None,
            "gate_routes_by": _routes_by(gate),
        }

    def steering_spec(
        self,
        strength: float | Sequence[float] | None = None,
        layer: int | None = None,
        options: SteeringOptions | None = None,
    ) -> SteeringSpec:
        """The category as applied: its vector at its layer, with its options (or those given) and its gate."""
        return category_spec(
            self.vectors,
            self.layer if layer is None else layer,
            self.strength if strength is None else strength,
            self.options if options is None else options,
        )


PROMPT_STRENGTH = 2.0
"""Prompt vectors' suggested strength (docs/steering-quality.md: layer 12, strength 2 for the embedded model)."""
ANSWER_STRENGTH = 1.0
"""Answer vectors' suggested strength: the recommendation rule's choice on set A with gating on, confirmed
on set B (docs/steering-quality.md). Answer vectors are long (safe and unsafe answers differ a lot), so 1
already moves far; stronger settings cut unsafe attempts further but degrade the everyday answers a gate
fires on by mistake."""


@dataclass(frozen=True)
class OperatingPoint:
    """Where a new category starts: the layer, strength and options suggested for its vectors."""

    layer: int
    strength: float
    options: SteeringOptions


def suggested_point(vectors: CategoryVectors) -> OperatingPoint:
    """The measured starting point for these vectors' method; the author's preview and evaluation refine it."""
    if vectors.settings.method == "answers":
        return OperatingPoint(vectors.recommended_layer, ANSWER_STRENGTH, ANSWER_DEFAULT)
    return OperatingPoint(vectors.recommended_layer, PROMPT_STRENGTH, DEFAULT)


def check_options(options: SteeringOptions, vectors: CategoryVectors) -> SteeringOptions:
    """Options these vectors can carry out: clamping needs the safe side's projections, spreading enough layers."""
    if options.how == "clamp" and vectors.safe_projection is None:
        raise SafeSteerError(
            "clamped steering needs where the safe side lies along the vectors, which these vectors (made before it "
            "was recorded) lack; extract them again or choose 'add' or 'norm'"
        )
    if options.spread > vectors.n_layers:
        raise SafeSteerError(f"cannot spread over {options.spread} layers: the model has {vectors.n_layers}")
    return options


def category_spec(
    vectors: CategoryVectors, layer: int, strength: float | Sequence[float], options: SteeringOptions
) -> SteeringSpec:
    """A category's vectors applied at `layer` with `options`: the one place a spec is made from vectors.

    With a spread, the spec carries the vectors of the adjacent layers that share the strength.
    """
    check_options(options, vectors)
    centre = vectors.vector(layer)  # checks the layer
    span = options.span(layer, vectors.n_layers)
    projection = vectors.safe_projection
    return SteeringSpec(
        vector=centre if options.spread == 1 else vectors.vectors[span.start : span.stop],
        layer=span.start,
        strength=strength,
        site=vectors.settings.site,
        gate=vectors.gate,
        where=options.where,
        how=options.how,
        safe_projection=None if projection is None else tuple(float(projection[i]) for i in span),
    )


def _routes_by(gate: Gate | None) -> str | None:
    """How a gate picks among its policy's categories that all admit a request (docs/gates.md)."""
    if gate is None or not gate.routed:
        return None
    return "centroid" if gate.route is None else "router"


@dataclass
class PolicyVersion:
    """A policy's categories as saved in one version (number 0 means: not saved yet)."""

    policy: str
    categories: list[PolicyCategory]
    number: int = 0
    author: str = ""
    created_at: str = ""
    note: str = ""
    description: str = ""
    evaluation: dict[str, Any] | None = None
    restored_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.policy = check_name("policy", self.policy)
        if not self.categories:
            raise SafeSteerError(f"policy {self.policy!r} needs at least one category")
        names = [c.name for c in self.categories]
        if len(set(names)) != len(names):
            raise SafeSteerError(f"policy {self.policy!r} has two categories with the same name")
        first = self.categories[0].vectors.model
        for category in self.categories[1:]:
            model = category.vectors.model
            if (model.n_layers, model.hidden_size) != (first.n_layers, first.hidden_size):
                raise SafeSteerError(
                    f"category {category.name!r} was made for {model.describe()}, the others for {first.describe()}"
                )

    @property
    def model(self) -> ModelIdentity:
        return self.categories[0].vectors.model

    def category(self, name: str) -> PolicyCategory:
        for category in self.categories:
            if category.name == name:
                return category
        raise SafeSteerError(f"policy {self.policy!r} has no category {name!r}")

    def steering_specs(self) -> list[SteeringSpec]:
        """All categories at their saved layer and strength (several vectors add up)."""
        return [c.steering_spec() for c in self.categories]

    def with_category(self, category: PolicyCategory) -> list[PolicyCategory]:
        """The categories with `category` added, or replacing the one of the same name."""
        kept = [c for c in self.categories if c.name != category.name]
        return (
            [*kept, category]
            if len(kept) == len(self.categories)
            else [category if c.name == category.name else c for c in self.categories]
        )


def cosine_by_layer(a: CategoryVectors, b: CategoryVectors) -> list[float]:
    """Cosine similarity of two categories' vectors at every layer."""
    if a.vectors.shape != b.vectors.shape:
        raise SafeSteerError("the two versions' vectors have different shapes and cannot be compared")
    return [float(x) for x in torch.nn.functional.cosine_similarity(a.vectors, b.vectors, dim=-1)]
