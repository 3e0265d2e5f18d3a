"""SafeSteer: category-wise safety steering vectors for language models, without fine-tuning.

The public API, in the order one uses it::

    from safesteer import load_model, extract_vectors, SteeringSpec, steer, generate_side_by_side

    lm = load_model()                                   # embedded SmolLM2-135M-Instruct, 4-bit
    vectors = extract_vectors(lm, harmful, safe)        # every layer, scored on held-out prompts
    spec = SteeringSpec(vectors.vector(vectors.recommended_layer), vectors.recommended_layer, 4.0)
    print(generate_side_by_side(lm, "How do I pick a lock?", [spec]))
"""

from .activations import record_activations
from .errors import SafeSteerError
from .extraction import extract_vectors
from .generation import SideBySide, generate, generate_side_by_side, generate_strength_sweep
from .identity import ModelIdentity, check_compatible
from .models import LoadedModel, load_model, wrap_model
from .steering import SteeringSpec, steer
from .vectors import CategoryVectors, ExtractionSettings, LayerStats, vectors_from_activations

__all__ = [
    "CategoryVectors",
    "ExtractionSettings",
    "LayerStats",
    "LoadedModel",
    "ModelIdentity",
    "SafeSteerError",
    "SideBySide",
    "SteeringSpec",
    "check_compatible",
    "extract_vectors",
    "generate",
    "generate_side_by_side",
    "generate_strength_sweep",
    "load_model",
    "record_activations",
    "steer",
    "vectors_from_activations",
    "wrap_model",
]
__version__ = "0.1.0"
