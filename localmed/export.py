"""``localmed export``: a localmed GGUF for Ollama (a Modelfile) and LM Studio (its folders).

A GGUF imported into Ollama with ``FROM`` alone gets no prompt format and no stop strings, and
generates past the end of its turn; so the Modelfile carries the model's template translated to
Ollama's Go template, one ``PARAMETER stop`` per stop string, the context, localmed's sampling
defaults, and the disclaimer and the model's advisory as its ``SYSTEM``.

Which template: the one ``localmed chat`` would use (``--template``, else the GGUF's embedded
one, else the registry's). An embedded Jinja template that renders as one of localmed's named
formats gets that format's hand-written translation; any other is translated by
:mod:`localmed.ollama_template` (the fixed text around each message, read off probe renders, and
accepted only if it renders every probe as the Jinja does); one that cannot be is refused with
the reason, never written approximately.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from localmed import __version__, formats, library
from localmed.atomic import atomic_path, write_text_atomic
from localmed.conversation import DISCLAIMER
from localmed.errors import ExportError, TemplateError
from localmed.formats.info import ModelInfo
from localmed.ollama_template import fixed_date_pair, synthesize
from localmed.projector import pair
from localmed.registry import ModelEntry
from localmed.runtimes.base import GenerationParams
from localmed.templates import (
    TEMPLATES,
    Message,
    PromptTemplate,
    gguf_template,
    resolve_template,
)

_FIRST_USER_SYSTEM = ('{{- $system := .System }}\n')

OLLAMA_TEMPLATES: dict[str, str] = {
    # Each renders what localmed's template of the same name renders (BOS is added by the
    # tokenizer in both). The system prompt comes from .System (the Modelfile's SYSTEM, or a
    # request's system message); the turns loop skips system messages.
    "chatml": (
        '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n'
        '{{- range $i, $_ := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        '{{ end }}\n'
        '{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n{{ end }}\n'
        '{{- end }}'),
    "llama3": (
        '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n'
        '{{ .System }}<|eot_id|>{{ end }}\n'
        '{{- range $i, $_ := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        '{{ .Content }}<|eot_id|>{{ end }}\n'
        '{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant'
        '<|end_header_id|>\n\n{{ end }}\n'
        '{{- end }}'),
    "gemma": (
        _FIRST_USER_SYSTEM
        + '{{- range $i, $_ := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '{{- if eq .Role "user" }}<start_of_turn>user\n'
        '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}'
        '<end_of_turn>\n'
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        '{{ end }}\n'
        '{{- if and (ne .Role "assistant") $last }}<start_of_turn>model\n{{ end }}\n'
        '{{- end }}'),
    "mistral": (
        _FIRST_USER_SYSTEM
        + '{{- range .Messages }}\n'
        '{{- if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}\n\n'
        '{{ $system = "" }}{{ end }}{{ .Content }} [/INST]\n'
        '{{- else if eq .Role "assistant" }}{{ .Content }}</s>\n'
        '{{- end }}\n'
        '{{- end }}'),
    "llama2": (
        _FIRST_USER_SYSTEM
        + '{{- $first := true }}\n'
        '{{- range .Messages }}\n'
        '{{- if eq .Role "user" }}{{ if not $first }}<s>{{ end }}[INST] '
        '{{ if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ $system = "" }}{{ end }}'
        '{{ .Content }} [/INST]{{ $first = false }}\n'
        '{{- else if eq .Role "assistant" }} {{ .Content }} </s>\n'
        '{{- end }}\n'
        '{{- end }}'),
    "med42": (
        '{{- if .System }}<|system|>: {{ .System }}\n{{ end }}\n'
        '{{- range $i, $_ := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '{{- if eq .Role "user" }}<|prompter|>:{{ .Content }}\n'
        '{{ else if eq .Role "assistant" }}<|assistant|>:{{ .Content }}\n'
        '{{ end }}\n'
        '{{- if and (ne .Role "assistant") $last }}<|assistant|>:{{ end }}\n'
        '{{- end }}'),
    "alpaca": (
        '{{- if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. '
        'Write a response that appropriately completes the request.{{ end }}\n\n'
        '{{ range $i, $_ := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}\n\n'
        '{{ end }}\n'
        '{{- if and (ne .Role "assistant") $last }}### Response:\n{{ end }}\n'
        '{{- end }}'),
}
"""localmed's named templates in Ollama's Go template language (``.System``, ``.Messages``)."""

_PROBE = [Message("user", "PROBE-U1"), Message("assistant", "PROBE-A1"),
          Message("user", "PROBE-U2")]


def named_equivalent(template: PromptTemplate) -> str | None:
    """Which named template renders exactly as ``template`` (a GGUF's embedded one), if any,
    with a system prompt (an exported model always has one: the disclaimer)."""
    if template.name in TEMPLATES:
        return template.name
    for name, candidate in TEMPLATES.items():
        try:
            same = all(template.render(_PROBE, system=system) ==
                       candidate.render(_PROBE, system=system) for system in ("PROBE-S",))
        except Exception:  # a template that refuses the probe is not this one
            same = False
        if same:
            return name
    return None


@dataclass(frozen=True)
class ExportSource:
    """A GGUF to export and the facts its Modelfile states."""

    info: ModelInfo
    entry: ModelEntry | None
    template: str
    """Which template, in words: a name of localmed's, or the GGUF's own."""
    go_template: str
    """Ollama's TEMPLATE."""
    stops: tuple[str, ...]
    n_ctx: int
    name: str
    """Ollama model name (``meditron3-8b:q4_k_m``)."""
    notes: tuple[str, ...] = ()
    """What the user should know about the translation (a date fixed in it, trimming)."""
    projector: Path | None = None
    """The image-text model's vision projector beside it (None: a text model)."""

    @property
    def ollama_images(self) -> str:
        """Why an Ollama import of this model reads no images ("" for a text model)."""
        if self.projector is None:
            return ""
        return (f"images are not carried to Ollama: it runs Gemma 3's images on its own engine "
                f"from a GGUF that holds the vision tower, and does not read llama.cpp's "
                f"projector ({self.projector.name}) beside a model (ollama/ollama#9967); the "
                "Ollama model reads text only. For images: `localmed chat`/`serve`, or "
                "--lmstudio")


def prepare(path: Path, entry: ModelEntry | None, *, template: str | None = None,
            n_ctx: int | None = None, for_ollama: bool = True) -> ExportSource:
    """Check the model and pick its template; refuses what Ollama/LM Studio cannot take.
    Without ``for_ollama`` (LM Studio only, which runs the GGUF's Jinja itself) no Go template
    is made."""
    info = formats.describe(path)
    if info.format != "gguf":
        raise ExportError(path, f"is a {info.format.upper()} model; Ollama and LM Studio run GGUF "
                          "files: export a GGUF made by `localmed quantize`")
    if for_ollama and len(parts := library.gguf_files(info.path)) > 1:
        raise ExportError(path, f"is a split GGUF ({len(parts)} parts), which Ollama cannot "
                          "import (ollama/ollama#5245): merge it first (llama.cpp's "
                          "llama-gguf-split --merge), or export it with --lmstudio alone")
    choice = resolve_template(
        template, embedded=info.chat_template, bos_token=info.bos_token, add_bos=info.add_bos,
        eos_token=info.eos_token, registry_default=entry.template if entry else None,
        model_label=entry.id if entry else path.name)
    name = named_equivalent(choice.template)
    notes: tuple[str, ...] = ()
    if name is not None:
        label, go_template, stops = name, OLLAMA_TEMPLATES[name], TEMPLATES[name].stop
    elif not for_ollama:
        label, go_template, stops = "the GGUF's own", "", choice.template.stop
    else:
        label, go_template, notes = _synthesized(path, info)
        stops = choice.template.stop
    trained = info.context_length or 4096
    ctx = min(n_ctx or min(trained, 4096), trained)
    base = entry.id if entry else re.sub(r"\.(gguf)$", "", path.name).rsplit(".", 1)[0]
    tag = info.label.lower().replace("+", "-")
    clean = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.") or "model"
    pairing = pair(path)
    return ExportSource(info, entry, label, go_template, stops, ctx, f"{clean}:{tag}", notes,
                        pairing.projector.path if pairing.projector else None)


def _synthesized(path: Path, info: ModelInfo) -> tuple[str, str, tuple[str, ...]]:
    """The GGUF's own Jinja translated to Go, rendered with today's date (and another day's, to
    see whether it reads the date)."""
    today, other_day = fixed_date_pair()
    jinja = {day: gguf_template(info.chat_template, bos_token=info.bos_token,
                                eos_token=info.eos_token, add_bos=info.add_bos, today=day)
             for day in (today, other_day)}
    try:
        synthesized = synthesize(jinja[today], dated=jinja[other_day])
    except TemplateError as exc:
        raise ExportError(path, f"its chat template cannot be written as Ollama's Go template "
                          f"({exc}); if it is one of localmed's ({', '.join(OLLAMA_TEMPLATES)}), "
                          "pass --template NAME") from None
    notes = tuple(note.replace("the export's date", f"the export's date "
                               f"({today:%d %b %Y})") for note in synthesized.notes)
    return "the GGUF's own, translated", synthesized.go, notes


def _quote(value: str) -> str:
    if '"""' in value:
        raise ExportError(value[:40], 'contains """, which a Modelfile cannot quote')
    return f'"""{value}"""' if "\n" in value or '"' in value else f'"{value}"'


def modelfile(source: ExportSource, params: GenerationParams | None = None) -> str:
    """The Modelfile text: FROM, TEMPLATE, SYSTEM, stops, context and sampling."""
    params = params or GenerationParams()
    info = source.info
    if not source.go_template or '"""' in source.go_template:
        raise ExportError(info.path, "has no Ollama template to write")
    system = DISCLAIMER + (f"\n\n{info.advisory}" if info.advisory else "")
    lines = [
        f"# Made by localmed {__version__} from {info.path.name} ({info.label}).",
        "# The SYSTEM prompt carries localmed's disclaimer; keep it in front of users.",
        f"FROM {info.path.resolve()}",
        *(f"# Note: {note}." for note in source.notes),
        *([f"# Note: {source.ollama_images}."] if source.ollama_images else []),
        f'TEMPLATE """{source.go_template}"""',
        f'SYSTEM """{system}"""',
        *(f"PARAMETER stop {_quote(stop)}" for stop in source.stops),
        f"PARAMETER num_ctx {source.n_ctx}",
        f"PARAMETER temperature {params.temperature}",
        f"PARAMETER top_p {params.top_p}",
        f"PARAMETER top_k {params.top_k}",
        f"PARAMETER min_p {params.min_p}",
        f"PARAMETER repeat_penalty {params.repeat_penalty}",
    ]
    if source.entry is not None:
        lines.insert(2, f"# Licence: {source.entry.license}")
    return "\n".join(lines) + "\n"


def export_ollama(source: ExportSource, folder: Path) -> tuple[Path, str]:
    """Write ``folder/Modelfile``; returns it and the ``ollama create`` command."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Modelfile"
    if path.is_dir():
        raise ExportError(path, "is a folder")
    write_text_atomic(path, modelfile(source))
    return path, f"ollama create {source.name} -f {path.resolve()}"


def lmstudio_models_dir() -> Path:
    """LM Studio's models folder: ~/.lmstudio/models (0.3 and later), or the older
    ~/.cache/lm-studio/models where only that one exists."""
    home = Path.home()
    new, old = home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"
    return old if old.is_dir() and not new.is_dir() else new


def export_lmstudio(source: ExportSource, models_dir: Path, *, copy: bool = False) -> Path:
    """Place the GGUF as ``models_dir/localmed/<model>-GGUF/<file>.gguf`` (LM Studio's
    publisher/model/file layout), every part of a split one: hard links where the disk allows,
    else symbolic links, or copies with ``copy``. Returns where the (first) file is."""
    info = source.info
    model = source.name.split(":")[0] + "-GGUF"
    folder = models_dir / "localmed" / model
    folder.mkdir(parents=True, exist_ok=True)
    for part in library.gguf_files(info.path):
        _place(part.resolve(), folder / part.name, copy=copy)
    if source.projector is not None:  # LM Studio pairs a model with the mmproj-*.gguf beside it
        _place(source.projector.resolve(), folder / f"mmproj-{source.projector.name}",
               copy=copy)
    return folder / info.path.name


def _place(src: Path, target: Path, *, copy: bool) -> None:
    if target.exists() or target.is_symlink():
        if target.resolve() == src or (not copy and os.path.samefile(target, src)):
            return
        raise ExportError(target, "exists and is another file; remove it first")
    if copy:
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        return
    try:
        os.link(src, target)
    except OSError:
        target.symlink_to(src)
