"""The GPU check runs unchanged when a GPU machine is lent: its dry run, here, with no GPU.

``benchmarks/gpu_check.sh --dry-run`` assembles what would travel (the pruned llama-cpp-python
source archive, localmed's wheel and the wheels that machine lacks), checks it against the
64 MiB transfer limit and the command against 2,000 characters, configures the pruned archive
with CMake, installs from the carried wheels into a private folder, and runs every check that
needs no GPU; the GPU's steps are reported as skipped. It downloads the source archive (77 MB)
and five small wheels from PyPI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_passes_and_what_travels_fits(tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "LOCALMED_GPU_CARRY": str(carry),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    manifest = json.loads((carry / "manifest.json").read_text())
    assert manifest["travels_bytes"] < 64 * 2**20
    assert len(manifest["command"]) < 2000
    wheels = {name.removeprefix("wheels/").split("-")[0] for name in manifest["files"]
              if name.startswith("wheels/")}
    assert {"localmed", "gguf", "textual", "platformdirs", "diskcache"} <= wheels
    assert "configure: ok" in (out / "configure.txt").read_text()

    report = json.loads((out / "report.json").read_text())
    status = {step["name"]: step["status"] for step in report["steps"]}
    assert report["dry_run"] is True
    for step in ("environment: llama.cpp", "environment: torch",
                 "llama.cpp and torch in one process", "localmed doctor", "models", "localmed plan (full offload)",
                 "localmed plan (--gpu-layers 2)", "decode, CPU", "gpu-marked tests",
                 "localmed serve, streaming", "localmed serve, 4 streams at once",
                 "serve's engine loads the demo model, import by import (CPU: dry run)",
                 "an image (tiny Gemma 3 and its projector), CPU against CPU (dry run)"):
        assert status.pop(step) == "ok", (step, report)
    assert set(status.values()) == {"skipped"}  # the GPU's: decode with offload, bound, GPTQ
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["localmed serve, streaming"]["tokens"] == 32
    assert steps["localmed serve, 4 streams at once"]["tokens"] == 4 * 32
    loads = steps["serve's engine loads the demo model, import by import (CPU: dry run)"]
    assert {v for k, v in loads.items() if k not in ("name", "status", "seconds")} == {"ok"}
    image = steps["an image (tiny Gemma 3 and its projector), CPU against CPU (dry run)"]
    assert image["pictures_differ"] and image["max_logprob_difference"] == 0
    assert set(image["replies_part_at_token"].values()) == {None}  # the CPU is the CPU
    assert steps["decode, CPU"]["tok_per_s"] > 0
    assert "skipped" in steps["gpu-marked tests"]["summary"]
    assert (out / "report.txt").read_text().startswith("localmed GPU check")
