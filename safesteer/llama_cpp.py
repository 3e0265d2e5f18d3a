"""Export to llama.cpp's control-vector format (GGUF), for deployers who serve with llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import SafeSteerError
from .policy import PolicyVersion


def ungated_warning(version: PolicyVersion) -> str | None:
    """What changes when a gated policy runs as a control vector, or None when nothing does.

    A control vector is one fixed addition to every request: it cannot read a gate first.
    """
    gated = [c.name for c in version.categories if c.mode == "gated"]
    if not gated:
        return None
    names = ", ".join(repr(n) for n in gated)
    return (
        f"llama.cpp control vectors cannot gate: {names} steer only the requests their gate fires on here, "
        "but in llama.cpp they will steer every request, everyday ones included. "
        "Serve with SafeSteer (or apply the bundle in Python) to keep gating."
    )


def options_warning(version: PolicyVersion) -> str | None:
    """What changes when categories that steer otherwise than adding at every position become a control vector."""
    other = [
        f"{c.name!r} ({c.options.label()})"
        for c in version.categories
        if c.options.where != "all" or c.options.how != "add"
    ]
    if not other:
        return None
    return (
        f"llama.cpp control vectors only add at every position: {', '.join(other)} will be added to every position "
        "there, answer included, at the same strength, which loops more often (docs/steering-quality.md). "
        "Serve with SafeSteer (or apply the bundle in Python) to keep each category's steering."
    )


def export_warning(version: PolicyVersion) -> str | None:
    """Everything a control vector changes about this policy, or None when it runs as it does here."""
    warnings = [w for w in (ungated_warning(version), options_warning(version)) if w]
    return "\n".join(warnings) or None


def export_llama_cpp(version: PolicyVersion, path: str | Path) -> Path:
    """Write the policy as a llama.cpp control vector (GGUF), strengths baked in.

    llama.cpp adds `direction.{i}` to the output of decoder layer i, which is exactly this
    project's residual site; categories at the same layer add up, and a spread category adds its
    share at each of its layers. Attention-site vectors act inside a layer, which a control vector
    cannot express, and llama.cpp never applies a vector to layer 0; both are refused rather than
    exported wrong. Gates and steering only the prompt, only the answer, norm-preserving or
    clamped become plain additions at every position (`export_warning` says so before export).
    """
    import gguf  # only llama.cpp export needs it

    model = version.model
    directions: dict[int, torch.Tensor] = {}
    for c in version.categories:
        if c.vectors.settings.site != "residual":
            raise SafeSteerError(
                f"category {c.name!r} steers the attention output, which llama.cpp control vectors cannot express; "
                "extract it with site 'residual' to export"
            )
        spec = c.steering_spec()
        if spec.layer == 0:
            raise SafeSteerError(
                f"category {c.name!r} steers layer 0, which llama.cpp never applies; choose layer 1 or later"
            )
        vectors = spec.vector.reshape(len(spec.layers()), -1)
        for part, layer in enumerate(spec.layers()):  # a spread shares the strength evenly, as `steer` does
            share = c.strength / len(spec.layers())
            directions[layer] = directions.get(layer, torch.zeros(model.hidden_size)) + share * vectors[part]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="controlvector")
    writer.add_string("controlvector.model_hint", model.model_type)
    writer.add_uint32("controlvector.layer_count", model.n_layers)
    for layer in sorted(directions):
        writer.add_tensor(f"direction.{layer}", directions[layer].float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
