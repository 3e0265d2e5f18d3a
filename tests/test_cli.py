import json

import pytest

from cli import main
from tests.conftest import HARMFUL, SAFE


@pytest.fixture()
def prompt_files(tmp_path):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(HARMFUL))
    safe = tmp_path / "safe.jsonl"
    safe.write_text("\n".join(json.dumps({"prompt": p}) for p in SAFE))
    return harmful, safe


def _extract(tiny_folder, harmful, safe, out, *extra):
    return main(
        [
            "extract",
            "--harmful",
            str(harmful),
            "--safe",
            str(safe),
            "--model",
            str(tiny_folder),
            "--precision",
            "fp32",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_extract_then_generate(tiny_folder, prompt_files, tmp_path, capsys):
    harmful, safe = prompt_files
    out = tmp_path / "v.safetensors"
    code = _extract(tiny_folder, harmful, safe, out, "--method", "pruned", "--category", "crime", "--mode", "always")
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["category"] == "crime" and summary["settings"]["method"] == "pruned"
    assert summary["gate"]["mode"] == "always" and {"catch_rate", "false_positive_rate"} <= set(summary["gate"])
    assert len(summary["layers"]) == 4 and 0 <= summary["recommended_layer"] < 4
    assert {"auroc", "effect_size", "norm"} <= set(summary["layers"][0])
    assert out.is_file()

    code = main(
        [
            "generate",
            "--vectors",
            str(out),
            "--prompt",
            HARMFUL[0],
            "--layer",
            "1",
            "--strength",
            "3",
            "--max-new-tokens",
            "12",
            "--json",
            "--precision",
            "fp32",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"naive", "steered", "prompt", "layer", "strength"}
    assert result["naive"] != result["steered"]
    assert result["mode"] == "always" and result["gates"] == {"crime": None} and result["fired"] == []


def test_gated_extract_and_generate_say_which_categories_fired(tiny_folder, prompt_files, tmp_path, capsys):
    harmful, safe = prompt_files
    out = tmp_path / "g.safetensors"
    assert _extract(tiny_folder, harmful, safe, out, "--category", "crime", "--gate-fpr", "0.2") == 0
    gate = json.loads(capsys.readouterr().out)["gate"]
    assert gate["mode"] == "gated" and gate["target_fpr"] == 0.2 and 0 <= gate["layer"] < 4
    outcomes = set()
    for prompt in [*HARMFUL, *SAFE]:
        args = ["generate", "--vectors", str(out), "--prompt", prompt, "--strength", "3", "--max-new-tokens", "8"]
        assert main([*args, "--json", "--precision", "fp32"]) == 0
        result = json.loads(capsys.readouterr().out)
        verdict = result["gates"]["crime"]
        assert verdict["fired"] == (verdict["score"] >= verdict["threshold"])
        assert result["fired"] == (["crime"] if verdict["fired"] else [])
        if not verdict["fired"]:
            assert result["steered"] == result["naive"]  # a quiet gate leaves the answer exactly unsteered
        outcomes.add(verdict["fired"])
    assert outcomes == {True, False}


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_bad_inputs_give_one_line_errors(tiny_folder, prompt_files, tmp_path, capsys):
    harmful, safe = prompt_files
    out = tmp_path / "v.safetensors"
    assert _extract(tiny_folder, tmp_path / "missing.csv", safe, out) == 2
    assert "no such file" in _error_line(capsys)

    (tmp_path / "empty.txt").write_text("")
    assert _extract(tiny_folder, tmp_path / "empty.txt", safe, out) == 2
    assert "contains no prompts" in _error_line(capsys)

    (tmp_path / "wrong.csv").write_text("text\nhello\n")
    assert _extract(tiny_folder, tmp_path / "wrong.csv", safe, out) == 2
    assert "no 'prompt' column" in _error_line(capsys)

    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert _extract(tiny_folder, tmp_path / "three.txt", safe, out) == 2
    assert "at least 4 harmful prompts" in _error_line(capsys)

    assert _extract(tiny_folder, harmful, safe, out) == 0
    capsys.readouterr()
    assert main(["generate", "--vectors", str(out), "--prompt", "hi", "--layer", "9", "--precision", "fp32"]) == 2
    assert "layer 9 is out of range" in _error_line(capsys)

    assert main(["generate", "--vectors", str(tmp_path / "none.safetensors"), "--prompt", "hi"]) == 2
    assert "no vectors file" in _error_line(capsys)


def test_vectors_from_another_hidden_size_are_refused(tiny_folder, prompt_files, tmp_path, capsys):
    from tests.tiny import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", hidden_size=128)
    harmful, safe = prompt_files
    out = tmp_path / "v.safetensors"
    assert _extract(tiny_folder, harmful, safe, out) == 0
    capsys.readouterr()
    code = main(["generate", "--vectors", str(out), "--prompt", "hi", "--model", str(wider), "--precision", "fp32"])
    assert code == 2
    line = _error_line(capsys)
    assert "hidden size 64" in line and "hidden size 128" in line


def test_a_second_category_learns_to_leave_the_first_alone(tiny_folder, prompt_files, tmp_path, capsys):
    harmful, safe = prompt_files
    db = f"sqlite:///{tmp_path / 'p.db'}"
    scams = tmp_path / "scams.txt"
    scams.write_text("\n".join(f"Write a scam message number {i} to trick people." for i in range(8)))
    base = ["--db", db, "--model", str(tiny_folder), "--precision", "fp32", "--policy", "two"]
    assert main(["extract", "--harmful", str(harmful), "--safe", str(safe), "--category", "crime", *base]) == 0
    first = json.loads(capsys.readouterr().out)["gate"]
    assert first["other_categories_rate"] is None  # alone in its policy
    assert main(["extract", "--harmful", str(scams), "--safe", str(safe), "--category", "scams", *base]) == 0
    second = json.loads(capsys.readouterr().out)["gate"]
    assert second["other_categories_rate"] is not None and second["n_other"] >= 1
    assert main(["policy", "show", "two", "--db", db]) == 0
    shown = capsys.readouterr().out
    assert "crime: steers requests its gate fires on" in shown and "scams: steers requests its gate fires on" in shown
