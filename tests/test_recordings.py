"""The recording cache: a cached recording is the recording, found again in memory, on disk and after damage."""

import pytest
import torch

from safesteer import recordings
from safesteer.activations import record_activations
from safesteer.extraction import (
    PolicyGateSets,
    gate_negatives_ready,
    pool_ready,
    warm_gate_negatives,
    warm_policy_pool,
)
from safesteer.vectors import ExtractionSettings
from tests.conftest import HARMFUL, SAFE


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path))
    recordings.forget_memory()
    yield tmp_path / "recordings"
    recordings.forget_memory()


@pytest.fixture()
def passes(monkeypatch):
    """How many recordings really ran a forward pass."""
    count = {"n": 0}
    real = recordings.record_activations

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(recordings, "record_activations", counting)
    return count


def test_a_cached_recording_equals_a_fresh_one_and_runs_once(tiny_lm, cache, passes):
    fresh = record_activations(tiny_lm, SAFE, token="mean")
    first = recordings.cached_recording(tiny_lm, SAFE, token="mean")
    again = recordings.cached_recording(tiny_lm, SAFE, token="mean")
    assert torch.equal(first, fresh) and torch.equal(again, fresh)
    assert passes["n"] == 1
    recordings.forget_memory()  # a restart: found on disk
    assert torch.equal(recordings.cached_recording(tiny_lm, SAFE, token="mean"), fresh)
    assert passes["n"] == 1 and len(list(cache.glob("*.safetensors"))) == 1


def test_other_prompts_order_or_token_are_other_recordings(tiny_lm, cache, passes):
    recordings.cached_recording(tiny_lm, SAFE, token="mean")
    assert not recordings.is_cached(tiny_lm, SAFE[::-1], site="residual", token="mean")
    assert not recordings.is_cached(tiny_lm, SAFE, site="residual", token="last")
    assert recordings.is_cached(tiny_lm, SAFE, site="residual", token="mean")
    recordings.cached_recording(tiny_lm, SAFE[:-1], token="mean")
    assert passes["n"] == 2


def test_a_damaged_file_is_recorded_again(tiny_lm, cache, passes):
    fresh = recordings.cached_recording(tiny_lm, SAFE, token="mean")
    recordings.forget_memory()
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(recordings.cached_recording(tiny_lm, SAFE, token="mean"), fresh)
    assert passes["n"] == 2


def test_memory_and_disk_keep_the_most_recently_used_within_their_sizes(tiny_lm, cache, monkeypatch):
    one = recordings.cached_recording(tiny_lm, SAFE[:4], token="mean")
    size = one.numel() * one.element_size()
    monkeypatch.setattr(recordings, "MEMORY_BYTES", 2 * size)
    monkeypatch.setattr(recordings, "DISK_BYTES", 2 * (next(cache.glob("*.safetensors")).stat().st_size + 100))
    for n in (5, 6, 7):  # each a little larger than the one before
        recordings.cached_recording(tiny_lm, SAFE[:n], token="mean")
    assert len(list(cache.glob("*.safetensors"))) < 4  # the oldest file went
    assert sum(t.numel() * t.element_size() for t in recordings._memory.values()) <= 2 * size


def _recorded_cold(lm, cache, warmed: PolicyGateSets, settings: ExtractionSettings) -> PolicyGateSets:
    """The same sets recorded again with an empty cache; every recording must equal the cached one."""
    recordings.forget_memory()
    for path in cache.glob("*.safetensors"):
        path.unlink()
    cold = PolicyGateSets.record(lm, HARMFUL, SAFE, settings)
    for name, values in cold.activations.items():
        assert torch.equal(warmed.activations[name], values), name
    return cold


def test_warming_up_makes_the_gate_record_only_the_policys_own_prompts(tiny_lm, cache, passes):
    settings = ExtractionSettings()
    assert not gate_negatives_ready(tiny_lm, SAFE, settings)
    warm_gate_negatives(tiny_lm, SAFE, settings)
    assert gate_negatives_ready(tiny_lm, SAFE, settings) and passes["n"] == 3
    warmed = PolicyGateSets.record(tiny_lm, HARMFUL, SAFE, settings)
    assert passes["n"] == 5  # the negatives came from the cache; the pool, plain and framed, was recorded
    cold = _recorded_cold(tiny_lm, cache, warmed, settings)
    gate_warm, gate_cold = warmed.gate_for(HARMFUL, settings), cold.gate_for(HARMFUL, settings)
    assert gate_warm.layer == gate_cold.layer and gate_warm.threshold == gate_cold.threshold


def test_a_warmed_pool_makes_the_extraction_record_nothing_for_its_gate(tiny_lm, cache, passes):
    """A built-in category's pool, recorded at start-up, is the very recording its extraction makes."""
    settings = ExtractionSettings()
    warm_gate_negatives(tiny_lm, SAFE, settings)
    assert not pool_ready(tiny_lm, HARMFUL, (), settings)
    warm_policy_pool(tiny_lm, HARMFUL, settings)
    assert pool_ready(tiny_lm, HARMFUL, (), settings) and passes["n"] == 5
    assert not pool_ready(tiny_lm, HARMFUL, SAFE[:1], settings)  # another policy's pool is another recording
    warmed = PolicyGateSets.record(tiny_lm, HARMFUL, SAFE, settings)
    assert passes["n"] == 5  # nothing recorded: every set came from the cache
    _recorded_cold(tiny_lm, cache, warmed, settings)
