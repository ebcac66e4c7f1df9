"""Every error localmed raises on purpose.

Each error inherits :class:`LocalmedError` and the built-in it resembles, so callers can catch
``FileNotFoundError`` or ``ValueError`` as they would anyway, and carries the data a caller needs
to act on it. ``str(err)`` is always one line a user can read; the CLI prints it and exits 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class LocalmedError(Exception):
    """Base of every error localmed raises for a user's mistake or a broken input."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take other arguments than the message: rebuild from the attributes, so an
        # error crosses the engine process's pipe with its data (a plan, a path) intact.
        return _rebuild, (type(self), self.message, self.__dict__)


def _rebuild(cls: type[LocalmedError], message: str, state: dict[str, object]) -> LocalmedError:
    # MemoryError's own __new__ refuses subclasses made this way; BaseException's is plain,
    # but an OSError's (ConnectionError, ...) must make it.
    try:
        error = BaseException.__new__(cls)
    except TypeError:
        error = cls.__new__(cls, message)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


def _listing(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


class RegistryError(LocalmedError, ValueError):
    """A models.toml file cannot be read, or an entry in it is incomplete or wrong."""

    def __init__(self, path: Path | str, message: str, entry: str | None = None,
                 field: str | None = None) -> None:
        self.path = Path(path)
        self.entry = entry
        self.field = field
        where = str(self.path)
        if entry is not None:
            where += f": entry '{entry}'"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class UnknownModelError(LocalmedError, KeyError):
    """A model id that is neither in the registry nor a folder or file on disk."""

    def __init__(self, model_id: str, known: Iterable[str]) -> None:
        self.model_id = model_id
        self.known = sorted(known)
        super().__init__(
            f"unknown model '{model_id}': not a registry id, a local folder or a hub repo id "
            f"(registry ids: {_listing(self.known)})"
        )


class UnknownTemplateError(LocalmedError, KeyError):
    """A prompt-template name that is not registered."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown prompt template '{name}'; valid: {_listing(self.known)}")


class TemplateError(LocalmedError, ValueError):
    """A prompt template that cannot render the conversation it was given."""


class SourceError(LocalmedError, FileNotFoundError):
    """A checkpoint folder that lacks what a conversion needs (config.json, weights)."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class UnsupportedArchitectureError(LocalmedError, ValueError):
    """A checkpoint whose Hugging Face architecture has no converter."""

    def __init__(self, architecture: str, supported: Iterable[str], other: str = "") -> None:
        self.architecture = architecture
        self.supported = sorted(supported)
        tail = f", and {other} does not know it either" if other else ""
        super().__init__(
            f"unsupported architecture {architecture}; supported: {_listing(self.supported)}"
            + tail
        )


class ConverterMissingError(LocalmedError, FileNotFoundError):
    """llama.cpp's converter (for architectures localmed does not convert itself) is missing or
    from another release; the message names the command that installs it."""


class ConverterError(LocalmedError, RuntimeError):
    """llama.cpp's converter refused a checkpoint; carries its one-line reason."""

    def __init__(self, path: Path | str, converter: str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {converter} failed: {reason}")


class TokenizerError(LocalmedError, ValueError):
    """A tokenizer the converters cannot carry into GGUF exactly; says what was found."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class CheckpointError(LocalmedError, ValueError):
    """A weights file that is truncated, corrupt or inconsistent with config.json."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class PickleRefusedError(LocalmedError, PermissionError):
    """A checkpoint stored only as pickle (.bin), which can run code when loaded."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(
            f"{self.path}: weights are pickle (.bin) files, which can execute code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )


class UnknownQuantError(LocalmedError, ValueError):
    """A quantization type name that llama.cpp does not have."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = list(known)
        super().__init__(f"unknown quant type '{name}'; valid: {', '.join(self.known)}")


class UnsupportedQuantError(LocalmedError, ValueError):
    """A real llama.cpp quant type that localmed cannot produce (it needs an importance matrix)."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


class OutputError(LocalmedError, PermissionError):
    """An output location that cannot be written."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class DiskSpaceError(LocalmedError, OSError):
    """Not enough free disk space for the files a command is about to write."""

    def __init__(self, path: Path | str, needed: int, free: int) -> None:
        self.path = Path(path)
        self.needed = needed
        self.free = free
        super().__init__(
            f"{self.path}: not enough free disk space: need about {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free"
        )


class HubAccessError(LocalmedError, PermissionError):
    """A hub repository that does not exist, or is gated and this user has no access."""

    def __init__(self, repo_id: str, message: str) -> None:
        self.repo_id = repo_id
        super().__init__(f"{repo_id}: {message}")


class OfflineError(LocalmedError, ConnectionError):
    """Something must be downloaded, but the machine is offline (or HF_HUB_OFFLINE is set)."""

    def __init__(self, what: str, message: str) -> None:
        self.what = what
        super().__init__(f"{what}: {message}")


class NetworkRefusedError(LocalmedError, PermissionError):
    """A connection beyond this machine, tried in a command that works offline."""

    def __init__(self, what: str, message: str) -> None:
        self.what = what
        super().__init__(message)


class MissingExtraError(LocalmedError, ImportError):
    """A command needs an optional extra (torch, GPTQModel) that this install left out."""

    def __init__(self, what: str, extra: str, modules: list[str], install: str) -> None:
        self.what = what
        self.extra = extra
        self.modules = list(modules)
        names = " and ".join([", ".join(self.modules[:-1]), self.modules[-1]] if
                             len(self.modules) > 1 else self.modules)
        super().__init__(f"{what} needs {names}, which this install leaves out (the '{extra}' "
                         f"extra): {install}")


class ModelFileError(LocalmedError, ValueError):
    """A path that is not a model localmed can run: no known format, or a damaged one."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class GGUFFileError(ModelFileError):
    """A file that is not a readable GGUF model."""


class GPTQFolderError(ModelFileError):
    """A folder that is not a loadable GPTQ checkpoint (config, manifest or weights)."""


class GPTQError(LocalmedError, ValueError):
    """A GPTQ export that cannot be carried out (settings, calibration, missing package)."""


class CalibrationError(LocalmedError, ValueError):
    """Calibration text (GPTQ, importance matrices) that is missing or holds no documents."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class DataFileError(LocalmedError, ValueError):
    """A text file a user gave (registry, questions, calibration) that cannot be read as text."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class SuiteError(LocalmedError, ValueError):
    """A question set that cannot be used: unknown, missing, or malformed at a line."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


class ScoringError(LocalmedError, ValueError):
    """A model whose tokenizer cannot score lettered options in one pass."""

    def __init__(self, model: Path | str, message: str) -> None:
        self.model = Path(model)
        super().__init__(f"{self.model.name}: {message}")


class BenchSettingsError(LocalmedError, ValueError):
    """An output folder that holds results of a bench run with other settings."""


class ImatrixError(LocalmedError, ValueError):
    """An importance matrix that cannot be used: unreadable, or made for another model."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class QuantizeError(LocalmedError, RuntimeError):
    """llama.cpp's quantizer failed on a file."""

    def __init__(self, path: Path | str, quant: str, message: str) -> None:
        self.path = Path(path)
        self.quant = quant
        super().__init__(f"{self.path}: quantizing to {quant} failed: {message}")


class ModelTooLargeError(LocalmedError, MemoryError):
    """A model that cannot fit in RAM + VRAM, refused before loading; carries the plan."""

    def __init__(self, path: Path | str, reason: str, suggestion: str | None,
                 plan: object = None) -> None:
        self.path = Path(path)
        self.suggestion = suggestion
        self.plan = plan
        hint = f"; try a smaller quant: --quant {suggestion}" if suggestion else ""
        super().__init__(f"{self.path.name} does not fit: {reason}{hint}")


class PlanError(LocalmedError, ValueError):
    """Load settings that cannot make a plan (a context of zero tokens, say)."""


class ContextFullError(LocalmedError, ValueError):
    """A prompt (the system prompt and latest turn alone) longer than the context."""


class EngineError(LocalmedError, RuntimeError):
    """The engine process refused a request for a reason of its own."""


class GrammarError(LocalmedError, ValueError):
    """A JSON schema or grammar that llama.cpp cannot use."""


class EngineDiedError(LocalmedError, RuntimeError):
    """The engine process ended: a crash, a kill, an abort. The caller's state is intact."""

    def __init__(self, how: str, last_output: str = "") -> None:
        self.how = how
        self.last_output = last_output
        said = f" (last words: {last_output})" if last_output else ""
        super().__init__(f"the model engine {how}{said}")


class ServeError(LocalmedError, OSError):
    """``localmed serve`` cannot start: a host, port or key problem."""


class ExportError(LocalmedError, ValueError):
    """A model that cannot be exported to Ollama or LM Studio, or a target in the way."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelNotAvailableError(LocalmedError, FileNotFoundError):
    """A registry model whose GGUF is not in the models folder; says how to make it."""

    def __init__(self, model_id: str, quant: str, command: str, folder: Path | str) -> None:
        self.model_id = model_id
        self.quant = quant
        self.command = command
        super().__init__(f"{model_id} {quant} is not in {folder}; make it with: {command}")


class ImageError(LocalmedError):
    """An image localmed cannot take, or a model that cannot take one."""


class ProjectorError(LocalmedError):
    """A vision projector (mmproj) file that is missing, damaged or of another model."""


class DocumentError(LocalmedError, ValueError):
    """A document ``localmed docs`` cannot index (encrypted, no text layer, damaged, not what
    its name says, too large); the rest of its folder is indexed all the same."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class DocsIndexError(LocalmedError, ValueError):
    """A document index that cannot be used: unknown, damaged, of another folder, or written by
    a newer localmed."""


class DiskFullError(LocalmedError, OSError):
    """The disk filled while an index was written; what was finished before is kept."""


class SpeculationError(LocalmedError, ValueError):
    """A draft model that cannot draft for the model (another vocabulary, a recurrent state),
    or speculation options that contradict each other."""


class WorkerError(LocalmedError, ConnectionError):
    """A worker (``localmed worker``, ``--rpc``) that cannot be used: unreachable, another
    clinic's secret, another llama.cpp protocol, not a worker at all, or a public address."""
