import pytest
import torch

from safesteer import record_activations
from tests.conftest import HARMFUL, SAFE


@pytest.mark.parametrize("site", ["residual", "attention"])
@pytest.mark.parametrize("token", ["last", "mean"])
def test_padding_does_not_change_activations(tiny_lm, site, token):
    prompts = [HARMFUL[0], "Hi", SAFE[2], "A much longer prompt that forces plenty of left padding on the others."]
    batched = record_activations(tiny_lm, prompts, site=site, token=token, batch_size=4)
    for i, prompt in enumerate(prompts):
        alone = record_activations(tiny_lm, [prompt], site=site, token=token)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


def test_shape_and_input_order_survive_length_sorting(tiny_lm):
    prompts = ["short", "a considerably longer prompt than the first", "mid length one"]
    acts = record_activations(tiny_lm, prompts, batch_size=2)
    assert acts.shape == (3, tiny_lm.identity.n_layers, tiny_lm.identity.hidden_size)
    assert acts.dtype == torch.float32
    reversed_acts = record_activations(tiny_lm, prompts[::-1], batch_size=2)
    torch.testing.assert_close(acts, reversed_acts.flip(0), atol=1e-4, rtol=1e-4)


def test_residual_matches_hidden_states_of_a_plain_forward(tiny_lm):
    """The residual site is each decoder layer's output: hidden_states[i + 1] of a plain forward."""
    prompt = SAFE[0]
    acts = record_activations(tiny_lm, [prompt], site="residual", token="last")
    batch = tiny_lm.encode([prompt])
    with torch.inference_mode():
        out = tiny_lm.model(**batch, output_hidden_states=True)
    n_layers = tiny_lm.identity.n_layers
    for layer in range(n_layers - 1):  # the last entry has the final norm applied
        torch.testing.assert_close(acts[0, layer], out.hidden_states[layer + 1][0, -1].float(), atol=1e-5, rtol=1e-5)


def test_progress_reaches_one(tiny_lm):
    seen = []
    record_activations(tiny_lm, HARMFUL, batch_size=3, progress=lambda f, d: seen.append(f))
    assert seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)


def test_recording_ignores_other_callers_passes_on_the_same_model(tiny_lm):
    """An extraction and a preview may share one model object: each sees only its own passes."""
    import threading

    from safesteer import generate

    prompts = HARMFUL + SAFE
    alone = record_activations(tiny_lm, prompts, batch_size=4)
    stop = threading.Event()

    def preview_traffic():
        while not stop.is_set():
            generate(tiny_lm, [SAFE[0]], max_new_tokens=4)

    worker = threading.Thread(target=preview_traffic)
    worker.start()
    try:
        busy = [record_activations(tiny_lm, prompts, batch_size=4) for _ in range(3)]
    finally:
        stop.set()
        worker.join()
    for recorded in busy:
        torch.testing.assert_close(recorded, alone)
