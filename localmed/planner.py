"""GPU offload planning: how many layers fit on the GPU, from sizes alone.

Pure arithmetic on two records, so that every case (CPU only, partial, full offload, refusal) is
tested from given figures: :class:`ModelFootprint` (read from a GGUF's tensor table) and
:class:`Hardware` (detected by :mod:`localmed.runtimes.hardware`). The plan explains itself in
words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from localmed.errors import ModelTooLargeError, PlanError
from localmed.quants import QUANT_TYPES

MIN_CTX = 256
"""llama.cpp's smallest context; a smaller one is raised to it (and the plan says so)."""

MIB = 2**20
GIB = 2**30

# llama.cpp's compute buffers, scratch and the process itself; measured ~0.3-0.6 GiB on 7B
# models at 4k context, so a margin on each side.
RAM_OVERHEAD = 768 * MIB
VRAM_OVERHEAD = 640 * MIB
VRAM_HEADROOM = 0.05
"""Fraction of free VRAM left unused (display server, other processes, fragmentation)."""


@dataclass(frozen=True)
class Hardware:
    """What the machine offers. Sizes in bytes."""

    backend: str
    """``cuda``, ``metal``, ``rocm``, ``vulkan`` … or ``cpu``: where llama.cpp can offload."""
    ram_total: int
    ram_available: int
    vram_total: int = 0
    vram_free: int = 0
    device: str = ""
    """GPU name, for messages."""
    unified_memory: bool = False
    """Apple Silicon: GPU memory is RAM, so it is not counted twice."""


@dataclass(frozen=True)
class ModelFootprint:
    """What a model needs. Sizes in bytes."""

    n_layers: int
    layer_bytes: tuple[int, ...]
    """Weights of each repeating block (``blk.N.*``)."""
    other_bytes: int
    """Embeddings, output head and final norm."""
    output_bytes: int
    """The output head alone (offloaded with the last layer, as llama.cpp does)."""
    kv_bytes_per_token: int
    """K and V cache for one token across all layers (f16 cache)."""
    n_ctx_train: int
    n_parameters: int
    quant: str = ""

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes

    def kv_bytes(self, n_ctx: int) -> int:
        return self.kv_bytes_per_token * n_ctx


@dataclass(frozen=True)
class OffloadPlan:
    """How a model will be loaded, and why."""

    gpu_layers: int
    n_layers: int
    n_ctx: int
    backend: str
    ram_needed: int
    vram_needed: int
    fits: bool
    reasons: tuple[str, ...] = field(default=())
    suggestion: str | None = None
    """A smaller quant to try when the model does not fit."""

    @property
    def label(self) -> str:
        """Short form for a status bar: ``GPU 33/33 layers`` or ``CPU``."""
        if self.gpu_layers == 0 or self.backend == "cpu":
            return "CPU"
        if self.backend == "rpc":
            return f"workers {self.gpu_layers}/{self.n_layers} layers"
        return f"GPU {self.gpu_layers}/{self.n_layers} layers"

    @property
    def flash_attention(self) -> bool:
        """llama.cpp's flash attention ``auto`` (llama-server's default: on wherever the device
        has it), for chat and serve alike, on the GPU and the CPU. Measured on the CPU (SmolLM2,
        2 cores, against llama-server in the same runs): a pasted record's first reply comes
        0.90-1.16x llama-server's time with it, 1.13-1.33x without; four short streams 0.94x
        its tokens/s with it, 0.79x without; a follow-up's first token <= 1.0x either way. What
        it costs: decoding after a long record is slower on the CPU (0.66-0.83x per token,
        ``benchmarks/flash_attention.py``), so a long reply to a long record loses part of
        what its prefill won."""
        return True

    @property
    def n_gpu_layers_arg(self) -> int:
        """llama.cpp's ``n_gpu_layers`` (it counts the output layer as one more)."""
        return self.gpu_layers + 1 if self.gpu_layers == self.n_layers else self.gpu_layers


def refuse_unless_fits(plan: OffloadPlan, path: Path) -> OffloadPlan:
    """``plan`` if the model fits; else the one refusal every engine gives before it loads
    anything (:class:`ModelTooLargeError`: the figures, and a smaller quant to try)."""
    if not plan.fits:
        raise ModelTooLargeError(path, plan.reasons[-1], plan.suggestion, plan)
    return plan


def gib(n: float) -> str:
    """A memory size for people: GiB, or MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


GGUF_NAMES = (re.compile(r"^blk\.(\d+)\."), "output.")
"""Block tensors and the output head as GGUF names them."""
HF_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
"""A Hugging Face block tensor (``model.layers.N.*``); group 1 is the layer."""
HF_NAMES = (HF_LAYER, "lm_head.")
"""The same in Hugging Face checkpoints (``model.layers.N.*``, ``lm_head.*``)."""


def footprint_from_tensors(tensors: Iterable[tuple[str, int]], *, n_layers: int, n_embd: int,
                           n_head: int, n_head_kv: int, n_ctx_train: int, n_parameters: int,
                           quant: str = "", head_dim: int | None = None,
                           names: tuple[re.Pattern[str], str] = GGUF_NAMES) -> ModelFootprint:
    """A footprint from ``(tensor name, bytes)`` pairs and the attention shape."""
    block, output_prefix = names
    layers = [0] * n_layers
    other = output = 0
    for name, nbytes in tensors:
        match = block.search(name)
        if match and int(match.group(1)) < n_layers:
            layers[int(match.group(1))] += nbytes
        else:
            other += nbytes
            if name.startswith(output_prefix):
                output += nbytes
    head_dim = head_dim or n_embd // n_head
    kv_per_token = 2 * n_layers * n_head_kv * head_dim * 2  # K and V, f16
    return ModelFootprint(n_layers, tuple(layers), other, output, kv_per_token, n_ctx_train,
                          n_parameters, quant)


@dataclass(frozen=True)
class ModelShape:
    """What a model's config says, enough to estimate a GGUF of it before it exists."""

    parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int = 0
    vocab_size: int = 0
    tied_embeddings: bool = False
    context_length: int = 4096


OUTPUT_BPW = 6.5625
"""Bits per weight llama.cpp gives the output head (and a tied token embedding, which serves as
it) below 6 bits: Q6_K's (llama_tensor_get_type)."""
QK_K = 256
"""Row length k-quants and i-quants work in: rows of another length get a legacy type."""
FALLBACK_BPW = {"Q2_K": 4.5, "Q2_K_S": 4.5, "Q3_K_S": 4.5, "Q3_K_M": 4.8, "Q3_K_L": 5.0,
                "Q4_K_S": 5.5, "Q4_K_M": 6.0, "Q5_K_S": 6.0, "Q5_K_M": 6.4, "Q6_K": 8.5}
"""Bits per weight of each k-quant where the rows are not a multiple of QK_K: llama.cpp falls
back to IQ4_NL, Q5_0, Q5_1 and Q8_0 for Q2_K/Q3_K, Q4_K, Q5_K and Q6_K (their mix as in the
published type); i-quants go to IQ4_NL."""


def _bpw(quant: str, row: int) -> tuple[float, float]:
    """(blocks', output head's) bits per weight at ``quant`` for rows of length ``row``."""
    bpw = QUANT_TYPES[quant].bits_per_weight
    fits = row == 0 or row % QK_K == 0
    if not fits and quant in FALLBACK_BPW:
        bpw = FALLBACK_BPW[quant]
    elif not fits and quant.startswith("IQ"):
        bpw = 4.5
    output = bpw if bpw >= 6 else (OUTPUT_BPW if fits else 8.5)
    return bpw, output


def estimate_footprint(shape: ModelShape, quant: str) -> ModelFootprint:
    """A GGUF's footprint at ``quant``, estimated from the model's shape and llama.cpp's bits
    per weight: blocks and token embedding at the quant's, the output head at Q6_K's where that
    is finer, both at llama.cpp's fallback types where rows are not a multiple of 256."""
    bpw, output_bpw = _bpw(quant, shape.hidden_size)
    embedding = shape.vocab_size * shape.hidden_size
    if shape.tied_embeddings:
        output, other = 0, int(embedding * output_bpw / 8)
    else:
        output = int(embedding * output_bpw / 8)
        other = output + int(embedding * bpw / 8)
    blocks = max(shape.parameters - embedding * (1 if shape.tied_embeddings else 2), 0)
    per_layer = int(blocks * bpw / 8 / shape.layers)
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2  # K and V, f16
    return ModelFootprint(shape.layers, (per_layer,) * shape.layers, other, output,
                          kv_per_token, shape.context_length, shape.parameters, quant)


def plan_offload(model: ModelFootprint, hw: Hardware, *, n_ctx: int | None = None,
                 gpu_layers: int | None = None) -> OffloadPlan:
    """Decide how many layers go to the GPU.

    Layers are offloaded from the last one down (llama.cpp's order) while they, their share of
    the KV cache and the GPU's compute buffer fit in free VRAM. Whatever stays on the CPU must
    fit in available RAM, or the plan is refused with the figures and a smaller quant to try.
    ``gpu_layers`` (``--gpu-layers``) overrides the choice; -1 means all.
    """
    reasons: list[str] = []
    if n_ctx is not None and n_ctx <= 0:
        raise PlanError(f"the context must be a positive number of tokens, not {n_ctx}")
    n_ctx = n_ctx or min(model.n_ctx_train, 4096)
    if n_ctx < MIN_CTX:
        reasons.append(f"context raised from {n_ctx} to {MIN_CTX} tokens, llama.cpp's minimum")
        n_ctx = MIN_CTX
    kv_total = model.kv_bytes(n_ctx)
    kv_per_layer = kv_total // max(1, model.n_layers)
    layer_cost = [b + kv_per_layer for b in model.layer_bytes]

    if hw.backend == "cpu":
        chosen = 0
        if gpu_layers:
            reasons.append("--gpu-layers ignored: this llama.cpp build has no GPU offload")
        reasons.append("CPU only: this llama.cpp build has no GPU backend (see `localmed "
                       "doctor` for how to install with CUDA or Metal)")
    elif gpu_layers is not None:
        chosen = model.n_layers if gpu_layers < 0 else min(gpu_layers, model.n_layers)
        reasons.append(f"{chosen} layers on the GPU, as asked (--gpu-layers)")
    elif hw.vram_total == 0 and not hw.unified_memory:
        chosen = 0
        reasons.append(f"free VRAM of this {hw.backend.upper()} build cannot be measured: "
                       "running on the CPU; pass --gpu-layers N (-1: all) to offload")
    else:
        budget = int(hw.vram_free * (1 - VRAM_HEADROOM)) - VRAM_OVERHEAD - model.output_bytes
        chosen = 0
        for cost in reversed(layer_cost):
            if cost > budget:
                break
            budget -= cost
            chosen += 1
        where = f"{hw.device or hw.backend.upper()} with {gib(hw.vram_free)} free"
        if chosen == model.n_layers:
            reasons.append(f"all {chosen} layers fit on {where}")
        elif chosen == 0:
            reasons.append(f"no layer fits on {where}: running on the CPU")
        else:
            reasons.append(f"{chosen} of {model.n_layers} layers fit on {where}; the rest run on "
                           "the CPU (slower)")

    on_gpu = sum(layer_cost[model.n_layers - chosen:]) if chosen else 0
    vram_needed = on_gpu + (VRAM_OVERHEAD + model.output_bytes if chosen else 0)
    total = model.weights_bytes + kv_total + RAM_OVERHEAD
    # With unified memory the GPU's share comes out of the same RAM.
    ram_needed = total if hw.unified_memory else total - on_gpu - (
        model.output_bytes if chosen == model.n_layers else 0)
    reasons.append(f"weights {gib(model.weights_bytes)}, KV cache {gib(kv_total)} for "
                   f"{n_ctx} tokens of context")

    fits = ram_needed <= hw.ram_available and (vram_needed <= hw.vram_free or chosen == 0
                                               or gpu_layers is not None)
    suggestion = None
    if not fits:
        capacity = hw.ram_available + (0 if hw.unified_memory else hw.vram_free)
        reasons.append(f"needs {gib(total)} in all, more than the {gib(capacity)} of "
                       f"{'memory' if hw.unified_memory else 'RAM + VRAM'} available")
        suggestion = suggest_quant(model, capacity, n_ctx)
    return OffloadPlan(chosen, model.n_layers, n_ctx, hw.backend, ram_needed, vram_needed, fits,
                       tuple(reasons), suggestion)


def suggest_quant(model: ModelFootprint, capacity: int, n_ctx: int) -> str | None:
    """The quant to make instead, from the one recommender (:func:`choose_quant`: the lowest
    published KLD whose weights fit ``capacity`` beside this context's KV cache); ``plan``
    passes it what ``localmed bench`` measured for the model, where it has."""
    from localmed.quant_choice import choose_quant

    choice = choose_quant(model.n_parameters, capacity=capacity, below=model.quant,
                          fixed_bytes=model.kv_bytes(n_ctx) + RAM_OVERHEAD)
    return choice.quant if choice is not None else None
