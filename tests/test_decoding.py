"""The lean decode loop gives exactly the tokens transformers' generate gives each prompt alone, faster.

The reference is each row generated alone: transformers pads a batch of prompts of different lengths,
and padding changes the float sums (in bfloat16 enough to flip a word), so a padded transformers batch
is itself not the answer a row should get. The lean loop never pads: its rows equal their lone answers.
"""

import copy
from dataclasses import replace

import pytest
import torch

from safesteer import SteeringSpec, cpu_attention, generate, load_model
from safesteer.decoding import supports
from safesteer.generation import _eos_ids, generate_ids, generate_stream
from safesteer.int4 import int4_problem
from safesteer.models import wrap_model
from tests.conftest import HARMFUL, SAFE


def _vector(lm, seed):
    return torch.randn(lm.identity.hidden_size, generator=torch.Generator().manual_seed(seed)) * 4


def _cases(lm):
    residual = SteeringSpec(_vector(lm, 1), 1, (0.0, 4.0))
    attention = SteeringSpec(_vector(lm, 2), 2, 3.0, site="attention")
    return {
        "one prompt": ([HARMFUL[0]], []),
        "naive and steered rows": ([HARMFUL[0]] * 2, [residual]),
        "padded batch, attention site": (HARMFUL[:2] + SAFE[:2], [attention]),
        "two vectors, one layer each": (HARMFUL[2:5], [attention, SteeringSpec(_vector(lm, 3), 1, -2.0)]),
        "two vectors on one layer": (
            [SAFE[4]],
            [SteeringSpec(_vector(lm, 4), 3, 2.0), SteeringSpec(_vector(lm, 5), 3, 1.0)],
        ),
    }


@pytest.fixture(scope="module", params=["fp32", "fp32-sdpa", "int4"])
def lm(request, tiny_folder, tiny_lm):
    if request.param == "fp32":
        assert tiny_lm.model.config._attn_implementation == cpu_attention.NAME  # what load_model picks on a CPU
        return tiny_lm
    if request.param == "fp32-sdpa":  # e.g. a deployer's own model passed through wrap_model
        model = copy.deepcopy(tiny_lm.model)
        model.set_attn_implementation("sdpa")
        return wrap_model(model, tiny_lm.tokenizer, "tiny", "fp32")
    if int4_problem() is not None:
        pytest.skip(f"int4 kernel unavailable: {int4_problem()}")
    return load_model(str(tiny_folder), "int4", device="cpu")


def _alone(lm, prompts, specs=(), **options):
    """Each row generated on its own (its own strengths), by transformers' generate unless a decoder is given."""
    options.setdefault("decoder", "transformers")
    texts = []
    for row, prompt in enumerate(prompts):
        own = [replace(s, strength=s.strengths()[row]) if len(s.strengths()) > 1 else s for s in specs]
        texts += generate(lm, [prompt], own, **options)
    return texts


@pytest.mark.parametrize(
    "case",
    [
        "one prompt",
        "naive and steered rows",
        "padded batch, attention site",
        "two vectors, one layer each",
        "two vectors on one layer",
    ],
)
def test_lean_loop_gives_the_same_tokens_as_transformers(lm, case):
    assert supports(lm)
    prompts, specs = _cases(lm)[case]
    lean = generate(lm, prompts, specs, max_new_tokens=24)
    reference = _alone(lm, prompts, specs, max_new_tokens=24)
    assert lean == reference
    assert any(text for text in lean)


def test_fixed_length_and_end_of_text_match_transformers(lm):
    prompts = SAFE[:3]
    for fixed in (False, True):
        lean = generate(lm, prompts, max_new_tokens=40, fixed_length=fixed)
        reference = _alone(lm, prompts, max_new_tokens=40, fixed_length=fixed)
        assert lean == reference


def test_a_row_gets_the_tokens_it_gets_alone_whatever_its_neighbours(lm):
    """Batch invariance: prompts of other lengths, other steering and other batch sizes change nothing."""
    residual = SteeringSpec(_vector(lm, 1), 1, 4.0)
    prompts = [SAFE[0], HARMFUL[3], SAFE[5] + " Please answer in detail.", HARMFUL[0], SAFE[2]]
    assert len({len(lm.encode([p])["input_ids"][0]) for p in prompts}) > 2  # the batch would need padding
    strengths = (0.0, 4.0, 0.0, 2.0, 0.0)
    batched = generate(lm, prompts, [replace(residual, strength=strengths)], max_new_tokens=20)
    alone = _alone(lm, prompts, [replace(residual, strength=strengths)], max_new_tokens=20, decoder="lean")
    assert batched == alone
    doubled = generate(lm, prompts * 2, [replace(residual, strength=strengths * 2)], max_new_tokens=20)
    assert doubled == batched * 2


def test_a_shared_prefix_is_read_once_and_rows_still_do_not_depend_on_each_other(lm):
    """Prompts under one long instruction: the common start is read once, each row answers as it does alone."""
    from safesteer.decoding import RunningBatch

    system = {"role": "system", "content": "Answer briefly and politely, in one or two sentences, and stay on topic."}
    prompts = [[system, {"role": "user", "content": p}] for p in (SAFE[0], HARMFUL[3], SAFE[5] + " Why?", SAFE[2])]
    rows = [lm.encode([p])["input_ids"][0] for p in prompts]
    prefix = RunningBatch(lm, eos_token_ids=[]).shared_prefix(rows)
    assert prefix is not None and prefix.length > 20  # the template's start and the instruction
    assert all(torch.equal(row[: prefix.length], prefix.ids) for row in rows)
    shared = generate_ids(lm, prompts, max_new_tokens=16, decoder="lean", share_prefix=True)

    def alone(row):  # the same prefix, this row only
        running = RunningBatch(lm, eos_token_ids=_eos_ids(lm))
        running.admit(row[prefix.length :].unsqueeze(0), [], owners=[0], max_new_tokens=[16], prefix=prefix)
        tokens = []
        while len(running):
            tokens += [token for _, token, _ in running.step()]
        return tokens

    for row, ids in zip(rows, shared.tolist(), strict=True):
        own = alone(row)
        assert ids[: len(own)] == own and all(t == lm.tokenizer.pad_token_id for t in ids[len(own) :])
    steered = SteeringSpec(_vector(lm, 1), 1, 4.0)  # steering changes the prefix's states: read whole instead
    with_steering = generate_ids(lm, prompts, [steered], max_new_tokens=8, share_prefix=True)
    assert torch.equal(with_steering, generate_ids(lm, prompts, [steered], max_new_tokens=8))


def test_a_lane_step_moves_only_rows_about_to_finish_and_changes_no_tokens(lm):
    """`step(within=)`: rows near their budget's end step alone; the others wait; every row keeps its own tokens."""
    from safesteer.decoding import RunningBatch

    steered = SteeringSpec(_vector(lm, 1), 1, 4.0)
    first, second = lm.encode([SAFE[0]])["input_ids"], lm.encode([HARMFUL[3] + " Why?"])["input_ids"]
    running = RunningBatch(lm, eos_token_ids=[])
    # one prompt pass for two rows of one length but different budgets: they become two cohorts
    running.admit(
        first.expand(2, -1), [replace(steered, strength=(4.0, 0.0))], owners=["short", "long"], max_new_tokens=[4, 20]
    )
    running.admit(second, [], owners=["other"], max_new_tokens=[20])
    assert running.finishing(4) == ["short"]
    tokens: dict[str, list[int]] = {"short": [], "long": [], "other": []}
    while running.finishing(4):
        for owner, token, _ in running.step(within=4):
            assert owner == "short"
            tokens[owner].append(token)
    assert len(tokens["short"]) == 4 and len(running) == 2  # the others have not moved yet
    while len(running):
        for owner, token, _ in running.step():
            tokens[owner].append(token)

    def alone(ids, specs, budget):
        single = RunningBatch(lm, eos_token_ids=[])
        single.admit(ids, specs, owners=[0], max_new_tokens=[budget])
        out = []
        while len(single):
            out += [token for _, token, _ in single.step()]
        return out

    assert tokens["short"] == alone(first, [steered], 4)
    assert tokens["long"] == alone(first, [], 20)
    assert tokens["other"] == alone(second, [], 20)


def test_a_finished_row_is_returned_before_its_neighbours_next_step(lm):
    """A 4-token row among a long one is done after three steps (three passes of its tokens), not four.

    Its last token is chosen from the third step's logits; waiting for a fourth step, which feeds
    only the long row's token, would add a whole step of the batch to every short request.
    """
    from safesteer.decoding import RunningBatch

    first, second = lm.encode([SAFE[0]])["input_ids"], lm.encode([HARMFUL[3] + " Why?"])["input_ids"]
    running = RunningBatch(lm, eos_token_ids=[])
    running.admit(first, [], owners=["short"], max_new_tokens=[4])
    running.admit(second, [], owners=["long"], max_new_tokens=[12])
    short: list[int] = []
    steps = 0
    while len(short) < 4:
        steps += 1
        for owner, token, finished in running.step():
            if owner == "short":
                short.append(token)
                assert finished == (len(short) == 4)
    assert steps == 3 and running.owners == ["long"]
    alone = RunningBatch(lm, eos_token_ids=[])
    alone.admit(first, [], owners=[0], max_new_tokens=[4])
    tokens = []
    while len(alone):
        tokens += [token for _, token, _ in alone.step()]
    assert short == tokens


def test_stream_ends_with_the_generated_text(lm):
    spec = SteeringSpec(_vector(lm, 1), 1, (0.0, 4.0))
    steps = list(generate_stream(lm, [HARMFUL[1]] * 2, [spec], max_new_tokens=10))
    assert steps[-1] == generate(lm, [HARMFUL[1]] * 2, [spec], max_new_tokens=10)
    assert len(steps) >= 2


def test_models_the_loop_does_not_reproduce_use_transformers(tiny_lm):
    penalised = copy.copy(tiny_lm)
    penalised.model = copy.deepcopy(tiny_lm.model)
    penalised.model.generation_config.repetition_penalty = 1.3
    assert not supports(penalised)  # a logits processor the loop does not apply
    assert generate(penalised, [HARMFUL[0]], max_new_tokens=8)  # and generation still works


def test_rows_that_end_early_are_padded_like_transformers(lm):
    """Make a token the model is about to say count as end-of-text, so rows finish at different steps."""
    prompts = SAFE[:3]
    ids = generate_ids(lm, prompts[1:2], max_new_tokens=4)[0].tolist()  # the very tokens it says, not a re-encoding
    stopping = copy.copy(lm)
    stopping.model = copy.copy(lm.model)  # shares the weights; only the generation config differs
    stopping.model.generation_config = copy.deepcopy(lm.model.generation_config)
    stopping.model.generation_config.eos_token_id = [ids[2]]
    lean = generate(stopping, prompts, max_new_tokens=30)
    reference = _alone(stopping, prompts, max_new_tokens=30)
    assert lean == reference
    assert len(lean[1]) < len(generate(lm, prompts[1:2], max_new_tokens=30)[0])


@pytest.mark.parametrize("padded", [False, True])
def test_single_query_attention_matches_sdpa(padded):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 1, 16, generator=g)
    keys, values = torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    mask = None
    if padded:
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        mask[1, ..., :3] = False  # the second row's first three keys are padding
    got = cpu_attention.single_query_attention(query, keys, values, mask, 0.25)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=0.25, enable_gqa=True
    )
    assert torch.allclose(got, want.reshape(2, -1), atol=1e-5)


def test_cpu_attention_is_only_given_to_known_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, attn_implementation="sdpa"))
    assert not cpu_attention.use_cpu_attention(other)
    assert other.config._attn_implementation == "sdpa"
