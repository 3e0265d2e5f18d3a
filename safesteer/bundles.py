"""Policy bundles: one zip a deployer can apply to their own model, and import back.

Contents: `manifest.json` (format, policy, version, model identity, per-category settings,
layer and strength, and the sha256 of every other file), `vectors.safetensors`,
`examples.csv`, `evaluation.json` when present, and a `README.md` policy card.

Bundles arrive from outside, so reading one trusts nothing: only the known file names (no
paths, so no traversal), size and count caps that hold even when the zip headers lie (zip
bombs), hashes checked before parsing, safetensors and JSON only (never pickle), and tensor
shapes checked against the model the manifest names. Nothing is written until all of it passed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from . import __version__
from .errors import SafeSteerError
from .evaluation import Evaluation
from .identity import ModelIdentity, check_compatible
from .models import LoadedModel, wrap_model
from .operations import LEGACY, SteeringOptions
from .policy import SIDES, PolicyCategory, PolicyVersion
from .reports import report_markdown
from .steering import steer
from .vectors import CategoryVectors

BUNDLE_FORMAT = "safesteer-policy-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: categories may carry a gate (`category.N.gate.*` tensors, "gate" in the manifest)
OPTIONS_FORMAT_VERSION = 3  # 3: categories carry steering options; written only when one differs from the papers'
READABLE_FORMAT_VERSIONS = (1, 2, 3)  # 1 has no gates; 1 and 2 have no options: they add at every position
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_MEMBERS = 8
MAX_MEMBER_BYTES = {
    "manifest.json": 2 * 1024 * 1024,
    "vectors.safetensors": 256 * 1024 * 1024,
    "examples.csv": 32 * 1024 * 1024,
    "evaluation.json": 8 * 1024 * 1024,
    "README.md": 1024 * 1024,
    "evaluation.md": 1024 * 1024,
}
REQUIRED = ("manifest.json", "vectors.safetensors", "examples.csv")
MAX_COMPRESSION_RATIO = 100


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- writing -----------------------------------------------------------------------------------


def policy_card(version: PolicyVersion) -> str:
    """A short human-readable description of what the bundle steers and how to apply it."""
    model = version.model
    lines = [
        f"# Policy: {version.policy} (version {version.number})",
        "",
        version.description or "",
        "",
        f"Made for **{model.describe()}**.",
        f"Saved by {version.author or 'unknown'} on {version.created_at or 'an unknown date'}.",
        f"Change note: {version.note or '-'}",
        "",
        "| category | layer | strength | steering | site | method | applied to | harmful / safe examples |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in version.categories:
        s = c.vectors.settings
        method = f"answers, toward: {s.target}" if s.method == "answers" else s.method
        lines.append(
            f"| {c.name} | {c.layer} | {c.strength:g} | {c.options.label()} | {s.site} | {method} | {applied_to(c)} "
            f"| {len(c.harmful)} / {len(c.safe)} |"
        )
    lines += [
        "",
        "## Apply it",
        "",
        "```python",
        "from safesteer.bundles import load_bundle",
        "",
        'bundle = load_bundle("this-file.zip")',
        "with bundle.apply(model):  # a transformers causal LM of the same shape",
        "    output = model.generate(**inputs)",
        "```",
        "",
        "Each category applies `strength x vector` to the output of its layer (or shares it among adjacent",
        "layers) by its steering operation: `add`, `norm` (add, then keep each state's length) or `clamp`",
        "(move states along the vector only up to the safe side), at `all` positions, the `prompt`'s, or the",
        "`generated` ones; to the requests it applies to: all of them, or (gated) those its gate fires on.",
        "Content warning: `examples.csv` contains harmful prompts by design.",
    ]
    return "\n".join(lines) + "\n"


def applied_to(category: PolicyCategory) -> str:
    """Which requests a category steers, in words (policy cards, `policy show`)."""
    gate = category.gate
    if gate is None or gate.mode == "always":
        return "every request"
    rates = gate.rates()
    return (
        f"requests its gate fires on (layer {gate.layer}; held out: {rates.catch_rate:.0%} caught, "
        f"{rates.false_positive_rate:.0%} false positives)"
    )


def _examples_csv(version: PolicyVersion) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["category", "side", "prompt"])
    for c in version.categories:
        for side in SIDES:
            for text in c.harmful if side == "harmful" else c.safe:
                writer.writerow([c.name, side, text])
    return out.getvalue().encode("utf-8")


def bundle_bytes(version: PolicyVersion, created_by: str = "") -> bytes:
    """The bundle of a policy version as zip bytes."""
    tensors = {
        (f"category.{i}" if name == "vectors" else f"category.{i}.{name}"): tensor.float()
        for i, c in enumerate(version.categories)
        for name, tensor in c.vectors.tensors().items()
    }
    files: dict[str, bytes] = {
        "vectors.safetensors": save(tensors),
        "examples.csv": _examples_csv(version),
        "README.md": policy_card(version).encode("utf-8"),
    }
    if version.evaluation is not None:
        files["evaluation.json"] = json.dumps(version.evaluation, indent=2).encode("utf-8")
        if "sweep" in version.evaluation:
            report = report_markdown(Evaluation.from_dict(version.evaluation["sweep"]))
            files["evaluation.md"] = report.encode("utf-8")
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": (
            OPTIONS_FORMAT_VERSION if any(c.options != LEGACY for c in version.categories) else BUNDLE_FORMAT_VERSION
        ),
        "policy": {"name": version.policy, "description": version.description},
        "version": {
            "number": version.number,
            "author": version.author,
            "created_at": version.created_at,
            "note": version.note,
            "restored_from": version.restored_from,
        },
        "model": version.model.to_dict(),
        "categories": [
            {
                "name": c.name,
                "description": c.description,
                "tensor": f"category.{i}",
                "layer": c.layer,
                "strength": c.strength,
                "steering": c.options.to_dict(),
                "vectors": {k: v for k, v in c.vectors.metadata().items() if k != "format_version"},
            }
            for i, c in enumerate(version.categories)
        ],
        "files": {name: _sha256(data) for name, data in files.items()},
        "created_by": created_by,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "safesteer_version": __version__,
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2))
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def export_bundle(version: PolicyVersion, path: str | Path, created_by: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bundle_bytes(version, created_by))
    return path


# --- reading -----------------------------------------------------------------------------------


def _bad(reason: str) -> SafeSteerError:
    return SafeSteerError(f"not a valid policy bundle: {reason}")


def _read_members(data: bytes) -> dict[str, bytes]:
    if len(data) > MAX_BUNDLE_BYTES:
        raise _bad(f"the file is larger than {MAX_BUNDLE_BYTES // (1024 * 1024)} MB")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise _bad("it is not a zip file") from exc
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _bad(f"it holds {len(infos)} files; a bundle has at most {MAX_MEMBERS}")
        members: dict[str, bytes] = {}
        for info in infos:
            name = info.filename
            if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name:
                raise _bad(f"it contains an unsafe path {name!r}")
            if "/" in name or "\\" in name or name not in MAX_MEMBER_BYTES:
                raise _bad(f"unexpected file {name!r}")
            if name in members:
                raise _bad(f"{name!r} appears twice")
            if info.flag_bits & 0x1:
                raise _bad(f"{name!r} is encrypted")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise _bad(f"{name!r} is a symbolic link")
            cap = MAX_MEMBER_BYTES[name]
            if info.file_size > cap:
                raise _bad(f"{name!r} would unpack to {info.file_size} bytes (limit {cap})")
            if (
                info.compress_size
                and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO
                and info.file_size > 1 << 20
            ):
                raise _bad(f"{name!r} is compressed suspiciously well (a zip bomb?)")
            try:
                with archive.open(info) as handle:
                    content = handle.read(cap + 1)  # never trust the declared size
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as exc:
                raise _bad(f"{name!r} cannot be read ({exc})") from exc
            if len(content) > cap:
                raise _bad(f"{name!r} unpacks to more than {cap} bytes")
            members[name] = content
    for name in REQUIRED:
        if name not in members:
            raise _bad(f"{name!r} is missing")
    return members


MAX_JSON_DEPTH = 32


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting outside strings, found without parsing (which could recurse too deep)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text} is too large")
    return number


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _json(data: bytes, name: str) -> Any:
    """Parse a bundle's JSON with limits: nesting depth, finite numbers only (no NaN, Infinity or 1e400)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"{name!r} is not UTF-8 text") from exc
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise _bad(f"{name!r} is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"{name!r} is not valid JSON ({str(exc).splitlines()[0][:120]})") from exc


def _examples(data: bytes, names: set[str]) -> dict[tuple[str, str], list[str]]:
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _bad("'examples.csv' is not valid UTF-8 CSV") from exc
    if not rows or rows[0] != ["category", "side", "prompt"]:
        raise _bad("'examples.csv' must have the columns category, side, prompt")
    examples: dict[tuple[str, str], list[str]] = {(n, s): [] for n in names for s in SIDES}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 3 or (row[0], row[1]) not in examples:
            raise _bad(f"'examples.csv' row {number} names an unknown category or side")
        examples[(row[0], row[1])].append(row[2])
    return examples


def _categories(manifest: dict[str, Any], members: dict[str, bytes]) -> list[PolicyCategory]:
    model = ModelIdentity.from_dict(manifest["model"])
    try:
        tensors = load(members["vectors.safetensors"])
    except Exception as exc:
        raise _bad("'vectors.safetensors' is not a valid safetensors file") from exc
    entries = manifest["categories"]
    if not isinstance(entries, list) or not entries:
        raise _bad("the manifest lists no categories")
    examples = _examples(members["examples.csv"], {str(e["name"]) for e in entries})
    categories = []
    for entry in entries:
        tensor = tensors.get(str(entry["tensor"]))
        if tensor is None:
            raise _bad(f"no tensor {entry['tensor']!r} for category {entry['name']!r}")
        if tensor.dtype != torch.float32 or tuple(tensor.shape) != (model.n_layers, model.hidden_size):
            raise _bad(
                f"category {entry['name']!r} has a {tuple(tensor.shape)} {tensor.dtype} tensor; "
                f"{model.describe()} needs float32 {(model.n_layers, model.hidden_size)}"
            )
        if not torch.isfinite(tensor).all():
            raise _bad(f"category {entry['name']!r} has non-finite vector values")
        metadata = {**entry["vectors"], "model": model.to_dict()}
        prefix = f"{entry['tensor']}.gate."
        gate_tensors = {
            f"gate.{name.removeprefix(prefix)}": t for name, t in tensors.items() if name.startswith(prefix)
        }
        projection = tensors.get(f"{entry['tensor']}.safe_projection")
        if gate_tensors and metadata.get("gate") is None:
            raise _bad(f"category {entry['name']!r} has gate tensors but no gate settings")
        categories.append(
            PolicyCategory(
                name=str(entry["name"]),
                description=str(entry.get("description", "")),
                harmful=examples[(str(entry["name"]), "harmful")],
                safe=examples[(str(entry["name"]), "safe")],
                vectors=CategoryVectors.from_parts(
                    tensor,
                    metadata,
                    {**gate_tensors, **({"safe_projection": projection} if projection is not None else {})},
                    f"category {entry['name']!r}",
                ),
                layer=entry["layer"],  # checked by PolicyCategory: whole number, inside the model
                strength=entry["strength"],  # finite, 0..MAX_STRENGTH
                options=SteeringOptions.from_dict(entry.get("steering")),  # absent: saved before options
            )
        )
    return categories


def read_bundle(data: bytes) -> PolicyVersion:
    """Validate a bundle completely and return its policy version (nothing is written anywhere)."""
    members = _read_members(data)
    manifest = _json(members["manifest.json"], "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise _bad("'manifest.json' is not a SafeSteer policy bundle manifest")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        found = manifest.get("format_version")
        readable = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise _bad(f"format version {found!r} is not supported (this SafeSteer reads {readable})")
    hashes = manifest.get("files")
    if not isinstance(hashes, dict):
        raise _bad("the manifest has no file hashes")
    for name, content in members.items():
        if name == "manifest.json":
            continue
        if name not in hashes:
            raise _bad(f"{name!r} is not listed in the manifest")
        if _sha256(content) != hashes[name]:
            raise _bad(f"{name!r} does not match its sha256 in the manifest (the bundle was altered or damaged)")
    for name in hashes:
        if name not in members:
            raise _bad(f"{name!r} is listed in the manifest but missing")
    try:
        categories = _categories(manifest, members)
        version_info, policy_info = manifest["version"], manifest["policy"]
        return PolicyVersion(
            policy=str(policy_info["name"]),
            description=str(policy_info.get("description", "")),
            categories=categories,
            number=int(version_info.get("number", 0)),
            author=str(version_info.get("author", "")),
            created_at=str(version_info.get("created_at", "")),
            note=str(version_info.get("note", "")),
            evaluation=_json(members["evaluation.json"], "evaluation.json") if "evaluation.json" in members else None,
        )
    except SafeSteerError as exc:
        if str(exc).startswith("not a valid policy bundle"):
            raise
        raise _bad(str(exc)) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(f"the manifest is incomplete ({type(exc).__name__}: {exc})") from exc


def read_bundle_file(path: str | Path) -> PolicyVersion:
    path = Path(path)
    if not path.is_file():
        raise SafeSteerError(f"no such file: {path}")
    if path.stat().st_size > MAX_BUNDLE_BYTES:
        raise _bad(f"the file is larger than {MAX_BUNDLE_BYTES // (1024 * 1024)} MB")
    return read_bundle(path.read_bytes())


# --- the deployer's side -------------------------------------------------------------------------


@dataclass
class PolicyBundle:
    """A validated bundle, ready to apply to a transformers model without the app or a database."""

    version: PolicyVersion

    @contextmanager
    def apply(self, model: Any, strength_scale: float = 1.0) -> Iterator[LoadedModel]:
        """Steer `model` (a transformers causal LM) inside the block, in this thread; hooks always removed."""
        lm = (
            model
            if isinstance(model, LoadedModel)
            else wrap_model(model, None, model_id="deployer-model", precision="")
        )
        check_compatible(self.version.model, lm.identity)
        specs = [c.steering_spec(c.strength * strength_scale) for c in self.version.categories]
        with steer(lm, specs):
            yield lm


def load_bundle(path: str | Path) -> PolicyBundle:
    """Read and validate a bundle file for deployment."""
    return PolicyBundle(read_bundle_file(path))


# --- llama.cpp --------------------------------------------------------------------------------
