"""Modal screens. Each composes the disclaimer banner first, like every screen of the app."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from localmed.retrieval.store import Passage
from localmed.tui.widgets import DisclaimerBanner


class BannerModal(ModalScreen):
    """A modal with the disclaimer banner docked at the top of the screen."""

    BINDINGS = [Binding("escape", "dismiss_modal", "Close")]

    def __init__(self, advisory: str) -> None:
        super().__init__()
        self.advisory = advisory

    def compose(self) -> ComposeResult:
        yield DisclaimerBanner(self.advisory)
        with Vertical(classes="dialog"):
            yield from self.compose_dialog()

    def compose_dialog(self) -> ComposeResult:
        raise NotImplementedError

    def action_dismiss_modal(self) -> None:
        self.dismiss(None)


class TemplateScreen(BannerModal):
    """Pick the prompt template; returns its name."""

    def __init__(self, advisory: str, names: Sequence[str], current: str,
                 descriptions: dict[str, str]) -> None:
        super().__init__(advisory)
        self.names = list(names)
        self.current = current
        self.descriptions = descriptions

    def compose_dialog(self) -> ComposeResult:
        yield Label("Prompt template", classes="dialog-title")
        options = [Option(Text.assemble((name, "bold"), "  ", self.descriptions.get(name, "")),
                          id=name) for name in self.names]
        yield OptionList(*options, id="templates")
        yield Static("Enter: use it · Esc: keep the current one", classes="hint")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        if self.current in self.names:
            options.highlighted = self.names.index(self.current)
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class SystemPromptScreen(BannerModal):
    """Edit the system prompt; returns the new text."""

    BINDINGS = [Binding("ctrl+s", "save", "Save"), *BannerModal.BINDINGS]

    def __init__(self, advisory: str, text: str, folded: bool) -> None:
        super().__init__(advisory)
        self.text = text
        self.folded = folded

    def compose_dialog(self) -> ComposeResult:
        yield Label("System prompt", classes="dialog-title")
        yield TextArea(self.text, id="system-text")
        note = (" This template has no system slot: the prompt is put at the top of the first "
                "message." if self.folded else "")
        yield Static(f"Ctrl+S: save · Esc: cancel.{note}", classes="hint")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text)


class InfoScreen(BannerModal):
    """A read-only table: the model info, or the help."""

    def __init__(self, advisory: str, title: str, rows: Sequence[tuple[str, str]]) -> None:
        super().__init__(advisory)
        self.title_text = title
        self.rows = rows

    def compose_dialog(self) -> ComposeResult:
        yield Label(self.title_text, classes="dialog-title")
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, value in self.rows:
            table.add_row(key, value)
        yield Static(table)
        yield Static("Esc: close", classes="hint")


class ErrorScreen(BannerModal):
    """One clear message for something that went wrong (never a traceback)."""

    BINDINGS = [Binding("enter", "dismiss_modal", "OK"), *BannerModal.BINDINGS]

    def __init__(self, advisory: str, message: str) -> None:
        super().__init__(advisory)
        self.message = message

    def compose_dialog(self) -> ComposeResult:
        yield Label("Something went wrong", classes="dialog-title")
        yield Static(Text(self.message))
        yield Static("Enter or Esc: close", classes="hint")


class EngineDiedScreen(BannerModal):
    """The model's engine process ended; the conversation is kept. Returns True to reload."""

    BINDINGS = [Binding("enter", "reload", "Reload"), Binding("ctrl+q", "quit_app", "Quit",
                                                              priority=True),
                *BannerModal.BINDINGS]

    def __init__(self, advisory: str, message: str) -> None:
        super().__init__(advisory)
        self.message = message

    def compose_dialog(self) -> ComposeResult:
        yield Label("The model stopped", classes="dialog-title")
        yield Static(Text(self.message))
        yield Static("Your conversation is kept.", classes="hint")
        yield Static("Enter: reload the model · Esc: not now · Ctrl+Q: quit", classes="hint")

    def action_reload(self) -> None:
        self.dismiss(True)

    def action_quit_app(self) -> None:
        self.app.exit()


class ImageFileTree(DirectoryTree):
    """Folders, and the files an image-text model takes (PNG, JPEG, WebP); no hidden ones."""

    SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")
                and (p.is_dir() or p.suffix.lower() in self.SUFFIXES)]


class ImagePickerScreen(BannerModal):
    """Choose an image file for the next message; returns its path."""

    def __init__(self, advisory: str, start: Path) -> None:
        super().__init__(advisory)
        self.start = start

    def compose_dialog(self) -> ComposeResult:
        yield Label("Attach an image (PNG, JPEG, WebP)", classes="dialog-title")
        yield ImageFileTree(self.start, id="image-tree")
        yield Static("Enter: attach it · Esc: cancel · /image PATH in the message box takes "
                     "any path", classes="hint")

    def on_mount(self) -> None:
        self.query_one(ImageFileTree).focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(event.path)


class PassageScreen(BannerModal):
    """One passage a reply was given, whole: where it is (file, page, heading, characters) and
    its text, to check the reply against."""

    def __init__(self, advisory: str, number: int, passage: Passage, folder: str = "") -> None:
        super().__init__(advisory)
        self.number = number
        self.passage = passage
        self.folder = folder

    def compose_dialog(self) -> ComposeResult:
        passage = self.passage
        yield Label(f"[{self.number}] {passage.where}", classes="dialog-title")
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        where = str(Path(self.folder) / passage.source) if self.folder else passage.source
        table.add_row("file", where)
        if passage.page is not None:
            table.add_row("page", str(passage.page))
        if passage.heading:
            table.add_row("section", " > ".join(passage.heading))
        table.add_row("characters", f"{passage.start}-{passage.end} of the "
                      + ("page's" if passage.page is not None else "file's") + " text")
        yield Static(table)
        with VerticalScroll(classes="passage"):
            yield Static(Text(passage.text))
        yield Static("Esc: close", classes="hint")


class SourcesScreen(BannerModal):
    """The last reply's passages (F7); Enter opens one. Returns its number."""

    def __init__(self, advisory: str, passages: Sequence[Passage]) -> None:
        super().__init__(advisory)
        self.passages = list(passages)

    def compose_dialog(self) -> ComposeResult:
        yield Label("Sources of the last reply", classes="dialog-title")
        options = [Option(Text.assemble((f"[{n}] {p.where}", "bold"), f"  {p.first_line}"),
                          id=str(n)) for n, p in enumerate(self.passages, start=1)]
        yield OptionList(*options, id="sources")
        yield Static("Enter: read it whole · Esc: close", classes="hint")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id or 0))
