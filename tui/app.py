"""``localmed chat``: the Textual app. Small on purpose: screens live in their own modules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from localmed.chat import ChatSession
from localmed.tui.chat_screen import HELP_ROWS, ChatScreen
from localmed.tui.modals import BannerModal, InfoScreen


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

    def on_mount(self) -> None:
        # A closed terminal (SIGHUP) or a kill (SIGTERM) ends the app as Ctrl+Q does, and the
        # model's engine with it; left to Python's handlers, the loop would run on unseen.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, self.shutdown)
            loop.add_signal_handler(signal.SIGHUP, self.hang_up)

    def shutdown(self) -> None:
        """Stop a reply in progress (its worker waits on the engine), then exit."""
        self.session.stop()
        self.exit()

    def hang_up(self) -> None:
        """The terminal is gone: nothing to restore on it, and Textual's writer thread can block
        for ever on a closed tty (seen under tmux kill-server). The engine is closed, then the
        process ends at once."""
        self.session.stop()
        self.session.close()
        os._exit(128 + signal.SIGHUP)

    async def action_quit(self) -> None:
        self.shutdown()

    def get_default_screen(self) -> Screen:
        return ChatScreen(self.session)

    def action_help(self) -> None:
        if isinstance(self.screen, BannerModal):
            return
        self.push_screen(InfoScreen(self.session.model.advisory, "Keys", HELP_ROWS))


def run_chat(session: ChatSession) -> None:
    """Run the app until the user quits; the model is closed afterwards."""
    # An engine process started while the app runs (the embedding model, when the first
    # question is searched or /docs switches) needs multiprocessing's resource tracker, whose
    # own start passes on stderr's descriptor: under Textual's web driver (chat --web) stderr
    # has none, and the start failed ("bad value(s) in fds_to_keep"). Started now, it is there.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    try:
        LocalmedApp(session).run()
    finally:
        session.close()
