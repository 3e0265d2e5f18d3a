"""Continuous batching: concurrent requests, each with its own steering, decoded in one running batch.

A server receives requests one by one, each with its own policy version (or none). Generating them
one after another wastes the model: a decode step of a small model costs about the same for one row
as for eight. The `Batcher` keeps one `decoding.RunningBatch`: a new request joins it at the next
decoding step, after a prompt pass it shares with the requests that arrived with it (iteration-level
scheduling), and leaves it as soon as it is done, so a short request is never held behind a long one;
requests about to finish take their pass first (`Batcher._next_admissions`). Each request's steering
becomes its own rows' strengths and its gates are read from its own prompt; decoding steps never pad,
and prompt passes share one padded pass only where that is exact (`RunningBatch.admit`), so a request
gets exactly the tokens it gets alone, whatever its neighbours (the tests compare them token for token).

Requests stream: each step's new token goes to its request's queue as soon as the batch makes it.

Nothing one request does can stop the others: a request cancelled by its caller (a timeout, a client
that went away) leaves the batch at the next step; a finished request's future is never set twice;
and the worker thread survives any error in a step, and is restarted by `Batcher.ensure_running` if
it dies anyway.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import decoding
from .decoding import RunningBatch
from .errors import SafeSteerError
from .gates import GateReading
from .generation import _eos_ids, check_prompt_lengths, generate_ids
from .models import LoadedModel, Prompt
from .prompt_passes import template_start
from .sampling import Sampling
from .steering import SteeringSpec
from .threads import use_cores

log = logging.getLogger(__name__)

RECENT_BATCHES = 10_000
HOLD_S = 1.0
"""Longest a long request's prompt pass waits while shorter work goes first."""
RUNNING_WAIT_S = 0.005
"""How long an idle running batch waits for company: a later request joins at the next step anyway,
so only requests sent together are worth gathering into one prompt pass (a lone one pays this)."""
CLOSED_WAIT_S = 0.05
"""How long a closed batch waits for company: once started it takes nobody until it is done."""


class QueueFull(SafeSteerError):
    """More requests are waiting than the server accepts; the client should retry later."""


@dataclass(frozen=True)
class Completion:
    """A finished request: its text, token counts, why it stopped, and which of its categories' gates fired."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text) or "length" (max tokens)
    fired: tuple[str, ...]


@dataclass
class Job:
    """One request: a chat prompt, its steering (named, for reporting), and how many tokens it may have."""

    prompt: Prompt
    specs: Sequence[SteeringSpec] = ()
    names: Sequence[str] = ()  # one per spec: the category each spec comes from
    max_new_tokens: int = 64
    stop: Sequence[str] = ()  # the answer ends before the first of these strings
    sampling: Sampling | None = None  # None: greedy
    deltas: queue.Queue[str | None] = field(default_factory=queue.Queue)  # text pieces as they come; None: done
    result: Future[Completion] = field(default_factory=Future)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0  # set by an engine that counts them as it admits the request
    fired: list[str] = field(default_factory=list)  # the categories whose gates fired, set at admission
    arrived: float = field(default_factory=time.monotonic)  # when it was made: how long it has waited

    def visible(self, text: str) -> tuple[str, bool]:
        """What of `text` may be shown now, and whether a stop string ended it.

        Text that could still turn into a stop string is held back, so a stop string never reaches
        the client, not even in part while streaming.
        """
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            return text[: min(cuts)], True
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - held], False

    def show(self, text: str) -> bool:
        """Stream what of the answer so far may be shown (whole characters, no stop string, not even in
        part); True when a stop string ended the answer."""
        if text.endswith("\ufffd"):  # a character still cut in half
            return False
        shown, stopped = self.visible(text)
        if shown.startswith(self.text) and len(shown) > len(self.text):
            self.deltas.put(shown[len(self.text) :])
            self.text = shown
        return stopped

    def finish(self, whole: str, prompt_tokens: int, fired: Sequence[str]) -> None:
        """Settle with the whole answer `whole`: held-back text that did not become a stop string is shown too."""
        text, stopped = self.visible(whole)
        text = text if stopped else whole
        if text != self.text:
            self.deltas.put(text[len(self.text) :] if text.startswith(self.text) else text)
        length = len(self.ids) >= self.max_new_tokens and not stopped
        self.settle(
            Completion(
                text=text.strip(),
                prompt_tokens=prompt_tokens,
                completion_tokens=len(self.ids),
                finish_reason="length" if length else "stop",
                fired=tuple(fired),
            )
        )

    def cancel(self) -> None:
        """Nobody waits for this answer any more: its rows stop at the next decoding step."""
        self.cancelled.set()
        self.result.cancel()

    def settle(self, completion: Completion | None = None, error: BaseException | None = None) -> None:
        """Finish the request once: a future already cancelled or set is left as it is."""
        self.deltas.put(None)
        if self.result.done():
            return
        try:
            if error is not None:
                self.result.set_exception(error)
            else:
                self.result.set_result(completion)  # type: ignore[arg-type]
        except InvalidStateError:  # cancelled by its caller between the check and the set
            pass

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces as the batch produces them; then `result` holds the whole completion."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                piece = self.deltas.get(timeout=left)
            except queue.Empty:
                raise TimeoutError("the request took longer than its time limit") from None
            if piece is None:
                return
            yield piece


def _merge(jobs: Sequence[Job]) -> tuple[list[SteeringSpec], list[list[tuple[int, str]]]]:
    """One spec per distinct (vector, layer, site, gate) with a strength per row; and per spec, its (row, name)s."""
    merged: dict[tuple[int, int, str, int], tuple[SteeringSpec, list[float], list[tuple[int, str]]]] = {}
    rows = len(jobs)
    for row, job in enumerate(jobs):
        for spec, name in zip(job.specs, job.names, strict=True):
            key = (id(spec.vector), spec.layer, spec.site, id(spec.gate))
            if key not in merged:
                merged[key] = (spec, [0.0] * rows, [])
            _, strengths, users = merged[key]
            strengths[row] += spec.strengths()[0]
            users.append((row, name))
    specs = [replace(base, strength=tuple(strengths)) for base, strengths, _ in merged.values()]
    return specs, [users for _, _, users in merged.values()]


def _fired_names(
    specs: Sequence[SteeringSpec], users: Sequence[Sequence[tuple[int, str]]], reading: GateReading | None, rows: int
) -> list[list[str]]:
    """Per row, the categories whose gates fired on it (`_merge`'s specs and users, the batch's reading)."""
    fired: list[list[str]] = [[] for _ in range(rows)]
    gated = [k for k, spec in enumerate(specs) if spec.gated and not spec.is_noop()]
    for position, k in enumerate(gated):
        for row, name in users[k]:
            if reading is not None and reading.fired[row][position]:
                fired[row].append(name)
    return fired


class _NobodyWaits(Exception):
    """Raised from the streamer to end a batch early: every request in it is finished or cancelled."""


class _Dispatch:
    """A streamer for the batch: hands each row's new token to its job, and finishes jobs that are done."""

    def __init__(self, lm: LoadedModel, jobs: Sequence[Job]) -> None:
        self.lm = lm
        self.jobs = jobs
        self.eos = set(_eos_ids(lm))
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids
            self._prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist(), strict=True):
            if job.cancelled.is_set():
                job.done = True
            if job.done:
                continue
            if token in self.eos:
                job.done = True
                continue
            job.ids.append(int(token))
            stopped = job.show(self.lm.tokenizer.decode(job.ids, skip_special_tokens=True))
            if stopped or len(job.ids) >= job.max_new_tokens:
                job.done = True
        if all(job.done for job in self.jobs):
            raise _NobodyWaits

    def end(self) -> None:
        pass


@dataclass
class FastLane:
    """Rows about to finish take steps on their own, within a share of the time, so short requests stay short.

    Among long requests, a short one would pay the whole batch's step for each of its few tokens
    (about 55 ms for 8 rows of the embedded int4 model on 2 cores, against 15 ms for its row alone).
    Stepping the rows that finish within `within` tokens on their own serves them first (shortest
    remaining work first). The other rows wait meanwhile, within a budget: every full step earns the
    lane `share` times its own time, up to `burst` full steps' worth, and lane steps spend it. So
    a short request usually finishes in one burst, while a stream of them never takes more than
    share / (1 + share) of the decoding time (a third by default): long rows are slowed, never
    starved. A row's tokens do not change either way.
    """

    within: int = 16
    share: float = 0.5
    burst: float = 4.0
    credit: float = 0.0  # seconds of lane steps the full steps have earned and the lane not spent

    def choose(self, running: RunningBatch) -> int | None:
        """`within` for a lane step now, or None for a step of every row."""
        finishing = len(running.finishing(self.within))
        if finishing in (0, len(running)) or self.credit <= 0:
            return None
        return self.within

    def record(self, within: int | None, seconds: float) -> None:
        """Account for a step just taken: a full one (`within` None) earns, a lane one spends."""
        if within is None:
            self.credit = min(self.credit + self.share * seconds, self.burst * seconds)
        else:
            self.credit -= seconds


class Batcher:
    """Answers submitted jobs in batches on one worker thread (the model runs one batch at a time)."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch: int = 16,
        max_wait_s: float | None = None,
        max_queue: int = 64,
        cores: int | None = None,
        fast_lane: bool = True,
    ) -> None:
        self.lm = lm
        self.fast_lane = fast_lane  # `FastLane`: requests about to finish step on their own
        self.cores = cores  # PyTorch threads for the worker (`threads.serial_main_thread`); None: as they are
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s  # None: `RUNNING_WAIT_S` or `CLOSED_WAIT_S`, as the worker batches
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        # Sizes of the latest batches run (tests, benchmarks); bounded, since a server runs for weeks.
        self.batches: deque[int] = deque(maxlen=RECENT_BATCHES)
        self.restarts = 0
        self.failed_batches = 0
        self._worker = self._start_worker()

    def _start_worker(self) -> threading.Thread:
        worker = threading.Thread(target=self._run, name="safesteer-batcher", daemon=True)
        worker.start()
        return worker

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def ensure_running(self) -> bool:
        """Restart the worker if it died (it should not: `_run` keeps going after any error); True if running."""
        if not self._worker.is_alive() and not self._closing.is_set():
            log.error("the batching worker had stopped; starting a new one")
            self.restarts += 1
            self._worker = self._start_worker()
        return self._worker.is_alive()

    def submit(self, job: Job) -> Job:
        if self._closing.is_set():
            raise SafeSteerError("the server is shutting down")
        self.ensure_running()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting; retry shortly") from None
        return job

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, finish the ones already taken, then stop the worker."""
        self._closing.set()
        self._worker.join(timeout)

    def _gather(self, room: int, wait: bool, company_s: float = RUNNING_WAIT_S) -> list[Job]:
        """Up to `room` waiting jobs; when idle, wait for the first, then `company_s` for those arriving with it."""
        jobs: list[Job] = []
        if wait:
            try:
                jobs.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
        company_s = company_s if self.max_wait_s is None else self.max_wait_s
        deadline = time.monotonic() + (company_s if wait else 0.0)
        while len(jobs) < room:
            left = deadline - time.monotonic()
            try:
                jobs.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _run(self) -> None:
        use_cores(self.cores)
        if not decoding.supports(self.lm):  # a GPU, or a layer structure the lean loop does not reproduce
            self._run_closed()
            return
        template_start(self.lm).exact()  # checked once, before the first request rather than during it
        running = RunningBatch(self.lm, eos_token_ids=_eos_ids(self.lm))
        active: dict[int, Job] = {}
        held: list[Job] = []  # taken from the queue, not yet admitted
        lane = FastLane() if self.fast_lane else None
        while not (self._closing.is_set() and self._queue.empty() and not active and not held):
            try:
                room = self.max_batch - len(active) - len(held)
                if room > 0:
                    held += self._gather(room, wait=not active and not held)
                # Rows about to finish go first, before new requests' prompt passes: theirs is the
                # least work left (a prompt pass costs as much as several of their steps).
                within = lane.choose(running) if lane is not None and active else None
                chosen = self._next_admissions(running, active, held) if within is None else []
                if chosen:
                    taken = {id(job) for job in chosen}
                    held = [job for job in held if id(job) not in taken]
                    self._admit(running, active, chosen)
                if active:
                    if within is None and lane is not None:
                        within = lane.choose(running)  # a request just admitted may be about to finish
                    started = time.perf_counter()
                    self._step(running, active, within)
                    if lane is not None:
                        lane.record(within, time.perf_counter() - started)
            except BaseException as exc:  # a step's failure is its requests' failure, never the worker's
                self.failed_batches += 1
                log.error("a decoding step failed", exc_info=exc)
                for job in [*active.values(), *held]:
                    job.settle(error=exc if isinstance(exc, Exception) else SafeSteerError("the worker stopped"))
                active.clear()
                held = []
                running = RunningBatch(self.lm, eos_token_ids=_eos_ids(self.lm))
                if not isinstance(exc, Exception):
                    raise  # the thread ends; `ensure_running` starts another

    def _next_admissions(self, running: RunningBatch, active: dict[int, Job], held: Sequence[Job]) -> list[Job]:
        """Which waiting requests take their prompt pass now: shortest work first.

        Requests that finish within the fast lane's reach once started go first, together. A long
        request's pass waits until no running request is about to finish, `HOLD_S` at most.
        """
        if not held or any(time.monotonic() - job.arrived > HOLD_S for job in held):
            return list(held)
        soon = [job for job in held if job.max_new_tokens <= FastLane.within]
        if soon:
            return soon
        return [] if active and running.finishing(FastLane.within) else list(held)

    def _admit(self, running: RunningBatch, active: dict[int, Job], jobs: Sequence[Job]) -> None:
        """One prompt pass for newly arrived jobs (prompts of several lengths share it where that is
        exact, see `RunningBatch.admit`); their rows join at the next step."""
        admitted: list[tuple[Job, torch.Tensor]] = []
        for job in jobs:
            if job.cancelled.is_set():
                job.settle()  # went away while waiting: never starts
                continue
            try:
                ids = self.lm.encode([job.prompt])["input_ids"]
                check_prompt_lengths([ids.shape[1]])
            except Exception as exc:  # this request's own problem (a prompt too long, say)
                job.settle(error=exc)
                continue
            admitted.append((job, ids[0]))
        if not admitted:
            return
        jobs = [job for job, _ in admitted]
        specs, users = _merge(jobs)
        try:
            reading = running.admit(
                [ids for _, ids in admitted],
                specs,
                owners=[id(job) for job in jobs],
                max_new_tokens=[job.max_new_tokens for job in jobs],
                sampling=[job.sampling for job in jobs],
            )
        except Exception as exc:  # these requests' own problem (a gate that does not fit, say)
            for job in jobs:
                job.settle(error=exc)
            return
        for job, names in zip(jobs, _fired_names(specs, users, reading, len(jobs)), strict=True):
            job.fired.extend(names)
        for job, ids in admitted:
            job.prompt_tokens = int(ids.shape[0])
            active[id(job)] = job
        self.batches.append(len(active))

    def _step(self, running: RunningBatch, active: dict[int, Job], within: int | None = None) -> None:
        """One decoding step: each running job gets its next token; finished and cancelled jobs leave.

        `within`: only the jobs about to finish take this step (`FastLane`).
        """
        gone = {owner for owner, job in active.items() if job.cancelled.is_set()}
        if gone:
            running.drop(gone)
            for owner in gone:
                active.pop(owner).settle()
        eos = running.eos
        done: set[int] = set()
        for owner, token, finished in running.step(within):
            if owner in done:
                continue  # a stop string ended it at the step's first token
            job = active[owner]
            if token not in eos:
                job.ids.append(token)
                stopped = job.show(self.lm.tokenizer.decode(job.ids, skip_special_tokens=True))
                finished = finished or stopped or len(job.ids) >= job.max_new_tokens
            if finished:
                done.add(owner)
        still_running = done & set(running.owners)  # a stop string ended them before their budget
        if still_running:
            running.drop(still_running)
        for owner in done:
            job = active.pop(owner)
            job.finish(self.lm.tokenizer.decode(job.ids, skip_special_tokens=True), job.prompt_tokens, job.fired)

    def _run_closed(self) -> None:
        """Batches closed once started, for models the running batch does not cover (transformers' generate)."""
        while not (self._closing.is_set() and self._queue.empty()):
            jobs = []
            for job in self._gather(self.max_batch, wait=True, company_s=CLOSED_WAIT_S):
                if job.cancelled.is_set():
                    job.settle()  # went away while waiting: never starts
                else:
                    jobs.append(job)
            if not jobs:
                continue
            try:
                self._answer_closed(jobs)
            except BaseException as exc:  # a batch's failure is its requests' failure, never the worker's
                self.failed_batches += 1
                log.error("a batch failed", exc_info=exc)
                for job in jobs:
                    job.settle(error=exc if isinstance(exc, Exception) else SafeSteerError("the worker stopped"))
                if not isinstance(exc, Exception):
                    raise  # the thread ends; `ensure_running` starts another

    def _answer_closed(self, jobs: list[Job]) -> None:
        self.batches.append(len(jobs))
        try:
            specs, users = _merge(jobs)
            readings: list[GateReading] = []
            batch_prompts = [job.prompt for job in jobs]
            prompt_tokens = self.lm.encode(batch_prompts)["attention_mask"].sum(dim=1).tolist()
            generate_ids(
                self.lm,
                batch_prompts,
                specs,
                max_new_tokens=max(job.max_new_tokens for job in jobs),
                streamer=_Dispatch(self.lm, jobs),
                gate_readings=readings,
                sampling=[job.sampling for job in jobs],
            )
        except _NobodyWaits:
            pass  # every request has what it asked for, or went away
        except Exception as exc:  # every waiting request hears about it
            for job in jobs:
                job.settle(error=exc)
            return
        fired = _fired_names(specs, users, readings[0] if readings else None, len(jobs))
        for row, job in enumerate(jobs):
            job.finish(self.lm.tokenizer.decode(job.ids, skip_special_tokens=True), int(prompt_tokens[row]), fired[row])


def answer_alone(lm: LoadedModel, job: Job) -> str:
    """What one job gets without batching (the reference the batcher must match)."""
    new = generate_ids(lm, [job.prompt], list(job.specs), max_new_tokens=job.max_new_tokens, sampling=[job.sampling])
    ids = new[0].tolist()
    eos = set(_eos_ids(lm))
    kept: list[Any] = []
    for token in ids:
        if token in eos:
            break
        kept.append(token)
    return str(lm.tokenizer.decode(kept, skip_special_tokens=True)).strip()
