"""Golden tests: every template, character for character."""

from __future__ import annotations

import pytest

from localmed.errors import TemplateError, UnknownTemplateError
from localmed.templates import (
    TEMPLATES,
    Message,
    get_template,
    gguf_template,
    resolve_template,
    template_names,
)

SYSTEM = "You are a careful clinical assistant."
CONVO = [
    Message("user", "What is the first-line drug for hypertension?"),
    Message("assistant", "A thiazide diuretic, an ACE inhibitor, an ARB or a CCB."),
    Message("user", "And in pregnancy?"),
]

GOLDEN = {
    "alpaca": (
        "You are a careful clinical assistant.\n\n"
        "### Instruction:\nWhat is the first-line drug for hypertension?\n\n"
        "### Response:\nA thiazide diuretic, an ACE inhibitor, an ARB or a CCB.\n\n"
        "### Instruction:\nAnd in pregnancy?\n\n"
        "### Response:\n"
    ),
    "med42": (
        "<|system|>: You are a careful clinical assistant.\n"
        "<|prompter|>:What is the first-line drug for hypertension?\n"
        "<|assistant|>:A thiazide diuretic, an ACE inhibitor, an ARB or a CCB.\n"
        "<|prompter|>:And in pregnancy?\n"
        "<|assistant|>:"
    ),
    "llama2": (
        "[INST] <<SYS>>\nYou are a careful clinical assistant.\n<</SYS>>\n\n"
        "What is the first-line drug for hypertension? [/INST] "
        "A thiazide diuretic, an ACE inhibitor, an ARB or a CCB. </s>"
        "<s>[INST] And in pregnancy? [/INST]"
    ),
    "mistral": (
        "[INST] You are a careful clinical assistant.\n\n"
        "What is the first-line drug for hypertension? [/INST]"
        "A thiazide diuretic, an ACE inhibitor, an ARB or a CCB.</s>"
        "[INST] And in pregnancy? [/INST]"
    ),
    "chatml": (
        "<|im_start|>system\nYou are a careful clinical assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the first-line drug for hypertension?<|im_end|>\n"
        "<|im_start|>assistant\nA thiazide diuretic, an ACE inhibitor, an ARB or a CCB."
        "<|im_end|>\n"
        "<|im_start|>user\nAnd in pregnancy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "You are a careful clinical assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "What is the first-line drug for hypertension?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "A thiazide diuretic, an ACE inhibitor, an ARB or a CCB.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd in pregnancy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "<start_of_turn>user\nYou are a careful clinical assistant.\n\n"
        "What is the first-line drug for hypertension?<end_of_turn>\n"
        "<start_of_turn>model\nA thiazide diuretic, an ACE inhibitor, an ARB or a CCB."
        "<end_of_turn>\n"
        "<start_of_turn>user\nAnd in pregnancy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
}

GOLDEN_NO_SYSTEM_FIRST_TURN = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHi\n\n### Response:\n"
    ),
    "med42": "<|prompter|>:Hi\n<|assistant|>:",
    "llama2": "[INST] Hi [/INST]",
    "mistral": "[INST] Hi [/INST]",
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_multi_turn_with_system(name):
    assert get_template(name).render(CONVO, system=SYSTEM) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN_NO_SYSTEM_FIRST_TURN))
def test_golden_first_turn_without_system(name):
    assert get_template(name).render([Message("user", "Hi")]) == GOLDEN_NO_SYSTEM_FIRST_TURN[name]


def test_every_registered_template_has_a_golden_test():
    assert set(TEMPLATES) == set(GOLDEN) == set(GOLDEN_NO_SYSTEM_FIRST_TURN)


def test_system_message_in_conversation_equals_system_argument():
    for template in TEMPLATES.values():
        with_message = template.render([Message("system", SYSTEM), *CONVO])
        assert with_message == template.render(CONVO, system=SYSTEM)


def test_system_prompt_folds_into_first_turn_where_no_slot():
    mistral = get_template("mistral")
    assert not mistral.has_system
    assert mistral.render(CONVO, system=SYSTEM).startswith(f"[INST] {SYSTEM}\n\n")


def test_turns_must_alternate():
    with pytest.raises(TemplateError, match="alternate"):
        get_template("chatml").render([Message("user", "a"), Message("user", "b")])


def test_unknown_template_lists_valid_names():
    with pytest.raises(UnknownTemplateError) as err:
        get_template("vicuna")
    for name in template_names():
        assert name in str(err.value)
    assert isinstance(err.value, KeyError)


def test_stop_strings_cover_the_turn_markers():
    assert "<|eot_id|>" in get_template("llama3").stop
    assert "<|im_end|>" in get_template("chatml").stop
    assert "<|prompter|>:" in get_template("med42").stop
    assert "### Instruction:" in get_template("alpaca").stop


LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def test_gguf_jinja_template_renders_like_the_named_one():
    template = gguf_template(LLAMA3_JINJA, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    # BOS is the runtime's to add; the rendered text must not repeat it.
    assert template.render(CONVO, system=SYSTEM) == GOLDEN["llama3"]


def test_gguf_template_stop_strings_come_from_the_template():
    template = gguf_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                             "{% endfor %}", eos_token="</s>")
    assert template.stop == ("<|im_end|>",)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
])
def test_gguf_template_is_sandboxed(source):
    with pytest.raises(TemplateError):
        gguf_template(source).render([Message("user", "hi")])


def test_gguf_template_raise_exception_is_a_clear_error():
    template = gguf_template("{{ raise_exception('System role not supported') }}")
    with pytest.raises(TemplateError, match="System role not supported"):
        template.render([Message("user", "hi")])


def test_resolve_prefers_the_requested_template():
    choice = resolve_template("med42", embedded=LLAMA3_JINJA)
    assert choice.template.name == "med42" and not choice.fallback


def test_resolve_uses_the_embedded_template_by_default():
    choice = resolve_template(None, embedded=LLAMA3_JINJA, registry_default="alpaca")
    assert choice.template.name == "gguf" and not choice.fallback


def test_resolve_without_embedded_template_says_it_uses_the_registry_default():
    choice = resolve_template(None, embedded=None, registry_default="alpaca",
                              model_label="internist-7b")
    assert choice.template.name == "alpaca"
    assert choice.fallback
    assert "no embedded chat template" in choice.reason and "internist-7b" in choice.reason


def test_resolve_never_guesses():
    with pytest.raises(TemplateError, match="--template"):
        resolve_template(None, embedded=None, registry_default=None)
    with pytest.raises(TemplateError, match="no chat template embedded"):
        resolve_template("gguf", embedded=None, registry_default="alpaca")
