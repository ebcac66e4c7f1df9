"""Images for image-text models: read and checked at the boundary, before any model sees them.

An image comes as a file's bytes (a chat's ``/image PATH``, a served ``data:`` URL). Here it is
read with Pillow: its header first (format and size: a decompression bomb is refused before a
pixel is decoded), then its pixels, as 8-bit RGB, the form llama.cpp's multimodal library
(libmtmd) takes. What crosses to the engine is that :class:`Image`: its pixels, size, a digest
(the engine's prompt cache matches an image by it) and a name for the transcript.

PNG, JPEG and WebP, as OpenAI's API takes them. llama.cpp's own tools decode PNG and JPEG with
stb_image, to the pixels Pillow gives (``tests/test_vision.py``: the same greedy replies as
``llama-mtmd-cli`` reading the same PNG files); WebP they cannot read at all.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from localmed.errors import ImageError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
"""What an image may be: Pillow's format name, and its media type."""

MAX_PIXELS = 40_000_000
"""The largest image taken (40 megapixels: a 7,000 x 5,700 photograph). Image-text models see
896 x 896 pixels or fewer; a larger one is refused from its header, never decoded."""

MAX_BYTES = 30 * 1024 * 1024
"""The largest image file taken."""

DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,"
                      r"(?P<data>.*)", re.DOTALL)


@dataclass(frozen=True)
class Image:
    """One decoded image: 8-bit RGB pixels, row by row."""

    width: int
    height: int
    rgb: bytes
    name: str
    """Its file's name, or ``image N`` when it came without one."""
    format: str
    """Pillow's name of the format it came in (PNG, JPEG, WEBP)."""

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of its size and pixels: the same picture in another file is the same.
        Computed once (the engine looks an image up by it at each step of its prefill)."""
        digest = hashlib.sha256(f"{self.width}x{self.height}:".encode())
        digest.update(self.rgb)
        return digest.hexdigest()

    @property
    def label(self) -> str:
        return f"{self.name} ({self.format}, {self.width}x{self.height})"


def read_image(data: bytes, name: str) -> Image:
    """Check and decode an image file's bytes; :class:`ImageError` (one line) for anything
    that is not a whole PNG, JPEG or WebP of at most :data:`MAX_PIXELS` pixels."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    _check_size(name, len(data))
    try:
        # Image.open reads the header only; the size check comes before any decoding.
        with PILImage.open(io.BytesIO(data)) as image:
            kind = image.format or "?"
            if kind not in FORMATS:
                raise ImageError(f"{name}: a {kind} image; PNG, JPEG or WebP are taken")
            width, height = image.size
            if width * height > MAX_PIXELS or not width or not height:
                raise ImageError(f"{name}: {width} x {height} pixels; images of up to "
                                 f"{MAX_PIXELS // 1_000_000} megapixels are taken")
            image.load()  # a truncated or corrupt file fails here
            rgb = image.convert("RGB").tobytes()
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (PNG, JPEG or WebP)") from None
    except PILImage.DecompressionBombError:
        raise ImageError(f"{name}: far more than {MAX_PIXELS // 1_000_000} megapixels (a "
                         "decompression bomb?): refused before decoding") from None
    except (OSError, SyntaxError, ValueError) as broken:
        raise ImageError(f"{name}: a broken or truncated image ({broken})") from None
    return Image(width, height, rgb, name, kind)


def _check_size(name: str, size: int) -> None:
    if size > MAX_BYTES:
        raise ImageError(f"{name}: {size / 2**20:.1f} MiB; images of up to "
                         f"{MAX_BYTES // 2**20} MiB are taken")


def read_image_file(path: Path) -> Image:
    path = path.expanduser()
    try:
        _check_size(str(path), path.stat().st_size)  # before a byte of it is read
        data = path.read_bytes()
    except IsADirectoryError:
        raise ImageError(f"{path}: a folder, not an image") from None
    except OSError as failed:
        raise ImageError(f"{path}: {failed.strerror or failed}") from None
    return read_image(data, path.name)


def read_data_url(url: str, name: str) -> Image:
    """An image from a ``data:`` URL (base64, as OpenAI's clients send files). Any other URL is
    refused: nothing leaves the laptop, so nothing is fetched."""
    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else "no"
        raise ImageError(f"{name}: only data: URLs are taken (this is a {scheme} URL): "
                         "localmed fetches nothing from the network; send the image itself, "
                         "base64-encoded")
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise ImageError(f"{name}: a data: URL must be base64 (data:image/png;base64,...)")
    if len(match["data"]) > MAX_BYTES * 4 // 3 + 4:
        raise ImageError(f"{name}: larger than the {MAX_BYTES // 2**20} MiB images may be")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{name}: the data: URL's base64 does not decode") from None
    return read_image(data, name)


def image_marker(nonce: str, n: int) -> str:
    """Text that stands for image ``n`` in a message until the chat template has placed it
    (``nonce`` is fresh for each prompt, so no text a user types can pass for an image)."""
    return f"<localmed-image-{nonce}-{n}>"


def new_nonce() -> str:
    return secrets.token_hex(8)


def prompt_parts(prompt: str, images: Mapping[str, Image]) -> tuple[str | Image, ...]:
    """A rendered prompt cut at its image markers: text and images in the template's order
    (an image whose marker the template left out is not sent)."""
    if not images:
        return (prompt,)
    pattern = re.compile("|".join(re.escape(marker) for marker in images))
    parts: list[str | Image] = []
    start = 0
    for found in pattern.finditer(prompt):
        if found.start() > start:
            parts.append(prompt[start:found.start()])
        parts.append(images[found.group()])
        start = found.end()
    if start < len(prompt):
        parts.append(prompt[start:])
    return tuple(parts)


def thumbnail(image: Image, columns: int, rows: int) -> list[list[tuple[int, int, int]]]:
    """The image shrunk to fit ``columns`` x ``2 * rows`` pixels (aspect kept), as rows of RGB
    triples: a terminal draws two of them in one cell with a half block."""
    from PIL import Image as PILImage

    picture = PILImage.frombytes("RGB", (image.width, image.height), image.rgb)
    picture.thumbnail((columns, 2 * rows), PILImage.Resampling.LANCZOS)
    width, height = picture.size
    data = picture.tobytes()
    return [[(data[3 * (y * width + x)], data[3 * (y * width + x) + 1],
              data[3 * (y * width + x) + 2]) for x in range(width)] for y in range(height)]
