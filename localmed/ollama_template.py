"""Ollama's Go template for a model's own Jinja chat template, found by rendering probes.

Ollama does not run Jinja: a Modelfile's ``TEMPLATE`` is a Go ``text/template`` over Ollama's
data, ``.System`` (every system message, joined) and ``.Messages`` (``.Role``, ``.Content``;
consecutive messages of one role already merged, the Modelfile's ``SYSTEM`` prepended when a
request has none). Most chat templates, whatever their Jinja, lay a conversation out as fixed
text around each message. That text is found here by rendering probe conversations whose
contents are sentinels, with the same renderer ``localmed chat`` uses:

- what comes before the system prompt and between it and the first user message (or, where the
  template puts the system prompt into the last user message, as Mistral v0.3's does, the text
  around it there), and what comes before the first user message when there is no system prompt
  (a default system prompt or a dated header, as Qwen2.5's and Llama-3.1's write);
- the text before each later user message, before the first and later assistant messages, and
  after the last message (the generation prompt).

The Go template built from these pieces is accepted only when its Python mirror
(:meth:`OllamaShape.render`, checked against Go's own ``text/template`` in the tests) renders
every probe conversation (with and without a system prompt, one to four user turns, ending with
the user or with the assistant, sentinel and ordinary contents) exactly as the Jinja does;
otherwise the reason is given and nothing is written. A template that reads the date
(``strftime_now``) is rendered with the export's date, fixed in the Go template, and says so.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from localmed.errors import TemplateError
from localmed.templates import Message, PromptTemplate

SYSTEM = "xq7system"
"""Sentinel contents: text no template writes or changes."""


def _user(i: int) -> str:
    return f"xq7user{i}"


def _assistant(i: int) -> str:
    return f"xq7assistant{i}"


def probe_turns(users: int, *, end_with_user: bool = True,
                user=_user, assistant=_assistant) -> list[Message]:
    """user 1, assistant 1, …, user N (and assistant N unless it ends with the user)."""
    turns: list[Message] = []
    for i in range(1, users + 1):
        turns.append(Message("user", user(i)))
        if i < users or not end_with_user:
            turns.append(Message("assistant", assistant(i)))
    return turns


@dataclass(frozen=True)
class OllamaShape:
    """The fixed text around each message of a conversation, as a template lays it out."""

    lead_system: str
    """Before the system prompt (when there is one, at the start)."""
    system_gap: str
    """Between the system prompt and the first user message."""
    lead: str
    """Before the first user message, when there is no system prompt (or it goes elsewhere)."""
    user_gap: str
    """Before every user message after the first."""
    first_assistant_gap: str
    assistant_gap: str
    last_assistant_gap: str | None
    """Before an assistant message that ends the conversation, where that differs (Qwen3 marks
    it as a reply with its thinking left empty); None: the Jinja refuses such conversations."""
    tail_user: str
    """After the last message when it is the user's: the generation prompt."""
    tail_assistant: str | None
    """After the last message when it is the assistant's (None: the Jinja refuses that)."""
    system_in_last_user: bool = False
    """The system prompt goes into the last user message, ``system_sep`` after it."""
    system_sep: str = ""

    def render(self, system: str, turns: Sequence[Message]) -> str:
        """What Ollama renders with :meth:`go_template` for this ``.System`` and these
        (alternating, non-system) messages: the Go template's mirror, kept equal to it by the
        tests, which run both."""
        out: list[str] = []
        if system and not self.system_in_last_user:
            out += [self.lead_system, system, self.system_gap]
        else:
            out.append(self.lead)
        first_user = first_assistant = True
        last_role = ""
        for i, message in enumerate(turns):
            last = i == len(turns) - 1
            if message.role == "user":
                if not first_user:
                    out.append(self.user_gap)
                first_user = False
                if self.system_in_last_user and system and last:
                    out += [system, self.system_sep]
            elif message.role == "assistant":
                if last and self.last_assistant_gap is not None:
                    out.append(self.last_assistant_gap)
                else:
                    out.append(self.first_assistant_gap if first_assistant else
                               self.assistant_gap)
                first_assistant = False
            else:
                continue
            out.append(message.content)
            last_role = message.role
        if last_role == "user":
            out.append(self.tail_user)
        elif last_role == "assistant" and self.tail_assistant is not None:
            out.append(self.tail_assistant)
        return "".join(out)

    def go_template(self) -> str:
        """The Go ``text/template`` for Ollama. Every piece of fixed text is a quoted Go string
        (``{{ "…" }}``), so layout whitespace can be trimmed with ``{{-`` without touching it,
        and no raw control character reaches the Modelfile. Branches whose texts are equal are
        written once."""
        if self.system_in_last_user:
            lead = f"{{{{- {go_quote(self.lead)} }}}}" if self.lead else ""
            system_here = (f"{{{{ if and $.System $last }}}}{{{{ $.System }}}}"
                           f"{go_string(self.system_sep)}{{{{ end }}}}")
        else:
            lead = (f"{{{{- if .System }}}}{go_string(self.lead_system)}{{{{ .System }}}}"
                    f"{go_string(self.system_gap)}{{{{ else }}}}{go_string(self.lead)}"
                    "{{ end }}")
            system_here = ""
        first_differs = self.first_assistant_gap != self.assistant_gap
        assistant = (f"{{{{ if $firstAssistant }}}}{go_string(self.first_assistant_gap)}"
                     f"{{{{ else }}}}{go_string(self.assistant_gap)}{{{{ end }}}}"
                     if first_differs else go_string(self.assistant_gap))
        if self.last_assistant_gap is not None and (
                first_differs or self.last_assistant_gap != self.assistant_gap):
            assistant = (f"{{{{ if $last }}}}{go_string(self.last_assistant_gap)}"
                         f"{{{{ else }}}}{assistant}{{{{ end }}}}")
        if self.tail_assistant == self.tail_user:
            tail = f"{{{{- if $lastRole }}}}{go_string(self.tail_user)}{{{{ end }}}}"
        else:
            tail = (f'{{{{- if eq $lastRole "user" }}}}{go_string(self.tail_user)}'
                    + ("" if self.tail_assistant is None else
                       f'{{{{ else if eq $lastRole "assistant" }}}}'
                       f"{go_string(self.tail_assistant)}")
                    + "{{ end }}")
        lines = [
            lead,
            '{{- $firstUser := true }}{{ $lastRole := "" }}'
            + ("{{ $firstAssistant := true }}" if first_differs else ""),
            "{{- range $i, $_ := .Messages }}",
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
            '{{- if eq .Role "user" }}',
            f"{{{{- if $firstUser }}}}{{{{ $firstUser = false }}}}{{{{ else }}}}"
            f"{go_string(self.user_gap)}{{{{ end }}}}{system_here}"
            '{{ .Content }}{{ $lastRole = "user" }}',
            '{{- else if eq .Role "assistant" }}',
            f"{{{{- {assistant[3:]}" if assistant.startswith("{{ ") else assistant,
            ("{{- $firstAssistant = false }}" if first_differs else "")
            + '{{- .Content }}{{ $lastRole = "assistant" }}',
            "{{- end }}",
            "{{- end }}",
            tail,
        ]
        return "\n".join(line for line in lines if line)


def go_quote(text: str) -> str:
    """``text`` as a Go interpreted string literal. Characters Ollama's Modelfile reader would
    drop (it keeps printable ones only) or Go forbids raw are escaped; the rest stay readable."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == " " or (code < 0x80 and ch.isprintable()):
            out.append(ch)
        elif code >= 0x80 and unicodedata.category(ch)[0] in "LMNPS":
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def go_string(text: str) -> str:
    """A Go action that prints ``text`` (nothing for empty text)."""
    return f"{{{{ {go_quote(text)} }}}}" if text else ""


@dataclass(frozen=True)
class Synthesized:
    """A Go template that renders every probe as the Jinja does, and what to tell the user."""

    shape: OllamaShape
    notes: list[str] = field(default_factory=list)

    @property
    def go(self) -> str:
        return self.shape.go_template()


def _find_all(text: str, sentinels: Sequence[str]) -> list[tuple[int, int]]:
    spans = []
    for sentinel in sentinels:
        count = text.count(sentinel)
        if count != 1:
            what = "drops" if count == 0 else "repeats"
            who = ("the system prompt" if sentinel == SYSTEM else
                   "a user message" if "user" in sentinel else "an assistant message")
            raise TemplateError(f"it {what} {who}")
        start = text.index(sentinel)
        spans.append((start, start + len(sentinel)))
    return spans


def _render(template: PromptTemplate, system: str | None, turns: list[Message]) -> str | None:
    try:
        return template.render(turns, system=system)
    except TemplateError:
        return None


def infer_shape(template: PromptTemplate) -> OllamaShape:
    """The fixed text around each message, read off sentinel renders; TemplateError says why
    a template has none."""
    with_system = _render(template, SYSTEM, probe_turns(3))
    without = _render(template, None, probe_turns(3))
    if with_system is None or without is None:
        raise TemplateError("it refuses a plain conversation (system, then user and assistant "
                            "in turn)")
    (nu1,) = _find_all(without, [_user(1)])
    lead = without[:nu1[0]]
    users = [_user(1), _assistant(1), _user(2), _assistant(2), _user(3)]
    spans = _find_all(with_system, [SYSTEM, *users])
    system_span, (u1, a1, u2, a2, u3) = spans[0], spans[1:]
    in_last_user = system_span[0] > a2[1] and system_span[1] <= u3[0]
    if not in_last_user and system_span[1] > u1[0]:
        raise TemplateError("it puts the system prompt where Ollama's template data cannot "
                            "(neither first nor in the last user message)")
    tail_assistant = last_assistant_gap = None
    ends_assistant = _render(template, SYSTEM, probe_turns(2, end_with_user=False))
    if ends_assistant is not None:
        user, last = _find_all(ends_assistant, [_user(2), _assistant(2)])
        tail_assistant = ends_assistant[last[1]:]
        last_assistant_gap = ends_assistant[user[1]:last[0]]
    return OllamaShape(
        lead_system=with_system[:system_span[0]] if not in_last_user else lead,
        system_gap=with_system[system_span[1]:u1[0]] if not in_last_user else "",
        lead=lead,
        user_gap=with_system[a1[1]:u2[0]],
        first_assistant_gap=with_system[u1[1]:a1[0]],
        assistant_gap=with_system[u2[1]:a2[0]],
        last_assistant_gap=last_assistant_gap,
        tail_user=with_system[u3[1]:],
        tail_assistant=tail_assistant,
        system_in_last_user=in_last_user,
        system_sep=with_system[system_span[1]:u3[0]] if in_last_user else "",
    )


# Ordinary clinical text as well as sentinels: a template that treats some text specially
# (splits on a tag, escapes a character) shows it here.
_PLAIN_USER = ("Patient, 54, with chest pain radiating to the left arm.\nECG: ST elevation in "
               "II, III, aVF. Next step?", "And the dose of aspirin?")
_PLAIN_ASSISTANT = ("Inferior STEMI: activate the cath lab; aspirin, heparin, P2Y12 inhibitor.",)
_PLAIN_SYSTEM = "You are a careful clinical assistant.\nAnswer briefly."


def probe_conversations() -> list[tuple[str, str | None, list[Message]]]:
    """(what, system prompt, turns) of every conversation a Go template must render as the
    Jinja does to be accepted."""
    probes = []
    for system in (SYSTEM, None):
        for users in (1, 2, 3, 4):
            probes.append((f"{users} user turn(s)", system, probe_turns(users)))
        for users in (1, 2, 3):
            probes.append((f"{users} user turn(s) ending with the assistant", system,
                           probe_turns(users, end_with_user=False)))
    plain = probe_turns(2, user=lambda i: _PLAIN_USER[i - 1],
                        assistant=lambda i: _PLAIN_ASSISTANT[i - 1])
    probes.append(("clinical text", _PLAIN_SYSTEM, plain))
    probes.append(("clinical text, no system prompt", None, plain))
    return probes


def synthesize(template: PromptTemplate, *, dated: PromptTemplate | None = None) -> Synthesized:
    """The Go template for ``template`` (a GGUF's Jinja, rendered as ``localmed chat`` renders
    it), accepted only if it renders every probe exactly as the Jinja does. ``dated`` is the
    same template rendered on another day: where the two differ, the template reads the date,
    and the export says it is fixed. Raises TemplateError with the reason otherwise."""
    shape = infer_shape(template)
    for what, system, turns in probe_conversations():
        expected = _render(template, system, turns)
        if expected is None:  # the Jinja refuses this conversation, as localmed chat would
            continue
        got = shape.render(system or "", turns)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                      min(len(got), len(expected)))
            raise TemplateError(
                f"no fixed text around the messages renders it as its Jinja does ({what}"
                f"{', with' if system else ', without'} a system prompt: "
                f"{expected[max(0, at - 20):at + 20]!r} vs {got[max(0, at - 20):at + 20]!r})")
    notes = []
    if dated is not None and _render(dated, SYSTEM, probe_turns(1)) != _render(
            template, SYSTEM, probe_turns(1)):
        notes.append("the template writes today's date into the prompt; Ollama cannot, so the "
                     "export's date is fixed in it (export again to update it)")
    # what Go cannot do, said rather than refused: these differ only for such contents
    reasoning = probe_turns(2, assistant=lambda i: f"<think>xq7why{i}</think>{_assistant(i)}")
    padded = probe_turns(1, user=lambda i: f" {_user(i)} \n")
    for turns, note in (
            (reasoning, "the template leaves the reasoning (<think>…</think>) of earlier "
                        "replies out of the prompt; Ollama passes earlier replies as they are"),
            (padded, "the template trims spaces around messages; Ollama's Go template cannot, "
                     "so a message's leading or trailing spaces reach the model as typed")):
        expected = _render(template, SYSTEM, turns)
        if expected is not None and shape.render(SYSTEM, turns) != expected:
            notes.append(note)
    return Synthesized(shape, notes)


def fixed_date_pair() -> tuple[dt.datetime, dt.datetime]:
    """Today (the export's date) and another day, to see whether a template reads the date."""
    today = dt.datetime.now()
    return today, today - dt.timedelta(days=400)
