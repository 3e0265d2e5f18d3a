"""SafeSteer Studio web app (Gradio). Run with `make run`, then open http://127.0.0.1:7860."""

from __future__ import annotations

import os

import gradio as gr


def build_app() -> gr.Blocks:
    with gr.Blocks(title="SafeSteer Studio") as demo:
        gr.Markdown(
            "# SafeSteer Studio\n"
            "Category-wise safety steering for language models. The authoring app is being built; "
            "meanwhile the `safesteer` command extracts vectors and previews steered output."
        )
    return demo


if __name__ == "__main__":
    build_app().launch(
        server_name=os.environ.get("SAFESTEER_HOST", "127.0.0.1"), server_port=int(os.environ.get("PORT", "7860"))
    )
