"""Widgets of the chat app: the disclaimer banner, messages, status line and history list."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ListItem, Markdown, Static

from localmed.conversation import DISCLAIMER, Conversation


class DisclaimerBanner(Static):
    """Docked at the top of every screen and modal; it cannot be closed or scrolled away."""

    def __init__(self, advisory: str) -> None:
        text = Text()
        text.append(f"⚠ {DISCLAIMER}", style="bold")
        if advisory:
            text.append(f"\nModel advisory: {advisory}")
        super().__init__(text, classes="disclaimer")
        self.can_focus = False


class MessageView(Vertical):
    """One turn: who spoke, and the text rendered as Markdown."""

    def __init__(self, role: str, content: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content

    def compose(self) -> ComposeResult:
        yield Label("Clinician" if self.role == "user" else "Model", classes="who")
        yield Markdown(self.content)

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)


class StatusLine(Static):
    """Bottom line: speed, context use, offload, template and whether chats are saved."""

    def show(self, *, tps: float, used: int, n_ctx: int, offload: str, template: str,
             saving: bool, note: str = "") -> None:
        parts = [f"{tps:.1f} tok/s" if tps else "– tok/s", f"ctx {used}/{n_ctx}", offload,
                 f"template: {template}", f"saving: {'on' if saving else 'off'}"]
        if note:
            parts.append(note)
        self.update(" · ".join(parts))


class HistoryItem(ListItem):
    def __init__(self, conversation: Conversation) -> None:
        super().__init__(Label(conversation.title or conversation.id))
        self.conversation = conversation
