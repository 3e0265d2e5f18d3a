"""Gates: a per-category classifier that decides which requests a category's vector steers.

A category rule must not tax the traffic it is not about. The activations recorded for
extraction already tell a category's prompts apart from everyday ones, so each category gets a
small logistic-regression probe on one layer's activations (the same site and token the vectors
were made from), trained with no extra model pass:

- positives: the category's harmful prompts; negatives: its safe prompts and, when the policy
  has other categories, their harmful prompts (so categories stay distinct);
- each group is split three ways: *train* fits the probe at every layer, *calibration* picks
  the layer (best AUROC, earliest among near-ties: an early gate is cheaper to read) and the
  threshold (the author's false-positive rate on safe prompts), *test* is only measured, and
  those figures are stored with the gate. Nothing is tuned on the prompts it is reported on.

At inference `steering` reads the gate from an unsteered pass over the prompt and steers only
the rows whose gate fires (docs/gates.md).

The *policy* recipe (`train_policy_gate`, the default for new categories) reads differently, as
`bench/gate_study.py` chose: the gate admits any request of the policy's categories (positives
are all of them, pooled; negatives the safe prompts, the same prompts in training framings, and
edgy-but-benign training prompts), read as the mean over the prompt's tokens. Each category's gate
also carries a router, a one-vs-rest probe of its own prompts against the policy's other ones, and
an admitted request goes to the category whose router scores it highest, so a request is steered
by one category's vector, not by all of them at once. (Gates written before routers route by the
centroid of the category's prompts instead.)
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from safetensors.torch import load, save

from .activations import TOKENS, Token
from .architectures import SITES, Site
from .errors import SafeSteerError

GateMode = Literal["gated", "always"]
GATE_MODES: tuple[GateMode, ...] = ("gated", "always")
GateRecipe = Literal["policy", "category"]
GATE_RECIPES: tuple[GateRecipe, ...] = ("policy", "category")
DEFAULT_FPR = 0.05
FORMAT_VERSION = 1
ROUTED_FORMAT_VERSION = 2  # written for gates with a centroid: older readers refuse them rather than skip routing
ROUTER_FORMAT_VERSION = 3  # written for gates with a router: older readers refuse them rather than route otherwise
POLICY_PENALTY = 1e-3  # the policy recipe's L2 penalty, as chosen on calibration prompts in bench/gate_study.py
HARD_NEGATIVE_CALIBRATION = 0.25  # share of the edgy training prompts kept for choosing the layer
NEAR_TIE = 0.005  # calibration AUROCs this close count as equal; the earlier layer wins
PENALTY = 1e-2  # L2 on standardised weights: there are far fewer prompts than hidden dimensions
SPLIT = (0.6, 0.2, 0.2)  # train, calibration, test
OTHER_SHARE = 0.5  # of the negatives' weight, what the policy's other categories get (safe prompts: the rest)


def check_fpr(fpr: float) -> float:
    if not (isinstance(fpr, (int, float)) and math.isfinite(fpr) and 0.0 < fpr < 1.0):
        raise SafeSteerError(f"the gate's false-positive rate must be between 0 and 1 (exclusive), got {fpr!r}")
    return float(fpr)


def check_mode(mode: str) -> GateMode:
    for known in GATE_MODES:
        if mode == known:
            return known
    raise SafeSteerError(f"unknown gate mode {mode!r}: use one of {', '.join(GATE_MODES)}")


@dataclass(frozen=True)
class GateRates:
    """How often a gate fires on held-out prompts of each group, at one threshold."""

    catch_rate: float  # held-out harmful prompts of the category
    false_positive_rate: float  # held-out safe prompts
    other_categories_rate: float | None  # held-out harmful prompts of the policy's other categories
    n_harmful: int
    n_safe: int
    n_other: int


@dataclass(frozen=True)
class Gate:
    """A trained, calibrated gate: `score(x) = w . (x - center) / scale + bias`, fires when score >= threshold."""

    layer: int
    site: Site
    token: Token
    center: torch.Tensor  # [hidden]
    scale: torch.Tensor  # [hidden]
    weights: torch.Tensor  # [hidden]
    bias: float
    threshold: float
    target_fpr: float = DEFAULT_FPR
    mode: GateMode = "gated"
    auroc: float = float("nan")  # held-out (test split) AUROC, harmful vs everything else
    scores: dict[str, list[float]] = field(default_factory=dict)  # held-out scores by group, for plots and rates
    layer_auroc: list[float] = field(default_factory=list)  # calibration AUROC per layer: why this layer
    precision: str = ""  # the weights it was trained on; read it with the same (docs/gates.md)
    centroid: torch.Tensor | None = None  # [hidden]: the category's own prompts' mean; routes admitted requests
    route: torch.Tensor | None = None  # [hidden], on standardised features: this category against the policy's others
    route_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.site not in SITES or self.token not in TOKENS:
            raise SafeSteerError(f"gate site {self.site!r} / token {self.token!r} is not known")
        check_mode(self.mode)
        check_fpr(self.target_fpr)
        if self.layer < 0 or isinstance(self.layer, bool):
            raise SafeSteerError(f"gate layer {self.layer!r} must be a whole number of at least 0")
        if self.route is not None and self.centroid is None:
            raise SafeSteerError("a gate with a router must also have a centroid")
        parts = [self.center, self.scale, self.weights, *(t for t in (self.centroid, self.route) if t is not None)]
        shapes = {tuple(t.shape) for t in parts}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise SafeSteerError("a gate's center, scale, weights, centroid and router must be vectors of one length")
        for t in parts:
            if not torch.isfinite(t).all():
                raise SafeSteerError("a gate has non-finite parameters")
        if not all(math.isfinite(v) for v in (self.bias, self.threshold, self.route_bias)):
            raise SafeSteerError("a gate's bias, threshold and router bias must be finite numbers")
        if not bool((self.scale > 0).all()):
            raise SafeSteerError("a gate's scale must be positive")

    @property
    def hidden_size(self) -> int:
        return int(self.weights.shape[0])

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Scores of `[rows, hidden]` features (any device and dtype) as float32 `[rows]`."""
        device = features.device
        x = (features.float() - self.center.to(device)) / self.scale.to(device)
        return x @ self.weights.to(device) + self.bias

    def fires(self, scores: torch.Tensor) -> torch.Tensor:
        return scores >= self.threshold

    @property
    def routed(self) -> bool:
        """True for policy gates: among the policy's categories that admit a request, the closest steers it."""
        return self.centroid is not None

    def closeness(self, features: torch.Tensor) -> torch.Tensor:
        """How close `[rows, hidden]` features lie to this category's own prompts (higher: closer), float32 `[rows]`.

        Mean squared distance in the gate's standardised units, negated, so categories compare.
        """
        if self.centroid is None:
            raise SafeSteerError("this gate does not route: it has no centroid")
        device = features.device
        z = (features.float() - self.center.to(device)) / self.scale.to(device)
        c = (self.centroid.to(device) - self.center.to(device)) / self.scale.to(device)
        return -((z - c) ** 2).mean(dim=-1)

    def route_logit(self, features: torch.Tensor) -> torch.Tensor:
        """How strongly this category's router claims `[rows, hidden]` features, float32 `[rows]`.

        One-vs-rest logits of a policy's categories compare: the highest steers (`steering.decide_rows`).
        """
        if self.route is None:
            raise SafeSteerError("this gate has no router")
        device = features.device
        z = (features.float() - self.center.to(device)) / self.scale.to(device)
        return z @ self.route.to(device) + self.route_bias

    def rates(self, threshold: float | None = None) -> GateRates:
        """Held-out firing rates at `threshold` (default: the gate's own)."""
        t = self.threshold if threshold is None else threshold

        def rate(group: str) -> float | None:
            values = self.scores.get(group) or []
            if group == "other" and "other_routed" in self.scores:  # admitted, and routed to this category
                flags = self.scores["other_routed"]
                return (
                    sum(v >= t and f > 0 for v, f in zip(values, flags, strict=True)) / len(values) if values else None
                )
            return sum(v >= t for v in values) / len(values) if values else None

        return GateRates(
            catch_rate=rate("harmful") or 0.0,
            false_positive_rate=rate("safe") or 0.0,
            other_categories_rate=rate("other"),
            n_harmful=len(self.scores.get("harmful", [])),
            n_safe=len(self.scores.get("safe", [])),
            n_other=len(self.scores.get("other", [])),
        )

    def with_threshold(self, threshold: float) -> Gate:
        if not math.isfinite(threshold):
            raise SafeSteerError("a gate threshold must be a finite number")
        return replace(self, threshold=float(threshold))

    def with_fpr(self, fpr: float) -> Gate:
        """The same probe, its threshold recalibrated to another false-positive rate on calibration prompts."""
        return replace(self, threshold=calibrated_threshold(self.scores, check_fpr(fpr)), target_fpr=float(fpr))

    def with_mode(self, mode: str) -> Gate:
        return replace(self, mode=check_mode(mode))

    def summary(self) -> dict[str, Any]:
        """What people and scripts see: where it reads, its operating point, its held-out rates."""
        return {
            "mode": self.mode,
            "recipe": "policy" if self.routed else "category",
            "token": self.token,
            "layer": self.layer,
            "threshold": round(self.threshold, 4),
            "target_fpr": self.target_fpr,
            "auroc": round(self.auroc, 4),
            "precision": self.precision,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self.rates()).items()},
        }

    @property
    def format_version(self) -> int:
        """The oldest gate format that holds everything this gate decides with."""
        if self.route is not None:
            return ROUTER_FORMAT_VERSION
        return ROUTED_FORMAT_VERSION if self.routed else FORMAT_VERSION

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "layer": self.layer,
            "site": self.site,
            "token": self.token,
            "bias": self.bias,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "mode": self.mode,
            "auroc": self.auroc if math.isfinite(self.auroc) else None,
            "scores": self.scores,
            "layer_auroc": self.layer_auroc,
            "precision": self.precision,
            **({"route_bias": self.route_bias} if self.route is not None else {}),
        }

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"center": self.center, "scale": self.scale, "weights": self.weights}
        if self.centroid is not None:
            tensors["centroid"] = self.centroid
        if self.route is not None:
            tensors["route"] = self.route
        return {k: v.contiguous().float() for k, v in tensors.items()}

    def to_bytes(self) -> bytes:
        """One safetensors blob; settings and held-out scores ride in its header as JSON."""
        return save(self.to_tensors(), metadata={"gate": json.dumps(self.metadata())})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "data") -> Gate:
        try:
            tensors = load(data)
            header_length = int.from_bytes(data[:8], "little")
            metadata = json.loads(json.loads(data[8 : 8 + header_length])["__metadata__"]["gate"])
        except Exception as exc:
            raise SafeSteerError(f"{source} is not a SafeSteer gate ({type(exc).__name__})") from exc
        return cls.from_parts(tensors, metadata, source)

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], source: str = "data") -> Gate:
        if int(metadata.get("format_version", 0)) > ROUTER_FORMAT_VERSION:
            raise SafeSteerError(f"{source}: this gate was written by a newer SafeSteer; upgrade to read it")
        try:
            scores = {str(k): [float(v) for v in values] for k, values in dict(metadata.get("scores", {})).items()}
            auroc_value = metadata.get("auroc")
            return cls(
                layer=int(metadata["layer"]),
                site=metadata["site"],
                token=metadata["token"],
                center=tensors["center"].float(),
                scale=tensors["scale"].float(),
                weights=tensors["weights"].float(),
                bias=float(metadata["bias"]),
                threshold=float(metadata["threshold"]),
                target_fpr=float(metadata.get("target_fpr", DEFAULT_FPR)),
                mode=metadata.get("mode", "gated"),
                auroc=float("nan") if auroc_value is None else float(auroc_value),
                scores=scores,
                layer_auroc=[float(v) for v in metadata.get("layer_auroc", [])],
                precision=str(metadata.get("precision", "")),
                centroid=tensors["centroid"].float() if "centroid" in tensors else None,
                route=tensors["route"].float() if "route" in tensors else None,
                route_bias=float(metadata.get("route_bias", 0.0)),
            )
        except SafeSteerError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise SafeSteerError(f"{source}: the gate is incomplete ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class GateReading:
    """What the gates said about each row of one batch: `scores[row][k]` and `fired[row][k]` per gated spec k."""

    scores: list[list[float]]
    fired: list[list[bool]]


# --- training ------------------------------------------------------------------------------------


def threshold_for(safe_scores: Sequence[float], fpr: float) -> float:
    """The lowest threshold at which at most `fpr` of these safe scores fire (a gate fires at score >= threshold)."""
    if not safe_scores:
        return 0.0
    ordered = sorted(safe_scores, reverse=True)
    allowed = math.floor(fpr * len(ordered) + 1e-9)  # how many may fire
    if allowed >= len(ordered):
        return ordered[-1]
    return math.nextafter(ordered[allowed], math.inf)


def calibrated_threshold(calibration: dict[str, list[float]], fpr: float) -> float:
    """The threshold firing on at most `fpr` of calibration safe prompts and `2 * fpr` of other categories'.

    The second bound keeps a policy's categories distinct; without other categories it is void.
    """
    threshold = threshold_for(calibration.get("calibration_safe", []), fpr)
    others = calibration.get("calibration_other")
    if others:
        threshold = max(threshold, threshold_for(others, min(1.0, 2 * fpr)))
    return threshold


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """AUROC per column of `[p, L]` vs `[n, L]` scores (ties count half)."""
    greater = (positive.unsqueeze(1) > negative.unsqueeze(0)).float().mean((0, 1))
    ties = (positive.unsqueeze(1) == negative.unsqueeze(0)).float().mean((0, 1))
    return greater + 0.5 * ties


def _three_way(n: int, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    indices = list(range(n))
    rng.shuffle(indices)
    n_test = max(1, round(n * SPLIT[2]))
    n_cal = max(1, round(n * SPLIT[1]))
    return indices[n_test + n_cal :], indices[n_test : n_test + n_cal], indices[:n_test]


def fit_logistic_all_layers(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, ...]:
    """Weighted, L2-penalised logistic regression at every layer at once.

    x `[n, L, d]`, y `[n]` in {0, 1}, weight `[n]` summing to 1 -> center, scale `[L, d]`, w `[L, d]`, b `[L]`.
    The layers' problems are independent, so one L-BFGS run over all of them solves each.
    """
    center = x.mean(0)
    scale = x.std(0, unbiased=False).clamp(min=1e-4)
    z = ((x - center) / scale).transpose(0, 1).contiguous()  # [L, n, d]
    n_layers, _, hidden = z.shape
    w = torch.zeros(n_layers, hidden, requires_grad=True)
    b = torch.zeros(n_layers, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("lnd,ld->ln", z, w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.expand_as(logits), weight=weight.expand_as(logits), reduction="sum"
        )
        loss = loss + penalty * 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return center, scale, w.detach(), b.detach()


def _gate_at(layer: int, fitted: tuple[torch.Tensor, ...], **fields: Any) -> Gate:
    """The probe fitted at every layer (`fit_logistic_all_layers`), kept at `layer`, with its other fields."""
    center, scale, w, b = fitted
    return Gate(
        layer=layer,
        center=center[layer].clone(),
        scale=scale[layer].clone(),
        weights=w[layer].clone(),
        bias=float(b[layer]),
        **fields,
    )


def train_gate(
    harmful: torch.Tensor,
    safe: torch.Tensor,
    others: torch.Tensor | None = None,
    *,
    site: Site = "residual",
    token: Token = "last",
    target_fpr: float = DEFAULT_FPR,
    seed: int = 0,
    mode: GateMode = "gated",
    precision: str = "",
) -> Gate:
    """Train and calibrate a category's gate from recorded activations `[n, L, d]` (others may be empty)."""
    check_fpr(target_fpr)
    others = others if others is not None and others.shape[0] >= 3 else None
    for name, group, least in (("harmful", harmful, 3), ("safe", safe, 3)):
        if group.shape[0] < least:
            raise SafeSteerError(f"a gate needs at least {least} {name} prompts, got {group.shape[0]}")
    rng = random.Random(seed)
    groups = {"harmful": harmful, "safe": safe, **({"other": others} if others is not None else {})}
    splits = {name: _three_way(int(acts.shape[0]), rng) for name, acts in groups.items()}

    def part(index: int) -> dict[str, torch.Tensor]:
        return {name: groups[name][splits[name][index]].float() for name in groups}

    train, calibration, test = part(0), part(1), part(2)
    negatives = [train[name] for name in ("safe", "other") if name in train]
    x = torch.cat([train["harmful"], *negatives])
    y = torch.cat([torch.ones(train["harmful"].shape[0]), torch.zeros(sum(n.shape[0] for n in negatives))])
    # Each side weighs half; the negative half is split between safe prompts and other categories.
    shares = [1.0 - OTHER_SHARE, OTHER_SHARE] if len(negatives) == 2 else [1.0]
    weight = [torch.full((train["harmful"].shape[0],), 0.5 / train["harmful"].shape[0])]
    for negative, share in zip(negatives, shares, strict=True):
        weight.append(torch.full((negative.shape[0],), 0.5 * share / negative.shape[0]))
    center, scale, w, b = fit_logistic_all_layers(x, y, torch.cat(weight), PENALTY)

    def scores(acts: torch.Tensor) -> torch.Tensor:  # [n, L]
        return torch.einsum("nld,ld->nl", (acts - center) / scale, w) + b

    cal_negative = torch.cat([scores(calibration[n]) for n in ("safe", "other") if n in calibration])
    layer_auroc = auroc(scores(calibration["harmful"]), cal_negative)
    best = float(layer_auroc.max())
    layer = int(next(i for i, a in enumerate(layer_auroc.tolist()) if a >= best - NEAR_TIE))

    def at_layer(acts: torch.Tensor) -> list[float]:
        return scores(acts)[:, layer].tolist()

    calibration_scores = {
        f"calibration_{name}": at_layer(calibration[name]) for name in ("safe", "other") if name in calibration
    }
    held_out = {name: at_layer(acts) for name, acts in test.items()}
    test_negative = [v for name in ("safe", "other") for v in held_out.get(name, [])]
    test_auroc = float(auroc(torch.tensor(held_out["harmful"])[:, None], torch.tensor(test_negative)[:, None])[0])
    return _gate_at(
        layer,
        (center, scale, w, b),
        site=site,
        token=token,
        threshold=calibrated_threshold(calibration_scores, target_fpr),
        target_fpr=target_fpr,
        mode=mode,
        auroc=test_auroc,
        scores={**held_out, **calibration_scores},
        layer_auroc=[round(float(a), 4) for a in layer_auroc],
        precision=precision,
    )


def fit_two_sides(positives: torch.Tensor, negatives: torch.Tensor, penalty: float) -> tuple[torch.Tensor, ...]:
    """`fit_logistic_all_layers` of positives `[p, L, d]` against negatives `[n, L, d]`, each side weighing half."""
    x = torch.cat([positives, negatives])
    y = torch.cat([torch.ones(positives.shape[0]), torch.zeros(negatives.shape[0])])
    weight = torch.cat(
        [
            torch.full((positives.shape[0],), 0.5 / positives.shape[0]),
            torch.full((negatives.shape[0],), 0.5 / negatives.shape[0]),
        ]
    )
    return fit_logistic_all_layers(x, y, weight, penalty)


def policy_splits(n_pool: int, n_safe: int, seed: int) -> tuple[tuple[list[int], ...], tuple[list[int], ...]]:
    """(train, calibration, test) indices of a policy's harmful pool and of its safe prompts.

    One function, so a policy gate and the text baselines shown beside it split alike.
    """
    rng = random.Random(seed)
    return _three_way(n_pool, rng), _three_way(n_safe, rng)


def train_policy_gate(
    pool: torch.Tensor,
    own: torch.Tensor,
    safe: torch.Tensor,
    framed_pool: torch.Tensor,
    framed_safe: torch.Tensor,
    hard_negatives: torch.Tensor,
    *,
    site: Site = "residual",
    token: Token = "mean",
    target_fpr: float = DEFAULT_FPR,
    seed: int = 0,
    mode: GateMode = "gated",
    precision: str = "",
) -> Gate:
    """A policy gate from activations `[n, L, d]`: admits any of the policy's categories, routes by its router.

    `pool` holds every harmful prompt of the policy (`PolicyGateSets` orders it canonically) and
    `own` marks this category's rows, so every category of a policy trains the same admission and
    only its centroid and router differ. `framed_*` are the same prompts, row for row, in the training
    framings; `hard_negatives` are edgy-but-benign prompts. The pool and the safe prompts are split
    as `train_gate` splits (a framed prompt falls on the side of its plain one); the layer is chosen
    by calibration AUROC of all positives against all negatives, and the threshold fires on at most
    `target_fpr` of the calibration safe prompts.
    """
    check_fpr(target_fpr)
    own = own.bool()
    if int(own.sum()) < 3 or safe.shape[0] < 3:
        raise SafeSteerError(
            f"a gate needs at least 3 harmful and 3 safe prompts, got {int(own.sum())} and {safe.shape[0]}"
        )
    if framed_pool.shape != pool.shape or framed_safe.shape != safe.shape or own.shape[0] != pool.shape[0]:
        raise SafeSteerError("framed prompts must match their plain prompts row for row")
    pool_split, safe_split = policy_splits(pool.shape[0], safe.shape[0], seed)
    n_hard_cal = round(hard_negatives.shape[0] * HARD_NEGATIVE_CALIBRATION)
    hard = (hard_negatives[n_hard_cal:].float(), hard_negatives[:n_hard_cal].float())

    def sides(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, safe_rows = pool_split[index], safe_split[index]
        positives = torch.cat([pool[rows], framed_pool[rows]]).float()
        return positives, torch.cat([safe[safe_rows].float(), framed_safe[safe_rows].float(), hard[index]])

    center, scale, w, b = fit_two_sides(*sides(0), POLICY_PENALTY)

    def scores(acts: torch.Tensor) -> torch.Tensor:  # [n, L]
        return torch.einsum("nld,ld->nl", (acts.float() - center) / scale, w) + b

    cal_positive, cal_negative = sides(1)
    layer_auroc = auroc(scores(cal_positive), scores(cal_negative))
    layer = int(layer_auroc.argmax())

    def rows_of(index: int, mine: bool) -> list[int]:
        return [i for i in pool_split[index] if bool(own[i]) == mine]

    def at_layer(acts: torch.Tensor) -> list[float]:
        return scores(acts)[:, layer].tolist()

    centroid = pool[rows_of(0, True)][:, layer].float().mean(0)
    held_out = {"harmful": at_layer(pool[rows_of(2, True)]), "safe": at_layer(safe[safe_split[2]])}
    route, routed_scores = _routing(pool, framed_pool, own, pool_split, layer, (center[layer], scale[layer]), at_layer)
    held_out.update(routed_scores)
    calibration_scores = {"calibration_safe": at_layer(safe[safe_split[1]])}
    test_auroc = float(auroc(torch.tensor(held_out["harmful"])[:, None], torch.tensor(held_out["safe"])[:, None])[0])
    return _gate_at(
        layer,
        (center, scale, w, b),
        site=site,
        token=token,
        threshold=threshold_for(calibration_scores["calibration_safe"], target_fpr),
        target_fpr=target_fpr,
        mode=mode,
        auroc=test_auroc,
        scores={**held_out, **calibration_scores},
        layer_auroc=[round(float(a), 4) for a in layer_auroc],
        precision=precision,
        centroid=centroid.clone(),
        route=None if route is None else route[0].clone(),
        route_bias=0.0 if route is None else route[1],
    )


def _routing(
    pool: torch.Tensor,
    framed_pool: torch.Tensor,
    own: torch.Tensor,
    pool_split: tuple[list[int], ...],
    layer: int,
    standard: tuple[torch.Tensor, torch.Tensor],
    admission: Callable[[torch.Tensor], list[float]],
) -> tuple[tuple[torch.Tensor, float] | None, dict[str, list[float]]]:
    """A category's router against the policy's other categories, and its held-out figures on theirs.

    `pool`/`framed_pool` `[n, L, d]` are every harmful prompt of the policy, plain and framed; `own`
    marks the category's rows; `standard` is the gate's (center, scale) at `layer`; `admission` scores
    `[n, L, d]` by the gate's admission. No router (and no figures) with fewer than 3 other training prompts.
    """
    own_train = [i for i in pool_split[0] if bool(own[i])]
    others_train = [i for i in pool_split[0] if not bool(own[i])]
    others_test = [i for i in pool_split[2] if not bool(own[i])]
    if len(others_train) < 3:
        return None, {}
    center, scale = standard

    def standardised(acts: torch.Tensor) -> torch.Tensor:
        return (acts[:, layer].float() - center) / scale

    route = fit_router(
        standardised(torch.cat([pool[own_train], framed_pool[own_train]])),
        standardised(torch.cat([pool[others_train], framed_pool[others_train]])),
    )
    if not others_test:
        return route, {}
    claims = standardised(pool[others_test]) @ route[0] + route[1]  # would it claim another category's prompt?
    return route, {"other": admission(pool[others_test]), "other_routed": (claims > 0).float().tolist()}


def with_router(gate: Gate, pool: torch.Tensor, framed_pool: torch.Tensor, own: torch.Tensor, seed: int = 0) -> Gate:
    """A policy gate given the router `train_policy_gate` fits, against the categories now in `pool`.

    Why: a category extracted while it was its policy's only one had nothing to learn a router
    from, and a router learnt earlier never saw the categories saved since. Its admission (layer,
    weights, threshold, and the rates shown for them) stays as the author accepted it; only whom it
    claims among the policy's categories is learnt again, on the pool's training split as at extraction.
    """
    if not gate.routed:
        raise SafeSteerError("only a policy gate routes: this gate has no centroid")
    if pool.shape != framed_pool.shape or own.shape[0] != pool.shape[0] or pool.shape[-1] != gate.hidden_size:
        raise SafeSteerError("a router learns from a pool of the gate's width, framed row for row")
    pool_split, _ = policy_splits(pool.shape[0], 0, seed)

    def admission(acts: torch.Tensor) -> list[float]:
        return gate.score(acts[:, gate.layer]).tolist()

    standard = (gate.center, gate.scale)
    route, scores = _routing(pool, framed_pool, own.bool(), pool_split, gate.layer, standard, admission)
    kept = {k: v for k, v in gate.scores.items() if k not in ("other", "other_routed")}
    if route is None:
        return replace(gate, route=None, route_bias=0.0, scores=kept)
    return replace(gate, route=route[0].clone(), route_bias=route[1], scores={**kept, **scores})


def fit_router(own: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A one-vs-rest router on standardised features `[n, d]`: (weights `[d]`, bias) on those same features.

    Why a router, not the centroid: Do-Not-Answer's areas overlap, and the nearest centroid sent up
    to 12% of other areas' held-out prompts to one category where trained routers sent at most 5%
    (`routing` in docs/gate-study.json). Each side weighs half, so a logit of 0 is the balanced boundary.
    """
    center, scale, w, b = fit_two_sides(own[:, None, :], others[:, None, :], POLICY_PENALTY)
    weights = w[0] / scale[0]  # folded, so the router reads the gate's own standardised features
    return weights, float(b[0] - weights @ center[0])
