"""Question sets: JSON Lines of ``{"question", "options": {letter: text}, "answer_idx"}``.

A suite name resolves to ``<data dir>/benchmarks/<name>.jsonl``. bench never downloads: a missing
file is an error that says where to put it and which command fetches it (``localmed data pull``).
Every line is checked, and a bad one is reported with its file and line number.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from localmed import paths
from localmed.errors import SuiteError
from localmed.public_data import SUITE_NAMES
from localmed.textfile import read_text


@dataclass(frozen=True)
class Question:
    index: int
    """Position in the file (0-based), the key results are stored under."""
    question: str
    options: dict[str, str]
    answer: str

    @property
    def letters(self) -> list[str]:
        return list(self.options)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    questions: list[Question]


KNOWN_SUITES = SUITE_NAMES


def parse_line(raw: str, path: Path, line_no: int, index: int) -> Question:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SuiteError(path, f"not valid JSON ({exc.msg})", line_no) from None
    if not isinstance(row, dict):
        raise SuiteError(path, "each line must be a JSON object", line_no)
    question, options, answer = row.get("question"), row.get("options"), row.get("answer_idx")
    if not isinstance(question, str) or not question.strip():
        raise SuiteError(path, "missing 'question' text", line_no)
    if not isinstance(options, dict) or len(options) < 2:
        raise SuiteError(path, "'options' must map at least two letters to texts", line_no)
    letters = list(options)
    expected = list(string.ascii_uppercase[: len(letters)])
    if letters != expected:
        raise SuiteError(path, f"option letters must be {', '.join(expected)} in order, "
                         f"got {', '.join(map(str, letters))}", line_no)
    if not all(isinstance(v, str) for v in options.values()):
        raise SuiteError(path, "every option must be text", line_no)
    if answer not in options:
        raise SuiteError(path, f"answer_idx {answer!r} is not one of the option letters "
                         f"{', '.join(letters)}", line_no)
    return Question(index, question, dict(options), answer)


def load_suite(path: Path, name: str | None = None, limit: int | None = None) -> Suite:
    """Read and check a JSONL file (all of it: a bad line fails fast, before any scoring)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(path, "no such file")
    questions: list[Question] = []
    for line_no, raw in enumerate(read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        questions.append(parse_line(raw, path, line_no, len(questions)))
    if not questions:
        raise SuiteError(path, "no questions")
    if limit is not None:
        questions = questions[:limit]
    return Suite(name or path.stem, path, questions)


def suites_dir() -> Path:
    return paths.data_dir() / "benchmarks"


def resolve_suite(name: str, limit: int | None = None) -> Suite:
    """A suite by name: the data dir's copy, or fetched once when online."""
    if name not in KNOWN_SUITES:
        raise SuiteError(name, f"unknown suite; known: {', '.join(KNOWN_SUITES)} "
                         "(or pass a file with --data FILE.jsonl)")
    path = suites_dir() / f"{name}.jsonl"
    if not path.is_file():
        # bench never downloads: fetching data sets is `localmed data pull`'s job alone.
        raise SuiteError(name, f"suite not found at {path}; get it with `localmed data pull "
                         f"{name}`, or put a JSON Lines file there (question, options, "
                         "answer_idx)")
    return load_suite(path, name, limit)


