"""Bad input: one clear line on stderr, exit 2, and no file left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localmed import cli
from localmed.atomic import atomic_path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def leftovers(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir())


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_folder_without_config_json(tmp_path, capsys):
    src = tmp_path / "empty"
    src.mkdir()
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(src), "--quant", "F16", "--out", str(out))
    assert_one_line_error(code, err, "no config.json")
    assert leftovers(out) == []


def test_unsupported_architecture(tmp_path, capsys):
    # (GPT-2 was the example here until llama.cpp's converter took the families localmed's
    # does not; an architecture neither knows is refused the same way.)
    src = tmp_path / "rwkv99"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["Rwkv99ForCausalLM"]}))
    (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(src), "--quant", "F16", "--out", str(out))
    assert_one_line_error(code, err, "unsupported architecture Rwkv99ForCausalLM",
                          "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
    assert leftovers(out) == []


def test_truncated_safetensors(tmp_path, capsys, checkpoints):
    src = tmp_path / "truncated"
    shutil.copytree(checkpoints["llama"], src)
    weights = src / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(src), "--quant", "Q8_0,Q4_K_M", "--out", str(out))
    assert_one_line_error(code, err, "model.safetensors", "truncated")
    assert leftovers(out) == []


def test_unknown_quant_name(tmp_path, capsys, checkpoints):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "Q4_K_M,Q5_K_X",
                        "--out", str(out))
    assert_one_line_error(code, err, "unknown quant type 'Q5_K_X'", "Q4_K_M", "IQ4_XS")
    assert leftovers(out) == []


def test_quant_needing_an_importance_matrix_is_refused_before_writing(tmp_path, capsys,
                                                                      checkpoints):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "IQ2_XXS",
                        "--out", str(out))
    assert_one_line_error(code, err, "IQ2_XXS", "importance matrix")
    assert leftovers(out) == []


def test_broken_models_toml(tmp_path, capsys, monkeypatch, checkpoints):
    config = tmp_path / "config"
    config.mkdir()
    (config / "models.toml").write_text("[models.internist-7b\n")
    monkeypatch.setenv("LOCALMED_CONFIG_DIR", str(config))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "F16",
                        "--out", str(out))
    assert_one_line_error(code, err, str(config / "models.toml"), "invalid TOML")
    assert leftovers(out) == []


def test_output_dir_not_writable(tmp_path, capsys, checkpoints):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "F16",
                        "--out", str(blocker / "models"))
    assert_one_line_error(code, err, "cannot create the output folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_output_dir_without_write_permission(tmp_path, capsys, checkpoints):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "F16",
                            "--out", str(out))
    finally:
        out.chmod(0o700)
    assert_one_line_error(code, err, "not writable")
    assert leftovers(out) == []


def test_pickle_checkpoints_are_refused_without_flag(tmp_path, capsys):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, err = run_cli(capsys, "quantize", str(src), "--quant", "F16", "--out",
                        str(tmp_path / "out"))
    assert_one_line_error(code, err, "pickle", "--allow-pickle")


def test_allow_pickle_loads_weights_only(tmp_path, capsys, checkpoints):
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    shutil.copytree(checkpoints["llama"], src)
    weights = src / "model.safetensors"
    torch.save(load_file(weights), src / "pytorch_model.bin")
    weights.unlink()
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(src), "--quant", "F16", "--out", str(out),
                        "--allow-pickle")
    assert code == 0, err
    assert "pickled.F16.gguf" in leftovers(out)
    assert not any(name.startswith(".localmed") for name in leftovers(src))


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = run_cli(capsys, "quantize", "nobody/no-such-model", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "nobody/no-such-model", "HF_HUB_OFFLINE")


def test_unknown_model_id(tmp_path, capsys):
    code, err = run_cli(capsys, "quantize", "internist-9b", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown model 'internist-9b'", "internist-7b")


def test_info_on_a_file_that_is_not_gguf(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF but not really" * 10)
    code, err = run_cli(capsys, "info", str(bogus))
    assert_one_line_error(code, err, "model.gguf")
    code, err = run_cli(capsys, "info", str(tmp_path / "missing.gguf"))
    assert_one_line_error(code, err, "no such file")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "x.gguf"
    with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert leftovers(tmp_path) == []


def interruptible() -> None:
    """``preexec_fn`` for a process a test sends SIGINT: Ctrl-C reaches it as it reaches a
    command typed at a terminal. A test run started in the background (``cmd &`` in a script)
    ignores SIGINT, the ignoring is inherited, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_no_partial_gguf(tmp_path, checkpoints):
    """A real SIGINT to a running `localmed quantize`: exit 130, only complete files remain."""
    import gguf

    out = tmp_path / "out"
    quants = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmed", "quantize", str(checkpoints["mixtral"]),
         "--quant", ",".join(quants), "--out", str(out), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(out.glob("*.gguf")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    names = leftovers(out)
    assert not [n for n in names if n.endswith(".part") or n.startswith(".")], names
    finished = [n for n in names if n.endswith(".gguf")]
    assert len(finished) < len(quants)
    for name in finished:  # every file that exists is whole
        gguf.GGUFReader(out / name)
