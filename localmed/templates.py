"""Prompt templates, registered by name.

A template turns a conversation into the exact text a model was trained on. Rendered text never
contains the leading BOS token: the runtime adds it as the GGUF says (``add_bos_token``), so a
template that wrote it too would give the model two. Turn separators that *are* special tokens
(``</s>`` in ``llama2``/``mistral``, ``<|eot_id|>`` in ``llama3``) are written as text and must be
tokenized with special-token parsing on.

There is no silent fallback: an unknown name raises :class:`UnknownTemplateError` listing the valid
ones, and :func:`resolve_template` says in words which template it chose and why.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from localmed.errors import TemplateError, UnknownTemplateError

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt format."""

    name: str
    description: str
    render_fn: Callable[[str | None, Sequence[Message], bool], str] = field(repr=False)
    stop: tuple[str, ...] = ()
    """Strings that end a reply (besides the model's EOS token)."""
    has_system: bool = True
    """False where the format has no system slot: the system prompt is folded into the first
    user turn."""
    own_rules: bool = False
    """True where the template itself decides which turn orders it accepts (a GGUF's Jinja:
    Qwen2.5's takes two user messages in a row); else turns must alternate user/assistant."""

    def render(self, messages: Sequence[Message], *, system: str | None = None,
               add_generation_prompt: bool = True) -> str:
        """Render a conversation; ``system`` overrides any system message in ``messages``."""
        sys_prompt, turns = _split_system(messages, system)
        if not self.own_rules:
            _check_turns(self.name, turns)
        return self.render_fn(sys_prompt, turns, add_generation_prompt)


def _split_system(messages: Sequence[Message], system: str | None) -> tuple[str | None, list[Message]]:
    turns = [m for m in messages if m.role != "system"]
    if system is None:
        system = next((m.content for m in messages if m.role == "system"), None)
    if system is not None and not system.strip():
        system = None
    return system, turns


def _check_turns(name: str, turns: Sequence[Message]) -> None:
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise TemplateError(
                f"template '{name}': turn {i + 1} is '{message.role}', expected '{expected}' "
                "(turns must alternate user/assistant, starting with user)"
            )


def _fold_system(system: str | None, turns: list[Message]) -> list[Message]:
    """Put the system prompt at the top of the first user turn (formats with no system slot)."""
    if system is None or not turns:
        return turns
    first = Message("user", f"{system}\n\n{turns[0].content}")
    return [first, *turns[1:]]


def _pairs(turns: Sequence[Message]) -> list[tuple[str, str | None]]:
    """(user, assistant-or-None) pairs."""
    out: list[tuple[str, str | None]] = []
    for i in range(0, len(turns), 2):
        reply = turns[i + 1].content if i + 1 < len(turns) else None
        out.append((turns[i].content, reply))
    return out


# --- the formats ------------------------------------------------------------------------------

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def _alpaca(system: str | None, turns: list[Message], gen: bool) -> str:
    # Internist.ai 7b was tuned on Alpaca-format data (maximegmd/medqa_alpaca_format).
    parts = [f"{system if system is not None else ALPACA_PREAMBLE}\n\n"]
    for user, reply in _pairs(turns):
        parts.append(f"### Instruction:\n{user}\n\n")
        if reply is not None:
            parts.append(f"### Response:\n{reply}\n\n")
        elif gen:
            parts.append("### Response:\n")
    return "".join(parts)


def _med42(system: str | None, turns: list[Message], gen: bool) -> str:
    # The Med42 card's format, to the character: a space after "<|system|>:", none after the
    # other two markers.
    parts = [f"<|system|>: {system}\n"] if system is not None else []
    for user, reply in _pairs(turns):
        parts.append(f"<|prompter|>:{user}\n")
        if reply is not None:
            parts.append(f"<|assistant|>:{reply}\n")
        elif gen:
            parts.append("<|assistant|>:")
    return "".join(parts)


def _llama2(system: str | None, turns: list[Message], gen: bool) -> str:
    parts: list[str] = []
    for i, (user, reply) in enumerate(_pairs(turns)):
        if i == 0 and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        parts.append(f"{'' if i == 0 else '<s>'}[INST] {user} [/INST]")
        if reply is not None:
            parts.append(f" {reply} </s>")
    return "".join(parts)


def _mistral(system: str | None, turns: list[Message], gen: bool) -> str:
    # Mistral/Mixtral instruct v0.1: no system slot, no space between [/INST] and the reply.
    parts: list[str] = []
    for user, reply in _pairs(_fold_system(system, turns)):
        parts.append(f"[INST] {user} [/INST]")
        if reply is not None:
            parts.append(f"{reply}</s>")
    return "".join(parts)


def _chatml(system: str | None, turns: list[Message], gen: bool) -> str:
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system is not None else []
    for message in turns:
        parts.append(f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n")
    if gen:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _llama3(system: str | None, turns: list[Message], gen: bool) -> str:
    def block(role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"

    parts = [block("system", system)] if system is not None else []
    parts += [block(m.role, m.content) for m in turns]
    if gen:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _gemma(system: str | None, turns: list[Message], gen: bool) -> str:
    # Gemma 2/3 (MedGemma): roles user/model, the system prompt opens the first user turn,
    # contents trimmed, as google/gemma-3-4b-it's template writes them.
    parts: list[str] = []
    for i, message in enumerate(turns):
        role = "model" if message.role == "assistant" else "user"
        prefix = f"{system}\n\n" if i == 0 and system is not None else ""
        parts.append(f"<start_of_turn>{role}\n{prefix}{message.content.strip()}<end_of_turn>\n")
    if gen:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (
    PromptTemplate("alpaca", "Alpaca instruction format (Internist.ai)", _alpaca,
                   stop=("### Instruction:", "\n### ")),
    PromptTemplate("med42", "Med42 v1: <|system|>: / <|prompter|>: / <|assistant|>:", _med42,
                   stop=("<|prompter|>:", "<|system|>:")),
    PromptTemplate("llama2", "Llama-2 chat: [INST] <<SYS>> … [/INST]", _llama2,
                   stop=("[INST]",)),
    PromptTemplate("mistral", "Mistral/Mixtral instruct: [INST] … [/INST] (system folded into "
                   "the first turn)", _mistral, stop=("[INST]",), has_system=False),
    PromptTemplate("chatml", "ChatML <|im_start|> (Meditron's deployment guide)", _chatml,
                   stop=("<|im_end|>", "<|im_start|>")),
    PromptTemplate("llama3", "Llama-3 instruct headers (Med42-v2)", _llama3,
                   stop=("<|eot_id|>", "<|start_header_id|>")),
    PromptTemplate("gemma", "Gemma 2/3 turns: <start_of_turn>user … <end_of_turn> (MedGemma)",
                   _gemma, stop=("<end_of_turn>", "<start_of_turn>")),
)}

GGUF_TEMPLATE = "gguf"
"""Name of the template embedded in a GGUF file (``tokenizer.chat_template``)."""


def template_names() -> list[str]:
    """Every name a user may pick, the GGUF-embedded one included."""
    return [*TEMPLATES, GGUF_TEMPLATE]


def get_template(name: str) -> PromptTemplate:
    """A named template; unknown names raise an error that lists the valid ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplateError(name, template_names()) from None


# --- templates embedded in GGUF files ---------------------------------------------------------

TURN_END_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>",
                    "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>")
"""Tokens that end a turn in real chat templates (Llama-3, ChatML/Qwen, Phi-3, Gemma, Mistral);
any that an embedded template writes become stop strings, and the transformers Runtime ends on
each one its tokenizer has."""


def _jinja_environment() -> Any:
    """A sandbox set up as llama-cpp-python's ``Jinja2ChatFormatter`` (and transformers) set it
    up: trimmed blocks, loop controls, ``{% generation %}`` ignored, transformers' ``tojson``."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """transformers' ``{% generation %}…{% endgeneration %}`` marks; rendered as their body."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> Any:
    """The compiled template; invalid Jinja raises TemplateError."""
    from jinja2 import TemplateError as JinjaError

    try:
        return _jinja_environment().from_string(source)
    except JinjaError as exc:
        raise TemplateError(f"the model's chat template is not valid Jinja: {exc}") from None


def render_chat_template(source: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, bos_token: str = "",
                         eos_token: str = "", today: dt.datetime | None = None) -> str:
    """Render a model's Jinja chat template as llama-cpp-python renders it, character for
    character (``strftime_now`` and ``raise_exception`` included); errors are TemplateError.
    ``today`` fixes what ``strftime_now`` sees (default: now)."""
    from jinja2 import TemplateError as JinjaError

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the model's chat template refused the conversation: {message}")

    compiled = compile_chat_template(source)
    try:
        return compiled.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, raise_exception=raise_exception,
            strftime_now=lambda fmt: (today or dt.datetime.now()).strftime(fmt))
    except JinjaError as exc:
        raise TemplateError(f"the model's chat template failed: {exc}") from None


def gguf_template(source: str, *, bos_token: str = "", eos_token: str = "",
                  add_bos: bool = True, today: dt.datetime | None = None) -> PromptTemplate:
    """A template from the Jinja source embedded in a GGUF, rendered in a sandbox.

    The sandbox (jinja2's ``ImmutableSandboxedEnvironment``) stops a template from reaching
    Python internals or mutating its inputs. A template that refuses a system message (Gemma's
    first versions, Mistral v0.1) gets it folded into the first user turn instead; any other
    failure raises :class:`TemplateError`.
    """
    compile_chat_template(source)

    def render(system: str | None, turns: list[Message], gen: bool) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages += [{"role": m.role, "content": m.content} for m in turns]
        try:
            text = render_chat_template(source, messages, add_generation_prompt=gen,
                                        bos_token=bos_token, eos_token=eos_token, today=today)
        except TemplateError:
            if system is None or not turns:
                raise
            folded = [Message(turns[0].role, f"{system}\n\n{turns[0].content}"), *turns[1:]]
            return render(None, folded, gen)
        # The runtime adds BOS itself where the model asks for it (``add_bos``); a template that
        # writes it would double it. Where the model does not (SmolLM2, whose "BOS" is
        # <|im_start|>), the template's text is the prompt as it is.
        if add_bos and bos_token and text.startswith(bos_token):
            text = text[len(bos_token):]
        return text

    stops = tuple(m for m in TURN_END_MARKERS if m in source and m != eos_token)
    return PromptTemplate(GGUF_TEMPLATE, "the chat template embedded in the GGUF file", render,
                          stop=stops, own_rules=True)


@dataclass(frozen=True)
class TemplateChoice:
    """The template a session uses, and why: shown to the user, never silent."""

    template: PromptTemplate
    reason: str
    fallback: bool = False
    """True when the choice was not what the user or the file asked for."""


def resolve_template(requested: str | None, *, embedded: str | None, bos_token: str = "",
                     eos_token: str = "", add_bos: bool = True,
                     registry_default: str | None = None,
                     model_label: str = "this model") -> TemplateChoice:
    """Pick the template for a GGUF.

    ``requested`` (``--template``) wins. Otherwise the GGUF's embedded template; a file without one
    gets its registry default, and the reason says so. With neither, an error asks for
    ``--template``: a medical model prompted in a guessed format gives wrong answers.
    """
    if requested is not None and requested != GGUF_TEMPLATE:
        return TemplateChoice(get_template(requested), f"'{requested}' (chosen)")
    if embedded:
        return TemplateChoice(gguf_template(embedded, bos_token=bos_token, eos_token=eos_token,
                                            add_bos=add_bos),
                              "the chat template embedded in the GGUF")
    if requested == GGUF_TEMPLATE:
        raise TemplateError(f"{model_label} has no chat template embedded in its GGUF; "
                            f"choose one with --template ({', '.join(TEMPLATES)})")
    if registry_default is not None:
        return TemplateChoice(
            get_template(registry_default),
            f"'{registry_default}': the GGUF has no embedded chat template, so the registry "
            f"default for {model_label} is used",
            fallback=True,
        )
    raise TemplateError(f"{model_label} has no embedded chat template and no registry entry; "
                        f"choose one with --template ({', '.join(TEMPLATES)})")
