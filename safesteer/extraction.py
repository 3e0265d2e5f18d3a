"""Extraction: record what a category's vectors and gate learn from, with the right model, and make them.

Prompt vectors (mean-diff, pruned) record the category's prompts; answer vectors have the model answer
them first (`methods.answers`). Either way the category's gate is trained by its recipe, on the model
that will read it (`gate_lm`), and rides along with the vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .activations import Token, record_activations
from .datasets import edgy_benign_prompts, framed
from .errors import SafeSteerError
from .gates import Gate, train_gate, train_policy_gate, with_router
from .methods.prompt import guided_needs_labels
from .models import LoadedModel
from .progress import ProgressCallback, labelled, no_progress, scaled
from .recordings import cached_recording, is_cached
from .vectors import (
    MIN_PROMPTS_PER_SIDE,
    CategoryVectors,
    ExtractionSettings,
    check_prompt_counts,
    vectors_from_activations,
)

SET_LABELS = ("harmful prompts", "safe prompts", "other categories' prompts")
"""What a category's sets are, in their usual order: its own two sides, then its policy's other categories."""
GATE_SET_LABELS = (
    "the policy's harmful prompts",
    "the policy's harmful prompts, dressed up",
    "safe prompts",
    "safe prompts, dressed up",
    "edgy everyday prompts",
)
"""A policy gate's sets (`PolicyGateSets.record`), in order."""


def _record_sets(
    lm: LoadedModel,
    sets: Sequence[Sequence[str]],
    settings: ExtractionSettings,
    progress: ProgressCallback | None,
    span: tuple[float, float],
    token: Token | None = None,
    shared: Sequence[bool] = (),
    labels: Sequence[str] = SET_LABELS,
) -> list[torch.Tensor]:
    """Each prompt set's activations, progress spread over `span` in proportion to the prompts.

    Sets marked `shared` are the same for many extractions on this model: they come from, and go
    to, the recording cache (`recordings`). Each set's progress lines say which set it is (`labels`),
    since every set counts its prompts from zero again.
    """
    shared = [index < len(shared) and shared[index] for index in range(len(sets))]
    token = token or settings.token
    # a set found in the cache costs nothing, so the progress bar gives it no room
    costs = [
        0
        if cached and is_cached(lm, prompts, site=settings.site, token=token, batch_size=settings.batch_size)
        else len(prompts)
        for prompts, cached in zip(sets, shared, strict=True)
    ]
    total = sum(costs) or 1
    start, width = span
    recorded: list[torch.Tensor] = []
    done = 0
    for index, (prompts, cached, cost) in enumerate(zip(sets, shared, costs, strict=True)):
        part = labelled(
            scaled(progress, start + width * done / total, start + width * (done + cost) / total),
            labels[index] if index < len(labels) else "",
        )
        record = cached_recording if cached else record_activations
        recorded.append(
            record(
                lm,
                list(prompts),
                progress=part,
                site=settings.site,
                token=token,
                batch_size=settings.batch_size,
            )
        )
        done += cost
    return recorded


def distinct_others(harmful: Sequence[str], safe: Sequence[str], others: Sequence[str]) -> list[str]:
    """The other categories' prompts a gate learns from: each once, none of this category's own."""
    own = set(harmful) | set(safe)
    return [p for p in dict.fromkeys(others) if p not in own]


def policy_pool(harmful: Sequence[str], others: Sequence[str]) -> list[str]:
    """Every harmful prompt of a policy once, in one order whichever category is asking: they share a gate."""
    return sorted(set(harmful) | set(others))


def canonical_safe(safe: Sequence[str]) -> list[str]:
    """A category's safe prompts once each, in one order: categories with the same safe prompts share a gate."""
    return sorted(set(safe))


@dataclass
class PolicyGateSets:
    """What a policy's gates learn from, recorded once by the model that reads them (token: mean).

    Every category of the policy trains its gate from the same recordings, so all of them admit the
    same requests; only the routing centroid differs (`gates.train_policy_gate`).
    """

    pool: list[str]
    safe: list[str]
    activations: dict[str, torch.Tensor]
    precision: str

    @classmethod
    def record(
        cls,
        gate_lm: LoadedModel,
        harmful: Sequence[str],
        safe: Sequence[str],
        settings: ExtractionSettings,
        progress: ProgressCallback | None = None,
        span: tuple[float, float] = (0.0, 1.0),
    ) -> PolicyGateSets:
        """`harmful`: every harmful prompt of the policy. Each is read plain and in one training framing."""
        names = ("pool", "safe", "framed_pool", "framed_safe", "edgy")
        sets = [*pool_sets(harmful, (), settings), *negative_sets(safe, settings)]
        pool = sets[0]
        # every set goes through the recording cache: the negatives are shared by every category, and a
        # policy's pool by its categories and by each new extraction of the same prompts (a built-in
        # category's is recorded at start-up: `warm_policy_pool`)
        recorded = _record_sets(
            gate_lm, sets, settings, progress, span, token="mean", shared=(True,) * 5, labels=GATE_SET_LABELS
        )
        by_name = dict(zip(("pool", "framed_pool", "safe", "framed_safe", "edgy"), recorded, strict=True))
        return cls(pool, canonical_safe(safe), {name: by_name[name] for name in names}, gate_lm.identity.precision)

    def gate_for(self, own: Sequence[str], settings: ExtractionSettings) -> Gate:
        mine = set(own)
        a = self.activations
        return train_policy_gate(
            a["pool"],
            torch.tensor([p in mine for p in self.pool]),
            a["safe"],
            a["framed_pool"],
            a["framed_safe"],
            a["edgy"],
            site=settings.site,
            token="mean",
            target_fpr=settings.gate_fpr,
            seed=settings.seed,
            precision=self.precision,
        )


def negative_sets(safe: Sequence[str], settings: ExtractionSettings) -> list[list[str]]:
    """What a policy gate learns to let through: the safe prompts, plain and dressed up, and the edgy ones.

    The same for every category with these safe prompts, so they are recorded once per model.
    """
    safe_prompts = canonical_safe(safe)
    return [safe_prompts, framed(safe_prompts, settings.seed), edgy_benign_prompts(part="training")]


def warm_gate_negatives(gate_lm: LoadedModel, safe: Sequence[str], settings: ExtractionSettings) -> None:
    """Record a policy gate's negatives ahead of an extraction (at start-up), into the recording cache."""
    for prompts in negative_sets(safe, settings):
        cached_recording(gate_lm, prompts, site=settings.site, token="mean", batch_size=settings.batch_size)


def pool_sets(harmful: Sequence[str], others: Sequence[str], settings: ExtractionSettings) -> list[list[str]]:
    """What a policy gate learns to catch: every harmful prompt of the policy, plain and in a training framing."""
    pool = policy_pool(harmful, others)
    return [pool, framed(pool, settings.seed)]


def warm_policy_pool(gate_lm: LoadedModel, harmful: Sequence[str], settings: ExtractionSettings) -> None:
    """Record a one-category policy's pool ahead of its extraction (a built-in category, at start-up)."""
    for prompts in pool_sets(harmful, (), settings):
        cached_recording(gate_lm, prompts, site=settings.site, token="mean", batch_size=settings.batch_size)


def pool_ready(
    gate_lm: LoadedModel, harmful: Sequence[str], others: Sequence[str], settings: ExtractionSettings
) -> bool:
    """Whether an extraction will find its policy gate's pool already recorded."""
    return all(
        is_cached(gate_lm, prompts, site=settings.site, token="mean", batch_size=settings.batch_size)
        for prompts in pool_sets(harmful, others, settings)
    )


def gate_negatives_ready(gate_lm: LoadedModel, safe: Sequence[str], settings: ExtractionSettings) -> bool:
    """Whether an extraction with these safe prompts will find its gate's negatives already recorded."""
    return all(
        is_cached(gate_lm, prompts, site=settings.site, token="mean", batch_size=settings.batch_size)
        for prompts in negative_sets(safe, settings)
    )


def record_policy_gate(
    gate_lm: LoadedModel,
    harmful: Sequence[str],
    safe: Sequence[str],
    others: Sequence[str],
    settings: ExtractionSettings,
    progress: ProgressCallback | None = None,
    span: tuple[float, float] = (0.0, 1.0),
) -> Gate:
    """Record what the category's policy gate learns from, with the model that will read it, and train it."""
    sets = PolicyGateSets.record(gate_lm, [*harmful, *others], safe, settings, progress, span)
    return sets.gate_for(harmful, settings)


def refit_router(
    gate_lm: LoadedModel,
    gate: Gate,
    harmful: Sequence[str],
    safe: Sequence[str],
    others: Sequence[str],
    settings: ExtractionSettings,
    progress: ProgressCallback | None = None,
) -> Gate:
    """A category's policy gate with its router learnt again against `others`, the policy's other harmful prompts.

    Reads the pool its extraction would have recorded (`pool_sets`, through the recording cache:
    usually the very recording the newest category's extraction just made), with the model that
    reads the gate, so the router learns from exactly what it will be shown. `progress` hears about
    any of the pool that is not cached yet.
    """
    if gate.precision and gate.precision != gate_lm.identity.precision:
        raise SafeSteerError(
            f"this gate reads {gate.precision} activations; a router for it cannot learn from a "
            f"{gate_lm.identity.precision} model"
        )
    at_gate = replace(settings, site=gate.site)
    prompts = pool_sets(harmful, distinct_others(harmful, safe, others), at_gate)
    pool, framed_pool = _record_sets(
        gate_lm, prompts, at_gate, progress, (0.0, 1.0), token="mean", shared=(True, True), labels=GATE_SET_LABELS[:2]
    )
    mine = set(harmful)
    return with_router(gate, pool, framed_pool, torch.tensor([p in mine for p in prompts[0]]), at_gate.seed)


def extract_vectors(
    lm: LoadedModel,
    harmful: list[str],
    safe: list[str],
    settings: ExtractionSettings | None = None,
    category: str = "category",
    progress: ProgressCallback | None = None,
    others: Sequence[str] = (),
    gate_lm: LoadedModel | None = None,
) -> CategoryVectors:
    """Record the prompt sets at every layer and compute the category's vectors and gate.

    `others`: the harmful prompts of the policy's other categories, recorded in the same run so
    the gate learns to tell this category from them. `gate_lm`: the model that will read the gate,
    when it is not `lm` (on a CPU the app and `generate` answer with int4 weights while vectors are
    extracted with NF4). A gate is a probe of exact activations, so it is trained on the very model
    that reads it; vectors, being averages, carry over between precisions.
    """
    settings = settings or ExtractionSettings()
    settings.validate()
    if settings.method == "guided":
        guided_needs_labels(torch.empty(0), torch.empty(0), settings)
    check_prompt_counts(harmful, safe)
    others = distinct_others(harmful, safe, others) if settings.gate else []
    if settings.method == "answers":
        return extract_answer_vectors(lm, harmful, safe, settings, category, progress, others, gate_lm)
    policy_gate = settings.gate and settings.gate_recipe == "policy"
    if policy_gate:  # the gate reads its own sets; vectors need only the category's prompts
        recorded = _record_sets(lm, [harmful, safe], settings, progress, (0.0, 0.5))
        if progress:
            names = f" and the policy's other categories ({len(others)} prompts)" if others else ""
            progress(0.5, f"recording for the gate: this category{names}, safe and edgy prompts, plain and dressed up")
        trained = record_policy_gate(gate_lm or lm, harmful, safe, others, settings, progress, (0.5, 0.42))
        result = vectors_from_activations(recorded[0], recorded[1], settings, lm.identity, category, gate=trained)
        if progress:
            progress(1.0, f"vectors ready; recommended layer {result.recommended_layer}; gate at layer {trained.layer}")
        return result
    sets: list[Sequence[str]] = [harmful, safe, *([others] if others else [])]
    separate_gate = settings.gate and gate_lm is not None and gate_lm is not lm
    recorded = _record_sets(lm, sets, settings, progress, (0.0, 0.7 if separate_gate else 0.9))
    gate_activations = None
    if separate_gate:
        assert gate_lm is not None
        if progress:
            progress(0.7, f"recording for the gate with the {gate_lm.identity.precision} model that will read it")
        for_gate = _record_sets(gate_lm, sets, settings, progress, (0.7, 0.2))
        gate_activations = (for_gate[0], for_gate[1], for_gate[2] if others else None)
    if progress and settings.gate:
        progress(0.92, "training the gate")
    result = vectors_from_activations(
        recorded[0],
        recorded[1],
        settings,
        lm.identity,
        category,
        others=recorded[2] if others else None,
        gate_activations=gate_activations,
        gate_precision=(gate_lm or lm).identity.precision,
    )
    if progress:
        gate = f"; gate at layer {result.gate.layer}" if result.gate is not None else ""
        progress(1.0, f"vectors ready; recommended layer {result.recommended_layer}{gate}")
    return result


def _train_gate_for(
    gate_lm: LoadedModel,
    harmful: list[str],
    safe: list[str],
    others: list[str],
    settings: ExtractionSettings,
    progress: ProgressCallback | None,
    span: tuple[float, float],
) -> Gate | None:
    """The category's gate by its recipe, recorded with the model that reads it."""
    if not settings.gate:
        return None
    if settings.gate_recipe == "policy":
        return record_policy_gate(gate_lm, harmful, safe, others, settings, progress, span)
    sets: list[Sequence[str]] = [harmful, safe, *([others] if others else [])]
    recorded = _record_sets(gate_lm, sets, settings, progress, span)
    return train_gate(
        recorded[0],
        recorded[1],
        recorded[2] if others else None,
        site=settings.site,
        token=settings.token,
        target_fpr=settings.gate_fpr,
        precision=gate_lm.identity.precision,
    )


def extract_answer_vectors(
    lm: LoadedModel,
    harmful: list[str],
    safe: list[str],
    settings: ExtractionSettings,
    category: str = "category",
    progress: ProgressCallback | None = None,
    others: Sequence[str] = (),
    gate_lm: LoadedModel | None = None,
) -> CategoryVectors:
    """Vectors from the model's own answers (`methods.answers`): the model answers, reads its answers, and the
    category's gate is trained as for any method.

    The model that answers previews (`gate_lm` when given: int4 on a CPU) writes and reads the
    answers: it is the fast copy, and averages carry over between precisions.
    """
    from .methods.answers import answer_sides, answering_prompts, judged_answers, self_contrast

    report = progress or no_progress
    writer = gate_lm or lm
    prompts = answering_prompts(harmful, settings.answer_prompts, settings.seed)
    what = "toward " + ("refusing" if settings.target == "refuse" else "a safe on-topic answer")
    report(0.0, f"the model answers {len(prompts)} of the category's prompts {what} and as plain compliance")
    make = self_contrast if settings.answer_source == "self-contrast" else judged_answers
    answers = make(writer, prompts, settings.target, settings.answer_tokens, scaled(report, 0.0, 0.55))
    if min(len(answers.safe), len(answers.unsafe)) < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(
            f"the judges found {len(answers.safe)} answers that {settings.target} and {len(answers.unsafe)} unsafe "
            f"ones among the model's {len(prompts)} answers; answer vectors need {MIN_PROMPTS_PER_SIDE} of each. "
            "Use the self-contrast source, which asks the model for both sides"
        )
    report(0.55, "reading the answers at every layer")
    unsafe, safe_side = answer_sides(writer, answers, settings.site)
    if settings.gate:
        names = f" and the policy's other categories ({len(others)} prompts)" if others else ""
        report(0.6, f"recording for the gate: this category{names}, safe and edgy prompts, plain and dressed up")
    gate = _train_gate_for(writer, harmful, safe, list(others), settings, progress, (0.6, 0.38))
    ungated = replace(settings, gate=False)  # the gate above learned from prompts; answers train no gate
    result = vectors_from_activations(unsafe, safe_side, ungated, lm.identity, category, gate=gate, answers=answers)
    result = replace(result, settings=settings, n_harmful=len(harmful), n_safe=len(safe))
    gate_text = f"; gate at layer {gate.layer}" if gate is not None else ""
    report(1.0, f"vectors ready; recommended layer {result.recommended_layer}{gate_text}")
    return result
