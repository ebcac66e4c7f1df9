"""A loaded model's vocabulary, as the engine uses it: tokenizing, each token's bytes, the end
of generation, log probabilities, and each reply's sampler chain (``llama_cpp.Llama``'s, so a
reply at temperature 0 is the one ``localmed chat`` gives), with llama.cpp's grammar sampler for
JSON replies. Read-only once loaded: safe beside a running decode.

Everything here is llama-cpp-python's public low-level API (``llama_tokenize``,
``llama_token_to_piece``, ``llama_sampler_*``).
"""

from __future__ import annotations

import ctypes
import json
import math
import random
from typing import Any

import numpy as np

from localmed.errors import GrammarError
from localmed.runtimes.messages import Request, TokenLogprob

PENALTY_LAST_N = 64
"""Tokens the repeat penalty looks back over: ``llama_cpp.Llama``'s ``last_n_tokens_size``."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """llama.cpp's GBNF for any JSON object (``schema`` None) or for one JSON schema."""
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises whatever its walk meets
        raise GrammarError(f"llama.cpp cannot turn this JSON schema into a grammar: "
                           f"{type(exc).__name__}: {exc}") from None


class Vocabulary:
    """The vocabulary of the model at ``model`` (a ``llama_model`` pointer)."""

    def __init__(self, llama: Any, model: Any) -> None:
        self._llama = llama
        self._vocab = llama.llama_model_get_vocab(model)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self._vocab))
        self._piece = ctypes.create_string_buffer(256)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, special tokens parsed."""
        llama, data = self._llama, text.encode("utf-8")
        size = len(data) + 8
        tokens = (llama.llama_token * size)()
        n = llama.llama_tokenize(self._vocab, data, len(data), tokens, size,
                                 add_bos and self.add_bos, True)
        if n < 0:
            size = -n
            tokens = (llama.llama_token * size)()
            n = llama.llama_tokenize(self._vocab, data, len(data), tokens, size,
                                     add_bos and self.add_bos, True)
        return list(tokens[:n])

    def token_bytes(self, token: int) -> bytes:
        n = self._llama.llama_token_to_piece(self._vocab, token, self._piece,
                                             len(self._piece), 0, False)
        return self._piece.raw[:max(n, 0)]

    def ends(self, token: int) -> bool:
        """Whether ``token`` ends generation (end of sequence, end of turn, …)."""
        return bool(self._llama.llama_vocab_is_eog(self._vocab, token))

    def logprob(self, token: int, logprob: float,
                top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        raw = self.token_bytes(token)
        return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, raw, top)

    def logprob_entry(self, logits: Any, token: int, top: int) -> TokenLogprob:
        """The token's log probability under the model (log-softmax of its logits) and the
        ``top`` most likely tokens'."""
        peak = float(logits.max())
        log_z = peak + math.log(float(np.exp(logits - peak).sum()))
        negated = -logits  # ascending = most likely first; top <= 20 (the server's bound) < vocab
        best = np.argpartition(negated, top)[:top]
        best = best[np.argsort(negated[best], kind="stable")]
        return self.logprob(token, float(logits[token]) - log_z,
                            tuple(self.logprob(int(t), float(logits[t]) - log_z) for t in best))

    def check_grammar(self, grammar: str) -> None:
        """Refuse a grammar llama.cpp does not parse, before any request waits on it."""
        sampler = self._llama.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise GrammarError("llama.cpp could not parse the grammar made from this schema")
        self._llama.llama_sampler_free(sampler)

    def sampler(self, request: Request) -> Any:
        """``llama_cpp.Llama``'s chain: penalties, grammar, then greedy or top-k … dist (free
        it with ``llama_sampler_free``)."""
        llama, params = self._llama, request.params
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama.llama_sampler_chain_add(chain, sampler)

        add(llama.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N,
                                               params.repeat_penalty,
                                               params.frequency_penalty,
                                               params.presence_penalty))
        if request.grammar is not None:
            grammar = llama.llama_sampler_init_grammar(self._vocab, request.grammar.encode(),
                                                       b"root")
            if not grammar:
                llama.llama_sampler_free(chain)
                raise GrammarError("llama.cpp could not parse the grammar")
            add(grammar)
        if params.temperature == 0:
            add(llama.llama_sampler_init_greedy())
        else:
            add(llama.llama_sampler_init_top_k(params.top_k))
            add(llama.llama_sampler_init_typical(1.0, 1))
            add(llama.llama_sampler_init_top_p(params.top_p, 1))
            add(llama.llama_sampler_init_min_p(params.min_p, 1))
            add(llama.llama_sampler_init_temp(params.temperature))
            seed = request.seed if request.seed is not None else random.getrandbits(32)
            add(llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain
