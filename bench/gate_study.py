"""Which reader recognises a policy's harmful requests best: activation gates against text classifiers.

Run with `make bench-gate-study`. Every reader is fit on the same training prompts (the five
Do-Not-Answer areas against the built-in safe examples, plus, for the "hardened" readers, the
same prompts in the project's training framings and the project's edgy-but-benign training
prompts), its threshold calibrated on the same calibration prompts to 5% of safe prompts, and it
is measured on sets from other sources. StrongREJECT, the held-out everyday prompts and the
edgy-but-benign set are each split in two with a fixed seed: the *dev* halves choose the reader,
the *test* halves are reported for it and looked at only once, after the choice. Writes
docs/gate-study.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from gates import WRAPPERS, phrasings

from safesteer import datasets, load_model
from safesteer.activations import record_activations
from safesteer.gates import SPLIT, auroc, fit_router, fit_two_sides, threshold_for
from safesteer.models import generation_precision
from safesteer.text_gates import tfidf_features, tfidf_vocabulary

DOCS = Path(__file__).resolve().parent.parent / "docs"
CACHE = Path(__file__).resolve().parent / "results" / "gate_study_activations.pt"
AREAS = list(datasets.DONOTANSWER_AREAS)
FPR = 0.05
FRONTIER = (0.01, 0.02, 0.05, 0.10, 0.20)
EVERYDAY_FIRED = (0.0, 0.02, 0.05, 0.10)  # for the comparison at equal everyday false positives
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)


def halves(prompts: list[str], seed: int) -> tuple[list[str], list[str]]:
    shuffled = random.Random(seed).sample(prompts, len(prompts))
    return shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :]


def three_way(prompts: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    shuffled = random.Random(seed).sample(prompts, len(prompts))
    n_test, n_cal = round(len(shuffled) * SPLIT[2]), round(len(shuffled) * SPLIT[1])
    return shuffled[n_test + n_cal :], shuffled[n_test : n_test + n_cal], shuffled[:n_test]


def prompt_sets() -> dict[str, list[str]]:
    framings = datasets.training_framings()
    harmful = [p for area in AREAS for p in datasets.harmful_prompts(area)]
    safe = datasets.benign_prompts()
    harmful_train, harmful_cal, harmful_test = three_way(harmful, 1)
    safe_train, safe_cal, safe_test = three_way(safe, 2)
    edgy_train = datasets.edgy_benign_prompts(part="training")
    rng = random.Random(3)
    strongreject_dev, strongreject_test = halves(datasets.harmful_prompts("strongreject"), 4)
    everyday_dev, everyday_test = halves(datasets.benign_prompts(part="heldout"), 5)
    edgy_dev, edgy_test = halves(datasets.edgy_benign_prompts(), 6)
    return {
        "harmful_train": harmful_train,
        "harmful_cal": harmful_cal,
        "harmful_test": harmful_test,
        "safe_train": safe_train,
        "safe_cal": safe_cal,
        "safe_test": safe_test,
        "framed_harmful_train": [rng.choice(framings).format(prompt=p) for p in harmful_train],
        "framed_safe_train": [rng.choice(framings).format(prompt=p) for p in safe_train],
        "framed_harmful_cal": [rng.choice(framings).format(prompt=p) for p in harmful_cal],
        "framed_safe_cal": [rng.choice(framings).format(prompt=p) for p in safe_cal],
        "edgy_train": edgy_train[: int(len(edgy_train) * 0.75)],
        "edgy_cal": edgy_train[int(len(edgy_train) * 0.75) :],
        "strongreject_dev": strongreject_dev,
        "strongreject_test": strongreject_test,
        "wrapped_dev": [w.format(prompt=p) for w in WRAPPERS for p in strongreject_dev[:40]],
        "wrapped_test": [w.format(prompt=p) for w in WRAPPERS for p in strongreject_test[:60]],
        "everyday_dev": everyday_dev,
        "everyday_test": everyday_test,
        "edgy_dev": edgy_dev,
        "edgy_test": edgy_test,
        "past_tense": phrasings("past_tense", 100),
        "future_tense": phrasings("future_tense", 100),
    }


def record(sets: dict[str, list[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """Last-token and mean activations of every set at every layer, by the model that reads gates (cached)."""
    key = json.dumps(sets, sort_keys=True)
    if CACHE.exists():
        cached = torch.load(CACHE, weights_only=True)
        if cached.get("key") == key:
            return cached["acts"]
    lm = load_model(None, generation_precision("nf4"))
    acts: dict[str, dict[str, torch.Tensor]] = {"last": {}, "mean": {}}
    for token in ("last", "mean"):
        for name, prompts in sets.items():
            started = time.perf_counter()
            acts[token][name] = record_activations(lm, prompts, token=token).half()
            print(f"recorded {token} {name}: {len(prompts)} in {time.perf_counter() - started:.1f}s", flush=True)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "acts": acts}, CACHE)
    return acts


class Reader:
    """A fitted probe over one feature family, with its layer and threshold chosen on calibration prompts."""

    def __init__(self, name: str, features, train: tuple[list[str], list[str]], cal: tuple[list[str], list[str]]):
        self.name, self.features = name, features
        pos, neg = features(train[0]).float(), features(train[1]).float()
        cal_pos, cal_neg = features(cal[0]).float(), features(cal[1]).float()
        best = None
        for penalty in PENALTIES:
            center, scale, w, b = fit_two_sides(pos, neg, penalty)
            score = lambda a, c=center, s=scale, w=w, b=b: torch.einsum("nld,ld->nl", (a - c) / s, w) + b  # noqa: E731
            per_layer = auroc(score(cal_pos), score(cal_neg))
            layer = int(per_layer.argmax())
            if best is None or float(per_layer[layer]) > best[0]:
                best = (float(per_layer[layer]), penalty, layer, score)
        assert best is not None
        self.cal_auroc, self.penalty, self.layer, self._score = best
        self.threshold = threshold_for(self.scores(["safe_cal"]), FPR)  # every reader: the same safe prompts

    def scores(self, names: list[str]) -> list[float]:
        return self._score(self.features(names).float())[:, self.layer].tolist()

    def rate(self, names: list[str], threshold: float | None = None) -> float:
        values = self.scores(names)
        cut = self.threshold if threshold is None else threshold
        return round(sum(v >= cut for v in values) / len(values), 4)

    def frontier(self, sets: list[str]) -> dict[str, dict[str, float]]:
        """Rates on `sets` with the threshold calibrated to each of FRONTIER's shares of calibration safe prompts.

        Readers are compared at equal false positives along the whole curve, not at one point where
        each lands a little differently.
        """
        safe = self.scores(["safe_cal"])
        return {f"{fpr:.0%}": {s: self.rate([s], threshold_for(safe, fpr)) for s in sets} for fpr in FRONTIER}

    def at_equal_false_positives(self, harmful: str, everyday: str) -> dict[str, float]:
        """How well the reader's scores rank `harmful` above `everyday`: the share caught where at most
        each of EVERYDAY_FIRED's shares of `everyday` fires, and the AUROC.

        A measurement of the scores, never an operating point: the cut is read off the measured set
        itself, the same way for every reader, so readers meet at exactly equal false positives.
        """
        positive, negative = self.scores([harmful]), self.scores([everyday])
        out = {
            f"caught at {rate:.0%} fired": self.rate([harmful], threshold_for(negative, rate))
            for rate in EVERYDAY_FIRED
        }
        out["auroc"] = round(float(auroc(torch.tensor(positive)[:, None], torch.tensor(negative)[:, None])[0]), 4)
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report-test", action="store_true", help="also measure the test halves (after choosing)")
    parser.add_argument("--out", type=Path, default=DOCS / "gate-study.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sets = prompt_sets()
    acts = record(sets)
    n_layers = acts["last"]["harmful_train"].shape[1]

    def activations(token: str, layers: list[int] | None = None):
        def features(names: list[str]) -> torch.Tensor:
            parts = []
            for name in names:
                if token == "last+mean":
                    x = torch.cat([acts["last"][name], acts["mean"][name]], dim=-1)
                else:
                    x = acts[token][name]
                if layers is not None:  # several layers side by side, as one feature vector
                    x = x[:, layers].reshape(x.shape[0], 1, -1)
                parts.append(x)
            return torch.cat(parts)

        return features

    texts = {name: prompts for name, prompts in sets.items()}
    from safesteer.metrics import embed

    embedded = {name: embed(prompts)[:, None, :] for name, prompts in texts.items()}
    plain_train = (["harmful_train"], ["safe_train"])
    plain_cal = (["harmful_cal"], ["safe_cal"])
    hard_train = (["harmful_train", "framed_harmful_train"], ["safe_train", "framed_safe_train", "edgy_train"])
    hard_cal = (["harmful_cal", "framed_harmful_cal"], ["safe_cal", "framed_safe_cal", "edgy_cal"])
    vocabulary = tfidf_vocabulary([p for n in plain_train[0] + plain_train[1] for p in texts[n]])
    hard_vocabulary = tfidf_vocabulary([p for n in hard_train[0] + hard_train[1] for p in texts[n]])

    def tfidf(vocab):
        return lambda names: torch.cat([tfidf_features(texts[name], vocab) for name in names])[:, None, :]

    def minilm(names: list[str]) -> torch.Tensor:
        return torch.cat([embedded[n] for n in names])

    middle = [n_layers // 3, n_layers // 2, 2 * n_layers // 3]
    candidates = {
        "tfidf (baseline)": (tfidf(vocabulary), plain_train, plain_cal),
        "minilm (baseline)": (minilm, plain_train, plain_cal),
        "activations last": (activations("last"), plain_train, plain_cal),
        "activations mean": (activations("mean"), plain_train, plain_cal),
        "activations last+mean": (activations("last+mean"), plain_train, plain_cal),
        "activations mean, 3 layers": (activations("mean", middle), plain_train, plain_cal),
        "hardened tfidf": (tfidf(hard_vocabulary), hard_train, hard_cal),
        "hardened minilm": (minilm, hard_train, hard_cal),
        "hardened activations last": (activations("last"), hard_train, hard_cal),
        "hardened activations mean": (activations("mean"), hard_train, hard_cal),
        "hardened activations last+mean": (activations("last+mean"), hard_train, hard_cal),
        "hardened activations mean, 3 layers": (activations("mean", middle), hard_train, hard_cal),
    }
    dev_sets = ["strongreject_dev", "wrapped_dev", "everyday_dev", "edgy_dev", "harmful_test", "safe_test"]
    results = {}
    for name, (features, train, cal) in candidates.items():
        started = time.perf_counter()
        reader = Reader(name, features, train, cal)
        row = {"layer": reader.layer, "penalty": reader.penalty, "calibration_auroc": round(reader.cal_auroc, 4)}
        row |= {s: reader.rate([s]) for s in dev_sets}
        if args.report_test:
            row |= {s: reader.rate([s]) for s in ("strongreject_test", "wrapped_test", "everyday_test", "edgy_test")}
            row |= {s: reader.rate([s]) for s in ("past_tense", "future_tense")}
            row["frontier"] = reader.frontier(["strongreject_test", "everyday_test", "edgy_test", "wrapped_test"])
            row["equal_everyday_fired"] = reader.at_equal_false_positives("strongreject_test", "everyday_test")
        row["fit_s"] = round(time.perf_counter() - started, 1)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    sizes = {k: len(v) for k, v in sets.items()}
    routing = compare_routers(sets, activations("mean"), results["hardened activations mean"]["layer"])
    print("routing", json.dumps(routing), flush=True)
    args.out.write_text(json.dumps({"fpr": FPR, "sizes": sizes, "readers": results, "routing": routing}, indent=2))


def compare_routers(sets: dict[str, list[str]], features, layer: int) -> dict[str, dict[str, object]]:
    """Which category an admitted request goes to: nearest centroid (today) against trained routers.

    Both read the policy gate's features (mean over the prompt, at its layer) standardised by the
    gate's training prompts, learn from the five areas' training prompts (plain and framed) and are
    measured on the areas' held-out test prompts, which neither saw. The router's penalty is the
    gate's (1e-3); nothing is chosen on the test prompts.
    """
    area_of: dict[str, int] = {}
    for k, area in enumerate(AREAS):
        for prompt in datasets.harmful_prompts(area):
            area_of.setdefault(prompt, k)
    labels = lambda name: torch.tensor([area_of[p] for p in sets[name]])  # noqa: E731
    at_layer = lambda names: features(names)[:, layer].float()  # noqa: E731
    train_names = ["harmful_train", "framed_harmful_train"]
    x_train = at_layer(train_names)
    y_train = torch.cat([labels("harmful_train"), labels("harmful_train")])  # framed rows follow the plain ones
    everything = at_layer([*train_names, "safe_train", "framed_safe_train", "edgy_train"])
    center, scale = everything.mean(0), everything.std(0).clamp(min=1e-6)
    z_train, z_test = (x_train - center) / scale, (at_layer(["harmful_test"]) - center) / scale
    y_test = labels("harmful_test")
    centroids = torch.stack([z_train[y_train == k].mean(0) for k in range(len(AREAS))])
    nearest = ((z_test[:, None, :] - centroids[None]) ** 2).mean(-1).argmin(1)
    weights = torch.zeros(z_train.shape[1], len(AREAS), requires_grad=True)
    bias = torch.zeros(len(AREAS), requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=300, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(z_train @ weights + bias, y_train) + 1e-3 * (weights**2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        router = (z_test @ weights + bias).argmax(1)
    # one router per category, as each category's gate trains it (`gates.fit_router`): its prompts against the rest
    routers = [fit_router(z_train[y_train == k], z_train[y_train != k]) for k in range(len(AREAS))]
    per_category = torch.stack([z_test @ w + b for w, b in routers], dim=1).argmax(1)

    def rates(predicted: torch.Tensor) -> dict[str, object]:
        others = {
            area: round(float(((predicted == k) & (y_test != k)).sum() / (y_test != k).sum()), 4)
            for k, area in enumerate(AREAS)
        }
        return {"accuracy": round(float((predicted == y_test).float().mean()), 4), "others_routed_to": others}

    return {
        "layer": layer,
        "test_prompts": len(y_test),
        "nearest centroid": rates(nearest),
        "softmax router": rates(router),
        "one-vs-rest routers": rates(per_category),
    }


if __name__ == "__main__":
    main()
