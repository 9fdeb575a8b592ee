"""The import graph of the project's packages (model, parallel, train, slurm, tools), read with ``ast``.

- no import cycle between the project's modules: module-level, in-function and ``TYPE_CHECKING`` imports all
  count, relative imports are resolved, and a package's ``__init__`` counts as a module;
- imports of project modules sit at the module top; inside a function only the heavy or optional third-party
  packages of ``LAZY`` may be imported (a lazy import keeps ``--help`` and light tools fast);
- imports follow the design's direction: ``model/`` imports neither DeepSpeed nor ``torch.distributed`` nor
  another project package; ``parallel/`` only ``model``; nothing in model/parallel/train imports ``tools``.

Exceptions are listed in ``ALLOWED``, one line each with the reason; an entry that no longer matches fails.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "parallel", "train", "slurm", "tools")

# Heavy or optional third-party packages that a function may import lazily.
LAZY = frozenset({
    "deepspeed", "transformers", "peft", "bitsandbytes", "flash_attn", "flash_attn_interface", "liger_kernel",
    "datasets", "wandb", "submitit", "matplotlib", "rouge_score", "safetensors", "tokenizers", "torch",
    "huggingface_hub", "pyarrow", "tqdm",
})

# What each package must not import (a name and everything below it).
FORBIDDEN = {
    "model": ("deepspeed", "torch.distributed", "parallel", "train", "slurm", "tools"),
    "parallel": ("train", "slurm", "tools"),
    "train": ("tools",),
}

# Exceptions to every check: (importing module, imported name) -> why. As short as possible; an entry
# that matches no import any more fails. Names are absolute, e.g. ("train.main", "model.args.ModelArgs").
ALLOWED: dict[tuple[str, str], str] = {
    # train/main.py starts in three steps (tests/unit/test_launch_defaults.py checks the modules each loads):
    ("train.main", "train.config.load"): "the recipe is read after argparse has answered --help (no torch)",
    ("train.main", "train.distributed"): "the launcher variables are read after argparse has answered --help",
    ("train.main", "train.session"): "the training stack (DeepSpeed, transformers, data, checkpoints) is imported "
                                     "once the recipe and launcher variables are valid: --help-config and a bad "
                                     "key answer in about a second",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "train.loop.trainer"
    path: str  # its file, relative to the repository root
    line: int
    target: str  # the absolute imported name, e.g. "torch.distributed" or "model.args.ModelArgs"
    in_function: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names; relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: str, is_package: bool) -> None:
        self.module, self.path, self.is_package = module, path, is_package
        self.depth = 0  # > 0 inside a function (lambdas cannot hold imports)
        self.imports: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def _add(self, node: ast.AST, target: str) -> None:
        self.imports.append(Import(self.module, self.path, node.lineno, target, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, self.is_package, node)
        for alias in node.names:
            self._add(node, base if alias.name == "*" else f"{base}.{alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # ``torch.distributed.x`` reached through a plain ``import torch`` counts as importing it
        if isinstance(node.value, ast.Name) and node.value.id == "torch" and node.attr == "distributed":
            self._add(node, "torch.distributed")
        self.generic_visit(node)


@functools.cache
def project() -> tuple[frozenset[str], tuple[Import, ...]]:
    """Every project module and every import statement in them."""
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    modules = frozenset(_module_name(p) for p in files)
    imports: list[Import] = []
    for p in files:
        collector = _Collector(_module_name(p), str(p.relative_to(ROOT)), p.name == "__init__.py")
        collector.visit(ast.parse(p.read_text(), filename=str(p)))
        imports += collector.imports
    return modules, tuple(imports)


def _project_module(target: str, modules: frozenset[str]) -> str | None:
    """The project module an import reaches: the longest prefix of ``target`` that is a module."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _allowed(imp: Import) -> bool:
    return (imp.module, imp.target) in ALLOWED


def graph() -> dict[str, dict[str, Import]]:
    """module -> {imported project module: the first import statement that makes the edge}."""
    modules, imports = project()
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        target = _project_module(imp.target, modules)
        if target and target != imp.module and not _allowed(imp):
            edges[imp.module].setdefault(target, imp)
    return edges


def strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; the components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _cycle_in(component: list[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """One concrete cycle through the component's first module, as 'a -> b (file:line)' steps."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first, inside the component, back to start
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        if start in parent:
            break
        frontier = nxt
    path, v = [start], parent[start]
    while v != start:
        path.append(v)
        v = parent[v]
    path.append(start)
    path.reverse()
    return [f"{a} -> {b} ({edges[a][b].where()})" for a, b in zip(path, path[1:])]


def _by_statement(imports) -> list[str]:
    """One line per import statement: 'path:line module imports name, name'."""
    names: dict[tuple[str, int, str], set[str]] = {}
    for imp in imports:
        names.setdefault((imp.path, imp.line, imp.module), set()).add(imp.target)
    return [f"{path}:{line} {module} imports {', '.join(sorted(targets))}"
            for (path, line, module), targets in sorted(names.items())]


def test_no_import_cycles() -> None:
    edges = graph()
    components = strongly_connected(edges)
    report = [f"cycle among {', '.join(c)}:\n    " + "\n    ".join(_cycle_in(c, edges)) for c in components]
    assert not components, f"{len(components)} import cycle(s):\n" + "\n".join(report)


def test_in_function_imports_are_lazy_third_party_only() -> None:
    _, imports = project()
    bad = _by_statement(imp for imp in imports
                        if imp.in_function and imp.target.split(".")[0] not in LAZY and not _allowed(imp))
    assert not bad, (f"{len(bad)} in-function import statement(s) that belong at the module top (a function "
                     f"may import only {', '.join(sorted(LAZY))}):\n" + "\n".join(bad))


def test_imports_follow_the_design_direction() -> None:
    _, imports = project()
    bad = _by_statement(imp for imp in imports for prefix in FORBIDDEN.get(imp.module.split(".")[0], ())
                        if _within(imp.target, prefix) and not _allowed(imp))
    assert not bad, (f"{len(bad)} import statement(s) against the design's direction (model/ never imports "
                     "deepspeed, torch.distributed or another project package; parallel/ imports only model; "
                     "nothing in model/parallel/train imports tools):\n" + "\n".join(bad))


def test_allowlist_entries_still_match() -> None:
    _, imports = project()
    used = {(imp.module, imp.target) for imp in imports}
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"allow-list entries that match no import any more: {stale}"


# The checks themselves, on a small made-up package tree.
@pytest.fixture
def fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def make(files: dict[str, str]) -> None:
        for rel, text in files.items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
        for pkg in PACKAGES:
            (tmp_path / pkg).mkdir(exist_ok=True)
        monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
        project.cache_clear()
    yield make
    project.cache_clear()


def test_checks_find_what_they_should(fake_tree) -> None:
    fake_tree({
        "model/__init__.py": "from model.a import A\n",
        "model/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from model.b import B\nA = 1\n",
        "model/b.py": "from . import a\ndef f():\n    import json\n    import torch.nn\n"
                      "    from model import c\n",
        "model/c.py": "import torch\nx = torch.distributed.get_rank\n",
        "parallel/__init__.py": "",
        "parallel/p.py": "def g():\n    from ..train import t\n",
        "train/__init__.py": "",
        "train/t.py": "",
    })
    edges = graph()
    assert strongly_connected(edges) == [["model.a", "model.b"]]
    assert _cycle_in(["model.a", "model.b"], edges) == ["model.a -> model.b (model/a.py:3)",
                                                       "model.b -> model.a (model/b.py:1)"]
    _, imports = project()
    lazy_bad = {(i.module, i.target) for i in imports if i.in_function and i.target.split(".")[0] not in LAZY}
    assert lazy_bad == {("model.b", "json"), ("model.b", "model.c"), ("parallel.p", "train.t")}
    direction = {(i.module, i.target) for i in imports for p in FORBIDDEN.get(i.module.split(".")[0], ())
                 if _within(i.target, p)}
    assert direction == {("model.c", "torch.distributed"), ("parallel.p", "train.t")}
