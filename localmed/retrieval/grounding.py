"""Passages into a question, and a reply's citations checked against the passages it was given.

The passages go into the clinician's latest turn, numbered, each with its file and page, above
the question, with the request to cite them as ``[n]``; earlier turns keep their own words (a
conversation's cached cells stay valid up to the last question). After the reply:

- a marker that names no passage given (``[7]`` when five were given) is flagged;
- a quotation (in straight or curly double quotes, four words or more) followed by a marker is
  looked up in the passages it cites, case and spacing aside; one that is not there is
  flagged, with the passage it claims.

A clinician checks the rest by opening the passages: the reply's sources are listed with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from localmed.retrieval.store import Passage

INSTRUCTION = ("Answer the question from the numbered passages above where they answer it, and "
               "cite each passage you use by its number in square brackets, like [1]. If the "
               "passages do not answer it, say so before answering from your own knowledge.")
PASSAGE_SHARE = 0.5
"""At most this share of the room a prompt has (the context less the reply's reserve) goes to
passages; the conversation keeps the rest."""
PER_PASSAGE_OVERHEAD = 24
"""Tokens a passage's number, file, page and heading line cost beside its text (estimate for
``plan``; the chat counts the real ones)."""


@dataclass(frozen=True)
class Grounding:
    """What a question was answered from."""

    index: str
    passages: tuple[Passage, ...]
    """Numbered from 1, as the model saw them."""
    grounded: bool
    """Whether any passage cleared the relevance floor (else none were given)."""
    notes: tuple[str, ...] = ()
    folder: str = ""
    """The index's folder, where the passages' files are."""

    def citation(self, n: int) -> Passage | None:
        return self.passages[n - 1] if 1 <= n <= len(self.passages) else None

    def sources(self) -> list[dict[str, Any]]:
        """The passages as a saved conversation and the server's ``citations`` give them."""
        return [{"id": n, **p.to_json(), "start": p.start, "end": p.end}
                for n, p in enumerate(self.passages, start=1)]

    def record(self, check: CitationCheck | None) -> dict[str, Any]:
        """What a saved conversation keeps of it, beside the reply."""
        return {"index": self.index, "folder": self.folder, "grounded": self.grounded,
                "passages": self.sources(), "flags": list(check.flags) if check else [],
                "cited": list(check.cited) if check else []}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> tuple[Grounding, CitationCheck]:
        """A saved reply's grounding and check, as :meth:`record` wrote them."""
        passages = tuple(
            Passage(0, p.get("source", "?"), p.get("page"),
                    tuple(h for h in str(p.get("heading", "")).split(" > ") if h),
                    int(p.get("start", 0)), int(p.get("end", 0)), str(p.get("text", "")),
                    float(p.get("score", 0.0)))
            for p in record.get("passages", []) if isinstance(p, dict))
        grounding = cls(str(record.get("index", "?")), passages,
                        bool(record.get("grounded")), folder=str(record.get("folder", "")))
        return grounding, CitationCheck(tuple(record.get("cited", [])),
                                        tuple(record.get("flags", [])))


def passage_block(n: int, passage: Passage) -> str:
    heading = " > ".join(passage.heading)
    head = f"[{n}] {passage.where}" + (f" ({heading})" if heading else "")
    return f"{head}\n{passage.text.strip()}"


def grounded_question(question: str, grounding: Grounding) -> str:
    """The clinician's turn as the model reads it: the numbered passages, then the question."""
    if not grounding.passages:
        return question
    blocks = "\n\n".join(passage_block(n, p) for n, p in enumerate(grounding.passages, 1))
    return (f"Passages from the clinic's documents ({grounding.index}):\n\n{blocks}\n\n"
            f"{INSTRUCTION}\n\nQuestion: {question}")


def fit_passages(passages: Sequence[Passage], count_tokens: Callable[[str], int],
                 budget: int) -> list[Passage]:
    """The best passages, in order, whose numbered blocks fit ``budget`` tokens together."""
    kept, used = [], count_tokens(INSTRUCTION) + 16
    for passage in passages:
        cost = count_tokens(passage_block(len(kept) + 1, passage)) + 2
        if used + cost > budget:
            break
        kept.append(passage)
        used += cost
    return kept


def passage_budget(n_ctx: int, reserve: int) -> int:
    """Tokens the passages of one question may take in a ``n_ctx`` context."""
    return int(max(n_ctx - reserve, 0) * PASSAGE_SHARE)


# --- after the reply ------------------------------------------------------------------------------

_MARKER = re.compile(r"\[(\d{1,3}(?:\s*(?:,|;|-|–|and)\s*\d{1,3})*)\]")
_QUOTE = re.compile(r"[\"“]([^\"“”\n]{12,}?)[\"”]")
_AFTER_QUOTE = 60
"""How far after a quotation its citation may come (the same sentence)."""


@dataclass(frozen=True)
class CitationCheck:
    """What a reply cited, and what in it does not hold."""

    cited: tuple[int, ...]
    """Passage numbers cited that exist, in order of first citation."""
    flags: tuple[str, ...] = field(default_factory=tuple)


def markers(text: str) -> list[tuple[int, int, list[int]]]:
    """(start, end, numbers) of each citation marker: ``[2]``, ``[1, 3]``, ``[2-4]``."""
    out = []
    for match in _MARKER.finditer(text):
        numbers: list[int] = []
        for part in re.split(r"\s*(?:,|;|and)\s*", match.group(1)):
            if bounds := re.fullmatch(r"(\d+)\s*[-–]\s*(\d+)", part):
                low, high = int(bounds.group(1)), int(bounds.group(2))
                numbers += list(range(low, high + 1)) if 0 < high - low < 20 else [low, high]
            elif part.strip().isdigit():
                numbers.append(int(part))
        out.append((match.start(), match.end(), numbers))
    return out


def _normal(text: str) -> str:
    text = text.replace("’", "'").replace("‘", "'").replace("–", "-").replace("—", "-")
    return " ".join(re.sub(r"[^\w%/.,:;'()+-]+", " ", text.casefold()).split()).strip(" .,;:")


def check_citations(reply: str, grounding: Grounding) -> CitationCheck:
    """Markers that name no passage given; quotations not found in the passages they cite."""
    given = len(grounding.passages)
    cited: dict[int, None] = {}
    flags: list[str] = []
    found = markers(reply)
    for _, _, numbers in found:
        for n in numbers:
            if 1 <= n <= given:
                cited.setdefault(n, None)
            else:
                flag = f"[{n}] names no passage: " + (f"{given} were given" if given else
                                                      "none were given")
                if flag not in flags:
                    flags.append(flag)
    for quote in _QUOTE.finditer(reply):
        words = quote.group(1).split()
        if len(words) < 4:
            continue
        after = [numbers for start, _, numbers in found
                 if quote.end() <= start <= quote.end() + _AFTER_QUOTE]
        claimed = [n for numbers in after[:1] for n in numbers if 1 <= n <= given]
        if not claimed:
            continue
        wanted = _normal(quote.group(1))
        if not any(wanted in _normal(grounding.passages[n - 1].text) for n in claimed):
            shown = " ".join(words[:12]) + (" …" if len(words) > 12 else "")
            where = ", ".join(f"[{n}]" for n in claimed)
            flags.append(f"“{shown}” is not in {where}")
    return CitationCheck(tuple(cited), tuple(flags))
