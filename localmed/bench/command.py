"""``localmed bench MODEL``: find the quants, load the suites, run, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from localmed import formats, library, paths
from localmed.bench.report import aggregate, tables, write_outputs
from localmed.bench.runner import (
    BenchConfig,
    Records,
    check_settings,
    remaining_work,
    run_bench,
)
from localmed.bench.suites import KNOWN_SUITES, Suite, load_suite, resolve_suite
from localmed.documents import read_documents
from localmed.errors import LocalmedError, SuiteError, UnknownModelError
from localmed.formats.info import ModelInfo
from localmed.planner import MIN_CTX
from localmed.quants import get_quant
from localmed.registry import ModelEntry, Registry
from localmed.rpc.workers import INSECURE, spec
from localmed.runtimes.base import ScoringRuntime
from localmed.runtimes.speculation import speculating


@dataclass(frozen=True)
class BenchModel:
    label: str
    files: dict[str, Path]
    entry: ModelEntry | None
    hint: str
    """How to make a missing quant."""


def find_model_files(spec: str, registry: Registry) -> BenchModel:
    """A registry id (its models in the models folder) or a folder of models, by quant."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        infos = formats.models_in(folder)
        files = _by_label(infos)
        entry = next((registry[i.model_id] for i in infos if i.model_id in registry), None)
        return BenchModel(folder.name, files, entry,
                          "localmed quantize SOURCE --quant QUANT --out " + str(folder))
    models = library.models_dir()
    infos = formats.models_in(models, lambda p: library.belongs_to(p, spec)) \
        if models.is_dir() else []
    if spec not in registry:  # a model `localmed pull` placed under its own id
        if not infos:
            raise UnknownModelError(spec, registry)
        return BenchModel(spec, _by_label(infos), None, "localmed pull REPO:QUANT")
    return BenchModel(spec, _by_label(infos), registry[spec],
                      f"localmed quantize {spec} --quant QUANT")


def _by_label(infos: list[ModelInfo]) -> dict[str, Path]:
    """Files by their bench row (``Q3_K_M``, ``Q3_K_M+imatrix``); a second file with the same
    label is named by its file name."""
    files: dict[str, Path] = {}
    for info in infos:
        label = info.label if info.label not in files else info.path.name
        files[label] = info.path
    return files


def resolve_label(name: str, files: dict[str, Path]) -> str:
    """``--quants``/``--reference`` names: a row label as shown, or a quant name
    (``q3_k_m`` finds ``Q3_K_M``, or ``Q3_K_M+imatrix`` when that is the only one)."""
    if name in files:
        return name
    quant = get_quant(name.removesuffix("+imatrix")).name
    label = quant + ("+imatrix" if name.endswith("+imatrix") else "")
    if label not in files and f"{quant}+imatrix" in files and not name.endswith("+imatrix"):
        return f"{quant}+imatrix"
    return label


def select_quants(model: BenchModel, wanted: list[str] | None, reference: str) -> dict[str, Path]:
    names = [resolve_label(q, model.files) for q in wanted] if wanted else list(model.files)
    if reference not in names:
        names.insert(0, reference)
    missing = [q for q in names if q not in model.files]
    if missing:
        have = ", ".join(model.files) or "none"
        raise LocalmedError(
            f"{model.label}: no {', '.join(missing)} file (have: {have}); make it with: "
            + model.hint.replace("QUANT", ",".join(missing))
            + ("" if reference not in missing else "  (or pick another --reference)"))
    return {q: model.files[q] for q in names}


def load_texts(path: Path | None, suites: list[Suite], count: int) -> list[str]:
    """Medical documents for perplexity/KLD: --text, else PubMedQA abstracts when available."""
    if count <= 0:
        return []
    if path is None:
        pubmed = next((s for s in suites if s.name == "pubmedqa"), None)
        default = paths.data_dir() / "benchmarks" / "pubmedqa.jsonl"
        if pubmed is not None:
            return [q.question for q in pubmed.questions[:count]]
        if not default.is_file():
            return []
        path = default
    if not path.is_file():
        raise SuiteError(path, "no such file")
    docs = read_documents(path)
    return docs[:count]


def model_loader(threads: int | None, speculation: bool = False,
                 draft: Path | None = None, rpc: object = None) -> object:
    """Loads each quant with the Runtime its format calls for, at most at its trained context."""
    def load(quant: str, path: Path, n_ctx: int) -> ScoringRuntime:
        trained = formats.describe(path).context_length or n_ctx
        return formats.load_runtime(path, formats.LoadOptions(n_ctx=min(n_ctx, trained),
                                                              threads=threads,
                                                              speculation=speculation,
                                                              draft=draft, rpc=rpc))

    return load


def run(args: object, console: Console, err: Console) -> int:
    registry = Registry.load()
    model = find_model_files(args.model, registry)
    reference = resolve_label(args.reference, model.files)
    wanted = [q for q in args.quants.split(",") if q.strip()] if args.quants else None
    files = select_quants(model, wanted, reference)

    # The first --shots questions of each set are its worked examples and are never scored.
    limit = args.limit + args.shots if args.limit is not None else None
    loaded: list[Suite] = [load_suite(Path(path), limit=limit) for path in args.data or []]
    names = [s.strip() for s in args.suites.split(",") if s.strip()] if args.suites else \
        ([] if args.data else list(KNOWN_SUITES))
    loaded += [resolve_suite(name, limit=limit) for name in names]
    suites: list[Suite] = []
    shot_examples = {}
    for suite in loaded:
        if len(suite.questions) <= args.shots:
            raise SuiteError(suite.path, f"--shots {args.shots} leaves no question to score")
        shot_examples[suite.name] = tuple(suite.questions[: args.shots])
        suites.append(Suite(suite.name, suite.path, suite.questions[args.shots:]))
    texts = load_texts(Path(args.text) if args.text else None, suites, args.text_docs)
    out = Path(args.out).expanduser() if args.out else library.bench_dir(model.label)
    config = BenchConfig(model=model.label, files=files, reference=reference, suites=suites,
                         out=out, shots=args.shots, shot_examples=shot_examples,
                         prompt_format=args.prompt_format,
                         texts=texts, n_ctx=args.ctx, entry=model.entry, fresh=args.fresh)
    if args.ctx < MIN_CTX:
        err.print(f"[yellow]note:[/] --ctx {args.ctx} is raised to {MIN_CTX} tokens, "
                  "llama.cpp's minimum")
    if config.prompt_format == "chat" and model.entry is None:
        raise LocalmedError("--prompt-format chat needs a registry model (for its template)")
    check_settings(config)  # before any progress is drawn: a refusal is one line
    workers = spec(args.rpc, args.insecure_rpc, args.rpc_secret)
    if workers is not None and workers.insecure:
        err.print(f"[bold yellow]warning:[/] {INSECURE}", soft_wrap=True)
    loader = model_loader(args.threads, speculating(args.speculation, args.draft), args.draft,
                          workers)
    todo = remaining_work(config, Records(out))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as bar:
        task = bar.add_task("bench", total=todo)
        run_bench(config, loader,
                  lambda what: bar.update(task, advance=1, description=what))
    results = aggregate(config)
    written = write_outputs(results, out)
    for t in tables(results):
        console.print(t)
    if not texts:
        err.print("[yellow]note:[/] no medical text for perplexity/KLD (add --text FILE or the "
                  "pubmedqa suite)")
    for path in written:
        console.print(f"wrote {path}")
    return 0
