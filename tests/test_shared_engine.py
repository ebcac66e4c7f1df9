"""One engine for every chat: the conversation kept between turns, and one loaded model shared by
the processes of ``chat --web`` tabs (:class:`EngineHub`), on the real SmolLM2."""

from __future__ import annotations

import dataclasses
import os
import queue
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localmed.errors import EngineDiedError
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.batch_process import BatchClient, BatchOptions
from localmed.runtimes.hub import ENGINE_ADDRESS_ENV, ENGINE_KEY_ENV, EngineHub
from localmed.runtimes.messages import Done
from localmed.runtimes.slot_runtime import SlotRuntime

GREEDY = GenerationParams(temperature=0.0, max_tokens=16)
RECORD = ("Discharge summary. 71-year-old woman admitted with community-acquired pneumonia, "
          "treated with ceftriaxone and azithromycin; sodium 128 on admission, 134 at "
          "discharge; on furosemide and sertraline. ") * 8


@pytest.fixture(scope="module")
def hub(smollm2):
    client = BatchClient(smollm2["gguf"], BatchOptions(2, 2048, threads=2))
    shared = EngineHub(client)
    yield shared
    shared.close()
    client.close()


def test_a_follow_up_in_chat_prefills_only_the_new_turn(smollm2):
    from localmed.chat import ChatSession, open_runtime, resolve_chat_model
    from localmed.registry import Registry

    model = resolve_chat_model(str(smollm2["gguf"]), Registry.load())
    runtime = open_runtime(model, n_ctx=2048, threads=2)
    try:
        assert isinstance(runtime, SlotRuntime)
        session = ChatSession.open(model, runtime)
        session.params = dataclasses.replace(session.params, temperature=0.0, max_tokens=24)
        "".join(session.ask(f"{RECORD}\nWhat is the main diagnosis?"))
        first = session.stats
        "".join(session.ask("And the sodium trend?"))
        later = session.stats
    finally:
        runtime.close()
    assert first.cached_tokens < 10  # the template's first tokens at most
    # the record and the first turn are in the cells (up to where the reply's text, tokenized
    # again, first differs from the tokens sampled)
    assert later.cached_tokens > first.prompt_tokens, (first, later)


def test_a_tab_process_chats_on_the_shared_engine(hub, smollm2):
    """A process started with the hub's environment (as textual-serve starts a tab) loads no
    model of its own and gets the reply the owner gets."""
    expected = "".join(SlotRuntime(hub.client).stream("The patient", GREEDY))
    script = ("import sys\n"
              "from localmed.runtimes.batch_process import BatchClient\n"
              "from localmed.runtimes.slot_runtime import SlotRuntime\n"
              "from localmed.runtimes.base import GenerationParams\n"
              "import os\n"
              "runtime = SlotRuntime(BatchClient.connect(os.environ['LOCALMED_ENGINE'], "
              "bytes.fromhex(os.environ['LOCALMED_ENGINE_KEY'])))\n"
              "print(runtime.pid is None, runtime.n_ctx, flush=True)\n"
              "sys.stdout.write(''.join(runtime.stream('The patient', "
              "GenerationParams(temperature=0.0, max_tokens=16))))\n"
              "runtime.close()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **hub.environment()})
    assert out.returncode == 0, out.stderr
    head, reply = out.stdout.split("\n", 1)
    assert head == f"True {hub.client.ready.n_ctx}"
    assert reply == expected and reply


def test_the_socket_is_private_and_a_wrong_key_is_refused(hub):
    folder = Path(hub.address).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert hub.environment() == {ENGINE_ADDRESS_ENV: hub.address,
                                 ENGINE_KEY_ENV: hub.authkey.hex()}
    with pytest.raises(EngineDiedError, match="cannot be reached"):
        BatchClient.connect(hub.address, b"not the key")
    # the hub goes on serving the right key
    tab = BatchClient.connect(hub.address, hub.authkey)
    try:
        assert tab.tokenize("fever") == hub.client.tokenize("fever")
    finally:
        tab.close()


def test_a_tab_that_leaves_mid_reply_frees_its_sequence_at_once(smollm2):
    """One sequence: a tab's process killed during its long reply has the reply cancelled, so
    the owner's short request is answered at once, not after the 1,500 tokens."""
    client = BatchClient(smollm2["gguf"], BatchOptions(1, 2048, threads=2))
    hub = EngineHub(client)
    script = ("import os, sys\n"
              "from localmed.runtimes.batch_process import BatchClient\n"
              "from localmed.runtimes.slot_runtime import SlotRuntime\n"
              "from localmed.runtimes.base import GenerationParams\n"
              "runtime = SlotRuntime(BatchClient.connect(os.environ['LOCALMED_ENGINE'], "
              "bytes.fromhex(os.environ['LOCALMED_ENGINE_KEY'])))\n"
              "for piece in runtime.stream('Tell me about the heart.', GenerationParams("
              "temperature=0.0, max_tokens=1500, ignore_eos=True)):\n"
              "    print('generating', flush=True)\n")
    tab = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, **hub.environment()})
    try:
        assert tab.stdout.readline() == "generating\n"
        tab.kill()  # the tab's process ends without a word
        tab.wait()
        started = time.monotonic()
        mine: queue.Queue = queue.Queue()
        client.submit(client.tokenize("The patient"), GREEDY, (), mine.put)
        while not isinstance(event := mine.get(timeout=60), Done):
            pass
        assert time.monotonic() - started < 10 and event.stats.generated_tokens == 16
    finally:
        tab.kill()
        hub.close()
        client.close()
