"""Reading example prompts from files people actually have: CSV, JSONL, TXT (and Excel).

Every reader returns plain strings; `clean_prompts` then removes empties and duplicates and
lists what it changed, so the author sees exactly what will be used.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SafeSteerError

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_PROMPT_CHARS = 4000
MAX_PROMPTS = 5000
PROMPT_COLUMN = "prompt"
SUFFIXES = (".csv", ".jsonl", ".txt", ".xlsx")


def _from_csv(data: bytes, name: str) -> list[str]:
    import pandas as pd  # heavy, and only table files need it

    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as exc:
        raise SafeSteerError(f"{name} is not a readable CSV file: {_csv_problem(exc)}") from exc
    return _prompt_column(frame, name)


def _csv_problem(exc: Exception) -> str:
    """pandas' reason in an author's words, with the line number when it gives one."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if fields:
        expected, line, saw = fields.groups()
        return (
            f"line {line} has {saw} fields where the header has {expected} "
            "(put prompts that contain commas in double quotes)"
        )
    return text[:200]


def _from_excel(data: bytes, name: str) -> list[str]:
    import pandas as pd  # heavy, and only table files need it

    try:
        frame = pd.read_excel(io.BytesIO(data), dtype=str).fillna("")
    except Exception as exc:
        raise SafeSteerError(f"{name} is not a readable Excel file ({type(exc).__name__})") from exc
    return _prompt_column(frame, name)


def _prompt_column(frame, name: str) -> list[str]:
    columns = {str(c).strip().lower(): c for c in frame.columns}
    if PROMPT_COLUMN not in columns:
        found = ", ".join(repr(str(c)) for c in frame.columns) or "none"
        raise SafeSteerError(f"{name} has no '{PROMPT_COLUMN}' column (columns found: {found})")
    return [str(v) for v in frame[columns[PROMPT_COLUMN]].tolist()]


def _from_jsonl(data: bytes, name: str) -> list[str]:
    prompts: list[str] = []
    for number, line in enumerate(_text(data, name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SafeSteerError(f"{name} line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(PROMPT_COLUMN), str):
            raise SafeSteerError(f"{name} line {number} has no '{PROMPT_COLUMN}' text field")
        prompts.append(record[PROMPT_COLUMN])
    return prompts


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SafeSteerError(f"{name} is not UTF-8 text") from exc


def _from_txt(data: bytes, name: str) -> list[str]:
    return _text(data, name).splitlines()


_READERS = {".csv": _from_csv, ".jsonl": _from_jsonl, ".txt": _from_txt, ".xlsx": _from_excel}


def parse_prompts(data: bytes, name: str) -> list[str]:
    """Prompts from a file's bytes; the name's suffix picks the format."""
    suffix = Path(name).suffix.lower()
    if suffix not in _READERS:
        raise SafeSteerError(f"{name}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    if len(data) > MAX_FILE_BYTES:
        raise SafeSteerError(f"{name} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
    return _READERS[suffix](data, name)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file on disk (see `parse_prompts`)."""
    path = Path(path)
    if not path.is_file():
        raise SafeSteerError(f"no such file: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise SafeSteerError(f"{path.name} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
    return parse_prompts(path.read_bytes(), path.name)


def _lines(positions: list[int]) -> str:
    shown = ", ".join(str(p) for p in positions[:10])
    return f"line {shown}" if len(positions) == 1 else f"lines {shown}" + (", ..." if len(positions) > 10 else "")


@dataclass
class PromptReport:
    """The prompts that will be used, and what was dropped on the way (1-based positions)."""

    prompts: list[str]
    empty_removed: int = 0
    duplicates: list[int] = field(default_factory=list)  # positions of repeats of an earlier prompt, dropped
    too_long: list[int] = field(default_factory=list)  # positions of over-long prompts, dropped

    @property
    def duplicates_removed(self) -> int:
        return len(self.duplicates)

    def problems(self) -> list[str]:
        notes = []
        if self.empty_removed:
            notes.append(f"{self.empty_removed} empty line(s) skipped")
        if self.duplicates:
            notes.append(f"{len(self.duplicates)} duplicate(s) removed ({_lines(self.duplicates)})")
        if self.too_long:
            notes.append(
                f"{len(self.too_long)} prompt(s) over {MAX_PROMPT_CHARS} characters dropped ({_lines(self.too_long)})"
            )
        return notes


def clean_prompts(raw: list[str]) -> PromptReport:
    """Strip, drop empties, over-long prompts and exact duplicates (keeping first occurrences)."""
    report = PromptReport(prompts=[])
    seen: set[str] = set()
    for position, text in enumerate(raw, start=1):
        prompt = text.strip()
        if not prompt:
            report.empty_removed += 1
        elif len(prompt) > MAX_PROMPT_CHARS:
            report.too_long.append(position)
        elif prompt in seen:
            report.duplicates.append(position)
        else:
            seen.add(prompt)
            report.prompts.append(prompt)
    if len(report.prompts) > MAX_PROMPTS:
        raise SafeSteerError(f"too many prompts ({len(report.prompts)}); the limit is {MAX_PROMPTS}")
    return report


def read_prompt_file(path: str | Path) -> PromptReport:
    """Read and clean a prompt file; an empty result is an error, not an empty category."""
    report = clean_prompts(read_prompts(path))
    if not report.prompts:
        dropped = "; ".join(report.problems())
        raise SafeSteerError(f"{Path(path).name} contains no prompts" + (f" ({dropped})" if dropped else ""))
    return report


def load_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a file, cleaned (see `read_prompt_file` for what was dropped)."""
    return read_prompt_file(path).prompts
