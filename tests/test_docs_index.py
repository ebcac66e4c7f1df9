"""``localmed docs`` as a user runs it: a folder indexed, kept in step with the disk, searched;
and every way a folder or an index can be wrong, each one line, the rest indexed, nothing
half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from localmed import cli
from localmed.retrieval.store import DocsIndex
from tests.documents import (
    Section,
    pubmedqa,
    write_corpus,
    write_docx,
    write_markdown,
    write_pdf,
    write_scanned_pdf,
)

SEPSIS = Section("Sepsis", ("Give broad-spectrum antibiotics within one hour of recognising "
                            "septic shock.",))
ASTHMA = Section("Asthma", ("Inhaled corticosteroids are the first-line controller treatment "
                            "for persistent asthma in adults.",))


def docs(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["docs", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def search(capsys, name: str, query: str, *extra: str) -> list[dict]:
    code, out, err = docs(capsys, "search", name, query, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "guidelines"
    (root / "ward").mkdir(parents=True)
    write_pdf(root / "sepsis.pdf", [SEPSIS])
    write_markdown(root / "ward" / "asthma.md", [ASTHMA])
    write_docx(root / "ward" / "doses.docx", [Section("Doses", ("Ceftriaxone 2 g IV once "
                                                                 "daily for adults.",))])
    return root


class TestAddAndSearch:
    def test_a_folder_indexed_and_searched(self, folder: Path, capsys):
        code, out, err = docs(capsys, "add", str(folder), "--name", "ward-a")
        assert code == 0, err
        assert "ward-a: 3 added, 0 unchanged" in out
        found = search(capsys, "ward-a", "how soon are antibiotics given in septic shock?")
        best = found[0]
        assert set(best) == {"source", "page", "heading", "text", "score"}
        assert (best["source"], best["page"], best["heading"]) == ("sepsis.pdf", 1, "Sepsis")
        assert "within one hour" in best["text"]
        doses = search(capsys, "ward-a", "ceftriaxone dose", "-k", "1")
        assert len(doses) == 1 and doses[0]["source"] == "ward/doses.docx"
        assert doses[0]["page"] is None
        code, out, _ = docs(capsys, "list", "--json")
        listed = {row["name"]: row for row in json.loads(out)}
        assert listed["ward-a"]["folder"] == str(folder) and listed["ward-a"]["files"] == 3

    def test_edits_deletions_and_touches_are_seen(self, folder: Path, capsys):
        assert docs(capsys, "add", str(folder), "--name", "ward-b")[0] == 0
        (folder / "ward" / "asthma.md").write_text("# Asthma\n\nSalbutamol 100 micrograms as "
                                                   "needed for relief.\n", encoding="utf-8")
        (folder / "ward" / "doses.docx").unlink()
        write_markdown(folder / "new.md", [Section("COPD", ("Tiotropium once daily.",))])
        os.utime(folder / "sepsis.pdf")  # a new time, the same bytes
        code, out, err = docs(capsys, "add", str(folder), "--name", "ward-b")
        assert code == 0, err
        assert "1 added, 1 changed, 1 removed, 1 unchanged" in out
        assert "Salbutamol" in search(capsys, "ward-b", "salbutamol")[0]["text"]
        assert all(p["source"] != "ward/doses.docx" for p in search(capsys, "ward-b", "dose"))
        code, out, _ = docs(capsys, "add", str(folder), "--name", "ward-b")
        assert "3 unchanged" in out

    def test_an_unreadable_file_is_skipped_the_rest_indexed(self, folder: Path, capsys):
        write_scanned_pdf(folder / "scan.pdf")
        write_pdf(folder / "locked.pdf", [SEPSIS], password="x")
        (folder / "empty.txt").write_bytes(b"")
        (folder / "cut.pdf").write_bytes((folder / "sepsis.pdf").read_bytes()[:300])
        (folder / "loop").symlink_to(folder)
        code, out, err = docs(capsys, "add", str(folder), "--name", "ward-c")
        assert code == 0
        assert "ward-c: 3 added, 0 unchanged, 5 not readable" in out
        for fragment in ("scan.pdf: no text layer (scanned?); localmed does not OCR",
                         "locked.pdf: encrypted", "empty.txt: empty file",
                         "cut.pdf: damaged or truncated PDF", "loop: a symbolic link loop"):
            assert fragment in " ".join(err.split()), fragment
        code, out, _ = docs(capsys, "list", "ward-c", "--json")
        listed = {row["source"]: row for row in json.loads(out)}
        assert listed["scan.pdf"]["error"].startswith("no text layer")
        assert listed["sepsis.pdf"]["passages"] == 1
        # unchanged and still unreadable: not read again, and said so once
        code, out, err = docs(capsys, "add", str(folder), "--name", "ward-c")
        assert "3 unchanged, 5 not readable" in out
        assert "4 unchanged files could not be read before" in " ".join(err.split())

    def test_a_file_over_the_size_limit(self, folder: Path, capsys):
        (folder / "huge.txt").write_text("dose " * 600_000, encoding="utf-8")
        code, out, err = docs(capsys, "add", str(folder), "--name", "ward-d", "--max-file-mb",
                              "1")
        assert code == 0 and "huge.txt: 2.9 MB, over the 1 MB limit" in " ".join(err.split())
        assert "3 added" in out

    @pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
    def test_a_file_this_user_cannot_read(self, folder: Path):
        tmp_path = Path(tempfile.mkdtemp(prefix="localmed-perm-"))  # outside pytest's 0700 one
        folder = Path(shutil.copytree(folder, tmp_path / "guidelines"))
        secret = folder / "secret.md"
        write_markdown(secret, [Section("Private", ("Not for this user.",))])
        secret.chmod(0)
        data = tmp_path / "data"
        data.mkdir()
        env = {**os.environ, "LOCALMED_DATA_DIR": str(data)}
        command = [sys.executable, "-m", "localmed", "docs", "add", str(folder), "--name", "e"]
        if os.geteuid() == 0:  # root reads anything: run it as nobody
            for path in (tmp_path, folder, folder / "ward", data):
                path.chmod(0o777)
            for path in folder.rglob("*"):
                if path.is_file() and path != secret:
                    path.chmod(0o644)
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
            if shutil.which("setpriv") is None:
                pytest.skip("needs setpriv (util-linux) to drop root")
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env,
                                    timeout=300)
        finally:
            shutil.rmtree(tmp_path, ignore_errors=True)
        assert result.returncode == 0, result.stderr
        assert "secret.md: cannot be read: permission denied" in " ".join(result.stderr.split())
        assert "3 added" in result.stdout


class TestRefusals:
    def test_a_missing_folder_and_an_unknown_index(self, tmp_path: Path, capsys):
        code, _, err = docs(capsys, "add", str(tmp_path / "nowhere"))
        assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
        code, _, err = docs(capsys, "search", "no-such-index", "sepsis")
        assert code == 2 and "no document index called 'no-such-index'" in err

    def test_one_name_one_folder(self, folder: Path, tmp_path: Path, capsys):
        assert docs(capsys, "add", str(folder), "--name", "ward-f")[0] == 0
        other = tmp_path / "other"
        other.mkdir()
        code, _, err = docs(capsys, "add", str(other), "--name", "ward-f")
        assert code == 2 and f"ward-f indexes {folder}" in " ".join(err.split())

    def test_an_index_written_by_a_newer_localmed(self, folder: Path, capsys):
        assert docs(capsys, "add", str(folder), "--name", "ward-g")[0] == 0
        path = Path(os.environ["LOCALMED_DATA_DIR"]) / "docs" / "ward-g.sqlite"
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 99")
        for args in (("search", "ward-g", "sepsis"), ("add", str(folder), "--name", "ward-g")):
            code, _, err = docs(capsys, *args)
            assert code == 2 and "written by a newer localmed (index format 99" in \
                " ".join(err.split()), err

    def test_a_file_that_is_not_an_index(self, capsys):
        path = Path(os.environ["LOCALMED_DATA_DIR"]) / "docs" / "junk.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a database at all" * 100)
        code, _, err = docs(capsys, "search", "junk", "sepsis")
        assert code == 2 and "not a readable index" in err

    def test_one_writer_at_a_time(self, folder: Path, capsys):
        assert docs(capsys, "add", str(folder), "--name", "ward-h")[0] == 0
        path = Path(os.environ["LOCALMED_DATA_DIR"]) / "docs" / "ward-h.sqlite"
        with DocsIndex(path, writer=True):
            code, _, err = docs(capsys, "add", str(folder), "--name", "ward-h")
            assert code == 2 and "another localmed docs add is updating" in err
            assert search(capsys, "ward-h", "sepsis")  # readers are not held up

    def test_remove(self, folder: Path, capsys):
        assert docs(capsys, "add", str(folder), "--name", "ward-i")[0] == 0
        assert docs(capsys, "remove", "ward-i")[0] == 0
        assert not (Path(os.environ["LOCALMED_DATA_DIR"]) / "docs" / "ward-i.sqlite").exists()
        assert folder.joinpath("sepsis.pdf").is_file()
        assert docs(capsys, "remove", "ward-i")[0] == 2


def test_killed_mid_index_then_the_next_run_goes_on(tmp_path: Path, minilm: Path):
    """SIGKILL while a folder is embedded: the index opens, holds whole files only, and the
    next run adds the rest."""
    folder = tmp_path / "corpus"
    where = write_corpus(folder, pubmedqa(60), per_file=2)
    files = len({source for source, _ in where.values()})
    env = {**os.environ, "LOCALMED_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "localmed", "docs", "add", str(folder), "--name", "k",
               "--embed", str(minilm), "--threads", "1"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    index_path = tmp_path / "data" / "docs" / "k.sqlite"
    deadline = time.monotonic() + 240
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if index_path.is_file():
            try:
                with sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=1) as db:
                    done = db.execute("SELECT count(*) FROM files").fetchone()[0]
            except sqlite3.Error:
                done = 0
            if done >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    if done < 3:
        pytest.skip("the run ended before three files were in")
    with DocsIndex(index_path) as index:
        records = index.files()
        assert 3 <= len(records) < files
        for record in records.values():  # every file in it is whole: passages and vectors
            count = index.db.execute(
                "SELECT count(*), count(v.passage_id) FROM passages p JOIN files f ON "
                "f.id = p.file_id LEFT JOIN vectors v ON v.passage_id = p.id WHERE f.path = ?",
                (record.path,)).fetchone()
            assert count[0] == record.passages > 0 and count[1] == count[0]
    result = subprocess.run(command[:-2], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"{files - len(records)} added, {len(records)} unchanged" in result.stdout


def test_the_disk_filling_keeps_what_was_finished(tmp_path: Path, minilm: Path):
    """The index's folder on a filesystem with 600 kB free: the run stops in one line, the index
    keeps the files finished before, and with room again the next run completes it."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a small private filesystem")
    folder = tmp_path / "corpus"
    write_corpus(folder, pubmedqa(100), per_file=1)
    mount = tmp_path / "small"
    mount.mkdir()
    localmed = [sys.executable, "-m", "localmed"]
    script = f"""
set -u
mount -t tmpfs -o size=16m tmpfs {mount} || exit 77
head -c 16170000 /dev/zero > {mount}/filler
export LOCALMED_DATA_DIR={mount}/data
{' '.join(localmed)} docs add {folder} --name full --embed {minilm} --threads 1; echo "first=$?"
{' '.join(localmed)} docs list full --json > {tmp_path}/listed.json; echo "list=$?"
rm {mount}/filler
{' '.join(localmed)} docs add {folder} --name full; echo "second=$?"
"""
    command = ["unshare", "-rm", "sh", "-c", script] if os.geteuid() != 0 else \
        ["unshare", "-m", "sh", "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode == 77 or "first=" not in result.stdout:
        pytest.skip(f"no private tmpfs here: {result.stderr.strip()[-200:]}")
    err = " ".join(result.stderr.split())
    assert "first=2" in result.stdout, result.stdout + result.stderr
    assert "error: the disk filled while indexing" in err and "Traceback" not in err
    assert "list=0" in result.stdout
    kept = [row for row in json.loads((tmp_path / "listed.json").read_text())
            if row["error"] is None]
    assert 0 < len(kept) < 100 and all(row["passages"] > 0 for row in kept)
    assert "second=0" in result.stdout and f"{100 - len(kept)} added" in result.stdout
