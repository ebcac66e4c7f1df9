"""Images in the multi-sequence engine: llama.cpp's multimodal library (libmtmd) on the
engine's own context, so chat and serve share it.

A prompt with images is tokenized from its parts (text, image, text, …) by
``mtmd_tokenize_from_parts``: the text as llama.cpp tokenizes it (special tokens parsed, as
``llama-mtmd-cli`` does), each image as the projector's own wrapping (Gemma 3:
``<start_of_image>`` … ``<end_of_image>``) around its image tokens. An image's tokens stand in
the prompt's token list as one placeholder id repeated, a negative number made from the
picture's digest: the prompt cache compares prompts as lists, so a conversation that sends the
same X-ray again with every turn (as OpenAI clients do) keeps its cells, and another picture
differs from its first token (llama-server compares images by hash as well).

When a sequence's prefill reaches an image, :meth:`Vision.evaluate` encodes it (the vision
tower and projector) and decodes its embeddings into that sequence's cells
(``mtmd_helper_eval_chunk_single``, attention inside the image as the projector asks). That
is one step of the engine's loop: the other sequences wait for it, as in llama-server.

Models whose image tokens take other positions than one each (Qwen2-VL's M-RoPE) are refused:
the engine counts one position per cell.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localmed.errors import ImageError, ProjectorError
from localmed.images import Image

Part = str | Image
"""A piece of a prompt: text, or an image where the template put it."""


def placeholder(image: Image) -> int:
    """The id an image's tokens carry in a prompt's token list (never a real token: < 0)."""
    return -1 - int(image.digest[:15], 16)


class Vision:
    """A projector loaded beside a model: tokenizes prompts with images, evaluates images."""

    def __init__(self, projector: Path, model: Any, *, gpu: bool, threads: int) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        self._mtmd = mtmd
        self._lock = threading.Lock()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu
        params.n_threads = threads
        params.print_timings = False
        self._ctx = mtmd.mtmd_init_from_file(str(projector).encode(), model, params)
        if not self._ctx:
            raise ProjectorError(f"{projector}: llama.cpp's multimodal library could not load "
                                 "it with this model (a projector of another model? the "
                                 "engine log has llama.cpp's reason)")
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise ProjectorError(f"{projector}: a projector without a vision encoder")
        if mtmd.mtmd_decode_use_mrope(self._ctx):
            self.close()
            raise ProjectorError(f"{projector}: its image tokens take M-RoPE positions "
                                 "(Qwen2-VL's kind), which localmed's engine does not place yet")

    def tokenize(self, parts: Sequence[Part], *, add_special: bool) -> list[int]:
        """Token ids of a prompt's parts, each image's tokens as its :func:`placeholder`."""
        out: list[int] = []
        with self._lock:
            for chunk, image in self._chunks(parts, add_special=add_special):
                mtmd = self._mtmd
                if image is None:
                    n = ctypes.c_size_t()
                    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    out += tokens[:n.value]
                else:
                    out += [placeholder(image)] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        return out

    def evaluate(self, image: Image, lctx: Any, *, n_past: int, seq_id: int,
                 n_batch: int) -> int:
        """Encode ``image`` and decode it into ``seq_id``'s cells from ``n_past``: the tokens
        it took."""
        mtmd = self._mtmd
        with self._lock:
            for chunk, of in self._chunks([image], add_special=False):
                if of is None:
                    continue  # the projector's own wrapping text: the prompt has it already
                new_n_past = ctypes.c_int32(n_past)  # llama_pos
                status = mtmd.mtmd_helper_eval_chunk_single(
                    self._ctx, lctx, chunk, n_past, seq_id, n_batch, False,
                    ctypes.byref(new_n_past))
                if status != 0:
                    raise ImageError(f"{image.name}: llama.cpp could not encode the image "
                                     f"(status {status})")
                return int(new_n_past.value) - n_past
        raise ImageError(f"{image.name}: the projector made no image tokens of it")

    def _chunks(self, parts: Sequence[Part], *, add_special: bool):  # type: ignore[no-untyped-def]
        """mtmd's chunks of ``parts``, each with the image it came from (None: text)."""
        mtmd = self._mtmd
        keep: list[Any] = []  # what the C structs point into, alive until the chunks are freed
        bitmaps: list[Any] = []
        items = (ctypes.POINTER(mtmd.mtmd_input_part) * len(parts))()
        images: list[Image] = []
        try:
            for i, part in enumerate(parts):
                item = mtmd.mtmd_input_part()
                if isinstance(part, Image):
                    pixels = (ctypes.c_uint8 * len(part.rgb)).from_buffer_copy(part.rgb)
                    bitmap = mtmd.mtmd_bitmap_init(part.width, part.height, pixels)
                    if not bitmap:
                        raise ImageError(f"{part.name}: llama.cpp could not take its pixels")
                    bitmaps.append(bitmap)
                    mtmd.mtmd_bitmap_set_id(bitmap, part.digest.encode())
                    item.bitmap = bitmap
                    images.append(part)
                else:
                    data = part.encode("utf-8")
                    text = mtmd.mtmd_input_text(data, len(data), add_special, True)
                    keep += [data, text]
                    item.text = ctypes.pointer(text)
                keep.append(item)
                items[i] = ctypes.pointer(item)
            chunks = mtmd.mtmd_input_chunks_init()
            try:
                status = mtmd.mtmd_tokenize_from_parts(self._ctx, chunks, items, len(parts),
                                                       add_special)
                if status != 0:
                    raise ImageError(f"llama.cpp's multimodal library could not tokenize the "
                                     f"prompt's images (status {status})")
                n_images = 0
                for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                    kind = mtmd.mtmd_input_chunk_get_type(chunk)
                    if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        yield chunk, None
                    elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                        if n_images == len(images):
                            raise ProjectorError("the projector cuts an image into slices, "
                                                 "which localmed's engine does not place yet")
                        yield chunk, images[n_images]
                        n_images += 1
                    else:
                        raise ImageError("the projector made audio tokens of an image")
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
