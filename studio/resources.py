"""What every step shares: the models, the store, error handling, background work and safe text."""

from __future__ import annotations

import atexit
import functools
import html
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from db import PolicyStore
from safesteer import datasets
from safesteer.checkpoints import embedded_gguf_path
from safesteer.errors import SafeSteerError
from safesteer.models import (
    PRECISIONS,
    LoadedModel,
    Precision,
    available_precision,
    default_device,
    generation_precision,
    load_model,
    loaded_model,
)

log = logging.getLogger(__name__)

OWN_PROMPTS = "My own prompts (upload or paste)"
BUILTIN_PREFIX = "Built-in: Do-Not-Answer / "
BUILTIN_STRONGREJECT_PREFIX = "Built-in: StrongREJECT / "
HUB_FALLBACK_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def builtin_source(area: str) -> str:
    """How a built-in category is offered in the source list."""
    if datasets.source_of(area) == "strongreject":
        return BUILTIN_STRONGREJECT_PREFIX + area.removeprefix("strongreject-")
    return BUILTIN_PREFIX + area


def builtin_area(source: str) -> str | None:
    """The built-in category a source-list entry names, or None for the author's own prompts."""
    if source.startswith(BUILTIN_PREFIX):
        return source.removeprefix(BUILTIN_PREFIX)
    if source.startswith(BUILTIN_STRONGREJECT_PREFIX):
        return "strongreject-" + source.removeprefix(BUILTIN_STRONGREJECT_PREFIX)
    return None


def heldout_count(harmful: int) -> int:
    """How many of a category's harmful prompts are held out for previews and evaluation."""
    return min(MAX_HELDOUT, max(2, round(harmful * HELDOUT_SHARE)))


def builtin_split(area: str) -> tuple[list[str], list[str]]:
    """A built-in category's harmful prompts as step 1 reads them: (to learn from, held out)."""
    harmful = datasets.harmful_prompts(area)
    return datasets.split_heldout(harmful, heldout_count(len(harmful)))


def example_sources() -> list[str]:
    """Where harmful examples can come from here: always the author's own, built-ins when installed."""
    return [OWN_PROMPTS] + [builtin_source(area) for area in datasets.available_areas()]


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


DEFAULT_AREA = "malicious-uses"  # the built-in category step 1 names by default
HELDOUT_SHARE = 0.15
MAX_HELDOUT = 20
MAX_BATCH_PROMPTS = 16


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


def preview_model_if_loaded() -> LoadedModel | None:
    """The preview model when it is already loaded (estimates ask; they never load a model)."""
    return loaded_model(default_model_id(), _preview_precision())


def warm_up() -> threading.Thread | None:
    """Ready what an author's first actions need, in the background from start-up (`SAFESTEER_WARMUP=0`: not).

    Both models, then the gate's negatives for the built-in safe prompts (most of a first
    extraction's recording, kept in the recording cache), then the response probe the preview's
    and evaluation's verdicts need. Everything is cached: a later start-up only loads.
    """
    if os.environ.get("SAFESTEER_WARMUP", "1").strip() == "0":
        return None

    def work() -> None:
        from safesteer.extraction import warm_gate_negatives, warm_policy_pool
        from safesteer.prompt_passes import template_start
        from safesteer.vectors import ExtractionSettings

        try:
            studio_model()
            template_start(preview_model()).exact()  # the preview's prompt passes: checked once, here
            warm_gate_negatives(preview_model(), datasets.benign_prompts(), ExtractionSettings())
            ready_probe()
            # Then each built-in category's gate pool (about 20 s each), the default name's first, so a
            # first extraction of it only answers and reads. Not while an author's own work runs.
            areas = sorted(datasets.available_areas(), key=lambda area: area != DEFAULT_AREA)
            for area in areas:
                if BackgroundTask.running():
                    break
                warm_policy_pool(preview_model(), builtin_split(area)[0], ExtractionSettings())
        except Exception:  # each step reports its own problem when an author asks for it
            log.warning("could not prepare the studio in advance", exc_info=True)

    thread = threading.Thread(target=work, name="warm-up", daemon=True)
    thread.start()
    atexit.register(thread.join, PROBE_EXIT_WAIT_S)  # torch aborts if a thread runs at exit
    return thread


_PROBES: dict[str, dict[str, Any]] = {}  # per preview model (its identity): the probe, or the thread training it
PROBE_EXIT_WAIT_S = 60.0
_PROBE_LOCK = threading.Lock()


def ready_probe() -> Any:
    """The preview model's unsafe-attempt probe if it is trained, else None (training starts in the background).

    Trained once per model and cached on disk; the first preview does not wait for it: its verdicts
    leave out "helps with the harmful request" until the probe is ready.
    """
    lm = preview_model()
    key = repr(sorted(lm.identity.to_dict().items()))
    with _PROBE_LOCK:
        entry = _PROBES.setdefault(key, {})
        if "probe" in entry:
            return entry["probe"]
        if "thread" not in entry:

            def train() -> None:
                from safesteer.judges.probe import reference_probe

                try:
                    entry["probe"] = reference_probe(lm)
                except Exception:  # the preview says the judge is not available; nothing else depends on it
                    log.warning("could not train the response probe", exc_info=True)

            entry["thread"] = threading.Thread(target=train, name="train-response-probe", daemon=True)
            entry["thread"].start()
            atexit.register(entry["thread"].join, PROBE_EXIT_WAIT_S)  # torch aborts if a thread runs at exit
    return None


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
    return inspect.isgeneratorfunction(fn)


def author_of(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "").strip() or "anonymous"


def plain_text(text: str) -> str:
    """Text for a Markdown component with Markdown and HTML characters neutralised."""
    escaped = html.escape(text, quote=False)
    for char in "\\`*_{}[]()#+!|~":
        escaped = escaped.replace(char, "\\" + char)
    return escaped


class Pace:
    """How fast long work goes on this machine: a reference guess (2 CPU cores) until a run here measures it.

    Estimates are made in reference seconds (what the work costs on the reference machine) and
    scaled by this machine's factor, which every finished run updates.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.factor = 1.0 if default_device() == "cpu" else 0.1
        self.measured = False

    def record(self, reference_seconds: float, elapsed: float) -> None:
        if reference_seconds > 0:
            self.factor, self.measured = elapsed / reference_seconds, True

    def about(self, reference_seconds: float) -> str:
        """ "about **40 s** (from the pace of …)", for the line shown before the author starts."""
        seconds = reference_seconds * self.factor
        shown = f"{max(5, round(seconds / 5) * 5):.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
        basis = f"this machine's last {self.what}" if self.measured else "a 2-core CPU"
        return f"about **{shown}** (from the pace of {basis})"


class BackgroundTask:
    """Long work in a worker thread, so the handler can stream a progress line with elapsed time and time left."""

    _active = 0  # tasks running now: start-up work stands aside for them
    _count_lock = threading.Lock()

    def __init__(self, work: Callable[[Callable[[float, str], None]], Any]) -> None:
        self.fraction, self.step, self.started = 0.0, "starting", time.monotonic()
        self._outcome: dict[str, Any] = {}
        self._worker = threading.Thread(target=self._run, args=(work,), daemon=True)
        with BackgroundTask._count_lock:
            BackgroundTask._active += 1
        self._worker.start()

    @classmethod
    def running(cls) -> bool:
        """Whether an author's long work (an extraction, an evaluation) is running now."""
        return cls._active > 0

    def _run(self, work: Callable[[Callable[[float, str], None]], Any]) -> None:
        try:
            self._outcome["result"] = work(self._report)
        except Exception as exc:  # handed to the handler's thread by result()
            self._outcome["error"] = exc
        finally:
            with BackgroundTask._count_lock:
                BackgroundTask._active -= 1

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
