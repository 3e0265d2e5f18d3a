"""What the web app does, as plain functions: one module per step, over the `safesteer` library.

`app.py` only lays out components and wires them to these functions, so every step can be
tested without a browser and scripted through the app's API (`gradio_client`). Problems a user
can fix come back as `gr.Error` messages, never tracebacks. Unlike the library, these functions
may return Gradio updates.
"""

from . import resources
from .category import Draft, read_category, require_draft
from .drafts import draft_choices, remember_draft, resume_draft
from .evaluation import (
    OPTION_CHOICES,
    EvaluationSession,
    guided_from_review,
    recommended_controls,
    review_label,
    review_labels_file,
    review_start,
    review_text,
    review_view,
    run_evaluation,
    save_evaluation,
)
from .extraction import extract, layer_slider, separation_plot, suggested_controls
from .gating import gate_plot, gate_summary, move_threshold, set_mode, threshold_slider
from .preview import draft_spec, policy_categories, preview, preview_batch
from .resources import (
    BUILTIN_PREFIX,
    HUB_FALLBACK_MODEL,
    OWN_PROMPTS,
    BackgroundTask,
    author_of,
    default_model_id,
    example_sources,
    plain_text,
    preview_engine_note,
    preview_model,
    reset_store,
    studio_model,
    studio_store,
    user_errors,
)
from .versions import (
    compare_versions,
    export_policy,
    export_target,
    import_policy,
    open_saved_category,
    parse_version,
    policy_names,
    rollback,
    save_target,
    save_version,
    saved_categories,
    versions_table,
)

__all__ = [
    "BUILTIN_PREFIX",
    "HUB_FALLBACK_MODEL",
    "OPTION_CHOICES",
    "OWN_PROMPTS",
    "BackgroundTask",
    "Draft",
    "EvaluationSession",
    "author_of",
    "compare_versions",
    "default_model_id",
    "draft_choices",
    "draft_spec",
    "example_sources",
    "export_policy",
    "export_target",
    "extract",
    "gate_plot",
    "gate_summary",
    "guided_from_review",
    "import_policy",
    "layer_slider",
    "move_threshold",
    "open_saved_category",
    "parse_version",
    "plain_text",
    "policy_categories",
    "policy_names",
    "preview",
    "preview_batch",
    "preview_engine_note",
    "preview_model",
    "read_category",
    "recommended_controls",
    "remember_draft",
    "require_draft",
    "reset_store",
    "resources",
    "resume_draft",
    "review_label",
    "review_labels_file",
    "review_start",
    "review_text",
    "review_view",
    "rollback",
    "run_evaluation",
    "save_evaluation",
    "save_target",
    "save_version",
    "saved_categories",
    "separation_plot",
    "set_mode",
    "studio_model",
    "studio_store",
    "suggested_controls",
    "threshold_slider",
    "user_errors",
    "versions_table",
]
