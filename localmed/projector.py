"""An image-text model's vision projector (llama.cpp's ``mmproj`` GGUF): found beside the
model, checked against it from both headers, before anything loads.

The library names the pair (:func:`localmed.library.projector_beside`); here it is checked: a
GGUF of llama.cpp's ``clip`` kind, with a vision encoder, whose embeddings are as wide as the
model's (a projector of another model is refused in one line, not by llama.cpp's abort).
A model whose manifest names a projector that is no longer beside it runs on text, and says
why images are off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gguf import Keys

from localmed import library
from localmed.errors import GGUFFileError, ProjectorError
from localmed.formats.gguf_header import read_header
from localmed.planner import ModelFootprint

CLIP = "clip"


@dataclass(frozen=True)
class Projector:
    """A checked projector file."""

    path: Path
    projector_type: str
    """llama.cpp's name of the projector (``gemma3``, ``qwen2vl``, …)."""
    width: int
    """Width of the embeddings it makes: the text model's."""
    image_size: int
    file_bytes: int


@dataclass(frozen=True)
class Pairing:
    """What a model gets for images: a projector, or the reason it has none."""

    projector: Projector | None
    absent: str
    """Why images are off ("" when a projector is loaded)."""
    lost: bool = False
    """A projector was named for this model (its manifest) and is not beside it."""

    @property
    def images(self) -> bool:
        return self.projector is not None


def read_projector(path: Path) -> Projector:
    """A projector file's header, checked (:class:`ProjectorError` in one line)."""
    try:
        header = read_header(path)
    except GGUFFileError as refused:
        raise ProjectorError(str(refused)) from None
    fields = header.fields
    if fields.get(Keys.General.ARCHITECTURE) != CLIP:
        raise ProjectorError(f"{path}: not a vision projector (mmproj) but a "
                             f"{fields.get(Keys.General.ARCHITECTURE)!r} model file")
    if not fields.get(Keys.Clip.HAS_VISION_ENCODER):
        raise ProjectorError(f"{path}: a projector with no vision encoder (audio only?)")
    width = fields.get(Keys.ClipVision.PROJECTION_DIM)
    size = fields.get(Keys.ClipVision.IMAGE_SIZE)
    kind = fields.get(Keys.Clip.PROJECTOR_TYPE) or fields.get("clip.vision.projector_type")
    if not isinstance(width, int) or not isinstance(size, int):
        raise ProjectorError(f"{path}: a projector whose header lacks its projection width "
                             "or image size")
    return Projector(path, str(kind or "?"), width, size, path.stat().st_size)


def check_pair(projector: Projector, model_file: Path, model_width: int) -> Projector:
    if projector.width != model_width:
        raise ProjectorError(
            f"{projector.path.name} belongs to another model: it makes {projector.width}-wide "
            f"embeddings, and {model_file.name}'s are {model_width} wide")
    return projector


def model_width(model_file: Path) -> int:
    """The width of a GGUF model's embeddings (``<arch>.embedding_length``)."""
    fields = read_header(model_file).fields
    width = fields.get(f"{fields.get(Keys.General.ARCHITECTURE)}.embedding_length")
    if not isinstance(width, int):
        raise GGUFFileError(model_file, "its header lacks the embedding length")
    return width


def pair(model_file: Path, explicit: Path | None = None) -> Pairing:
    """The projector for ``model_file``: ``explicit`` (``--mmproj``: it must be right), else
    the one beside it. A projector found beside it that does not fit is an error too."""
    if explicit is not None:
        found = explicit.expanduser()
        if not found.is_file():
            raise ProjectorError(f"{found}: no such projector file")
    else:
        found = library.projector_beside(model_file)
        if found is None:
            return Pairing(None, f"{model_file.name} has no vision projector (mmproj) beside "
                                 "it: it reads text only")
        if not found.is_file():
            return Pairing(None, lost=True,
                           absent=f"its projector {found.name} is not beside "
                                  f"{model_file.name} (moved without it?): images are off "
                                  f"until it is back in {found.parent}")
    return Pairing(check_pair(read_projector(found), model_file, model_width(model_file)), "")


def with_projector(footprint: ModelFootprint, pairing: Pairing) -> ModelFootprint:
    """The model's footprint with its projector's weights counted beside the embeddings (they
    go where llama.cpp puts the vision tower: the GPU when the model is offloaded)."""
    if pairing.projector is None:
        return footprint
    return dataclasses.replace(footprint,
                               other_bytes=footprint.other_bytes + pairing.projector.file_bytes)
