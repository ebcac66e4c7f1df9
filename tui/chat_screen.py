"""The main chat screen: history sidebar, conversation, message input and status line."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Input, Label, ListView
from textual.worker import Worker, WorkerState

from localmed.chat import ChatSession
from localmed.conversation import Conversation
from localmed.errors import EngineDiedError, LocalmedError
from localmed.retrieval.grounding import Grounding
from localmed.runtimes.base import StopReason, batched, describe_plan
from localmed.templates import GGUF_TEMPLATE, TEMPLATES
from localmed.tui.docs import DocsMixin
from localmed.tui.modals import (
    EngineDiedScreen,
    ErrorScreen,
    ImagePickerScreen,
    InfoScreen,
    SystemPromptScreen,
    TemplateScreen,
)
from localmed.tui.widgets import DisclaimerBanner, HistoryItem, MessageView, SourcesView, StatusLine

FLUSH_SECONDS = 0.1
"""How often new text of a reply reaches the screen. Each update is Python work in the app; when
the engine decodes on every core, that work preempts one of llama.cpp's threads and stalls the
rest at their barrier. Measured on 2 cores, all of them decoding (benchmarks/decode_overhead.py,
512 tokens): 20 updates a second cost 7-8% of decode speed, 10 a second about 1%."""

HELP_ROWS = [
    ("Enter", "send the message"),
    ("Esc", "stop the reply at once (in a dialog: close it)"),
    ("Ctrl+N", "new chat"),
    ("F2", "prompt template"),
    ("F3", "system prompt"),
    ("F4", "model info: template, quant, offload, provenance"),
    ("F5", "turn saving of conversations on/off (off by default)"),
    ("F6", "reload the model after its engine stopped (the conversation stays)"),
    ("Ctrl+B", "show/hide saved conversations"),
    ("Ctrl+E", "export this conversation to Markdown (disclaimer included)"),
    ("Ctrl+Y", "copy the last reply"),
    ("/image PATH", "attach an image to the next message (image-text models: MedGemma)"),
    ("/docs NAME", "answer from a document index (localmed docs add FOLDER makes one)"),
    ("/docs off", "answer from the model's own knowledge"),
    ("F7", "the last reply's sources: read a passage whole (or click it)"),
    ("Ctrl+O", "choose an image file to attach"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]


class ChatScreen(DocsMixin, Screen):
    """Talk to the model. Generation runs in a thread worker that only posts messages."""

    BINDINGS = [
        Binding("escape", "stop", "Stop", show=True),
        # priority: the message Input would otherwise take these (Ctrl+E is its end-of-line).
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("f2", "template", "Template"),
        Binding("f3", "system_prompt", "System prompt"),
        Binding("f4", "model_info", "Model info"),
        Binding("f5", "toggle_saving", "Saving"),
        Binding("f6", "reload", "Reload model", show=False),
        Binding("f7", "sources", "Sources", show=False),
        Binding("ctrl+b", "toggle_sidebar", "History", priority=True),
        Binding("ctrl+e", "export", "Export", priority=True),
        Binding("ctrl+y", "copy_reply", "Copy reply", priority=True),
        Binding("ctrl+o", "pick_image", "Image", priority=True),
    ]

    @dataclass
    class Piece(Message):
        """Text of the reply being streamed."""

        text: str

    class Finished(Message):
        """The reply ended (end of text, stop string, length, or Esc)."""

    class Reloaded(Message):
        """The model's engine is running again."""

    def __init__(self, session: ChatSession) -> None:
        super().__init__()
        self.session = session
        self._reply: MessageView | None = None
        self.generating = False
        self.engine_down = False

    # --- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield DisclaimerBanner(self.session.model.advisory)
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("Saved conversations", id="sidebar-title")
                yield ListView(id="history")
            yield VerticalScroll(id="log")
        yield StatusLine()
        yield Input(placeholder="Ask the model… (Enter to send, F1 for keys)", id="prompt")

    def on_mount(self) -> None:
        self.title = f"localmed · {self.session.model.label}"
        self.refresh_status()
        choice = self.session.template_choice
        self.notify(f"Prompt template: {choice.reason}", severity="warning" if choice.fallback
                    else "information", timeout=8)
        self.query_one("#prompt", Input).focus()

    def refresh_status(self, note: str = "") -> None:
        session, stats = self.session, self.session.stats
        self.query_one(StatusLine).show(
            tps=stats.decode_tps, drafts=(stats.accepted_tokens, stats.drafted_tokens),
            used=session.context_used(),
            n_ctx=session.n_ctx, offload=session.plan.label,
            template=session.template_name, saving=session.save_history, note=note,
            docs=session.docs)

    # --- sending and streaming ------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    async def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        for command, act in (("/image", self.attach), ("/docs", self.switch_docs)):
            if text == command or text.startswith(command + " "):
                act(text.removeprefix(command).strip())
                event.input.clear()
                return
        if self.generating:
            self.notify("A reply is still coming: wait, or press Esc to stop it.")
            return
        if self.engine_down:
            self.notify("The model is not running: press F6 to reload it (your text stays).",
                        severity="warning")
            return
        self.generating = True  # (a second Enter while the message is measured waits too)
        try:
            await asyncio.to_thread(self.session.check_fits, text)  # the engine counts it
        except BaseException as refused:
            self.generating = False
            if not isinstance(refused, LocalmedError):
                raise
            # Refused at the input: nothing is sent or shown, the text stays to be shortened.
            self.notify(f"Not sent: {refused}", severity="error", timeout=12)
            return
        event.input.clear()
        log = self.query_one("#log", VerticalScroll)
        await log.mount(MessageView("user", text, images=tuple(self.session.pending)))
        # The reply grows half a screen at a time: a new layout every few seconds, not per line.
        self._reply = MessageView("assistant", stream_step=max(log.size.height // 2, 4))
        await log.mount(self._reply)
        # A blinking cursor is two more screen updates a second, taken from the decode.
        self.query_one("#prompt", Input).cursor_blink = False
        self.refresh_status("generating… (Esc stops)")
        log.anchor()
        self.generate(text)

    @work(thread=True, exclusive=True, exit_on_error=False, group="generate")
    def generate(self, text: str) -> None:
        grounding = self.session.ground(text)
        if grounding is not None:
            self.post_message(DocsMixin.Grounded(grounding))
        # The engine sends text every FLUSH_SECONDS (cmd_chat asks it to); an in-process runtime
        # sends every token, so it is batched here too. Half the interval: a batch from the
        # engine that comes a little early is shown, not held back for the next one.
        for piece in batched(self.session.ask(text, grounding), FLUSH_SECONDS / 2):
            self.post_message(self.Piece(piece))
        self.post_message(self.Finished())

    def on_chat_screen_piece(self, message: Piece) -> None:
        if self._reply is not None:
            self._reply.append(message.text)

    async def on_chat_screen_finished(self, message: Finished) -> None:
        reply = self._reply
        await self._end_stream()
        await self.show_sources(reply)
        stats = self.session.stats
        note = "stopped" if stats.stopped_by is StopReason.USER else ""
        self.refresh_status(note)
        for notice in self.session.engine_notices():  # it died between replies, and is back
            self.notify(notice, severity="warning", timeout=15)
        if notice := self.session.dropped_notice():
            self.notify(notice, severity="warning", timeout=10)

    async def _end_stream(self) -> None:
        if self._reply is not None:
            await self._reply.finish()
        self.generating = False
        self.query_one("#prompt", Input).cursor_blink = True

    async def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "reload" and event.state == WorkerState.ERROR:
            self.engine_down = True
            self.refresh_status("model not loaded: F6 reloads it")
            self.app.push_screen(ErrorScreen(self.session.model.advisory,
                                             f"Reloading failed: {event.worker.error}"))
            return
        if event.worker.group != "generate" or event.state != WorkerState.ERROR:
            return
        await self._end_stream()
        messages = self.session.conversation.messages
        if self._reply is not None and (not messages or not messages[-1].content):
            await self._reply.remove()
        error = event.worker.error
        if isinstance(error, EngineDiedError):
            self.session.engine_notices()  # the dialog says it
            self.engine_down = True
            self.refresh_status("model stopped: F6 reloads it")

            def answered(reload: bool | None) -> None:
                if reload:
                    self.action_reload()

            self.app.push_screen(EngineDiedScreen(self.session.model.advisory, str(error)),
                                 answered)
            return
        # A user's mistake reads as its one line; anything else is never shown raw.
        message = str(error) if isinstance(error, LocalmedError) else (
            "The reply failed unexpectedly inside the model runtime. The conversation is kept; "
            "send the message again, or restart localmed if it keeps failing.")
        self.refresh_status()
        self.app.push_screen(ErrorScreen(self.session.model.advisory, message))

    def action_stop(self) -> None:
        if self.generating:
            self.session.stop()

    def action_reload(self) -> None:
        """Load the model again after its engine died (F6); the conversation stays."""
        if not self.engine_down or self.generating:
            self.notify("The model is running." if not self.engine_down else
                        "A reply is still coming.")
            return
        self.refresh_status("reloading the model…")
        self.reload_engine()

    @work(thread=True, exclusive=True, exit_on_error=False, group="reload")
    def reload_engine(self) -> None:
        self.session.restart()
        self.post_message(self.Reloaded())

    def on_chat_screen_reloaded(self, message: Reloaded) -> None:
        self.engine_down = False
        self.refresh_status()
        self.notify("Model reloaded. The conversation is as it was; send your message again.")

    # --- commands -------------------------------------------------------------------------------

    def action_pick_image(self) -> None:
        if self.session.no_images:
            self.notify(f"This model takes no images: {self.session.no_images}",
                        severity="warning", timeout=10)
            return

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.attach(str(path))

        self.app.push_screen(ImagePickerScreen(self.session.model.advisory, Path.home()),
                             chosen)

    def attach(self, where: str) -> None:
        """``/image PATH``: an image for the next message, read and checked now."""
        if not where:
            self.notify("Give the image's path: /image PATH (PNG, JPEG or WebP).",
                        severity="warning")
            return
        try:
            image = self.session.attach(Path(where.strip("'\"")))
        except LocalmedError as refused:
            self.notify(f"Not attached: {refused}", severity="error", timeout=12)
            return
        count = len(self.session.pending)
        self.refresh_status(f"{count} image{'s' * (count > 1)} attached")
        self.notify(f"Attached {image.label}: it goes with your next message.")

    async def action_new_chat(self) -> None:
        if self.generating:
            self.session.stop()
            await self.workers.wait_for_complete()
        self.session.new_chat()
        await self.query_one("#log", VerticalScroll).remove_children()
        self.refresh_status()
        self.notify("New chat.")

    def action_template(self) -> None:
        names = list(TEMPLATES)
        if self.session.info.chat_template:
            names.insert(0, GGUF_TEMPLATE)
        descriptions = {name: t.description for name, t in TEMPLATES.items()}
        descriptions[GGUF_TEMPLATE] = "the chat template embedded in the GGUF"

        def chosen(name: str | None) -> None:
            if name and name != self.session.template_name:
                choice = self.session.set_template(name)
                self.refresh_status()
                self.notify(f"Prompt template: {choice.reason}")

        self.app.push_screen(TemplateScreen(self.session.model.advisory, names,
                                            self.session.template_name, descriptions), chosen)

    def action_system_prompt(self) -> None:
        def saved(text: str | None) -> None:
            if text is not None:
                self.session.set_system(text)
                self.notify("System prompt saved." if text.strip() else "System prompt cleared.")

        folded = not self.session.template_choice.template.has_system
        self.app.push_screen(SystemPromptScreen(self.session.model.advisory,
                                                self.session.conversation.system, folded), saved)

    def action_model_info(self) -> None:
        session, info = self.session, self.session.info
        rows = [
            ("model", session.model.label),
            ("file", str(info.path)),
            ("architecture", info.architecture),
            ("quant", info.quant),
            ("size", f"{info.file_bytes / 1e9:.2f} GB, {info.n_parameters:,} parameters"),
            ("context", f"{session.n_ctx} tokens (trained for {info.context_length})"),
            ("template", f"{session.template_name}: {session.template_choice.reason}"),
            ("offload", describe_plan(session.plan)),
        ]
        if info.provenance:
            rows += [(f"provenance {key}", value) for key, value in info.provenance.rows()
                     if not key.startswith("sha256 ")]
        self.app.push_screen(InfoScreen(session.model.advisory, "Model", rows))

    def action_toggle_saving(self) -> None:
        path = self.session.set_saving(not self.session.save_history)
        self.refresh_status()
        if self.session.save_history:
            where = path or self.session.history.folder
            self.notify(f"Saving on: conversations go to {where} (private, mode 0600).")
        else:
            self.notify("Saving off: nothing more is written.")

    async def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.toggle_class("visible")
        if sidebar.has_class("visible"):
            history = self.query_one("#history", ListView)
            await history.clear()
            saved = self.session.history.list() if self.session.save_history else []
            for conversation in saved:
                await history.append(HistoryItem(conversation))
            if not self.session.save_history:
                self.notify("Saving is off (F5): no conversations are kept.")

    @on(ListView.Selected, "#history")
    async def open_saved(self, event: ListView.Selected) -> None:
        if self.generating or not isinstance(event.item, HistoryItem):
            return
        await self.show_conversation(event.item.conversation)

    async def show_conversation(self, conversation: Conversation) -> None:
        self.session.load(conversation)
        log = self.query_one("#log", VerticalScroll)
        await log.remove_children()
        for i, message in enumerate(conversation.messages):
            names = tuple(conversation.attachments.get(str(i), ()))
            await log.mount(MessageView(message.role, message.content, image_names=names))
            if record := conversation.sources.get(str(i)):
                await log.mount(SourcesView(*Grounding.from_record(record)))
        self.refresh_status()

    def action_export(self) -> None:
        if not self.session.conversation.messages:
            self.notify("Nothing to export yet.")
            return
        path = self.session.export()
        self.notify(f"Exported to {path}")

    def action_copy_reply(self) -> None:
        replies = [m for m in self.session.conversation.messages if m.role == "assistant"]
        if not replies:
            self.notify("No reply to copy yet.")
            return
        self.app.copy_to_clipboard(replies[-1].content)
        self.notify("Last reply copied.")
