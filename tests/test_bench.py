"""`localmed bench` on tiny real GGUFs and limited subsets of ../shared/benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localmed import cli
from tests.test_bad_inputs import interruptible
from tests.tiny_models import SHARED

BENCH = SHARED / "benchmarks"
LIMIT = "16"
SPEED_KEYS = {"peak_rss_bytes", "prefill_tps", "decode_tps"}


def bench_args(models: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", str(models), "--data", str(BENCH / "medqa.jsonl"),
            "--data", str(BENCH / "pubmedqa.jsonl"), "--limit", LIMIT,
            "--text", str(BENCH / "pubmedqa_train.jsonl"), "--text-docs", "2",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def bench_run(bench_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results"
    assert cli.main(bench_args(bench_models, out)) == 0
    return out, json.loads((out / "results.json").read_text())


def runs_by(results, quant):
    return [r for r in results["runs"] if r["quant"] == quant]


def test_reference_against_itself_is_exactly_zero(bench_run):
    _, results = bench_run
    assert results["reference"] == "F16"
    for run in runs_by(results, "F16"):
        assert run["n"] == int(LIMIT)
        assert run["delta"] == 0 and run["delta_ci"] == [0.0, 0.0]
        assert run["agreement"] == 1.0 and run["option_kld"] == 0.0
        assert run["mcnemar_p"] == 1.0
        assert run["text_kld"] == 0.0 and run["text_top1"] == 1.0


def test_kld_grows_as_bits_shrink(bench_run):
    _, results = bench_run

    def mean(quant, key):
        values = [r[key] for r in runs_by(results, quant)]
        return sum(values) / len(values)

    option = [mean(q, "option_kld") for q in ("Q8_0", "Q4_K_M", "Q2_K")]
    text = [mean(q, "text_kld") for q in ("Q8_0", "Q4_K_M", "Q2_K")]
    assert 0 < option[0] < option[1] < option[2], option
    assert 0 < text[0] < text[1] < text[2], text
    assert mean("Q8_0", "agreement") >= mean("Q2_K", "agreement")


def test_results_have_the_documented_shape(bench_run, bench_models):
    _, results = bench_run
    assert results["model"] == "tiny-llama"
    keys = {"quant", "suite", "n", "accuracy", "accuracy_ci", "delta", "delta_ci", "mcnemar_p",
            "agreement", "option_kld", "text_kld", "text_ppl", "file_bytes", "peak_rss_bytes",
            "prefill_tps", "decode_tps"}
    assert {(r["quant"], r["suite"]) for r in results["runs"]} == {
        (q, s) for q in ("F16", "Q8_0", "Q4_K_M", "Q2_K") for s in ("medqa", "pubmedqa")}
    for run in results["runs"]:
        assert keys <= set(run)
        lo, hi = run["accuracy_ci"]
        assert lo <= run["accuracy"] <= hi
        assert run["file_bytes"] == os.path.getsize(
            bench_models / f"llama.{run['quant']}.gguf")
        assert run["decode_tps"] > 0 and run["prefill_tps"] > 0 and run["peak_rss_bytes"] > 0
        assert run["text_ppl"] > 1


def test_outputs_are_written(bench_run):
    out, results = bench_run
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("quant,suite,n,accuracy,accuracy_ci_low")
    assert len(csv_lines) == 1 + len(results["runs"])
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pubmedqa_has_three_options_and_five_work_too(bench_models, tmp_path):
    rows = [json.loads(line) for line in (BENCH / "medqa.jsonl").read_text().splitlines()[:6]]
    for row in rows:
        row["options"]["E"] = "None of the above"
    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = cli.main(["bench", str(bench_models), "--data", str(data), "--quants", "Q8_0",
                     "--text-docs", "0", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["suite"] for r in results["runs"]} == {"five"}
    records = (out / "records" / "Q8_0" / "five.jsonl").read_text().splitlines()
    assert all(len(json.loads(line)["probs"]) == 5 for line in records)


def test_few_shot_examples_are_not_scored(bench_models, tmp_path):
    out = tmp_path / "out"
    code = cli.main(["bench", str(bench_models), "--data", str(BENCH / "medqa.jsonl"),
                     "--limit", "5", "--shots", "2", "--quants", "Q8_0", "--text-docs", "0",
                     "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in
               (out / "records" / "F16" / "medqa.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [2, 3, 4, 5, 6]


def test_interrupted_run_resumes_to_the_same_result(bench_models, bench_run, tmp_path):
    _, expected = bench_run
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "localmed", *bench_args(bench_models, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=interruptible)
    partial = out / "records" / "Q8_0" / "medqa.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_file() and partial.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert not (out / "results.json").exists()
    assert cli.main(bench_args(bench_models, out)) == 0
    got = json.loads((out / "results.json").read_text())
    strip = lambda runs: [{k: v for k, v in r.items() if k not in SPEED_KEYS} for r in runs]  # noqa: E731
    assert strip(got["runs"]) == strip(expected["runs"])


def test_rerun_with_other_settings_is_refused(bench_models, bench_run, capsys):
    out, _ = bench_run
    code = cli.main(bench_args(bench_models, out, "--shots", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "other settings (shots)" in err


class TestBadInput:
    def run(self, capsys, *args):
        code = cli.main(["bench", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    def test_malformed_line_names_file_and_line(self, bench_models, tmp_path, capsys):
        data = tmp_path / "bad.jsonl"
        good = (BENCH / "medqa.jsonl").read_text().splitlines()[:2]
        data.write_text("\n".join([*good, '{"question": "x", "options": ']) + "\n")
        err = self.run(capsys, str(bench_models), "--data", str(data), "--out",
                       str(tmp_path / "o"))
        assert f"{data}:3" in err and "not valid JSON" in err

    def test_answer_letter_not_among_the_options(self, bench_models, tmp_path, capsys):
        data = tmp_path / "bad.jsonl"
        data.write_text(json.dumps({"question": "q", "options": {"A": "x", "B": "y"},
                                    "answer_idx": "C"}) + "\n")
        err = self.run(capsys, str(bench_models), "--data", str(data), "--out",
                       str(tmp_path / "o"))
        assert f"{data}:1" in err and "'C' is not one of the option letters" in err

    def test_option_letters_out_of_order(self, bench_models, tmp_path, capsys):
        data = tmp_path / "bad.jsonl"
        data.write_text(json.dumps({"question": "q", "options": {"a": "x", "b": "y"},
                                    "answer_idx": "a"}) + "\n")
        err = self.run(capsys, str(bench_models), "--data", str(data), "--out",
                       str(tmp_path / "o"))
        assert "option letters must be A, B" in err

    def test_unknown_suite(self, bench_models, tmp_path, capsys):
        err = self.run(capsys, str(bench_models), "--suites", "usmle_step9", "--out",
                       str(tmp_path / "o"))
        assert "unknown suite" in err and "medqa" in err

    def test_suite_missing_says_where_to_put_it_and_how_to_get_it(self, bench_models, tmp_path,
                                                                  capsys):
        # bench never downloads (online or not): the file's place and the command that fetches.
        err = self.run(capsys, str(bench_models), "--suites", "medqa", "--out",
                       str(tmp_path / "o"))
        assert "medqa.jsonl" in err and "localmed data pull medqa" in err

    def test_missing_reference_says_how_to_make_it(self, bench_models, tmp_path, capsys):
        err = self.run(capsys, str(bench_models), "--reference", "Q6_K", "--data",
                       str(BENCH / "medqa.jsonl"), "--out", str(tmp_path / "o"))
        assert "no Q6_K file" in err and "localmed quantize" in err
