"""Category steering vectors: computing them from activations, judging each layer, saving them.

A category vector at layer l points from the category's harmful prompts toward safe prompts:
`v[l] = mean(safe[l]) - mean(harmful[l])` (docs/method.md, step 1). Its length is kept, so strength
1.0 moves a typical harmful activation by the whole harmful-to-safe distance at that layer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load, save

from .activations import TOKENS, Token
from .architectures import SITES, Site
from .errors import SafeSteerError
from .gates import DEFAULT_FPR, GATE_RECIPES, Gate, GateRecipe, check_fpr, train_gate
from .identity import ModelIdentity
from .methods.answers import AnswerSets, AnswerSource, Target, check_source, check_target
from .methods.prompt import VECTOR_METHODS, VectorMethod, mean_difference

Method = Literal["answers", "mean-diff", "pruned", "guided"]
METHODS: tuple[Method, ...] = ("answers", "mean-diff", "pruned", "guided")
PROMPT_METHODS = ("mean-diff", "pruned", "guided")  # vectors read at the request rather than the answer
MIN_PROMPTS_PER_SIDE = 4
FORMAT_VERSION = 1
GATED_FORMAT_VERSION = 2  # written when a gate rides along; older readers refuse it instead of dropping the gate


@dataclass(frozen=True)
class ExtractionSettings:
    """How vectors were made; stored with them so a result can be reproduced and compared."""

    site: Site = "residual"
    token: Token = "last"
    method: Method = (
        "answers"  # answer vectors (methods/answers.py): measured to buy safety where prompt vectors buy none
    )
    prune_fraction: float = 0.5  # share of harmful examples kept by `pruned`
    heldout_fraction: float = 0.25  # share of each side kept out to score the layers
    seed: int = 0
    batch_size: int = 0  # prompts per forward pass; 0 picks by device (activations.default_batch_size)
    gate: bool = True  # also train the category's gate (gates.py) from the same activations
    gate_fpr: float = DEFAULT_FPR  # the gate's false-positive rate on held-out safe prompts
    gate_recipe: GateRecipe = "policy"  # "policy": admit any category of the policy, route; "category": the older gate
    target: Target = "refuse"  # answers: the behaviour steered toward ("refuse" or "redirect")
    answer_source: AnswerSource = "self-contrast"  # answers: where the model's answers come from
    answer_prompts: int = 48  # answers: how many of the harmful prompts the model answers
    answer_tokens: int = 40  # answers: new tokens per answer

    def validate(self) -> None:
        if self.site not in SITES:
            raise SafeSteerError(f"unknown site '{self.site}': use one of {', '.join(SITES)}")
        if self.token not in TOKENS:
            raise SafeSteerError(f"unknown token choice '{self.token}': use one of {', '.join(TOKENS)}")
        if self.method not in METHODS:
            raise SafeSteerError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if not 0.0 < self.prune_fraction <= 1.0:
            raise SafeSteerError("the pruning fraction must be in (0, 1]")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise SafeSteerError("the held-out fraction must be in (0, 1)")
        if self.batch_size < 0:
            raise SafeSteerError("the batch size must be at least 1 (or 0 to pick one for the device)")
        check_fpr(self.gate_fpr)
        check_target(self.target)
        check_source(self.answer_source)
        if not MIN_PROMPTS_PER_SIDE <= self.answer_prompts <= 1000:
            raise SafeSteerError(f"the model answers between {MIN_PROMPTS_PER_SIDE} and 1000 prompts")
        if not 8 <= self.answer_tokens <= 256:
            raise SafeSteerError("answers for vectors are 8 to 256 tokens long")
        if self.gate_recipe not in GATE_RECIPES:
            raise SafeSteerError(f"unknown gate recipe '{self.gate_recipe}': use one of {', '.join(GATE_RECIPES)}")


@dataclass(frozen=True)
class LayerStats:
    """How well one layer's vector separates held-out harmful from safe prompts."""

    layer: int
    auroc: float  # chance the projection ranks a held-out safe prompt above a harmful one
    effect_size: float  # gap between the two projection means in pooled standard deviations
    norm: float  # length of the final vector at this layer


# --- vector methods live in `methods/`: prompt (mean-diff, pruned), guided, answers -------------------------


# --- layer statistics ----------------------------------------------------------------------


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve per column (Mann-Whitney U with ties counted half).

    positive `[p, L]`, negative `[n, L]` -> `[L]`.
    """
    greater = (positive.unsqueeze(1) > negative.unsqueeze(0)).float().mean((0, 1))
    ties = (positive.unsqueeze(1) == negative.unsqueeze(0)).float().mean((0, 1))
    return greater + 0.5 * ties


def effect_size(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Cohen's d per column, `[L]`."""
    pooled = torch.sqrt((positive.var(0, unbiased=False) + negative.var(0, unbiased=False)) / 2).clamp(min=1e-12)
    return (positive.mean(0) - negative.mean(0)) / pooled


def project(activations: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Scalar projection of `[n, L, d]` activations on unit `[L, d]` directions -> `[n, L]`."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (activations * unit).sum(-1)


def recommend_layer(stats: list[LayerStats]) -> tuple[int, str]:
    """Pick the layer to steer at, and say why.

    Late layers often separate best, yet the papers find middle layers steer best while early
    and late ones break fluency. So: the best AUROC within the middle band (25%-65% of depth);
    among layers within 0.01 of it, the largest effect size.
    """
    n = len(stats)
    band = [s for s in stats if 0.25 * (n - 1) <= s.layer <= 0.65 * (n - 1)] or stats
    best = max(s.auroc for s in band)
    contenders = [s for s in band if s.auroc >= best - 0.01]
    chosen = max(contenders, key=lambda s: (s.effect_size, -abs(s.layer - (n - 1) / 2)))
    reason = (
        f"layer {chosen.layer}: best held-out separation (AUROC {chosen.auroc:.3f}) among the middle layers "
        f"{band[0].layer}-{band[-1].layer}, largest effect size ({chosen.effect_size:.2f}) among near-ties"
    )
    return chosen.layer, reason


ANSWER_LAYER_DEPTH = 0.35
"""Where answer vectors steer, as a share of the model's depth: the recommendation rule's choice on set A of
docs/steering-quality.md with gating on (layer 10 of the embedded model's 30), confirmed on set B."""


def recommend_answer_layer(stats: list[LayerStats]) -> tuple[int, str]:
    """Answer vectors separate their two sides at nearly every layer, so separation cannot pick one:
    the measured depth does (a share of depth, so it carries to deeper models)."""
    layer = round(ANSWER_LAYER_DEPTH * (len(stats) - 1))
    return layer, (
        f"layer {layer}: {ANSWER_LAYER_DEPTH:.0%} of the model's depth, where answer vectors were measured to "
        f"make answers safer without breaking them (held-out separation there: AUROC {stats[layer].auroc:.3f})"
    )


def _split(n: int, heldout_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    indices = list(range(n))
    rng.shuffle(indices)
    n_heldout = min(n - 2, max(1, round(n * heldout_fraction)))
    return indices[n_heldout:], indices[:n_heldout]


def layer_statistics(
    harmful: torch.Tensor, safe: torch.Tensor, final: torch.Tensor, settings: ExtractionSettings, method: VectorMethod
) -> list[LayerStats]:
    """Score every layer on held-out prompts with a vector computed without them."""
    rng = random.Random(settings.seed)
    harmful_train, harmful_test = _split(harmful.shape[0], settings.heldout_fraction, rng)
    safe_train, safe_test = _split(safe.shape[0], settings.heldout_fraction, rng)
    trained = method(harmful[harmful_train], safe[safe_train], settings)
    safe_scores = project(safe[safe_test], trained)
    harmful_scores = project(harmful[harmful_test], trained)
    areas = auroc(safe_scores, harmful_scores)
    sizes = effect_size(safe_scores, harmful_scores)
    norms = final.norm(dim=-1)
    return [
        LayerStats(layer=i, auroc=float(areas[i]), effect_size=float(sizes[i]), norm=float(norms[i]))
        for i in range(final.shape[0])
    ]


# --- the result object ---------------------------------------------------------------------


@dataclass
class CategoryVectors:
    """Vectors for one harm category at every layer, with how they were made and how good they are."""

    category: str
    vectors: torch.Tensor  # [n_layers, hidden], float32
    layer_stats: list[LayerStats]
    recommended_layer: int
    recommendation: str
    settings: ExtractionSettings
    model: ModelIdentity
    n_harmful: int
    n_safe: int
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    gate: Gate | None = None  # which prompts these vectors steer (None: every prompt, the papers' way)
    safe_projection: torch.Tensor | None = None  # [n_layers]: mean projection of safe prompts on each unit vector
    answers: AnswerSets | None = None  # the model's answers the vectors were made from (method "answers")

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    def vector(self, layer: int) -> torch.Tensor:
        if not 0 <= layer < self.n_layers:
            raise SafeSteerError(f"layer {layer} is out of range: these vectors have layers 0..{self.n_layers - 1}")
        return self.vectors[layer]

    @property
    def mode(self) -> str:
        """ "gated" when a gate decides which prompts are steered, else "always"."""
        return self.gate.mode if self.gate is not None else "always"

    def with_gate(self, gate: Gate | None) -> CategoryVectors:
        """The same vectors with another gate (a moved threshold, another mode, or none)."""
        return replace(self, gate=gate)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as plain JSON-able data."""
        data = {
            "format_version": GATED_FORMAT_VERSION if self.gate is not None else FORMAT_VERSION,
            "category": self.category,
            "recommended_layer": self.recommended_layer,
            "recommendation": self.recommendation,
            "settings": asdict(self.settings),
            "model": self.model.to_dict(),
            "n_harmful": self.n_harmful,
            "n_safe": self.n_safe,
            "created_at": self.created_at,
            "layer_stats": [asdict(s) for s in self.layer_stats],
        }
        if self.gate is not None:
            data["gate"] = self.gate.metadata()
        if self.answers is not None:
            data["answers"] = self.answers.to_dict()
        return data

    def tensors(self) -> dict[str, torch.Tensor]:
        """The vectors and, with a gate, its parameters, under the names `to_bytes` and bundles use."""
        tensors = {"vectors": self.vectors.contiguous()}
        if self.safe_projection is not None:
            tensors["safe_projection"] = self.safe_projection.contiguous()
        if self.gate is not None:
            tensors |= {f"gate.{name}": t for name, t in self.gate.to_tensors().items()}
        return tensors

    def summary(self) -> dict[str, Any]:
        """A compact description for people and scripts (the CLI prints this)."""
        data = self.metadata()
        data["layers"] = data.pop("layer_stats")
        data["gate"] = self.gate.summary() if self.gate is not None else None
        if self.answers is not None:
            data["answers"] = self.answers.describe()
        return data

    def to_bytes(self) -> bytes:
        """One safetensors blob; the metadata rides in its header as JSON (no pickle anywhere)."""
        return save(self.tensors(), metadata={"safesteer": json.dumps(self.metadata())})

    def sha256(self) -> str:
        """Identity of these exact vectors and metadata (used to match evaluations and stored copies)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "data") -> CategoryVectors:
        try:
            header_length = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_length])
            metadata = json.loads(header["__metadata__"]["safesteer"])
            tensors = load(data)
            vectors = tensors.pop("vectors")
        except Exception as exc:
            raise SafeSteerError(f"{source} is not a SafeSteer vectors file ({type(exc).__name__})") from exc
        return cls.from_parts(vectors, metadata, tensors, source)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def from_parts(
        cls,
        vectors: torch.Tensor,
        metadata: dict[str, Any],
        tensors: dict[str, torch.Tensor] | None = None,
        source: str = "data",
    ) -> CategoryVectors:
        """Vectors from their tensor and metadata; `tensors` holds the gate's (`gate.*`) and the safe side's projection.

        Vectors saved before `safe_projection` existed load without it: they steer as before, and
        only the clamped operation, which needs it, asks for a new extraction.
        """
        if int(metadata.get("format_version", 0)) > GATED_FORMAT_VERSION:
            raise SafeSteerError("these vectors were written by a newer SafeSteer; upgrade to read them")
        settings = ExtractionSettings(**metadata["settings"])
        settings.validate()
        model = ModelIdentity.from_dict(metadata["model"])
        if vectors.ndim != 2 or tuple(vectors.shape) != (model.n_layers, model.hidden_size):
            raise SafeSteerError(
                f"vector shape {tuple(vectors.shape)} does not match the model they claim ({model.describe()})"
            )
        return cls(
            category=str(metadata["category"]),
            vectors=vectors.float(),
            layer_stats=[LayerStats(**s) for s in metadata["layer_stats"]],
            recommended_layer=int(metadata["recommended_layer"]),
            recommendation=str(metadata.get("recommendation", "")),
            settings=settings,
            model=model,
            n_harmful=int(metadata["n_harmful"]),
            n_safe=int(metadata["n_safe"]),
            created_at=str(metadata.get("created_at", "")),
            gate=_gate_from_parts(metadata, tensors or {}, model, source),
            safe_projection=_safe_projection(tensors or {}, model, source),
            answers=AnswerSets.from_dict(metadata["answers"]) if metadata.get("answers") is not None else None,
        )

    @classmethod
    def load(cls, path: str | Path) -> CategoryVectors:
        path = Path(path)
        if not path.is_file():
            raise SafeSteerError(f"no vectors file at {path}")
        return cls.from_bytes(path.read_bytes(), str(path))


def _safe_projection(tensors: dict[str, torch.Tensor], model: ModelIdentity, source: str) -> torch.Tensor | None:
    projection = tensors.get("safe_projection")
    if projection is None:
        return None
    if tuple(projection.shape) != (model.n_layers,) or not torch.isfinite(projection).all():
        raise SafeSteerError(f"{source}: the safe-side projections do not fit the model ({model.describe()})")
    return projection.float()


def safe_projections(safe: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Where the safe side lies along each layer's unit vector: mean projection of `[m, L, d]` safe activations."""
    return project(safe, vectors).mean(0)


def _gate_from_parts(
    metadata: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity, source: str
) -> Gate | None:
    if metadata.get("gate") is None:
        return None  # vectors from before gates, or made without one: they steer every prompt
    parts = {name.removeprefix("gate."): t for name, t in tensors.items() if name.startswith("gate.")}
    gate = Gate.from_parts(parts, metadata["gate"], source)
    if gate.hidden_size != model.hidden_size or gate.layer >= model.n_layers:
        raise SafeSteerError(f"{source}: the gate does not fit the model its vectors claim ({model.describe()})")
    return gate


def check_prompt_counts(harmful: list[str], safe: list[str]) -> None:
    for side, prompts in (("harmful", harmful), ("safe", safe)):
        if len(prompts) < MIN_PROMPTS_PER_SIDE:
            raise SafeSteerError(
                f"need at least {MIN_PROMPTS_PER_SIDE} {side} prompts to extract a vector, got {len(prompts)}"
            )


def vectors_from_activations(
    harmful: torch.Tensor,
    safe: torch.Tensor,
    settings: ExtractionSettings,
    model: ModelIdentity,
    category: str = "category",
    method: VectorMethod | None = None,
    others: torch.Tensor | None = None,
    gate_activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    gate_precision: str = "",
    gate: Gate | None = None,
    answers: AnswerSets | None = None,
) -> CategoryVectors:
    """Turn recorded activations into scored vectors and, unless settings say not, the category's gate.

    `others`: activations of the policy's other categories' harmful prompts, which the gate
    learns to leave alone. `gate_activations` (harmful, safe, others), when the gate must be
    trained on another model's activations than the vectors (see `extract_vectors`). This is the
    step after recording, and the seam for `guided`. A `gate` trained elsewhere (the policy
    recipe's, from its own recordings) is used as it is.
    """
    method = method or VECTOR_METHODS.get(settings.method, mean_difference)
    final = method(harmful, safe, settings).float()
    stats = layer_statistics(harmful, safe, final, settings, method)
    layer, reason = recommend_answer_layer(stats) if settings.method == "answers" else recommend_layer(stats)
    if gate is None and settings.gate:
        g_harmful, g_safe, g_others = gate_activations or (harmful, safe, others)
        gate = train_gate(
            g_harmful,
            g_safe,
            g_others,
            site=settings.site,
            token=settings.token,
            target_fpr=settings.gate_fpr,
            precision=gate_precision or model.precision,
        )
    return CategoryVectors(
        category=category,
        vectors=final,
        layer_stats=stats,
        recommended_layer=layer,
        recommendation=reason,
        settings=settings,
        model=model,
        n_harmful=int(harmful.shape[0]),
        n_safe=int(safe.shape[0]),
        gate=gate,
        safe_projection=safe_projections(safe.float(), final),
        answers=answers,
    )
