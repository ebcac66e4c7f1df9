"""Whole classes of bad input and faults, one test per class: each gets a clean one-line error,
a non-zero exit, and leaves nothing half-written or mixed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from localmed import cli
from tests.test_bad_inputs import assert_one_line_error, leftovers, run_cli
from tests.tiny_models import SHARED


def assert_error_after_progress(code: int, err: str, *fragments: str) -> None:
    """Exit 2 and one ``error:`` line, last; progress bars may come before it."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and err.endswith(errors[0]), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], err


QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def start_quantize(checkpoint: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "localmed", "quantize", str(checkpoint), "--quant",
         ",".join(QUANTS), "--out", str(out), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for_temporary(proc: subprocess.Popen[bytes], out: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.endswith(".part") for p in out.glob(".*")):
            return
        time.sleep(0.005)
    pytest.skip("the conversion finished before a temporary file could be seen")


class TestSignals:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
    def test_term_and_hup_clean_up_like_ctrl_c(self, sig, tmp_path, checkpoints):
        out = tmp_path / "out"
        proc = start_quantize(checkpoints["mixtral"], out)
        wait_for_temporary(proc, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err.decode()
        assert b"Traceback" not in err and b"no partial files" in err
        names = leftovers(out)
        assert not [n for n in names if n.startswith(".")], names
        for name in names:
            if name.endswith(".gguf"):
                gguf.GGUFReader(out / name)  # every file that exists is whole

    def test_a_killed_run_leaves_temporaries_the_next_run_removes(self, tmp_path, checkpoints):
        out = tmp_path / "out"
        stale: list[str] = []
        for _ in range(5):  # a kill that lands as one file is renamed and the next not begun
            proc = start_quantize(checkpoints["mixtral"], out)  # leaves none: kill again
            wait_for_temporary(proc, out)
            proc.kill()  # SIGKILL, as the OOM killer sends it: nothing can clean up
            proc.communicate(timeout=60)
            stale = [n for n in leftovers(out) if n.startswith(".")]
            if stale:
                break
        assert stale, "SIGKILL should have left a temporary behind"
        code = cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q8_0",
                         "--out", str(out)])
        assert code == 0
        assert not [n for n in leftovers(out) if n.startswith(".")]

    def test_a_temporary_of_a_running_process_is_left_alone(self, tmp_path):
        from localmed.atomic import remove_stale_temporaries

        live = tmp_path / f".x.Q8_0.gguf.{os.getppid()}.part"
        dead = tmp_path / ".x.F16.gguf.999999999.part"
        for path in (live, dead):
            path.write_bytes(b"x" * 10)
        assert remove_stale_temporaries(tmp_path) == 10
        assert live.exists() and not dead.exists()


class TestOutputs:
    def test_a_name_cannot_leave_the_output_folder(self, tmp_path, capsys, checkpoints):
        out = tmp_path / "out"
        for name in ("../escape", "a/b", ".hidden"):
            code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "Q8_0",
                                "--out", str(out), "--name", name)
            assert_one_line_error(code, err, "--name must be a plain file name")
        assert not (tmp_path / "escape.Q8_0.gguf").exists() and leftovers(out) == []

    def test_an_output_that_is_a_folder_is_refused_before_converting(self, tmp_path, capsys,
                                                                     checkpoints):
        out = tmp_path / "out"
        (out / "llama.Q8_0.gguf").mkdir(parents=True)
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "F16,Q8_0",
                            "--out", str(out))
        assert_one_line_error(code, err, "llama.Q8_0.gguf: is a folder")
        assert leftovers(out) == ["llama.Q8_0.gguf"]

    def test_running_out_of_disk_mid_write_is_one_line_and_leaves_nothing(
            self, tmp_path, capsys, checkpoints, monkeypatch):
        import errno

        import localmed.quantize.gguf_out

        written = {"n": 0}
        real = localmed.quantize.gguf_out.encode

        def fill_disk(data, qtype):
            written["n"] += 1
            if written["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(data, qtype)

        monkeypatch.setattr(localmed.quantize.gguf_out, "encode", fill_disk)
        out = tmp_path / "out"
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "F16",
                            "--out", str(out))
        assert_error_after_progress(code, err, "llama.F16.gguf: out of disk space")
        assert leftovers(out) == []


class TestDamagedGGUF:
    """`info` and `plan` report a damaged or crafted file as damaged, quickly, with no
    allocation sized from the file's claims."""

    @pytest.fixture
    def good(self, converted, tmp_path) -> Path:
        path = tmp_path / "model.gguf"
        shutil.copyfile(converted["llama"]["Q8_0"], path)
        return path

    def check(self, capsys, path: Path, *fragments: str) -> None:
        capsys.readouterr()  # what making the file printed
        for command in ("info", "plan"):
            start = time.monotonic()
            code, err = run_cli(capsys, command, str(path))
            assert_one_line_error(code, err, *fragments)
            assert time.monotonic() - start < 5

    def rewrite(self, src: Path, dst: Path, **fields: tuple[gguf.GGUFValueType, object]) -> Path:
        from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

        reader = gguf.GGUFReader(src)
        writer = gguf.GGUFWriter(dst, arch="llama")
        copy_with_new_metadata(reader, writer, {k: MetadataDetails(t, v)
                                                for k, (t, v) in fields.items()}, [])
        return dst

    def test_unsupported_version(self, good, capsys):
        data = bytearray(good.read_bytes())
        data[4:8] = struct.pack("<I", 999)
        good.write_bytes(data)
        self.check(capsys, good, "GGUF version 999")

    def test_absurd_counts(self, good, capsys):
        data = bytearray(good.read_bytes())
        data[16:24] = struct.pack("<Q", 2**40)  # key/value count
        good.write_bytes(data)
        self.check(capsys, good, "damaged", "more than")

    def test_truncated_tensor_data(self, good, capsys):
        with good.open("r+b") as fh:
            fh.truncate(good.stat().st_size - 1000)
        self.check(capsys, good, "truncated", "interrupted")

    def test_absurd_block_count(self, good, tmp_path, capsys):
        bad = self.rewrite(good, tmp_path / "blocks.gguf", **{
            "llama.block_count": (gguf.GGUFValueType.UINT32, 1_000_000_000)})
        self.check(capsys, bad, "damaged", "block_count")

    def test_a_context_longer_than_llama_cpp_holds(self, good, tmp_path, capsys):
        # 2^32-1 once passed, then bench died in llama-cpp-python's tokenizer
        bad = self.rewrite(good, tmp_path / "context.gguf", **{
            "llama.context_length": (gguf.GGUFValueType.UINT32, 2**32 - 1)})
        self.check(capsys, bad, "damaged", "llama.context_length is 4,294,967,295",
                   "2,147,483,647 tokens llama.cpp can hold")

    def test_zero_heads(self, good, tmp_path, capsys):
        bad = self.rewrite(good, tmp_path / "heads.gguf", **{
            "llama.attention.head_count": (gguf.GGUFValueType.UINT32, 0)})
        self.check(capsys, bad, "damaged", "head_count")

    def test_a_header_cut_short_says_so(self, good, capsys):
        good.write_bytes(good.read_bytes()[:16])  # the magic is right; the counts are missing
        self.check(capsys, good, "truncated GGUF header (16 bytes)")

    def test_a_folder_named_gguf(self, tmp_path, capsys):
        (tmp_path / "x.gguf").mkdir()
        self.check(capsys, tmp_path / "x.gguf", "is a folder")


class TestNumbers:
    @pytest.mark.parametrize("args,fragment", [
        (["bench", "demo", "--limit", "-1"], "--limit: -1 is not a positive number"),
        (["bench", "demo", "--limit", "0"], "--limit: 0 is not a positive number"),
        (["bench", "demo", "--shots", "-2"], "--shots: -2 is not zero or more"),
        (["plan", "demo", "--ctx", "-5"], "--ctx: -5 is not a positive number"),
        (["chat", "demo", "--threads", "x"], "'x' is not a whole number"),
        (["quantize", "x", "--samples", "0"], "--samples: 0 is not a positive number"),
    ])
    def test_bad_numbers_are_one_line(self, args, fragment, capsys):
        with pytest.raises(SystemExit) as stop:
            cli.main(args)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2
        assert len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err, err

    def test_a_context_below_llama_cpps_minimum_is_raised_and_said(self, cpu_machine):
        from localmed.planner import MIN_CTX, plan_offload
        from tests.test_planner import seven_b

        plan = plan_offload(seven_b(), cpu_machine, n_ctx=100)
        assert plan.n_ctx == MIN_CTX
        assert any("raised from 100 to 256" in r for r in plan.reasons)


def test_data_files_that_are_not_utf8_name_the_file_and_byte(tmp_path, capsys, monkeypatch,
                                                            bench_models):
    bad = tmp_path / "exam.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9", "options": {"A": "x", "B": "y"}, '
                    b'"answer_idx": "A"}\n')
    code, err = run_cli(capsys, "bench", str(bench_models), "--data", str(bad))
    assert_one_line_error(code, err, "exam.jsonl", "not UTF-8", "byte 17")
    config = tmp_path / "config"
    config.mkdir()
    (config / "models.toml").write_bytes(b'[models.x]\nname = "caf\xe9"\n')
    monkeypatch.setenv("LOCALMED_CONFIG_DIR", str(config))
    code, err = run_cli(capsys, "models")
    assert_one_line_error(code, err, "models.toml", "not UTF-8")


def test_bench_without_suites_names_the_command_and_opens_no_socket(tmp_path, capsys,
                                                                    no_network, bench_models):
    code, err = run_cli(capsys, "bench", str(bench_models), "--suites", "medqa",
                        "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "localmed data pull medqa")
    assert no_network == []


def test_bench_settings_that_differ_are_refused_or_started_fresh(tmp_path, capsys,
                                                                 bench_models):
    data = SHARED / "benchmarks" / "pubmedqa.jsonl"
    out = tmp_path / "o"
    base = ["bench", str(bench_models), "--quants", "F16,Q8_0", "--data", str(data), "--limit",
            "2", "--text-docs", "0", "--out", str(out)]
    assert cli.main(base) == 0
    capsys.readouterr()
    code, err = run_cli(capsys, *base, "--ctx", "1024")
    assert_one_line_error(code, err, "other settings", "ctx", "--fresh")
    copy = tmp_path / "exam.jsonl"
    shutil.copyfile(data, copy)
    assert cli.main([*base[:4], "--data", str(copy), *base[6:]]) == 2  # same name, other file
    capsys.readouterr()
    assert cli.main([*base, "--ctx", "1024", "--fresh"]) == 0
    settings = json.loads((out / "run.json").read_text())
    assert settings["n_ctx"] == 1024


class TestCheckpoints:
    """config.json is checked against the tensors (and the tensors against their file) before
    a byte is written."""

    def copy(self, checkpoints, tmp_path, **config) -> Path:
        folder = tmp_path / "ckpt"
        shutil.copytree(checkpoints["llama"], folder)
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
        return folder

    @pytest.mark.parametrize("config,fragment", [
        ({"hidden_size": 512}, "config.json implies"),
        ({"num_hidden_layers": 3}, "num_hidden_layers is 3, the weights have 2 layers"),
        ({"num_attention_heads": 3, "head_dim": None},
         "hidden_size 256 is not a multiple of num_attention_heads 3"),
        ({"num_key_value_heads": 3}, "is not a multiple of num_key_value_heads 3"),
        ({"hidden_size": "256"}, "'hidden_size' must be a positive whole number, got '256'"),
        ({"intermediate_size": 0}, "'intermediate_size' must be a positive whole number"),
        ({"vocab_size": 32001}, "has shape [32000, 256], config.json implies [32001, 256]"),
    ])
    def test_config_that_disagrees_with_the_weights(self, config, fragment, checkpoints,
                                                    tmp_path, capsys):
        folder = self.copy(checkpoints, tmp_path, **config)
        out = tmp_path / "out"
        code, err = run_cli(capsys, "quantize", str(folder), "--quant", "F16,Q4_K_M",
                            "--out", str(out))
        assert_one_line_error(code, err, fragment)
        assert leftovers(out) == []

    @pytest.mark.parametrize("header,fragment", [
        (b"[1, 2, 3]", "not a JSON object"),
        (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, -1]}}', "corrupt"),
        (b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "corrupt"),
    ])
    def test_crafted_safetensors_headers(self, header, fragment, checkpoints, tmp_path, capsys):
        folder = self.copy(checkpoints, tmp_path)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        code, err = run_cli(capsys, "quantize", str(folder), "--quant", "F16",
                            "--out", str(tmp_path / "out"))
        assert_one_line_error(code, err, fragment)

    def test_a_pickle_checkpoint_with_tied_tensors_converts(self, checkpoints, tmp_path, capsys):
        import torch
        from safetensors.torch import load_file

        folder = self.copy(checkpoints, tmp_path)
        state = load_file(str(folder / "model.safetensors"))
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: one storage
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
        out = tmp_path / "out"
        assert cli.main(["quantize", str(folder), "--quant", "F16", "--out", str(out),
                         "--allow-pickle"]) == 0
        assert [n for n in leftovers(out) if n.endswith(".gguf")] == ["ckpt.F16.gguf"]

    def test_ternary_types_are_refused_for_normal_models(self, checkpoints, tmp_path, capsys):
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "TQ1_0",
                            "--out", str(tmp_path / "out"))
        assert_one_line_error(code, err, "TQ1_0", "ternary (BitNet) models only")
        assert leftovers(tmp_path / "out") == []


class TestRegistryValues:
    @pytest.mark.parametrize("fields,fragment", [
        ('parameters_b = nan', "'parameters_b': must be a positive number"),
        ('default_quant = "IQ2_XS"', "IQ2_XS cannot be the default: it needs an importance"),
        ('default_quant = "TQ1_0"', "ternary"),
    ])
    def test_values_that_would_break_later_are_refused(self, fields, fragment, tmp_path,
                                                       capsys, monkeypatch):
        config = tmp_path / "config"
        config.mkdir()
        (config / "models.toml").write_text(f"[models.internist-7b]\n{fields}\n")
        monkeypatch.setenv("LOCALMED_CONFIG_DIR", str(config))
        code, err = run_cli(capsys, "models")
        assert_one_line_error(code, err, "internist-7b", fragment)


def failure_cases(tmp: Path, bench_models: Path) -> dict[str, list[str]]:
    """Bad invocations a clinician can type, each expected to fail with one line."""
    not_gguf = tmp / "notes.gguf"
    not_gguf.write_text("discharge summary")
    a_file = tmp / "a-file"
    a_file.write_text("x")
    malformed = tmp / "exam.jsonl"
    malformed.write_text('{"question": "Q", "options": {"A": "x"}, "answer_idx": "A"}\n')
    broken_json = tmp / "broken.jsonl"
    broken_json.write_text("{not json\n")
    (tmp / "x.gguf").mkdir(exist_ok=True)
    empty = tmp / "empty-folder"
    empty.mkdir(exist_ok=True)
    return {
        "quantize: no such folder": ["quantize", str(tmp / "nope") + "/"],
        "quantize: a file": ["quantize", str(a_file)],
        "quantize: no config.json": ["quantize", str(empty)],
        "quantize: unknown quant": ["quantize", str(empty), "--quant", "Q9_X"],
        "quantize: unknown model id": ["quantize", "meditron-9000"],
        "info: missing": ["info", str(tmp / "missing.gguf")],
        "info: a folder": ["info", str(tmp / "x.gguf")],
        "info: not a GGUF": ["info", str(not_gguf)],
        "info: a checkpoint folder": ["info", str(empty)],
        "plan: missing": ["plan", str(tmp / "missing.gguf")],
        "plan: zero context": ["plan", "demo", "--ctx", "0"],
        "chat: missing file": ["chat", str(tmp / "missing.gguf")],
        "chat: not a GGUF": ["chat", str(not_gguf)],
        "chat: unknown id": ["chat", "meditron-9000"],
        "chat: registry model not made": ["chat", "meditron-7b"],
        "bench: unknown id": ["bench", "meditron-9000"],
        "bench: empty folder": ["bench", str(empty)],
        "bench: missing data": ["bench", str(bench_models), "--data", str(tmp / "no.jsonl")],
        "bench: one option": ["bench", str(bench_models), "--data", str(malformed)],
        "bench: not JSON": ["bench", str(bench_models), "--data", str(broken_json)],
        "bench: out is a file": ["bench", str(bench_models), "--data", str(SHARED / "benchmarks"
                                 / "pubmedqa.jsonl"), "--limit", "1", "--out", str(a_file)],
        "bench: unknown suite": ["bench", str(bench_models), "--suites", "usmle9"],
        "data pull: unknown set": ["data", "pull", "usmle9"],
        "install-converter: not an archive": ["install-converter", "--sdist", str(a_file)],
        "unknown command": ["frobnicate"],
    }


def test_every_cli_failure_is_one_line_without_traceback(tmp_path, capsys, bench_models,
                                                         no_network):
    for label, args in failure_cases(tmp_path, bench_models).items():
        try:
            code = cli.main(args)
        except SystemExit as stop:  # argparse
            code = stop.code
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (label, err)
        assert len(errors) == 1 and err.endswith(errors[0]), (label, err)
        assert "Traceback" not in err, (label, err)
    assert no_network == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_bench_folder_names_the_file(tmp_path, capsys, bench_models):
    out = tmp_path / "results"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, err = run_cli(capsys, "bench", str(bench_models), "--data",
                            str(SHARED / "benchmarks" / "pubmedqa.jsonl"), "--limit", "1",
                            "--out", str(out))
    finally:
        out.chmod(0o700)
    assert_one_line_error(code, err, "run.json: permission denied")
    assert ".part" not in err


def test_an_os_error_names_the_final_file_not_the_temporary(tmp_path):
    from localmed.atomic import atomic_path

    final = tmp_path / "model.gguf"
    with pytest.raises(OSError) as raised, atomic_path(final) as tmp:
        raise OSError(28, "No space left on device", str(tmp))
    assert raised.value.filename == str(final)


def test_a_disk_that_fills_during_a_tensor_write_is_out_of_disk(full_disk, converted):
    # gguf-py writes tensors with numpy's tofile, whose short write is an OSError with no errno
    from localmed.atomic import atomic_path
    from localmed.quantize.gguf_out import copy_with_metadata

    source = converted["llama"]["F16"]
    assert source.stat().st_size > 2**20
    final = full_disk / "model.gguf"
    with pytest.raises(OSError) as raised, atomic_path(final) as tmp:
        copy_with_metadata(source, tmp, {"general.name": "x"})
    assert cli.failure_message(raised.value) == \
        f"{final}: out of disk space; the partial file was removed"
    assert list(full_disk.iterdir()) == []


def test_a_missing_dependency_is_one_line_naming_the_distribution(tmp_path):
    # A broken environment (llama-cpp-python uninstalled, or a GPU machine's own python that
    # lacks it): doctor says what is missing and how to fix it, not an ImportError traceback
    hide = ("import sys; sys.modules['llama_cpp'] = None; from localmed.cli import main; "
            "sys.exit(main(['doctor']))")
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert_one_line_error(done.returncode, done.stderr.strip(),
                          "llama-cpp-python is not installed in this Python", "scripts/install.sh")
