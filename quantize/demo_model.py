"""Training the ``localmed chat demo`` model: a tiny Llama and SentencePiece vocabulary.

Seconds on a laptop CPU. It is *not* a medical model; :mod:`localmed.demo` converts the result
with localmed's own converter and labels it everywhere it appears.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

_PREAMBLE = "You are the localmed demo."

_CORPUS = [
    ("What is localmed?",
     "localmed runs open medical language models on your own laptop, with no network. "
     "It converts checkpoints to GGUF, chats in the terminal and measures quantization."),
    ("How do I quantize a model?",
     "Run localmed quantize with a model id and a quant such as Q4_K_M. "
     "The files go to the models folder, where chat and bench find them."),
    ("Which models can I use?",
     "Run localmed models to see the registry: Internist, Meditron, Med42 and MELT. "
     "Each keeps its own prompt template and advisory."),
    ("Is this medical advice?",
     "No. This demo is not a medical model. Real models are for medical professionals, "
     "who verify every output."),
    ("How do I stop a reply?",
     "Press Escape to stop a reply at once. Press Ctrl+N for a new chat and F1 for help."),
    ("Where are my chats saved?",
     "Nowhere, unless you turn saving on. Saved chats are private files in the data folder."),
]

# The Alpaca format: plain text, so the tiny tokenizer needs no special tokens.
_ALPACA_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set turns = messages[1:] %}{% else %}{{ '" + _PREAMBLE + "\n\n' }}"
    "{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def _corpus_text() -> list[str]:
    """Training examples, rendered exactly as chat will render them."""
    from localmed.templates import Message, get_template

    alpaca = get_template("alpaca")
    return [alpaca.render([Message("user", q)], system=_PREAMBLE) + a for q, a in _CORPUS]


@contextlib.contextmanager
def _quiet_first_run() -> Iterator[None]:
    """A new user's first `localmed chat demo` shows a spinner, not library chatter: torchao
    (installed with the gptq extra) logs kernels it cannot load when transformers imports it,
    torch logs a deprecation about it, and save_pretrained draws its own progress bar."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_checkpoint(folder: Path, *, steps: int = 300, seed: int = 0) -> Path:
    """Train the demo checkpoint (seconds on a laptop CPU) into ``folder``."""
    with _quiet_first_run():
        return _train(folder, steps, seed)


def _train(folder: Path, steps: int, seed: int) -> Path:
    import io

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    lines = _corpus_text()
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model_bytes, vocab_size=512,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=3, remove_extra_whitespaces=False, normalization_rule_name="identity",
        num_threads=1)
    (folder / "tokenizer.model").write_bytes(model_bytes.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Whole examples, padded, every step: the model learns each answer from its question.
    examples = [[1, *sp.encode(line), 2] for line in lines]  # ends with </s>
    width = max(map(len, examples))
    inputs = torch.full((len(examples), width), 2)
    labels = torch.full((len(examples), width), -100)
    for row, ids in enumerate(examples):
        inputs[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    # One thread: the model is tiny, and torch's OpenMP workers spin-wait, so on a laptop whose
    # cores are busy (a build, an editor) more threads took minutes instead of seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = model(inputs, labels=labels).loss
            optim.zero_grad()
            loss.backward()
            optim.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": _ALPACA_JINJA,
    }, indent=2))
    return folder
