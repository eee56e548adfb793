"""The package's import structure: every module imports on its own, and no module imports itself back.

An import inside a function is still a dependency (it only delays the cycle to the first call), so the
graph counts every ``import`` of a ``leanlm`` module wherever it stands in the file.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path = SRC) -> dict[str, Path]:
    """``leanlm.x.y`` → its file, for every module under ``src/leanlm`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted((src / "leanlm").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``leanlm`` modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        deps |= {t for t in targets if t in modules and t != name}
    return deps


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_files(src)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles met by a depth-first walk, each as [a, b, ..., a]; empty when the graph is acyclic."""
    cycles, done, path, on_path = [], set(), [], set()

    def visit(node: str) -> None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt)
        path.pop()
        on_path.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b", "c"}}) == []
    # the shape of the old tree's cycles: models.loading -> transforms.compact -> models (in a function)
    found = find_cycles({"m": {"m.loading"}, "m.loading": {"t.compact"}, "t.compact": {"m", "t.base"}, "t.base": set()})
    assert found == [["m", "m.loading", "t.compact", "m"]]
    assert find_cycles({"x": {"x"}}) == [["x", "x"]]


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    pkg = tmp_path / "leanlm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from leanlm.sub import b\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from leanlm.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nimport leanlm.other\n")
    (pkg / "other.py").write_text("import json\n")
    graph = import_graph(tmp_path)
    assert graph == {"leanlm": set(), "leanlm.sub": {"leanlm.sub.b"}, "leanlm.sub.a": {"leanlm.sub.b"},
                     "leanlm.sub.b": {"leanlm.sub.a", "leanlm.other"}, "leanlm.other": set()}
    assert find_cycles(graph) == [["leanlm.sub.b", "leanlm.sub.a", "leanlm.sub.b"]]


def test_leanlm_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


CHILD = textwrap.dedent("""
    import importlib, os, sys, traceback
    # Third-party packages load once, here; no leanlm module is imported in this parent process.
    import numpy, torch, transformers, safetensors.torch, accelerate, tqdm.auto, peft, matplotlib.pyplot
    from transformers.models.llama import modeling_llama
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:  # the child: a fresh leanlm, imports only this module (and what it imports)
            code = 0
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(name)
    print("FAILED", *failed)
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_on_its_own():
    """One child process per module, forked before any leanlm import, so no module rides on another's."""
    names = sorted(module_files())
    done = subprocess.run([sys.executable, "-c", CHILD, *names], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.strip() == "FAILED"
