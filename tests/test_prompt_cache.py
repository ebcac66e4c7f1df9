"""The prompt cache: slots keep their cells between requests, other conversations' cells wait
in host memory. The choice of slot and the host cache's bounds on plain token lists; then the
real engine on the real SmolLM2-135M-Instruct: a follow-up prefills only what is new and gives
the reply a whole prefill gives, an edited conversation is reused only up to the edit, and a
conversation whose slot was taken comes back from host memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from localmed.runtimes.base import GenerationParams
from localmed.runtimes.prompt_cache import (
    HostCache,
    Slot,
    choose_slot,
    common_prefix,
)

# --- choosing a slot, and the host cache's bounds ---------------------------------------------


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [1]) == 0


def test_a_prompt_goes_to_the_slot_that_holds_its_beginning():
    slots = [Slot(list(range(100)), used=3), Slot([7] * 50, used=1), Slot(used=2)]
    prompt = [*range(90), 999]
    assert choose_slot(slots, [0, 1, 2], prompt, reuse=True) == (0, 90)


def test_a_short_shared_beginning_takes_the_least_recently_used_slot_instead():
    """Another conversation with the same 5-token system prompt does not evict this one while
    an older slot is free (llama-server's 10 % similarity)."""
    system = [1, 2, 3, 4, 5]
    slots = [Slot([*system, *range(10, 200)], used=5), Slot([9] * 40, used=2)]
    prompt = [*system, *range(500, 600)]
    assert choose_slot(slots, [0, 1], prompt, reuse=True) == (1, 0)
    # a never-used slot counts as the oldest
    slots.append(Slot())
    assert choose_slot(slots, [0, 1, 2], prompt, reuse=True) == (2, 0)


def test_without_reuse_the_least_recently_used_slot_and_nothing_kept():
    slots = [Slot(list(range(100)), used=1), Slot(list(range(100)), used=2)]
    assert choose_slot(slots, [0, 1], list(range(100)), reuse=False) == (0, 0)
    assert choose_slot(slots, [1], list(range(100)), reuse=False) == (1, 0)


def test_the_host_cache_keeps_the_newest_states_within_its_bytes():
    cache = HostCache(limit=100)
    assert cache.put([1, 2, 3], b"a" * 40)
    assert cache.put([4, 5, 6], b"b" * 40)
    assert cache.put([7, 8, 9], b"c" * 40)  # over 100: the oldest goes
    assert len(cache) == 2 and cache.used == 80
    assert cache.best([1, 2, 3]) == (-1, 0)
    key, shared = cache.best([4, 5, 6, 10])
    assert shared == 3 and cache.take(key).data == b"b" * 40
    assert cache.used == 40 and len(cache) == 1
    assert not cache.put([1], b"x" * 101)  # alone over the limit: not kept
    assert len(cache) == 1


def test_a_longer_state_of_the_same_conversation_replaces_the_shorter():
    cache = HostCache(limit=1000)
    cache.put([1, 2, 3], b"a" * 10)
    cache.put([1, 2, 3, 4, 5], b"b" * 20)
    assert len(cache) == 1 and cache.used == 20
    cache.put([1, 2, 9], b"c" * 10)  # an edit: both kept
    assert len(cache) == 2


# --- the real engine -------------------------------------------------------------------------

GREEDY = GenerationParams(max_tokens=24, temperature=0)
RECORD = " ".join(f"Day {day}: sodium {121 + day % 9} mmol/L, potassium {3.4 + day % 5 / 10:.1f} "
                  "mmol/L, creatinine stable." for day in range(1, 31))


def chatml(*turns: tuple[str, str]) -> str:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + "<|im_start|>assistant\n"


def open_engine(smol: Path, **options):
    from localmed.runtimes.batch import BatchEngine

    return BatchEngine(smol, n_ctx=options.pop("n_ctx", 4096), threads=2, **options)


@pytest.fixture(scope="module")
def engine(smol) -> Iterator:
    engine = open_engine(smol, n_parallel=2, cache_ram=256 * 2**20)
    yield engine
    engine.close()


_ids = iter(range(1, 10**6))


def reply(engine, prompt: str, *, cache: bool = True, logprobs: int | None = None):
    """(text, stats, logprob entries) of one request run to its end."""
    from localmed.runtimes.messages import Request

    rid = next(_ids)
    outcomes = engine.run(Request(rid, engine.tokenize(prompt), GREEDY, logprobs=logprobs,
                                  cache_prompt=cache))
    assert list(outcomes) == [rid]
    return outcomes[rid].text, outcomes[rid].stats, outcomes[rid].logprobs


def first_logprobs(entries) -> dict[str, float]:
    return {alt.token: alt.logprob for alt in entries[0].top}


REPLY_CELLS_TOLERANCE = 0.5
"""Nats between a follow-up's first-token log probabilities from kept cells and from a whole
prefill. The cells of the model's own last reply were computed one token at a time, and
llama.cpp's CPU kernels sum a one-token batch in another order than a prefill's: measured here
up to 0.31 (SmolLM2 Q4_1), the same top token. Where the kept cells came from a prefill and
the rest is prefilled in batches too (an edit), the logits are a whole prefill's to the last
bit (asserted exactly below)."""


def close_distributions(a: dict[str, float], b: dict[str, float],
                        tolerance: float = REPLY_CELLS_TOLERANCE) -> None:
    top = max(a, key=a.__getitem__)
    assert top == max(b, key=b.__getitem__), (a, b)
    assert max(abs(a[t] - b.get(t, a[t] - 99)) for t in a) < tolerance, (a, b)


def test_a_follow_up_prefills_only_what_is_new_and_replies_as_a_whole_prefill_does(engine):
    first = chatml(("user", f"{RECORD}\nWhat is the trend in sodium?"))
    answer, stats, _ = reply(engine, first)
    assert stats.cached_tokens == 0 and answer
    follow = chatml(("user", f"{RECORD}\nWhat is the trend in sodium?"), ("assistant", answer),
                    ("user", "And potassium?"))
    n_prompt = len(engine.tokenize(follow))
    cached_text, cached, cached_entries = reply(engine, follow, logprobs=5)
    # everything up to the end of the last reply was in the cells
    assert cached.cached_tokens >= len(engine.tokenize(first)) + cached.generated_tokens // 2
    assert cached.cached_tokens < n_prompt and cached.prompt_tokens == n_prompt
    whole_text, whole, whole_entries = reply(engine, follow, cache=False, logprobs=5)
    assert whole.cached_tokens == 0
    close_distributions(first_logprobs(cached_entries), first_logprobs(whole_entries))
    assert cached_text and whole_text


def test_an_edited_conversation_is_reused_only_up_to_the_edit(engine):
    """An earlier message changed (the weight in the record): the cells up to the first
    differing token are kept, the rest prefilled, and the reply is the edited record's."""
    original = chatml(("user", f"Weight 71 kg. {RECORD}\nSummarize in one line."))
    reply(engine, original)
    edited = chatml(("user", f"Weight 17 kg. {RECORD}\nSummarize in one line."))
    shared = common_prefix(engine.tokenize(original), engine.tokenize(edited))
    assert 0 < shared < 10
    # the edit leaves too little in common with the slot (under 10 %): the other, least
    # recently used slot takes it; either way nothing past the edit is reused
    text, stats, entries = reply(engine, edited, logprobs=5)
    assert stats.cached_tokens <= shared
    whole_text, _, whole_entries = reply(engine, edited, cache=False, logprobs=5)
    assert entries == whole_entries and text == whole_text
    # an edit late in the record: reused up to it exactly
    late = chatml(("user", f"Weight 17 kg. {RECORD}\nSummarize in two lines."))
    shared = common_prefix(engine.tokenize(edited), engine.tokenize(late))
    text, stats, entries = reply(engine, late, logprobs=5)
    assert stats.cached_tokens == shared
    whole_text, _, whole_entries = reply(engine, late, cache=False, logprobs=5)
    # the kept cells are the edited prompt's prefill: the whole prefill's logits exactly
    assert entries == whole_entries and text == whole_text


def test_a_reply_cancelled_during_its_prefill_leaves_usable_cells(engine):
    """Cancelled after the first 512-token chunk of its prompt: the slot keeps those cells, and
    the same prompt asked again starts from them and is answered."""
    from localmed.runtimes.messages import Done, Request

    prompt = chatml(("user", f"Cancelled. {RECORD} {RECORD}\nSummarize."))
    tokens = engine.tokenize(prompt)
    assert len(tokens) > engine.n_batch
    engine.submit(Request(-1, tokens, GREEDY))
    assert engine.step() == []  # one chunk of the prompt, nothing generated
    [ended] = engine.cancel(-1)
    cancelled = ended.stats
    assert isinstance(ended, Done) and cancelled.stopped_by == "user" and not engine.busy
    text, stats, _ = reply(engine, prompt)
    # what its slot shared with it before (the template's first tokens), and the chunk fed
    assert stats.cached_tokens == cancelled.cached_tokens + engine.n_batch and text


def test_sequences_reach_llama_decode_in_slot_order(engine):
    """Two conversations asked again in the other order go back to their own slots, so their
    requests' order is not their slots' order; each decode's batch still lists the sequences
    by slot. (With a KV cache per sequence, llama.cpp splits a batch whose sequence ids do not
    rise one by one into several ubatches, and each reads all the weights again: served
    streams took 1.5x the time per token.)"""
    from localmed.runtimes.messages import Request

    prompts = [chatml(("user", f"Patient {case}: {RECORD[:400]} Summarize.")) for case in (1, 2)]
    for prompt in prompts:
        reply(engine, prompt)

    def held_in(prompt: str) -> int:
        tokens = engine.tokenize(prompt)
        return next(i for i, slot in enumerate(engine._slots) if slot.cells[:len(tokens)] == tokens)

    first = next(_ids)  # the conversation in the higher slot asks first
    for offset, prompt in enumerate(sorted(prompts, key=held_in, reverse=True)):
        engine.submit(Request(first + offset, engine.tokenize(prompt), GREEDY))
    seen, slots = set(), {}
    while engine.busy:
        slots |= {seq.request.id: seq.slot for seq in engine._running.values()}
        engine.step()
        batch = engine._batch
        order = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
        assert order == sorted(order), order
        seen.add(tuple(dict.fromkeys(order)))
    assert slots[first] > slots[first + 1]  # requests in the other order than their slots
    assert (0, 1) in seen  # both generating in one decode


def test_a_conversation_whose_slot_was_taken_comes_back_from_host_memory(smol):
    """One slot, three conversations in turn: the first's cells go to host memory when the
    second takes the slot, and its follow-up starts from them; without --cache-ram it is
    prefilled again."""
    for cache_ram, comes_back in ((256 * 2**20, True), (0, False)):
        engine = open_engine(smol, n_parallel=1, cache_ram=cache_ram)
        try:
            a = chatml(("user", f"Patient A. {RECORD}\nSummarize."))
            answer, _, _ = reply(engine, a)
            reply(engine, chatml(("user", f"Patient B. {RECORD} Other ward.\nSummarize.")))
            assert len(engine.host_cache) == (1 if comes_back else 0)
            follow = chatml(("user", f"Patient A. {RECORD}\nSummarize."), ("assistant", answer),
                            ("user", "Any hyponatremia?"))
            _, stats, entries = reply(engine, follow, logprobs=5)
            if comes_back:
                assert stats.cached_tokens >= len(engine.tokenize(a))
                assert len(engine.host_cache) == 1  # B's cells took A's place there
                close_distributions(first_logprobs(entries),
                                    first_logprobs(reply(engine, follow, cache=False,
                                                         logprobs=5)[2]))
            else:
                assert stats.cached_tokens < 10
        finally:
            engine.close()


def test_a_full_host_cache_drops_the_oldest_and_one_too_large_is_not_kept(smol):
    engine = open_engine(smol, n_parallel=1, cache_ram=2**20)  # under one conversation's cells
    try:
        for patient in "ABC":
            reply(engine, chatml(("user", f"Patient {patient}. {RECORD}\nSummarize.")))
        assert len(engine.host_cache) == 0 and engine.host_cache.used == 0
    finally:
        engine.close()
    probe = open_engine(smol, n_parallel=1, cache_ram=256 * 2**20)
    try:
        reply(probe, chatml(("user", f"Patient A. {RECORD}\nSummarize.")))
        reply(probe, chatml(("user", f"Patient B. {RECORD}\nSummarize.")))
        one = probe.host_cache.used
    finally:
        probe.close()
    engine = open_engine(smol, n_parallel=1, cache_ram=int(one * 2.5))  # room for two
    try:
        for patient in "ABCD":
            reply(engine, chatml(("user", f"Patient {patient}. {RECORD}\nSummarize.")))
        assert len(engine.host_cache) == 2 and engine.host_cache.used <= engine.host_cache.limit
        # A went first: its follow-up is prefilled whole; C comes back
        _, stats, _ = reply(engine, chatml(("user", f"Patient A. {RECORD}\nSummarize more.")))
        assert stats.cached_tokens < 10
        _, stats, _ = reply(engine, chatml(("user", f"Patient C. {RECORD}\nSummarize more.")))
        assert stats.cached_tokens > 100
    finally:
        engine.close()


# --- through the server, with the official openai client -------------------------------------

MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def clinic(smol) -> Iterator:
    from tests.test_serve import Server

    running = Server(smol, "--parallel", "2", "--ctx", "8192", "--threads", "2")
    yield running
    running.stop()


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=300)


def conversation(patient: str, *turns: str) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": f"Patient {patient}. {RECORD}\nSummarize."}]
    for i, text in enumerate(turns):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return messages


def ask(client, messages, **extra):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                          temperature=0, **extra)


def test_the_openai_client_sees_cached_tokens_on_a_follow_up(clinic):
    client = openai_client(clinic)
    first = ask(client, conversation("Q"))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    follow = conversation("Q", first.choices[0].message.content, "Any hyponatremia?")
    second = ask(client, follow, logprobs=True, top_logprobs=5)
    whole_logprobs = {"logprobs": True, "top_logprobs": 5}
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens
    # the same turn prefilled whole (llama-server's cache_prompt: false): the same distribution
    # for the first token, within what the last reply's cells change (above)
    whole = ask(client, follow, extra_body={"cache_prompt": False}, **whole_logprobs)
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    close_distributions(*(
        {alt.token: alt.logprob for alt in r.choices[0].logprobs.content[0].top_logprobs}
        for r in (second, whole)))
    # streamed, the last chunk's usage says it too
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=follow, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1].prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_an_edited_conversation_is_answered_as_the_edit_says(clinic):
    """The clinician corrects the first message: the reply is the corrected record's (equal to
    a whole prefill of it), and only the tokens before the edit came from the cache."""
    client = openai_client(clinic)
    first = ask(client, conversation("R"))
    follow = conversation("R", first.choices[0].message.content, "Any hyponatremia?")
    ask(client, follow)
    edited = [{"role": "user", "content": f"Patient R. Weight 52 kg. {RECORD}\nSummarize."},
              *follow[1:]]
    reply = ask(client, edited)
    # the template's system prompt and "Patient R." at most, of some 950 tokens
    assert reply.usage.prompt_tokens_details.cached_tokens < 40
    whole = ask(client, edited, extra_body={"cache_prompt": False})
    assert reply.choices[0].message.content == whole.choices[0].message.content


def test_cache_prompt_must_be_a_boolean(clinic):
    r = clinic.client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "cache_prompt": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_prompt"


def test_no_cache_prompt_prefills_every_prompt_whole(smol):
    from tests.test_serve import Server

    running = Server(smol, "--parallel", "2", "--threads", "2", "--no-cache-prompt")
    try:
        assert "every prompt is prefilled whole (--no-cache-prompt)" in running.banner()
        client = openai_client(running)
        first = ask(client, conversation("S"))
        second = ask(client, conversation("S", first.choices[0].message.content, "More?"))
        assert second.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        running.stop()


def test_an_engine_killed_with_cached_conversations_serves_the_next_follow_up(smol):
    """SIGKILL to the engine holding a conversation's cells (as the OOM killer does): the cache
    goes with it, the model is reloaded, and the follow-up is prefilled whole and answered."""
    import os
    import signal
    import time

    from tests.test_serve import Server, engine_pids

    running = Server(smol, "--parallel", "2", "--threads", "2")
    try:
        client = openai_client(running)
        first = ask(client, conversation("T"))
        [engine] = engine_pids(running.proc.pid)
        os.kill(engine, signal.SIGKILL)
        follow = conversation("T", first.choices[0].message.content, "Any hyponatremia?")
        deadline = time.monotonic() + 120
        while True:  # 503 engine_died while the model is reloaded
            r = running.client.post("/v1/chat/completions", json={
                "messages": follow, "max_tokens": 24, "temperature": 0})
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert engine_pids(running.proc.pid) != [engine]
        again = ask(client, follow)  # and the new engine keeps cells again
        assert again.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
        assert again.choices[0].message.content
    finally:
        running.stop()


def test_a_client_that_hangs_up_on_a_reply_not_streamed_frees_its_slot_at_once(smol):
    """One slot, no queue: a long non-streamed reply whose client closes the connection is
    stopped within a moment (it was generated to the end before), so the next client is
    served instead of refused with 503."""
    import json
    import select
    import socket
    import time

    from tests.test_serve import Server

    running = Server(smol, "--parallel", "1", "--queue", "0", "--threads", "2")
    try:
        body = json.dumps({"prompt": "The patient", "max_tokens": 4000, "ignore_eos": True,
                           "temperature": 0}).encode()

        def send_long_reply() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", running.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\n\r\n" + body)
            return sock

        leaving = send_long_reply()
        deadline = time.monotonic() + 60
        while running.client.post("/v1/completions", json={  # until the slot is taken
                "prompt": "Hi", "max_tokens": 1}).status_code != 503:
            assert time.monotonic() < deadline
            if select.select([leaving], [], [], 0)[0]:  # answered: a probe took the slot first
                leaving.close()
                leaving = send_long_reply()
            time.sleep(0.2)
        leaving.close()
        # the server looks every 0.25 s; the 4,000 tokens would take half a minute or more
        deadline = time.monotonic() + 5
        while (r := running.client.post("/v1/completions", json={
                "prompt": "Hi", "max_tokens": 4, "temperature": 0})).status_code == 503 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        running.stop()


SHIFT_TOLERANCE = 1.0
"""Nats between the first token's log probabilities (of the top 5 both have) from cells moved
back past left-out turns and from a whole prefill: the moved cells still carry the turns that
came before them (llama.cpp's context shift keeps that trace too). Measured 0.88 here (SmolLM2
Q4_1), the same top token."""


@pytest.mark.parametrize("reuse", [64, 0])
def test_turns_left_out_of_a_chat_keep_the_cells_after_them_only_where_asked(smol, reuse):
    """The chat leaves turns out of the middle (after the pinned record): with ``cache_reuse``
    the cells of the turns after them are moved back, and the reply is a whole prefill's within
    the tolerance; without it (``serve``), nothing past the removal is kept."""
    engine = open_engine(smol, n_parallel=1, cache_reuse=reuse)
    try:
        turns = [("user", f"{RECORD}\nWhat is the trend in sodium?"), ("assistant", "Down.")]
        for i in range(6):
            turns += [("user", f"Question {i}: what was potassium on day {i + 3}?"),
                      ("assistant", f"It was {3.4 + i / 10:.1f} mmol/L on day {i + 3}.")]
        reply(engine, chatml(*turns, ("user", "And creatinine?")))
        shorter = chatml(*turns[:2], *turns[6:], ("user", "And creatinine?"))  # 2 turns out
        tokens = engine.tokenize(shorter)
        head = len(engine.tokenize(chatml(*turns[:2]))) - 3  # (less the assistant header)
        text, stats, entries = reply(engine, shorter, logprobs=5)
        if reuse:
            assert stats.cached_tokens >= len(tokens) - 12, (stats.cached_tokens, len(tokens))
        else:
            assert head - 5 <= stats.cached_tokens <= head + 5
        whole_text, whole, whole_entries = reply(engine, shorter, cache=False, logprobs=5)
        assert whole.cached_tokens == 0 and text and whole_text
        moved, whole = first_logprobs(entries), first_logprobs(whole_entries)
        assert max(moved, key=moved.__getitem__) == max(whole, key=whole.__getitem__)
        both = moved.keys() & whole.keys()
        assert len(both) >= 3 and max(abs(moved[t] - whole[t]) for t in both) < \
            (SHIFT_TOLERANCE if reuse else 1e-9), (moved, whole)
    finally:
        engine.close()
