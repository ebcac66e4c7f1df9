"""``localmed bench``: what quantization cost, measured on medical question sets."""

from __future__ import annotations

import argparse

from localmed.cli.common import (
    console,
    err_console,
    non_negative,
    positive,
    rpc_option,
    speculation_option,
)


def cmd_bench(args: argparse.Namespace) -> int:
    from localmed.bench.command import run

    return run(args, console(), err_console())


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this module's commands."""
    p = sub.add_parser("bench", help="accuracy lost to quantization on medical question sets "
                       "(offline)")
    p.add_argument("model", metavar="MODEL", help="registry id (its GGUFs in the models folder) "
                   "or a folder of GGUFs")
    p.add_argument("--quants", help="comma-separated quants to compare (default: all found)")
    p.add_argument("--reference", default="F16", help="what the others are compared with "
                   "(default: F16, so the difference is quantization alone)")
    p.add_argument("--suites", help="comma-separated: medqa, medmcqa, pubmedqa, mmlu_medical "
                   "(default: all four, unless --data is given)")
    p.add_argument("--data", action="append", metavar="FILE.jsonl",
                   help="a custom question set (repeatable), named after the file")
    p.add_argument("--limit", type=positive, help="score only the first N questions of each set")
    p.add_argument("--shots", type=non_negative, default=0, help="worked examples before each "
                   "question (the first K of each set, not scored)")
    p.add_argument("--prompt-format", choices=["plain", "chat"], default="plain",
                   help="plain text (default, right for base models) or the model's template")
    p.add_argument("--text", metavar="FILE", help="medical text for perplexity and full-"
                   "vocabulary KLD (.jsonl with 'question', or .txt with blank-line documents)")
    p.add_argument("--text-docs", type=non_negative, default=8,
                   help="documents of it to use (0: none)")
    p.add_argument("--ctx", type=positive, default=2048, help="context for question prompts")
    p.add_argument("--threads", type=positive, help="CPU threads for llama.cpp")
    speculation_option(p)
    rpc_option(p)
    p.add_argument("--out", "-o", help="results folder (default: the data dir's bench/MODEL); "
                   "rerunning into it with the same settings resumes")
    p.add_argument("--fresh", action="store_true", help="start over in --out, discarding the "
                   "results of an earlier run there")
    p.set_defaults(func=cmd_bench)
