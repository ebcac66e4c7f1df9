"""The engine processes: a real tiny GGUF loaded in a spawned process behind the Runtime
interface — the same stream, stop, tokens and errors as in-process, and a death said in words.
Each test runs on both: the multi-sequence engine that chat and serve run (one conversation of
it, :class:`SlotRuntime`), and the generic engine process that runs a GPTQ folder's
transformers (here with llama.cpp's in-process runtime inside it)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from localmed.errors import ContextFullError, EngineDiedError, GGUFFileError, ModelTooLargeError
from localmed.formats import LoadOptions, load_runtime
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.batch_process import BatchClient, BatchOptions
from localmed.runtimes.process import open_engine
from localmed.runtimes.slot_runtime import SlotRuntime

GREEDY = GenerationParams(temperature=0.0, max_tokens=24)
ENGINES = ("slot", "process")


def start(which, path, n_ctx=None):
    if which == "slot":
        return SlotRuntime(BatchClient(path, BatchOptions(1, n_ctx)))
    return open_engine(path, LoadOptions(n_ctx=n_ctx))


@pytest.fixture(scope="module")
def tiny(converted):
    return converted["llama"]["Q8_0"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(tiny, request):
    runtime = start(request.param, tiny, 256)
    yield runtime
    runtime.close()


def test_it_streams_what_the_model_in_process_streams(engine, tiny):
    local = load_runtime(tiny, LoadOptions(n_ctx=256))
    try:
        expected = "".join(local.stream("The patient", GREEDY))
        assert local.tokenize("chest pain") == engine.tokenize("chest pain")
    finally:
        local.close()
    assert "".join(engine.stream("The patient", GREEDY)) == expected
    assert engine.last_stats.generated_tokens == 24 and engine.last_stats.prompt_tokens > 1
    assert engine.info.path == tiny and engine.n_ctx == 256 and engine.pid != os.getpid()


def test_stop_ends_the_reply_after_the_current_token(engine):
    params = GenerationParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    pieces = []
    for piece in engine.stream("The patient", params):
        pieces.append(piece)
        engine.stop()
    assert engine.last_stats.stopped_by == "user"
    assert engine.last_stats.generated_tokens < 200


def test_text_is_sent_in_batches_of_the_interval_asked_for(tiny):
    engine = open_engine(tiny, LoadOptions(n_ctx=256))  # (the batch engine's is fixed at start)
    params = GenerationParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    try:
        engine.batch_seconds = 0.0
        per_token = list(engine.stream("The patient", params))
        engine.batch_seconds = 0.25
        batched = list(engine.stream("The patient", params))
    finally:
        engine.close()
    assert "".join(batched) == "".join(per_token)
    assert len(per_token) >= 110  # a piece per token (a split character waits for the next)
    assert len(batched) < 30, len(batched)


def test_a_reply_left_midway_does_not_leak_into_the_next(engine):
    params = GenerationParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    stream = engine.stream("The patient", params)
    next(stream)
    stream.close()  # the caller walks away after the first piece
    assert "".join(engine.stream("The patient", GREEDY)) == \
        "".join(engine.stream("The patient", GREEDY))
    assert engine.last_stats.generated_tokens == 24


def test_errors_cross_with_their_type_and_data(engine, tiny, tmp_path):
    which = "slot" if isinstance(engine, SlotRuntime) else "process"
    with pytest.raises(ContextFullError, match="256"):
        list(engine.stream("fever " * 400, GREEDY))
    # the engine goes on after a refused request
    assert "".join(engine.stream("Cough", GREEDY))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny.read_bytes()[:4096])
    with pytest.raises(GGUFFileError, match=r"broken\.gguf"):
        start(which, broken)
    with pytest.raises(ModelTooLargeError) as refused:
        start(which, tiny, 100_000_000)
    assert refused.value.plan is not None and not refused.value.plan.fits


@pytest.mark.parametrize("which", ENGINES)
@pytest.mark.parametrize(("sig", "words"), [(signal.SIGILL, "an instruction this CPU lacks"),
                                            (signal.SIGKILL, "killed (out of memory?)"),
                                            (signal.SIGABRT, "llama.cpp aborted")])
def test_a_death_is_said_in_words_and_a_restart_brings_it_back(tiny, which, sig, words):
    """The engine dies with a request on its way (held stopped while the request is sent, so
    it cannot answer first): that request hears why, in words; a restart brings it back."""
    runtime = start(which, tiny, 256)
    failed: list[BaseException] = []

    def ask() -> None:
        try:
            list(runtime.stream("The patient", GREEDY))
        except BaseException as exc:
            failed.append(exc)

    try:
        os.kill(runtime.pid, signal.SIGSTOP)
        asking = threading.Thread(target=ask)
        asking.start()
        asking.join(0.5)
        os.kill(runtime.pid, sig)
        os.kill(runtime.pid, signal.SIGCONT)
        asking.join(60)
        assert len(failed) == 1 and isinstance(failed[0], EngineDiedError), failed
        assert f"{signal.Signals(sig).name}, {words}" in str(failed[0])
        runtime.restart()
        assert runtime.alive and "".join(runtime.stream("The patient", GREEDY))
    finally:
        runtime.close()


@pytest.mark.parametrize("which", ENGINES)
def test_close_ends_the_engine_process_by_itself(tiny, which):
    """Asked to close, the engine ends on its own at once (exit status 0), not killed after the
    10 s grace (its protocol's close message must be the one sent)."""
    runtime = start(which, tiny, 256)
    supervisor = runtime.client._supervisor if which == "slot" else runtime._supervisor
    process = supervisor.engine.process
    runtime.close()
    assert process.exitcode == 0


@pytest.mark.parametrize("which", ENGINES)
def test_one_reload_policy_a_death_reloads_at_once_and_a_failed_reload_is_tried_again(
        tiny, which, tmp_path):
    """Both engines are supervised alike: a death is followed at once by a reload, before the
    request in it hears why (its next request just works). Where that reload fails (the model
    file gone), requests are refused at once, and revive() (what the server calls when one
    is) loads it again in the background once the file is back."""
    model = tmp_path / "model.gguf"
    model.write_bytes(tiny.read_bytes())
    runtime = start(which, model, 256)
    try:
        first = runtime.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(EngineDiedError):
            list(runtime.stream("The patient", GREEDY))
        deadline = time.monotonic() + 30
        while not runtime.alive and time.monotonic() < deadline:  # the slot's reader reloads
            time.sleep(0.05)
        assert runtime.alive and runtime.pid != first
        assert "".join(runtime.stream("The patient", GREEDY))  # no restart() asked for
        assert any("SIGKILL" in line for line in runtime.notices())

        away = model.rename(tmp_path / "away.gguf")
        os.kill(runtime.pid, signal.SIGKILL)
        with pytest.raises(EngineDiedError):
            list(runtime.stream("The patient", GREEDY))
        time.sleep(0.5)
        asked = time.monotonic()
        with pytest.raises(EngineDiedError):  # refused at once while it is down
            list(runtime.stream("The patient", GREEDY))
        assert time.monotonic() - asked < 1 and not runtime.alive
        away.rename(model)
        asked = time.monotonic()
        runtime.revive()
        assert time.monotonic() - asked < 0.5  # in the background
        while not runtime.alive and time.monotonic() < asked + 30:
            time.sleep(0.05)
        assert "".join(runtime.stream("The patient", GREEDY))
    finally:
        runtime.close()
