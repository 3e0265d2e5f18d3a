"""The hostile-user probes: nonsense is refused before anything is written, errors are one line,
history cannot be rewritten. Each test names the probe it answers (docs/security.md lists them)."""

from __future__ import annotations

import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from sqlalchemy.exc import DBAPIError

from cli import main
from db import PolicyStore
from safesteer import SafeSteerError, SteeringSpec, generate
from safesteer.bundles import bundle_bytes, read_bundle
from safesteer.identity import ModelIdentity
from safesteer.limits import MAX_STRENGTH, check_layer, check_strength
from safesteer.policy import PolicyVersion
from safesteer.workflows import import_bundle
from tests.policy_factory import IDENTITY, category
from tests.test_bundles import _members, _rezip

ROOT = Path(__file__).resolve().parent.parent


def _bundle(**category_fields) -> bytes:
    return bundle_bytes(PolicyVersion(policy="p", categories=[category(**category_fields)], number=1))


def _with_manifest(data: bytes, change) -> bytes:
    members = _members(data)
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    return _rezip({**members, "manifest.json": json.dumps(manifest).encode()})


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- one validation of steering settings -------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30, MAX_STRENGTH + 0.5, -1.0, "4", True])
def test_strengths_outside_the_documented_range_are_refused(value):
    with pytest.raises(SafeSteerError, match="strength"):
        check_strength(value)


def test_negative_strength_only_when_asked_for():
    assert check_strength(-2.0, allow_negative=True) == -2.0
    with pytest.raises(SafeSteerError, match="asked for explicitly"):
        check_strength(-2.0)


@pytest.mark.parametrize("value", [17.9, "3", -1, True, None])
def test_layers_must_be_whole_numbers_in_range(value):
    with pytest.raises(SafeSteerError, match="layer"):
        check_layer(value, 30)


def test_a_steering_spec_refuses_non_finite_strengths():
    with pytest.raises(SafeSteerError, match="finite"):
        SteeringSpec(torch.ones(4), 1, (0.0, math.nan))
    with pytest.raises(SafeSteerError, match="site"):
        SteeringSpec(torch.ones(4), 1, 1.0, site="evil")  # type: ignore[arg-type]


@pytest.mark.parametrize("strength", [1e30, -50.0, math.inf])
def test_a_policy_category_refuses_nonsense_strengths(strength):
    with pytest.raises(SafeSteerError, match="strength"):
        category(strength=strength)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["categories"][0].update(strength=1e30), "strength"),
        (lambda m: m["categories"][0].update(strength=-50), "strength"),
        (lambda m: m["categories"][0].update(layer=17.9), "layer"),
        (lambda m: m["categories"][0].update(layer=2.5), "layer"),
        (lambda m: m["categories"][0]["vectors"]["settings"].update(site="evil"), "site"),
    ],
)
def test_bundles_with_nonsense_settings_are_refused_at_import(change, message, tmp_path):
    store = PolicyStore(f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(SafeSteerError, match=message):
        import_bundle(store, _with_manifest(_bundle(), change), target=IDENTITY)
    assert store.list_policies() == []


def test_the_store_refuses_non_finite_settings_at_the_schema_level(tmp_path):
    store = PolicyStore(f"sqlite:///{tmp_path / 's.db'}")
    store.save_version("p", [category()])
    with store.engine.begin() as connection, pytest.raises(DBAPIError, match="finite strength"):
        connection.exec_driver_sql(
            "INSERT INTO categories (version_id, position, name, description, settings, layer, strength, vectors, "
            "vectors_sha256) SELECT version_id, 9, 'x', '', settings, layer, 1e999, vectors, vectors_sha256 "
            "FROM categories LIMIT 1"
        )


# --- identity: a bundle must match the model it will steer ---------------------------------------


@pytest.mark.parametrize(
    "claimed",
    [
        {"model_id": "someone/other-135m"},
        {"model_type": "gpt2"},
    ],
)
def test_a_bundle_for_another_model_of_the_same_shape_is_refused_naming_both(claimed, tmp_path):
    store = PolicyStore(f"sqlite:///{tmp_path / 's.db'}")
    other = ModelIdentity.from_dict({**IDENTITY.to_dict(), **claimed})
    data = bundle_bytes(PolicyVersion(policy="p", categories=[category(identity=other)], number=1))
    with pytest.raises(SafeSteerError) as refused:
        import_bundle(store, data, target=IDENTITY)
    assert other.describe() in str(refused.value) and IDENTITY.describe() in str(refused.value)
    assert store.list_policies() == []


def test_an_explicit_override_is_recorded_and_relabels_the_vectors(tmp_path):
    store = PolicyStore(f"sqlite:///{tmp_path / 's.db'}")
    other = ModelIdentity.from_dict({**IDENTITY.to_dict(), "model_id": "someone/other-135m"})
    data = bundle_bytes(PolicyVersion(policy="p", categories=[category(identity=other)], number=1))
    name, number = import_bundle(store, data, target=IDENTITY, actor="ann", allow_other_model=True)
    version = store.load_version(name, number)
    assert version.model.model_id == IDENTITY.model_id  # never the bundle's id: nothing loads (or downloads) it
    assert "someone/other-135m" in version.note and "explicit override" in version.note
    entry = store.audit_log(name)[0]
    assert entry.action == "import" and entry.detail["model_override"] is True
    assert entry.detail["bundle_model"]["model_id"] == "someone/other-135m"


# --- manifests parsed with limits ------------------------------------------------------------------


def _raw_manifest(text: str) -> bytes:
    members = {**_members(_bundle()), "manifest.json": text.encode()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("[" * 50_000 + "]" * 50_000, "nested more than"),
        ('{"format": "safesteer-policy-bundle", "format_version": 1, "x": 1e400}', "too large"),
        ('{"format": "safesteer-policy-bundle", "format_version": 1, "x": NaN}', "not a number JSON allows"),
    ],
)
def test_hostile_manifest_json_gives_a_clear_error(manifest, message):
    with pytest.raises(SafeSteerError, match=message):
        read_bundle(_raw_manifest(manifest))


# --- the CLI: one error line, exit 2, checks before the model loads -----------------------------


def test_generate_refuses_nonsense_strengths_with_one_line(capsys):
    for value in ("nan", "inf", "1e30", "-3"):
        code, out, err = _cli(capsys, "generate", "--vectors", "v.safetensors", "--prompt", "hi", f"--strength={value}")
        assert code == 2 and out == "" and err.startswith("error: the strength") and err.count("\n") == 1, err


def test_extract_checks_names_counts_and_strength_before_loading_the_model(capsys, tmp_path):
    harmful, safe = tmp_path / "h.txt", tmp_path / "s.txt"
    harmful.write_text("\n".join(f"harmful request {i}" for i in range(6)))
    safe.write_text("\n".join(f"everyday request {i}" for i in range(6)))
    db = f"sqlite:///{tmp_path / 's.db'}"
    base = ["extract", "--harmful", str(harmful), "--safe", str(safe), "--model", str(tmp_path / "no-such-model")]
    cases = {
        ("--policy", "bad/name"): "invalid policy name",
        ("--policy", "ok", "--strength", "1e30"): "strength must be between",
        ("--policy", "ok", "--strength", "nan"): "finite",
        ("--policy", "ok", "--category", "???"): "invalid category name",
    }
    for extra, message in cases.items():
        code, _, err = _cli(capsys, *base, "--db", db, *extra)
        assert code == 2 and message in err and "cannot load model" not in err, err
    assert PolicyStore(db).list_policies() == []


def test_too_few_prompts_says_what_was_dropped_and_why(capsys, tmp_path):
    harmful, safe = tmp_path / "h.txt", tmp_path / "s.txt"
    harmful.write_text("a harmful request\na harmful request\n\n" + "x" * 5000 + "\nanother one\n")
    safe.write_text("\n".join(f"everyday request {i}" for i in range(6)))
    code, _, err = _cli(capsys, "extract", "--harmful", str(harmful), "--safe", str(safe))
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: need at least") and "duplicate(s) removed (line 2)" in last
    assert "over 4000 characters dropped (line 4)" in last


@pytest.mark.parametrize(
    "argv",
    [
        ["--db", "notaurl", "policy", "list"],
        ["--db", "sqlite:////nonexistent/dir/x.db", "policy", "list"],
        ["policy", "show", "no-such-policy"],
        ["policy", "diff", "no-such-policy", "1", "2"],
        ["generate", "--prompt", "x", "--vectors", "missing.safetensors"],
        ["generate", "--prompt", "x"],
        ["import", "missing.zip"],
        ["extract", "--harmful", "missing.txt", "--safe", "builtin:benign"],
        ["extract", "--harmful", "builtin:no-such-area", "--safe", "builtin:benign"],
        ["export", "--policy", "no-such-policy", "--out", "x.zip"],
        ["eval", "--policy", "no-such-policy", "--out", "folder"],
    ],
)
def test_the_cli_walked_with_bad_arguments_ends_in_one_error_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFESTEER_DB", f"sqlite:///{tmp_path / 's.db'}")
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "unexpected" not in err, err


def test_db_works_after_the_subcommand_too(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    assert _cli(capsys, "policy", "create", "after", "--db", db)[0] == 0
    assert [p.name for p in PolicyStore(db).list_policies()] == ["after"]


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    db = tmp_path / "s.db"
    store = PolicyStore(f"sqlite:///{db}")
    with store._session() as session, session.begin():
        for i in range(1500):  # well over a pipe buffer of output
            store._audit(session, "ann", "note", f"policy-{i}", detail="x" * 40)
    command = f'"{sys.executable}" -m cli --db "sqlite:///{db}" policy audit --limit 1500 | head -n 1'
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert finished.stdout.count("\n") == 1
    assert "Traceback" not in finished.stderr and "BrokenPipe" not in finished.stderr, finished.stderr


# --- prompt limits in tokens ---------------------------------------------------------------------


def test_over_long_prompts_are_refused_before_generating(tiny_lm, monkeypatch):
    with pytest.raises(SafeSteerError, match="the limit is 1024"):
        generate(tiny_lm, ["word " * 20_000], max_new_tokens=2)
    monkeypatch.setenv("SAFESTEER_MAX_PROMPT_TOKENS", "24")
    with pytest.raises(SafeSteerError, match=r"prompt 2 has .* the limit is 24"):
        generate(
            tiny_lm, ["hi", "a much longer prompt, well over the limit of twenty-four tokens " * 3], max_new_tokens=2
        )


# --- append-only history ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM examples",
        "DELETE FROM categories",
        "DELETE FROM policy_versions",
        "DELETE FROM policies",
        "UPDATE audit_log SET actor = 'mallory'",
        "DELETE FROM audit_log",
    ],
)
def test_history_cannot_be_rewritten_even_with_raw_sql(statement, tmp_path):
    path = tmp_path / "s.db"
    store = PolicyStore(f"sqlite:///{path}")
    store.save_version("p", [category()], author="ann")
    connection = sqlite3.connect(path)  # the sqlite3 shell's defaults: foreign keys off
    with pytest.raises(sqlite3.DatabaseError, match=r"cannot be deleted|append-only"):
        connection.execute(statement)
    connection.close()
    assert store.load_version("p").categories[0].harmful == category().harmful
    assert store.verify_audit().ok


def test_deleting_a_policy_is_the_one_path_and_keeps_the_audit_trail(tmp_path):
    store = PolicyStore(f"sqlite:///{tmp_path / 's.db'}")
    store.save_version("p", [category()], author="ann")
    store.save_version("p", [category(strength=3.0)], author="ann")
    store.delete_policy("p", confirm="p", actor="bob")
    assert store.list_policies() == []
    actions = [e.action for e in store.audit_log("p")]
    assert actions[0] == "delete" and actions.count("save") == 2
    check = store.verify_audit()
    assert check.ok and check.entries == 4
    with store.engine.connect() as connection:  # the permit does not outlive its transaction
        assert connection.exec_driver_sql("SELECT count(*) FROM deletion_permits").scalar() == 0


def test_an_edited_audit_log_is_detected(tmp_path, capsys):
    path = tmp_path / "s.db"
    store = PolicyStore(f"sqlite:///{path}")
    store.save_version("p", [category()], author="ann")
    store.archive_policy("p", actor="ann")
    assert _cli(capsys, "--db", f"sqlite:///{path}", "policy", "audit", "--verify")[0] == 0
    connection = sqlite3.connect(path)  # someone with the file drops the guard and rewrites an actor
    connection.execute("DROP TRIGGER audit_log_no_update")
    connection.execute("UPDATE audit_log SET actor = 'mallory' WHERE id = 2")
    connection.commit()
    connection.close()
    check = store.verify_audit()
    assert not check.ok and check.first_bad_id == 2
    code, _, err = _cli(capsys, "--db", f"sqlite:///{path}", "policy", "audit", "--verify")
    assert code == 2 and "entry 2" in err


def test_a_missing_database_folder_is_refused_but_the_default_one_is_made(tmp_path, monkeypatch):
    with pytest.raises(SafeSteerError, match="no such folder"):
        PolicyStore(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    assert not (tmp_path / "missing").exists()
    monkeypatch.delenv("SAFESTEER_DB", raising=False)
    monkeypatch.setenv("SAFESTEER_DATA", str(tmp_path / "data"))
    PolicyStore()
    assert (tmp_path / "data" / "safesteer.db").is_file()


def test_the_app_listens_where_gradio_variables_say(monkeypatch):
    from app import server_address

    for name in ("SAFESTEER_HOST", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT"):
        monkeypatch.delenv(name, raising=False)
    assert server_address() == ("127.0.0.1", 7860)
    monkeypatch.setenv("PORT", "8000")
    assert server_address() == ("127.0.0.1", 8000)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert server_address() == ("0.0.0.0", 7999)
    assert server_address(7001) == ("0.0.0.0", 7001)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit, match="GRADIO_SERVER_PORT must be a port number"):
        server_address()


# --- UI rough edges (handlers; the browser test checks what the page shows) -------------------------


def test_export_names_its_policy_and_refuses_none_clearly(monkeypatch, tmp_path):
    import studio

    monkeypatch.setenv("SAFESTEER_DB", f"sqlite:///{tmp_path / 's.db'}")
    studio.reset_store()
    assert "No policy selected" in studio.export_target(None)
    assert "**Weapons**" in studio.export_target("Weapons")
    with pytest.raises(SafeSteerError, match="no policy selected") as refused:
        studio.export_policy(None, "", "Policy bundle (.zip)")
    assert "None" not in str(refused.value)
    assert [studio.parse_version(v) for v in ("", None, "latest", "3", "v4", 5, 6.0)] == [None, None, None, 3, 4, 5, 6]
    for bad in ("0", "two", "1.5", -1):
        with pytest.raises(SafeSteerError, match="whole number"):
            studio.parse_version(bad)
    studio.reset_store()


def test_the_save_step_and_history_show_layer_and_strength(monkeypatch, tmp_path):
    import studio

    monkeypatch.setenv("SAFESTEER_DB", f"sqlite:///{tmp_path / 's.db'}")
    studio.reset_store()
    assert "layer 12, strength 2.5" in studio.save_target(12, 2.5)
    studio.studio_store().save_version("p", [category(layer=2, strength=1.5)])
    table = studio.versions_table("p")
    assert table["categories (layer, strength)"].tolist() == ["weapons (2, 1.5)"]
    studio.reset_store()


def test_compare_lists_which_prompts_changed(monkeypatch, tmp_path):
    import studio

    monkeypatch.setenv("SAFESTEER_DB", f"sqlite:///{tmp_path / 's.db'}")
    studio.reset_store()
    store = studio.studio_store()
    store.save_version("p", [category(harmful=["old one", "kept <b>one</b>", "x", "y"])])
    store.save_version("p", [category(harmful=["new one", "kept <b>one</b>", "x", "y"])])
    text = studio.compare_versions("p", 1, 2)
    assert "harmful examples added: 1" in text and "    - new one" in text
    assert "harmful examples removed: 1" in text and "    - old one" in text
    assert "<b>" not in text  # prompts are shown as plain text
    studio.reset_store()
