"""The chat screen's documents: ``/docs NAME`` and ``/docs off``, "nothing in NAME on this"
before a reply, and a reply's sources opened whole (a click, or F7)."""

from __future__ import annotations

from dataclasses import dataclass

from textual import work
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static

from localmed.errors import LocalmedError
from localmed.retrieval.grounding import Grounding
from localmed.tui.modals import PassageScreen, SourcesScreen
from localmed.tui.widgets import SourceLine, SourcesView


class DocsMixin:
    """What :class:`~localmed.tui.chat_screen.ChatScreen` does with a document index; it
    holds ``session``, ``_reply``, ``generating`` and ``refresh_status``."""

    @dataclass
    class Grounded(Message):
        """The passages a question is answered from, before the reply's first text."""

        grounding: Grounding

    @dataclass
    class DocsOpened(Message):
        """``/docs NAME`` opened its index (or failed: ``error``)."""

        retriever: object | None
        name: str
        error: str = ""

    async def on_docs_mixin_grounded(self, message: Grounded) -> None:
        grounding = message.grounding
        for note in grounding.notes:
            self.notify(note, timeout=8)
        if not grounding.grounded and self._reply is not None and self._reply.is_attached:
            await self.query_one("#log", VerticalScroll).mount(
                Static(f"Nothing in {grounding.index} on this: the model answers from its own "
                       "knowledge (not grounded).", classes="docs-notice"), before=self._reply)

    async def show_sources(self, reply) -> None:
        """Under a reply that ended: the passages it was given and its citations' check."""
        grounding = self.session.last_grounding
        if grounding is not None and reply is not None and reply.is_attached:
            await self.query_one("#log", VerticalScroll).mount(
                SourcesView(grounding, self.session.last_check), after=reply)

    def switch_docs(self, name: str) -> None:
        """``/docs NAME`` (answer from that index) or ``/docs off``."""
        if self.generating:
            self.notify("A reply is still coming: wait, or press Esc to stop it.")
            return
        if not name:
            now = self.session.docs
            self.notify((f"Answering from {now}. " if now else "Answering from no documents. ")
                        + "/docs NAME answers from an index (localmed docs list shows them); "
                        "/docs off from none.", timeout=10)
            return
        if name == "off":
            self.session.set_docs(None)
            self.refresh_status()
            self.notify("Documents off: replies come from the model's own knowledge.")
            return
        self.refresh_status(f"opening {name}…")
        self.open_docs(name)

    @work(thread=True, exclusive=True, exit_on_error=False, group="docs")
    def open_docs(self, name: str) -> None:
        from localmed.retrieval.catalog import open_retriever

        try:
            retriever = open_retriever(name)
        except LocalmedError as refused:
            self.post_message(self.DocsOpened(None, name, str(refused)))
            return
        self.post_message(self.DocsOpened(retriever, name))

    def on_docs_mixin_docs_opened(self, message: DocsOpened) -> None:
        if message.error:
            self.refresh_status()
            self.notify(f"Documents not switched: {message.error}", severity="error",
                        timeout=12)
            return
        self.session.set_docs(message.retriever)
        self.refresh_status()
        self.notify(f"Answering from {message.name}: each question gets its passages, and the "
                    "reply lists them.")

    def on_source_line_chosen(self, message: SourceLine.Chosen) -> None:
        folder = ""
        for view in message.control.ancestors:
            if isinstance(view, SourcesView):
                folder = view.grounding.folder
                break
        self.app.push_screen(PassageScreen(self.session.model.advisory, message.number,
                                           message.passage, folder))

    def action_sources(self) -> None:
        grounding = self.session.last_grounding
        if grounding is None or not grounding.passages:
            self.notify("The last reply has no sources." if grounding is not None else
                        "No reply was answered from documents yet (/docs NAME).")
            return

        def chosen(number: int | None) -> None:
            if number:
                self.app.push_screen(PassageScreen(self.session.model.advisory, number,
                                                   grounding.passages[number - 1],
                                                   grounding.folder))

        self.app.push_screen(SourcesScreen(self.session.model.advisory, grounding.passages),
                             chosen)

