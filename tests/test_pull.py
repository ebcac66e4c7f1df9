"""`localmed pull` with no network: a Hugging Face cache laid out as huggingface_hub lays it out
(``models--owner--name/{blobs,snapshots,refs}``, blobs named by their sha256), read by the real
huggingface_hub with ``HF_HUB_OFFLINE=1``. The real SmolLM2 GGUF is pulled, checked, placed
with its manifest, then planned and served by ID."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fake_hub import FakeHub
from tests.gguf_files import rewrite_gguf
from tests.test_serve import Server
from tests.tiny_models import SHARED

COMMIT = "a" * 40
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


def lay_out(cache: Path, repo: str, files: dict[str, Path], *, commit: str = COMMIT,
            lie: set[str] = frozenset()) -> None:
    """huggingface_hub's cache layout; ``lie``: files whose blob name is not their sha256."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if name in lie:
            digest = hashlib.sha256(b"another file").hexdigest()
        blob = root / "blobs" / digest
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def write_split(source: Path, path: Path, parts: int = 2) -> list[Path]:
    """``source`` rewritten by gguf-py's GGUFWriter as a split GGUF (llama.cpp's format:
    ``split.*`` keys, ``-0000k-of-0000N.gguf`` names), ``parts`` files."""
    return rewrite_gguf(source, path, parts=parts)


def localmed(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmed", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)


@pytest.fixture
def hub(tmp_path, smollm2, converted) -> dict[str, str]:
    cache = tmp_path / "hf"
    lay_out(cache, REPO, {"smollm2-135m-instruct-q4_1.gguf": smollm2["gguf"],
                          "smollm2-135m-instruct-Q8_0.gguf": converted["llama"]["Q8_0"]})
    lay_out(cache, "someone/two-q4", {"a-Q4_K_M.gguf": converted["llama"]["Q4_K_M"],
                                      "b-Q4_K_M.gguf": converted["llama"]["Q4_K_M"]})
    lay_out(cache, "someone/no-gguf", {"README.gguf.txt": smollm2["gguf"]})
    lay_out(cache, "someone/tampered", {"m-Q4_1.gguf": smollm2["gguf"]}, lie={"m-Q4_1.gguf"})
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    lay_out(cache, "someone/damaged", {"m-Q4_1.gguf": damaged})
    (tmp_path / "split").mkdir()
    parts = write_split(smollm2["gguf"], tmp_path / "split" / "smollm2-q4_1.gguf")
    assert [p.name for p in parts] == ["smollm2-q4_1-00001-of-00002.gguf",
                                       "smollm2-q4_1-00002-of-00002.gguf"]
    lay_out(cache, "someone/SmolLM2-split-GGUF", {p.name: p for p in parts})
    lay_out(cache, "someone/half-split", {parts[0].name: parts[0]})
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
            "LOCALMED_DATA_DIR": str(tmp_path / "data")}


def models(env: dict[str, str]) -> list[str]:
    folder = Path(env["LOCALMED_DATA_DIR"]) / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_pull_checks_places_and_records(hub, smollm2):
    done = localmed(hub, "pull", f"{REPO}:q4_1")
    assert done.returncode == 0, done.stderr
    assert models(hub) == ["smollm2-135m-instruct.Q4_1.gguf",
                           "smollm2-135m-instruct.Q4_1.manifest.json"]
    placed = Path(hub["LOCALMED_DATA_DIR"]) / "models" / "smollm2-135m-instruct.Q4_1.gguf"
    assert placed.read_bytes() == smollm2["gguf"].read_bytes()
    manifest = json.loads(placed.with_name("smollm2-135m-instruct.Q4_1.manifest.json")
                          .read_text())
    digest = hashlib.sha256(smollm2["gguf"].read_bytes()).hexdigest()
    assert manifest["source"] == REPO and manifest["revision"] == COMMIT
    assert manifest["inputs_sha256"] == {"smollm2-135m-instruct-q4_1.gguf": digest}
    assert manifest["converter"] == f"{REPO} (not made by localmed)"
    info = localmed(hub, "info", str(placed), "--json")
    assert json.loads(info.stdout)["provenance"]["converter"].endswith("(not made by localmed)")
    # found by ID
    plan = localmed(hub, "plan", "smollm2-135m-instruct")
    assert plan.returncode == 0, plan.stderr
    assert "Q4_1" in plan.stdout
    other = localmed(hub, "plan", "smollm2-135m-instruct", "--quant", "Q8_0")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "localmed pull REPO:Q8_0 (it has Q4_1)" in other.stderr
    again = localmed(hub, "pull", f"{REPO}:Q4_1")
    assert again.returncode == 2 and "already in the library" in again.stderr


def test_a_pulled_model_is_served_by_id(hub):
    assert localmed(hub, "pull", f"{REPO}:Q4_1").returncode == 0
    running = Server(Path("smollm2-135m-instruct"), "--threads", "2",
                     env={"LOCALMED_DATA_DIR": hub["LOCALMED_DATA_DIR"]})
    try:
        reply = httpx.post(f"{running.url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
            "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
    finally:
        running.stop()


@pytest.mark.parametrize(("spec", "fragments"), [
    (f"{REPO}:Q5_K_M", ["has no Q5_K_M GGUF", "it has: Q4_1, Q8_0"]),
    (REPO, ["several GGUFs", "Q4_1, Q8_0"]),
    ("someone/two-q4:Q4_K_M", ["several Q4_K_M GGUFs", "a-Q4_K_M.gguf, b-Q4_K_M.gguf"]),
    ("someone/no-gguf", ["has no GGUF file"]),
    ("someone/tampered:Q4_1", ["differs from the hub's", "damaged"]),
    ("someone/damaged:Q4_1", ["m-Q4_1.gguf"]),
    ("someone/half-split:Q4_1", ["parts of smollm2-q4_1-00001-of-00002.gguf are not complete"]),
    ("someone/not-cached:Q4_1", ["not-cached", "HF_HUB_OFFLINE"]),
    ("no-slash", ["owner/name[:QUANT]"]),
])
def test_bad_pulls_are_one_line_and_place_nothing(hub, spec, fragments):
    done = localmed(hub, "pull", spec)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for fragment in fragments:
        assert fragment in err, err
    assert models(hub) == []


def test_a_split_gguf_is_pulled_whole_and_loads_as_llama_cpp_loads_it(hub, smollm2):
    done = localmed(hub, "pull", "someone/SmolLM2-split-GGUF:Q4_1")
    assert done.returncode == 0, done.stderr
    assert models(hub) == ["smollm2-split.Q4_1-00001-of-00002.gguf",
                           "smollm2-split.Q4_1-00002-of-00002.gguf",
                           "smollm2-split.Q4_1.manifest.json"]
    manifest = json.loads((Path(hub["LOCALMED_DATA_DIR"]) / "models" /
                           "smollm2-split.Q4_1.manifest.json").read_text())
    assert manifest["files"] == ["smollm2-q4_1-00001-of-00002.gguf",
                                 "smollm2-q4_1-00002-of-00002.gguf"]
    assert len(manifest["inputs_sha256"]) == 2
    # the footprint counts both parts: the same as the whole file's
    plan = localmed(hub, "plan", "smollm2-split")
    whole = localmed(hub, "plan", str(smollm2["gguf"]))
    assert plan.returncode == 0, plan.stderr
    line = next(x for x in plan.stdout.splitlines() if "weights" in x)
    assert line in whole.stdout, (plan.stdout, whole.stdout)
    # and llama.cpp answers from it, found by ID
    running = Server(Path("smollm2-split"), "--threads", "2",
                     env={"LOCALMED_DATA_DIR": hub["LOCALMED_DATA_DIR"]})
    try:
        reply = httpx.post(f"{running.url}/v1/completions", timeout=120, json={
            "prompt": "The patient", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
    finally:
        running.stop()
    # exported: Ollama cannot import split GGUFs (one line); LM Studio gets every part
    out = Path(hub["LOCALMED_DATA_DIR"]).parent
    ollama = localmed(hub, "export", "smollm2-split", "--ollama", str(out / "ollama"))
    assert ollama.returncode == 2 and "split GGUF (2 parts)" in ollama.stderr
    assert len(ollama.stderr.strip().splitlines()) == 1 and not (out / "ollama").exists()
    lms = localmed(hub, "export", "smollm2-split", "--lmstudio", str(out / "lms"))
    assert lms.returncode == 0, lms.stderr
    placed = sorted(p.name for p in (out / "lms" / "localmed" / "smollm2-split-GGUF").iterdir())
    assert placed == ["smollm2-split.Q4_1-00001-of-00002.gguf",
                      "smollm2-split.Q4_1-00002-of-00002.gguf"]


def test_a_split_gguf_read_from_the_wrong_part_or_with_a_part_missing_is_one_line(
        tmp_path, smollm2):
    from localmed.errors import GGUFFileError
    from localmed.formats.gguf import read_gguf_info

    first, second = write_split(smollm2["gguf"], tmp_path / "m.gguf")
    assert read_gguf_info(first).n_tensors == read_gguf_info(smollm2["gguf"]).n_tensors
    with pytest.raises(GGUFFileError, match="open its first part"):
        read_gguf_info(second)
    second.unlink()
    with pytest.raises(GGUFFileError, match=r"m-00002-of-00002\.gguf is missing"):
        read_gguf_info(first)


def test_a_registry_id_that_names_a_gguf_repo_is_pulled_by_id(hub, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "models.toml").write_text(
        '[models.internist-7b]\ngguf_repos = ["HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"]\n'
        'default_quant = "Q4_1"\n')
    env = {**hub, "LOCALMED_CONFIG_DIR": str(config)}
    missing = localmed(env, "plan", "internist-7b", "--quant", "Q4_1")
    assert "localmed pull internist-7b:Q4_1" in missing.stdout  # the way to get it
    done = localmed(env, "pull", "internist-7b")
    assert done.returncode == 0, done.stderr
    assert models(env) == ["internist-7b.Q4_1.gguf", "internist-7b.Q4_1.manifest.json"]
    plan = localmed(env, "plan", "internist-7b")
    assert plan.returncode == 0 and "an estimate" not in plan.stdout, plan.stdout
    # an id whose entry names no repo says how else to get it
    other = localmed(env, "pull", "meditron-7b")
    assert other.returncode == 2
    assert "names no GGUF repository for meditron-7b" in other.stderr
    assert "localmed quantize meditron-7b" in other.stderr


def test_a_full_disk_during_the_copy_leaves_nothing_placed(hub, full_disk):
    done = localmed(hub, "pull", f"{REPO}:Q4_1", "--dir", str(full_disk))
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "out of disk space" in err, err
    assert list(full_disk.iterdir()) == []


def test_no_network_is_one_line(tmp_path):
    """The hub unreachable (a closed port on this machine: nothing leaves it)."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": str(tmp_path / "hf"), "LOCALMED_DATA_DIR": str(tmp_path / "data")}
    done = localmed(env, "pull", "someone/model-GGUF:Q4_K_M")
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the Hugging Face hub" in err, err
    assert models(env) == []


def test_a_pulled_model_is_benched_by_id_and_its_rows_say_who_made_it(tmp_path, smollm2,
                                                                      smollm2_converted):
    """The published Q4_1 against an F16 (made by localmed), both pulled from one repo, benched
    by the id pull gave them: each row says who made its file."""
    cache = tmp_path / "hf"
    lay_out(cache, REPO, {"smollm2-135m-instruct-q4_1.gguf": smollm2["gguf"],
                          "smollm2-135m-instruct-f16.gguf": smollm2_converted["F16"]})
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "LOCALMED_DATA_DIR": str(tmp_path / "data")}
    for quant in ("Q4_1", "F16"):
        assert localmed(env, "pull", f"{REPO}:{quant}").returncode == 0
    out = tmp_path / "bench"
    done = localmed(env, "bench", "smollm2-135m-instruct", "--data",
                    str(SHARED / "benchmarks" / "medqa.jsonl"), "--limit", "8", "--threads", "2",
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    runs = {r["quant"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"F16", "Q4_1"} and runs["Q4_1"]["n"] == 8
    assert runs["Q4_1"]["made_by"] == f"{REPO} (not made by localmed)"
    assert runs["F16"]["made_by"] == "localmed"
    assert "(not made by localmed)" in " ".join(done.stdout.split())


@pytest.fixture
def fake_hub(smollm2, tmp_path):
    hub = FakeHub(REPO, {"smollm2-135m-instruct-q4_1.gguf": smollm2["gguf"]})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "LOCALMED_DATA_DIR": str(tmp_path / "data"), "HF_HUB_DISABLE_XET": "1"}
    yield hub, env
    hub.close()


def test_a_download_cut_off_mid_file_is_resumed_where_it_stopped(fake_hub, smollm2):
    """Online, through the real huggingface_hub: the connection drops twice mid-file; the
    download goes on from the byte it reached (Range requests), and the sha256 is checked."""
    hub, env = fake_hub
    name = "smollm2-135m-instruct-q4_1.gguf"
    hub.cut_after[name] = (20_000_000, 2)
    done = localmed(env, "pull", f"{REPO}:Q4_1")
    assert done.returncode == 0, done.stderr
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith(name)]
    # resumed from what arrived (huggingface_hub keeps whole 10 MiB chunks of it), not from 0
    assert len(ranges) == 3 and ranges[0] is None, ranges
    starts = [int(r.removeprefix("bytes=").removesuffix("-")) for r in ranges[1:]]
    assert 0 < starts[0] <= 20_000_000 < starts[1] <= 40_000_000, ranges
    placed = Path(env["LOCALMED_DATA_DIR"]) / "models" / "smollm2-135m-instruct.Q4_1.gguf"
    assert placed.read_bytes() == smollm2["gguf"].read_bytes()


def test_a_download_that_keeps_failing_is_one_line_and_places_nothing(fake_hub, tmp_path):
    hub, env = fake_hub
    hub.cut_after["smollm2-135m-instruct-q4_1.gguf"] = (1_000_000, 100)
    done = localmed(env, "pull", f"{REPO}:Q4_1")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error:") and "download of smollm2-135m-instruct-q4_1.gguf " \
        "failed" in line
    assert models(env) == []
    assert not list((tmp_path / "hf").rglob("*.incomplete"))  # no partial file left behind


def test_a_gated_repo_without_a_token_is_one_line_and_with_one_is_pulled(fake_hub):
    hub, env = fake_hub
    hub.token = "hf_clinic"
    done = localmed(env, "pull", f"{REPO}:Q4_1")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "gated repository" in line and "HF_TOKEN" in line
    assert models(env) == []
    done = localmed({**env, "HF_TOKEN": "hf_clinic"}, "pull", f"{REPO}:Q4_1")
    assert done.returncode == 0, done.stderr
    assert models(env) == ["smollm2-135m-instruct.Q4_1.gguf",
                           "smollm2-135m-instruct.Q4_1.manifest.json"]


def test_a_pulled_model_is_chatted_with_by_id(hub, monkeypatch):
    """What `localmed chat smollm2-135m-instruct` does before the app starts: the id found in
    the library, the GGUF's own template chosen, a reply from llama.cpp."""
    from localmed.chat import ChatSession, open_runtime, resolve_chat_model
    from localmed.registry import Registry

    assert localmed(hub, "pull", f"{REPO}:Q4_1").returncode == 0
    monkeypatch.setenv("LOCALMED_DATA_DIR", hub["LOCALMED_DATA_DIR"])
    model = resolve_chat_model("smollm2-135m-instruct", Registry.load())
    assert model.path == Path(hub["LOCALMED_DATA_DIR"]) / "models" / \
        "smollm2-135m-instruct.Q4_1.gguf"
    runtime = open_runtime(model, n_ctx=512, threads=2)
    try:
        session = ChatSession.open(model, runtime)
        session.params = dataclasses.replace(session.params, max_tokens=16)
        assert session.template_choice.reason == "the chat template embedded in the GGUF"
        assert "".join(session.ask("Name one cause of chest pain.")).strip()
    finally:
        runtime.close()
