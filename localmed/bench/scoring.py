"""Scoring: one forward pass per question, restricted to the option letters; text metrics.

A question is asked as lettered options ending in ``Answer:``; the model's next-token logits at the
option letters (``" A"``, ``" B"``, …) give its answer distribution. Few-shot examples form a prefix
shared by every question, evaluated once (the runtime keeps the longest common prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from localmed.bench.suites import Question, Suite
from localmed.errors import ScoringError
from localmed.runtimes.base import ScoringRuntime
from localmed.templates import Message, PromptTemplate

HEADER = "The following are multiple choice questions (with answers) about medicine.\n\n"


def format_question(q: Question, answer: bool = False) -> str:
    lines = [f"Question: {q.question.strip()}"]
    lines += [f"{letter}. {text.strip()}" for letter, text in q.options.items()]
    lines.append("Answer:" + (f" {q.answer}\n\n" if answer else ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class PromptBuilder:
    """Builds question prompts: plain text, or wrapped in a chat template."""

    shots: tuple[Question, ...] = ()
    template: PromptTemplate | None = None

    def prefix(self) -> str:
        return HEADER + "".join(format_question(q, answer=True) for q in self.shots)

    def build(self, q: Question) -> tuple[str, str]:
        """(prompt, the text that precedes an option letter)."""
        body = self.prefix() + format_question(q)
        if self.template is None:
            return body, " "
        text = body + "\nReply with the letter of the correct option only."
        return self.template.render([Message("user", text)]), ""


def letter_token_ids(runtime: ScoringRuntime, prompt: str, separator: str,
                     letters: Sequence[str]) -> list[int]:
    """The token each option letter is after ``prompt``; each must be exactly one token."""
    base = runtime.tokenize(prompt)
    ids = []
    for letter in letters:
        full = runtime.tokenize(prompt + separator + letter)
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ScoringError(
                runtime.info.path, f"option letter {letter!r} is not one token after the prompt "
                "with this tokenizer, so it cannot be scored in one pass")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ScoringError(runtime.info.path, "two option letters map to the same token")
    return ids


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - np.max(x)
    e = np.exp(x)
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) in nats, for two distributions over the same options."""
    p_arr, q_arr = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    mask = p_arr > 0
    return float(np.sum(p_arr[mask] * (np.log(p_arr[mask]) - np.log(np.maximum(q_arr[mask],
                                                                                1e-300)))))


@dataclass(frozen=True)
class Answer:
    index: int
    predicted: str
    correct: bool
    probs: list[float]
    new_tokens: int
    """Tokens actually evaluated (the shared prefix is not counted again)."""
    truncated: bool = False
    """The prompt was longer than the context and lost its beginning."""


class QuestionScorer:
    """Scores the questions of one suite on one runtime."""

    def __init__(self, runtime: ScoringRuntime, suite: Suite, builder: PromptBuilder) -> None:
        self.runtime = runtime
        self.builder = builder
        self._letters: dict[tuple[str, ...], list[int]] = {}
        self._last: list[int] = []
        first = suite.questions[0]
        self._ids_for(first)  # fail before scoring anything

    def _ids_for(self, q: Question) -> list[int]:
        key = tuple(q.letters)
        if key not in self._letters:
            prompt, sep = self.builder.build(q)
            self._letters[key] = letter_token_ids(self.runtime, prompt, sep, q.letters)
        return self._letters[key]

    def score(self, q: Question) -> Answer:
        prompt, _ = self.builder.build(q)
        tokens = self.runtime.tokenize(prompt)
        truncated = len(tokens) > self.runtime.n_ctx
        if truncated:
            # Keep BOS and the end (options and "Answer:"); the start of a long question goes,
            # as lm-eval-harness truncates.
            tokens = tokens[:1] + tokens[len(tokens) - self.runtime.n_ctx + 1:]
        shared = 0
        for a, b in zip(self._last, tokens, strict=False):
            if a != b:
                break
            shared += 1
        logits = self.runtime.next_logits(tokens)
        self._last = tokens
        probs = softmax(logits[self._ids_for(q)])
        predicted = q.letters[int(np.argmax(probs))]
        return Answer(q.index, predicted, predicted == q.answer, [float(p) for p in probs],
                      len(tokens) - shared, truncated)


@dataclass(frozen=True)
class TextScore:
    """Per-document text metrics against the reference."""

    doc: int
    tokens: int
    nll: float
    """Sum of negative log-likelihoods of the document's tokens (nats)."""
    kld: float
    """Sum over positions of KL(reference || model), full vocabulary."""
    top1_same: int
    """Positions where the model's most likely token is the reference's."""


def text_logprobs(runtime: ScoringRuntime, tokens: Sequence[int]) -> np.ndarray:
    """Log-probabilities predicting tokens[1:], shape [len-1, vocab], float32."""
    logits = runtime.sequence_logits(tokens)[:-1]
    out = np.empty(logits.shape, dtype=np.float32)
    for start in range(0, len(logits), _ROWS):  # in slices: float64 of a whole text is large
        out[start: start + _ROWS] = log_softmax(logits[start: start + _ROWS])
    return out


_ROWS = 64


def score_text(doc: int, tokens: Sequence[int], logprobs: np.ndarray,
               reference: np.ndarray) -> TextScore:
    targets = np.asarray(tokens[1:])
    nll = float(-logprobs[np.arange(len(targets)), targets].astype(np.float64).sum())
    kld = 0.0
    for start in range(0, len(targets), _ROWS):
        ref = reference[start: start + _ROWS].astype(np.float64)
        kld += float((np.exp(ref) * (ref - logprobs[start: start + _ROWS])).sum())
    same = int((reference.argmax(-1) == logprobs.argmax(-1)).sum())
    return TextScore(doc, len(targets), nll, kld, same)
