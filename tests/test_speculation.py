"""Speculative decoding by prompt lookup in the multi-sequence engine: drafts come from the
reply's own context, are checked in the step's batch, and what the sampler does not take leaves
the cache. Greedy replies are the ones without it (on real SmolLM2 and Gemma 3 270M and the tiny
checkpoints; where a batch's shape moves llama.cpp's float sums, a difference only where the
model's two best tokens were all but tied, shown with both logits); seeded sampling keeps the
model's distribution; and serve, through the openai client, says what was drafted and taken."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from localmed.runtimes.base import GenerationParams, StopReason
from localmed.runtimes.messages import Request
from localmed.runtimes.speculation import (
    DRAFT_MAX,
    PRIOR_COST,
    PROBE,
    REST_STEPS,
    Drafter,
    PromptLookup,
    StepCost,
)

GREEDY = GenerationParams(temperature=0.0, max_tokens=96, repeat_penalty=1.0)
NEAR_TIE = 0.25
"""Nats between the two best tokens below which a batch's float sums may swap them (measured
differences of llama.cpp's CPU kernels between batch shapes: up to ~0.05 on SmolLM2)."""


def engine(model: Path, *, speculation: bool, n_parallel: int = 1, draft: Path | None = None):
    from localmed.runtimes.batch import BatchEngine

    return BatchEngine(model, n_parallel=n_parallel, n_ctx=2048 * n_parallel, threads=2,
                       speculation=speculation, draft=draft)


@pytest.fixture(scope="session")
def smol_pair(smol) -> tuple[Path, Path]:
    """A real target and draft of one vocabulary: SmolLM2 at Q8_0, and its own Q4_0."""
    from tests.real_models import requantized

    return requantized(smol, "Q8_0"), requantized(smol, "Q4_0")


def cheap_drafts(e) -> None:
    """Drafted tokens as cheap as a 7B's on a laptop: this 2-core VM measures ~0.5 of a step for
    SmolLM2 (and a draft model of its size costs most of a step more), so replies this short
    would draft nothing; what is tested is what drafting does."""
    e.step_cost.cost = lambda replies, drafting=True: 0.05


def medication_prompt(model_engine) -> list[int]:
    """A record and an ask whose answer copies it: the work prompt lookup is for."""
    from benchmarks.followup import record

    text = (f"<|im_start|>user\n{record(7)}\n\nList her medications on admission with their "
            "doses, one per line, exactly as the record writes them.<|im_end|>\n"
            "<|im_start|>assistant\n")
    return model_engine.tokenize(text)


# --- the lookup and its adaptation ----------------------------------------------------------------

def test_a_lookup_proposes_what_followed_the_newest_tokens_last_time():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 9, 8, 2, 3, 4, 6, 7, 0, 2, 3])
    assert lookup.draft(3) == [4, 6, 7]  # (2, 3) last came before 4, 6, 7 (not 4, 5, 9)
    lookup.append(4)
    assert lookup.draft(8) == [6, 7, 0, 2, 3, 4]  # the latest (2, 3, 4)'s, up to the end
    lookup = PromptLookup([5, 1, 2, 3, 7, 8, 2, 3, 9, 9, 5, 1, 2, 3])
    assert lookup.draft(2) == [7, 8]  # the longest match, (5, 1, 2, 3), not the latest (2, 3)
    assert PromptLookup([5, 6, 7]).draft(4) == []  # nothing seen twice
    lookup.append(-3)  # an image's placeholder id is never proposed
    assert -3 not in PromptLookup([8, -3, -3, 8, -3]).draft(4)


def test_a_draft_is_as_long_as_its_expected_gain_pays():
    """The k-th drafted token is taken with probability acceptance**k and costs ``cost``: a
    reply that takes its drafts drafts more; one whose acceptance is below the cost rests, then
    probes (so the cost is measured again)."""
    drafter = Drafter(PromptLookup(list(range(200)) * 2))
    first = drafter.propose(100, 0.1)
    assert len(first) == int(math.log(0.1) / math.log(drafter.acceptance))
    drafter.taken(len(first))
    assert len(drafter.propose(100, 0.1)) > len(first)
    for _ in range(8):
        drafter.taken(len(drafter.draft))
        drafter.propose(100, 0.1)
    assert len(drafter.draft) == DRAFT_MAX
    assert drafter.size(1.0) == 0  # a token that costs a step is never worth drafting
    misses = 0
    while drafter.draft and misses < 100:  # drafts the sampler does not take
        drafter.taken(0)
        misses += 1
        drafter.propose(100, 0.1)
    assert 1 < misses < 100 and drafter.acceptance <= 0.1  # below its cost: it rests
    assert drafter.resting == REST_STEPS[0]
    assert [drafter.propose(100, 0.1) for _ in range(REST_STEPS[0] - 1)] == \
        [[]] * (REST_STEPS[0] - 1)
    assert len(drafter.propose(100, 0.99)) == PROBE  # rested: a probe, whatever the cost


def test_a_drafted_tokens_cost_is_measured_and_dearer_in_a_full_batch():
    cost = StepCost()
    assert cost.cost(1) == PRIOR_COST and cost.cost(4) == 4 * PRIOR_COST
    for _ in range(100):  # (the prior weighs as two steps)
        cost.record(1, 0, 0.010)  # a step: 10 ms
        cost.record(1, 4, 0.014)  # four drafted tokens: 1 ms each, a tenth of a step
        cost.record(4, 0, 0.020)
        cost.record(4, 4, 0.024)  # four replies wait for each: 4 x 1 / 20 ms
    assert cost.cost(1) == pytest.approx(0.1, abs=0.02)
    assert cost.cost(4) == pytest.approx(0.2, abs=0.03) and cost.cost(4) > cost.cost(1)


# --- the same replies ------------------------------------------------------------------------------

def same_or_near_tie(model: Path, prompt: list[int], with_: str, without: str) -> None:
    """The two greedy replies are the same text; or they part where the model's two best
    tokens were within NEAR_TIE (shown with both logits, from a whole prefill)."""
    if with_ == without:
        return
    from localmed.runtimes.local import LocalRuntime

    runtime = LocalRuntime.load(model, n_ctx=2048, threads=2, speculation=False)
    try:
        a, b = runtime.tokenize(with_, add_bos=False), runtime.tokenize(without, add_bos=False)
        at = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        logits = runtime.next_logits(prompt + b[:at])
        best = np.argsort(-logits)[:2]
        gap = float(logits[best[0]] - logits[best[1]])
        assert {a[at], b[at]} <= set(best.tolist()) and gap < NEAR_TIE, (
            f"parted at token {at}: {a[at]} vs {b[at]}; best two {best.tolist()} with logits "
            f"{logits[best].tolist()} (gap {gap:.3f})")
    finally:
        runtime.close()


@pytest.mark.parametrize("which", ["smollm2", "gemma3", "tiny llama", "tiny llama3"])
def test_greedy_replies_are_the_ones_without_speculation(which, request):
    model = {"smollm2": lambda: request.getfixturevalue("smol"),
             "gemma3": lambda: request.getfixturevalue("gemma3_real")["gguf"],
             "tiny llama": lambda: request.getfixturevalue("converted")["llama"]["Q8_0"],
             "tiny llama3": lambda: request.getfixturevalue("converted")["llama3"]["F32"],
             }[which]()
    replies, stats = {}, {}
    for speculation in (True, False):
        e = engine(model, speculation=speculation)
        try:
            prompt = medication_prompt(e)[:1500]
            outcome = e.run(Request(1, prompt, GREEDY))[1]
        finally:
            e.close()
        replies[speculation], stats[speculation] = outcome.text, outcome.stats
    assert stats[False].drafted_tokens == 0
    assert stats[True].drafted_tokens > 0  # it did draft: the record is there to copy
    same_or_near_tie(model, prompt, replies[True], replies[False])


def test_a_draft_models_drafts_are_checked_and_the_replies_stay_the_same(smol_pair):
    """SmolLM2's Q4_0 drafts for its Q8_0 where the lookup proposes nothing, two replies at
    once (a record to copy, a free question): each greedy reply is the one without speculation
    (or parts at a near-tie), the draft model was asked for both and its tokens were taken, and
    the model's cells hold no rejected draft, the draft's the reply's own tokens (and at most
    its last draft after them)."""
    target, draft = smol_pair
    free = ("<|im_start|>user\nWhat are the first steps in managing suspected sepsis?"
            "<|im_end|>\n<|im_start|>assistant\n")
    replies: dict[bool, dict[int, object]] = {}
    for speculation in (True, False):
        e = engine(target, speculation=speculation, n_parallel=2,
                   draft=draft if speculation else None)
        cheap_drafts(e)
        try:
            prompts = {1: medication_prompt(e)[:1500], 2: e.tokenize(free)}
            replies[speculation] = e.run(*(Request(i, p, GREEDY) for i, p in prompts.items()))
            if speculation:
                assert e.draft_model is not None
                for i, prompt in prompts.items():
                    s = replies[True][i].stats
                    fed = s.token_ids if s.stopped_by is StopReason.EOS else s.token_ids[:-1]
                    slot = next(n for n, cells in enumerate(e._slots)
                                if cells.cells[:len(prompt)] == prompt)
                    assert e._slots[slot].cells == prompt + fed
                    held = e.draft_model.held[slot]
                    assert held[:len(prompt)] == prompt
                    # then the reply's tokens up to its last draft, whose tail may be rejected
                    own = held[len(prompt):]
                    pairs = zip(own, s.token_ids, strict=False)
                    agree = next((k for k, (x, y) in enumerate(pairs) if x != y),
                                 min(len(own), len(s.token_ids)))
                    assert 0 < agree and len(own) - agree <= DRAFT_MAX, (agree, len(own))
                # what the draft proposes, asked directly: the Q8_0's own greedy continuation,
                # mostly (the Q4_0 of the same weights)
                greedy = e.run(Request(9, prompts[2], GREEDY))[9].stats.token_ids
                taken = 0
                for at in (0, 16, 32, 48):
                    draft_ = e.draft_model.propose({0: (prompts[2] + greedy[:at + 1], 8)},
                                                   0.0)[0][0]
                    taken += next((k for k, (x, y) in enumerate(
                        zip(draft_, greedy[at + 1:], strict=False)) if x != y), len(draft_))
                assert taken >= 12, taken  # of 32 positions
        finally:
            e.close()
    copy, free_ = replies[True][1].stats, replies[True][2].stats
    assert copy.drafted_tokens > 20 and copy.accepted_tokens > 0
    assert free_.drafted_tokens > 20 and free_.accepted_tokens > 0  # free text drafts too
    assert replies[False][1].stats.drafted_tokens == 0
    same_or_near_tie(target, prompts[1], replies[True][1].text, replies[False][1].text)
    same_or_near_tie(target, prompts[2], replies[True][2].text, replies[False][2].text)


def test_a_draft_of_another_vocabulary_is_refused_in_one_line_before_anything_loads(
        smol, smol_pair, gemma3_real, tmp_path):
    """Gemma 3's tokenizer for SmolLM2's: refused from the headers (no weight read), in chat,
    serve and plan alike; a vocabulary whose texts differ is refused as llama.cpp refuses it;
    --draft with --no-speculation contradicts itself."""
    import subprocess

    from localmed.errors import SpeculationError
    from localmed.runtimes.draft_model import _vocab_mismatch, check_pair

    gemma = gemma3_real["gguf"]
    with pytest.raises(SpeculationError, match=r"cannot draft for .*tokenizer is 'llama'"):
        check_pair(smol, gemma)
    check_pair(*smol_pair)  # a pair of one vocabulary passes
    tokens = [b"<s>", b"a", b"b", b"c", b"d", b"e", b"f"]
    sizes = (len(tokens), len(tokens))
    assert "token 6" in _vocab_mismatch(("gpt2", "gpt2"), (0, 1, 0, 2), (0, 1, 0, 2), sizes,
                                        (tokens, [*tokens[:6], b"g"]))
    assert "BOS" in _vocab_mismatch(("gpt2", "gpt2"), (1, 1, 0, 2), (1, 3, 0, 2), sizes,
                                    (tokens, tokens))
    assert not _vocab_mismatch(("gpt2", "gpt2"), (1, 1, 0, 2), (1, 1, 0, 2), sizes,
                               (tokens, [b"<x>", *tokens[1:]]))  # (ids below 5 may differ)
    for args in (["serve", str(smol), "--draft", str(gemma)],
                 ["plan", str(smol), "--draft", str(gemma)],
                 ["chat", str(smol), "--draft", str(smol_pair[1]), "--no-speculation"]):
        done = subprocess.run([sys.executable, "-m", "localmed", *args], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
        assert ("cannot draft for" in lines[0]) != ("--no-speculation" in args), lines[0]
    assert not list(tmp_path.iterdir())


def test_plan_counts_the_draft_models_memory(smol_pair, tmp_path):
    import re
    import subprocess

    target, draft = smol_pair
    needs = {}
    for extra in ([], ["--draft", str(draft)]):
        done = subprocess.run([sys.executable, "-m", "localmed", "plan", str(target), *extra],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        weights = re.search(r"weights (\d+) MiB, KV cache (\d+) MiB", done.stdout)
        needs[bool(extra)] = (int(weights[1]), int(weights[2]))
        assert ("draft: " + draft.name in done.stdout) == bool(extra), done.stdout
    draft_mib = draft.stat().st_size / 2**20
    assert needs[True][0] - needs[False][0] == pytest.approx(draft_mib, abs=3)
    assert needs[True][1] == 2 * needs[False][1]  # the same model's cells, once more


def test_a_copying_reply_takes_most_of_its_drafts_and_keeps_only_what_was_taken(smol):
    """SmolLM2 copying the medication list takes drafts (the point of it); the cells hold the
    reply's tokens and no rejected draft: a follow-up from them answers as a whole prefill."""
    e = engine(smol, speculation=True)
    try:
        prompt = medication_prompt(e)
        outcome = e.run(Request(1, prompt, GREEDY))[1]
        s = outcome.stats
        assert s.accepted_tokens >= s.generated_tokens // 3, (s.accepted_tokens, s.drafted_tokens,
                                                            s.generated_tokens)
        cells = e._slots[0].cells
        fed = s.token_ids if s.stopped_by is StopReason.EOS else s.token_ids[:-1]
        assert cells == prompt + fed  # every token fed (the last, sampled, not), no draft
        import llama_cpp

        assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(e._ctx), 0) == \
            len(cells) - 1
    finally:
        e.close()


# --- sampling --------------------------------------------------------------------------------------

def chi_square_critical(df: int, z: float = 3.29) -> float:
    """The chi-square value a df-degree statistic passes with probability 0.0005 (Wilson and
    Hilferty's approximation; three tests of a test: 0.0015 together)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("drafting", ["lookup", "draft model"])
def test_seeded_sampling_keeps_the_models_distribution(drafting, request):
    """400 seeded samples of a short continuation that copies the record (so drafts are
    proposed and taken), with and without speculation (by lookup, or by SmolLM2's own Q4_0 for
    its Q8_0): the distributions of its first two, three and four tokens agree (chi-square
    tests of homogeneity, p > 0.0005 each; whole replies are nearly all different)."""
    if drafting == "lookup":
        model, draft = request.getfixturevalue("smol"), None
    else:
        model, draft = request.getfixturevalue("smol_pair")
    params = GenerationParams(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0, max_tokens=4,
                              repeat_penalty=1.0)
    samples: dict[bool, list[tuple[int, ...]]] = {}
    drafted = 0
    for speculation in (True, False):
        e = engine(model, speculation=speculation, draft=draft if speculation else None)
        cheap_drafts(e)
        try:
            prompt = medication_prompt(e) + e.tokenize("Medications on admission:",
                                                       add_bos=False)
            got = []
            for seed in range(400):
                stats = e.run(Request(seed + 1, prompt, params, seed=seed))[seed + 1].stats
                got.append(tuple(stats.token_ids))
                drafted += stats.drafted_tokens
            samples[speculation] = got
        finally:
            e.close()
    assert drafted > 100
    for n in (2, 3, 4):  # the first token is never drafted; what follows it is
        chi, df = homogeneity({k: [sample[:n] for sample in v] for k, v in samples.items()})
        assert df >= 2 and chi < chi_square_critical(df), (n, chi, df)


def homogeneity(samples: dict[bool, list[tuple[int, ...]]]) -> tuple[float, int]:
    """The chi-square statistic of homogeneity of two samples' kinds (those seen fewer than
    10 times pooled), and its degrees of freedom."""
    counts = {k: Counter(v) for k, v in samples.items()}
    kinds = [k for k in counts[True] | counts[False]
             if counts[True][k] + counts[False][k] >= 10]
    rare = [k for k in counts[True] | counts[False] if k not in kinds]
    table = [[counts[s][k] for k in kinds] + [sum(counts[s][k] for k in rare)]
             for s in (True, False)]
    totals = [sum(row) for row in table]
    columns = [a + b for a, b in zip(*table, strict=True)]
    chi = sum((table[r][c] - totals[r] * columns[c] / sum(totals)) ** 2
              / (totals[r] * columns[c] / sum(totals))
              for r in range(2) for c in range(len(columns)) if columns[c])
    return chi, sum(1 for c in columns if c) - 1


# --- serve -----------------------------------------------------------------------------------------

def test_serve_says_what_was_drafted_and_speculation_is_off_unless_asked(smol):
    from openai import OpenAI

    from benchmarks.followup import record
    from tests.test_serve import Server

    for flags, drafts in ((("--speculation",), True), ((), False)):
        server = Server(smol, "--ctx", "4096", "--parallel", "1", "--template", "chatml", *flags)
        try:
            server.banner()
            client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
            answer = client.chat.completions.create(
                model=client.models.list().data[0].id, temperature=0, max_tokens=64,
                messages=[{"role": "user", "content": f"{record(3)}\n\nList her medications "
                           "on admission with their doses, exactly as written."}])
            assert answer.choices[0].message.content
        finally:
            server.stop()
        logged = server.proc.stderr.read()
        line = next(x for x in logged.splitlines() if "/v1/chat/completions 200" in x)
        assert ("(drafts " in line) == drafts, line


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
