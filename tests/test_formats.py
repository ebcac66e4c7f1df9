"""One registry of model formats, one provenance schema, every input file hashed."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import pytest

from localmed import cli, formats
from localmed.errors import GGUFFileError, GPTQFolderError, ModelFileError
from localmed.formats.gguf import GGUFInfo
from localmed.planner import GIB, Hardware
from localmed.provenance import CHECKPOINT_FILES, Provenance

PROVENANCE_FIELDS = {f.name for f in dataclasses.fields(Provenance)} - {"calibration"}


class TestRegistry:
    def test_a_gguf_is_described_by_its_format(self, converted):
        path = converted["llama"]["Q4_K_M"]
        assert formats.format_of(path).name == "gguf"
        info = formats.describe(path)
        assert isinstance(info, GGUFInfo) and info.format == "gguf"
        assert info.quant == "Q4_K_M" and info.n_tensors > 0

    def test_a_file_is_recognised_by_its_magic_without_the_suffix(self, converted, tmp_path):
        renamed = tmp_path / "model.bin"
        renamed.symlink_to(converted["llama"]["Q8_0"])
        assert formats.describe(renamed).quant == "Q8_0"

    def test_a_checkpoint_folder_is_not_a_runnable_model(self, checkpoints):
        with pytest.raises(ModelFileError, match=r"not a model localmed can run .*a \.gguf file "
                           r"or a GPTQ checkpoint folder"):
            formats.describe(checkpoints["llama"])

    def test_a_folder_named_like_a_gguf_is_called_a_folder(self, tmp_path):
        (tmp_path / "x.gguf").mkdir()
        with pytest.raises(GGUFFileError, match="is a folder"):
            formats.describe(tmp_path / "x.gguf")

    def test_models_in_a_folder_skip_other_files(self, converted, tmp_path):
        (tmp_path / "a.Q8_0.gguf").symlink_to(converted["llama"]["Q8_0"])
        (tmp_path / "notes.txt").write_text("not a model")
        (tmp_path / ".hidden.gguf.123.part").write_bytes(b"")
        assert [i.quant for i in formats.models_in(tmp_path)] == ["Q8_0"]

    def test_plan_for_a_gguf(self, converted):
        info, plan = formats.plan(converted["llama"]["Q8_0"],
                                  hardware=Hardware("cpu", 16 * GIB, 12 * GIB))
        assert plan.fits and plan.label == "CPU" and info.quant == "Q8_0"


class TestGPTQFolders:
    @pytest.fixture
    def gptq_folder(self, checkpoints, tmp_path) -> Path:
        """A GPTQ-shaped folder (config with quantization_config, safetensors) without GPTQModel:
        detection, info and footprint never load weights."""
        folder = tmp_path / "m-GPTQ-4bit-g128"
        shutil.copytree(checkpoints["llama"], folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    def test_described_with_its_own_info_type(self, gptq_folder):
        from localmed.formats.gptq import GPTQInfo

        info = formats.describe(gptq_folder)
        assert isinstance(info, GPTQInfo) and info.format == "gptq"
        assert (info.quant, info.bits, info.group_size) == ("GPTQ-4bit", 4, 128)
        assert info.chat_template and info.block_count == 2

    def test_planned_from_its_safetensors(self, gptq_folder):
        _, plan = formats.plan(gptq_folder, hardware=Hardware("cpu", 16 * GIB, 12 * GIB))
        assert plan.fits and plan.label == "CPU"
        assert plan.reasons[0] == "transformers on CPU (GPTQ kernels)"
        assert plan.ram_needed > sum(p.stat().st_size for p in gptq_folder.glob("*.safetensors"))

    def test_a_damaged_folder_gets_its_own_error(self, gptq_folder):
        for weights in gptq_folder.glob("*.safetensors"):
            weights.unlink()
        with pytest.raises(GPTQFolderError, match=r"no \*\.safetensors weights"):
            formats.describe(gptq_folder)
        (gptq_folder / "tokenizer_config.json").write_bytes(b"\xff\xfe not json")
        with pytest.raises(GPTQFolderError, match=r"cannot read tokenizer_config\.json"):
            formats.describe(gptq_folder)

    def test_info_and_plan_commands_take_a_gptq_folder(self, gptq_folder, capsys):
        assert cli.main(["info", str(gptq_folder)]) == 0
        out = capsys.readouterr().out
        assert "gptq" in out and "GPTQ-4bit" in out
        assert cli.main(["info", str(gptq_folder), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["format"] == "gptq"


class TestProvenance:
    def test_gguf_metadata_and_manifest_hold_the_same_record(self, converted):
        from localmed.formats.gguf_header import read_header

        path = converted["llama"]["Q4_K_M"]
        from_gguf = Provenance.from_gguf(read_header(path).fields)
        manifest = json.loads(path.with_name(path.name.replace(".gguf", ".manifest.json"))
                              .read_text())
        assert from_gguf == Provenance.from_manifest(manifest)
        assert PROVENANCE_FIELDS <= set(manifest)
        assert from_gguf.quant == "Q4_K_M"

    def test_round_trip_through_gguf_keys(self):
        record = Provenance(source="epfl-llm/meditron-7b", revision="abc", quant="Q4_K_M",
                            model_id="meditron-7b", advisory="Research only.",
                            inputs_sha256={"a.safetensors": "0" * 64},
                            calibration={"file": "x.jsonl", "sha256": "1" * 64, "texts": 3})
        keys = record.to_gguf()
        assert all(k.startswith("localmed.") for k in keys)
        assert Provenance.from_gguf(keys) == record
        assert Provenance.from_manifest(record.to_manifest()) == record
        assert Provenance.from_gguf({"general.name": "x"}) is None

    def test_every_file_the_converter_reads_is_hashed(self, checkpoints, tmp_path):
        from localmed.provenance import sha256_file
        from localmed.quantize.pipeline import resolve_source, run_quantize
        from localmed.quants import parse_quant_list
        from localmed.registry import Registry

        folder = tmp_path / "with-extras"
        shutil.copytree(checkpoints["llama"], folder)
        template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
        (folder / "added_tokens.json").write_text("{}")
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
        outputs = run_quantize(resolve_source(str(folder), Registry.load()),
                               parse_quant_list("F16"), tmp_path / "out")
        manifest = json.loads(outputs[0].manifest.read_text())
        present = {name for name in CHECKPOINT_FILES if (folder / name).is_file()}
        assert {"chat_template.json", "added_tokens.json", "generation_config.json"} <= present
        hashed = manifest["inputs_sha256"]
        assert present | {"model.safetensors"} == set(hashed)
        assert all(hashed[name] == sha256_file(folder / name) for name in hashed)
        reader = gguf.GGUFReader(outputs[0].path)
        field = reader.fields["localmed.inputs_sha256"]
        assert json.loads(field.contents()) == hashed
