"""A clinic's server: TLS against a CA the test makes (with Debian's openssl), keys with names,
a request-rate limit, and an audit log whose every alteration `localmed audit verify` finds."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from localmed.serve.audit import AuditError, AuditLog, verify
from tests.test_serve import Server, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs openssl (Debian's package) to make a test CA")

ALICE = "alice-0123456789abcdef"
BOB = "bob-fedcba9876543210xyz"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost, an expired one, and
    a key that belongs to neither."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=localmed test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    # expired: signed by the CA for January 2020 (`openssl ca` sets both dates)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "old.key", "-out", "old.csr",
            "-subj", "/CN=localhost", cwd=d)
    (d / "index.txt").touch()
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text("[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\n"
                              "new_certs_dir = .\nserial = serial\ndefault_md = sha256\n"
                              "policy = any\n[any]\ncommonName = supplied\n")
    openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
            "-in", "old.csr", "-out", "old.pem", "-startdate", "20200101000000Z", "-enddate",
            "20200201000000Z", "-notext", cwd=d)
    openssl("genrsa", "-out", "other.key", "2048", cwd=d)
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "old.pem",
                                        "old.key", "other.key")}


def key_file(folder: Path, lines: str, mode: int = 0o600) -> Path:
    path = folder / "keys.txt"
    path.write_text(lines)
    path.chmod(mode)
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmed", *args], capture_output=True,
                          text=True, timeout=120)


def refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="module")
def clinic(converted, pki, tmp_path_factory):
    """Beyond loopback over TLS, two named keys, an audit log, 3 requests a minute per key."""
    d = tmp_path_factory.mktemp("clinic")
    keys = key_file(d, f"# ward 7\nalice {ALICE}\nbob {BOB}\n")
    audit = d / "audit.jsonl"
    running = Server(converted["llama"]["Q8_0"], "--ctx", "256", "--host", "0.0.0.0",
                     "--api-key-file", str(keys), "--tls-cert", str(pki["server.pem"]),
                     "--tls-key", str(pki["server.key"]), "--audit", str(audit),
                     "--rate-limit", "3")
    running.url = f"https://127.0.0.1:{running.port}"
    running.client = httpx.Client(base_url=running.url, verify=str(pki["ca.pem"]), timeout=120)
    yield running, keys, audit
    running.stop()


def client(running: Server, pki, key: str):
    import openai

    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(verify=str(pki["ca.pem"]), timeout=120))


def test_the_openai_client_over_tls_with_named_keys(clinic, pki):
    running, _, audit = clinic
    reply = client(running, pki, ALICE).chat.completions.create(
        model=running.client.get("/v1/models", headers={
            "Authorization": f"Bearer {ALICE}"}).json()["data"][0]["id"],
        messages=[{"role": "user", "content": "Patient Jane Roe, 1961: sodium 128."}],
        max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["log_content"] is False
    assert records[0]["tls"] is True and records[0]["keys"] == ["alice", "bob"]
    done = [r for r in records if r.get("route") == "/v1/chat/completions"]
    assert done and done[-1]["key"] == "alice" and done[-1]["status"] == 200
    assert len(done[-1]["prompt_sha256"]) == 64 and len(done[-1]["reply_sha256"]) == 64
    assert done[-1]["model_sha256"] == records[0]["model_sha256"]
    text = audit.read_text()
    assert ALICE not in text and BOB not in text and "Jane Roe" not in text
    assert verify(audit).broken is None


def test_missing_wrong_and_revoked_keys_get_401(clinic, pki):
    running, keys, _ = clinic
    assert running.client.get("/v1/models").status_code == 401
    assert running.client.get("/v1/models", headers={
        "Authorization": "Bearer nobody-0123456789abc"}).status_code == 401
    assert running.client.get("/v1/models", headers={
        "Authorization": f"Bearer {BOB}"}).status_code == 200
    keys.write_text(f"alice {ALICE}\n")  # bob leaves the ward
    running.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while running.client.get("/v1/models", headers={
            "Authorization": f"Bearer {BOB}"}).status_code != 401:
        assert time.monotonic() < deadline, "bob's key still works after SIGHUP"
        time.sleep(0.2)
    keys.write_text("alice short\n")  # a file that no longer reads keeps the keys in use
    running.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert running.client.get("/v1/models", headers={
        "Authorization": f"Bearer {ALICE}"}).status_code in (200, 429)


def test_a_burst_over_the_rate_gets_429_with_retry_after(clinic):
    running, _, audit = clinic
    statuses = [running.client.get("/v1/models", headers={"Authorization": f"Bearer {ALICE}"})
                for _ in range(6)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, [r.status_code for r in statuses]
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].json()["error"]["code"] == "rate_limit_exceeded"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(r.get("status") == 429 and r["refusal"].startswith("over 3 requests")
               for r in records)


def test_plain_http_to_the_tls_port_harms_no_one(clinic):
    running, _, _ = clinic
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{running.port}/v1/models", timeout=10)
    assert running.client.get("/v1/models", headers={
        "Authorization": f"Bearer {ALICE}"}).status_code in (200, 429)


@pytest.mark.parametrize("case", ["no tls", "expired", "wrong key", "missing", "half",
                                  "world-readable keys", "bad key line", "tampered audit",
                                  "unwritable audit"])
def test_a_clinic_server_refuses_bad_setup_in_one_line(case, converted, pki, tmp_path):
    model = str(converted["llama"]["Q8_0"])
    keys = key_file(tmp_path, f"alice {ALICE}\n")
    base = [model, "--host", "0.0.0.0", "--port", str(free_port()), "--api-key-file", str(keys)]
    tls = ["--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"])]
    if case == "no tls":
        refused(run("serve", *base), "plain HTTP", "--tls-cert", "--insecure-http")
    elif case == "expired":
        refused(run("serve", *base, "--tls-cert", str(pki["old.pem"]), "--tls-key",
                    str(pki["old.key"])), "expired")
    elif case == "wrong key":
        refused(run("serve", *base, "--tls-cert", str(pki["server.pem"]), "--tls-key",
                    str(pki["other.key"])), "does not belong to the certificate")
    elif case == "missing":
        refused(run("serve", *base, "--tls-cert", str(tmp_path / "no.pem"), "--tls-key",
                    str(pki["server.key"])), "no such file")
    elif case == "half":
        refused(run("serve", *base, "--tls-cert", str(pki["server.pem"])), "go together")
    elif case == "world-readable keys":
        key_file(tmp_path, f"alice {ALICE}\n", mode=0o644)
        refused(run("serve", *base, *tls), "others can read it", "chmod 600")
    elif case == "bad key line":
        key_file(tmp_path, f"alice {ALICE}\nbob\n")
        refused(run("serve", *base, *tls), "line 2", "expected 'name key'")
    elif case == "unwritable audit":  # (/proc: not even root creates files there)
        refused(run("serve", *base, *tls, "--audit", "/proc/localmed-audit.jsonl"),
                "cannot write the audit log")
    else:
        audit = tmp_path / "audit.jsonl"
        log = AuditLog(audit, content=False)
        log.start(model="m")
        log.append(event="request", status=200)
        log.close()
        audit.write_text(audit.read_text().replace('"status":200', '"status":201'))
        refused(run("serve", *base, *tls, "--audit", str(audit)), "refusing to append",
                "record 2")


def _log(path: Path, n: int = 5) -> list[str]:
    log = AuditLog(path, content=False)
    log.start(model="m")
    for i in range(n - 1):
        log.append(event="request", status=200, request_id=str(i))
    log.close()
    return path.read_text().splitlines(keepends=True)


def test_expiry_is_read_with_cryptography_not_the_ssl_modules_private_decoder(pki, monkeypatch):
    """The expired certificate (made by openssl) is refused with its end date even where the
    ssl module's private decoder is missing: the check is cryptography's public API, so it
    cannot silently disappear. A good certificate, and a chain file whose first certificate is
    the server's, still load."""
    import ssl

    from localmed.errors import ServeError
    from localmed.serve.tls import tls_context

    monkeypatch.delattr(ssl._ssl, "_test_decode_cert", raising=False)
    with pytest.raises(ServeError, match=r"old\.pem: expired on 2020-02-01 00:00 UTC"):
        tls_context(pki["old.pem"], pki["old.key"])
    assert tls_context(pki["server.pem"], pki["server.key"]) is not None
    chain = pki["server.pem"].with_name("chain.pem")
    chain.write_bytes(pki["server.pem"].read_bytes() + pki["ca.pem"].read_bytes())
    assert tls_context(chain, pki["server.key"]) is not None


@pytest.mark.parametrize(("change", "record", "why"), [
    ("edit", 3, "edited"),
    ("edit last", 5, "edited"),
    ("delete", 3, "deleted"),
    ("reorder", 3, "reordered"),
    ("truncate", 5, "cut off mid-record"),
    ("cut tail", 5, "cut off"),
])
def test_audit_verify_finds_each_alteration(change, record, why, tmp_path):
    audit = tmp_path / "audit.jsonl"
    lines = _log(audit)
    clean = run("audit", "verify", str(audit))
    assert clean.returncode == 0 and "5 records, chain intact" in " ".join(clean.stdout.split())
    if change == "edit":
        lines[2] = lines[2].replace('"status":200', '"status":500')
    elif change == "edit last":
        lines[4] = lines[4].replace('"status":200', '"status":500')
    elif change == "delete":
        del lines[2]
    elif change == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif change == "truncate":
        lines[4] = lines[4][:20]
    else:
        del lines[4]
    audit.write_text("".join(lines))
    done = run("audit", "verify", str(audit))
    assert done.returncode == 1, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert f"record {record}: " in said and why in said, said


def test_an_audit_write_that_fails_refuses_until_one_succeeds(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", content=False)
    log.start(model="m")
    os.close(log._fd)  # as a disk that went away
    with pytest.raises(AuditError, match="cannot write the audit log"):
        log.append(event="request", status=200)
    with pytest.raises(AuditError, match="refused rather than served unaudited"):
        log.check()
    assert verify(log.path).broken is None  # nothing half-written


def test_content_is_logged_only_when_asked_and_the_log_says_so(tmp_path):
    audit = tmp_path / "audit.jsonl"
    log = AuditLog(audit, content=True)
    log.start(model="m")
    log.close()
    assert json.loads(audit.read_text())["log_content"] is True
    assert audit.stat().st_mode & 0o777 == 0o600


def test_self_signed_is_made_once_and_its_fingerprint_pinned(converted, tmp_path):
    """--self-signed: a key pair made on first start (key 0600), the fingerprint printed, the
    same pair at the next start; the openai client trusts that certificate alone."""
    keys = key_file(tmp_path, f"alice {ALICE}\n")
    env = {"LOCALMED_CONFIG_DIR": str(tmp_path / "config")}
    args = ["--ctx", "256", "--host", "0.0.0.0", "--self-signed", "--api-key-file", str(keys),
            "--no-audit"]
    cert = tmp_path / "config" / "tls" / "localmed-serve.pem"
    said, fingerprints = [], []
    for _ in range(2):
        running = Server(converted["llama"]["Q8_0"], *args, env=env)
        running.banner()
        running.stop()
        # (as shown: no escape sequences, the line whole)
        said.append(re.sub(r"\x1b\[[0-9;]*m", "", running.proc.stderr.read()))
        fingerprints.append(subprocess.run(
            ["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
            capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1])
    assert fingerprints[0] == fingerprints[1], "the second start made another pair"
    assert cert.with_suffix(".key").stat().st_mode & 0o777 == 0o600
    assert "made a self-signed certificate" in said[0] and fingerprints[0] in said[0], said[0]
    assert "using a self-signed certificate" in said[1] and fingerprints[0] in said[1], said[1]

    import openai

    running = Server(converted["llama"]["Q8_0"], *args, env=env)
    try:
        pinned = openai.OpenAI(base_url=f"https://127.0.0.1:{running.port}/v1", api_key=ALICE,
                               max_retries=0, http_client=httpx.Client(verify=str(cert)))
        assert pinned.models.list().data
    finally:
        running.stop()


def test_printed_text_is_as_it_is(capsys):
    """A fingerprint holding ":CD:" was printed with an emoji in its place."""
    from localmed.cli.common import console, err_console

    console().print("B9:E9:99:CD:7D:11", soft_wrap=True)
    err_console().print("99:CD:7D", soft_wrap=True)
    out, err = capsys.readouterr()
    assert out.strip() == "B9:E9:99:CD:7D:11" and err.strip() == "99:CD:7D"


def test_a_stop_right_after_the_banner_is_clean(converted):
    """SIGTERM as soon as the server says it is up (the event loop may be still in the
    making): it stops with status 0 and prints no traceback or warning."""
    for _ in range(3):
        running = Server(converted["llama"]["Q8_0"], "--ctx", "256")
        running.banner()
        assert running.stop() == 0
        said = running.proc.stderr.read()
        for bad in ("Traceback", "Exception ignored", "never awaited"):
            assert bad not in said, said
