"""Text features for gates and their baselines: TF-IDF word n-grams and sentence embeddings.

A gate that reads the model's activations has to beat what a team could train on the same
examples in five minutes, so the same training and calibration code runs over these features too
(`bench/gate_study.py`, and the extraction step's comparison shown to authors).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_WORD = re.compile(r"[a-z0-9']+")


def _grams(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


def tfidf_vocabulary(texts: Sequence[str], min_count: int = 2, limit: int = 20_000) -> dict[str, float]:
    """Word 1-2-grams seen in at least `min_count` texts, each with its smoothed inverse document frequency."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(set(_grams(text)))
    kept = [g for g, c in counts.most_common(limit) if c >= min_count]
    n = len(texts)
    return {g: math.log((1 + n) / (1 + counts[g])) + 1.0 for g in sorted(kept)}


def tfidf_features(texts: Sequence[str], vocabulary: dict[str, float]) -> torch.Tensor:
    """Unit-length TF-IDF vectors `[n, vocabulary]` (unknown words ignored)."""
    index = {g: i for i, g in enumerate(vocabulary)}
    idf = torch.tensor(list(vocabulary.values()), dtype=torch.float32)
    out = torch.zeros(len(texts), len(vocabulary))
    for row, text in enumerate(texts):
        for gram, count in Counter(_grams(text)).items():
            column = index.get(gram)
            if column is not None:
                out[row, column] = count
    out *= idf
    return torch.nn.functional.normalize(out, dim=-1)


@dataclass(frozen=True)
class BaselineRates:
    """How a plain text classifier does on the same held-out prompts as a gate: what the gate adds."""

    name: str
    catch_rate: float
    false_positive_rate: float
    n_harmful: int
    n_safe: int


BASELINE_PENALTIES = {"word counts (TF-IDF)": 1.0, "sentence embeddings (MiniLM)": 0.1}
"""Each baseline's L2 penalty, as chosen on calibration prompts in bench/gate_study.py."""


def baseline_rates(
    harmful: Sequence[str], safe: Sequence[str], others: Sequence[str] = (), *, seed: int = 0, fpr: float = 0.05
) -> list[BaselineRates]:
    """TF-IDF and MiniLM classifiers on a policy gate's own splits (`gates.train_policy_gate`, same seed).

    Fit on the split's training prompts (the policy's harmful prompts against the safe ones, plain
    text), thresholds on its calibration safe prompts at `fpr`, measured on its held-out prompts:
    the figures an author can put beside the gate's.
    """
    from .extraction import canonical_safe, policy_pool
    from .gates import fit_two_sides, policy_splits, threshold_for
    from .metrics import embed

    pool, safe_prompts = policy_pool(harmful, others), canonical_safe(safe)
    pool_split, safe_split = policy_splits(len(pool), len(safe_prompts), seed)
    mine = set(harmful)
    positives = [pool[i] for i in pool_split[0]]
    negatives = [safe_prompts[i] for i in safe_split[0]]
    held_harmful = [pool[i] for i in pool_split[2] if pool[i] in mine]
    held_safe = [safe_prompts[i] for i in safe_split[2]]
    calibration_safe = [safe_prompts[i] for i in safe_split[1]]
    vocabulary = tfidf_vocabulary(positives + negatives)
    readers = {
        "word counts (TF-IDF)": lambda texts: tfidf_features(texts, vocabulary),
        "sentence embeddings (MiniLM)": lambda texts: embed(texts) if texts else torch.zeros(0, 384),
    }
    results = []
    for name, features in readers.items():
        sides = (features(positives)[:, None, :], features(negatives)[:, None, :])
        center, scale, w, b = fit_two_sides(*sides, BASELINE_PENALTIES[name])

        def scores(texts: list[str], f=features, c=center, s=scale, w=w, b=b) -> list[float]:
            return ((((f(texts) - c[0]) / s[0]) @ w[0]) + b[0]).tolist()

        threshold = threshold_for(scores(calibration_safe), fpr)

        def rate(texts: list[str], t: float = threshold) -> float:
            values = scores(texts)
            return sum(v >= t for v in values) / len(values) if values else 0.0

        results.append(BaselineRates(name, rate(held_harmful), rate(held_safe), len(held_harmful), len(held_safe)))
    return results
