"""Tiny, seeded, real Hugging Face checkpoints for tests and benchmarks.

Built with transformers (a few layers, GQA, Mixtral with several experts), saved as safetensors,
with real tokenizers: the Llama-2 SentencePiece ``tokenizer.model`` from ``../shared/vocab`` and
the Llama-3 BPE tokenizer rebuilt by transformers from ``ggml-vocab-llama-bpe.gguf``.
Dimensions are multiples of 256 so that K-quants apply to every matrix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOCAB = SHARED / "vocab"
SPM_MODEL = VOCAB / "llama2-tokenizer.model"
BPE_GGUF = VOCAB / "ggml-vocab-llama-bpe.gguf"

SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def _small(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        initializer_range=0.08, tie_word_embeddings=False,
    )
    base.update(overrides)
    return base


def _save(model: object, folder: Path, dtype: str) -> None:
    import torch

    model = model.to(getattr(torch, dtype))  # type: ignore[attr-defined]
    model.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]


def _spm_tokenizer(folder: Path, chat_template: str | None) -> None:
    shutil.copyfile(SPM_MODEL, folder / "tokenizer.model")
    config: dict[str, object] = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_spm_model(folder: Path, arch: str = "llama", *, seed: int = 0, dtype: str = "float32",
                    chat_template: str | None = SPM_CHAT_TEMPLATE, **overrides: object) -> Path:
    """A tiny Llama-2 / Mistral / Mixtral checkpoint with the real Llama-2 tokenizer.model."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    torch.manual_seed(seed)
    common = _small(vocab_size=32000, bos_token_id=1, eos_token_id=2, **overrides)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif arch == "mixtral":
        common.setdefault("num_local_experts", 4)
        common.setdefault("num_experts_per_tok", 2)
        model = MixtralForCausalLM(MixtralConfig(sliding_window=None, **common))
    else:
        raise ValueError(arch)
    folder.mkdir(parents=True, exist_ok=True)
    _save(model, folder, dtype)
    _spm_tokenizer(folder, chat_template)
    return folder


def save_llama3_tokenizer(folder: Path) -> Path:
    """The Llama-3 tokenizer, rebuilt by transformers from the vocab GGUF (slow: ~30 s)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(VOCAB), gguf_file=BPE_GGUF.name)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    # The rebuild appends an '<|endoftext|>' (id 128256) that Llama-3 does not have; drop it so
    # the tokenizer has the real 128256 tokens.
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in vocab]
    # Meta's tokenizer.json puts <|begin_of_text|> before every encoding; the GGUF rebuild does
    # not. llama.cpp identifies the pre-tokenizer by hashing encode() of a fixed text, so
    # without it this would pass for another tokenizer (smaug-bpe), to llama.cpp as to localmed.
    bos = {"id": "<|begin_of_text|>", "type_id": 0}
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|begin_of_text|>": {
                    "id": "<|begin_of_text|>", "ids": [vocab["<|begin_of_text|>"]],
                    "tokens": ["<|begin_of_text|>"]}}}
    previous = data.get("post_processor")
    data["post_processor"] = {"type": "Sequence", "processors": [previous, template]} \
        if previous else template
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def build_llama3_model(folder: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A tiny Llama-3 checkpoint (128256-token BPE vocab, tied embeddings, rope_theta 500000)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**_small(vocab_size=128256, bos_token_id=128000, eos_token_id=128001,
                                  rope_theta=500000.0, tie_word_embeddings=True))
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    _save(model, folder, "float32")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = LLAMA3_CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def read_vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors: (text, expected ids) for ``ggml-vocab-<name>.gguf``."""
    inp = (VOCAB / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    out = (VOCAB / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    ids = [[int(t) for t in line.split()] for line in out.split("\n")][: len(texts)]
    assert len(texts) == len(ids), (len(texts), len(ids))
    return list(zip(texts, ids, strict=True))


GEMMA3_TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "google-gemma-3-4b-it.jinja"


def _gemma3_text(**overrides: object) -> dict[str, object]:
    """The tiny Gemma 3 text model's shape, in Gemma 3's own layout: five sliding-window layers,
    then one global (llama.cpp assumes it)."""
    return dict(
        vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        sliding_window=8, layer_types=[*["sliding_attention"] * 5, "full_attention"],
        query_pre_attn_scalar=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.08, **overrides)


def build_gemma3_model(folder: Path, *, seed: int = 0) -> Path:
    """A tiny Gemma 3 text model (Gemma3ForCausalLM: sliding and global attention, QK-norm),
    with the Llama-2 SentencePiece vocabulary standing in for Gemma's and Gemma 3's own chat
    template. No converter of localmed's handles it: it goes to llama.cpp's."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**_gemma3_text(tie_word_embeddings=True)))
    folder.mkdir(parents=True, exist_ok=True)
    _save(model, folder, "float32")
    _spm_tokenizer(folder, GEMMA3_TEMPLATE.read_text(encoding="utf-8"))
    return folder


GEMMA3_VISION_IMAGE_SIZE = 64
"""The tiny image-text model's image side (pixels): 8 x 8 patches, pooled to 4 x 4 tokens."""


def seeded_pictures(folder: Path) -> dict[str, Path]:
    """Two seeded 64 x 64 PNG pictures of random pixels, ``a`` and ``b``, for
    :func:`build_gemma3_vision_model` (its own image size: no resizing on either side)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = GEMMA3_VISION_IMAGE_SIZE
    out = {}
    for name in ("a", "b"):
        out[name] = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out[name])
    return out


def build_gemma3_vision_model(folder: Path, *, seed: int = 0) -> Path:
    """A tiny Gemma 3 image-text model (Gemma3ForConditionalGeneration: a two-layer SigLIP
    vision tower on 64 x 64 images, Gemma 3's pooling projector to 16 tokens an image, and
    :func:`build_gemma3_model`'s text model), with the image processor's config that llama.cpp's
    converter reads for the projector."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    # an output head of its own: with tied embeddings a random model's greedy reply repeats
    # its prompt's last token, which would not show a difference between two pictures
    text = Gemma3TextConfig(**_gemma3_text(tie_word_embeddings=False))
    vision = SiglipVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=GEMMA3_VISION_IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6,
        vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                          initializer_range=0.08, tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # SigLIP's default init leaves the tower near zero: make it matter
        for name, param in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                if name.endswith("weight") and param.dim() > 1:
                    param.normal_(0.0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    _save(model, folder, "float32")
    _hub_vision_names(folder / "model.safetensors")
    _spm_tokenizer(folder, GEMMA3_TEMPLATE.read_text(encoding="utf-8"))
    side = GEMMA3_VISION_IMAGE_SIZE
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "image_seq_length": 16, "size": {"height": side, "width": side},
        "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True, "do_pan_and_scan": False}, indent=2))
    return folder


def _hub_vision_names(path: Path) -> None:
    """The vision tower's tensors under the names Google's checkpoints give them
    (``vision_tower.vision_model.*``, no pooling head: Gemma 3 does not use it), where
    transformers 5 saves them as ``vision_tower.*``; transformers loads either."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("vision_tower.head."):
            continue
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        renamed[name] = tensor.contiguous()
    save_file(renamed, path, metadata={"format": "pt"})
