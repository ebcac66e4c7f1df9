"""Real models' chat templates render exactly as llama-cpp-python renders them.

The templates are the published ones (tests/data/chat_templates/README.md); the reference is
llama-cpp-python's own ``Jinja2ChatFormatter`` of the pinned release, run in the same test, so
``strftime_now`` dates agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from localmed.templates import Message, gguf_template, render_chat_template

DATA = Path(__file__).parent / "data" / "chat_templates"

# template file → (bos_token, eos_token, the token that ends an assistant turn)
TEMPLATES = {
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "google-gemma-3-4b-it.jinja": ("<bos>", "<eos>", "<end_of_turn>"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("", "<|im_end|>", "<|im_end|>"),
    "Qwen-Qwen3-0.6B.jinja": ("", "<|im_end|>", "<|im_end|>"),
    "mistralai-Mistral-7B-Instruct-v0.3.jinja": ("<s>", "</s>", "</s>"),
    "microsoft-Phi-3-mini-4k-instruct.jinja": ("<s>", "<|endoftext|>", "<|end|>"),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>", "<|end|>"),
}

CONVERSATIONS = {
    "with system": [
        {"role": "system", "content": "You are a careful clinical assistant. Answer briefly."},
        {"role": "user", "content": "A 64-year-old man has crushing chest pain. First test?"},
        {"role": "assistant", "content": "  A 12-lead ECG within 10 minutes.  "},
        {"role": "user", "content": "And if it shows ST elevation in II, III and aVF?"},
    ],
    "without system": [
        {"role": "user", "content": "Dose of aspirin in suspected MI?"},
    ],
}


def llama_cpp_python_render(source: str, messages: list[dict], bos: str, eos: str) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(source, eos_token=eos, bos_token=bos)(messages=messages).prompt


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_renders_as_llama_cpp_python_does(name, conversation):
    source = (DATA / name).read_text(encoding="utf-8")
    bos, eos, _ = TEMPLATES[name]
    messages = CONVERSATIONS[conversation]
    ours = render_chat_template(source, messages, bos_token=bos, eos_token=eos)
    assert ours == llama_cpp_python_render(source, messages, bos, eos)
    assert messages[-1]["content"] in ours


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_turn_end_token_stops_replies(name):
    source = (DATA / name).read_text(encoding="utf-8")
    bos, eos, end = TEMPLATES[name]
    template = gguf_template(source, bos_token=bos, eos_token=eos)
    # The end-of-turn token is a stop string, or it is the EOS token that llama.cpp ends on.
    assert end in template.stop or end == eos
    prompt = template.render([Message("user", "Hi")])
    assert not (bos and prompt.startswith(bos))  # the runtime adds BOS itself


def test_llama_3_2_dates_the_prompt_today():
    import datetime as dt

    source = (DATA / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text(encoding="utf-8")
    text = render_chat_template(source, [{"role": "user", "content": "hi"}])
    assert f"Today Date: {dt.datetime.now().strftime('%d %b %Y')}" in text


def test_loop_controls_render():
    source = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
              "{{ m.content }}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_chat_template(source, messages) == "ab"


def test_a_template_that_refuses_a_system_prompt_gets_it_folded():
    # google/gemma-7b-it's template (llama.cpp tests/test-chat-template.cpp) raises on system.
    source = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
              "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
              "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
              "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
              "{{'<start_of_turn>model\\n'}}{% endif %}")
    text = gguf_template(source).render([Message("user", "Hello")], system="Be brief.")
    assert text == "<start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_the_named_gemma_template_is_gemma_3s_own(conversation):
    from localmed.templates import get_template

    source = (DATA / "google-gemma-3-4b-it.jinja").read_text(encoding="utf-8")
    messages = CONVERSATIONS[conversation]
    real = render_chat_template(source, messages, bos_token="<bos>", eos_token="<eos>")
    named = get_template("gemma").render([Message(m["role"], m["content"]) for m in messages])
    assert "<bos>" + named == real
