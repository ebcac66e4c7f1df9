"""Convert a synthetic 1.07 GB fp32 Llama checkpoint to F16 and to Q4_K_M GGUF: wall, RSS, disk.

On the same checkpoint, in the same run, each in a fresh process whose peak RSS is read from
``wait4`` (for a process that runs a converter child, the larger of the two):

- localmed's streaming converter (``localmed quantize --converter localmed``),
- localmed's llama.cpp path (``localmed quantize --converter llama.cpp``: llama.cpp's converter
  in a subprocess, then localmed's provenance and manifest, as for Gemma 3 or Qwen checkpoints),
- llama.cpp's own ``convert_hf_to_gguf.py`` alone (from the llama-cpp-python source archive,
  ``vendor/llama.cpp/``). Nothing here touches the network except, when
``--llama-cpp-src`` is not given and no converter is installed, ``pip download`` of the pinned
llama-cpp-python sdist.

    python benchmarks/convert_memory.py [--layers 4] [--keep DIR] [--llama-cpp-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import SPM_MODEL  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def build_checkpoint(folder: Path, layers: int, hidden: int, ffn: int, seed: int = 0) -> None:
    """A Llama checkpoint with random f32 weights, written one tensor at a time."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_head, n_kv, vocab = hidden // 128, max(1, hidden // 512), 32000
    head = hidden // n_head
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (n_kv * head, hidden),
            p + "self_attn.v_proj.weight": (n_kv * head, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    # Two shards, as real checkpoints come.
    names = list(shapes)
    half = len(names) // 2
    index = {"metadata": {}, "weight_map": {}}
    for shard, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"model-{shard:05d}-of-00002.safetensors"
        save_file({n: (rng.standard_normal(shapes[n], dtype=np.float32) * 0.02) for n in part},
                  str(folder / fname))
        index["weight_map"] |= {n: fname for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "hidden_act": "silu",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(SPM_MODEL, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))


def allocated(folder: Path) -> int:
    """Bytes of disk the files in ``folder`` occupy (sparse holes cost nothing)."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        try:
            total += path.lstat().st_blocks * 512
        except OSError:  # renamed or removed while we looked
            pass
    return total


def measure(cmd: list[str], env: dict[str, str] | None = None,
            watch: Path | None = None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS and peak disk in ``watch`` (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_disk = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if watch is not None:
            peak_disk = max(peak_disk, allocated(watch))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024, peak_disk


def llama_cpp_source(given: Path | None, scratch: Path) -> Path:
    """An unpacked llama.cpp converter: given, installed with localmed, or downloaded."""
    if given:
        return given
    from localmed.quantize.llama_cpp_source import converter_dir, extract

    if (converter_dir() / "convert_hf_to_gguf.py").is_file():
        return converter_dir()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    LLAMA_CPP_PYTHON, "-d", str(scratch)], check=True, capture_output=True)
    archive = next(scratch.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if "/vendor/llama.cpp/" in m.name and ("convert_hf_to_gguf" in m.name
                   or "/gguf-py/" in m.name or "/conversion/" in m.name)]
        extract(tar, scratch, members)
    return next(scratch.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--keep", type=Path, help="keep the checkpoint and outputs here")
    parser.add_argument("--llama-cpp-src", type=Path, help="an unpacked vendor/llama.cpp")
    parser.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_checkpoint(args.build_only, args.layers, args.hidden, args.ffn)
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="localmed-bench-"))
    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").is_file():
        # In a child process: Linux carries a parent's peak RSS into children it forks, so the
        # measuring process must stay small.
        subprocess.run([sys.executable, __file__, "--build-only", str(ckpt), "--layers",
                        str(args.layers), "--hidden", str(args.hidden), "--ffn", str(args.ffn)],
                       check=True)
    from localmed.quantize.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(ckpt)
    ckpt_bytes = sum(p.stat().st_size for p in checkpoint.weight_files)
    largest = max(t.nbytes for t in checkpoint.tensors.values())

    ours_out = work / "ours"
    ours_cmd = [sys.executable, "-m", "localmed", "quantize", str(ckpt), "--quant", "F16",
                "--out", str(ours_out), "--name", "synthetic", "--converter", "localmed"]
    path_out = work / "via-llama-cpp"
    path_cmd = [sys.executable, "-m", "localmed", "quantize", str(ckpt), "--quant", "F16",
                "--out", str(path_out), "--name", "synthetic", "--converter", "llama.cpp"]
    src = llama_cpp_source(args.llama_cpp_src, work / "llama-cpp-src")
    theirs_out = work / "theirs.F16.gguf"
    theirs_cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype",
                  "f16", "--outfile", str(theirs_out)]
    theirs_env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "NO_LOCAL_GGUF": ""}

    rows = []
    for label, cmd, env, out in (
        ("localmed", ours_cmd, None, ours_out / "synthetic.F16.gguf"),
        ("llama.cpp convert_hf_to_gguf.py", theirs_cmd, theirs_env, theirs_out),
        ("localmed --converter llama.cpp", path_cmd, None, path_out / "synthetic.F16.gguf"),
    ):
        wall, rss, _ = measure(cmd, env)
        rows.append((label, wall, rss, out.stat().st_size))

    print(f"checkpoint: {ckpt_bytes / 1e6:,.0f} MB fp32 in {len(checkpoint.weight_files)} "
          f"shards, largest tensor {largest / 1e6:,.0f} MB, {checkpoint.n_parameters():,} params")
    print(f"{'converter':34} {'wall s':>7} {'peak RSS MB':>12} {'RSS/ckpt':>9} "
          f"{'RSS/largest':>12} {'out MB':>8}")
    for label, wall, rss, size in rows:
        print(f"{label:34} {wall:7.1f} {rss / 1e6:12.0f} {rss / ckpt_bytes:9.2f} "
              f"{rss / largest:12.1f} {size / 1e6:8.0f}")
    (_, w0, r0, _), (_, w1, r1, _), (_, w2, r2, _) = rows
    print(f"localmed / llama.cpp: time {w0 / w1:.2f}x, peak RSS {r0 / r1:.2f}x")
    print(f"localmed's llama.cpp path / llama.cpp alone: time {w2 / w1:.2f}x, peak RSS "
          f"{r2 / r1:.2f}x (the difference is hashing inputs and writing provenance)")

    quant_rows = []
    for label, extra in (("direct (default)", []), ("--via-intermediate", ["--via-intermediate"])):
        out = work / ("q4-direct" if not extra else "q4-intermediate")
        out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "localmed", "quantize", str(ckpt), "--quant", "Q4_K_M",
               "--out", str(out), "--name", "synthetic", "--imatrix", "none", *extra]
        wall, rss, disk = measure(cmd, watch=out)
        quant_rows.append((label, wall, rss, disk, (out / "synthetic.Q4_K_M.gguf").stat().st_size))
    print("\nto Q4_K_M (--imatrix none), same checkpoint:")
    print(f"{'path':22} {'wall s':>7} {'peak RSS MB':>12} {'peak disk MB':>13} {'out MB':>8} "
          f"{'disk/out':>9}")
    for label, wall, rss, disk, size in quant_rows:
        print(f"{label:22} {wall:7.1f} {rss / 1e6:12.0f} {disk / 1e6:13.0f} {size / 1e6:8.0f} "
              f"{disk / size:9.2f}")
    (_, wd, rd, dd, _), (_, wi, ri, di, _) = quant_rows
    print(f"direct / intermediate: time {wd / wi:.2f}x, peak RSS {rd / ri:.2f}x, "
          f"peak disk {dd / di:.2f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
