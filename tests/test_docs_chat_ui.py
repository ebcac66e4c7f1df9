"""``localmed chat --docs`` as a clinician sees it: in a real terminal (tmux) and in a real
browser (Chromium driven by Playwright), with the real SmolLM2 and a real embedding model over
PubMedQA's abstracts: a cited answer with its sources listed, a passage opened whole, a flagged
citation, and "nothing in NAME on this" for a question the folder does not answer."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from localmed import cli
from localmed.conversation import DISCLAIMER
from tests.documents import pubmedqa, write_corpus
from tests.terminal import Terminal

ABSTRACTS = pubmedqa(500)[::25]
CITED = ABSTRACTS[1]
"""SmolLM2 (greedy, one passage given) cites [1] for this one…"""
MISCITED = ABSTRACTS[2]
"""…and [2] for this one, where only one passage was given: flagged."""
OFF_TOPIC = "Which nerve block suits a fractured femur after a motorcycle crash?"


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> dict:
    """A data folder with the index ``ui`` (20 abstracts, MiniLM vectors)."""
    root = tmp_path_factory.mktemp("docs-ui")
    folder = root / "bulletins"
    where = write_corpus(folder, ABSTRACTS, per_file=2)
    data = root / "data"
    previous = os.environ["LOCALMED_DATA_DIR"]
    os.environ["LOCALMED_DATA_DIR"] = str(data)
    try:
        assert cli.main(["docs", "add", str(folder), "--name", "ui", "--embed", str(minilm),
                         "--threads", "2"]) == 0
    finally:
        os.environ["LOCALMED_DATA_DIR"] = previous
    return {"folder": folder, "data": data, "where": where}


def test_a_cited_answer_in_the_terminal(ward, smollm2, tmp_path):
    env = {"LOCALMED_DATA_DIR": str(ward["data"]), "PATH": os.environ["PATH"],
           "HOME": str(tmp_path), "TERM": "xterm-256color"}
    command = (f"{sys.executable} -m localmed chat {smollm2['gguf']} --docs ui --passages 1 "
               "--max-tokens 48 --temperature 0")
    source = ward["where"][CITED.pmid][0]
    with Terminal(f"localmed-docs-{os.getpid()}", command, width=120, height=40,
                  env=env) as terminal:
        terminal.wait(lambda s: "docs: ui" in s, "the status line naming the index", 120)
        terminal.type(CITED.question)
        terminal.press("Enter")
        screen = terminal.wait(lambda s: "Sources (ui)" in s and "tok/s" in s,
                               "the reply's sources", 120)
        assert re.search(rf"\[1\] {re.escape(source)}", screen), screen
        assert DISCLAIMER[:40] in screen
        terminal.press("F7")
        terminal.wait(lambda s: "Sources of the last reply" in s, "the sources dialog")
        terminal.press("Enter")
        screen = terminal.wait(lambda s: "characters" in s, "the passage, whole")
        assert Path(source).name in screen and "Study " in screen
        assert DISCLAIMER[:40] in screen
        terminal.press("Escape")
        terminal.wait(lambda s: "characters" not in s, "the passage closed")
        terminal.press("C-n")  # a new chat: the question alone, as a clinician starts one
        terminal.wait(lambda s: "Clinician" not in s, "a new chat")
        terminal.type(MISCITED.question)
        terminal.press("Enter")
        screen = terminal.wait(lambda s: "names no passage" in s, "the flagged citation", 120)
        assert "⚠ [2] names no passage: 1 were given" in screen
        terminal.type(OFF_TOPIC)
        terminal.press("Enter")
        screen = terminal.wait(lambda s: "Not grounded" in s, "the reply marked", 120,
                               history=True)
        assert "Nothing in ui on this" in screen
        terminal.type("/docs off")
        terminal.press("Enter")
        terminal.wait(lambda s: "docs: ui" not in s.splitlines()[-1], "the index off")


def test_a_cited_answer_in_the_browser(ward, smollm2, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.test_web import CHROMIUM_ARGS, Tab, WebChat

    previous = os.environ["LOCALMED_DATA_DIR"]
    os.environ["LOCALMED_DATA_DIR"] = str(ward["data"])
    try:
        web = WebChat(smollm2["gguf"], "--docs", "ui", "--passages", "1", "--max-tokens", "48",
                      "--temperature", "0")
    finally:
        os.environ["LOCALMED_DATA_DIR"] = previous
    source = ward["where"][CITED.pmid][0]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                tab = Tab(browser, web.url)
                tab.wait_for(re.escape(DISCLAIMER[:40]), 90)
                tab.wait_for(r"docs: ui", 60)
                tab.ask(CITED.question)
                tab.wait_for(r"Sources \(ui\)", 120)
                tab.wait_for(rf"\[1\] {re.escape(source)}", 10)
                tab.page.keyboard.press("F7")
                tab.wait_for(r"Sources of the last reply", 30)
                tab.page.keyboard.press("Enter")
                tab.wait_for(r"characters", 30)
                tab.page.screenshot(path=tmp_path / "passage.png")
            finally:
                browser.close()
    finally:
        assert web.stop() == 0
    assert (tmp_path / "passage.png").stat().st_size > 10_000
