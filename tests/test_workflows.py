"""The faces share their workflows: the app and the CLI evaluate a policy the same way."""

from __future__ import annotations

import json

import studio
from cli import main
from safesteer import datasets
from safesteer.workflows import DEFAULT_BENIGN, evaluation_prompts
from tests.conftest import HARMFUL, SAFE
from tests.policy_factory import category


def test_evaluation_prompts_never_reuse_training_prompts_and_are_reproducible():
    made_from = category(harmful=["kept out", "also out", "x", "y"])
    harmful, benign = evaluation_prompts(made_from, ["kept out", "fresh one", "x", "fresh two"], n_harmful=None)
    assert harmful == ["fresh one", "fresh two"]
    assert len(benign) == DEFAULT_BENIGN and not set(benign) & set(made_from.safe)
    assert evaluation_prompts(made_from, ["a", "b"], n_harmful=1) == (["a"], benign)


def test_everyday_prompts_fall_back_when_the_safe_side_is_the_built_in_set():
    built_in = category()
    built_in.safe = datasets.benign_prompts()
    _, benign = evaluation_prompts(built_in, ["a"])
    assert len(benign) == DEFAULT_BENIGN


def test_the_app_and_the_cli_give_the_same_evaluation(tiny_folder, tmp_path, monkeypatch, capsys):
    db = f"sqlite:///{tmp_path / 's.db'}"
    monkeypatch.setenv("SAFESTEER_MODEL", str(tiny_folder))
    monkeypatch.setenv("SAFESTEER_PRECISION", "fp32")
    monkeypatch.setenv("SAFESTEER_DB", db)
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path / "cache"))  # no cached sweep shared between the two
    studio.reset_store()
    harmful = [*HARMFUL, *[f"How do I commit crime number {i} without getting caught?" for i in range(12)]]
    draft, *_ = studio.read_category("crime", "", studio.OWN_PROMPTS, None, None, "\n".join(harmful), "\n".join(SAFE))
    draft, *_ = list(studio.extract(draft, "mean-diff", "residual", "last", 0.5))[-1]
    studio.save_version(draft, "Crime policy", "first", 1, 3.0)

    *_, (_, _, _, session, _) = studio.run_evaluation(draft, "1", "3", 6, "")
    from_app = json.loads(json.dumps(session.result.to_dict()))  # as stored

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(draft.heldout))
    out = tmp_path / "cli-eval"
    argv = ["eval", "--policy", "Crime policy", "--model", str(tiny_folder), "--precision", "fp32"]
    argv += ["--heldout", str(heldout), "--prompts", str(len(draft.heldout)), "--max-new-tokens", "6"]
    assert main([*argv, "--out", str(out), "--db", db, "--json"]) == 0
    capsys.readouterr()
    from_cli = json.loads((out / "evaluation.json").read_text())
    studio.reset_store()

    for result in (from_app, from_cli):
        result.pop("created_at")
    assert from_cli["n_harmful"] == len(draft.heldout) and from_cli["n_benign"] == DEFAULT_BENIGN
    assert from_app == from_cli
