"""Answers grounded in an index: a real embedding model (all-MiniLM-L6-v2, converted by localmed)
against transformers, dense and hybrid search on PubMedQA's abstracts, a chat session's
passages and their check, and ``serve --docs`` through the official ``openai`` client."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from localmed import cli
from localmed.retrieval.grounding import Grounding, check_citations, grounded_question
from localmed.retrieval.store import Passage
from tests.documents import pubmedqa, write_corpus
from tests.test_serve import Server

ABSTRACTS = pubmedqa(500)[::25]  # 20 studies, answers mixed
OFF_TOPIC = ("A 23-year-old man is brought to the emergency department after a motorcycle "
             "crash with a fractured femur; which nerve block suits the operating theatre?")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("pubmed") / "bulletins"
    return folder, write_corpus(folder, ABSTRACTS, per_file=2)


@pytest.fixture(scope="module")
def index(corpus, minilm: Path) -> str:
    folder, _ = corpus
    assert cli.main(["docs", "add", str(folder), "--name", "pubmed", "--embed", str(minilm),
                     "--threads", "2"]) == 0
    return "pubmed"


def search(capsys, name: str, query: str, *extra: str) -> list[dict]:
    code = cli.main(["docs", "search", name, query, "--json", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_engine_vectors_are_transformers_mean_pooling(minilm: Path):
    """llama.cpp's pooled vectors (the pooling the GGUF declares) against sentence-transformers'
    recipe computed by transformers on the original checkpoint."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from localmed.retrieval.embedder import Embedder, EmbedderSpec, identity
    from tests.real_models import minilm_checkpoint

    texts = [a.conclusion for a in ABSTRACTS[:6]]
    embedder = Embedder(EmbedderSpec("minilm", str(minilm), identity(minilm)), threads=2)
    try:
        ours, truncated = embedder.embed_documents(texts)
        assert embedder.ready.pooling == "mean" and embedder.dimensions == 384
    finally:
        embedder.close()
    assert truncated == 0
    folder = minilm_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    cosines = (ours * reference.numpy()).sum(axis=1)
    assert cosines.min() > 0.999, cosines


class TestSearch:
    @pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
    def test_each_question_finds_its_study(self, index, corpus, capsys, mode):
        _, where = corpus
        hits = 0
        for abstract in ABSTRACTS:
            best = search(capsys, index, abstract.question, "-k", "1", "--mode", mode)[0]
            source, pages = where[abstract.pmid]
            hits += best["source"] == source and (pages is None or best["page"] in pages)
        assert hits >= 18, f"{mode}: {hits} of {len(ABSTRACTS)}"

    def test_a_query_longer_than_the_model_context(self, index, capsys):
        vignette = " ".join(a.conclusion for a in ABSTRACTS[:16])  # ~1000 tokens; MiniLM: 512
        found = search(capsys, index, vignette, "-k", "3")
        assert len(found) == 3
        assert cli.main(["docs", "search", index, vignette]) == 0
        err = " ".join(capsys.readouterr().err.split())
        assert re.search(r"the query has \d+ tokens, more than all-minilm-l6-v2.F16.gguf's 512: "
                         r"it was embedded in [2-4] pieces", err), err

    def test_nothing_on_this_is_said(self, index, capsys):
        assert cli.main(["docs", "search", index, OFF_TOPIC]) == 0
        assert "nothing in pubmed on this" in capsys.readouterr().out

    def test_another_embedding_model_re_embeds_and_says_so(self, corpus, minilm, capsys):
        from tests.real_models import minilm_gguf

        folder, _ = corpus
        assert cli.main(["docs", "add", str(folder), "--name", "switch", "--embed",
                         str(minilm)]) == 0
        capsys.readouterr()
        assert cli.main(["docs", "add", str(folder), "--name", "switch", "--embed",
                         str(minilm_gguf("Q8_0"))]) == 0
        out = capsys.readouterr()
        said = " ".join(out.err.split())
        assert "the embedding model changed (all-minilm-l6-v2.F16.gguf → " \
               "all-minilm-l6-v2.Q8_0.gguf): every passage is embedded again" in said
        assert "switch: 10 unchanged" in out.out  # no file read again: only re-embedded
        listed = json.loads(_run(capsys, "docs", "list", "--json"))
        row = next(r for r in listed if r["name"] == "switch")
        assert row["embedder"] == "all-minilm-l6-v2.Q8_0.gguf"
        assert row["vectors"] == row["passages"] > 0


def _run(capsys, *args: str) -> str:
    code = cli.main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


class TestRefused:
    def test_a_chat_model_is_no_embedder(self, corpus, demo_gguf, capsys):
        folder, _ = corpus
        code = cli.main(["docs", "add", str(folder), "--name", "wrong", "--embed",
                         str(demo_gguf)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "not a sentence-embedding model: it declares pooling 'none'" in \
            " ".join(err.split())
        assert not (Path(os.environ["LOCALMED_DATA_DIR"]) / "docs" / "wrong.sqlite").exists()

    def test_registry_kinds(self, corpus, capsys):
        folder, _ = corpus
        assert cli.main(["docs", "add", str(folder), "--embed", "internist-7b"]) == 2
        assert "internist-7b is a chat model, not an embedding model" in \
            capsys.readouterr().err
        assert cli.main(["chat", "nomic-embed-text-v1.5"]) == 2
        assert "nomic-embed-text-v1.5 is an embedding model" in \
            " ".join(capsys.readouterr().err.split())


class TestCitationCheck:
    grounding = Grounding("ward", (
        Passage(1, "sepsis.pdf", 3, ("Sepsis",), 0, 80,
                "Give broad-spectrum antibiotics within one hour of recognising septic shock."),
        Passage(2, "fluids.md", None, (), 0, 40, "Give 30 mL/kg of crystalloid for hypotension.")),
        True)

    def test_markers_that_name_no_passage(self):
        check = check_citations("Antibiotics first [1], fluids [2], steroids [4] and [1-3].",
                                self.grounding)
        assert check.cited == (1, 2)
        assert check.flags == ("[4] names no passage: 2 were given",
                               "[3] names no passage: 2 were given")

    def test_a_quotation_not_in_the_passage_it_cites(self):
        reply = ('Start "broad-spectrum antibiotics within one hour" [1], then "give 40 mL/kg '
                 'of crystalloid to everyone" [2].')
        check = check_citations(reply, self.grounding)
        assert check.flags == ("“give 40 mL/kg of crystalloid to everyone” is not in [2]",)

    def test_the_question_keeps_its_words_below_the_passages(self):
        text = grounded_question("What first?", self.grounding)
        assert text.index("[1] sepsis.pdf p. 3 (Sepsis)") < text.index("[2] fluids.md")
        assert text.endswith("Question: What first?")


def test_a_chat_session_is_answered_from_the_passages(index, smollm2, tmp_path):
    """The real engine and SmolLM2: the question's passages go into its turn only, the
    conversation keeps the question as asked, the reply's sources are recorded and exported;
    an off-topic question gets none and is marked not grounded."""
    from localmed.chat import ChatSession, open_runtime, resolve_chat_model
    from localmed.registry import Registry
    from localmed.retrieval.catalog import open_retriever

    model = resolve_chat_model(str(smollm2["gguf"]), Registry.load())
    runtime = open_runtime(model, n_ctx=2048)
    session = ChatSession.open(model, runtime)
    try:
        session.set_docs(open_retriever(index))
        session.params = session.params.__class__(max_tokens=24, temperature=0)
        question = ABSTRACTS[0].question
        grounding = session.ground(question)
        assert grounding is not None and grounding.grounded and grounding.passages
        reply = "".join(session.ask(question, grounding))
        assert session.last_prompt is not None
        assert "Passages from the clinic's documents (pubmed)" in session.last_prompt.text
        assert session.conversation.messages[0].content == question
        assert session.conversation.messages[1].content == reply.strip()
        record = session.conversation.sources["1"]
        assert record["index"] == "pubmed" and record["passages"][0]["id"] == 1
        assert session.last_check is not None
        off = session.ground(OFF_TOPIC)
        assert off is not None and not off.grounded and not off.passages
        "".join(session.ask(OFF_TOPIC, off))
        assert "Passages from" not in session.last_prompt.text
        exported = session.export(tmp_path / "chat.md").read_text()
        assert "**Sources** (pubmed):" in exported and "Not grounded" in exported
    finally:
        session.set_docs(None)
        runtime.close()


@pytest.fixture(scope="module")
def served(index, smollm2, tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    audit = tmp_path_factory.mktemp("audit") / "serve.jsonl"
    running = Server(smollm2["gguf"], "--docs", index, "--ctx", "4096", "--audit", str(audit))
    running.banner()
    yield running, audit
    running.stop()


def test_serve_cites_in_the_openai_client(served, corpus):
    from openai import OpenAI

    server, audit = served
    _, where = corpus
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    abstract = ABSTRACTS[3]
    asked = [{"role": "user", "content": abstract.question}]
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=asked, max_tokens=16,
                                           temperature=0)
    citations = reply.model_extra["citations"]
    assert [c["id"] for c in citations] == list(range(1, len(citations) + 1))
    assert set(citations[0]) == {"id", "source", "page", "text", "score"}
    assert citations[0]["source"] == where[abstract.pmid][0]
    assert reply.model_extra["localmed"]["grounded"] is True
    stream = client.chat.completions.create(model=model, messages=asked, max_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert [bool(c.model_extra.get("citations")) for c in chunks].count(True) == 1
    assert chunks[-1].model_extra["citations"] == citations
    off = client.chat.completions.create(model=model, max_tokens=8,
                                         messages=[{"role": "user", "content": OFF_TOPIC}])
    assert off.model_extra["citations"] == []
    assert off.model_extra["localmed"]["grounded"] is False
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    cited = [r for r in records if r.get("passages")]
    assert cited and all(set(p) == {"id", "passage", "source", "page", "sha256"}
                         for p in cited[0]["passages"])
    assert all(abstract.question not in json.dumps(r) for r in records)  # no content logged


def test_serve_embeds_for_other_tools(served, minilm):
    from openai import OpenAI

    from localmed.retrieval.embedder import Embedder, EmbedderSpec, identity

    server, _ = served
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    texts = ["septic shock", "inhaled corticosteroids for asthma"]
    default = client.embeddings.create(model=minilm.name, input=texts)  # base64 by default
    floats = server.client.post("/v1/embeddings", json={"model": minilm.name, "input": texts,
                                                         "encoding_format": "float"}).json()
    assert [d.index for d in default.data] == [0, 1] and default.usage.prompt_tokens > 0
    embedder = Embedder(EmbedderSpec("m", str(minilm), identity(minilm)), threads=1)
    try:
        expected = embedder.embed_raw(texts).vectors
    finally:
        embedder.close()
    for i, row in enumerate(floats["data"]):
        assert np.allclose(row["embedding"], expected[i], atol=1e-6)
        assert np.allclose(default.data[i].embedding, expected[i], atol=1e-6)
    raw = server.client.post("/v1/embeddings", json={"input": "x", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,)
    for body, fragment in (({"input": []}, "'input' must be"),
                           ({"input": [[1, 2, 3]]}, "token arrays"),
                           ({"input": "x", "model": "gpt-4"}, "not served here"),
                           ({"input": "long " * 2000}, "longer than")):
        answer = server.client.post("/v1/embeddings", json=body)
        assert answer.status_code == 400 and fragment in answer.json()["error"]["message"]
    models = [m.id for m in client.models.list().data]
    assert minilm.name in models


def test_an_embedding_model_pulled_by_id_indexes_with_its_prefixes(corpus, minilm, tmp_path):
    """``localmed pull nomic-embed-text-v1.5`` (its registry entry names nomic's GGUF repo; the
    hub is a local cache here, its file all-MiniLM under nomic's name), then ``docs add --embed``
    by id: the registry's prefixes go before each passage and query."""
    from tests.test_pull import lay_out, localmed

    cache = tmp_path / "hf"
    lay_out(cache, "nomic-ai/nomic-embed-text-v1.5-GGUF",
            {"nomic-embed-text-v1.5.Q8_0.gguf": minilm, "nomic-embed-text-v1.5.f16.gguf": minilm})
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "LOCALMED_DATA_DIR": str(tmp_path / "data")}
    pulled = localmed(env, "pull", "nomic-embed-text-v1.5")
    assert pulled.returncode == 0, pulled.stderr
    folder, _ = corpus
    added = localmed(env, "docs", "add", str(folder), "--name", "nomic", "--embed",
                     "nomic-embed-text-v1.5")
    assert added.returncode == 0, added.stderr
    assert "BM25 + nomic-embed-text-v1.5 vectors" in " ".join(added.stdout.split())
    from localmed.retrieval.embedder import EmbedderSpec
    from localmed.retrieval.store import DocsIndex

    with DocsIndex(tmp_path / "data" / "docs" / "nomic.sqlite") as index:
        spec = EmbedderSpec.from_json(index.meta("embedder"))
    assert (spec.query_prefix, spec.document_prefix) == ("search_query: ", "search_document: ")
    assert spec.path.endswith("nomic-embed-text-v1.5.Q8_0.gguf") and spec.dimensions == 384
    found = localmed(env, "docs", "search", "nomic", ABSTRACTS[5].question, "--json")
    assert found.returncode == 0 and json.loads(found.stdout)
