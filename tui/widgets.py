"""Widgets of the chat app: the disclaimer banner, messages, a reply's sources, the status line
and the history list."""

from __future__ import annotations

from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Label, ListItem, Markdown, Static

from localmed.conversation import DISCLAIMER, Conversation
from localmed.images import Image, thumbnail
from localmed.retrieval.grounding import CitationCheck, Grounding
from localmed.retrieval.store import Passage


class DisclaimerBanner(Static):
    """Docked at the top of every screen and modal; it cannot be closed or scrolled away."""

    def __init__(self, advisory: str) -> None:
        text = Text()
        text.append(f"⚠ {DISCLAIMER}", style="bold")
        if advisory:
            text.append(f"\nModel advisory: {advisory}")
        super().__init__(text, classes="disclaimer")
        self.can_focus = False


class StreamingText(Widget):
    """A reply while it streams: plain text, wrapped as it arrives, redrawn a line at a time.

    Textual's Markdown widget lays the whole screen out again on every append (twice: the block,
    then the sizes it changed), about 10-30 ms of Python on a 120x40 terminal and more as the
    conversation grows. With the engine on every core, that time comes straight out of decoding.
    Here only the last line is wrapped again as text arrives (greedy wrapping does not change
    the lines before it), only the lines that changed are redrawn, and the height grows
    ``step`` lines at a time, so the screen is laid out again once a step.
    :meth:`MessageView.finish` typesets the whole reply as Markdown at the end.
    """

    DEFAULT_CSS = "StreamingText { height: 1; }"

    def __init__(self, step: int = 8) -> None:
        super().__init__()
        self.step = max(step, 1)
        """Lines reserved at a time: blank lines below the text until it reaches them."""
        self.text = ""
        self._shown = ""  # the text as drawn: tabs as spaces, no carriage returns
        self._strips: list[Strip] = []  # every line; all but the last _open_lines are final
        self._open_from = 0  # where in _shown the open lines start
        self._open_lines = 0
        self._width = 0
        self._blank = Strip.blank(0)

    @property
    def line_count(self) -> int:
        return len(self._strips)

    def append(self, text: str) -> None:
        if not text:
            return
        self.text += text
        self._shown += text.replace("\r", "").replace("\t", "    ")
        if self.size.width != self._width:
            self._rewrap()
            return
        first = self._wrap_open()
        if not self._reserve():
            self.refresh(Region(0, first, self._width, self.line_count - first))

    def _wrap_open(self) -> int:
        """Wrap the text from the start of the open lines on; the index of the first line that
        changed (the open lines were redrawn, and any after them are new)."""
        first = len(self._strips) - self._open_lines
        del self._strips[first:]
        *paragraphs, last = self._shown[self._open_from:].split("\n")
        for paragraph in paragraphs:
            self._strips += self._wrap(paragraph)[0]
            self._open_from += len(paragraph) + 1
        strips, restart, self._open_lines = self._wrap(last)
        self._strips += strips
        self._open_from += restart
        return first

    def _wrap(self, paragraph: str) -> tuple[list[Strip], int, int]:
        """The strips of a paragraph, padded to the width (drawn as they are, no copies); where
        the last line that more text could change starts in it, and how many lines from there.

        That is the last line rich broke before a word: greedy wrapping starts afresh there, so
        wrapping from it gives the same lines as wrapping the whole paragraph. A line that goes
        on with a word longer than the width, or starts with spaces, is not such a line."""
        console, style, width = self.app.console, self.rich_style, max(self._width, 1)
        lines = Text(paragraph, style=style).wrap(console, width)
        strips = [Strip(line.render(console), line.cell_len).extend_cell_length(width, style)
                  for line in lines] or [self._blank]
        restart, open_lines, at = 0, len(strips), 0
        try:  # lines are pieces of the paragraph in order, less the spaces at their breaks
            for number, line in enumerate(lines):
                start = paragraph.index(line.plain, at) if line.plain else at
                if number and line.plain[:1].strip() and paragraph[start - 1].isspace():
                    restart, open_lines = start, len(lines) - number
                at = start + len(line.plain)
        except ValueError:  # not found as it is: the whole paragraph stays open
            restart, open_lines = 0, len(strips)
        return strips, restart, open_lines

    def _rewrap(self) -> None:
        self._width = self.size.width
        self._blank = Strip.blank(self._width, self.rich_style)
        self._strips, self._open_from, self._open_lines = [], 0, 0
        self._wrap_open()
        if not self._reserve():
            self.refresh()

    def _reserve(self) -> bool:
        """Grow the height to the next step when the text needs it; True if it did."""
        needed = -(-self.line_count // self.step) * self.step
        if self.styles.height is not None and self.styles.height.value == needed:
            return False
        self.styles.height = needed
        return True

    def on_resize(self, event: events.Resize) -> None:
        if self.text and event.size.width != self._width:
            self._rewrap()

    def render_line(self, y: int) -> Strip:
        return self._strips[y] if y < len(self._strips) else self._blank


class ImageThumbnail(Static):
    """An image sent with a message: drawn in half blocks (two pixels a cell, in the
    terminal's own colours; in a browser tab as well), its name and size below."""

    COLUMNS, ROWS = 32, 8

    def __init__(self, image: Image) -> None:
        text = Text()
        pixels = thumbnail(image, self.COLUMNS, self.ROWS)
        for y in range(0, len(pixels), 2):
            top, bottom = pixels[y], pixels[y + 1] if y + 1 < len(pixels) else []
            for x, upper in enumerate(top):
                lower = bottom[x] if x < len(bottom) else None
                text.append("▀", style=Style(color=Color.from_rgb(*upper),
                                             bgcolor=Color.from_rgb(*lower) if lower else None))
            text.append("\n")
        text.append(f"image: {image.label}", style="italic")
        super().__init__(text, classes="thumbnail")


class MessageView(Vertical):
    """One turn: who spoke, the images that went with it, and the text rendered as Markdown
    (streamed as plain text first)."""

    def __init__(self, role: str, content: str = "", *, stream_step: int = 0,
                 images: tuple[Image, ...] = (), image_names: tuple[str, ...] = ()) -> None:
        """``stream_step`` > 0: the turn streams (see :class:`StreamingText`), growing that
        many lines at a time. ``images``: drawn above the text; ``image_names``: images of a
        saved conversation, whose pixels were not kept, by name."""
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.streaming = stream_step > 0
        self._stream_step = stream_step
        self.images = images
        self.image_names = image_names

    def compose(self) -> ComposeResult:
        yield Label("Clinician" if self.role == "user" else "Model", classes="who")
        for image in self.images:
            yield ImageThumbnail(image)
        for name in self.image_names:
            yield Label(f"image: {name} (not kept in saved conversations)", classes="thumbnail")
        yield StreamingText(self._stream_step) if self.streaming else Markdown(self.content)

    @property
    def text(self) -> str:
        """What the turn shows: the text streamed so far, or the Markdown source."""
        if self.streaming:
            return self.query_one(StreamingText).text
        return self.query_one(Markdown).source

    def append(self, text: str) -> None:
        if self.streaming and self.is_attached:  # not after Ctrl+N cleared the log
            self.query_one(StreamingText).append(text)

    async def finish(self) -> None:
        """The reply has ended: typeset what streamed as Markdown, in place."""
        if not self.streaming or not self.is_attached:
            return
        stream = self.query_one(StreamingText)
        self.content, self.streaming = stream.text, False
        await stream.remove()
        await self.mount(Markdown(self.content))


class SourceLine(Static):
    """One passage a reply was given: ``[n] file p. N — its first line``; a click opens it
    whole."""

    class Chosen(Message):
        def __init__(self, passage: Passage, number: int) -> None:
            super().__init__()
            self.passage = passage
            self.number = number

    def __init__(self, number: int, passage: Passage, cited: bool) -> None:
        text = Text()
        text.append(f"[{number}] ", style="bold")
        text.append(passage.where, style="underline")
        text.append(f" — {passage.first_line}")
        if not cited:
            text.append("  (not cited)", style="dim")
        super().__init__(text, classes="source")
        self.passage = passage
        self.number = number

    def on_click(self) -> None:
        self.post_message(self.Chosen(self.passage, self.number))


class SourcesView(Vertical):
    """Under a reply answered from documents: the passages it was given (click one, or F7, to
    read it whole), what its citation check flagged, or that it is not grounded."""

    def __init__(self, grounding: Grounding, check: CitationCheck | None) -> None:
        super().__init__(classes="sources")
        self.grounding = grounding
        self.check = check

    def compose(self) -> ComposeResult:
        grounding, check = self.grounding, self.check
        if not grounding.grounded:
            yield Static(Text(f"⚠ Not grounded: nothing in {grounding.index} cleared the "
                              "relevance floor; this reply is the model's own.",
                              style="bold"), classes="ungrounded")
        else:
            cited = set(check.cited) if check else set()
            yield Label(f"Sources ({grounding.index}) — click one, or F7, to read it whole",
                        classes="who")
            for n, passage in enumerate(grounding.passages, start=1):
                yield SourceLine(n, passage, n in cited)
        for flag in check.flags if check else ():
            yield Static(Text(f"⚠ {flag}"), classes="flag")


class StatusLine(Static):
    """Bottom line: speed (and the last reply's drafted tokens the model took), context use,
    offload, template and whether chats are saved."""

    def show(self, *, tps: float, used: int, n_ctx: int, offload: str, template: str,
             saving: bool, note: str = "", docs: str = "", drafts: tuple[int, int] = (0, 0)
             ) -> None:
        speed = f"{tps:.1f} tok/s" if tps else "– tok/s"
        if drafts[1]:
            speed += f" (drafts {drafts[0]}/{drafts[1]} taken)"
        parts = [speed, f"ctx {used}/{n_ctx}", offload,
                 f"template: {template}", f"saving: {'on' if saving else 'off'}"]
        if docs:
            parts.insert(4, f"docs: {docs}")
        if note:
            parts.append(note)
        self.update(" · ".join(parts))


class HistoryItem(ListItem):
    def __init__(self, conversation: Conversation) -> None:
        super().__init__(Label(conversation.title or conversation.id))
        self.conversation = conversation
