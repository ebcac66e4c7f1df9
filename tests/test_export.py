"""`localmed export`: Ollama Modelfiles checked against golden files, one per named template;
the LM Studio layout checked on disk; what cannot be exported refused in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from localmed import cli, formats
from localmed.export import OLLAMA_TEMPLATES
from localmed.templates import TEMPLATES, Message, resolve_template
from tests.gguf_files import rewrite_gguf
from tests.test_bad_inputs import assert_one_line_error, run_cli

GOLDEN = Path(__file__).parent / "data" / "ollama"
UPDATE = os.environ.get("LOCALMED_UPDATE_GOLDEN") == "1"


def normalised(text: str, gguf: Path) -> str:
    """The Modelfile with what changes between machines (the GGUF's path, the version) fixed."""
    text = text.replace(str(gguf.resolve()), "<gguf>")
    return re.sub(r"Made by localmed \S+ ", "Made by localmed <version> ", text)


def test_every_named_template_has_a_translation():
    assert set(OLLAMA_TEMPLATES) == set(TEMPLATES)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_modelfile_matches_its_golden_file(template, converted, tmp_path, capsys):
    gguf = converted["llama"]["Q8_0"]
    out = tmp_path / "ollama"
    assert cli.main(["export", str(gguf), "--template", template, "--ollama", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    text = normalised((out / "Modelfile").read_text(), gguf)
    golden = GOLDEN / f"{template}.Modelfile"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()
    assert f"ollama create llama:q8_0 -f {(out / 'Modelfile').resolve()}" in printed
    # What the golden file must say, whatever it says besides.
    assert "SYSTEM \"\"\"Not medical advice." in text
    for stop in TEMPLATES[template].stop:
        assert f"PARAMETER stop \"{stop}\"" in text or f'PARAMETER stop """{stop}"""' in text
    assert "PARAMETER num_ctx 512" in text  # the tiny model's trained context


def test_an_embedded_template_is_recognised(smollm2, tmp_path, capsys):
    """SmolLM2's own Jinja template renders as ChatML: exported as chatml."""
    out = tmp_path / "o"
    assert cli.main(["export", str(smollm2["gguf"]), "--ollama", str(out)]) == 0
    text = (out / "Modelfile").read_text()
    assert OLLAMA_TEMPLATES["chatml"] in text and 'PARAMETER stop "<|im_end|>"' in text


def test_a_template_with_no_named_equivalent_is_translated(smollm2, go_ollama, tmp_path,
                                                           capsys):
    """A real GGUF (SmolLM2) carrying Llama-3.2's template, which reads the date: exported
    with the date fixed and said so; the Modelfile's TEMPLATE, run under Go as Ollama runs it
    (its SYSTEM standing in for a request's missing system message), renders what `localmed
    chat` renders for that GGUF today."""
    source = (Path(__file__).parent / "data" / "chat_templates" /
              "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
    gguf = tmp_path / "llama32-template.Q4_1.gguf"
    rewrite_gguf(smollm2["gguf"], gguf, strings={"tokenizer.chat_template": source})
    out = tmp_path / "o"
    assert cli.main(["export", str(gguf), "--ollama", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the GGUF's own, translated" in printed and "date" in printed
    text = (out / "Modelfile").read_text()
    assert "# Note: the template writes today's date" in text
    go_template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    assert system.startswith("Not medical advice.")
    info = formats.describe(gguf)
    jinja = resolve_template(None, embedded=info.chat_template, bos_token=info.bos_token,
                             eos_token=info.eos_token, add_bos=info.add_bos).template
    conversations = [[Message("user", "Fever and a stiff neck?")],
                     [Message("user", "Fever and a stiff neck?"),
                      Message("assistant", "Consider meningitis: blood cultures, then LP."),
                      Message("user", "And the antibiotics?")]]
    cases = [{"template": go_template, "modelfile_system": system,
              "messages": [{"role": m.role, "content": m.content} for m in turns]}
             for turns in conversations]
    for turns, result in zip(conversations, go_ollama(cases), strict=True):
        assert result == {"text": jinja.render(turns, system=system)}
    assert 'PARAMETER stop "<|eot_id|>"' in text


class TestRefused:
    def test_a_gptq_folder(self, checkpoints, tmp_path, capsys):
        folder = tmp_path / "m-GPTQ-4bit-g128"
        shutil.copytree(checkpoints["llama"], folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (folder / "config.json").write_text(json.dumps(config))
        code, err = run_cli(capsys, "export", str(folder), "--ollama", str(tmp_path / "o"))
        assert_one_line_error(code, err, "GPTQ", "GGUF")
        assert not (tmp_path / "o").exists()

    def test_a_template_with_no_translation(self, converted, tmp_path, capsys):
        """The tiny model's own template drops system prompts: no Go template can say it, and
        the reason is given."""
        code, err = run_cli(capsys, "export", str(converted["llama"]["Q8_0"]), "--ollama",
                            str(tmp_path / "o"))
        assert_one_line_error(code, err, "cannot be written as Ollama's Go template",
                              "drops the system prompt", "--template")
        assert not (tmp_path / "o").exists()

    def test_a_model_with_no_template_at_all(self, gemma3_real, tmp_path, capsys):
        code, err = run_cli(capsys, "export", str(gemma3_real["gguf"]), "--ollama",
                            str(tmp_path / "o"))
        assert_one_line_error(code, err, "no embedded chat template", "--template")

    def test_no_destination(self, converted, capsys):
        code, err = run_cli(capsys, "export", str(converted["llama"]["Q8_0"]))
        assert_one_line_error(code, err, "--ollama", "--lmstudio")


class TestLMStudio:
    def test_publisher_model_file_layout_by_link(self, converted, tmp_path):
        gguf = converted["llama"]["Q8_0"]
        models = tmp_path / "lmstudio-models"
        assert cli.main(["export", str(gguf), "--template", "llama2", "--lmstudio",
                         str(models)]) == 0
        placed = models / "localmed" / "llama-GGUF" / gguf.name
        assert placed.is_file() and os.path.samefile(placed, gguf)
        # Again: already there, nothing to do.
        assert cli.main(["export", str(gguf), "--template", "llama2", "--lmstudio",
                         str(models)]) == 0

    def test_copy(self, converted, tmp_path):
        gguf = converted["llama"]["Q8_0"]
        models = tmp_path / "m"
        assert cli.main(["export", str(gguf), "--template", "llama2", "--lmstudio", str(models),
                         "--copy"]) == 0
        placed = models / "localmed" / "llama-GGUF" / gguf.name
        assert not placed.is_symlink() and placed.read_bytes() == gguf.read_bytes()
        assert [p.name for p in placed.parent.iterdir()] == [gguf.name]  # no temporaries

    def test_default_folder_is_lm_studios(self, converted, tmp_path, monkeypatch):
        monkeypatch.setenv("HOME", str(tmp_path))
        gguf = converted["llama"]["Q8_0"]
        assert cli.main(["export", str(gguf), "--template", "llama2", "--lmstudio"]) == 0
        assert (tmp_path / ".lmstudio" / "models" / "localmed" / "llama-GGUF" / gguf.name).is_file()

    def test_another_file_in_the_way(self, converted, tmp_path, capsys):
        gguf = converted["llama"]["Q8_0"]
        target = tmp_path / "m" / "localmed" / "llama-GGUF" / gguf.name
        target.parent.mkdir(parents=True)
        target.write_bytes(b"other")
        code, err = run_cli(capsys, "export", str(gguf), "--template", "llama2", "--lmstudio",
                            str(tmp_path / "m"))
        assert_one_line_error(code, err, "exists")
        assert target.read_bytes() == b"other"
