"""`localmed serve` for several clients at once, through the official `openai` client, on the
real SmolLM2-135M-Instruct: replies decoded together equal each reply alone, refusals come at
once while others stream, the queue is bounded and first-come, and the OpenAI fields localmed
honours (seed, response_format) do what they say while those it does not are refused by name."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.test_serve import Server, engine_pids

GREEDY = {"temperature": 0}
ALONE = {**GREEDY, "extra_body": {"cache_prompt": False}}
"""Greedy, the prompt prefilled whole: a reply that depends on its request alone (the prompt
cache's kept cells change the last digits: tests/test_prompt_cache.py)."""
QUESTIONS = ["What is hypertension?", "Name three antibiotics.", "What does the liver do?",
             "Define sepsis in one sentence."]


def client_of(server: Server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120, **kwargs)


@pytest.fixture(scope="module")
def ward(smol) -> Iterator[Server]:
    running = Server(smol, "--parallel", "4", "--ctx", "4096", "--threads", "2")
    yield running
    running.stop()


def ask(client: openai.OpenAI, question: str, **extra) -> str:
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": question}],
        max_tokens=40, **{**ALONE, **extra})
    return reply.choices[0].message.content


def stream_text(client: openai.OpenAI, question: str, **extra) -> str:
    parts = []
    for chunk in client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1",
            messages=[{"role": "user", "content": question}], max_tokens=40, stream=True,
            **{**ALONE, **extra}):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def banner_of(model, *args: str) -> str:
    running = Server(model, *args)
    try:
        return running.banner()
    finally:
        running.stop()


def test_the_banner_says_how_the_context_is_split(smol):
    said = banner_of(smol, "--parallel", "3", "--ctx", "3000")
    assert "3 replies at once, 1024 tokens each" in said, said
    assert "llama-server -np 3 -c 3072" in said, said
    assert "up to 16 more requests wait" in said, said
    assert "MiB of host memory keep those whose slot another took (--cache-ram)" in said, said
    said = banner_of(smol, "--parallel", "2", "--cache-ram", "0")
    assert "one whose slot another took is prefilled again (--cache-ram 0)" in said, said


def test_four_streams_at_once_each_equal_the_request_alone(ward):
    """Prefilled whole (``cache_prompt: false``, as ``ask`` and ``stream_text`` ask), a reply
    depends on its request alone: the others decoding beside it change nothing."""
    client = client_of(ward)
    alone = [stream_text(client, q) for q in QUESTIONS]
    assert all(alone) and len(set(alone)) == 4
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: stream_text(client, q), QUESTIONS))
    assert together == alone
    # and the same again without streaming, all at once
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda q: ask(client, q), QUESTIONS)) == alone


def test_a_reply_equals_what_llama_cpp_python_gives(ward, smol):
    """The engine samples with llama_cpp.Llama's chain: greedy serve (its default repeat
    penalty, 1.1) == ``llama_cpp.Llama``'s own completion of the same prompt."""
    import llama_cpp

    from localmed.formats.gguf import read_gguf_info
    from localmed.runtimes.base import GenerationParams
    from localmed.templates import Message, gguf_template

    info = read_gguf_info(smol)
    template = gguf_template(info.chat_template, bos_token=info.bos_token,
                             eos_token=info.eos_token, add_bos=info.add_bos)
    params = GenerationParams(max_tokens=40, temperature=0)
    # flash attention as the server's plan has it on a CPU (llama-cpp-python's default: off)
    llm = llama_cpp.Llama(str(smol), n_ctx=1024, n_threads=2, verbose=False, flash_attn=True)
    try:
        prompt = template.render([Message("user", QUESTIONS[0])])
        tokens = llm.tokenize(prompt.encode(), add_bos=info.add_bos, special=True)
        out: list[int] = []
        for token in llm.generate(tokens, top_k=params.top_k, top_p=params.top_p,
                                  min_p=params.min_p, temp=0.0,
                                  repeat_penalty=params.repeat_penalty, reset=True):
            if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token) \
                    or len(out) == params.max_tokens:
                break
            out.append(token)
        expected = llm.detokenize(out).decode()
        for stop in template.stop:  # (the text before a stop string)
            expected = expected.split(stop)[0]
    finally:
        llm.close()
    assert expected and ask(client_of(ward), QUESTIONS[0]) == expected


def test_logprobs_are_the_models_own_as_llama_cpp_reports_them(ward, smol):
    """Each token's log probability and its top alternatives, against llama_cpp.Llama's own
    ``logprobs`` for the same prompt (the reference: llama-cpp-python's log-softmax of the
    logits), greedy; the tokens spell the reply, streamed or not."""
    import llama_cpp

    from localmed.formats.gguf import read_gguf_info
    from localmed.templates import Message, gguf_template

    client = client_of(ward)
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=16, logprobs=True, top_logprobs=3, **ALONE)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 16
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely one
        assert [t.logprob for t in entry.top_logprobs] == \
            sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode() == entry.token

    info = read_gguf_info(smol)
    template = gguf_template(info.chat_template, bos_token=info.bos_token,
                             eos_token=info.eos_token, add_bos=info.add_bos)
    # llama.cpp's flash attention as the engine sets it (auto: on where the device has it)
    llm = llama_cpp.Llama(str(smol), n_ctx=1024, n_threads=2, logits_all=True, verbose=False,
                          flash_attn=True)
    try:
        reference = llm.create_completion(template.render([Message("user", QUESTIONS[1])]),
                                          max_tokens=16, temperature=0, logprobs=3)
    finally:
        llm.close()
    ref = reference["choices"][0]["logprobs"]
    assert [e.token for e in content] == ref["tokens"]
    assert [e.logprob for e in content] == pytest.approx(ref["token_logprobs"], abs=2e-3)
    for entry, alternatives in zip(content, ref["top_logprobs"], strict=True):
        assert {t.token: t.logprob for t in entry.top_logprobs} == \
            pytest.approx(alternatives, abs=2e-3)

    tokens, text = [], []
    for chunk in client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": QUESTIONS[1]}],
            max_tokens=16, logprobs=True, stream=True, **ALONE):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += [e.token for e in chunk.choices[0].logprobs.content]
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert "".join(text) == reply.choices[0].message.content == "".join(tokens)


def test_logprobs_leave_out_the_tokens_of_a_stop_string_that_was_cut(ward):
    client = client_of(ward)
    full = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=24, **ALONE).choices[0].message.content
    stop = full.split()[3]  # a word inside the reply
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=24, stop=[stop], logprobs=True, **ALONE)
    text = reply.choices[0].message.content
    assert stop not in text and full.startswith(text)
    tokens = [e.token for e in reply.choices[0].logprobs.content]
    # every token whose text was sent, the last one perhaps reaching into the stop string,
    # and none wholly inside it
    assert "".join(tokens).startswith(text) and len("".join(tokens[:-1])) < len(text)


def test_logprobs_on_legacy_completions_are_refused_by_name(ward):
    with pytest.raises(openai.BadRequestError) as refused:
        client_of(ward).completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="The",
                                           max_tokens=2, logprobs=2)
    assert refused.value.param == "logprobs" and "/v1/chat/completions" in refused.value.message


def test_an_over_long_prompt_is_refused_while_another_reply_streams(ward):
    client = client_of(ward)
    streaming, refused_at, finished_at = threading.Event(), [], []

    def long_reply() -> None:
        with httpx.stream("POST", f"{ward.url}/v1/completions", timeout=120, json={
                "prompt": "The patient", "max_tokens": 600, "ignore_eos": True,
                "stream": True, **GREEDY}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    streaming.set()
        finished_at.append(time.monotonic())

    worker = threading.Thread(target=long_reply)
    worker.start()
    assert streaming.wait(60)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, "blood pressure " * 1200)
    refused_at.append(time.monotonic())
    worker.join(120)
    assert refused.value.code == "context_length_exceeded"
    assert "1024 tokens of context" in refused.value.message
    assert refused_at[0] < finished_at[0], "the 400 waited for the running reply"


def test_beyond_parallel_and_queue_it_is_503_at_once(smol):
    running = Server(smol, "--parallel", "1", "--queue", "1", "--threads", "2")
    try:
        def one(_: int) -> tuple[int, float, str | None]:
            start = time.monotonic()
            r = httpx.post(f"{running.url}/v1/completions", timeout=120, json={
                "prompt": "The patient", "max_tokens": 64, "ignore_eos": True, **GREEDY})
            return r.status_code, time.monotonic() - start, r.headers.get("Retry-After")

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, range(20)))
    finally:
        running.stop()
    served = [a for a in answers if a[0] == 200]
    busy = [a for a in answers if a[0] == 503]
    assert len(served) + len(busy) == 20, answers
    assert 2 <= len(served) < 20 and busy, answers
    assert all(retry == "1" for _, _, retry in busy)
    # refused at once: before even one reply of 64 tokens was done
    assert max(seconds for _, seconds, _ in busy) < min(seconds for _, seconds, _ in served)


def test_requests_start_in_arrival_order(smol):
    running = Server(smol, "--parallel", "1", "--queue", "8", "--threads", "2")
    finished: list[int] = []
    try:
        def one(i: int) -> None:
            httpx.post(f"{running.url}/v1/completions", timeout=120, json={
                "prompt": f"Patient {i}", "max_tokens": 24, "ignore_eos": True, **GREEDY})
            finished.append(i)

        threads = []
        for i in range(5):
            threads.append(threading.Thread(target=one, args=(i,)))
            threads[-1].start()
            time.sleep(0.3)  # each admitted before the next arrives
        for thread in threads:
            thread.join(120)
    finally:
        running.stop()
    assert finished == [0, 1, 2, 3, 4]


def test_the_same_seed_gives_the_same_reply(ward):
    client = client_of(ward)
    hot = {"temperature": 1.0, "top_p": 1.0}
    first = ask(client, QUESTIONS[1], seed=1234, **hot)
    assert ask(client, QUESTIONS[1], seed=1234, **hot) == first
    others = {ask(client, QUESTIONS[1], seed=s, **hot) for s in (1, 2, 3)}
    assert others != {first}


SCHEMA = {"type": "object",
          "properties": {"drug": {"type": "string"}, "dose_mg": {"type": "integer"},
                         "route": {"type": "string", "enum": ["oral", "iv", "im"]}},
          "required": ["drug", "dose_mg", "route"], "additionalProperties": False}


def test_json_schema_replies_parse_and_validate(ward):
    reply = client_of(ward).chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", max_tokens=120, temperature=0,
        messages=[{"role": "user", "content": "Discharge note: amoxicillin 500 mg by mouth "
                   "three times a day. Give the drug, dose and route as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "medication", "schema": SCHEMA}})
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"drug", "dose_mg", "route"}
    assert isinstance(data["drug"], str) and isinstance(data["dose_mg"], int)
    assert not isinstance(data["dose_mg"], bool) and data["route"] in ("oral", "iv", "im")


def test_json_object_mode_gives_json(ward):
    reply = client_of(ward).chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", max_tokens=80, temperature=0,
        messages=[{"role": "user", "content": "List two symptoms of flu as JSON."}],
        response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), (dict, list))


def test_two_user_messages_in_a_row_are_answered(ward):
    """SmolLM2's embedded template takes them as they are."""
    reply = client_of(ward).chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", max_tokens=20, temperature=0,
        messages=[{"role": "user", "content": "I have a headache."},
                  {"role": "user", "content": "What should I take?"}])
    assert reply.choices[0].message.content


def test_consecutive_roles_are_merged_for_a_template_that_wants_turns_to_alternate(smol):
    running = Server(smol, "--template", "mistral", "--threads", "2")
    try:
        client = client_of(running)
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": "I have a headache."},
                      {"role": "user", "content": "What should I take?"}])
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError) as refused:  # no merge makes this valid
            client.chat.completions.create(
                model="SmolLM2-135M-Instruct.Q4_1", max_tokens=8,
                messages=[{"role": "assistant", "content": "Hello."}])
        assert "expected 'user'" in refused.value.message
    finally:
        running.stop()


BAD_REQUESTS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"n": 2}, "n"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
      "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"seed": "twelve"}, "seed"),
    ({"temperature": 7}, "temperature"),
    ({"frequency_penalty": 9}, "frequency_penalty"),
]


@pytest.mark.parametrize(("extra", "param"), BAD_REQUESTS,
                         ids=[next(iter(e)) + str(i) for i, (e, _) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_a_400_naming_it(ward, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client_of(ward), "Hello", **extra)
    assert refused.value.status_code == 400
    assert refused.value.param == param, refused.value.body
    if param.endswith(".schema"):
        assert "cannot turn this JSON schema into a grammar" in refused.value.message


def test_every_bad_request_leaves_the_server_serving_and_never_500(ward):
    client = client_of(ward)
    raw = httpx.post(f"{ward.url}/v1/chat/completions", content=b"{not json",
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    # a client that hangs up mid-stream: its reply stops, the others are not touched
    with httpx.stream("POST", f"{ward.url}/v1/completions", timeout=60, json={
            "prompt": "The patient", "max_tokens": 400, "ignore_eos": True, "stream": True,
            **GREEDY}) as r:
        next(r.iter_lines())
    for extra, _ in BAD_REQUESTS:
        with pytest.raises(openai.BadRequestError):
            ask(client, "Hello", **extra)
    assert ask(client, QUESTIONS[0]) == ask(client, QUESTIONS[0])


def test_an_engine_killed_under_several_streams_answers_each_and_serves_the_next(smol):
    running = Server(smol, "--parallel", "3", "--threads", "2")
    try:
        [engine] = engine_pids(running.proc.pid)
        started, events = threading.Barrier(4), []

        def long_stream() -> None:
            with httpx.stream("POST", f"{running.url}/v1/completions", timeout=120, json={
                    "prompt": "The patient", "max_tokens": 2000, "ignore_eos": True,
                    "stream": True, **GREEDY}) as r:
                lines = (line for line in r.iter_lines() if line.startswith("data: "))
                next(lines)
                started.wait(60)
                events.append(list(lines))

        threads = [threading.Thread(target=long_stream) for _ in range(3)]
        for thread in threads:
            thread.start()
        started.wait(60)
        os.kill(engine, signal.SIGKILL)
        for thread in threads:
            thread.join(120)
        assert len(events) == 3
        for lines in events:
            assert any("engine_died" in line for line in lines), lines[-3:]
        assert ask(client_of(running), QUESTIONS[0])
    finally:
        running.stop()


def test_three_hundred_idle_connections_do_not_delay_a_real_client(ward):
    """Connections opened and left silent (a misbehaving script, a scanner) hold no thread and
    no slot: a real client beside 300 of them is answered in its usual time, on a kept-alive
    connection, and a slow body is not waited for past its deadline."""
    import socket

    client = client_of(ward)
    ask(client, QUESTIONS[2])  # warm
    started = time.monotonic()
    expected = ask(client, QUESTIONS[2])
    usual = time.monotonic() - started
    idle = [socket.create_connection(("127.0.0.1", ward.port)) for _ in range(300)]
    try:
        half = idle[0]  # one that sent headers and half its body
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        assert ask(client, QUESTIONS[2]) == expected
        assert time.monotonic() - started < 2 * usual + 1.0
        with httpx.Client(base_url=ward.url, timeout=60) as kept:  # one connection, reused
            for _ in range(3):
                assert kept.get("/health").status_code == 200
    finally:
        for sock in idle:
            sock.close()
