"""Progress reporting shared by the library, the CLI and the app.

Long work (model preparation, activation recording, sweeps) takes a callback instead of
printing, so each face can render progress its own way (a tqdm bar, a Gradio progress bar).
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[float, str], None]
"""Called with a fraction in [0, 1] and a short description of the current step."""


def no_progress(fraction: float, description: str) -> None:
    """The default callback: report nothing."""


def scaled(callback: ProgressCallback | None, start: float, end: float) -> ProgressCallback:
    """Map a sub-task's 0..1 progress into the [start, end] slice of its parent's progress."""
    target = callback or no_progress

    def report(fraction: float, description: str) -> None:
        target(start + (end - start) * min(max(fraction, 0.0), 1.0), description)

    return report


def labelled(callback: ProgressCallback, label: str) -> ProgressCallback:
    """`callback` with each description prefixed by `label` (which of several sub-tasks is running)."""
    if not label:
        return callback
    return lambda fraction, description: callback(fraction, f"{label}: {description}")
