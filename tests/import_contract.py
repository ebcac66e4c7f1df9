"""The import contract, checked statically: which layer may import which, and no cycles.

Every ``import`` statement of every module is read with :mod:`ast`, function-level imports
included (the sys.modules check this replaces could not see those). A module belongs to the layer
whose most specific prefix names it; a layer may import itself and the layers below it, never one
above. Some third-party packages belong to some layers only (:data:`OWNED_PACKAGES`): llama.cpp,
transformers, torch and GPTQModel to the backends, Textual to the app, rich to the app and the
entry points (what is drawn on a screen).

The directions are written down once, here, in :data:`LAYERS` (top to bottom).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Entry points: argument parsing and printing; they may reach anything below.
    ("entry", ("localmed.cli", "localmed.__main__")),
    # Applications: the Textual app, bench, the server, export.
    ("app", ("localmed.tui", "localmed.bench", "localmed.serve", "localmed.export")),
    # Core: what a chat session is, the registry of model formats, the demo model, and the
    # engine processes that hold a runtime (one sequence) or the multi-sequence engine, and
    # their supervisor.
    # Retrieval over the clinic's documents is core too: chat and serve use it, and it uses the
    # engine for embeddings like any other client.
    ("core", ("localmed.chat", "localmed.conversation", "localmed.formats", "localmed.demo",
              "localmed.runtimes.process", "localmed.runtimes.batch_process",
              "localmed.runtimes.engine_loop", "localmed.runtimes.hub",
              "localmed.runtimes.slot_runtime", "localmed.runtimes.supervisor",
              "localmed.retrieval")),
    # Backends: what holds llama.cpp, transformers or GPTQModel: converters and quantizers, the
    # runtimes, and what this machine's llama.cpp can do.
    ("backends", ("localmed.quantize", "localmed.runtimes")),
    # Base: plain data and shared helpers every layer uses; imports nothing above it. The Runtime
    # interface and the header readers of the formats are base: the backends use them too.
    ("base", ("localmed", "localmed.runtimes.base", "localmed.formats.info",
              "localmed.formats.gguf_header", "localmed.formats.gguf", "localmed.formats.gptq",
              "localmed.formats.safetensors")),
)

OWNED_PACKAGES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama_cpp", "transformers", "torch", "gptqmodel", "optimum",
                     "sentencepiece"), ("backends",)),
    "textual": ("app",),
    "textual_serve": ("app",),
    "rich": ("entry", "app"),
}
"""Third-party packages that only some layers may import: backends stay swappable (and can move
into their own process), the core never depends on the UI, and long work reports progress
through :mod:`localmed.progress` rather than drawing it."""


@dataclass
class Violation:
    module: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}: {self.why}"


@dataclass
class ImportGraph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """Module → (imported module or package, line)."""


def source_packages(root: Path) -> dict[str, str]:
    """Source folder → installed package, as pyproject.toml's ``package-dir`` maps them (the
    top-level folders ``quantize/`` and ``tui/`` install as ``localmed.quantize`` and
    ``localmed.tui``)."""
    with (root / "pyproject.toml").open("rb") as fh:
        mapping = tomllib.load(fh)["tool"]["setuptools"]["package-dir"]
    return {folder: package for package, folder in mapping.items()}


def module_name(folder: Path, package: str, path: Path) -> str:
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_graph(root: Path, packages: Mapping[str, str]) -> ImportGraph:
    """Every import of every module under ``root/<folder>`` (installed as ``packages[folder]``),
    resolved to absolute names."""
    graph = ImportGraph()
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            graph.modules[module_name(root / folder, package, path)] = path
    for name, path in graph.modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found: list[tuple[str, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node.module, node.level)
                found.append((base, node.lineno))
                # ``from pkg import module`` imports the module too.
                found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names
                          if f"{base}.{alias.name}" in graph.modules]
        graph.edges[name] = found
    return graph


def _absolute(module: str, is_package: bool, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def layer_of(module: str, layers: Sequence[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    """Index of the layer with the longest prefix naming ``module``; None for third party."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def check(graph: ImportGraph, layers: Sequence[tuple[str, tuple[str, ...]]] = LAYERS,
          owned: Mapping[str, tuple[str, ...]] = OWNED_PACKAGES) -> list[Violation]:
    """Wrong-way imports, owned packages imported outside their layer, and cycles."""
    names = [name for name, _ in layers]
    violations: list[Violation] = []
    internal: dict[str, set[str]] = {m: set() for m in graph.modules}
    for module, imports in graph.edges.items():
        own = layer_of(module, layers)
        for imported, line in imports:
            top = imported.split(".")[0]
            if top in owned and (own is None or names[own] not in owned[top]):
                where = names[own] if own is not None else "no layer"
                allowed = " and ".join(f"'{name}'" for name in owned[top])
                layer_word = "layer" if len(owned[top]) == 1 else "layers"
                violations.append(Violation(module, line, imported,
                                            f"{top} belongs to the {allowed} {layer_word} only, "
                                            f"and {module} is in '{where}'"))
                continue
            target = _internal_target(imported, graph.modules)
            if target is None or target == module:
                continue
            internal[module].add(target)
            theirs = layer_of(target, layers)
            if own is not None and theirs is not None and theirs < own:
                violations.append(Violation(module, line, imported,
                                            f"'{names[own]}' may not import '{names[theirs]}' "
                                            f"(allowed: {' → '.join(names)})"))
    for cycle in cycles(internal):
        violations.append(Violation(cycle[0], 0, cycle[1],
                                    "import cycle: " + " → ".join([*cycle, cycle[0]])))
    return violations


def _internal_target(imported: str, modules: Mapping[str, Path]) -> str | None:
    """The project module an import names (the longest known prefix), or None."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found
