"""Steering options: where, how and over how many layers a vector is applied, each written once."""

import itertools

import pytest
import torch

from safesteer import SteeringSpec, generate
from safesteer.errors import SafeSteerError
from safesteer.operations import HOW, LEGACY, WHERE, SteeringOptions, apply_steering, prepare_shift
from safesteer.steering import steer
from tests.conftest import HARMFUL, SAFE

OPTIONS = [SteeringOptions(where=w, how=h) for w, h in itertools.product(WHERE, HOW)] + [
    SteeringOptions(how="add", spread=3),
    SteeringOptions(where="generated", how="clamp", spread=3),
]


def _spec(lm, option: SteeringOptions, strength, layer: int = 1, seed: int = 1) -> SteeringSpec:
    g = torch.Generator().manual_seed(seed)
    layers = range(layer, layer + option.spread)
    vector = torch.randn(len(layers), lm.identity.hidden_size, generator=g) * 4
    return SteeringSpec(
        vector[0] if option.spread == 1 else vector,
        layer,
        strength,
        where=option.where,
        how=option.how,
        safe_projection=tuple(float(x) for x in torch.randn(len(layers), generator=g)),
    )


@pytest.fixture(scope="module")
def lm(tiny_fp32_and_int4):
    return tiny_fp32_and_int4


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.label())
def test_strength_zero_is_exactly_unsteered_for_every_option(tiny_lm, option):
    batch = tiny_lm.encode(HARMFUL[:2] + SAFE[:1])
    with torch.inference_mode():
        plain = tiny_lm.model(**batch).logits
        # one spec, strength 0 on rows 0 and 2 and 3.0 on row 1: the hook runs, rows 0 and 2 must not move
        with steer(tiny_lm, [_spec(tiny_lm, option, (0.0, 3.0, 0.0))]):
            mixed = tiny_lm.model(**batch).logits
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
    if option.where != "generated":  # "generated" moves only the last prompt position of row 1
        assert not torch.equal(mixed[1], plain[1])
    else:
        assert torch.equal(mixed[1, :-1], plain[1, :-1]) and not torch.equal(mixed[1, -1], plain[1, -1])


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.label())
def test_lean_loop_gives_the_same_tokens_as_transformers_for_every_option(lm, option):
    prompts = [HARMFUL[0], HARMFUL[0], SAFE[1]]
    specs = [_spec(lm, option, (0.0, 4.0, 2.0)), SteeringSpec(torch.randn(lm.identity.hidden_size) * 3, 1, 1.0)]
    lean = generate(lm, prompts, specs, max_new_tokens=20, decoder="lean")
    reference = generate(lm, prompts, specs, max_new_tokens=20, decoder="transformers")
    assert lean == reference
    assert lean[0] == generate(lm, prompts[:1], specs[1:], max_new_tokens=20)[0]  # row 0: only the other spec


def test_where_decides_which_positions_are_steered():
    """`prompt` acts on prompt passes only; `generated` on decode steps and the last prompt position."""
    vector = torch.ones(8)
    prompt_states, step_states = torch.zeros(2, 5, 8), torch.zeros(2, 1, 8)
    moved = {}
    for where in WHERE:
        shift = prepare_shift(vector, (1.0,), torch.float32, torch.device("cpu"), 3, where=where)
        moved[where] = (
            apply_steering(prompt_states, [shift], prompt_pass=True).abs().sum(-1).ne(0).tolist(),
            bool(apply_steering(step_states, [shift], prompt_pass=False).abs().sum() > 0),
        )
    every, last = [[True] * 5] * 2, [[False] * 4 + [True]] * 2
    assert moved["all"] == (every, True)
    assert moved["prompt"] == (every, False)
    assert moved["generated"] == (last, True)


def test_clamp_leaves_states_on_the_safe_side_alone_and_moves_the_others_only_along_the_vector():
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(16, generator=g) * 3
    unit = vector / vector.norm()
    safe_projection = 2.0
    states = torch.randn(6, 5, 16, generator=g)
    states[0] += unit * 50  # far on the safe side
    shift = prepare_shift(vector, (1.0,), torch.float32, torch.device("cpu"), 3, how="clamp", safe_projection=2.0)
    out = apply_steering(states, [shift], prompt_pass=True)
    before, after = states @ unit, out @ unit
    safe_side = before >= safe_projection
    assert safe_side.any() and (~safe_side).any()
    assert torch.equal(out[safe_side], states[safe_side])  # on the safe side: untouched
    moved = out[~safe_side] - states[~safe_side]
    along = (moved @ unit).unsqueeze(-1) * unit
    assert torch.allclose(moved, along, atol=1e-5)  # only the component along the vector changes
    target = torch.clamp(torch.full_like(before, safe_projection), max=before + vector.norm())  # at most |v| per token
    assert torch.allclose(after[~safe_side], target[~safe_side], atol=1e-4)
    assert (after >= before - 1e-6).all()


def test_norm_preserving_keeps_each_state_length_and_turns_it_toward_the_vector():
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(32, generator=g)
    states = torch.randn(3, 7, 32, generator=g) * 5
    shift = prepare_shift(vector, (0.0, 2.0, 6.0), torch.float32, torch.device("cpu"), 3, how="norm")
    out = apply_steering(states, [shift], prompt_pass=True)
    assert torch.allclose(out.norm(dim=-1), states.norm(dim=-1), rtol=1e-5)
    assert torch.equal(out[0], states[0])
    unit = vector / vector.norm()
    cosine = lambda x: (x @ unit) / x.norm(dim=-1)  # noqa: E731
    assert (cosine(out[1]) > cosine(states[1])).all() and (cosine(out[2]) > cosine(out[1])).all()


def test_spread_shares_the_strength_over_adjacent_layers(tiny_lm):
    spread = SteeringOptions(spread=3)
    assert list(spread.span(2, 6)) == [1, 2, 3] and list(spread.span(0, 6)) == [0, 1, 2]
    assert list(spread.span(5, 6)) == [3, 4, 5]
    spec = _spec(tiny_lm, spread, 3.0, layer=1)
    assert spec.layers() == (1, 2, 3)
    shift = spec.prepare(1, (3.0,), torch.float32, torch.device("cpu"), 3)
    assert torch.allclose(shift.shift, spec.vector[1] * 1.0)  # a third of 3.0 at each layer


def test_options_are_checked():
    with pytest.raises(SafeSteerError, match="unknown steering position"):
        SteeringOptions(where="everywhere")  # type: ignore[arg-type]
    with pytest.raises(SafeSteerError, match="unknown steering operation"):
        SteeringOptions(how="multiply")  # type: ignore[arg-type]
    with pytest.raises(SafeSteerError, match="spread"):
        SteeringOptions(spread=0)
    with pytest.raises(SafeSteerError, match="safe side's projection"):
        SteeringSpec(torch.ones(8), 1, 1.0, how="clamp")
    with pytest.raises(SafeSteerError, match="safe side only"):
        SteeringSpec(torch.ones(8), 1, -1.0, how="clamp", safe_projection=(0.0,))
    with pytest.raises(SafeSteerError, match="mapping"):
        SteeringOptions.from_dict({"where": "all", "evil": 1})
    assert SteeringOptions.from_dict(None) == LEGACY
    assert SteeringOptions.from_dict({"how": "clamp", "where": "generated", "spread": 3}).label() == (
        "clamp · generated · 3 layers"
    )


# --- stored with the category ------------------------------------------------------------------


def test_options_round_trip_through_the_store_and_bundles(tmp_path):
    from dataclasses import replace

    from db import PolicyStore
    from safesteer.bundles import bundle_bytes, read_bundle
    from tests.policy_factory import category

    chosen = SteeringOptions(where="generated", how="clamp", spread=3)
    store = PolicyStore(f"sqlite:///{tmp_path / 'p.db'}")
    store.save_version("p", [replace(category(), options=chosen), replace(category("fraud", seed=1), options=LEGACY)])
    loaded = store.load_version("p")
    assert [c.options for c in loaded.categories] == [chosen, LEGACY]
    assert loaded.categories[0].vectors.safe_projection is not None
    spec = loaded.categories[0].steering_spec()
    assert (spec.how, spec.where, spec.layers()) == ("clamp", "generated", (0, 1, 2))
    data = bundle_bytes(loaded)
    assert '"format_version": 3' in zipfile_text(data, "manifest.json")
    again = read_bundle(data)
    assert [c.options for c in again.categories] == [chosen, LEGACY]
    assert torch.equal(again.categories[0].vectors.safe_projection, loaded.categories[0].vectors.safe_projection)
    legacy_only = replace(loaded, categories=[loaded.categories[1]])
    assert '"format_version": 2' in zipfile_text(bundle_bytes(legacy_only), "manifest.json")  # older readers keep it


def zipfile_text(data: bytes, name: str) -> str:
    import io
    import zipfile

    return zipfile.ZipFile(io.BytesIO(data)).read(name).decode()


def test_categories_saved_before_options_keep_steering_as_before(tmp_path, tiny_lm):
    """A row from before migration 0004 has no options: it adds at every position, exactly as it did."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from db import PolicyStore
    from db.engine import MIGRATIONS
    from safesteer.policy import PolicyCategory
    from safesteer.vectors import vectors_from_activations
    from tests.policy_factory import category

    made = category()
    vectors = vectors_from_activations(
        torch.randn(6, 4, 64), torch.randn(6, 4, 64) + 1, made.vectors.settings, tiny_lm.identity, "old"
    )
    clamped = SteeringOptions(where="generated", how="clamp")
    saved = PolicyCategory("old", made.harmful, made.safe, vectors, layer=1, strength=3.0, options=clamped)
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = PolicyStore(url)
    store.save_version("old policy", [saved])
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:  # the schema before options: the stored options are gone
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    assert "steering" not in {c["name"] for c in inspect(store.engine).get_columns("categories")}
    store.engine.dispose()
    loaded = PolicyStore(url).load_version("old policy").categories[0]  # opening migrates to head again
    assert loaded.options == LEGACY
    prompts = [HARMFUL[0], SAFE[2]]
    before = generate(tiny_lm, prompts, [SteeringSpec(vectors.vector(1), 1, 3.0)], max_new_tokens=12)
    assert generate(tiny_lm, prompts, [loaded.steering_spec()], max_new_tokens=12) == before
