"""Conversations: the prompt that fits the context, saved history (0600), Markdown export.

Core logic for the chat app, with no UI: the TUI holds a :class:`Conversation` and asks
:func:`fit_prompt` for the text to send.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localmed import paths
from localmed.atomic import write_text_atomic
from localmed.errors import ContextFullError, LocalmedError
from localmed.templates import Message, PromptTemplate

DISCLAIMER = ("Not medical advice. For use by medical professionals: "
              "verify every output before acting on it.")
"""The first line of the banner on every screen, and of every export."""

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Conversation:
    """One chat: its turns, system prompt and the model and template it used."""

    model: str
    template: str
    system: str = ""
    messages: list[Message] = field(default_factory=list)
    id: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y%m%d-%H%M%S-")
                    + uuid.uuid4().hex[:6])
    created: str = field(default_factory=_now)
    title: str = ""
    attachments: dict[str, list[str]] = field(default_factory=dict)
    """The images each user message carried, by message index: names only (a saved
    conversation keeps no pixels)."""
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """What each reply was answered from, by message index (``chat --docs``): the index, whether
    anything cleared the relevance floor, the passages given (file, page, heading, span, text)
    and the citation checks that failed."""

    def add(self, role: str, content: str) -> None:
        self.messages.append(Message(role, content))  # type: ignore[arg-type]
        if not self.title and role == "user":
            self.title = " ".join(content.split())[:60]

    def to_json(self) -> str:
        data = asdict(self)
        data["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        data = json.loads(text)
        data["messages"] = [Message(m["role"], m["content"]) for m in data.get("messages", [])]
        return cls(**data)

    def to_markdown(self, advisory: str = "") -> str:
        """The conversation as Markdown, headed by the disclaimer and the model's advisory."""
        lines = [f"> **{DISCLAIMER}**"]
        if advisory:
            lines.append(f"> Model advisory: {advisory}")
        lines += ["", f"# {self.title or 'Conversation'}", "",
                  f"- model: `{self.model}`", f"- prompt template: `{self.template}`",
                  f"- started: {self.created}", f"- exported: {_now()}", ""]
        if self.system:
            lines += ["## System prompt", "", self.system, ""]
        for i, message in enumerate(self.messages):
            lines += [f"## {'Clinician' if message.role == 'user' else 'Model'}", ""]
            lines += [f"*image: {name}*" for name in self.attachments.get(str(i), [])]
            lines += [message.content, ""]
            if record := self.sources.get(str(i)):
                lines += source_lines(record)
        return "\n".join(lines)


def source_lines(record: dict[str, Any]) -> list[str]:
    """A reply's sources in Markdown, under it: each passage given, and what was flagged."""
    if not record.get("grounded"):
        return [f"> *Not grounded: nothing in {record.get('index')} cleared the relevance "
                "floor; this reply is the model's own.*", ""]
    lines = [f"**Sources** ({record.get('index')}):", ""]
    for passage in record.get("passages", []):
        page = f" p. {passage['page']}" if passage.get("page") is not None else ""
        first = next((ln.strip() for ln in passage.get("text", "").splitlines() if ln.strip()),
                     "")
        lines.append(f"- [{passage['id']}] {passage['source']}{page}: {first[:100]}")
    lines += [f"- ⚠ {flag}" for flag in record.get("flags", [])]
    return [*lines, ""]


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int
    dropped_turns: int
    """Messages left out so the prompt fits (the system prompt never is)."""
    start: int = 0
    """The first message after the kept first exchange that the prompt holds: the next prompt
    starts there too (turns are dropped in blocks, so the prompt's beginning, and the engine's
    cache of it, stays the same from turn to turn)."""
    first_kept: bool = True
    """Whether the conversation's first exchange (usually the pasted record and its answer) is
    in the prompt: it goes only when it alone leaves no room for the newest message."""


FIRST_EXCHANGE = 2
"""Messages kept at the front while later turns are dropped: the first question (the record a
clinician pastes) and its answer."""


def fit_prompt(template: PromptTemplate, conversation: Conversation,
               count: Callable[[str], int], n_ctx: int, reserve: int, *,
               size: Callable[[int], int], start: int = 0) -> Prompt:
    """The prompt for the next reply, leaving ``reserve`` tokens of room for the answer.

    The system prompt and the first exchange stay; later turns are left out from the oldest,
    from ``start`` (the last prompt's) on. When the conversation outgrows the context, turns go
    in a block that frees a quarter of the room, chosen from ``size(i)`` (message ``i``'s
    tokens, cached by the caller), so the next turns fit behind the same beginning; the text is
    rendered and counted once a turn, again only where the sizes were short. The first exchange
    goes only when it leaves no room for the newest message; a newest message that does not fit
    alone is :class:`ContextFullError`."""
    messages = conversation.messages
    system = conversation.system or None
    budget = n_ctx - reserve
    head = FIRST_EXCHANGE if len(messages) > FIRST_EXCHANGE else 0
    last = len(messages) - 1
    start = max(start, head)
    start = min(start + (start - head) % 2, last)  # a user message, the newest at the latest

    def render(start: int, keep_head: bool) -> tuple[str, int]:
        text = template.render([*(messages[:head] if keep_head else ()), *messages[start:]],
                               system=system)
        return text, count(text)

    keep_head = True
    text, tokens = render(start, keep_head)
    if tokens > budget and start < last:
        # One block: what is over, and a quarter of the room left beside the first exchange.
        room = budget - sum(size(i) for i in range(head))
        wanted = tokens - budget + max(room, 0) // 4
        while wanted > 0 and start < last:
            wanted -= size(start) + size(start + 1)
            start += 2
        text, tokens = render(start, keep_head)
    while tokens > budget:  # the sizes fell short: a turn more
        if start < last:
            start += 2
        elif keep_head and head:
            keep_head = False
        else:
            raise ContextFullError(
                f"the system prompt and your message take {tokens} tokens; with {reserve} kept "
                f"for the answer they do not fit the {n_ctx}-token context")
        text, tokens = render(start, keep_head)
    dropped = start - head + (0 if keep_head else head)
    return Prompt(text, tokens, dropped, start, keep_head)


class HistoryStore:
    """Saved conversations: one JSON file each, mode 0600, in a 0700 folder."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or paths.data_dir() / "conversations"

    def _path(self, conversation_id: str) -> Path:
        if not conversation_id or "/" in conversation_id or conversation_id.startswith("."):
            raise LocalmedError(f"bad conversation id {conversation_id!r}")
        return self.folder / f"{conversation_id}.json"

    def save(self, conversation: Conversation) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, PRIVATE_DIR)
        path = self._path(conversation.id)
        write_text_atomic(path, conversation.to_json(), mode=PRIVATE_FILE)
        return path

    def list(self) -> list[Conversation]:
        """Saved conversations, newest first; unreadable files are skipped."""
        if not self.folder.is_dir():
            return []
        out = []
        for path in sorted(self.folder.glob("*.json"), reverse=True):
            try:
                out.append(Conversation.from_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return out

    def delete(self, conversation_id: str) -> None:
        self._path(conversation_id).unlink(missing_ok=True)


def export_markdown(conversation: Conversation, path: Path, advisory: str = "") -> Path:
    """Write the conversation as Markdown (mode 0600: it may hold patient details)."""
    write_text_atomic(path, conversation.to_markdown(advisory), mode=PRIVATE_FILE)
    return path
