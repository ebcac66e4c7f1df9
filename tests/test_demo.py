"""The demo model ships as a GGUF (no torch at run time) that a script in the repository rebuilds
byte for byte: the asset is source, not an unexplained binary."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from localmed import demo
from localmed.errors import ModelFileError
from localmed.provenance import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_demo_is_the_recorded_one():
    assert demo.demo_model() == demo.DEMO_FILE
    assert sha256_file(demo.DEMO_FILE) == demo.DEMO_SHA256


def test_a_damaged_or_missing_demo_is_one_line(tmp_path, monkeypatch):
    damaged = tmp_path / "demo.Q8_0.gguf"
    data = bytearray(demo.DEMO_FILE.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(data)
    monkeypatch.setattr(demo, "DEMO_FILE", damaged)
    with pytest.raises(ModelFileError, match=r"damaged .* reinstall localmed"):
        demo.demo_model()
    monkeypatch.setattr(demo, "DEMO_FILE", tmp_path / "gone.gguf")
    with pytest.raises(ModelFileError, match="missing from this install"):
        demo.demo_model()


@pytest.mark.skipif(not importlib.metadata.version("torch").startswith("2.13.0"),
                    reason="DEMO_SHA256 was made with torch 2.13.0")
def test_the_build_script_rebuilds_the_same_bytes():
    """Trains the demo (one thread, torch's portable kernels) and converts it: the sha256 the
    code records, which the shipped file has (above)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_model.py"),
                           "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert demo.DEMO_SHA256 in done.stdout
