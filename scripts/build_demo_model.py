#!/usr/bin/env python3
"""Rebuild the demo model that ships in localmed/assets, byte for byte.

    .venv/bin/python scripts/build_demo_model.py           # write localmed/assets/demo.Q8_0.gguf
    .venv/bin/python scripts/build_demo_model.py --check   # rebuild in a temporary folder and
                                                           # compare with localmed.demo.DEMO_SHA256

Trains the tiny demo Llama (localmed.quantize.demo_model: a few seconds) and converts it with
localmed's own converter to Q8_0. Needs torch (the `convert` extra: LOCALMED_EXTRAS=convert
scripts/install.sh). The same bytes come out on any x86-64 CPU: torch runs on one thread with its
portable kernels (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE: without them AVX2 and
AVX-512 machines sum in other orders and train other weights), and the GGUF's creation time is
fixed (SOURCE_DATE_EPOCH). DEMO_SHA256 was made with torch 2.13.0, the CPU build.
"""

from __future__ import annotations

import os

# Read when torch and MKL load: set before anything imports them.
os.environ["ATEN_CPU_CAPABILITY"] = "default"
os.environ["MKL_CBWR"] = "COMPATIBLE"

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def build(out_dir: Path) -> Path:
    from localmed.demo import DEMO_ENTRY, DEMO_EPOCH, DEMO_ID, DEMO_QUANT
    from localmed.extras import require
    from localmed.quantize.pipeline import Source, run_quantize
    from localmed.quants import QUANT_TYPES

    require("convert", "building the demo model")
    from localmed.quantize.demo_model import build_checkpoint

    os.environ["SOURCE_DATE_EPOCH"] = str(DEMO_EPOCH)
    with tempfile.TemporaryDirectory(prefix="localmed-demo-") as tmp:
        folder = build_checkpoint(Path(tmp) / "demo")
        source = Source(folder, "localmed demo (trained locally)", "local", DEMO_ENTRY, DEMO_ID)
        (output,) = run_quantize(source, [QUANT_TYPES[DEMO_QUANT]], Path(tmp) / "out")
        target = out_dir / output.path.name
        shutil.copyfile(output.path, target)
    return target


def main() -> int:
    from localmed.demo import DEMO_FILE, DEMO_SHA256
    from localmed.errors import LocalmedError
    from localmed.provenance import sha256_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary folder and compare with DEMO_SHA256")
    args = parser.parse_args()
    try:
        if args.check:
            with tempfile.TemporaryDirectory(prefix="localmed-demo-check-") as tmp:
                digest = sha256_file(build(Path(tmp)))
        else:
            digest = sha256_file(build(DEMO_FILE.parent))
    except LocalmedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if digest == DEMO_SHA256:
        print(f"demo model: sha256 {digest}, as shipped")
        return 0
    print(f"demo model: sha256 {digest}, shipped {DEMO_SHA256}" +
          (": the rebuild differs" if args.check else
           ": set DEMO_SHA256 in localmed/demo.py to the new value"), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
