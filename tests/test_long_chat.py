"""A chat that outgrows its context twice over, on the real SmolLM2 and the chat's own engine:
the pasted record stays in the prompt, older turns go in blocks behind a stable beginning, the
engine's cache holds all but the newest turn's tokens on every turn (its cells moved back past
the dropped turns), and in a real terminal the chat says what it left out.

The time a turn takes is ``benchmarks/long_chat.py``'s (in tmux, turn by turn); here the work a
turn costs is counted instead: the prompt tokens prefilled, and the engine's tokenizer calls."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import pytest

from benchmarks.followup import record
from tests.terminal import Terminal

N_CTX = 512
REPLY = 24
RECORD = " ".join(record(3).splitlines()[:4])  # some 230 tokens: half the context
MARK = RECORD[:40]
QUESTIONS = ("What is the latest sodium?", "Any falls?", "Which drug could lower sodium?",
             "Is the heart rate regular?", "What should the GP check?")


def status(screen: str) -> str:
    """The status line: the screen's last that is not blank."""
    return next((row for row in reversed(screen.splitlines()) if row.strip()), "")


def toasts(screen: str) -> str:
    """The notifications' text: right of their left border (▌), left of their right (▎)."""
    rows = (row.rsplit("▌", 1)[1].split("▎")[0].strip("▔▁ ") for row in screen.splitlines()
            if "▌" in row)
    return " ".join(" ".join(row.split()) for row in rows if row)


def question(turn: int) -> str:
    return f"({turn}) {QUESTIONS[turn % len(QUESTIONS)]}"


@pytest.fixture
def chat(smollm2):
    from localmed.chat import ChatSession, open_runtime, resolve_chat_model
    from localmed.registry import Registry

    model = resolve_chat_model(str(smollm2["gguf"]), Registry.load())
    session = ChatSession.open(model, open_runtime(model, n_ctx=N_CTX, threads=2))
    session.params = dataclasses.replace(session.params, temperature=0.0, max_tokens=REPLY)
    yield session
    session.close()


def test_a_chat_twice_the_context_keeps_the_record_and_its_cache(chat):
    runtime = chat.runtime
    calls = []
    tokenize = runtime.tokenize

    def counted(text, add_bos=True):
        calls.append(add_bos)  # True: a whole prompt; False: one message, counted once
        return tokenize(text, add_bos=add_bos)

    runtime.tokenize = counted  # the real tokenizer, its calls counted
    turns = []
    total = 0
    number = 0
    counted_messages = 0
    while total < 2 * N_CTX:
        whole = len(calls)
        text = f"{RECORD} What brought her in?" if number == 0 else question(number)
        list(chat.ask(text))
        prompt, stats = chat.last_prompt, chat.stats
        turns.append((prompt, stats.prompt_tokens - stats.cached_tokens, sum(calls[whole:])))
        counted_messages += calls[whole:].count(False)
        total = sum(chat.runtime.count_tokens(m.content, add_bos=False)
                    for m in chat.conversation.messages)
        number += 1
    assert any(prompt.dropped_turns for prompt, _, _ in turns), "the chat never outgrew it"
    blocks = {prompt.start for prompt, _, _ in turns if prompt.dropped_turns}
    assert len(blocks) < sum(1 for prompt, _, _ in turns if prompt.dropped_turns), \
        "turns were dropped on every turn, not in blocks"
    second = turns[1][1]
    for number, (prompt, prefilled, tokenized) in enumerate(turns[1:], 2):
        assert MARK in prompt.text and prompt.first_kept, f"turn {number}: the record went"
        # The new question, the last reply (its text tokenized afresh) and the template's
        # tokens around them: nothing before them prefilled again.
        assert prefilled <= max(1.5 * second, 2 * REPLY), \
            f"turn {number} prefilled {prefilled} tokens (turn 2: {second}); {turns}"
        # The whole prompt is counted once (once more on a turn that drops a block), and
        # the request is made of those tokens (the runtime keeps the last prompts').
        fits = 1 + (prompt.start != turns[number - 2][0].start)
        assert tokenized <= fits + 1, f"turn {number}: the prompt was tokenized {tokenized} times"
    messages = len(chat.conversation.messages)
    assert counted_messages <= messages, f"{counted_messages} counts of {messages} messages"


def test_the_record_goes_only_when_the_newest_message_needs_its_room(chat):
    list(chat.ask(f"{RECORD} What brought her in?"))
    long = "Her daughter adds that she has been more confused each evening. " * 22
    list(chat.ask(long))
    assert not chat.last_prompt.first_kept and MARK not in chat.last_prompt.text
    assert chat.last_prompt.dropped_turns == 2
    list(chat.ask("Any falls?"))  # the record is back once there is room
    assert chat.last_prompt.first_kept and MARK in chat.last_prompt.text


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_in_the_terminal_the_chat_says_what_it_left_out(smollm2, tmp_path):
    command = (f"LOCALMED_DATA_DIR={tmp_path} exec {sys.executable} -m localmed chat "
               f"{smollm2['gguf']} --ctx {N_CTX} --max-tokens {REPLY} --temperature 0")
    with Terminal(f"localmed-long-{os.getpid()}", command, width=120, height=40) as term:
        term.wait(lambda s: "tok/s" in status(s), "the chat", timeout=120)
        seen = ""
        for number in range(40):
            before = status(term.screen())
            term.type(f"{RECORD} What brought her in?" if number == 0 else question(number))
            term.press("Enter")
            screen = term.wait(lambda s, before=before: "generating" not in status(s) != before,
                               "the reply")
            seen = toasts(screen)
            if "outgrew" in seen:
                break
        assert "outgrew the 512-token context" in seen, seen
        assert "your first message and its answer are kept" in seen, seen
        term.type(question(41))
        term.press("Enter")
        term.wait(lambda s: "(41)" in s and "generating" not in status(s),
                  "a reply after the drop")
