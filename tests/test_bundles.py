import io
import json
import zipfile
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save

from db import PolicyStore
from safesteer import SafeSteerError, SteeringSpec, generate
from safesteer.bundles import bundle_bytes, load_bundle, read_bundle
from safesteer.llama_cpp import export_llama_cpp
from safesteer.operations import DEFAULT, LEGACY
from safesteer.policy import PolicyVersion
from safesteer.workflows import import_bundle
from tests.policy_factory import IDENTITY, category


def _version(**kwargs) -> PolicyVersion:
    return PolicyVersion(
        policy="Weapons policy",
        categories=[category(), category("fraud", seed=2, layer=2, strength=1.5)],
        number=3,
        author="ann",
        note="tighter",
        description="keeps weapon talk safe",
        evaluation={"unsafe_rate": 0.1},
        **kwargs,
    )


def _rezip(members: dict[str, bytes], rehash: bool = True) -> bytes:
    """Rebuild a bundle with altered members; rehash=True also fixes the manifest's hashes."""
    manifest = json.loads(members["manifest.json"])
    if rehash:
        import hashlib

        manifest["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "manifest.json"}
    members = {**members, "manifest.json": json.dumps(manifest).encode()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_bundle_contents_and_round_trip():
    version = _version()
    data = bundle_bytes(version, created_by="ann")
    members = _members(data)
    assert set(members) == {"manifest.json", "vectors.safetensors", "examples.csv", "evaluation.json", "README.md"}
    manifest = json.loads(members["manifest.json"])
    assert manifest["format"] == "safesteer-policy-bundle" and manifest["format_version"] == 3  # options ride along
    assert all(c["steering"] == DEFAULT.to_dict() for c in manifest["categories"])
    assert manifest["model"] == IDENTITY.to_dict()
    assert [(c["name"], c["layer"], c["strength"]) for c in manifest["categories"]] == [
        ("weapons", 1, 2.0),
        ("fraud", 2, 1.5),
    ]
    assert "Weapons policy" in members["README.md"].decode() and "load_bundle" in members["README.md"].decode()

    back = read_bundle(data)
    assert (back.policy, back.number, back.author, back.note, back.description) == (
        "Weapons policy",
        3,
        "ann",
        "tighter",
        "keeps weapon talk safe",
    )
    assert back.evaluation == {"unsafe_rate": 0.1}
    for a, b in zip(version.categories, back.categories, strict=True):
        assert (a.name, a.layer, a.strength, a.harmful, a.safe) == (b.name, b.layer, b.strength, b.harmful, b.safe)
        assert torch.equal(a.vectors.vectors, b.vectors.vectors)
        assert a.vectors.metadata() == b.vectors.metadata()


def test_import_into_a_fresh_database_and_steer_identically(tiny_lm, tmp_path):
    identity = tiny_lm.identity
    version = PolicyVersion(policy="tiny", categories=[category(identity=identity, strength=4.0)], number=1)
    data = bundle_bytes(version)
    store = PolicyStore(f"sqlite:///{tmp_path / 'fresh.db'}")
    name, number = import_bundle(store, data, target=identity, actor="deployer")
    assert (name, number) == ("tiny", 1)
    stored = store.load_version("tiny")
    assert torch.equal(stored.categories[0].vectors.vectors, version.categories[0].vectors.vectors)
    assert store.audit_log("tiny")[0].actor == "deployer"

    prompt = "How do I pick a lock?"
    expected = generate(tiny_lm, [prompt], version.steering_specs(), max_new_tokens=16)[0]
    assert generate(tiny_lm, [prompt], stored.steering_specs(), max_new_tokens=16)[0] == expected
    assert expected != generate(tiny_lm, [prompt], max_new_tokens=16)[0]

    path = tmp_path / "tiny.zip"
    path.write_bytes(data)
    bundle = load_bundle(path)
    with bundle.apply(tiny_lm.model):  # the deployer's raw transformers model
        batch = tiny_lm.encode([prompt])
        out = tiny_lm.model.generate(
            **batch, max_new_tokens=16, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id
        )
    text = tiny_lm.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert text == expected


def test_wrong_model_is_refused_naming_both(tmp_path):
    store = PolicyStore(f"sqlite:///{tmp_path / 'db.db'}")
    other = IDENTITY.__class__("big/model", None, "nf4", "llama", 30, 576)
    with pytest.raises(
        SafeSteerError, match=r"made for toy/model .*hidden size 64.* cannot be applied to big/model .*hidden size 576"
    ):
        import_bundle(store, bundle_bytes(_version()), target=other)
    assert store.list_policies(include_archived=True) == []


def _zip_with(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buffer.getvalue()


HOSTILE = {
    "not a zip": (lambda good: b"PK\x03\x04 this is not really a zip", "not a zip file"),
    "path traversal": (lambda good: _zip_with([*_members(good).items(), ("../evil.py", b"x")]), "unsafe path"),
    "absolute path": (lambda good: _zip_with([*_members(good).items(), ("/etc/cron.d/x", b"x")]), "unsafe path"),
    "nested path": (lambda good: _zip_with([*_members(good).items(), ("sub/README.md", b"x")]), "unexpected file"),
    "pickle inside": (
        lambda good: _zip_with([*_members(good).items(), ("vectors.pt", b"\x80\x04K.")]),
        "unexpected file",
    ),
    "duplicate member": (lambda good: _zip_with([*_members(good).items(), ("README.md", b"again")]), "appears twice"),
    "zip bomb": (
        lambda good: _zip_with(
            [(n, d) for n, d in _members(good).items() if n != "examples.csv"] + [("examples.csv", b"\0" * (40 << 20))]
        ),
        "would unpack to",
    ),
    "too well compressed": (
        lambda good: _zip_with(
            [(n, d) for n, d in _members(good).items() if n != "evaluation.json"]
            + [("evaluation.json", b'"' + b"a" * (2 << 20) + b'"')]
        ),
        "compressed suspiciously well",
    ),
    "missing manifest": (
        lambda good: _zip_with([(n, d) for n, d in _members(good).items() if n != "manifest.json"]),
        "'manifest.json' is missing",
    ),
    "tampered examples": (
        lambda good: _rezip(
            {**_members(good), "examples.csv": _members(good)["examples.csv"] + b"weapons,harmful,new\n"}, rehash=False
        ),
        "does not match its sha256",
    ),
    "future format": (
        lambda good: _rezip(
            {
                **_members(good),
                "manifest.json": json.dumps(
                    {**json.loads(_members(good)["manifest.json"]), "format_version": 99}
                ).encode(),
            }
        ),
        "format version 99 is not supported",
    ),
    "manifest not json": (lambda good: _rezip_raw_manifest(good, b"{not json"), "not valid JSON"),
    "wrong tensor shape": (
        lambda good: _rezip(
            {
                **_members(good),
                "vectors.safetensors": save({"category.0": torch.zeros(4, 63), "category.1": torch.zeros(4, 64)}),
            }
        ),
        "needs float32",
    ),
    "nan vectors": (
        lambda good: _rezip(
            {
                **_members(good),
                "vectors.safetensors": save(
                    {"category.0": torch.full((4, 64), float("nan")), "category.1": torch.zeros(4, 64)}
                ),
            }
        ),
        "non-finite",
    ),
    "garbage safetensors": (
        lambda good: _rezip({**_members(good), "vectors.safetensors": b"\xff" * 64}),
        "not a valid safetensors",
    ),
    "unknown category in examples": (
        lambda good: _rezip({**_members(good), "examples.csv": b"category,side,prompt\nghost,harmful,boo\n"}),
        "unknown category or side",
    ),
    "bad layer": (
        lambda good: _rezip({**_members(good), "manifest.json": _manifest_with(good, layer=99)}),
        "layer 99 is out of range",
    ),
}


def _rezip_raw_manifest(good: bytes, manifest: bytes) -> bytes:
    return _zip_with(
        [("manifest.json", manifest), *[(n, d) for n, d in _members(good).items() if n != "manifest.json"]]
    )


def _manifest_with(good: bytes, layer: int) -> bytes:
    manifest = json.loads(_members(good)["manifest.json"])
    manifest["categories"][0]["layer"] = layer
    return json.dumps(manifest).encode()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bundles_are_refused_and_change_nothing(case, tmp_path):
    make, message = HOSTILE[case]
    data = make(bundle_bytes(_version()))
    store = PolicyStore(f"sqlite:///{tmp_path / 'db.db'}")
    store.save_version("existing", [category()])
    before = (store.list_policies(include_archived=True), store.audit_log())
    with pytest.raises(SafeSteerError, match=message) as info:
        import_bundle(store, data, target=IDENTITY)
    assert str(info.value).startswith("not a valid policy bundle")
    assert (store.list_policies(include_archived=True), store.audit_log()) == before


def test_llama_cpp_control_vector_reads_back(tmp_path):
    import gguf
    import numpy as np

    version = PolicyVersion(
        policy="p",
        categories=[
            category(layer=1, strength=2.0),
            category("fraud", seed=2, layer=3, strength=0.5),
            category("spam", seed=4, layer=3, strength=1.0),
        ],
    )
    path = export_llama_cpp(version, tmp_path / "p.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(fields["controlvector.model_hint"].parts[-1]).decode() == "llama"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 4
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.3"}
    assert all(t.shape == (64,) and t.dtype == np.float32 for t in tensors.values())
    c = version.categories
    np.testing.assert_allclose(tensors["direction.1"], (2.0 * c[0].vectors.vector(1)).numpy(), rtol=1e-6)
    expected3 = 0.5 * c[1].vectors.vector(3) + 1.0 * c[2].vectors.vector(3)
    np.testing.assert_allclose(tensors["direction.3"], expected3.numpy(), rtol=1e-5, atol=1e-6)


def test_llama_cpp_export_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(SafeSteerError, match="attention output"):
        export_llama_cpp(PolicyVersion(policy="p", categories=[category(site="attention")]), tmp_path / "a.gguf")
    with pytest.raises(SafeSteerError, match="layer 0"):
        export_llama_cpp(PolicyVersion(policy="p", categories=[category(layer=0)]), tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_steering_spec_of_a_category_uses_its_site():
    spec = category(site="attention", layer=2, strength=3.0).steering_spec()
    assert isinstance(spec, SteeringSpec) and (spec.site, spec.layer, spec.strength) == ("attention", 2, 3.0)


def _gated_version(identity=IDENTITY) -> PolicyVersion:
    gated = category(identity=identity, strength=4.0)
    assert gated.gate is not None and gated.mode == "gated"  # new categories are gated by default
    return PolicyVersion(policy="gated", categories=[gated], number=1)


def test_gates_round_trip_through_bundles_and_the_store(tmp_path):
    version = _gated_version()
    gate = version.categories[0].gate
    members = _members(bundle_bytes(version))
    assert {"category.0", "category.0.gate.weights"} <= set(json.loads(members["manifest.json"])["files"]) | {
        name for name in load_tensors(members["vectors.safetensors"])
    }
    back = read_bundle(bundle_bytes(version)).categories[0].gate
    assert back is not None and torch.equal(back.weights, gate.weights)
    assert (back.threshold, back.mode, back.layer, back.rates()) == (gate.threshold, "gated", gate.layer, gate.rates())
    store = PolicyStore(f"sqlite:///{tmp_path / 'g.db'}")
    import_bundle(store, bundle_bytes(version), target=IDENTITY)
    stored = store.load_version("gated").categories[0].gate
    assert stored is not None and stored.threshold == gate.threshold
    # A moved threshold and a changed mode are changes of the policy.
    moved = version.categories[0]
    moved.vectors = moved.vectors.with_gate(gate.with_threshold(gate.threshold + 1.0).with_mode("always"))
    store.save_version("gated", [moved], author="ann", note="looser gate")
    changed = store.diff("gated", 1, 2).categories[0]
    assert changed.status == "changed"
    assert changed.settings_changed["mode"] == ("gated", "always")
    assert changed.settings_changed["gate_threshold"][1] > changed.settings_changed["gate_threshold"][0]


def test_a_policy_gate_keeps_its_router_through_bundles_and_the_store(tmp_path):
    from safesteer.gates import train_policy_gate

    g = torch.Generator().manual_seed(3)
    n, shape = 24, (IDENTITY.n_layers, IDENTITY.hidden_size)
    pool = torch.randn(n, *shape, generator=g) + 2.0
    pool[: n // 2, :, :8] += 3.0  # this category's half of the pool stands apart from the other's
    safe = torch.randn(n, *shape, generator=g)
    noise = lambda a: a + 0.1 * torch.randn(a.shape, generator=g)  # noqa: E731  (the prompts, dressed up)
    gate = train_policy_gate(
        pool, torch.arange(n) < n // 2, safe, noise(pool), noise(safe), torch.randn(8, *shape, generator=g)
    )
    assert gate.route is not None and gate.format_version == 3
    version = _gated_version()
    version.categories[0].vectors = version.categories[0].vectors.with_gate(gate)
    back = read_bundle(bundle_bytes(version)).categories[0].gate
    assert back is not None and back.route is not None and torch.equal(back.route, gate.route)
    assert back.route_bias == gate.route_bias and torch.equal(back.centroid, gate.centroid)
    store = PolicyStore(f"sqlite:///{tmp_path / 'r.db'}")
    import_bundle(store, bundle_bytes(version), target=IDENTITY)
    stored = store.load_version("gated").categories[0].gate
    assert stored is not None and stored.route is not None and torch.equal(stored.route, gate.route)


def test_an_old_bundle_without_gates_imports_as_always():
    version = _gated_version()
    members = _members(bundle_bytes(version))
    manifest = json.loads(members["manifest.json"])
    manifest["format_version"] = 1  # what SafeSteer wrote before gates
    for entry in manifest["categories"]:
        del entry["vectors"]["gate"]
    tensors = load_tensors(members["vectors.safetensors"])
    members["vectors.safetensors"] = save({k: v for k, v in tensors.items() if ".gate." not in k})
    members["manifest.json"] = json.dumps(manifest).encode()
    old = read_bundle(_rezip(members))
    assert old.categories[0].gate is None and old.categories[0].mode == "always"
    assert old.categories[0].steering_spec().gate is None


def test_a_gate_with_hostile_values_is_refused():
    members = _members(bundle_bytes(_gated_version()))
    manifest = json.loads(members["manifest.json"])
    manifest["categories"][0]["vectors"]["gate"]["layer"] = 99
    members["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(SafeSteerError, match=r"not a valid policy bundle.*gate"):
        read_bundle(_rezip(members))
    tensors = load_tensors(members["vectors.safetensors"])
    tensors["category.0.gate.weights"] = torch.full((64,), float("nan"))
    members["vectors.safetensors"] = save(tensors)
    manifest["categories"][0]["vectors"]["gate"]["layer"] = 1
    members["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(SafeSteerError, match="non-finite"):
        read_bundle(_rezip(members))


def test_llama_cpp_export_of_a_gated_policy_says_how_it_will_behave(tmp_path):
    from safesteer.workflows import export_warning

    version = _gated_version()
    warning = export_warning(version, "llama-cpp")
    assert warning and "cannot gate" in warning and "every request" in warning and "'weapons'" in warning
    assert export_warning(version, "bundle") is None
    always = version.categories[0]
    always.vectors = always.vectors.with_gate(always.gate.with_mode("always"))
    assert "cannot gate" not in (export_warning(version, "llama-cpp") or "")
    version.categories = [replace(c, options=LEGACY) for c in version.categories]  # add at every position
    assert export_warning(version, "llama-cpp") is None


def test_the_deployer_api_gates_too(tiny_lm, tmp_path):
    """`load_bundle(...).apply(model)` reads the gate at the prompt pass of the deployer's own generate call."""
    version = _gated_version(tiny_lm.identity)
    prompts = ["How do I pick a lock?", "How do I bake bread?"]
    expected = generate(tiny_lm, prompts, version.steering_specs(), max_new_tokens=12, decoder="transformers")
    path = tmp_path / "gated.zip"
    path.write_bytes(bundle_bytes(version))
    with load_bundle(path).apply(tiny_lm.model):
        batch = tiny_lm.encode(prompts)
        out = tiny_lm.model.generate(
            **batch, max_new_tokens=12, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id
        )
    texts = tiny_lm.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [t.strip() for t in texts] == expected


def test_llama_cpp_export_spreads_shares_and_warns_about_options_it_cannot_keep(tmp_path):
    import gguf
    import numpy as np

    from safesteer.llama_cpp import export_warning
    from safesteer.operations import SteeringOptions

    spread = replace(category(layer=2, strength=3.0), options=SteeringOptions(spread=3))
    version = PolicyVersion(policy="p", categories=[spread])
    assert export_warning(version) is None or "only add at every position" not in export_warning(version)
    tensors = {
        t.name: np.array(t.data) for t in gguf.GGUFReader(str(export_llama_cpp(version, tmp_path / "s.gguf"))).tensors
    }
    assert set(tensors) == {"direction.1", "direction.2", "direction.3"}
    np.testing.assert_allclose(tensors["direction.3"], (1.0 * spread.vectors.vector(3)).numpy(), rtol=1e-6)
    prompt_only = replace(category(), options=SteeringOptions(where="prompt"))
    warning = export_warning(
        PolicyVersion(policy="p", categories=[prompt_only, replace(category("b", seed=1), options=LEGACY)])
    )
    [line] = [line for line in (warning or "").splitlines() if "only add at every position" in line]
    assert "'weapons' (add · prompt · 1 layer)" in line and "'b'" not in line
