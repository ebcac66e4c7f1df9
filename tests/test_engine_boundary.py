"""The boundary between the app and its engine process, where a ward's load finds the races: a
large request written while other replies stream, a cancel racing a job's start, a close
during a reload, a receiver that raises, a socket out of file descriptors. Real engines on
real models throughout (the seeded tiny Llama where speed decides how many tries fit, the real
SmolLM2 where streams must decode at a real model's pace)."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from localmed.errors import LocalmedError
from localmed.images import Image
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.batch_process import BatchClient, BatchOptions
from localmed.runtimes.messages import Done, Failed, Piece
from localmed.runtimes.supervisor import EngineProcess

LONG = GenerationParams(temperature=0.0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(converted):
    return converted["llama"]["Q8_0"]


def engines() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "localmed-engine"]


def test_a_40_mb_request_does_not_stall_the_replies_streaming(smol):
    """Four replies decode (on one core: the other is the transfer's), one token an event; a
    request carrying a 40 MB image (what a 12-megapixel photograph's pixels weigh) is sent
    meanwhile. Its caller is not held while it crosses (the server admits a request on its
    event loop, which every stream's writes wait for): the pipe is written by a thread of its
    own. And no reply's gap between tokens grows by more than 100 ms beyond its usual step."""
    client = BatchClient(smol, BatchOptions(5, 512, threads=1), batch_seconds=0.0)
    try:
        arrivals: list[list[float]] = [[] for _ in range(4)]
        ends: list[queue.Queue] = [queue.Queue() for _ in range(4)]

        def sink(i):
            def put(event):
                if isinstance(event, Piece):
                    arrivals[i].append(time.monotonic())
                else:
                    ends[i].put(event)
            return put

        tokens = client.tokenize("Describe the management of community-acquired pneumonia.")
        for i in range(4):
            client.submit(tokens, GenerationParams(temperature=0.0, max_tokens=160,
                                                   ignore_eos=True), (), sink(i))
        while min(len(a) for a in arrivals) < 40:  # past the prefill, decoding steadily
            time.sleep(0.01)
        photo = Image(4000, 3334, os.urandom(4000 * 3334 * 3), "photo.png", "PNG")
        answered: queue.Queue = queue.Queue()
        sent = time.monotonic()
        client.submit(tokens, GenerationParams(max_tokens=1), (), answered.put,
                      images=(photo,))
        held = time.monotonic() - sent
        while not isinstance(answered.get(timeout=60), (Done, Failed)):
            pass
        crossed = time.monotonic()
        for end in ends:
            assert isinstance(end.get(timeout=600), Done)
    finally:
        client.close()
    assert held < 0.05, f"submit held its caller {held:.3f} s"
    for times in arrivals:
        steps = list(itertools.pairwise(times))
        usual = statistics.median(b - a for a, b in steps[20:] if b < sent)
        during = [b - a for a, b in steps if sent <= b <= crossed + 0.5]
        assert during and max(during) - usual < 0.1, (usual, max(during), crossed - sent)


def test_a_cancel_racing_a_jobs_start_is_never_lost(tiny):
    """The one-at-a-time engine (a GPTQ folder's): 1,000 jobs each cancelled the moment it is
    admitted, racing the worker that starts it. Every one ends as cancelled; none runs on to
    its 200 tokens."""
    from localmed.formats import LoadOptions
    from localmed.runtimes.process import open_engine
    from localmed.serve.jobs import Job, SerialJobs

    runtime = open_engine(tiny, LoadOptions(n_ctx=256), batch_seconds=0.0)
    log = open(os.devnull, "w")
    jobs = SerialJobs(runtime, 4, log)
    lost = []
    try:
        for i in range(1000):
            job = Job("The patient", LONG, ())
            jobs.admit(job)
            if i % 2:
                time.sleep(0.0005 * (i % 7))  # at each moment of the start, in turn
            jobs.cancel(job)
            pieces = 0
            while not isinstance(event := job.events.get(timeout=60), (Done, Failed)):
                pieces += 1
            if isinstance(event, Done):
                lost.append((i, pieces))
    finally:
        jobs.close()
        runtime.close()
        log.close()
    assert not lost, f"{len(lost)} of 1,000 cancels lost: {lost[:5]}"


def test_close_during_a_reload_leaves_no_engine_process(tiny):
    """The engine is killed; its client reloads the model at once; close() comes while that
    reload is starting, at a different moment each time. No engine process is left."""
    for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        heard = threading.Event()
        client = BatchClient(tiny, BatchOptions(1, 256), on_restart=lambda why, heard=heard: heard.set())
        os.kill(client.pid, signal.SIGKILL)
        assert heard.wait(10)  # its reader has heard the death, and reloads
        time.sleep(delay)
        client.close()
        deadline = time.monotonic() + 15
        while engines() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not engines(), f"closed {delay} s into the reload: {engines()} left"


def _wait_for_close(conn, log_path):
    """An engine process's simplest life: it waits for Close, then ends."""
    conn.recv()


def test_an_engine_stopped_by_two_threads_at_once_is_closed_once():
    """A reload's handshake and close() may both stop an engine at the same moment (CI found
    it: the second close of the pipe raised EBADF out of close(); had its number been reused
    in between, it would have closed another file). Both return, and the pipe's number, given
    to the next file, stays that file's."""
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads change hands as often as they can: the race shows
    try:
        for _ in range(60):
            _stop_from_two_threads()
    finally:
        sys.setswitchinterval(switching)


def _stop_from_two_threads():
    engine = EngineProcess(_wait_for_close)
    start, failed = threading.Barrier(2), []

    def stop(engine=engine, start=start, failed=failed):
        start.wait()
        try:
            engine.stop()
        except Exception as exc:
            failed.append(exc)

    threads = [threading.Thread(target=stop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failed, failed
    assert not engine.alive
    reused = os.open(os.devnull, os.O_RDONLY)
    try:
        engine.stop()
        os.fstat(reused)  # still this file's
    finally:
        os.close(reused)


def test_a_receiver_that_raises_fails_alone(tiny):
    """Two replies; the receiver of one raises at its first token. That reply is cancelled
    and its end handler runs; the other finishes, and the engine takes the next request."""
    client = BatchClient(tiny, BatchOptions(2, 256), batch_seconds=0.0)
    try:
        tokens = client.tokenize("The patient")
        ended = threading.Event()

        def broken(event):
            raise RuntimeError("a bug in one request's handler")

        good: queue.Queue = queue.Queue()
        client.submit(tokens, LONG, (), broken, on_end=ended.set)
        client.submit(tokens, LONG, (), good.put)
        while not isinstance(event := good.get(timeout=60), (Done, Failed)):
            pass
        assert isinstance(event, Done) and event.stats.generated_tokens == 200
        assert ended.wait(10)
        again: queue.Queue = queue.Queue()
        client.submit(tokens, GenerationParams(temperature=0.0, max_tokens=8), (), again.put)
        while not isinstance(event := again.get(timeout=60), (Done, Failed)):
            pass
        assert isinstance(event, Done)
    finally:
        client.close()


EMFILE_SCRIPT = r"""
import json, os, resource, subprocess, sys, time
from localmed.runtimes.batch_process import BatchClient, BatchOptions
from localmed.runtimes.hub import EngineHub
client = BatchClient(sys.argv[1], BatchOptions(1, 256))
hub = EngineHub(client)
tab = subprocess.Popen([sys.executable, "-c", sys.argv[2]], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True, env={**os.environ, **hub.environment()})
assert tab.stdout.readline() == "ready\n"  # imported: it connects as soon as told
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
# The hub's waiting accept() holds the descriptor it will give (Linux takes it first): this
# tab gets it; the hub's next accept() finds none (EMFILE), with nobody even connecting.
tab.stdin.write("connect\n"); tab.stdin.flush()
first = tab.stdout.readline().strip()
time.sleep(0.2)
cpu = time.process_time()
time.sleep(2.0)
cpu = time.process_time() - cpu
for fd in held:
    os.close(fd)
tab.stdin.write("connect\n"); tab.stdin.flush()
second = tab.stdout.readline().strip()
print(json.dumps({"cpu": cpu, "answers": [first, second]}))
tab.stdin.write("done\n"); tab.stdin.flush()
tab.wait(30)
hub.close()
client.close()
"""

TAB_SCRIPT = r"""
import os, sys
from localmed.runtimes.batch_process import BatchClient
print("ready", flush=True)
clients = []
for _ in range(2):  # connected until the end: each holds a descriptor of the hub's
    sys.stdin.readline()
    clients.append(BatchClient.connect(os.environ["LOCALMED_ENGINE"],
                                       bytes.fromhex(os.environ["LOCALMED_ENGINE_KEY"])))
    print(len(clients[-1].tokenize("The patient")), flush=True)
sys.stdin.readline()
"""


def test_a_hub_out_of_file_descriptors_waits_instead_of_spinning(tiny):
    """The hub's process runs out of file descriptors (EMFILE) once a tab has connected: the
    hub says so and waits between tries (its CPU time over 2 s: an accept loop that retried
    at once burns all of it), and once descriptors are free the next tab is taken."""
    done = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT, str(tiny), TAB_SCRIPT],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cpu"] < 0.2, report
    assert [int(n) > 1 for n in report["answers"]] == [True, True], report
    assert "cannot accept a tab (Too many open files)" in done.stderr


def test_a_closed_client_refuses_new_requests_in_one_line(tiny):
    client = BatchClient(tiny, BatchOptions(1, 256))
    client.close()
    with pytest.raises(LocalmedError, match=r"reloaded|closed"):
        client.submit([1, 2, 3], LONG, (), lambda event: None)
    assert not engines()
