"""A real terminal for the tests: a tmux session on a server socket of its own, running one
command, read with ``capture-pane`` and typed into with ``send-keys``."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


class Terminal:
    def __init__(self, name: str, command: str, *, width: int = 100, height: int = 30,
                 env: dict[str, str] | None = None) -> None:
        self.tmux = ["tmux", "-L", name]
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "t", "-x", str(width), "-y",
                        str(height), command], env=env, check=True)

    def screen(self, *, history: bool = False) -> str:
        """What the terminal shows (with ``history``, its scrollback too)."""
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "t",
                               *(["-S", "-"] if history else [])],
                              capture_output=True, text=True).stdout

    def wait(self, condition: Callable[[str], object], what: str, timeout: float = 60, *,
             history: bool = False) -> str:
        """The screen, once ``condition(screen)`` holds; fails with it after ``timeout`` s."""
        end = time.monotonic() + timeout
        while not condition(text := self.screen(history=history)):
            assert time.monotonic() < end, f"timed out waiting for {what}:\n{text}"
            time.sleep(0.2)
        return text

    def type(self, text: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", "-l", text], check=True)

    def press(self, key: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", key], check=True)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
