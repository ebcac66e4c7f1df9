"""Aggregate bench records into results: a table, results.json, results.csv and a plot."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from localmed import formats
from localmed.atomic import write_text_atomic
from localmed.bench.runner import BenchConfig, Records
from localmed.bench.scoring import kl_divergence
from localmed.bench.stats import mcnemar_exact, paired_difference, wilson_interval
from localmed.library import RESULTS_FILE, BenchResults, BenchRun


def _text_metrics(records: Records, quant: str) -> dict[str, float | int | None]:
    rows = list(records.read(quant, "text").values())
    tokens = sum(r["tokens"] for r in rows)
    if not tokens:
        return {"text_kld": None, "text_ppl": None, "text_top1": None, "text_tokens": 0}
    return {
        "text_kld": sum(r["kld"] for r in rows) / tokens,
        "text_ppl": math.exp(sum(r["nll"] for r in rows) / tokens),
        "text_top1": sum(r["top1_same"] for r in rows) / tokens,
        "text_tokens": tokens,
    }


def aggregate(config: BenchConfig) -> BenchResults:
    """results.json's content, from the records on disk."""
    records = Records(config.out)
    runs = []
    for quant in config.quants:
        provenance = formats.describe(config.files[quant]).provenance
        imatrix = {"file": provenance.imatrix_file, "sha256": provenance.imatrix_sha256} \
            if provenance and provenance.imatrix_file else None
        speed_path = records.root / quant / "speed.json"
        speed = json.loads(speed_path.read_text()) if speed_path.is_file() else {}
        text = _text_metrics(records, quant)
        for suite in config.suites:
            rows = records.read(quant, suite.name)
            ref_rows = records.read(config.reference, suite.name)
            indices = [q.index for q in suite.questions if q.index in rows and q.index in ref_rows]
            n = len(indices)
            correct = [bool(rows[i]["correct"]) for i in indices]
            ref_correct = [bool(ref_rows[i]["correct"]) for i in indices]
            k = sum(correct)
            delta, delta_ci = paired_difference(ref_correct, correct)
            only_ref = sum(a and not b for a, b in zip(ref_correct, correct, strict=True))
            only_this = sum(b and not a for a, b in zip(ref_correct, correct, strict=True))
            agree = sum(rows[i]["predicted"] == ref_rows[i]["predicted"] for i in indices)
            kld = [kl_divergence(ref_rows[i]["probs"], rows[i]["probs"]) for i in indices]
            card = config.entry.scores.get(suite.name) if config.entry else None
            runs.append(BenchRun(
                quant=quant, suite=suite.name, n=n, imatrix=imatrix,
                accuracy=k / n if n else None,
                accuracy_ci=list(wilson_interval(k, n)) if n else None,
                delta=delta, delta_ci=list(delta_ci),
                mcnemar_p=mcnemar_exact(only_ref, only_this),
                agreement=agree / n if n else None,
                option_kld=sum(kld) / n if n else None,
                **text,
                file_bytes=speed.get("file_bytes"),
                peak_rss_bytes=speed.get("peak_rss_bytes"),
                prefill_tps=speed.get("prefill_tps"),
                decode_tps=speed.get("decode_tps"),
                card_score=card / 100 if card is not None else None,
                complete=n == len(suite.questions),
                truncated=sum(bool(rows[i].get("truncated")) for i in indices),
                made_by=provenance.converter if provenance else None,
            ))
    return BenchResults(config.model, config.reference, config.fingerprint(), runs)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def tables(results: BenchResults) -> list[Table]:
    """Accuracy per quant and suite; then cost and text metrics per quant."""
    acc = Table(title=f"{results.model}: accuracy against {results.reference} "
                "(95% CIs; Δ paired)", title_justify="left")
    for col in ("quant", "suite", "n", "accuracy", "Δ vs ref", "McNemar p", "agree",
                "option KLD", "card"):
        acc.add_column(col, justify="left" if col in ("quant", "suite") else "right",
                       no_wrap=True)
    for r in results.runs:
        ci = r.accuracy_ci or (None, None)
        acc.add_row(
            r.quant, r.suite, str(r.n),
            f"{_fmt(r.accuracy, '.1%')}\n[dim][{_fmt(ci[0], '.1%')}, {_fmt(ci[1], '.1%')}][/]",
            f"{r.delta:+.1%}\n[dim][{r.delta_ci[0]:+.1%}, {r.delta_ci[1]:+.1%}][/]",
            _fmt(r.mcnemar_p, ".3f"), _fmt(r.agreement, ".1%"),
            _fmt(r.option_kld, ".4f"), _fmt(r.card_score, ".1%"))
    cost = Table(title="cost per quant (medical text: full-vocabulary KLD, perplexity, top-1 "
                 "agreement)", title_justify="left")
    for col in ("quant", "size", "peak RAM", "prefill t/s", "decode t/s", "text KLD", "PPL",
                "top-1"):
        cost.add_column(col, justify="left" if col == "quant" else "right", no_wrap=True)
    seen = set()
    for r in results.runs:
        if r.quant in seen:
            continue
        seen.add(r.quant)
        cost.add_row(
            r.quant, _fmt(r.file_bytes and r.file_bytes / 1e9, ".2f") + " GB",
            _fmt(r.peak_rss_bytes and r.peak_rss_bytes / 1e9, ".2f") + " GB",
            _fmt(r.prefill_tps, ".0f"), _fmt(r.decode_tps, ".1f"),
            _fmt(r.text_kld, ".4f"), _fmt(r.text_ppl, ".2f"), _fmt(r.text_top1, ".1%"))
    makers = {r.quant: r.made_by or "not recorded" for r in results.runs}
    if set(makers.values()) != {"localmed"}:  # a pulled (or foreign) file is said to be one
        cost.caption = "made by: " + " · ".join(f"{q} {escape(m)}" for q, m in makers.items())
        cost.caption_justify = "left"
    return [acc, cost]


CSV_FIELDS = ["quant", "suite", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "delta",
              "delta_ci_low", "delta_ci_high", "mcnemar_p", "agreement", "option_kld",
              "text_kld", "text_ppl", "text_top1", "file_bytes", "peak_rss_bytes",
              "prefill_tps", "decode_tps", "card_score", "made_by"]


def write_outputs(results: BenchResults, out: Path) -> list[Path]:
    """results.json, results.csv and results.png in ``out``."""
    json_path, csv_path, png_path = out / RESULTS_FILE, out / "results.csv", out / "results.png"
    write_text_atomic(json_path, results.to_json())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in results.runs:
        row = dataclasses.asdict(r)
        row["accuracy_ci_low"], row["accuracy_ci_high"] = r.accuracy_ci or (None, None)
        row["delta_ci_low"], row["delta_ci_high"] = r.delta_ci
        writer.writerow(row)
    write_text_atomic(csv_path, buffer.getvalue())
    plot(results, png_path)
    return [json_path, csv_path, png_path]


def plot(results: BenchResults, path: Path) -> None:
    """Accuracy (with CI bars) and KLD against file size, one series per suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    suites = sorted({r.suite for r in results.runs})
    for suite in suites:
        rows = sorted((r for r in results.runs if r.suite == suite and r.n),
                      key=lambda r: r.file_bytes or 0)
        sizes = [(r.file_bytes or 0) / 1e9 for r in rows]
        acc = [r.accuracy for r in rows]
        # max(0, …): at 0% or 100% the Wilson bound equals the estimate up to rounding
        err = [[max(0.0, a - r.accuracy_ci[0]) for a, r in zip(acc, rows, strict=True)],
               [max(0.0, r.accuracy_ci[1] - a) for a, r in zip(acc, rows, strict=True)]]
        left.errorbar(sizes, acc, yerr=err, marker="o", capsize=3, label=suite)
        right.plot(sizes, [r.option_kld for r in rows], marker="o", label=f"{suite} options")
        for x, y, r in zip(sizes, acc, rows, strict=True):
            left.annotate(r.quant, (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    text_rows = {r.quant: r for r in results.runs if r.text_kld is not None}
    if text_rows:
        rows = sorted(text_rows.values(), key=lambda r: r.file_bytes or 0)
        right.plot([(r.file_bytes or 0) / 1e9 for r in rows], [r.text_kld for r in rows],
                   marker="s", linestyle="--", color="black", label="medical text (full vocab)")
    left.set(xlabel="file size (GB)", ylabel="accuracy", title="Accuracy, 95% CI")
    right.set(xlabel="file size (GB)", ylabel="mean KL divergence vs reference (nats)",
              title=f"KLD vs {results.reference}")
    right.set_yscale("symlog", linthresh=1e-4)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results.model} — what quantization cost", fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
