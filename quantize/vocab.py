"""Tokenizer → GGUF vocabulary, on gguf-py's vocab classes.

Tried in llama.cpp's order: SentencePiece (``tokenizer.model``), then a Hugging Face Llama
tokenizer.json with byte fallback, then byte-level BPE (Llama-3). Each class raises
``FileNotFoundError`` when its files are absent, which moves on to the next.

Byte-level BPE needs llama.cpp's name for its pre-tokenizer (``tokenizer.ggml.pre``). It is
identified as llama.cpp identifies it: the checksum of the tokenization of llama.cpp's fixed test
text, looked up in the table of the pinned llama.cpp's own converter. An unknown one is an error,
never a guess (llama.cpp would split text differently from the model's training); the pipeline
then hands the checkpoint to llama.cpp's converter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import gguf

from localmed.errors import ConverterMissingError, SourceError, TokenizerError
from localmed.quantize.llama_cpp_source import converter_table, tokenizer_checksum


class ByteLevelBpeVocab(gguf.BpeVocab):
    """gguf-py's BpeVocab, typing added tokens as llama.cpp does.

    ``BpeVocab`` leaves added tokens that also sit in the base vocab (all 256 Llama-3 specials)
    typed NORMAL; llama.cpp's converter types special ones CONTROL and the rest USER_DEFINED, which
    is what makes ``<|eot_id|>`` end a turn.
    """

    def __init__(self, base_path: Path) -> None:
        super().__init__(base_path)
        self.special: dict[int, bool] = {}
        if self.fname_tokenizer.name == "tokenizer.json":
            data = json.loads(self.fname_tokenizer.read_text(encoding="utf-8"))
            for item in data.get("added_tokens", []):
                self.special[item["id"]] = bool(item.get("special"))
            model = (data.get("model") or {}).get("type")
            if model != "BPE":
                raise TokenizerError(base_path, f"tokenizer.json holds a {model} model; "
                                     "localmed's converter takes SentencePiece or BPE")
            self.pre = identify_pre_tokenizer(base_path)
        else:
            raise TokenizerError(base_path, "slow (vocab.json) BPE tokenizers are not supported "
                                 "by localmed's converter; save the tokenizer with a "
                                 "tokenizer.json")

    def all_tokens(self) -> Iterable[tuple[bytes, float, gguf.TokenType]]:
        for token_id, (text, score, kind) in enumerate(super().all_tokens()):
            if token_id in self.special:
                kind = gguf.TokenType.CONTROL if self.special[token_id] else gguf.TokenType.USER_DEFINED
            yield text, score, kind


LoadedVocab = tuple[gguf.Vocab, str, str]
"""A vocabulary with llama.cpp's tokenizer model and pre-tokenizer names."""


def identify_pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the checkpoint's byte-level BPE pre-tokenizer, by checksum."""
    try:
        table = converter_table()
    except ConverterMissingError as missing:
        raise TokenizerError(folder, f"a byte-level BPE tokenizer needs llama.cpp's "
                             f"pre-tokenizer table to be identified ({missing})") from None
    checksum = tokenizer_checksum(folder, table.check_text)
    if checksum not in table.pre_tokenizers:
        raise TokenizerError(folder, f"tokenizer.json's BPE pre-tokenizer is not one llama.cpp "
                             f"knows (checksum {checksum[:16]}…)")
    return table.pre_tokenizers[checksum]


def load_vocab(folder: Path) -> LoadedVocab:
    """The checkpoint's vocabulary, with llama.cpp's tokenizer model and pre-tokenizer names."""
    try:
        return gguf.SentencePieceVocab(folder), "llama", "default"
    except FileNotFoundError:
        pass
    try:
        return gguf.LlamaHfVocab(folder), "llama", "default"
    except (FileNotFoundError, TypeError):
        pass
    try:
        vocab = ByteLevelBpeVocab(folder)
    except FileNotFoundError:
        raise TokenizerError(folder, "no tokenizer found (tokenizer.model or tokenizer.json)") \
            from None
    return vocab, "gpt2", vocab.pre


def write_vocab(writer: gguf.GGUFWriter, folder: Path, n_vocab: int,
                loaded: LoadedVocab | None = None) -> str:
    """Write tokens, scores, types, merges and special ids; returns the tokenizer model name.

    ``n_vocab`` is config.json's vocab_size: embedding rows beyond the tokenizer's tokens are
    padded with ``[PAD<i>]`` tokens, as llama.cpp expects one token per row.
    """
    vocab, model, pre = loaded or load_vocab(folder)
    tokens: list[bytes | str] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    if len(tokens) > n_vocab:
        raise SourceError(folder, f"the tokenizer has {len(tokens)} tokens but config.json's "
                          f"vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=(model == "gpt2"), n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    return model
