"""SafeSteer Studio: the web app for policy authors (Gradio). `make run`, then http://127.0.0.1:7860.

Only layout and wiring live here; what each button does is in the `studio` package, shared with
the CLI's library calls and testable without a browser. Runs unchanged as a Hugging Face Space.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import gradio as gr

import studio
from safesteer import workflows
from safesteer.activations import TOKENS
from safesteer.architectures import SITES
from safesteer.operations import DEFAULT, HOW, WHERE
from safesteer.prompts import MAX_FILE_BYTES
from studio.resources import DEFAULT_AREA

INTRO = """# SafeSteer Studio
Add a safety rule to a language model without retraining it: give examples of a harm category,
SafeSteer learns a **steering vector** from the model's own activations, and you preview, save and
export it as a versioned **policy**.

> **Content warning:** this tool shows harmful example prompts and model outputs by design.
"""

METHOD_HELP = (
    "**answers**: the model answers the category's harmful prompts twice, once asked to refuse (or to redirect) "
    "and once asked to comply; the vector points from its complying answers to its safe ones. It takes about a "
    "minute more and is the method measured to make steered answers safer. "
    "**mean-diff**: the direction from the harmful prompts' average to the safe prompts' average. "
    "**pruned**: the same, using only the harmful examples that show the category most strongly "
    "(often keeps answers more fluent)."
)
SITE_HELP = (
    "**residual**: the layer's whole output (portable to llama.cpp). "
    "**attention**: only the attention block's output, as in the papers."
)
GATE_HELP = (
    "**Gate**: a small classifier on the model's own reading of the prompt decides, per request, whether "
    "it is one of the policy's harm categories (also when dressed up in role-play); the closest category "
    "then steers it, and everyday requests are answered as before. Its rates below are measured on "
    "prompts it never trained on, beside simple text classifiers trained on the same examples."
)
EXPORT_FORMATS = [(f.label, f.key) for f in workflows.EXPORT_FORMATS.values()]  # shown label, API value


def build_app() -> gr.Blocks:
    with gr.Blocks(title="SafeSteer Studio") as demo:
        draft = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("1 · Category"):
                with gr.Row():
                    resume_choice = gr.Dropdown(
                        label="Resume a draft",
                        elem_id="resume-draft",
                        choices=[],
                        info="your categories in progress are kept after every step, across reloads and restarts",
                    )
                    resume_button = gr.Button("Resume")
                with gr.Row():
                    name = gr.Textbox(label="Category name", value=DEFAULT_AREA, max_lines=1)
                    description = gr.Textbox(label="Description (optional)", max_lines=2)
                sources = studio.example_sources()
                source = gr.Radio(sources, value=sources[0], label="Harmful examples")
                with gr.Row():
                    with gr.Column():
                        harmful_file = gr.File(
                            label="Harmful prompts: CSV or Excel ('prompt' column), JSONL or TXT",
                            type="filepath",
                            file_types=[".csv", ".jsonl", ".txt", ".xlsx"],
                        )
                        harmful_text = gr.Textbox(label="…or paste harmful prompts, one per line", lines=5)
                    with gr.Column():
                        safe_file = gr.File(
                            label="Safe prompts (optional; default: SafeSteer's everyday requests)",
                            type="filepath",
                            file_types=[".csv", ".jsonl", ".txt", ".xlsx"],
                        )
                        safe_text = gr.Textbox(label="…or paste safe prompts, one per line", lines=5)
                read_button = gr.Button("Read prompts", variant="primary")
                read_summary = gr.Markdown(label="Summary", elem_id="read-summary")
                read_table = gr.Dataframe(
                    label="What will be used", headers=["side", "prompt"], interactive=False, max_height=320, wrap=True
                )

            with gr.Tab("2 · Extract"):
                with gr.Row():
                    method = gr.Radio(
                        ["answers", "mean-diff", "pruned"],
                        value="answers",
                        label="Method",
                        info="answers: from the model's own answers (the default; measured to make answers safer)",
                    )
                    target = gr.Radio(
                        ["refuse", "redirect"],
                        value="refuse",
                        label="Steer toward",
                        info="refuse: decline the harmful request; redirect: a safe on-topic answer without refusing",
                    )
                    site = gr.Radio(list(SITES), value="residual", label="Where to steer")
                    token = gr.Radio(
                        list(TOKENS),
                        value="last",
                        label="Which prompt token",
                        info="last: the last prompt token; mean: all prompt tokens",
                    )
                    prune = gr.Slider(
                        0.1, 1.0, value=0.5, step=0.05, label="Pruning: share of harmful examples kept", visible=False
                    )
                with gr.Row():
                    gate_mode = gr.Radio(
                        ["gated", "always", "none"],
                        value="gated",
                        label="Which prompts to steer",
                        info="gated: only prompts this category's gate recognises; always: every prompt",
                    )
                    gate_fpr = gr.Slider(
                        0.01,
                        0.2,
                        value=0.05,
                        step=0.01,
                        label="Gate: allowed false positives on safe prompts",
                        info="lower: fewer everyday prompts steered, fewer harmful ones caught",
                    )
                gr.Markdown(METHOD_HELP + "\n\n" + SITE_HELP + "\n\n" + GATE_HELP)
                extract_button = gr.Button("Extract steering vectors", variant="primary")
                extract_estimate = gr.Markdown(elem_id="extract-estimate")
                extract_summary = gr.Markdown(label="Extraction summary", elem_id="extract-summary")
                separation = gr.Plot(label="Separation by layer")
                gate_text = gr.Markdown(elem_id="gate-summary")
                gate_threshold = gr.Slider(
                    -100,
                    100,
                    value=0,
                    step=0.01,
                    label="Gate threshold, on the plot's score scale (move it: the rates follow)",
                    info="right: fewer safe prompts steered and fewer harmful ones caught; left: the opposite",
                    visible=False,
                )
                gate_scores = gr.Plot(label="Gate scores on held-out prompts")

            with gr.Tab("3 · Preview"):
                with gr.Row():
                    layer = gr.Slider(0, 29, value=12, step=1, label="Layer", info="middle layers usually steer best")
                    strength = gr.Slider(
                        0.0,
                        studio.MAX_STRENGTH,
                        value=2.0,
                        step=0.25,
                        label="Strength",
                        info="0 = unchanged; too high breaks fluency",
                    )
                    max_tokens = gr.Slider(16, 256, value=64, step=16, label="Max new tokens")
                with gr.Row():
                    steer_how = gr.Radio(
                        list(HOW),
                        value=DEFAULT.how,
                        label="How",
                        info="add: push every state; norm: push, keep each state's length; "
                        "clamp: push only states short of the safe side, only as far as it",
                    )
                    steer_where = gr.Radio(
                        list(WHERE),
                        value=DEFAULT.where,
                        label="Where",
                        info="every position, the prompt's only, or the answer's (generated) only",
                    )
                    steer_spread = gr.Slider(
                        1, 5, value=DEFAULT.spread, step=1, label="Spread over layers", info="same total strength"
                    )
                also_apply = gr.CheckboxGroup(
                    label="Also steer with saved categories of the selected policy (step 4), at their saved settings",
                    choices=[],
                )
                example = gr.Dropdown(
                    label="Held-out example prompts (not used for extraction)", choices=[], allow_custom_value=True
                )
                prompt = gr.Textbox(label="Prompt", lines=2)
                gr.Markdown(studio.preview_engine_note())
                preview_button = gr.Button("Generate side by side", variant="primary")
                with gr.Row():
                    naive = gr.Textbox(label="Naive (no steering)", lines=10, elem_id="naive-output")
                    steered = gr.Textbox(label="Steered", lines=10, elem_id="steered-output")
                gate_verdicts = gr.Markdown(elem_id="gate-verdicts")
                with gr.Accordion("Batch: several test prompts at once", open=False):
                    batch_prompts = gr.Textbox(
                        label="Test prompts, one per line (empty: the held-out examples)", lines=4
                    )
                    batch_button = gr.Button("Run batch")
                    batch_table = gr.Dataframe(
                        label="Naive vs steered",
                        headers=["prompt", "steered by", "naive", "steered"],
                        datatype=["str", "str", "markdown", "markdown"],  # answers often use Markdown
                        interactive=False,
                        wrap=True,
                        column_widths=["22%", "10%", "34%", "34%"],
                        elem_id="batch-table",
                    )

            with gr.Tab("4 · Save & versions"):
                with gr.Row():
                    policy = gr.Dropdown(
                        label="Policy",
                        choices=[],
                        allow_custom_value=True,
                        info="pick one or type a new name",
                        elem_id="policy",
                    )
                    note = gr.Textbox(label="Change note", max_lines=2)
                save_summary = gr.Markdown(studio.save_target(12, 2.0), elem_id="save-target")
                save_button = gr.Button("Save as new version", variant="primary")
                save_status = gr.Markdown(label="Save status", elem_id="save-status")
                versions = gr.Dataframe(
                    label="Version history (newest first)",
                    headers=["version", "author", "saved", "categories (layer, strength)", "note"],
                    interactive=False,
                    wrap=True,
                    column_widths=["10%", "14%", "20%", "34%", "22%"],
                    elem_id="versions-table",
                )
                with gr.Row():
                    open_category = gr.Dropdown(
                        label="Saved category of this policy", choices=[], elem_id="open-category"
                    )
                    open_version = gr.Textbox(label="of version", placeholder="latest", max_lines=1)
                    open_button = gr.Button("Open it for preview and evaluation")
                open_status = gr.Markdown(elem_id="open-status")
                with gr.Row():
                    old_version = gr.Number(label="Compare version", precision=0, value=1)
                    new_version = gr.Number(label="with version", precision=0, value=2)
                    compare_button = gr.Button("Compare")
                comparison = gr.Markdown(label="Comparison")
                with gr.Row():
                    rollback_version = gr.Number(label="Roll back to version", precision=0, value=1)
                    rollback_button = gr.Button("Roll back (saves it again as newest)")
                rollback_status = gr.Markdown(label="Rollback status", elem_id="rollback-status")

            with gr.Tab("5 · Evaluate"):
                evaluation = gr.State(None)
                gr.Markdown(
                    "Measure the category on its **held-out** prompts and on everyday requests, answer by answer: "
                    "unsafe attempts, degenerate (looping) and off-topic answers, refusals, and everyday answers "
                    "degraded, for each layer and strength. The recommendation keeps answers as readable as naive."
                )
                with gr.Row():
                    eval_layers = gr.Textbox(label="Layers to try", value="8, 12, 16", max_lines=1)
                    eval_strengths = gr.Textbox(label="Strengths to try", value="1, 2, 4", max_lines=1)
                    eval_tokens = gr.Slider(8, 128, value=32, step=8, label="New tokens per answer")
                    guard_model = gr.Textbox(
                        label="Unsafe-attempt judge (optional; default: the response probe)",
                        placeholder="a guard model, e.g. meta-llama/Llama-Guard-3-1B, or any chat model",
                        max_lines=1,
                    )
                eval_options = gr.CheckboxGroup(
                    studio.OPTION_CHOICES,
                    value=[DEFAULT.label()],
                    label="Ways of applying the vector to compare (how · where · layers)",
                    info="each one adds a layer x strength grid; all run as rows of the same batches",
                )
                with gr.Row():
                    eval_button = gr.Button("Run evaluation", variant="primary")
                    stop_button = gr.Button("Stop")
                eval_estimate = gr.Markdown(elem_id="eval-estimate")
                eval_summary = gr.Markdown(label="Evaluation summary", elem_id="eval-summary")
                eval_plots = gr.Gallery(label="Heatmaps and trade-off", columns=3, height="auto", object_fit="contain")
                eval_report = gr.File(label="Report (Markdown with its plots, zipped)", interactive=False)
                gr.Markdown(
                    "### Blind review\nLabel each answer; naive and steered answers are shuffled and unmarked. "
                    "Your labels use the reference set's labels, so they can retrain the response probe."
                )
                review_header = gr.Markdown(elem_id="review-header")
                review_prompt = gr.Textbox(label="Prompt", interactive=False, lines=2)
                review_response = gr.Textbox(label="Response", interactive=False, lines=5)
                with gr.Row():
                    start_review = gr.Button("Start / restart review")
                    unsafe_button = gr.Button("Unsafe attempt", variant="stop")
                    safe_button = gr.Button("Safe, on topic")
                    refusal_button = gr.Button("Refusal")
                    degenerate_button = gr.Button("Degenerate")
                    off_topic_button = gr.Button("Off-topic")
                    skip_button = gr.Button("Skip")
                review_summary = gr.Markdown()
                # after the blind review, so its answers are read without the judges' opinion first
                with gr.Accordion("Answers the judges flagged (open after the blind review)", open=False):
                    eval_failing = gr.Dataframe(
                        label="Answers the judges flagged at the recommended point, worst first",
                        headers=studio.FAILING_COLUMNS,
                        interactive=False,
                        wrap=True,
                        column_widths=["10%", "22%", "38%", "12%", "18%"],
                        elem_id="flagged-table",
                    )
                with gr.Row():
                    labels_button = gr.Button("Download my labels")
                    labels_file = gr.File(label="Your labels (JSON lines)", interactive=False)
                with gr.Row():
                    save_eval_button = gr.Button("Save results with the selected policy's newest version")
                    guided_button = gr.Button("Compute guided vectors from my labels")
                eval_status = gr.Markdown(label="Evaluation status")

            with gr.Tab("6 · Export / import"):
                export_summary = gr.Markdown(studio.export_target(None), elem_id="export-target")
                with gr.Row():
                    export_version = gr.Textbox(label="Version", placeholder="latest", max_lines=1)
                    export_format = gr.Radio(EXPORT_FORMATS, value="bundle", label="Format")
                export_button = gr.Button("Export selected policy", variant="primary")
                export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
                import_file = gr.File(
                    label="Import a policy bundle (.zip)", type="filepath", file_types=[".zip"], elem_id="import-file"
                )
                import_button = gr.Button("Import")
                import_status = gr.Markdown(label="Import status", elem_id="import-status")

        read_event = read_button.click(
            studio.user_errors(studio.read_category),
            [name, description, source, harmful_file, safe_file, harmful_text, safe_text],
            [draft, read_table, read_summary, example],
            api_name="read_category",
        )
        read_event.success(studio.remember_draft, draft, resume_choice, api_visibility="private")
        extracted_views = [separation, extract_summary, gate_scores, gate_text]
        method.change(studio.method_controls, method, [prune, target], api_visibility="private", show_progress="hidden")
        read_event.success(studio.cleared_extraction, None, extracted_views, api_visibility="private")
        source.change(studio.name_for_source, [source, name], name, api_visibility="private", show_progress="hidden")
        resume_button.click(
            studio.user_errors(studio.resume_draft),
            resume_choice,
            [draft, read_summary, example],
            api_name="resume_draft",
        ).success(studio.layer_slider, draft, layer, api_visibility="private").then(
            studio.suggested_controls, draft, [strength, steer_where, steer_how, steer_spread], api_visibility="private"
        ).then(studio.threshold_slider, draft, gate_threshold, api_visibility="private").then(
            studio.suggested_sweep, draft, [eval_layers, eval_strengths, eval_options], api_visibility="private"
        )
        extract_event = extract_button.click(
            studio.user_errors(studio.extract),
            [draft, method, site, token, prune, gate_mode, gate_fpr, policy, target],
            [draft, separation, extract_summary, layer, gate_scores, gate_text],
            api_name="extract",
            concurrency_limit=1,
        )
        eval_grid = [eval_layers, eval_strengths, eval_options]
        extract_event.then(studio.suggested_sweep, draft, eval_grid, api_visibility="private")
        extract_event.then(studio.layer_slider, draft, layer, api_visibility="private").then(
            studio.suggested_controls, draft, [strength, steer_where, steer_how, steer_spread], api_visibility="private"
        ).then(studio.threshold_slider, draft, gate_threshold, api_visibility="private").then(
            studio.remember_draft, draft, resume_choice, api_visibility="private"
        )
        for trigger in (draft.change, method.change, gate_mode.change, policy.change):
            trigger(
                studio.user_errors(studio.extraction_estimate),
                [draft, method, gate_mode, policy],
                extract_estimate,
                api_visibility="private",
                show_progress="hidden",
            )
        gate_threshold.release(
            studio.user_errors(studio.move_threshold),
            [draft, gate_threshold],
            [draft, gate_scores, gate_text],
            api_name="move_threshold",
        ).success(studio.remember_draft, draft, resume_choice, api_visibility="private")
        gate_mode.change(
            studio.user_errors(studio.set_mode), [draft, gate_mode], [draft, gate_text], api_name="set_mode"
        ).success(studio.remember_draft, draft, resume_choice, api_visibility="private")
        eval_event = eval_button.click(
            studio.user_errors(studio.run_evaluation),
            [draft, eval_layers, eval_strengths, eval_tokens, guard_model, eval_options],
            [eval_summary, eval_plots, eval_report, evaluation, eval_failing],
            api_name="evaluate",
            concurrency_limit=1,
        )
        eval_event.then(
            studio.recommended_controls,
            evaluation,
            [layer, strength, steer_where, steer_how, steer_spread],
            api_visibility="private",
        )
        stop_button.click(None, None, None, cancels=[eval_event], api_visibility="private")
        for grid in (draft, eval_layers, eval_strengths, eval_tokens, eval_options):
            grid.change(
                studio.user_errors(studio.evaluation_estimate),
                [draft, eval_layers, eval_strengths, eval_tokens, eval_options],
                eval_estimate,
                api_visibility="private",
                show_progress="hidden",
            )
        review_outputs = [evaluation, review_header, review_prompt, review_response, review_summary]
        start_review.click(studio.user_errors(studio.review_start), evaluation, review_outputs, api_name="review_start")
        for button, verdict in (
            (unsafe_button, "unsafe"),
            (safe_button, "safe"),
            (refusal_button, "refusal"),
            (degenerate_button, "degenerate"),
            (off_topic_button, "off-topic"),
            (skip_button, "skip"),
        ):
            button.click(
                studio.user_errors(functools.partial(studio.review_label, verdict=verdict)),
                evaluation,
                review_outputs,
                api_name=f"review_{verdict.replace('-', '_')}",
            )
        labels_button.click(
            studio.user_errors(studio.review_labels_file), evaluation, labels_file, api_name="review_labels"
        )
        save_eval_button.click(
            studio.user_errors(studio.save_evaluation),
            [draft, evaluation, policy],
            eval_status,
            api_name="save_evaluation",
        )
        guided_button.click(
            studio.user_errors(studio.guided_from_review),
            [draft, evaluation],
            [draft, separation, eval_status],
            api_name="guided",
        )
        example.change(lambda text: text, example, prompt, api_visibility="private")
        preview_event = preview_button.click(
            studio.user_errors(studio.preview),
            [draft, prompt, layer, strength, max_tokens, policy, also_apply, steer_where, steer_how, steer_spread],
            [naive, steered, gate_verdicts],
            api_name="preview",
        )
        batch_button.click(
            studio.user_errors(studio.preview_batch),
            [
                draft,
                batch_prompts,
                layer,
                strength,
                max_tokens,
                policy,
                also_apply,
                steer_where,
                steer_how,
                steer_spread,
            ],
            batch_table,
            api_name="preview_batch",
        )
        policy_lists = [versions, also_apply, open_category, export_summary]  # what shows a policy's contents
        save_event = save_button.click(
            studio.user_errors(studio.save_version),
            [draft, policy, note, layer, strength, steer_where, steer_how, steer_spread],
            [save_status, versions, policy],
            api_name="save_version",
        )
        save_event.success(studio.user_errors(studio.policy_views), policy, policy_lists, api_visibility="private")
        policy.change(studio.user_errors(studio.versions_table), policy, versions, api_name="versions")
        policy.change(studio.user_errors(studio.policy_views), policy, policy_lists, api_visibility="private")
        open_button.click(
            studio.user_errors(studio.open_saved_category),
            [policy, open_category, open_version],
            [draft, layer, strength, steer_where, steer_how, steer_spread, open_status],
            api_name="open_saved_category",
        ).then(studio.layer_slider, draft, layer, api_visibility="private")
        for control in (layer, strength, steer_where, steer_how, steer_spread):
            control.change(
                studio.save_target,
                [layer, strength, steer_where, steer_how, steer_spread],
                save_summary,
                preprocess=False,  # a strength typed out of range is clamped by its own handler, not refused here
                api_visibility="private",
            )
        compare_button.click(
            studio.user_errors(studio.compare_versions),
            [policy, old_version, new_version],
            comparison,
            api_name="compare",
        )
        rollback_event = rollback_button.click(
            studio.user_errors(studio.rollback),
            [policy, rollback_version],
            [rollback_status, versions],
            api_name="rollback",
        )
        rollback_event.success(studio.user_errors(studio.policy_views), policy, policy_lists, api_visibility="private")
        export_button.click(
            studio.user_errors(studio.export_policy),
            [policy, export_version, export_format],
            export_file,
            api_name="export",
        )
        import_event = import_button.click(
            studio.user_errors(studio.import_policy), import_file, [import_status, policy], api_name="import_bundle"
        )
        import_event.success(studio.user_errors(studio.policy_views), policy, policy_lists, api_visibility="private")
        # after an error a step's own summary says so, instead of the last success staying up under the message
        for event, summary in (
            (read_event, read_summary),
            (extract_event, extract_summary),
            (preview_event, gate_verdicts),
            (eval_event, eval_summary),
            (save_event, save_status),
            (rollback_event, rollback_status),
            (import_event, import_status),
        ):
            event.failure(lambda: NOT_DONE, None, summary, api_visibility="private")
        strength.input(  # the raw typed value: Gradio's own range check would only raise
            studio.within_strength,
            strength,
            strength,
            preprocess=False,
            api_visibility="private",
            show_progress="hidden",
        )
        demo.load(lambda: gr.Dropdown(choices=studio.policy_names()), None, policy, api_visibility="private")
        demo.load(studio.draft_choices, None, resume_choice, api_visibility="private")
    demo.queue(default_concurrency_limit=2)
    return demo


NOT_DONE = "*Not done: the message at the top right says why. Nothing was changed.*"


def auth_from_env() -> list[tuple[str, str]] | None:
    """`SAFESTEER_AUTH`: 'user:password' pairs separated by commas, or a file with one pair per line."""
    value = os.environ.get("SAFESTEER_AUTH", "").strip()
    if not value:
        return None
    text = Path(value).read_text() if Path(value).is_file() else value.replace(",", "\n")
    pairs = [tuple(line.split(":", 1)) for line in text.splitlines() if ":" in line]
    return [(user.strip(), password.strip()) for user, password in pairs] or None


def server_address(port: int | None = None) -> tuple[str, int]:
    """Host and port: `SAFESTEER_HOST` or Gradio's `GRADIO_SERVER_NAME`; `GRADIO_SERVER_PORT` or `PORT`; else 7860."""
    host = os.environ.get("SAFESTEER_HOST") or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if port is not None:
        return host, port
    for variable in ("GRADIO_SERVER_PORT", "PORT"):
        value = os.environ.get(variable, "").strip()
        if value:
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise SystemExit(f"error: {variable} must be a port number (1-65535), not {value!r}")
            return host, int(value)
    return host, 7860


def launch(port: int | None = None, prevent_thread_lock: bool = False) -> gr.Blocks:
    demo = build_app()
    studio.warm_up()  # models, the gate's shared recordings and the response probe, while the author reads step 1
    host, port = server_address(port)
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth_from_env(),
        max_file_size=MAX_FILE_BYTES,
        show_error=False,
        prevent_thread_lock=prevent_thread_lock,
        theme=gr.themes.Soft(primary_hue="indigo"),
        footer_links=[],
    )
    return demo


if __name__ == "__main__":
    launch()
