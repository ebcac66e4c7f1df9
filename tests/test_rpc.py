"""A model split over workers (``localmed worker``, ``--rpc``): real workers (llama.cpp's RPC
server behind localmed's TLS relay) on loopback, a real server through the official ``openai``
client, real models (the seeded tiny Llama and SmolLM2). What crosses the link is read by a
relay of the test's own that logs every byte."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from gguf import GGUFReader

from localmed.rpc import secret
from localmed.rpc.link import PROTOCOL, Worker, probe
from tests.terminal import Terminal
from tests.test_serve import Server, free_port
from tests.tiny_models import SHARED

GREEDY = {"temperature": 0, "extra_body": {"cache_prompt": False}}


class WorkerProcess:
    """``localmed worker`` on loopback, up once its banner says how to use it."""

    def __init__(self, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localmed", "worker", "--host", "127.0.0.1", "--port",
             str(self.port), "--threads", "1", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.banner: list[str] = []
        while not self.banner or "Ctrl-C" not in self.banner[-1]:
            line = self.proc.stdout.readline()
            assert line, ("the worker ended before its banner", self.banner,
                          self.proc.stderr.read())
            self.banner.append(line)
        self.address = f"127.0.0.1:{self.port}"
        self.said: list[str] = []  # what it says after its banner (a full pipe would stop it)
        threading.Thread(target=lambda: self.said.extend(self.proc.stdout), daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def workers() -> Iterator[list[WorkerProcess]]:
    # The first makes the clinic's secret at the default place, which the second (and every
    # client in these tests) reads: one machine, no flag.
    started = [WorkerProcess()]
    started.append(WorkerProcess())
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def tiny(converted):
    return converted["llama"]["Q8_0"]


def client_of(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def greedy_with_logprobs(server: Server, model: Path, question: str, tokens: int = 24):
    reply = client_of(server).chat.completions.create(
        model=model.stem, messages=[{"role": "user", "content": question}], max_tokens=tokens,
        logprobs=True, top_logprobs=10, **GREEDY)
    return reply.choices[0].logprobs.content


@pytest.mark.parametrize("which", ["tiny llama", "SmolLM2"])
def test_a_model_split_over_two_workers_and_this_machine_gives_its_own_tokens(
        which, workers, tiny, smol):
    model = tiny if which == "tiny llama" else smol
    rpc = ",".join(w.address for w in workers)
    local = Server(model, "--threads", "2")
    split = Server(model, "--threads", "2", "--rpc", rpc)
    try:
        banner = split.banner()
        assert "workers " in banner and " layers" in banner, banner
        question = "List the first-line drugs for community-acquired pneumonia."
        mine = greedy_with_logprobs(local, model, question)
        theirs = greedy_with_logprobs(split, model, question)
    finally:
        local.stop()
        split.stop()
    assert [t.token for t in theirs] == [t.token for t in mine]
    for a, b in zip(mine, theirs, strict=True):
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
        worst = max(abs(x.logprob - y.logprob)
                    for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True))
        assert worst < 1e-3, (a.token, worst)


def test_the_split_puts_layers_on_each_machine_as_llama_cpp_reports_it(workers, smol):
    """llama.cpp's own account of where each layer went (the engine's log): the last layers on
    the two workers, the first ones here, in proportion to free memory (equal here)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from localmed.rpc.workers import spec\n"
        "from localmed.runtimes.load import BatchOptions, load_engine\n"
        "engine, info, plan, _ = load_engine(Path(sys.argv[1]), BatchOptions(1, 512, "
        "rpc=spec(sys.argv[2])))\n"
        "print('PLAN', *plan.reasons, sep='\\n')\n")
    done = subprocess.run([sys.executable, "-c", script, str(smol),
                           ",".join(w.address for w in workers)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    placed: dict[str, int] = {}
    for line in done.stderr.splitlines():
        if "assigned to device" in line:
            device = line.split("assigned to device ")[1].split(",")[0]
            placed[device] = placed.get(device, 0) + 1
    # 30 layers and the output (31): 10 here, 10 + the output on the workers
    assert placed.get("CPU") == 11 and placed.get("RPC0") == 10 and placed.get("RPC1") == 10, \
        (placed, done.stdout)
    assert "this machine: 10 layers" in done.stdout, done.stdout


def test_what_a_worker_says_of_itself_is_this_llama_cpps_protocol(workers):
    """The pinned llama.cpp's RPC protocol, as its own server answers HELLO (a new pin that
    changes it changes :data:`PROTOCOL` too)."""
    info = probe(Worker("127.0.0.1", workers[0].port), secret.client_context(None))
    assert info.rpc == PROTOCOL
    assert info.devices and info.devices[0].free > 0
    assert any("secret" in line for line in workers[0].banner)


# -- what crosses the link ------------------------------------------------------------------

class Tap:
    """A plain TCP relay of the test's own between the client and a worker, keeping every
    byte that crosses it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._carry, args=(client,), daemon=True).start()

    def _carry(self, client: socket.socket) -> None:
        remote = socket.create_connection(("127.0.0.1", self.target))
        ends = {client: remote, remote: client}
        try:
            while True:
                ready, _, _ = select.select(list(ends), [], [])
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    self.seen += data
                    ends[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            remote.close()

    def close(self) -> None:
        self.server.close()


def _remote_weights(model: Path) -> bytes:
    """64 bytes from the middle of the last layer's FFN weights (a worker's share)."""
    reader = GGUFReader(model)
    last = max(int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk."))
    tensor = next(t for t in reader.tensors if t.name == f"blk.{last}.ffn_down.weight")
    data = tensor.data.tobytes()
    return data[len(data) // 2: len(data) // 2 + 64]


@pytest.mark.parametrize("insecure", [False, True], ids=["TLS", "--insecure-rpc"])
def test_neither_weights_nor_the_prompt_cross_the_link_in_clear(insecure, smol, tmp_path):
    """Through the TLS relay the tap sees neither a weight the worker holds nor the prompt's
    text nor llama.cpp's HELLO; with --insecure-rpc (the control) it sees the weights as they
    are in the file."""
    flag = ("--insecure-rpc",) if insecure else ()
    worker = WorkerProcess(*flag)
    tap = Tap(worker.port)
    split = Server(smol, "--threads", "2", "--rpc", f"127.0.0.1:{tap.port}", *flag)
    try:
        split.banner()
        prompt = "Pneumocystis jirovecii prophylaxis in a renal transplant recipient"
        client_of(split).chat.completions.create(
            model=smol.stem, messages=[{"role": "user", "content": prompt}], max_tokens=8,
            **GREEDY)
    finally:
        split.stop()
        tap.close()
        worker.stop()
    seen = bytes(tap.seen)
    assert len(seen) > 10_000_000  # the workers' layers crossed it
    weights = _remote_weights(smol)
    hello = bytes([14]) + (24).to_bytes(8, "little")  # llama.cpp's HELLO command
    if insecure:
        assert weights in seen and hello in seen
    else:
        assert weights not in seen and hello not in seen
        assert b"Pneumocystis" not in seen and b"renal" not in seen
        assert seen[:1] == b"\x16"  # a TLS handshake record, first thing


# -- refusals, each in one line -------------------------------------------------------------

def _refused(model: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "localmed", "serve", str(model), "--port",
                           str(free_port()), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.strip().splitlines()
             if not line.startswith("warning: --insecure-rpc")]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not list(cwd.iterdir())
    return lines[0]


def test_a_client_with_another_clinics_secret_gets_nothing(workers, tiny, tmp_path):
    other, _ = secret.ensure(tmp_path / "other.pem")
    said = _refused(tiny, "--rpc", workers[0].address, "--rpc-secret", str(other),
                    cwd=_empty(tmp_path))
    assert workers[0].address in said and "another clinic's RPC secret" in said, said
    # The worker refuses it too, before saying anything: a client that skips checking the
    # worker's certificate still gets no byte.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(other)
    with socket.create_connection(("127.0.0.1", workers[0].port), timeout=10) as raw, \
            context.wrap_socket(raw) as sock:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            got = sock.recv(100)
            assert not got  # or an orderly close with nothing sent
            raise ConnectionResetError
    # Without any certificate at all: the same
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname, bare.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", workers[0].port), timeout=10) as raw, \
            bare.wrap_socket(raw) as sock:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            got = sock.recv(100)
            assert not got
            raise ConnectionResetError


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "cwd"
    folder.mkdir(exist_ok=True)
    return folder


def test_addresses_that_are_not_a_usable_worker_are_refused_in_one_line(workers, tiny,
                                                                        tmp_path):
    cwd = _empty(tmp_path)
    said = _refused(tiny, "--rpc", "8.8.8.8:50052", cwd=cwd)
    assert "8.8.8.8" in said and "public address" in said, said
    said = _refused(tiny, "--rpc", f"127.0.0.1:{free_port()}", cwd=cwd)
    assert "nothing listens there" in said, said
    said = _refused(tiny, "--rpc", "127.0.0.1:0", cwd=cwd)
    assert "HOST:PORT" in said, said
    # Something that is not a worker: an HTTP server (a localmed serve)
    http = Server(tiny, "--threads", "1")
    try:
        said = _refused(tiny, "--rpc", f"127.0.0.1:{http.port}", cwd=cwd)
    finally:
        http.stop()
    assert "not a localmed worker" in said, said
    # A TLS worker asked in llama.cpp's plain protocol
    said = _refused(tiny, "--rpc", workers[0].address, "--insecure-rpc", cwd=cwd)
    assert "leave out --insecure-rpc" in said, said


def test_a_worker_of_another_protocol_version_is_refused_naming_it(tiny, tmp_path):
    """A plain llama.cpp RPC server answering HELLO with another major version (a stand-in
    that speaks only that much)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 + 8 + 24)
                conn.sendall((28).to_bytes(8, "little") + bytes([6, 1, 0, 0]) + bytes(24))

    threading.Thread(target=answer, daemon=True).start()
    try:
        said = _refused(tiny, "--rpc", f"127.0.0.1:{port}", "--insecure-rpc",
                        cwd=_empty(tmp_path))
    finally:
        server.close()
    assert f"127.0.0.1:{port}" in said and "6.1.0" in said and "7.0.0" in said, said


def test_a_worker_that_dies_mid_reply_fails_that_reply_and_the_server_stays_up(tiny, tmp_path):
    """The worker is killed while a reply streams: that reply ends in an error naming the
    worker; the server answers the next request with a refusal that names it too, and once the
    worker is back (same port) the model is loaded again and replies as before."""
    worker = WorkerProcess()
    split = Server(tiny, "--threads", "1", "--rpc", worker.address)
    try:
        split.banner()
        client = client_of(split)
        before = client.chat.completions.create(
            model=tiny.stem, messages=[{"role": "user", "content": "Define sepsis."}],
            max_tokens=16, **GREEDY).choices[0].message.content
        stream = client.chat.completions.create(
            model=tiny.stem, messages=[{"role": "user", "content": "Define sepsis."}],
            max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        worker.proc.kill()
        worker.proc.wait()
        with pytest.raises(openai.APIError) as failed:
            for _ in stream:
                pass
        assert worker.address in str(failed.value.body), failed.value.body
        deadline = time.monotonic() + 60
        while True:  # reloading at once, which fails: then each request says why
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(
                    model=tiny.stem, messages=[{"role": "user", "content": "Define sepsis."}],
                    max_tokens=4, **GREEDY)
            if "could not be loaded again" in str(refused.value):
                break
            assert time.monotonic() < deadline, refused.value
            time.sleep(0.5)
        assert refused.value.status_code == 503
        assert f"worker {worker.address}: nothing listens there" in str(refused.value)
        worker = WorkerProcess(port=worker.port)
        deadline = time.monotonic() + 120
        while True:
            try:
                after = client.chat.completions.create(
                    model=tiny.stem, messages=[{"role": "user", "content": "Define sepsis."}],
                    max_tokens=16, **GREEDY).choices[0].message.content
                break
            except openai.APIStatusError:
                assert time.monotonic() < deadline
                time.sleep(1)
        assert after == before
        assert split.proc.poll() is None
    finally:
        split.stop()
        worker.stop()


# -- plan ---------------------------------------------------------------------------------

def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmed", "plan", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_plan_splits_meditron_70b_over_two_32_gb_machines_from_the_registry_alone():
    """No download and no worker asked: the registry's shape, llama.cpp's bits per weight, and
    --worker-memory for each. All 80 layers on the two workers (--gpu-layers -1) fit at
    Q4_K_M; at 16 GB each they do not, and the plan names the machine."""
    fits = _plan("meditron-70b", "--quant", "Q4_K_M", "--rpc", "a:50052,b:50052",
                 "--worker-memory", "32G", "--gpu-layers", "-1")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "an estimate" in fits.stdout and "workers 80/80 layers" in fits.stdout, fits.stdout
    assert "this machine: 0 layers" in fits.stdout, fits.stdout
    assert "worker a:50052: 40 layers" in fits.stdout and "worker b:50052: 40 layers" in \
        fits.stdout, fits.stdout
    short = _plan("meditron-70b", "--quant", "Q4_K_M", "--rpc", "a:50052,b:50052",
                  "--worker-memory", "16G", "--gpu-layers", "-1")
    assert short.returncode == 1, short.stdout + short.stderr
    assert "worker a:50052 would hold 40 layers" in short.stdout, short.stdout
    assert "does not fit" in short.stdout, short.stdout


def test_plan_asks_each_worker_what_it_has(workers, smol):
    said = _plan(str(smol), "--rpc", ",".join(w.address for w in workers))
    assert said.returncode == 0, said.stdout + said.stderr
    for worker in workers:
        assert f"worker {worker.address}: {socket.gethostname()}" in said.stdout, said.stdout
    assert "llama.cpp RPC 7.0.0" in said.stdout and "workers 20/30 layers" in said.stdout, \
        said.stdout


# -- chat, in a real terminal --------------------------------------------------------------

def _replied(screen: str) -> bool:
    rows = [row for row in screen.splitlines() if row.strip()]
    return ("Model" in screen and "tok/s" in rows[-1] and "generating" not in rows[-1]
            and "▌" not in screen.split("Model")[-1])


def _reply_on_screen(command: str, name: str) -> tuple[str, str]:
    """The whole screen once the reply is done (the status line shows its speed), and the
    reply's own lines."""
    with Terminal(name, command, env={**os.environ}) as term:
        term.wait(lambda s: "Ask the model" in s, "the chat screen", timeout=120)
        term.type("What are the first-line drugs for community-acquired pneumonia?")
        term.press("Enter")
        screen = term.wait(_replied, "the reply", timeout=120)
    rows = screen.splitlines()
    start = next(i for i, row in enumerate(rows) if row.strip() == "Model")
    end = next(i for i, row in enumerate(rows) if row.startswith("▊▔"))
    return screen, "\n".join(rows[start + 1:end]).strip()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_chat_in_a_terminal_with_the_model_split_shows_this_machines_reply(workers, smol):
    base = f"exec {sys.executable} -m localmed chat {smol} --temperature 0 --max-tokens 32"
    _, mine = _reply_on_screen(base, "rpc-chat-local")
    screen, theirs = _reply_on_screen(
        f"{base} --rpc {','.join(w.address for w in workers)}", "rpc-chat-split")
    assert "workers 20/30 layers" in screen, screen
    assert len(mine) > 40 and theirs == mine, (mine, theirs)


# -- bench ----------------------------------------------------------------------------------

def test_bench_with_the_model_split_scores_as_this_machine_does(workers, bench_models,
                                                                tmp_path):
    """Two quants loaded one after the other in one process over the same workers (the relays
    are made once, and ggml keeps the workers' devices): each question's option probabilities
    as this machine alone gives them."""
    data = SHARED / "benchmarks" / "medqa.jsonl"
    outs = {}
    for how, extra in (("alone", ()), ("split", ("--rpc", ",".join(w.address
                                                                      for w in workers)))):
        outs[how] = tmp_path / how
        done = subprocess.run(
            [sys.executable, "-m", "localmed", "bench", str(bench_models), "--data", str(data),
             "--limit", "6", "--quants", "Q8_0", "--text-docs", "0", "--threads", "2",
             "--out", str(outs[how]), *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for quant in ("F16", "Q8_0"):
        alone, split = ([json.loads(line) for line in
                         (outs[how] / "records" / quant / "medqa.jsonl").read_text().splitlines()]
                        for how in ("alone", "split"))
        assert len(alone) == len(split) == 6
        for a, b in zip(alone, split, strict=True):
            assert a["predicted"] == b["predicted"]
            assert max(abs(x - y) for x, y in zip(a["probs"], b["probs"], strict=True)) < 1e-3
