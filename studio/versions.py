"""Steps 4 and 6: save versions, compare and roll back, export and import bundles."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from safesteer.bundles import MAX_BUNDLE_BYTES
from safesteer.errors import SafeSteerError
from safesteer.policy import PolicyCategory
from safesteer.workflows import export_file_name, export_version, export_warning, import_bundle, save_category

from .category import Draft, require_draft, steering_options
from .resources import author_of, plain_text, preview_model, studio_model, studio_store


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
                "note": v.note
                + (
                    f" (restored from v{v.restored_from})"
                    if v.restored_from and f"version {v.restored_from}" not in v.note
                    else ""
                ),
            }
            for v in reversed(studio_store().list_versions(policy))
        ],
        columns=columns,
    )


def save_version(
    draft: Draft | None,
    policy: str,
    note: str,
    layer: float,
    strength: float,
    where: str | None = None,
    how: str | None = None,
    spread: float | None = None,
    request: gr.Request | None = None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way of asking for a progress bar
) -> tuple[str, pd.DataFrame, gr.Dropdown]:
    """Save the category into a new version of the policy (other categories of the policy are kept).

    Saving teaches the policy's gates whom to claim among its categories; that reads the policy's
    prompts through the model, which takes a while when they are not recorded yet (after a restart,
    say), so it draws a progress bar.
    """
    draft = require_draft(draft, vectors=True)
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
        options=steering_options(where, how, spread),
    )
    number = save_category(
        store,
        policy,
        category,
        preview_model,
        author=author_of(request),
        note=note or "",
        progress=lambda fraction, step: progress(fraction, desc=f"Saving: {step}"),
    )
    categories = store.load_version(policy, number).categories
    names = policy_names()
    count = f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'}"
    message = f"Saved **{plain_text(policy)}** version **{number}** ({count})."
    routed = [c.name for c in categories if c.gate is not None and c.gate.route is not None]
    if len(routed) > 1:  # the gates were taught whom to claim among the categories saved together
        names_routed = ", ".join(plain_text(name) for name in routed)
        message += (
            f" A request that fits several of its categories is steered by the one it fits best ({names_routed})."
        )
    return message, versions_table(policy), gr.Dropdown(choices=names, value=policy)


MAX_LISTED_CHANGES = 10


def _short(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


SETTING_WORDS = {
    "gate_routes_by": "which category steers a request that fits several",
    "gate_threshold": "gate threshold",
    "gate_layer": "gate layer",
    "gate_fpr": "gate false-positive rate",
    "mode": "gate mode",
}
"""Operating-point settings in the author's words (the others read well as they are)."""
VALUE_WORDS = {
    ("gate_routes_by", "centroid"): "the closest category's examples",
    ("gate_routes_by", "router"): "a router learnt against the other categories",
}


def _setting_change(key: str, old: object, new: object) -> str:
    def value(v: object) -> str:
        return plain_text(VALUE_WORDS.get((key, str(v)), str(v)))

    return f"{plain_text(SETTING_WORDS.get(key, key))}: {value(old)} → {value(new)}"


def compare_versions(policy: str, old: float, new: float) -> str:
    diff = studio_store().diff(policy, int(old), int(new))
    lines = [f"### {plain_text(policy)}: version {diff.old} → version {diff.new}"]
    for c in diff.categories:
        lines.append(f"- **{plain_text(c.name)}**: {c.status}")
        for label, items in (
            ("harmful examples added", c.harmful_added),
            ("harmful examples removed", c.harmful_removed),
            ("safe examples added", c.safe_added),
            ("safe examples removed", c.safe_removed),
        ):
            if items:
                lines.append(f"  - {label}: {len(items)}")
                lines += [f"    - {plain_text(_short(text))}" for text in items[:MAX_LISTED_CHANGES]]
                if len(items) > MAX_LISTED_CHANGES:
                    lines.append(f"    - … and {len(items) - MAX_LISTED_CHANGES} more")
        for key, (a, b) in c.settings_changed.items():
            lines.append(f"  - {_setting_change(key, a, b)}")
        if c.cosine_by_layer:
            lines.append(f"  - vector similarity (cosine): lowest {min(c.cosine_by_layer):.3f} across layers")
    return "\n".join(lines)


def rollback(policy: str, number: float, request: gr.Request | None = None) -> tuple[str, pd.DataFrame]:
    new = studio_store().rollback(policy, int(number), actor=author_of(request))
    return f"Version {int(number)} is live again as version **{new}**; nothing was deleted.", versions_table(policy)


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


def save_target(
    layer: float, strength: float, where: str | None = None, how: str | None = None, spread: float | None = None
) -> str:
    """What the Save button will store, so the author sees it before saving."""
    options = steering_options(where, how, spread)
    return (
        f"Saves the draft category at **layer {int(layer)}, strength {float(strength):g}, steering "
        f"{options.label()}** (set in 3 · Preview)."
    )


def export_target(policy: str | None) -> str:
    name = (policy or "").strip()
    if not name:
        return "No policy selected: choose or save one in **4 · Save & versions** first."
    return f"Exports policy **{plain_text(name)}** (selected in 4 · Save & versions)."


def export_policy(policy: str | None, version: str | None, fmt: str, request: gr.Request | None = None) -> str:
    """Write a bundle (or llama.cpp control vector) to a temporary file for download."""
    name = (policy or "").strip()
    if not name:
        raise SafeSteerError("no policy selected: choose or save one in step 4 first")
    loaded = studio_store().load_version(name, parse_version(version))
    warning = export_warning(loaded, fmt)
    if warning:
        gr.Warning(warning, duration=None)
    folder = Path(tempfile.mkdtemp(prefix="safesteer-export-"))
    return str(export_version(loaded, folder / export_file_name(loaded, fmt), fmt, created_by=author_of(request)))


def import_policy(file_path: str | None, request: gr.Request | None = None) -> tuple[str, gr.Dropdown]:
    """Validate an uploaded bundle completely, then save it as a new version."""
    if not file_path:
        raise SafeSteerError("choose a bundle file (.zip) to import")
    path = Path(file_path)
    if path.stat().st_size > MAX_BUNDLE_BYTES:
        raise SafeSteerError(f"bundles are at most {MAX_BUNDLE_BYTES // (1024 * 1024)} MB")
    name, number = import_bundle(
        studio_store(), path.read_bytes(), target=studio_model().identity, actor=author_of(request)
    )
    return f"Imported as **{plain_text(name)}** version **{number}**.", gr.Dropdown(choices=policy_names(), value=name)


def policy_categories(policy: str | None) -> gr.CheckboxGroup:
    """The categories of a policy's latest version, offered to steer alongside the draft."""
    names = [c.name for c in studio_store().load_version(policy).categories] if policy in policy_names() else []
    return gr.CheckboxGroup(choices=names, value=[])


def policy_views(policy: str | None) -> tuple[pd.DataFrame, gr.CheckboxGroup, gr.Dropdown, str]:
    """Everything that lists a policy's contents, read afresh: after a pick, a save, an import or a rollback."""
    return versions_table(policy), policy_categories(policy), saved_categories(policy), export_target(policy)


def saved_categories(policy: str | None) -> gr.Dropdown:
    """The categories of a policy's latest version, to open one as the draft."""
    names = [c.name for c in studio_store().load_version(policy).categories] if policy in policy_names() else []
    return gr.Dropdown(choices=names, value=names[0] if names else None)


def open_saved_category(policy: str | None, name: str | None, version: str | float | None = None) -> tuple[Any, ...]:
    """Make a saved category the draft, at its saved layer, strength and options: preview, evaluate or save it
    again without step 1. Its examples all built the vectors, so no held-out examples come with it."""
    if not policy or policy not in policy_names():
        raise SafeSteerError("pick a saved policy first")
    saved = studio_store().load_version(policy, parse_version(version))
    category = next((c for c in saved.categories if c.name == name), None)
    if category is None:
        raise SafeSteerError(f"version {saved.number} of '{policy}' has no category named {name!r}")
    draft = Draft(category.name, category.description, category.harmful, category.safe, [], category.vectors)
    o = category.options
    said = (
        f"Opened **{category.name}** from '{policy}' version {saved.number}: layer {category.layer}, strength "
        f"{category.strength:g}, steering {o.label()}. Preview it in **3 · Preview**, evaluate it in **5**."
    )
    return draft, category.layer, category.strength, o.where, o.how, o.spread, said
