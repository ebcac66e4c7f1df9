"""The llama.cpp Runtime and the chat session core, on real tiny GGUFs."""

from __future__ import annotations

import threading

import pytest

from localmed.chat import ChatModel, ChatSession
from localmed.conversation import Conversation, HistoryStore, fit_prompt
from localmed.errors import ContextFullError
from localmed.runtimes.base import GenerationParams, StopStringFilter, batched
from localmed.runtimes.local import LocalRuntime
from localmed.templates import Message, get_template


@pytest.fixture(scope="module")
def demo_runtime(demo_gguf, cpu_machine):
    runtime = LocalRuntime.load(demo_gguf, hardware=cpu_machine)
    yield runtime
    runtime.close()


def test_stream_yields_the_reply_and_counts(demo_runtime):
    alpaca = get_template("alpaca")
    prompt = alpaca.render([Message("user", "How do I stop a reply?")],
                           system="You are the localmed demo.")
    text = "".join(demo_runtime.stream(prompt, GenerationParams(temperature=0.0),
                                       stop=alpaca.stop))
    stats = demo_runtime.last_stats
    assert "Escape" in text  # the demo learned its answer
    assert stats.stopped_by == "eos"
    assert stats.prompt_tokens == demo_runtime.count_tokens(prompt)
    assert stats.generated_tokens > 5 and stats.decode_tps > 0


def test_max_tokens_ends_with_length(demo_runtime):
    text = "".join(demo_runtime.stream("### Instruction:\nWhat is localmed?\n\n### Response:\n",
                                       GenerationParams(max_tokens=3, temperature=0.0)))
    assert demo_runtime.last_stats.generated_tokens == 3
    assert demo_runtime.last_stats.stopped_by == "length"
    assert text


def test_stop_from_another_thread_ends_a_long_generation(converted, cpu_machine):
    runtime = LocalRuntime.load(converted["llama"]["Q8_0"], n_ctx=4096, hardware=cpu_machine)
    pieces: list[str] = []
    try:
        for piece in runtime.stream("The patient", GenerationParams(max_tokens=4000)):
            pieces.append(piece)
            if len(pieces) == 5:
                threading.Thread(target=runtime.stop).start()
        stats = runtime.last_stats
        assert stats.stopped_by == "user"
        assert stats.generated_tokens < 50
    finally:
        runtime.close()


SCORE_TOLERANCE = 1e-3
"""Logits of the engine's scoring against llama-cpp-python's own ``Llama`` (flash attention on
in both, as localmed plans it on a CPU): the same llama.cpp, the same batches."""


def test_scoring_on_the_engine_equals_llama_cpp_pythons_logits(smol):
    """bench scores on the multi-sequence engine: each position's logits are
    ``llama_cpp.Llama``'s (``logits_all``), and so are the next-token logits after a kept
    few-shot prefix (which differ from a whole prefill's by up to 0.7 here, in llama.cpp's
    own ``Llama`` as much: the rest is a batch of another shape; the same top token)."""
    import llama_cpp
    import numpy as np

    runtime = LocalRuntime.load(smol, n_ctx=1024, threads=2)
    llm = llama_cpp.Llama(str(smol), n_ctx=1024, n_threads=2, logits_all=True, verbose=False,
                          flash_attn=True)
    try:
        shots = "Question: Which organ makes insulin?\nAnswer: the pancreas\n\n" * 6
        first = runtime.tokenize(shots + "Question: Which drug lowers sodium?\nAnswer:")
        second = runtime.tokenize(shots + "Question: What does furosemide do?\nAnswer:")
        llm.eval(second)
        reference = np.array(llm.scores[:len(second)], dtype=np.float32)
        whole = runtime.sequence_logits(second)
        assert whole.shape == reference.shape
        assert np.abs(whole - reference).max() < SCORE_TOLERANCE
        runtime.next_logits(first)
        kept = runtime.next_logits(second)  # the shots' cells kept from the first question
        shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False))
                      if a != b)
        llm.reset()
        llm.eval(first)
        llm.n_tokens = shared  # llama-cpp-python's own reuse of the shared prefix
        llm.eval(second[shared:])
        reused = np.array(llm.scores[len(second) - 1], dtype=np.float32)
        assert np.abs(kept - reused).max() < SCORE_TOLERANCE
        assert int(kept.argmax()) == int(reference[-1].argmax())
    finally:
        llm.close()
        runtime.close()


def test_scoring_waits_for_no_reply_and_refuses_what_does_not_fit(demo_runtime):
    from localmed.errors import EngineError

    too_long = [1] * (demo_runtime.n_ctx + 1)
    with pytest.raises(ContextFullError, match=f"{demo_runtime.n_ctx}-token context"):
        demo_runtime.next_logits(too_long)
    stream = demo_runtime.stream("### Instruction:\nWhat is localmed?\n\n### Response:\n",
                                 GenerationParams(max_tokens=50, temperature=0.0))
    next(stream)  # a reply is running
    with pytest.raises(EngineError, match="between replies"):
        demo_runtime.next_logits([1, 2, 3])
    stream.close()  # left midway: cancelled
    assert demo_runtime.next_logits([1, 2, 3]).shape[0] > 3


def test_prompt_longer_than_context_is_a_clear_error(demo_runtime):
    with pytest.raises(ContextFullError, match="context holds 512"):
        list(demo_runtime.stream("word " * 2000))


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["<|im_end|>"])
    assert f.feed("Hello <|im") == "Hello "
    assert f.feed("_e") == ""
    assert f.feed("nd|> ignored") == ""
    assert f.hit and f.flush() == ""
    g = StopStringFilter(["###"])
    assert g.feed("a #") == "a "
    assert g.feed("b") == "#b"
    assert g.flush() == ""


def chat_of(turns: int) -> Conversation:
    conv = Conversation(model="m", template="chatml", system="SYSTEM PROMPT")
    conv.add("user", "RECORD " + "r " * 40)
    conv.add("assistant", "answer to the record")
    for i in range(1, turns):
        conv.add("user", f"question {i} " + "x " * 40)
        conv.add("assistant", f"answer {i} " + "y " * 40)
    conv.add("user", "last question")
    return conv


def fit(conv: Conversation, n_ctx: int, reserve: int = 50, start: int = 0):
    chatml = get_template("chatml")
    counted: list[str] = []

    def count(text: str) -> int:  # one "token" per character keeps the arithmetic visible
        counted.append(text)
        return len(text)

    prompt = fit_prompt(chatml, conv, count, n_ctx, reserve,
                        size=lambda i: len(conv.messages[i].content) + 25, start=start)
    return prompt, counted


def test_later_turns_are_dropped_in_a_block_and_the_first_exchange_kept():
    chatml = get_template("chatml")
    conv = chat_of(6)
    full = len(chatml.render(conv.messages, system=conv.system))
    prompt, counted = fit(conv, n_ctx=full - 100 + 50)
    assert "SYSTEM PROMPT" in prompt.text and "RECORD" in prompt.text and prompt.first_kept
    assert "question 1 " not in prompt.text and "last question" in prompt.text
    # A block: the 100 over and a quarter of the room beside the record, in one re-fit.
    assert prompt.dropped_turns == 4 and prompt.start == 6 and len(counted) == 2
    assert prompt.tokens <= full - 100 - (full - 100 - 120) // 4 + 200


def test_the_next_turn_keeps_the_same_beginning():
    conv = chat_of(6)
    first, _ = fit(conv, n_ctx=900)
    conv.add("assistant", "short")
    conv.add("user", "next")
    second, counted = fit(conv, n_ctx=900, start=first.start)
    assert second.start == first.start and len(counted) == 1  # one render, one count
    assert second.text.startswith(first.text[:-len("<|im_start|>assistant\n")])


def test_the_first_exchange_goes_only_when_the_newest_message_needs_its_room():
    conv = chat_of(6)
    conv.messages[-1] = Message("user", "long " * 60)
    prompt, _ = fit(conv, n_ctx=480)
    assert not prompt.first_kept and "RECORD" not in prompt.text
    assert prompt.dropped_turns == 12 and "long long" in prompt.text
    with pytest.raises(ContextFullError, match="do not fit the 200-token context"):
        fit(conv, n_ctx=200)


def test_session_records_turns_and_saves_only_when_asked(demo_runtime, demo_gguf, tmp_path):
    from localmed.demo import DEMO_ENTRY

    model = ChatModel("demo", demo_gguf, DEMO_ENTRY, DEMO_ENTRY.advisory)
    store = HistoryStore(tmp_path / "conversations")
    session = ChatSession.open(model, demo_runtime)
    session.history = store
    reply = "".join(session.ask("What is localmed?"))
    assert session.conversation.messages[-1].content == reply.strip()
    assert not store.folder.exists()
    path = session.set_saving(True)
    assert path is not None and (path.stat().st_mode & 0o777) == 0o600
    assert (store.folder.stat().st_mode & 0o777) == 0o700
    assert store.list()[0].messages == session.conversation.messages


def test_batched_joins_what_comes_within_the_interval():
    pieces = ["The", " patient", " has", " chest", " pain"]
    assert list(batched(pieces, 0)) == pieces
    assert list(batched(iter(pieces), 60)) == ["The patient has chest pain"]
    assert list(batched([], 0.1)) == []
