"""``localmed chat``: the Textual app. Small on purpose: screens live in their own modules."""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from localmed.chat import ChatSession
from tui.chat_screen import HELP_ROWS, ChatScreen
from tui.modals import BannerModal, InfoScreen


class LocalmedApp(App[None]):
    """The chat app around one :class:`ChatSession`."""

    CSS_PATH = "app.tcss"
    TITLE = "localmed"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("f1", "help", "Help"),
    ]

    def __init__(self, session: ChatSession) -> None:
        super().__init__()
        self.session = session

    def get_default_screen(self) -> Screen:
        return ChatScreen(self.session)

    def action_help(self) -> None:
        if isinstance(self.screen, BannerModal):
            return
        self.push_screen(InfoScreen(self.session.model.advisory, "Keys", HELP_ROWS))


def run_chat(session: ChatSession) -> None:
    """Run the app until the user quits; the model is closed afterwards."""
    try:
        LocalmedApp(session).run()
    finally:
        session.runtime.close()
