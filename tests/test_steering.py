import itertools
import threading

import pytest
import torch

from safesteer import SafeSteerError, SteeringSpec, generate, generate_side_by_side, steer
from safesteer.generation import generate_strength_sweep
from tests.conftest import HARMFUL, SAFE

PROMPT = HARMFUL[0]


def _vector(lm, seed=1, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.identity.hidden_size, generator=g) * scale


def _hooks(lm):
    """Every forward hook on the model (transformers installs some of its own; those stay)."""
    return {(name, key) for name, module in lm.model.named_modules() for key in module._forward_hooks}


def _logits(lm, prompts):
    with torch.inference_mode():
        return lm.model(**lm.encode(prompts)).logits


def test_strength_zero_is_exactly_unsteered(tiny_lm):
    plain = _logits(tiny_lm, [PROMPT])
    with steer(tiny_lm, [SteeringSpec(_vector(tiny_lm), layer=1, strength=0.0)]):
        zero = _logits(tiny_lm, [PROMPT])
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("site", ["residual", "attention"])
def test_steering_changes_output_and_hooks_are_removed(tiny_lm, site):
    before = _hooks(tiny_lm)
    plain = _logits(tiny_lm, [PROMPT])
    with steer(tiny_lm, [SteeringSpec(_vector(tiny_lm), layer=1, strength=2.0, site=site)]):
        steered = _logits(tiny_lm, [PROMPT])
    assert not torch.allclose(plain, steered)
    assert torch.equal(_logits(tiny_lm, [PROMPT]), plain)
    assert _hooks(tiny_lm) == before


def test_hooks_are_removed_when_the_block_raises(tiny_lm):
    before = _hooks(tiny_lm)
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_lm, [SteeringSpec(_vector(tiny_lm), 2, 3.0)]):
        raise RuntimeError("boom")
    assert _hooks(tiny_lm) == before


def test_vectors_add_up(tiny_lm):
    v = _vector(tiny_lm)
    with steer(tiny_lm, [SteeringSpec(v, layer=1, strength=1.0)]):
        once = _logits(tiny_lm, [PROMPT])
    with steer(tiny_lm, [SteeringSpec(v, layer=1, strength=0.5), SteeringSpec(v, layer=1, strength=0.5)]):
        halves = _logits(tiny_lm, [PROMPT])
    torch.testing.assert_close(once, halves, atol=1e-4, rtol=1e-4)


def test_per_row_strength_zero_row_equals_unsteered_generation(tiny_lm):
    spec = SteeringSpec(_vector(tiny_lm), layer=1, strength=3.0)
    for prompt in (PROMPT, SAFE[0], SAFE[3]):
        alone = generate(tiny_lm, [prompt], max_new_tokens=20)[0]
        side = generate_side_by_side(tiny_lm, prompt, [spec], max_new_tokens=20)
        assert side.naive == alone
        assert side.steered != side.naive
        steered_alone = generate(tiny_lm, [prompt], [spec], max_new_tokens=20)[0]
        assert side.steered == steered_alone


def test_strength_sweep_in_one_batch(tiny_lm):
    spec = SteeringSpec(_vector(tiny_lm), layer=1)
    outs = generate_strength_sweep(tiny_lm, PROMPT, spec, [0.0, 1.0, 3.0], max_new_tokens=12)
    assert outs[0] == generate(tiny_lm, [PROMPT], max_new_tokens=12)[0]
    assert len(set(outs)) > 1


def test_concurrent_requests_do_not_leak(tiny_lm):
    spec = SteeringSpec(_vector(tiny_lm), layer=1, strength=3.0)
    expected_plain = generate(tiny_lm, [SAFE[1]], max_new_tokens=16)[0]
    expected_steered = generate(tiny_lm, [SAFE[1]], [spec], max_new_tokens=16)[0]
    assert expected_plain != expected_steered
    results: dict[str, list[str]] = {"plain": [], "steered": []}
    start = threading.Barrier(2)

    def worker(kind):
        start.wait()
        for _ in range(6):
            specs = [spec] if kind == "steered" else []
            results[kind].append(generate(tiny_lm, [SAFE[1]], specs, max_new_tokens=16)[0])

    threads = [threading.Thread(target=worker, args=(k,)) for k in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["plain"] == [expected_plain] * 6
    assert results["steered"] == [expected_steered] * 6


def test_bad_specs_are_refused_before_anything_is_installed(tiny_lm):
    before = _hooks(tiny_lm)
    with (
        pytest.raises(SafeSteerError, match="does not fit this model"),
        steer(tiny_lm, [SteeringSpec(torch.ones(7), 1)]),
    ):
        pass
    with pytest.raises(SafeSteerError, match="out of range"), steer(tiny_lm, [SteeringSpec(_vector(tiny_lm), 99)]):
        pass
    with pytest.raises(SafeSteerError, match="strengths given"):
        generate(tiny_lm, [PROMPT, SAFE[0]], [SteeringSpec(_vector(tiny_lm), 1, strength=(1.0, 2.0, 3.0))])
    assert _hooks(tiny_lm) == before


def test_streaming_yields_growing_rows_and_ends_with_the_batch_result(tiny_lm):
    from safesteer.generation import generate_stream

    spec = SteeringSpec(_vector(tiny_lm), layer=1, strength=(0.0, 3.0))
    steps = list(generate_stream(tiny_lm, [PROMPT, PROMPT], [spec], max_new_tokens=12))
    assert len(steps) > 2
    assert steps[-1] == generate(tiny_lm, [PROMPT, PROMPT], [spec], max_new_tokens=12)
    assert steps[-1][0] == generate(tiny_lm, [PROMPT], max_new_tokens=12)[0]
    growing = steps[:-1]  # one item per decoding step, then the final result
    assert all(len(a[0]) <= len(b[0]) + 1 for a, b in itertools.pairwise(growing))
