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
