"""Gates: training and calibration, and gated steering per batch row on the tiny model."""

import threading
from dataclasses import replace

import pytest
import torch

from safesteer import SafeSteerError, SteeringSpec, generate, steer
from safesteer.activations import record_activations
from safesteer.gates import Gate, GateReading, threshold_for, train_gate
from safesteer.generation import generate_ids
from safesteer.steering import read_gate_features
from tests.conftest import HARMFUL, SAFE

TOKENS = 16


def _vector(lm, seed=1, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.identity.hidden_size, generator=g) * scale


def _gate_for(lm, fire_on: str, quiet_on: str, layer: int, mode="gated") -> Gate:
    """A hand-made gate at `layer` that fires on `fire_on` and not on `quiet_on` (a line between their features)."""
    probe = Gate(
        layer=layer,
        site="residual",
        token="last",
        center=torch.zeros(lm.identity.hidden_size),
        scale=torch.ones(lm.identity.hidden_size),
        weights=torch.ones(lm.identity.hidden_size),
        bias=0.0,
        threshold=0.0,
    )
    batch = lm.encode([fire_on, quiet_on])
    yes, no = read_gate_features(lm, batch["input_ids"], batch["attention_mask"], [probe, probe])[0]
    direction = yes - no
    middle = float(direction @ (yes + no) / 2)
    return replace(probe, weights=direction, bias=-middle, mode=mode)


def test_threshold_allows_at_most_the_requested_false_positive_rate():
    scores = [float(i) for i in range(100)]
    for fpr in (0.01, 0.05, 0.2, 0.5):
        t = threshold_for(scores, fpr)
        assert sum(s >= t for s in scores) <= fpr * len(scores)
        assert sum(s >= t for s in scores) == int(fpr * len(scores))  # and not stricter than asked


def test_gate_training_and_calibration_on_the_tiny_model(tiny_lm):
    harmful = record_activations(tiny_lm, HARMFUL * 3)
    safe = record_activations(tiny_lm, SAFE * 3)
    gate = train_gate(harmful, safe, target_fpr=0.1, seed=3)
    assert 0 <= gate.layer < tiny_lm.architecture.n_layers
    assert len(gate.layer_auroc) == tiny_lm.architecture.n_layers
    rates = gate.rates()
    assert rates.n_harmful > 0 and rates.n_safe > 0 and rates.other_categories_rate is None
    calibration = gate.scores["calibration_safe"]
    assert sum(s >= gate.threshold for s in calibration) <= 0.1 * len(calibration)
    # The stored scores are the probe's own: scoring the held-out features again gives them back.
    scored = gate.score(safe[:, gate.layer])
    assert set(round(v, 3) for v in gate.scores["safe"]) <= set(round(v, 3) for v in scored.tolist())
    copy = Gate.from_bytes(gate.to_bytes())
    assert torch.equal(copy.weights, gate.weights) and copy.threshold == gate.threshold
    assert copy.rates() == rates and copy.summary() == gate.summary()
    looser = gate.with_fpr(0.5)
    assert looser.threshold <= gate.threshold and looser.target_fpr == 0.5


def test_other_categories_are_negatives_and_measured(tiny_lm):
    harmful = record_activations(tiny_lm, HARMFUL * 2)
    safe = record_activations(tiny_lm, SAFE * 2)
    others = record_activations(tiny_lm, [p.upper() for p in HARMFUL])
    gate = train_gate(harmful, safe, others, target_fpr=0.2)
    assert gate.rates().other_categories_rate is not None and gate.rates().n_other >= 1
    for group, allowed in (("calibration_safe", 0.2), ("calibration_other", 0.4)):  # distinct from the others too
        scores = gate.scores[group]
        assert sum(v >= gate.threshold for v in scores) <= allowed * len(scores)


@pytest.mark.parametrize(
    "harmful,safe,fpr,message",
    [(2, 8, 0.05, "at least 3 harmful"), (8, 2, 0.05, "at least 3 safe"), (8, 8, 0.0, "between 0 and 1")],
)
def test_gate_training_refuses_what_it_cannot_calibrate(tiny_lm, harmful, safe, fpr, message):
    acts = record_activations(tiny_lm, HARMFUL)
    with pytest.raises(SafeSteerError, match=message):
        train_gate(acts[:harmful], acts[:safe], target_fpr=fpr)


def test_a_tampered_gate_is_refused():
    gate = Gate(3, "residual", "last", torch.zeros(4), torch.ones(4), torch.ones(4), 0.0, 0.0)
    with pytest.raises(SafeSteerError, match="non-finite"):
        replace(gate, weights=torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(SafeSteerError, match="mode"):
        gate.with_mode("sometimes")
    with pytest.raises(SafeSteerError, match="not a SafeSteer gate"):
        Gate.from_bytes(b"garbage")


@pytest.mark.parametrize("decoder", ["transformers", "lean"])
@pytest.mark.parametrize("gate_layer,steer_layer", [(1, 2), (3, 1)])
def test_gated_and_ungated_rows_in_one_batch(tiny_lm, decoder, gate_layer, steer_layer):
    """A row whose gate is quiet is exactly unsteered; a row whose gate fires is exactly `always`-steered."""
    inside, outside = HARMFUL[2], SAFE[0]
    gate = _gate_for(tiny_lm, inside, outside, gate_layer)
    always = SteeringSpec(_vector(tiny_lm), layer=steer_layer, strength=3.0)
    gated = replace(always, gate=gate)
    plain = generate(tiny_lm, [outside], max_new_tokens=TOKENS, decoder=decoder)[0]
    steered = generate(tiny_lm, [inside], [always], max_new_tokens=TOKENS, decoder=decoder)[0]
    assert steered != generate(tiny_lm, [inside], max_new_tokens=TOKENS, decoder=decoder)[0]
    readings: list[GateReading] = []
    both = generate(tiny_lm, [inside, outside], [gated], max_new_tokens=TOKENS, decoder=decoder, gate_readings=readings)
    assert both == [steered, plain]
    assert [row[0] for row in readings[0].fired] == [True, False]
    # An `always` gate steers every row, as before gates existed.
    forced = replace(always, gate=gate.with_mode("always"))
    assert generate(tiny_lm, [outside], [forced], max_new_tokens=TOKENS, decoder=decoder)[0] != plain


def test_decoders_agree_with_gates(tiny_lm):
    gate = _gate_for(tiny_lm, HARMFUL[0], SAFE[1], layer=2)
    spec = SteeringSpec(_vector(tiny_lm), layer=1, strength=(0.0, 2.0, 2.0), gate=gate)
    prompts = [HARMFUL[0], HARMFUL[0], SAFE[1]]
    lean = generate_ids(tiny_lm, prompts, [spec], max_new_tokens=TOKENS, decoder="lean", fixed_length=True)
    hf = generate_ids(tiny_lm, prompts, [spec], max_new_tokens=TOKENS, decoder="transformers", fixed_length=True)
    assert torch.equal(lean, hf)


def test_gate_readings_do_not_steer_or_leave_hooks(tiny_lm):
    gate = _gate_for(tiny_lm, HARMFUL[0], SAFE[1], layer=2)
    hooks_before = {
        (name, key)
        for name, module in tiny_lm.model.named_modules()
        for key in (*module._forward_hooks, *module._forward_pre_hooks)
    }
    with steer(tiny_lm, [SteeringSpec(_vector(tiny_lm), 1, 2.0, gate=gate)]) as state, torch.inference_mode():
        tiny_lm.model(**tiny_lm.encode([SAFE[1]]))
    assert state.fired == [[False]]
    hooks_after = {
        (name, key)
        for name, module in tiny_lm.model.named_modules()
        for key in (*module._forward_hooks, *module._forward_pre_hooks)
    }
    assert hooks_after == hooks_before


def test_two_threads_with_different_gates_do_not_leak(tiny_lm):
    prompt = HARMFUL[3]
    fires = replace(SteeringSpec(_vector(tiny_lm), layer=1, strength=3.0), gate=_gate_for(tiny_lm, prompt, SAFE[2], 2))
    quiet = replace(fires, gate=_gate_for(tiny_lm, SAFE[2], prompt, 2))
    expected = {
        "fires": generate(tiny_lm, [prompt], [fires], max_new_tokens=TOKENS)[0],
        "quiet": generate(tiny_lm, [prompt], [quiet], max_new_tokens=TOKENS)[0],
    }
    assert expected["quiet"] == generate(tiny_lm, [prompt], max_new_tokens=TOKENS)[0]
    assert expected["fires"] != expected["quiet"]
    results: dict[str, list[str]] = {"fires": [], "quiet": []}
    start = threading.Barrier(2)

    def worker(kind):
        start.wait()
        for _ in range(5):
            spec = fires if kind == "fires" else quiet
            results[kind].append(generate(tiny_lm, [prompt], [spec], max_new_tokens=TOKENS)[0])

    threads = [threading.Thread(target=worker, args=(k,)) for k in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {kind: [text] * 5 for kind, text in expected.items()}


def test_the_gate_learns_from_the_model_that_reads_it(tiny_lm, tiny_folder):
    """Vectors from one precision, the gate from the generating model's own activations."""
    from safesteer import extract_vectors, load_model
    from safesteer.int4 import int4_problem

    if int4_problem():
        pytest.skip(int4_problem())
    from safesteer.extraction import record_policy_gate
    from safesteer.vectors import ExtractionSettings

    reader = load_model(str(tiny_folder), "int4")
    harmful, safe = HARMFUL * 2, SAFE * 2
    older = ExtractionSettings(method="mean-diff", gate_recipe="category")  # prompt vectors: read by `tiny_lm`
    vectors = extract_vectors(tiny_lm, harmful, safe, older, gate_lm=reader)
    direct = train_gate(record_activations(reader, harmful), record_activations(reader, safe), precision="int4")
    assert vectors.gate.precision == "int4" and vectors.gate.summary()["precision"] == "int4"
    assert torch.equal(vectors.gate.weights, direct.weights) and vectors.gate.threshold == direct.threshold
    plain = extract_vectors(tiny_lm, harmful, safe, older)  # the same model reads it: no second recording
    assert plain.gate.precision == "fp32" and torch.equal(plain.vectors, vectors.vectors)
    # the policy recipe (the default) records its own sets, with the reading model too
    policy = extract_vectors(tiny_lm, harmful, safe, ExtractionSettings(method="mean-diff"), gate_lm=reader)
    again = record_policy_gate(reader, harmful, safe, [], ExtractionSettings())
    assert policy.gate.routed and policy.gate.token == "mean" and policy.gate.precision == "int4"
    assert torch.equal(policy.gate.weights, again.weights) and torch.equal(policy.vectors, vectors.vectors)


def test_repeated_prompts_are_read_once_with_the_same_result(tiny_lm):
    gate = _gate_for(tiny_lm, HARMFUL[0], SAFE[0], layer=2)
    batch = tiny_lm.encode([HARMFUL[0], SAFE[0], HARMFUL[0]])
    together = read_gate_features(tiny_lm, batch["input_ids"], batch["attention_mask"], [gate])[0]
    for row, prompt in enumerate([HARMFUL[0], SAFE[0], HARMFUL[0]]):
        alone = tiny_lm.encode([prompt])
        single = read_gate_features(tiny_lm, alone["input_ids"], alone["attention_mask"], [gate])[0][0]
        torch.testing.assert_close(together[row], single, atol=1e-4, rtol=1e-4)


def _routed_gate(lm, own, others, seed=0):
    """A policy gate on the tiny model: its own prompts and the other category's, against the safe ones."""
    from safesteer.extraction import record_policy_gate
    from safesteer.vectors import ExtractionSettings

    return record_policy_gate(lm, own, SAFE * 2, others, ExtractionSettings(seed=seed))


def test_a_policy_gate_admits_any_category_and_routes_each_prompt_to_one(tiny_lm):
    from safesteer.steering import decide_rows

    endings = ("", " Now.", " Quickly please.", " Step by step.")
    first = [p + e for p in HARMFUL[:4] for e in endings]
    second = [p + e for p in HARMFUL[4:] for e in endings]
    gate_a, gate_b = _routed_gate(tiny_lm, first, second), _routed_gate(tiny_lm, second, first)
    assert torch.equal(gate_a.weights, gate_b.weights) and gate_a.threshold == gate_b.threshold  # one admission
    assert not torch.equal(gate_a.centroid, gate_b.centroid) and not torch.equal(gate_a.route, gate_b.route)
    assert gate_a.routed and gate_a.token == "mean" and "other_routed" in gate_a.scores
    gates = [gate_a, gate_b]
    batch = tiny_lm.encode(HARMFUL + SAFE)
    features = read_gate_features(tiny_lm, batch["input_ids"], batch["attention_mask"], gates)
    scores, fired = decide_rows(gates, features)
    admitted = scores >= torch.tensor([g.threshold for g in gates])
    assert fired.sum(dim=1).le(1).all()  # never both
    assert torch.equal(fired.any(dim=1), admitted.any(dim=1))  # whatever is admitted, one category steers
    claims_a = gate_a.route_logit(features[0]) > gate_b.route_logit(features[1])
    both = admitted.all(dim=1)
    assert torch.equal(fired[both, 0], claims_a[both])
    # each router claims its own category's prompts, which it learnt from
    own = tiny_lm.encode(first + second)
    own_features = read_gate_features(tiny_lm, own["input_ids"], own["attention_mask"], gates)
    claims = gate_a.route_logit(own_features[0]) > gate_b.route_logit(own_features[1])
    assert claims[: len(first)].float().mean() > 0.8 and claims[len(first) :].float().mean() < 0.2
    # a gate that may not steer a row (strength 0 there) leaves the row to the other
    only_b = torch.tensor([[False, True]] * len(HARMFUL + SAFE))
    _, fired_b = decide_rows(gates, features, only_b)
    assert torch.equal(fired_b[:, 1], admitted[:, 1]) and not fired_b[:, 0].any()


def test_a_gate_from_before_routers_competes_by_centroid(tiny_lm):
    from safesteer.steering import decide_rows

    endings = ("", " Now.", " Quickly please.", " Step by step.")
    first = [p + e for p in HARMFUL[:4] for e in endings]
    second = [p + e for p in HARMFUL[4:] for e in endings]
    gate_a, gate_b = _routed_gate(tiny_lm, first, second), _routed_gate(tiny_lm, second, first)
    older_b = replace(gate_b, route=None)  # as read from a format 2 gate: a centroid, no router
    threshold = min(gate_a.threshold, gate_b.threshold) - 1e6  # admit every row, so the routing shows
    gates = [gate_a.with_threshold(threshold), older_b.with_threshold(threshold)]
    batch = tiny_lm.encode(HARMFUL + SAFE)
    features = read_gate_features(tiny_lm, batch["input_ids"], batch["attention_mask"], gates)
    _, fired = decide_rows(gates, features)
    closer_a = gate_a.closeness(features[0]) > gate_b.closeness(features[1])
    assert torch.equal(fired[:, 0], closer_a) and torch.equal(fired[:, 1], ~closer_a)
    # the same two with routers decide by their routers
    _, by_router = decide_rows([gate_a.with_threshold(threshold), gate_b.with_threshold(threshold)], features)
    claims_a = gate_a.route_logit(features[0]) > gate_b.route_logit(features[1])
    assert torch.equal(by_router[:, 0], claims_a)


def test_a_routed_gate_survives_the_round_trip_and_older_readers_refuse_it(tiny_lm):
    import json

    from safesteer.gates import ROUTER_FORMAT_VERSION

    endings = ("", " Now.", " Quickly please.")
    own, others = ([p + e for p in prompts for e in endings] for prompts in (HARMFUL[:4], HARMFUL[4:]))
    gate = _routed_gate(tiny_lm, own, others)
    back = Gate.from_bytes(gate.to_bytes())
    assert torch.equal(back.centroid, gate.centroid) and back.routed and back.scores == gate.scores
    assert torch.equal(back.route, gate.route) and back.route_bias == gate.route_bias
    older = Gate.from_bytes(replace(gate, route=None).to_bytes())
    assert older.routed and older.route is None
    assert (
        gate.metadata()["format_version"] == ROUTER_FORMAT_VERSION == 3
        and older.metadata()["format_version"] == 2
        and _gate_for(tiny_lm, HARMFUL[0], SAFE[0], layer=1).metadata()["format_version"] == 1
    )
    assert json.loads(json.dumps(gate.summary()))["recipe"] == "policy"
    from studio.gating import gate_summary  # the author is told which rule routes

    assert "router" in gate_summary(gate) and "closest" in gate_summary(older)
    newer = {**gate.metadata(), "format_version": ROUTER_FORMAT_VERSION + 1}
    with pytest.raises(SafeSteerError, match="newer SafeSteer"):
        Gate.from_parts(gate.to_tensors(), newer)
    with pytest.raises(SafeSteerError, match="router must also have a centroid"):
        replace(gate, centroid=None)


def test_a_gate_learnt_alone_gets_the_router_its_policy_would_teach_it(tiny_lm):
    from safesteer.extraction import refit_router
    from safesteer.steering import decide_rows
    from safesteer.vectors import ExtractionSettings

    endings = ("", " Now.", " Quickly please.", " Step by step.")
    first = [p + e for p in HARMFUL[:4] for e in endings]
    second = [p + e for p in HARMFUL[4:] for e in endings]
    alone = _routed_gate(tiny_lm, first, [])  # its policy's only category: nothing to learn a router from
    assert alone.routed and alone.route is None and "other" not in alone.scores
    taught = refit_router(tiny_lm, alone, first, SAFE * 2, second, ExtractionSettings())
    assert taught.route is not None and "other_routed" in taught.scores
    # what the author accepted stays: the admission and its held-out rates
    for name in ("center", "scale", "weights", "centroid"):
        assert torch.equal(getattr(taught, name), getattr(alone, name))
    assert (taught.layer, taught.threshold, taught.bias) == (alone.layer, alone.threshold, alone.bias)
    assert all(taught.scores[k] == alone.scores[k] for k in alone.scores)
    # the router is the very one extraction fits beside the other category, on the same standardisation
    beside = _routed_gate(tiny_lm, first, second)
    again = refit_router(tiny_lm, replace(beside, route=None), first, SAFE * 2, second, ExtractionSettings())
    assert torch.equal(again.route, beside.route) and again.route_bias == beside.route_bias
    assert again.scores["other_routed"] == beside.scores["other_routed"]
    torch.testing.assert_close(torch.tensor(again.scores["other"]), torch.tensor(beside.scores["other"]))
    # and it routes: each category's prompts go to their own gate
    other = _routed_gate(tiny_lm, second, first)
    threshold = min(taught.threshold, other.threshold) - 1e6  # admit every row, so the routing shows
    gates = [taught.with_threshold(threshold), other.with_threshold(threshold)]
    batch = tiny_lm.encode(first + second)
    _, fired = decide_rows(gates, read_gate_features(tiny_lm, batch["input_ids"], batch["attention_mask"], gates))
    assert fired[: len(first), 0].float().mean() > 0.8 and fired[len(first) :, 1].float().mean() > 0.8
    with pytest.raises(SafeSteerError, match="cannot learn from"):
        refit_router(tiny_lm, replace(alone, precision="int4"), first, SAFE * 2, second, ExtractionSettings())
    with pytest.raises(SafeSteerError, match="only a policy gate routes"):
        refit_router(tiny_lm, replace(alone, centroid=None), first, SAFE * 2, second, ExtractionSettings())
