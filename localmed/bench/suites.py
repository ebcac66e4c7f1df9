"""Question sets: JSON Lines of ``{"question", "options": {letter: text}, "answer_idx"}``.

A suite name resolves to ``<data dir>/benchmarks/<name>.jsonl``. When that file is missing and the
machine is online, the public set is fetched once with ``datasets`` and written there in this
format; offline, the error says where to put the file. Every line is checked, and a bad one is
reported with its file and line number.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmed import paths
from localmed.atomic import write_text_atomic
from localmed.errors import LocalmedError, OfflineError


class SuiteError(LocalmedError, ValueError):
    """A question set that cannot be used: unknown, missing, or malformed at a line."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


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


# Public hub copies and how to turn each row into our format (used only when online).
HUB_SOURCES: dict[str, dict[str, Any]] = {
    "medqa": {"repo": "GBaker/MedQA-USMLE-4-options", "split": "test"},
    "medmcqa": {"repo": "openlifescienceai/medmcqa", "split": "validation"},
    "pubmedqa": {"repo": "qiaojin/PubMedQA", "config": "pqa_labeled", "split": "train"},
    "mmlu_medical": {"repo": "cais/mmlu", "split": "test",
                     "configs": ["anatomy", "clinical_knowledge", "college_biology",
                                 "college_medicine", "medical_genetics",
                                 "professional_medicine"]},
}
KNOWN_SUITES = tuple(HUB_SOURCES)


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
    with path.open(encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            questions.append(parse_line(raw, path, line_no, len(questions)))
    if not questions:
        raise SuiteError(path, "no questions")
    if limit is not None:
        questions = questions[:limit]
    return Suite(name or path.stem, path, questions)


def read_documents(path: Path, fields: Sequence[str] = ("question",)) -> list[str]:
    """Texts from a ``.jsonl`` file (on each line, the first of ``fields`` that has text) or any
    other file of documents separated by blank lines; empty documents are dropped."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [doc.strip() for doc in raw.split("\n\n") if doc.strip()]
    docs = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            docs.append(str(next(row[f] for f in fields if row.get(f))))
        except (json.JSONDecodeError, StopIteration, TypeError, AttributeError):
            wanted = " or ".join(repr(f) for f in fields)
            raise SuiteError(path, f"expected JSON with a {wanted} field", line_no) from None
    return docs


def suites_dir() -> Path:
    return paths.data_dir() / "benchmarks"


def resolve_suite(name: str, limit: int | None = None) -> Suite:
    """A suite by name: the data dir's copy, or fetched once when online."""
    if name not in KNOWN_SUITES:
        raise SuiteError(name, f"unknown suite; known: {', '.join(KNOWN_SUITES)} "
                         "(or pass a file with --data FILE.jsonl)")
    path = suites_dir() / f"{name}.jsonl"
    if not path.is_file():
        if paths.hub_offline():
            raise OfflineError(name, f"suite file not found and offline; put it at {path} "
                               "(JSON Lines: question, options, answer_idx)")
        fetch_suite(name, path)
    return load_suite(path, name, limit)


def fetch_suite(name: str, path: Path) -> None:
    """Download a public set with ``datasets`` and store it in our JSONL format."""
    try:
        import datasets
    except ImportError:
        raise SuiteError(path, f"suite '{name}' is not downloaded and the 'datasets' package is "
                         f"not installed; pip install datasets, or put the file at {path}") \
            from None
    source = HUB_SOURCES[name]
    rows: list[dict[str, Any]] = []
    try:
        for config in source.get("configs", [source.get("config")]):
            data = datasets.load_dataset(source["repo"], config, split=source["split"])
            rows += [_convert(name, dict(r), config) for r in data]
    except (ConnectionError, OSError) as exc:
        raise OfflineError(name, f"could not download {source['repo']} ({exc}); put the file "
                           f"at {path}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _convert(name: str, row: dict[str, Any], config: str | None) -> dict[str, Any]:
    letters = string.ascii_uppercase
    if name == "medqa":
        return {"question": row["question"], "options": row["options"],
                "answer_idx": row["answer_idx"]}
    if name == "medmcqa":
        options = {letters[i]: row[k] for i, k in enumerate(("opa", "opb", "opc", "opd"))}
        return {"question": row["question"], "options": options,
                "answer_idx": letters[int(row["cop"])]}
    if name == "pubmedqa":
        context = "\n".join(row["context"]["contexts"])
        options = {"A": "yes", "B": "no", "C": "maybe"}
        answer = {"yes": "A", "no": "B", "maybe": "C"}[row["final_decision"]]
        return {"question": f"{context}\n{row['question']}", "options": options,
                "answer_idx": answer}
    options = {letters[i]: text for i, text in enumerate(row["choices"])}
    return {"question": row["question"], "options": options,
            "answer_idx": letters[int(row["answer"])], "subject": config}
