"""models.toml: the built-in registry, user overrides, and errors that name file, entry, field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localmed import cli
from localmed.errors import RegistryError, UnknownModelError
from localmed.registry import Registry, builtin_registry_path

SEED_MODELS = {
    "internist-7b": ("internistai/base-7b-v0.2", "MistralForCausalLM", "alpaca"),
    "meditron-7b": ("epfl-llm/meditron-7b", "LlamaForCausalLM", "chatml"),
    "meditron-70b": ("epfl-llm/meditron-70b", "LlamaForCausalLM", "chatml"),
    "med42-70b": ("m42-health/med42-70b", "LlamaForCausalLM", "med42"),
    "med42-v2-8b": ("m42-health/Llama3-Med42-8B", "LlamaForCausalLM", "llama3"),
    "med42-v2-70b": ("m42-health/Llama3-Med42-70B", "LlamaForCausalLM", "llama3"),
    "melt-mixtral-8x7b": ("IBI-CAAI/MELT-Mixtral-8x7B-Instruct-v0.1", "MixtralForCausalLM",
                          "mistral"),
    "medico-mistral": ("SNOWTEAM/sft_medico-mistral", "MixtralForCausalLM", "mistral"),
}


def test_builtin_registry_has_the_seed_models():
    registry = Registry.load(user=Path("/nonexistent/models.toml"))
    for model_id, (repo, arch, template) in SEED_MODELS.items():
        entry = registry[model_id]
        assert (entry.repo, entry.architecture, entry.template) == (repo, arch, template)
        assert entry.advisory and entry.license and entry.context_length > 0
    assert registry["internist-7b"].scores["medqa"] == 60.5
    assert registry["med42-70b"].scores["medqa"] == 61.5
    assert registry["meditron-70b"].scores["medqa"] == 64.4
    assert registry["med42-70b"].gated and registry["med42-v2-8b"].gated
    assert not registry["internist-7b"].gated


def test_unknown_id_lists_known_ids():
    registry = Registry.load(user=Path("/nonexistent/models.toml"))
    with pytest.raises(UnknownModelError) as err:
        registry["internist-8b"]
    assert "internist-7b" in str(err.value)
    assert registry.get("internist-8b") is None


def write_user(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_user_file_adds_and_overrides(tmp_path):
    user = write_user(tmp_path, """
[models.internist-7b]
default_quant = "Q8_0"

[models.my-med]
name = "My Med"
repo = "me/my-med"
architecture = "LlamaForCausalLM"
parameters_b = 1.1
context_length = 2048
template = "chatml"
license = "mit"
gated = false
default_quant = "q4_k_m"
advisory = "Research only."
scores = { medqa = 40 }
""")
    registry = Registry.load(user=user)
    assert registry["internist-7b"].default_quant == "Q8_0"
    assert registry["internist-7b"].repo == "internistai/base-7b-v0.2"  # kept
    assert registry["internist-7b"].source == user
    assert registry["my-med"].default_quant == "Q4_K_M"
    assert registry["my-med"].scores["medqa"] == 40.0
    assert registry.by_repo("ME/MY-MED").id == "my-med"
    assert registry.files == (builtin_registry_path(), user)


@pytest.mark.parametrize("text,entry,field,fragment", [
    ("[models.x\nname = 1", None, None, "invalid TOML"),
    ('[models.x]\nname = "X"\n', "x", "repo", "missing"),
    ('[models.internist-7b]\ncontext_length = "4k"\n', "internist-7b", "context_length",
     "must be an integer"),
    ('[models.internist-7b]\ntemplate = "vicuna"\n', "internist-7b", "template",
     "unknown template"),
    ('[models.internist-7b]\ndefault_quant = "Q9"\n', "internist-7b", "default_quant",
     "unknown quant"),
    ('[models.internist-7b]\ngated = "no"\n', "internist-7b", "gated", "must be true or false"),
    ('[models.internist-7b]\ncolour = "red"\n', "internist-7b", "colour", "unknown field"),
    ('[models.internist-7b]\nscores = { medqa = "high" }\n', "internist-7b", "scores",
     "suite = accuracy"),
    ('[models.internist-7b]\ngguf_repos = ["no-slash"]\n', "internist-7b", "gguf_repos",
     "owner/name"),
    ('[models.internist-7b]\nshape = { layers = 32, kv_heads = 8 }\n', "internist-7b", "shape",
     "layers, kv_heads, head_dim"),
    ('[models.internist-7b]\nshape = { layers = 32, kv_heads = 8, head_dim = 0 }\n',
     "internist-7b", "shape", "positive integers"),
    ('[models.internist-7b]\nshape = { layers = 32, kv_heads = 8, head_dim = 128, heads = 32 }\n',
     "internist-7b", "shape", "positive integers"),
])
def test_broken_user_file_names_file_entry_and_field(tmp_path, text, entry, field, fragment):
    user = write_user(tmp_path, text)
    with pytest.raises(RegistryError) as err:
        Registry.load(user=user)
    message = str(err.value)
    assert str(user) in message and fragment in message
    assert err.value.entry == entry and err.value.field == field
    if entry:
        assert f"entry '{entry}'" in message
    if field:
        assert f"field '{field}'" in message


def test_cli_reports_a_broken_registry_in_one_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "config"
    config.mkdir()
    (config / "models.toml").write_text('[models.internist-7b]\ncontext_length = "4k"\n')
    monkeypatch.setenv("LOCALMED_CONFIG_DIR", str(config))
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "models.toml" in err and "internist-7b" in err and "context_length" in err


def test_models_command_shows_local_quants(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "internist-7b.Q4_K_M.gguf").write_bytes(b"")
    (models / "internist-7b.Q8_0.gguf").write_bytes(b"")
    assert cli.main(["models", "--dir", str(models), "--json"]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(SEED_MODELS) <= set(rows)
    assert rows["internist-7b"]["local_quants"] == ["Q4_K_M", "Q8_0"]
    assert rows["meditron-7b"]["local_quants"] == []
    assert cli.main(["models", "--dir", str(models)]) == 0
    table = capsys.readouterr().out
    assert "internist-7b" in table and "Q4_K_M*" in table
