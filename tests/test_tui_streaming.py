"""The streaming reply widget, in a bare host app: what it shows is rich's own wrapping of the
whole text at every step, and the screen is laid out again per step of lines, not per piece."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Markdown

from localmed.tui.widgets import MessageView, StreamingText

SIZE = (72, 24)
STEP = 6

# Things a medical reply holds that wrapping gets wrong: list markers, blank lines, a word longer
# than the line, double-width characters, units, a line ending in spaces.
REPLY = (
    "**Acute coronary syndrome: first steps**\n\n"
    "1. Call for help and attach a monitor; record a 12-lead ECG within 10 minutes.\n"
    "2. Aspirin 300 mg chewed unless allergic; nitroglycerin 0.4 mg sublingual if SBP > 90.\n"
    "3. Oxygen only if SpO₂ < 90 %.   \n\n"
    "See https://www.escardio.org/Guidelines/Clinical-Practice-Guidelines/Acute-Coronary-"
    "Syndromes-ACS-Guidelines for the full pathway.\n\n"
    "急性冠脉综合征 (ACS) 的初步处理：阿司匹林、心电图、肌钙蛋白。 Troponin at 0 h and 1 h; "
    "repeat the ECG with any change in pain. " * 3
    + "\n\n\tTabbed line, a CRLF line\r\nand one paragraph that never ends: "
    + "troponin rises and falls " * 40
)


TRICKY = ["a", "bb", "ccc ", " ", "     ", "\n", "\n\n", "d" * 26, "é", "肺", "\t", "x-y", ". ",
          "\r\n"]


class Host(App):
    CSS_PATH = Path(__file__).resolve().parents[1] / "tui" / "app.tcss"

    def compose(self) -> ComposeResult:
        yield VerticalScroll(MessageView("assistant", stream_step=STEP), id="log")

    def on_mount(self) -> None:
        self.query_one("#log").anchor()


def pieces(text: str, seed: int = 0) -> list[str]:
    """The text cut at random places, mid-word and mid-newline included, as tokens arrive."""
    rng, cuts, at = random.Random(seed), [], 0
    while at < len(text):
        size = rng.randint(1, 12)
        cuts.append(text[at:at + size])
        at += size
    return cuts


def shown(widget: StreamingText) -> list[str]:
    return [widget.render_line(y).text.rstrip() for y in range(widget.line_count)]


def expected(app: App, text: str, width: int) -> list[str]:
    """rich's wrapping of the whole text: the reference (tabs and carriage returns as drawn)."""
    text = text.replace("\r", "").replace("\t", "    ")
    return [line.plain.rstrip() for line in Text(text).wrap(app.console, width)]


class TestStreamingText:
    async def test_lines_are_the_whole_text_wrapped_at_every_piece(self):
        app = Host()
        async with app.run_test(size=SIZE) as pilot:
            view = app.query_one(MessageView)
            widget = app.query_one(StreamingText)
            heights = [widget.size.height]
            so_far = ""
            for number, piece in enumerate(pieces(REPLY)):
                view.append(piece)
                so_far += piece
                assert widget.text == so_far
                assert shown(widget) == expected(app, so_far, widget.size.width)
                if number % 4:  # at most 48 characters between layouts: under a line
                    continue
                await pilot.pause()
                if widget.size.height != heights[-1]:
                    heights.append(widget.size.height)
            lines = widget.line_count
            assert lines > 4 * STEP
            # Height in whole steps, never more than one step ahead of the text: the screen was
            # laid out again once a step, not once per piece (there were hundreds).
            assert widget.size.height == -(-lines // STEP) * STEP
            assert len(pieces(REPLY)) > 100
            assert heights[1:] == list(range(STEP, widget.size.height + 1, STEP)), heights

    @pytest.mark.parametrize("seed", range(6))
    async def test_any_text_wraps_as_rich_wraps_it_whole(self, seed):
        """Adversarial text: runs of spaces, words longer than the line (folded), tabs, CRLF,
        wide characters, blank lines; in pieces cut anywhere; at two widths."""
        rng = random.Random(seed)
        text = "".join(rng.choice(TRICKY) for _ in range(300))
        for width in (12, 31):
            app = Host()
            async with app.run_test(size=(width + 4, 20)):
                view, widget = app.query_one(MessageView), app.query_one(StreamingText)
                so_far = ""
                for piece in pieces(text, seed):
                    view.append(piece)
                    so_far += piece
                    assert shown(widget) == expected(app, so_far, widget.size.width)

    async def test_the_end_of_the_reply_stays_in_view(self):
        app = Host()
        async with app.run_test(size=SIZE) as pilot:
            log, view = app.query_one("#log"), app.query_one(MessageView)
            for number, piece in enumerate(pieces(REPLY, seed=1)):
                view.append(piece)
                if number % 4 == 0:
                    await pilot.pause()
            await pilot.pause()
            widget = app.query_one(StreamingText)
            last = widget.region.y + widget.line_count - 1
            assert log.scroll_y == log.max_scroll_y > 0
            assert log.region.y <= last < log.region.bottom

    async def test_a_narrower_terminal_rewraps(self):
        app = Host()
        async with app.run_test(size=SIZE) as pilot:
            view = app.query_one(MessageView)
            for piece in pieces(REPLY[:600]):
                view.append(piece)
            await pilot.resize_terminal(40, 24)
            await pilot.pause()
            widget = app.query_one(StreamingText)
            assert widget.size.width < SIZE[0] - 20
            assert shown(widget) == expected(app, REPLY[:600], widget.size.width)
            view.append(REPLY[600:])
            assert shown(widget) == expected(app, REPLY, widget.size.width)

    async def test_the_finished_reply_is_typeset_as_markdown(self):
        app = Host()
        async with app.run_test(size=SIZE) as pilot:
            view = app.query_one(MessageView)
            for piece in pieces(REPLY):
                view.append(piece)
            await view.finish()
            await pilot.pause()
            assert not app.query(StreamingText)
            assert view.text == view.content == REPLY
            assert app.query_one(Markdown).source == REPLY
            view.append("more")  # a late piece (after Esc) changes nothing
            await view.finish()
            assert view.text == REPLY
