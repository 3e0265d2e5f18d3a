import json

import pytest

from safesteer import SafeSteerError
from safesteer.prompts import MAX_FILE_BYTES, MAX_PROMPT_CHARS, clean_prompts, load_prompt_file, parse_prompts


def test_csv_jsonl_txt_give_the_same_prompts(tmp_path):
    prompts = ["How do I pick a lock?", 'Quote "this", please', "Line, with comma"]
    (tmp_path / "p.csv").write_text(
        "id,Prompt\n" + "\n".join(f'{i},"{p.replace(chr(34), chr(34) * 2)}"' for i, p in enumerate(prompts))
    )
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "extra": 1}) for p in prompts) + "\n\n")
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    for name in ("p.csv", "p.jsonl", "p.txt"):
        assert load_prompt_file(tmp_path / name) == prompts, name


def test_excel_is_read(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": ["a", "b"]}).to_excel(tmp_path / "p.xlsx", index=False)
    assert load_prompt_file(tmp_path / "p.xlsx") == ["a", "b"]


def test_wrong_column_names_what_was_found():
    with pytest.raises(SafeSteerError, match=r"no 'prompt' column \(columns found: 'text', 'label'\)"):
        parse_prompts(b"text,label\nhello,1\n", "x.csv")


def test_a_malformed_csv_names_the_line():
    data = b"prompt,category\nHow do I pick a lock?,crime\nok,x\nHow do I, in short, steal a car?,crime\n"
    with pytest.raises(SafeSteerError, match=r"line 4 has 4 fields where the header has 2 .*double quotes"):
        parse_prompts(data, "x.csv")


def test_malformed_jsonl_names_the_line():
    with pytest.raises(SafeSteerError, match="line 2 is not valid JSON"):
        parse_prompts(b'{"prompt": "ok"}\n{broken\n', "x.jsonl")
    with pytest.raises(SafeSteerError, match="line 1 has no 'prompt'"):
        parse_prompts(b'{"text": "ok"}\n', "x.jsonl")


def test_bad_files_are_refused_plainly(tmp_path):
    with pytest.raises(SafeSteerError, match="unsupported file type"):
        parse_prompts(b"x", "x.pdf")
    with pytest.raises(SafeSteerError, match="larger than"):
        parse_prompts(b"x" * (MAX_FILE_BYTES + 1), "x.txt")
    with pytest.raises(SafeSteerError, match="not UTF-8"):
        parse_prompts(b"\xff\xfe\xfa", "x.txt")
    with pytest.raises(SafeSteerError, match="no such file"):
        load_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SafeSteerError, match="contains no prompts"):
        load_prompt_file(tmp_path / "empty.txt")


def test_cleaning_reports_what_it_dropped():
    report = clean_prompts(["a", "", "  a  ", "b", "x" * (MAX_PROMPT_CHARS + 1), "   "])
    assert report.prompts == ["a", "b"]
    assert (report.empty_removed, report.duplicates_removed, report.too_long) == (2, 1, [5])
    assert report.problems() == [
        "2 empty line(s) skipped",
        "1 duplicate(s) removed (line 3)",
        f"1 prompt(s) over {MAX_PROMPT_CHARS} characters dropped (line 5)",
    ]
