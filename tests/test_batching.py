"""Continuous batching: requests with different steering decoded together, each exactly as alone."""

import queue
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from safesteer import batching, load_model
from safesteer.batching import CLOSED_WAIT_S, RUNNING_WAIT_S, Batcher, Job, QueueFull, answer_alone
from safesteer.int4 import int4_problem
from safesteer.steering import SteeringSpec
from server import ServeSettings
from tests.conftest import HARMFUL, SAFE
from tests.test_gates import _gate_for


def _spec(lm, seed, layer=1, strength=3.0):
    g = torch.Generator().manual_seed(seed)
    return SteeringSpec(torch.randn(lm.identity.hidden_size, generator=g) * 4, layer, strength)


@pytest.fixture()
def batcher(tiny_lm):
    b = Batcher(tiny_lm, max_batch=8, max_wait_s=0.2)
    yield b
    b.close()


def test_mixed_requests_in_one_batch_match_each_alone(tiny_lm, batcher):
    a, b = _spec(tiny_lm, 1), _spec(tiny_lm, 2, layer=2, strength=2.0)
    gated = replace(a, gate=_gate_for(tiny_lm, HARMFUL[1], SAFE[1], layer=2))
    jobs = [
        Job(HARMFUL[0], [a], ["weapons"], max_new_tokens=12),
        Job(SAFE[0], [], [], max_new_tokens=5),
        Job(HARMFUL[1], [a, b], ["weapons", "fraud"], max_new_tokens=12),
        Job([{"role": "system", "content": "Be brief."}, {"role": "user", "content": SAFE[2]}], [b], ["fraud"], 9),
        Job(HARMFUL[1], [gated], ["gated"], max_new_tokens=12),
        Job(SAFE[1], [gated], ["gated"], max_new_tokens=12),
    ]
    for job in jobs:
        batcher.submit(job)
    results = [job.result.result(timeout=60) for job in jobs]
    assert batcher.batches[-1] == len(jobs)  # answered together
    for job, result in zip(jobs, results, strict=True):
        assert result.text == answer_alone(tiny_lm, job)
        assert result.completion_tokens <= job.max_new_tokens
        assert "".join(job.stream(timeout=5)).strip() == result.text  # the streamed pieces, read afterwards
    assert results[4].fired == ("gated",) and results[5].fired == ()
    assert results[1].finish_reason in ("stop", "length") and results[1].completion_tokens <= 5


def test_streamed_pieces_add_up_to_the_answer(tiny_lm, batcher):
    job = batcher.submit(Job(HARMFUL[2], [_spec(tiny_lm, 3)], ["x"], max_new_tokens=16))
    pieces = list(job.stream(timeout=60))
    assert len(pieces) > 1 and "".join(pieces).strip() == job.result.result().text


class _RecordedWaits(queue.Queue):
    """A queue that notes how long each `get` was allowed to wait."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.waits: list[float] = []

    def get(self, block: bool = True, timeout: float | None = None) -> Job:
        if block and timeout is not None:
            self.waits.append(timeout)
        return super().get(block, timeout)


def test_an_idle_server_waits_for_company_only_as_long_as_its_batches_gain_from_it(tiny_lm, monkeypatch):
    """A request joins a running batch at its next step, so a lone request on an idle server waits only
    for those sent with it; a closed batch takes nobody once started, so there it waits longer."""
    recorded = SimpleNamespace(Queue=_RecordedWaits, Empty=queue.Empty, Full=queue.Full)
    monkeypatch.setattr(batching, "queue", recorded)
    idle = Batcher(tiny_lm, max_wait_s=ServeSettings().max_wait_s)  # as `safesteer serve` makes it
    try:
        idle.submit(Job(SAFE[0], max_new_tokens=2)).result.result(timeout=60)
    finally:
        idle.close()
    for_company = [w for w in idle._queue.waits if w < 0.1]  # 0.1 s: the idle worker's wait for a first request
    assert for_company and max(for_company) <= RUNNING_WAIT_S <= 0.005

    closed = Batcher(tiny_lm)
    closed.close()
    closed._queue = _RecordedWaits()
    closed._queue.put(Job(SAFE[0]))
    assert len(closed._gather(8, wait=True, company_s=CLOSED_WAIT_S)) == 1
    assert max(w for w in closed._queue.waits if w < 0.1) > RUNNING_WAIT_S


def test_a_full_queue_refuses_instead_of_waiting(tiny_lm):
    slow = Batcher(tiny_lm, max_batch=1, max_wait_s=0.0, max_queue=1)
    try:
        jobs, refused = [], 0
        for _ in range(6):
            try:
                jobs.append(slow.submit(Job(SAFE[0], max_new_tokens=30)))
            except QueueFull:
                refused += 1
        assert refused >= 1
        assert all(job.result.result(timeout=60).text for job in jobs)  # the accepted ones are all answered
    finally:
        slow.close()


def test_concurrent_submitters_get_their_own_answers(tiny_lm, batcher):
    specs = [[], [_spec(tiny_lm, 4)], [_spec(tiny_lm, 5, layer=3)]]
    prompts = [HARMFUL[3], SAFE[3], HARMFUL[4], SAFE[4]]
    expected = {
        (p, k): answer_alone(tiny_lm, Job(p, specs[k], ["c"] * len(specs[k]), 10)) for p in prompts for k in range(3)
    }
    got: dict[tuple[str, int], list[str]] = {key: [] for key in expected}
    start = threading.Barrier(len(expected))

    def client(key):
        start.wait()
        prompt, k = key
        for _ in range(2):
            job = batcher.submit(Job(prompt, specs[k], ["c"] * len(specs[k]), 10))
            got[key].append(job.result.result(timeout=120).text)

    threads = [threading.Thread(target=client, args=(key,)) for key in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {key: [text, text] for key, text in expected.items()}
    assert max(batcher.batches) > 1


def test_a_cancelled_request_never_stops_the_worker(tiny_lm, batcher):
    """A caller's timeout cancels its future while the batch runs; the worker must finish others and go on."""
    doomed = batcher.submit(Job(HARMFUL[0], max_new_tokens=40))
    doomed.result.cancel()  # what `asyncio.wait_for` did to a request that ran out of time
    neighbour = batcher.submit(Job(SAFE[0], max_new_tokens=6))
    assert neighbour.result.result(timeout=60).text == answer_alone(tiny_lm, neighbour)
    later = batcher.submit(Job(SAFE[1], max_new_tokens=6))
    assert later.result.result(timeout=60).text == answer_alone(tiny_lm, later)
    assert batcher.alive and batcher.restarts == 0


def test_a_cancelled_request_stops_generating_at_the_next_step(tiny_lm, batcher):
    job = batcher.submit(Job(HARMFUL[0], max_new_tokens=400))
    first = next(job.stream(timeout=60))
    job.cancel()
    assert first and list(job.stream(timeout=60)) is not None  # the stream ends
    done = batcher.submit(Job(SAFE[0], max_new_tokens=4))
    done.result.result(timeout=60)
    assert len(job.ids) < 60  # far from its 400 tokens: it left the batch when cancelled


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_is_restarted(tiny_lm, batcher, monkeypatch):
    def explode(*step_args):
        raise SystemExit  # beyond what `_run` catches: the thread ends

    monkeypatch.setattr(batcher, "_step", explode)
    lost = batcher.submit(Job(SAFE[0], max_new_tokens=4))
    batcher._worker.join(10)
    assert not batcher.alive
    monkeypatch.undo()
    job = batcher.submit(Job(SAFE[0], max_new_tokens=4))  # submitting restarts it
    assert job.result.result(timeout=60).text == answer_alone(tiny_lm, job)
    assert batcher.restarts == 1
    assert "the worker stopped" in str(lost.result.exception(timeout=5))  # told, not left waiting


def test_stop_strings_end_the_answer_and_never_reach_the_stream(tiny_lm, batcher):
    whole = batcher.submit(Job(HARMFUL[3], max_new_tokens=24)).result.result(timeout=60).text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    job = batcher.submit(Job(HARMFUL[3], max_new_tokens=24, stop=[stop]))
    streamed = "".join(job.stream(timeout=60))
    result = job.result.result(timeout=60)
    assert result.text == whole[: whole.find(stop)].strip() and result.finish_reason == "stop"
    assert stop not in streamed and streamed.strip() == result.text


def test_a_sampled_row_depends_on_its_seed_not_on_its_neighbours(tiny_lm, batcher):
    from safesteer.sampling import Sampling

    hot = Sampling(temperature=1.2, seed=21)
    alone = answer_alone(tiny_lm, Job(HARMFUL[4], max_new_tokens=12, sampling=hot))
    jobs = [
        Job(HARMFUL[4], max_new_tokens=12, sampling=hot),
        Job(HARMFUL[4], [_spec(tiny_lm, 5)], ["x"], max_new_tokens=12, sampling=Sampling(temperature=1.2, seed=8)),
        Job(HARMFUL[4], max_new_tokens=12),  # greedy beside sampled rows
    ]
    for job in jobs:
        batcher.submit(job)
    results = [job.result.result(timeout=60).text for job in jobs]
    assert results[0] == alone
    assert results[2] == answer_alone(tiny_lm, Job(HARMFUL[4], max_new_tokens=12))


def test_a_short_request_joins_the_running_batch_instead_of_waiting(tiny_lm, batcher):
    """Iteration-level scheduling: a 4-token request sent while a 300-token one runs is answered first."""
    long = batcher.submit(Job(HARMFUL[0], max_new_tokens=300))
    next(long.stream(timeout=60))  # the long one is decoding
    short = batcher.submit(Job(SAFE[0], [_spec(tiny_lm, 4)], ["x"], max_new_tokens=4))
    answer = short.result.result(timeout=60)
    assert not long.result.done()  # still going: the short one did not wait for it
    assert answer.text == answer_alone(tiny_lm, short)
    assert long.result.result(timeout=120).text == answer_alone(tiny_lm, long)  # joining changed nothing for it


@pytest.mark.skipif(int4_problem() is not None, reason="int4 kernel unavailable")
def test_int4_answers_do_not_depend_on_neighbours_or_prompt_lengths(tiny_folder):
    """The product's default CPU precision: prompts of other lengths and other policies beside a row change nothing."""
    lm = load_model(str(tiny_folder), "int4", device="cpu")
    prompts = [SAFE[0], HARMFUL[3], SAFE[5] + " Please answer in detail.", HARMFUL[0], SAFE[2] + " Why?"]
    assert len({len(lm.encode([p])["input_ids"][0]) for p in prompts}) > 2
    jobs = [Job(p, [_spec(lm, k)] if k % 2 else [], ["x"] if k % 2 else [], 16) for k, p in enumerate(prompts)]
    batcher = Batcher(lm, max_batch=8, max_wait_s=0.2)
    try:
        for job in jobs:
            batcher.submit(job)
        results = [job.result.result(timeout=60).text for job in jobs]
    finally:
        batcher.close()
    assert max(batcher.batches) == len(jobs)
    assert results == [answer_alone(lm, job) for job in jobs]


class _Rows:
    """A stand-in running batch: `finishing` rows about to end among `rows`."""

    def __init__(self, rows: int, finishing: int) -> None:
        self.rows, self.near = rows, finishing

    def __len__(self) -> int:
        return self.rows

    def finishing(self, within: int) -> list[int]:
        return list(range(self.near))


def test_the_fast_lane_serves_rows_about_to_finish_within_its_share_of_time():
    """Lane steps spend what full steps earn (`share` of their time, at most `burst` steps' worth): no starvation."""
    from safesteer.batching import FastLane

    lane = FastLane(within=16, share=0.5, burst=4.0)
    mixed = _Rows(rows=8, finishing=1)
    assert lane.choose(mixed) is None  # nothing earned yet: a full step first
    lane.record(None, 0.060)
    assert lane.choose(mixed) == 16
    assert lane.choose(_Rows(rows=8, finishing=0)) is None  # nobody about to finish
    assert lane.choose(_Rows(rows=3, finishing=3)) is None  # everyone is: that is a full step
    lane.record(16, 0.020)
    assert lane.choose(mixed) == 16  # 10 ms of credit left
    lane.record(16, 0.020)
    assert lane.choose(mixed) is None  # spent: the long rows' turn
    for _ in range(100):  # a long quiet stretch earns at most `burst` full steps' worth
        lane.record(None, 0.060)
    assert lane.credit == pytest.approx(0.240)
    # a stream of short requests: lane steps never take more than share / (1 + share) of the time
    lane, lane_time, full_time = FastLane(within=16, share=0.5), 0.0, 0.0
    for _ in range(1000):
        within = lane.choose(mixed)
        seconds = 0.060 if within is None else 0.015
        lane.record(within, seconds)
        lane_time, full_time = (lane_time + seconds, full_time) if within else (lane_time, full_time + seconds)
    assert 0.30 < lane_time / (lane_time + full_time) <= 0.5 / 1.5 + 0.01


def test_a_short_request_takes_its_prompt_pass_before_a_long_one_that_came_with_it(tiny_lm, batcher, monkeypatch):
    """Shortest work first: the long request's pass waits until the short one, about to finish, has."""
    from safesteer.decoding import RunningBatch

    admitted = []
    real = RunningBatch.admit
    monkeypatch.setattr(
        RunningBatch,
        "admit",
        lambda self, ids, specs, **options: (
            admitted.append(list(options["max_new_tokens"])) or real(self, ids, specs, **options)
        ),
    )
    long, short = Job(SAFE[0], max_new_tokens=120), Job(SAFE[1], max_new_tokens=4)
    batcher.submit(long)
    batcher.submit(short)  # within the batcher's 0.2 s wait: taken from the queue together
    answers = short.result.result(timeout=60), long.result.result(timeout=120)
    assert admitted == [[4], [120]]
    assert [answer.text for answer in answers] == [answer_alone(tiny_lm, short), answer_alone(tiny_lm, long)]


def test_waiting_requests_take_their_pass_shortest_work_first(batcher):
    """Requests about to finish once started go first; a long one waits for a quiet moment, not for ever."""
    from safesteer.batching import HOLD_S

    class Running:  # a running batch whose rows have these many tokens left
        def __init__(self, *left):
            self.left = left

        def finishing(self, within):
            return [row for row, n in enumerate(self.left) if n <= within]

    short, long = Job(SAFE[0], max_new_tokens=4), Job(SAFE[1], max_new_tokens=300)
    choose = batcher._next_admissions
    assert choose(Running(), {}, [long, short]) == [short]
    assert choose(Running(250), {1: long}, [long, short]) == [short]
    assert choose(Running(250, 3), {1: long, 2: short}, [long]) == []  # a request is about to finish
    assert choose(Running(250), {1: long}, [long]) == [long]
    long.arrived -= HOLD_S + 0.1
    assert choose(Running(250, 3), {1: long, 2: short}, [long, short]) == [long, short]  # waited long enough
