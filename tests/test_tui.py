"""The chat app, driven with Textual's Pilot on real tiny GGUFs."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import OptionList

from localmed.chat import ChatModel, ChatSession
from localmed.conversation import DISCLAIMER, HistoryStore
from localmed.demo import DEMO_ENTRY
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.local import LocalRuntime
from localmed.tui.app import LocalmedApp
from localmed.tui.chat_screen import ChatScreen
from localmed.tui.modals import ErrorScreen
from localmed.tui.widgets import DisclaimerBanner, MessageView

SIZE = (100, 30)


@pytest.fixture
def make_app(demo_gguf, cpu_machine, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path / "data"))
    opened: list[LocalRuntime] = []

    def make(path: Path = demo_gguf, *, n_ctx: int | None = None, template: str | None = None,
             save: bool = False, params: GenerationParams | None = None) -> LocalmedApp:
        runtime = LocalRuntime.load(path, n_ctx=n_ctx, hardware=cpu_machine)
        opened.append(runtime)
        entry = DEMO_ENTRY if path == demo_gguf else None
        model = ChatModel(path.name, path, entry, DEMO_ENTRY.advisory if entry else "")
        session = ChatSession.open(model, runtime, template=template, save_history=save)
        session.history = HistoryStore(tmp_path / "data" / "conversations")
        session.params = params or GenerationParams(temperature=0.0)
        return LocalmedApp(session)

    yield make
    for runtime in opened:
        runtime.close()


async def send_without_waiting(pilot, text: str) -> None:
    await pilot.click("#prompt")
    for key in text:
        await pilot.press(key if key != " " else "space")
    await pilot.press("enter")
    await pilot.pause()


async def send(pilot, text: str) -> None:
    await send_without_waiting(pilot, text)
    await pilot.app.screen.workers.wait_for_complete()
    await pilot.pause()


def replies(app: LocalmedApp) -> list[MessageView]:
    return [m for m in app.screen.query(MessageView) if m.role == "assistant"]


def assert_banner(app: LocalmedApp) -> None:
    banners = list(app.screen.query(DisclaimerBanner))
    assert len(banners) == 1, type(app.screen).__name__
    banner = banners[0]
    text = str(banner.render())
    assert text.splitlines()[0].endswith(DISCLAIMER) and "Not medical advice" in text
    assert banner.region.y == 0 and banner.region.height >= 1, banner.region
    assert banner.display and banner.visible


class TestChatting:
    async def test_a_message_gets_a_streamed_reply(self, make_app, no_network):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "How do I stop a reply?")
            reply = replies(app)[-1]
            shown = reply.text
            assert "Escape" in shown
            assert app.session.conversation.messages[-1].content == shown.strip()
            assert app.session.stats.generated_tokens > 5
        assert no_network == []

    async def test_escape_stops_a_long_generation(self, make_app, converted):
        # Llama-3 vocab: with 128k tokens, a random model almost never samples an end token.
        app = make_app(converted["llama3"]["F32"], n_ctx=4096,
                       params=GenerationParams(max_tokens=4000), template="chatml")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await pilot.click("#prompt")
            await pilot.press("h", "i", "enter")
            for _ in range(500):  # until the first words arrive
                await pilot.pause(0.01)
                if replies(app) and replies(app)[-1].text:
                    break
            await pilot.press("escape")
            await screen.workers.wait_for_complete()
            await pilot.pause()
            stats = app.session.stats
            assert stats.stopped_by == "user"
            assert 0 < stats.generated_tokens < 4000
            assert not screen.generating

    async def test_reading_back_during_a_reply_is_not_pulled_down(self, make_app, converted):
        app = make_app(converted["llama3"]["F32"], n_ctx=4096,
                       params=GenerationParams(max_tokens=600, ignore_eos=True),
                       template="chatml")
        async with app.run_test(size=SIZE) as pilot:
            screen, log = app.screen, app.screen.query_one("#log")
            await send_without_waiting(pilot, "hi")
            while log.max_scroll_y < 5:  # until the reply is longer than the screen
                await pilot.pause(0.05)
            log.scroll_home(animate=False)  # the clinician scrolls up to read
            await screen.workers.wait_for_complete()
            await pilot.pause()
            assert log.max_scroll_y > 5 and log.scroll_y == 0
            await send(pilot, "x")  # a new message follows the conversation again
            assert log.scroll_y == log.max_scroll_y

    async def test_switching_template_changes_the_prompt_sent(self, make_app):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Hi")
            # the GGUF's embedded (Alpaca-style) template
            assert app.session.template_name == "gguf"
            assert app.session.last_prompt.text == (
                "You are the localmed demo.\n\n### Instruction:\nHi\n\n### Response:\n")
            await pilot.press("f2")
            await pilot.pause()
            options = app.screen.query_one(OptionList)
            options.highlighted = [o.id for o in options._options].index("med42")
            await pilot.press("enter")
            await pilot.pause()
            assert app.session.template_name == "med42"
            await send(pilot, "Ok")
            prompt = app.session.last_prompt.text
            assert prompt.startswith("<|prompter|>:Hi\n<|assistant|>:")
            assert prompt.endswith("<|prompter|>:Ok\n<|assistant|>:")

    async def test_new_chat_clears_the_conversation(self, make_app):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Hi")
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert app.session.conversation.messages == []
            assert list(app.screen.query(MessageView)) == []


class TestDisclaimer:
    async def test_banner_is_on_every_screen_and_modal(self, make_app):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            assert isinstance(app.screen, ChatScreen)
            assert_banner(app)
            for key in ("f1", "f2", "f3", "f4"):
                await pilot.press(key)
                await pilot.pause()
                assert not isinstance(app.screen, ChatScreen), key
                assert_banner(app)
                await pilot.press("escape")
                await pilot.pause()
                assert isinstance(app.screen, ChatScreen)
            app.push_screen(ErrorScreen(app.session.model.advisory, "boom"))
            await pilot.pause()
            assert_banner(app)
            await pilot.press("enter")
            await pilot.pause()

    async def test_banner_stays_when_the_conversation_scrolls(self, make_app):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            for question in ("What is localmed?", "How do I quantize a model?",
                             "Which models can I use?", "Is this medical advice?"):
                await send(pilot, question)
            log = app.screen.query_one("#log")
            assert log.max_scroll_y > 0
            log.scroll_end(animate=False)
            await pilot.pause()
            assert log.scroll_y > 0
            assert_banner(app)

    async def test_banner_carries_the_model_advisory(self, make_app):
        app = make_app()
        async with app.run_test(size=SIZE):
            text = str(app.screen.query_one(DisclaimerBanner).render())
            assert "NOT A MEDICAL MODEL" in text

    async def test_export_starts_with_the_disclaimer(self, make_app, tmp_path):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "What is localmed?")
            await pilot.press("ctrl+e")
            await pilot.pause()
            exports = list((tmp_path / "data" / "exports").glob("*.md"))
            assert len(exports) == 1
            text = exports[0].read_text()
            assert text.splitlines()[0] == f"> **{DISCLAIMER}**"
            assert DEMO_ENTRY.advisory in text
            assert "What is localmed?" in text
            assert (exports[0].stat().st_mode & 0o777) == 0o600


class TestHistory:
    async def test_nothing_is_written_when_saving_is_off(self, make_app, tmp_path):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Hi")
        data = tmp_path / "data"
        assert not data.exists() or not [p for p in data.rglob("*") if p.is_file()]

    async def test_saving_writes_private_files(self, make_app, tmp_path):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "Hi")
            await pilot.press("f5")
            await pilot.pause()
            await send(pilot, "What is localmed?")
            folder = tmp_path / "data" / "conversations"
            files = list(folder.glob("*.json"))
            assert len(files) == 1
            assert (files[0].stat().st_mode & 0o777) == 0o600
            assert (folder.stat().st_mode & 0o777) == 0o700
            assert "What is localmed?" in files[0].read_text()
            # the sidebar lists it, and opening it shows its turns
            await pilot.press("ctrl+n")
            await pilot.press("ctrl+b")
            await pilot.pause()
            history = app.screen.query_one("#history")
            assert len(history.children) == 1
            await app.screen.show_conversation(history.children[0].conversation)
            await pilot.pause()
            assert len(list(app.screen.query(MessageView))) == 4


def test_main_screen_snapshot(make_app, snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE)


def test_tui_modules_stay_small():
    for path in Path(__file__).resolve().parents[1].joinpath("tui").glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path


class TestOverlongMessages:
    """A message the context cannot hold is refused at the input: never sent, nothing shown,
    the conversation and the app intact, the text left to shorten."""

    async def paste(self, pilot, text: str) -> None:
        prompt = pilot.app.screen.query_one("#prompt")
        prompt.value = text
        await pilot.press("enter")
        await pilot.pause()
        await pilot.app.screen.workers.wait_for_complete()
        await pilot.pause()

    async def test_a_first_message_longer_than_the_context(self, make_app, no_network):
        app = make_app(n_ctx=256, params=GenerationParams(temperature=0.0, max_tokens=8))
        async with app.run_test(size=SIZE) as pilot:
            long = "The patient reports chest pain on exertion. " * 60
            await self.paste(pilot, long)
            assert isinstance(app.screen, ChatScreen)
            assert not list(app.screen.query(MessageView))
            assert app.session.conversation.messages == []
            assert app.screen.query_one("#prompt").value == long  # kept, to be shortened
            notes = [str(n.message) for n in app._notifications]
            assert any("Not sent" in n and "256-token context" in n for n in notes), notes
            # The app goes on: a short message is answered.
            await self.paste(pilot, "hello")
            assert len(replies(app)) == 1 and len(app.session.conversation.messages) == 2

    async def test_a_later_overlong_message_keeps_the_conversation(self, make_app, no_network):
        app = make_app(n_ctx=256, params=GenerationParams(temperature=0.0, max_tokens=8))
        async with app.run_test(size=SIZE) as pilot:
            await self.paste(pilot, "hello")
            before = list(app.session.conversation.messages)
            await self.paste(pilot, "Discharge summary: " + "stable vitals, " * 200)
            assert app.session.conversation.messages == before
            assert len(list(app.screen.query(MessageView))) == 2
            assert not isinstance(app.screen, ErrorScreen)


class TestEngineProcess:
    """The model runs in its own process; when that process dies the app stays up."""

    @staticmethod
    def start(which: str, gguf):
        from localmed.formats import LoadOptions
        from localmed.runtimes.batch_process import BatchClient, BatchOptions
        from localmed.runtimes.process import open_engine
        from localmed.runtimes.slot_runtime import SlotRuntime

        if which == "slot":  # the chat's engine
            return SlotRuntime(BatchClient(gguf, BatchOptions(1, 1024)))
        return open_engine(gguf, LoadOptions(n_ctx=1024))  # a GPTQ folder's

    @pytest.mark.parametrize("which", ["slot", "process"])
    async def test_the_engine_killed_mid_reply(self, smollm2, tmp_path, monkeypatch, which):
        import contextlib

        from textual.worker import WorkerFailed

        from localmed.tui.modals import EngineDiedScreen

        monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path / "data"))
        runtime = self.start(which, smollm2["gguf"])
        model = ChatModel("SmolLM2", smollm2["gguf"], None, "")
        session = ChatSession.open(model, runtime)
        session.params = GenerationParams(temperature=0.0, max_tokens=600)
        app = LocalmedApp(session)
        try:
            async with app.run_test(size=SIZE) as pilot:
                screen = app.screen
                prompt = screen.query_one("#prompt")
                prompt.value = "Write a long list of the causes of chest pain, with details."
                await pilot.press("enter")
                first_pid = runtime.pid
                while not (replies(app) and replies(app)[-1].text.strip()):
                    await pilot.pause(0.05)  # until the reply has begun on screen
                os.kill(first_pid, signal.SIGKILL)
                with contextlib.suppress(WorkerFailed):  # the app handles it; asserted below
                    await screen.workers.wait_for_complete()
                await pilot.pause()
                assert isinstance(app.screen, EngineDiedScreen)
                shown = " ".join(str(w.render()) for w in app.screen.query("Static"))
                assert "SIGKILL" in shown and "conversation is kept" in shown
                messages = session.conversation.messages
                assert messages[0].role == "user" and "chest pain" in messages[0].content
                assert messages[-1].role == "assistant" and messages[-1].content  # the part
                await pilot.press("enter")  # reload
                await pilot.pause()
                await screen.workers.wait_for_complete()
                await pilot.pause()
                assert isinstance(app.screen, ChatScreen) and not screen.engine_down
                assert runtime.alive and runtime.pid != first_pid
                session.params = GenerationParams(temperature=0.0, max_tokens=8)
                await send(pilot, "What is the capital of France?")
                assert len(session.conversation.messages) == 4
                assert session.conversation.messages[-1].content
                assert not runtime.notices()  # the dialog said it; no toast besides
        finally:
            runtime.close()

    async def test_the_engine_killed_between_replies(self, smollm2, tmp_path, monkeypatch):
        """Killed while idle: the chat's engine is loaded again at once, the next message is
        answered, and the app says what happened (the clinician may want to know of an OOM
        kill) in a notification, not a dialog."""
        monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path / "data"))
        runtime = self.start("slot", smollm2["gguf"])
        model = ChatModel("SmolLM2", smollm2["gguf"], None, "")
        session = ChatSession.open(model, runtime)
        session.params = GenerationParams(temperature=0.0, max_tokens=8)
        app = LocalmedApp(session)
        try:
            async with app.run_test(size=SIZE, notifications=True) as pilot:
                await send(pilot, "What is the capital of France?")
                first_pid = runtime.pid
                os.kill(first_pid, signal.SIGKILL)
                deadline = time.monotonic() + 60
                while runtime.pid == first_pid or not runtime.alive:
                    assert time.monotonic() < deadline
                    await pilot.pause(0.1)
                await send(pilot, "And of Spain?")
                await pilot.pause()
                assert len(session.conversation.messages) == 4
                assert session.conversation.messages[-1].content
                shown = ""
                for _ in range(50):  # the toast, once drawn
                    shown = " ".join(str(toast.render()) for toast in app.screen.query("Toast"))
                    if shown:
                        break
                    await pilot.pause(0.1)
                assert "SIGKILL" in shown and "loaded again" in shown, shown
                assert isinstance(app.screen, ChatScreen) and not app.screen.engine_down
        finally:
            runtime.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
class TestRealTerminal:
    """`localmed chat` in a tmux pane: a closed terminal or a kill mid-reply ends the app and
    its engine (the app used to keep generating, unseen, after tmux kill-server)."""

    def start(self, gguf, socket_name: str, max_tokens: int = 4000,
              env: str = "") -> tuple[list[str], int]:
        tmux = ["tmux", "-L", socket_name]
        subprocess.run([*tmux, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30",
                        f"{env} exec {sys.executable} -m localmed chat {gguf} --max-tokens "
                        f"{max_tokens} --ignore-eos --ctx 4096"], check=True)
        try:
            pid = int(subprocess.run([*tmux, "list-panes", "-t", "t", "-F", "#{pane_pid}"],
                                     capture_output=True, text=True).stdout)
            self.wait(lambda: "Ask the model" in self.screen(tmux), "the chat screen")
            subprocess.run([*tmux, "send-keys", "-t", "t", "-l", "Write a long essay."],
                           check=True)
            subprocess.run([*tmux, "send-keys", "-t", "t", "Enter"], check=True)
            self.wait(lambda: self.generating(self.screen(tmux)),
                      lambda: f"the reply to start:\n{self.screen(tmux)}")
        except BaseException:  # no app left generating unseen after the test
            subprocess.run([*tmux, "kill-server"], capture_output=True)
            raise
        return tmux, pid

    @staticmethod
    def screen(tmux: list[str]) -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"], capture_output=True,
                              text=True).stdout

    @staticmethod
    def generating(screen: str) -> bool:
        """Whether the status line (under the input box) says a reply is streaming: the
        reply's own text may say "generating" too."""
        rows = screen.splitlines()
        box_end = max((i for i, row in enumerate(rows) if row.startswith("▊▁")), default=-1)
        return "generating…" in " ".join(rows[box_end + 1:])

    @staticmethod
    def wait(condition, what, timeout: float = 60) -> None:
        """Until condition(); what: what is awaited (or a callable saying it, with the screen)."""
        end = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < end, \
                f"timed out waiting for {what() if callable(what) else what}"
            time.sleep(0.1)

    @staticmethod
    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")

    def engines_of(self, pid: int) -> list[int]:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                  text=True).stdout.split()
        return [int(c) for c in children
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    @pytest.mark.parametrize("how", ["terminal closed", "SIGTERM"])
    def test_the_app_and_its_engine_end(self, how, smollm2):
        tmux, pid = self.start(smollm2["gguf"], f"localmed-test-{os.getpid()}")
        try:
            (engine,) = self.engines_of(pid)
            if how == "SIGTERM":
                os.kill(pid, signal.SIGTERM)
            else:
                subprocess.run([*tmux, "kill-server"], check=True)
            self.wait(lambda: self.gone(pid) and self.gone(engine), "the app and engine to end",
                      timeout=30)
        finally:
            subprocess.run([*tmux, "kill-server"], capture_output=True)

    def test_the_streaming_reply_is_drawn_as_it_grows(self, smollm2, tmp_path):
        """Mid-reply, each two adjacent lines of text on the terminal are the reply's words as
        they are: a line redrawn partly, or not at all, shows a stale piece the reply lacks."""
        data = tmp_path / "data"
        tmux, _ = self.start(smollm2["gguf"], f"localmed-test-{os.getpid()}", max_tokens=400,
                               env=f"LOCALMED_DATA_DIR={data}")
        try:
            pairs: list[str] = []
            deadline = time.monotonic() + 300
            while self.generating(screen := self.screen(tmux)):
                assert time.monotonic() < deadline, "the 400-token reply never ended"
                rows = screen.splitlines()
                end = next(i for i, row in enumerate(rows) if row.startswith("▊▔"))
                # The reply's rows only: not under a notification (its border: ▌ ▎), not the
                # banner or a speaker's label, less the scrollbar (block elements).
                rows = ["" if {"▌", "▎"} & set(row) else
                        " ".join("".join(c for c in row if not "\u2580" <= c <= "\u259f").split())
                        for row in rows[1:end]]
                text = [row if row not in ("Model", "Clinician") and row not in DISCLAIMER
                        else "" for row in rows]
                pairs += [f"{a} {b}" for a, b in itertools.pairwise(text) if a and b]
                time.sleep(0.3)
            assert len(pairs) >= 10, pairs
            subprocess.run([*tmux, "send-keys", "-t", "t", "C-e"], check=True)
            self.wait(lambda: list(data.glob("exports/*.md")), "the export")
            final = " ".join(next(data.glob("exports/*.md")).read_text().split())
            for pair in pairs:
                assert pair in final, pair
        finally:
            subprocess.run([*tmux, "kill-server"], capture_output=True)
