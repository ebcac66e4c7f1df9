"""Public medical data sets, downloaded once with ``datasets`` into the data folder.

The one place that downloads data: the question suites (MedQA, MedMCQA, PubMedQA, MMLU-medical)
in bench's JSONL format, and PubMedQA abstracts as calibration text. Nothing here runs unless a
file is missing and the machine is online.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localmed import paths
from localmed.atomic import write_text_atomic
from localmed.errors import OfflineError, SuiteError

HUB_SOURCES: dict[str, dict[str, Any]] = {
    "medqa": {"repo": "GBaker/MedQA-USMLE-4-options", "split": "test"},
    "medmcqa": {"repo": "openlifescienceai/medmcqa", "split": "validation"},
    "pubmedqa": {"repo": "qiaojin/PubMedQA", "config": "pqa_labeled", "split": "train"},
    "mmlu_medical": {"repo": "cais/mmlu", "split": "test",
                     "configs": ["anatomy", "clinical_knowledge", "college_biology",
                                 "college_medicine", "medical_genetics",
                                 "professional_medicine"]},
}
"""Public hub copies of each set."""

SUITE_NAMES = tuple(HUB_SOURCES)


def calibration_path() -> Path:
    """Where the default medical calibration text (PubMedQA abstracts) is kept."""
    return paths.data_dir() / "calibration" / "pubmedqa.jsonl"


def _download(name: str, path: Path, convert: Callable[[dict[str, Any], str | None],
                                                       dict[str, Any]]) -> None:
    """Fetch set ``name`` with ``datasets``, convert each row, write JSONL to ``path``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OfflineError(name, f"{path} is missing and HF_HUB_OFFLINE is set; put the file "
                           "there")
    try:
        import datasets
    except ImportError:
        raise SuiteError(path, f"'{name}' is not downloaded and the 'datasets' package is not "
                         f"installed; pip install 'localmed[datasets]', or put the file at "
                         f"{path}") from None
    source = HUB_SOURCES[name]
    rows: list[dict[str, Any]] = []
    try:
        for config in source.get("configs", [source.get("config")]):
            data = datasets.load_dataset(source["repo"], config, split=source["split"])
            rows += [convert(dict(r), config) for r in data]
    except (ConnectionError, OSError) as exc:
        raise OfflineError(name, f"could not download {source['repo']} ({exc}); put the file "
                           f"at {path}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def pull_suite(name: str, path: Path) -> None:
    """Download question set ``name`` into ``path`` in bench's JSONL format."""
    _download(name, path, lambda row, config: _suite_row(name, row, config))


def pull_calibration(path: Path) -> None:
    """Download PubMedQA abstracts into ``path`` as ``{"text": …}`` lines."""
    _download("pubmedqa", path, lambda row, _: {"text": "\n".join(row["context"]["contexts"])})


def _suite_row(name: str, row: dict[str, Any], config: str | None) -> dict[str, Any]:
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
