"""Nothing leaves the laptop, enforced: chat, serve, bench and their engine processes refuse any
socket beyond loopback, with one line; the commands that download do not.

Addresses tried: 192.0.2.1 (TEST-NET-1, RFC 5737: never routed) and a name under ``.invalid``
(RFC 2606: never resolves), so no test could reach anything even if the guard failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.test_serve import Server

PROBE = """
import json, socket, sys
from localmed import offline
offline.enforce("localmed chat")
results = {}
for name, target in [("loopback", ("127.0.0.1", 9)), ("localhost", ("localhost", 9)),
                     ("remote", ("192.0.2.1", 80)), ("name", ("updates.example.invalid", 443))]:
    try:
        socket.create_connection(target, timeout=2).close()
        results[name] = "connected"
    except Exception as exc:
        results[name] = type(exc).__name__
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    unix.connect("/nonexistent/localmed.sock")
except Exception as exc:
    results["unix"] = type(exc).__name__
print(json.dumps(results))
"""


def test_the_guard_refuses_beyond_loopback_and_says_so_once():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["loopback"] == results["localhost"] == "ConnectionRefusedError"
    assert results["remote"] == results["name"] == "NetworkRefusedError"
    assert results["unix"] == "FileNotFoundError"  # a Unix socket is this machine's business
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "localmed chat works offline: a connection to 192.0.2.1 port 80 was refused (nothing "
        "leaves the laptop; only pull, quantize from the hub and data pull download)",
        "localmed chat works offline: looking up updates.example.invalid was refused (nothing "
        "leaves the laptop; only pull, quantize from the hub and data pull download)"]


# Put on PYTHONPATH: in a spawned engine process, once localmed's guard is on, try to reach
# out (as a library loaded in the engine might) and write down what happened.
ENGINE_PROBE = """
import os, sys, threading, time
if "--multiprocessing-fork" in sys.argv:
    def _probe():
        for _ in range(600):
            offline = sys.modules.get("localmed.offline")
            if offline is not None and offline.enforced():
                break
            time.sleep(0.1)
        import socket
        try:
            socket.create_connection(("192.0.2.1", 443), timeout=2)
            outcome = "connected"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        with open(os.environ["LOCALMED_TEST_PROBE"], "w") as fh:
            fh.write(outcome)
    threading.Thread(target=_probe, daemon=True).start()
"""


def test_code_in_the_engine_process_cannot_reach_out(tmp_path, converted):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ENGINE_PROBE)
    probe = tmp_path / "probe.txt"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                       os.environ.get("PYTHONPATH")])),
           "LOCALMED_TEST_PROBE": str(probe)}
    running = Server(converted["llama"]["Q8_0"], "--ctx", "256", env=env)
    try:
        deadline = time.monotonic() + 120
        while not probe.exists():
            assert time.monotonic() < deadline, "the engine process never tried"
            time.sleep(0.2)
        outcome = probe.read_text()
        assert outcome.startswith("NetworkRefusedError: localmed's engine process works "
                                  "offline: a connection to 192.0.2.1 port 443 was refused"), \
            outcome
        # and the server goes on serving
        r = running.client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        running.stop()


@pytest.mark.parametrize("command", ["chat", "serve", "bench"])
def test_the_offline_commands_install_the_guard(command, tmp_path):
    """From the command line (`python -m localmed`), these commands make their own process
    offline (here, before they find that the model does not exist)."""
    site = tmp_path / "site"
    site.mkdir()
    # at the interpreter's exit, after the command has failed on its model
    (site / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "def _said():\n"
        "    offline = sys.modules.get('localmed.offline')\n"
        "    print('guard:', offline and offline.enforced(), file=sys.stderr, flush=True)\n"
        "atexit.register(_said)\n")
    env = {**os.environ, "PYTHONPATH": str(site), "LOCALMED_DATA_DIR": str(tmp_path / "data")}
    args = {"chat": ["chat", "no-such-model"], "serve": ["serve", "no-such-model"],
            "bench": ["bench", "no-such-model"]}[command]
    done = subprocess.run([sys.executable, "-m", "localmed", *args], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"guard: localmed {command}" in done.stderr, done.stderr


def test_a_download_command_is_not_guarded(tmp_path):
    """`pull` says it downloads and may: no guard in its process."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "atexit.register(lambda: print('guard:', getattr(sys.modules.get('localmed.offline'), "
        "'_guard', None), file=sys.stderr, flush=True))\n")
    env = {**os.environ, "PYTHONPATH": str(site), "LOCALMED_DATA_DIR": str(tmp_path / "data"),
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "localmed", "pull", "someone/nothing:Q4_K_M"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "guard: None" in done.stderr, done.stderr
