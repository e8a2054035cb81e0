"""The layering of DESIGN.md, read from the source: imports run down the layer table only, no module imports
the package root, and there are no import cycles (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the layer table, top to bottom: a module may import its own layer and the layers above it
LAYERS = [
    ("edgelm.errors", "edgelm.files", "edgelm.values", "edgelm.progress", "edgelm._version"),
    ("edgelm.model",),
    ("edgelm.checkpoint", "edgelm.tokenizer"),
    ("edgelm.formats",),
    ("edgelm.quant",),
    ("edgelm.training",),
    ("edgelm.importer",),
    ("edgelm.export",),
    ("edgelm.runtimes",),
    ("edgelm.generation",),
    ("edgelm.evaluation",),
    (
        "edgelm.serve",
        "edgelm.serve_guard",
        "edgelm.serve_requests",
        "edgelm.serve_slots",
        "edgelm.info",
        "edgelm.cli",
        "edgelm.__main__",
    ),
]
SOURCES = {"edgelm": ROOT / "edgelm", "edgelm.export": ROOT / "export", "edgelm.runtimes": ROOT / "runtimes"}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (export/ and runtimes/ as installed)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            if package == "edgelm" and relative.parts[0] in ("export", "runtimes"):
                continue  # the symlinks to ../export and ../runtimes
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> int:
    if module == "edgelm":  # the package root gathers the public API from every layer
        return len(LAYERS)
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of the table")


def imports(path: Path, known: set[str]) -> set[str]:
    """The edgelm modules a file imports, anywhere in it (`from edgelm.x import y` counts y if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("edgelm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgelm"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def test_imports_run_down_the_layer_table() -> None:
    wrong = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in graph().items()
        for target in targets
        if target != "edgelm" and layer(target) > layer(module)
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_package_root() -> None:
    offenders = [module for module, targets in graph().items() if "edgelm" in targets]
    assert not offenders


def test_no_import_cycles() -> None:
    edges = {m: {t for t in ts if t != m and t != "edgelm"} for m, ts in graph().items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("edgelm", ("torch", "onnxruntime", "llama_cpp")),
        ("edgelm.export.gguf", ("torch",)),
        ("edgelm.importer", ("torch", "onnxruntime", "llama_cpp")),
        ("edgelm.training.train", ("onnxruntime", "llama_cpp", "edgelm.runtimes.torch")),
    ],
)
def test_imports_stay_light(module: str, forbidden: tuple[str, ...]) -> None:
    """What importing a module pulls in, in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert loaded.stdout.split() == []


def test_every_package_is_installed() -> None:
    """pyproject.toml lists the packages a wheel holds: each folder of the source is among them."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'"(edgelm(?:\.\w+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    folders = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert folders == listed
