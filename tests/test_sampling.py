"""Choosing tokens: greedy by default, sampled rows reproducible by seed and independent of each other."""

import pytest
import torch

from safesteer.errors import SafeSteerError
from safesteer.generation import generate_ids
from safesteer.sampling import Sampling, TokenChooser
from tests.conftest import HARMFUL


def test_top_p_keeps_the_smallest_likeliest_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(TokenChooser([Sampling(1.0, top_p=0.7, seed=s)]).choose(logits)[0]) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn


def test_a_rows_draws_do_not_depend_on_other_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    together = TokenChooser([Sampling(1.0, seed=1), None, Sampling(0.7, seed=2)]).choose(logits)
    assert together[1] == logits[1].argmax()
    assert together[0] == TokenChooser([Sampling(1.0, seed=1)]).choose(logits[:1])[0]
    assert together[2] == TokenChooser([Sampling(0.7, seed=2)]).choose(logits[2:])[0]


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.5}])
def test_nonsense_settings_are_refused(bad):
    with pytest.raises(SafeSteerError):
        Sampling(**bad)


@pytest.mark.parametrize("decoder", ["lean", "transformers"])
def test_both_decoders_sample_the_same_tokens_for_a_seed(tiny_lm, decoder):
    sampling = [Sampling(1.3, seed=4), None]
    ids = generate_ids(
        tiny_lm, [HARMFUL[0]] * 2, max_new_tokens=10, fixed_length=True, decoder=decoder, sampling=sampling
    )
    lean = generate_ids(
        tiny_lm, [HARMFUL[0]] * 2, max_new_tokens=10, fixed_length=True, decoder="lean", sampling=sampling
    )
    greedy = generate_ids(tiny_lm, [HARMFUL[0]], max_new_tokens=10, fixed_length=True, decoder=decoder)
    assert torch.equal(ids, lean)
    assert torch.equal(ids[1], greedy[0]) and not torch.equal(ids[0], greedy[0])
