"""Ollama templates checked as Ollama executes them: Go's own ``text/template``.

llama.cpp publishes 70 real chat templates in ``models/templates/`` (the pinned source
archive). For each, localmed either writes a Go template or refuses with a reason; every Go
template written must render, under Go with Ollama's data (``.System``, ``.Messages``; the
Modelfile's SYSTEM prepended when a request has none), exactly what ``localmed chat`` renders
with the model's Jinja, for the probe conversations and for others the synthesis never saw.
localmed's named templates' hand-written translations are held to the same check.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from localmed.errors import TemplateError
from localmed.export import OLLAMA_TEMPLATES
from localmed.ollama_template import probe_conversations, synthesize
from localmed.templates import TEMPLATES, Message, PromptTemplate, gguf_template
from tests.real_models import Unavailable as NoTemplates
from tests.real_models import llama_cpp_chat_templates

CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
BOS, EOS = "<|bos|>", "<|eos|>"
TODAY = dt.datetime(2026, 11, 30)
OTHER_DAY = dt.datetime(2025, 3, 1)

# The registry's models' template families among llama.cpp's 70 (Meditron3 and HuatuoGPT-o1-8B:
# Llama-3.1; HuatuoGPT-o1-7B/72B, Baichuan-M2: Qwen2.5; II-Medical: Qwen3) and the families
# the issue found refused before.
MUST_EXPORT = {
    "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct", "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B",
    "microsoft-Phi-3.5-mini-instruct", "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
}


def _conversations() -> list[tuple[str, str | None, list[Message]]]:
    """The synthesis's probes, and conversations it never rendered: five turns, contents with
    non-ASCII text and Go-template-looking braces."""
    unseen = []
    for system in ("Réponds en français.\nSois bref.", None):
        turns = []
        for i in range(5):
            turns.append(Message("user", f"Température {38 + i},5 °C — {{{{ .System }}}} #{i}"))
            if i < 4:
                turns.append(Message("assistant", f"Paracétamol 1 g ✓ ({i})"))
        unseen.append(("five turns, unusual text", system, turns))
    return [*probe_conversations(), *unseen]


def cases_for(template: PromptTemplate, go_template: str) -> list[tuple[dict, str, str]]:
    """(Go case, what localmed chat renders, what) for every conversation the Jinja accepts;
    a conversation with a system prompt is tried with it in the request and with it as the
    Modelfile's SYSTEM."""
    out = []
    for what, system, turns in _conversations():
        try:
            expected = template.render(turns, system=system)
        except TemplateError:
            continue
        messages = [{"role": m.role, "content": m.content} for m in turns]
        request_system = [{"role": "system", "content": system}] if system else []
        out.append(({"template": go_template, "modelfile_system": "",
                     "messages": request_system + messages}, expected, what))
        if system:
            out.append(({"template": go_template, "modelfile_system": system,
                         "messages": messages}, expected, f"{what}, SYSTEM from the Modelfile"))
    return out


def check_under_go(go_ollama, named: dict[str, tuple[PromptTemplate, str]]) -> list[str]:
    cases, owners = [], []
    for name, (template, go_template) in named.items():
        for case, expected, what in cases_for(template, go_template):
            cases.append(case)
            owners.append((name, what, expected))
    results = go_ollama(cases)
    return [f"{name} ({what}): {result.get('error') or result['text']!r} != {expected!r}"
            for (name, what, expected), result in zip(owners, results, strict=True)
            if result.get("error") or result["text"] != expected]


def test_llama_cpp_templates_export_exactly_or_are_refused(go_ollama, capsys):
    try:
        sources = llama_cpp_chat_templates()
    except NoTemplates as exc:
        pytest.skip(str(exc))
    assert len(sources) == 70
    written, refused = {}, {}
    for name, source in sources.items():
        template = gguf_template(source, bos_token=BOS, eos_token=EOS, today=TODAY)
        other_day = gguf_template(source, bos_token=BOS, eos_token=EOS, today=OTHER_DAY)
        try:
            written[name] = (template, synthesize(template, dated=other_day).go)
        except TemplateError as exc:
            refused[name] = str(exc)
    wrong = check_under_go(go_ollama, written)
    with capsys.disabled():
        print(f"\nOllama export of llama.cpp's templates: {len(written)} exact, "
              f"{len(refused)} refused, {len(wrong)} wrong under Go")
        for name, why in refused.items():
            print(f"  refused {name}: {why}")
    assert not wrong, "\n".join(wrong[:5])
    assert len(written) >= 50
    assert MUST_EXPORT <= set(written), MUST_EXPORT - set(written)


@pytest.mark.parametrize("name", ["google-gemma-3-4b-it", "mistralai-Mistral-7B-Instruct-v0.3"])
def test_registry_templates_outside_llama_cpps_set(go_ollama, name):
    """MedGemma's Gemma 3 (system folded into the first user turn) and Mistral v0.3 (system in
    the last user turn) are not among llama.cpp's 70."""
    source = (CHAT_TEMPLATES / f"{name}.jinja").read_text()
    template = gguf_template(source, bos_token="<s>", eos_token="</s>", today=TODAY)
    go_template = synthesize(template).go
    assert not check_under_go(go_ollama, {name: (template, go_template)})


def test_named_templates_hand_translations_under_go(go_ollama):
    """The seven hand-written Go templates, held to the same check for conversations that end
    with the user, as chat requests do (a trailing assistant message they leave open, as
    Ollama's own templates do, for Ollama to continue)."""
    named = {name: (TEMPLATES[name], OLLAMA_TEMPLATES[name]) for name in TEMPLATES}
    wrong = [w for w in check_under_go(go_ollama, named) if "ending with the assistant" not in w]
    assert not wrong, "\n".join(wrong[:5])


def test_a_template_that_drops_the_system_prompt_is_refused():
    """Phi-3-mini's published template leaves system messages out."""
    source = (CHAT_TEMPLATES / "microsoft-Phi-3-mini-4k-instruct.jinja").read_text()
    with pytest.raises(TemplateError, match="drops the system prompt"):
        synthesize(gguf_template(source))


def test_a_template_that_numbers_turns_is_refused():
    """Text that changes with each turn is not fixed text: refused, not written wrong."""
    source = "{% for m in messages %}[{{ loop.index }}] {{ m.role }}: {{ m.content }}\n" \
             "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    with pytest.raises(TemplateError, match="renders it as its Jinja does"):
        synthesize(gguf_template(source))
