"""One converter class per model family, registered by the Hugging Face architectures it handles.

As in llama.cpp's converter, a family says how its hyperparameters map to GGUF keys
(``set_gguf_parameters``) and how each checkpoint tensor becomes GGUF tensors
(``modify_tensors``). Unlike it, ``modify_tensors`` yields *planned* tensors (name, shape and
loaders) rather than data, so the whole file layout is known before a byte of weights is read and
each tensor is loaded only while it is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import gguf
import numpy as np

from localmed.errors import CheckpointError, SourceError, UnsupportedArchitectureError
from localmed.formats.safetensors import TensorRef
from localmed.planner import HF_LAYER
from localmed.quantize.checkpoint import Checkpoint

Loader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class PlannedTensor:
    """A GGUF tensor: its name, its numpy shape, and the loaders of its rows.

    Each loader yields float32 data; several loaders are stacked along a new first axis
    (Mixtral's experts), one at a time, so merging never holds all experts in memory.
    """

    name: str
    shape: tuple[int, ...]
    parts: tuple[Loader, ...]
    keep_f32: bool = False
    """Stays F32 whatever the output type (norms, MoE routers, RoPE factors)."""


_FAMILIES: dict[str, type[ConverterFamily]] = {}


def register(*hf_architectures: str) -> Callable[[type[ConverterFamily]], type[ConverterFamily]]:
    """Class decorator: the family converts checkpoints of these Hugging Face architectures."""

    def wrap(cls: type[ConverterFamily]) -> type[ConverterFamily]:
        for name in hf_architectures:
            _FAMILIES[name] = cls
        cls.hf_architectures = hf_architectures
        return cls

    return wrap


def native_architectures() -> list[str]:
    """The Hugging Face architectures localmed's streaming converter handles."""
    return sorted(_FAMILIES)


def family_for(checkpoint: Checkpoint) -> ConverterFamily:
    """The converter for a checkpoint; an unknown architecture names itself and the supported."""
    arch = checkpoint.architecture
    if arch not in _FAMILIES:
        raise UnsupportedArchitectureError(arch, _FAMILIES)
    return _FAMILIES[arch](checkpoint)


class ConverterFamily:
    """Base of the families: hyperparameter lookup and the default tensor mapping."""

    model_arch: ClassVar[gguf.MODEL_ARCH]
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    skip_tensors: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.hparams = checkpoint.config
        self.block_count: int = self.int_hparam("num_hidden_layers")
        self.tensor_map = gguf.get_tensor_name_map(self.model_arch, self.block_count)
        self.expected: dict[str, tuple[int, ...]] = {}
        """Shape of each tensor (by name suffix) that config.json implies; checked in plan()."""

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    def hparam(self, *keys: str, default: Any = ...) -> Any:
        """First of ``keys`` present (and not null) in config.json."""
        for key in keys:
            if self.hparams.get(key) is not None:
                return self.hparams[key]
        if default is ...:
            raise SourceError(self.checkpoint.folder / "config.json",
                              f"missing '{keys[0]}' (needed by the {self.arch_name} converter)")
        return default

    def int_hparam(self, *keys: str, default: Any = ...) -> int:
        """A positive whole number from config.json (a string or 0 there is an error)."""
        value = self.hparam(*keys, default=default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(self.checkpoint.folder / "config.json",
                                  f"'{keys[0]}' must be a positive whole number, got {value!r}")
        return value

    def rope_parameters(self) -> dict[str, Any]:
        """RoPE settings, from transformers 5's ``rope_parameters`` or the older keys."""
        params = dict(self.hparams.get("rope_scaling") or {})
        params.update(self.hparams.get("rope_parameters") or {})
        params.setdefault("rope_theta", self.hparams.get("rope_theta", 10000.0))
        params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
        return params

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def modify_tensors(self, ref: TensorRef) -> Iterable[PlannedTensor]:
        """Default: map the name through gguf-py's tensor-name table, data unchanged."""
        yield self.plain(ref, self.map_name(ref.name), ref.read)

    def extra_tensors(self) -> Iterable[PlannedTensor]:
        """Tensors the checkpoint does not store but llama.cpp needs (e.g. RoPE factors)."""
        return ()

    def finish(self) -> None:
        """Called after every checkpoint tensor went through ``modify_tensors``."""

    def map_name(self, name: str) -> str:
        mapped = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise SourceError(self.checkpoint.folder,
                              f"cannot map tensor '{name}' to a {self.arch_name} GGUF tensor")
        return mapped

    @staticmethod
    def plain(ref: TensorRef, name: str, loader: Loader, keep_f32: bool = False) -> PlannedTensor:
        return PlannedTensor(name, ref.shape, (loader,), keep_f32=keep_f32 or len(ref.shape) <= 1)

    def plan(self) -> list[PlannedTensor]:
        """Every GGUF tensor, in checkpoint order, then the extras; each checkpoint tensor is
        checked against the shape config.json implies, so a mismatch is refused before a byte
        is written (llama.cpp would refuse the file later, or worse, load it)."""
        planned: list[PlannedTensor] = []
        layers: set[int] = set()
        for name in sorted(self.checkpoint.tensors, key=_natural_key):
            if name.endswith(self.skip_tensors):
                continue
            ref = self.checkpoint.tensors[name]
            self.check_shape(ref)
            if (match := HF_LAYER.search(name)) is not None:
                layers.add(int(match.group(1)))
            planned.extend(self.modify_tensors(ref))
        if layers != set(range(self.block_count)):
            raise CheckpointError(
                self.checkpoint.folder / "config.json",
                f"num_hidden_layers is {self.block_count}, the weights have "
                f"{len(layers)} layers" + (f" (numbered up to {max(layers)})" if layers else ""))
        self.finish()
        planned.extend(self.extra_tensors())
        return planned

    def check_shape(self, ref: TensorRef) -> None:
        for suffix, shape in self.expected.items():
            if ref.name.endswith(suffix):
                if tuple(ref.shape) != shape:
                    raise CheckpointError(
                        ref.path, f"tensor {ref.name} has shape {list(ref.shape)}, config.json "
                        f"implies {list(shape)}: the weights and config.json disagree")
                return


def _natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``, so tensors are written in layer order."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaConverter(ConverterFamily):
    """Llama-2, Llama-3 and Mistral-7B: one GGUF architecture, ``llama``."""

    model_arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        config = checkpoint.folder / "config.json"
        hidden = self.int_hparam("hidden_size")
        heads = self.int_hparam("num_attention_heads")
        kv = self.int_hparam("num_key_value_heads", default=heads)
        ffn = self.int_hparam("intermediate_size")
        vocab = self.int_hparam("vocab_size")
        head_dim = self.int_hparam("head_dim", default=None)
        if head_dim is None:
            if hidden % heads:
                raise CheckpointError(config, f"hidden_size {hidden} is not a multiple of "
                                      f"num_attention_heads {heads}")
            head_dim = hidden // heads
        if heads % kv:
            raise CheckpointError(config, f"num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv}")
        self.expected = {
            "embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "q_proj.weight": (heads * head_dim, hidden), "k_proj.weight": (kv * head_dim, hidden),
            "v_proj.weight": (kv * head_dim, hidden), "o_proj.weight": (hidden, heads * head_dim),
            "gate_proj.weight": (ffn, hidden), "up_proj.weight": (ffn, hidden),
            "down_proj.weight": (hidden, ffn),
        }

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        n_head = self.hparam("num_attention_heads")
        hidden = self.hparam("hidden_size")
        writer.add_context_length(self.hparam("max_position_embeddings"))
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(self.hparam("intermediate_size"))
        writer.add_block_count(self.block_count)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(self.hparam("num_key_value_heads", default=n_head))
        writer.add_layer_norm_rms_eps(self.hparam("rms_norm_eps"))
        writer.add_vocab_size(self.hparam("vocab_size"))
        head_dim = self.hparam("head_dim", default=hidden // n_head)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        rope = self.rope_parameters()
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        kind = rope["rope_type"]
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        elif kind not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
            raise SourceError(self.checkpoint.folder / "config.json",
                              f"RoPE scaling '{kind}' is not supported by the converter")

    def _heads(self) -> tuple[int, int]:
        n_head = self.hparam("num_attention_heads")
        return n_head, self.hparam("num_key_value_heads", default=n_head)

    def modify_tensors(self, ref: TensorRef) -> Iterable[PlannedTensor]:
        # Hugging Face stores q/k with the rotary halves split; llama.cpp wants them interleaved,
        # as Meta's original weights were.
        n_head, n_kv = self._heads()
        if ref.name.endswith(("q_proj.weight", "q_proj.bias")):
            yield self.plain(ref, self.map_name(ref.name), lambda: permute(ref.read(), n_head))
        elif ref.name.endswith(("k_proj.weight", "k_proj.bias")):
            yield self.plain(ref, self.map_name(ref.name), lambda: permute(ref.read(), n_kv))
        else:
            yield from super().modify_tensors(ref)

    def extra_tensors(self) -> Iterable[PlannedTensor]:
        rope = self.rope_parameters()
        if rope["rope_type"] != "llama3":
            return
        factors = llama3_rope_factors(rope, self.hparam(
            "head_dim", default=self.hparam("hidden_size") // self.hparam("num_attention_heads")))
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield PlannedTensor(name, factors.shape, (lambda: factors,), keep_f32=True)


@register("MixtralForCausalLM")
class MixtralConverter(LlamaConverter):
    """Mixtral 8x7B (MELT, medico-mistral): per-expert matrices merged into 3-D tensors."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        self.n_experts: int = self.int_hparam("num_local_experts")
        self._pending: dict[tuple[int, str], dict[int, TensorRef]] = {}
        hidden, ffn = self.int_hparam("hidden_size"), self.int_hparam("intermediate_size")
        self.expected |= {"block_sparse_moe.gate.weight": (self.n_experts, hidden),
                          ".w1.weight": (ffn, hidden), ".w2.weight": (hidden, ffn),
                          ".w3.weight": (ffn, hidden)}

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(writer)
        writer.add_expert_count(self.n_experts)
        writer.add_expert_used_count(self.hparam("num_experts_per_tok"))

    def modify_tensors(self, ref: TensorRef) -> Iterable[PlannedTensor]:
        parts = ref.name.split(".")
        if "experts" not in parts:
            keep = ref.name.endswith("block_sparse_moe.gate.weight")  # the router: keep precise
            for planned in super().modify_tensors(ref):
                yield PlannedTensor(planned.name, planned.shape, planned.parts,
                                    keep_f32=planned.keep_f32 or keep)
            return
        # model.layers.{bid}.block_sparse_moe.experts.{xid}.{w1,w2,w3}.weight
        bid, xid, wid = int(parts[2]), int(parts[5]), parts[6]
        group = self._pending.setdefault((bid, wid), {})
        group[xid] = ref
        if len(group) < self.n_experts:
            return
        del self._pending[(bid, wid)]
        refs = [group[x] for x in range(self.n_experts)]
        name = self.map_name(f"layers.{bid}.feed_forward.experts.{wid}.weight")
        yield PlannedTensor(name, (self.n_experts, *refs[0].shape),
                            tuple(r.read for r in refs))

    def finish(self) -> None:
        if self._pending:
            (bid, wid), group = next(iter(self._pending.items()))
            raise SourceError(self.checkpoint.folder,
                              f"layer {bid} has {len(group)} of {self.n_experts} experts for {wid}")


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's split-half RoPE layout to llama.cpp's interleaved."""
    shape = weights.shape
    return (weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
            .swapaxes(1, 2)
            .reshape(shape))


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama-3.1-style RoPE frequency factors (``rope_freqs.weight``)."""
    base = float(rope["rope_theta"])
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
