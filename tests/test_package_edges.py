"""The layering of ctssl's packages, read from the source with ``ast`` (nothing is imported).

``ctssl_base`` is the bottom everyone shares; ``ssl_core`` (the methods) and ``data_prep`` (the data
layer) build on it only; ``ray_jobs`` (the distributed entry points) may use them all. At module level
(imports run when a module is imported: top level, and inside a module-level ``if``/``try``/``with``)
ctssl_base imports neither Ray nor torch, and data_prep neither Ray, torch nor ssl_core: importing the
data layer stays cheap and does not need a GPU stack. Imports inside functions may reach further, but
never up the layering: the package graph, all imports counted, has no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

OURS = ("ctssl_base", "data_prep", "ssl_core", "ray_jobs")

#: our packages each may import at module level (itself always allowed)
ALLOWED = {
    "ctssl_base": set(),
    "ssl_core": {"ctssl_base"},
    "data_prep": {"ctssl_base"},
    "ray_jobs": {"ctssl_base", "data_prep", "ssl_core"},
}
#: third-party packages each must not import at module level
FORBIDDEN_THIRD_PARTY = {
    "ctssl_base": {"ray", "torch"},
    "data_prep": {"ray", "torch"},
}


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """The absolute module names an import statement names (``from x import y`` also names ``x.y``:
    ``from ctssl_base import storage`` is an import of ``ctssl_base``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: resolve against the module's package
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        base = parts[: len(parts) - node.level]
        return [".".join([*base, node.module] if node.module else base)]
    return [node.module or ""]


def _imports(tree: ast.Module, path: Path) -> Iterator[tuple[ast.stmt, str, bool]]:
    """(statement, module name, at module level) for every import in the module."""

    def walk(nodes: list[ast.AST], top: bool) -> Iterator[tuple[ast.stmt, str, bool]]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                for name in _imported(node, path):
                    yield node, name, top
            else:
                # a function's body runs when it is called; anything else (if/try/with bodies, except
                # handlers, class bodies) runs when the module is imported
                inner = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from walk(list(ast.iter_child_nodes(node)), inner)

    yield from walk(list(tree.body), True)


def _where(path: Path, node: ast.stmt) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}"


def _all_imports() -> Iterator[tuple[str, Path, ast.stmt, str, bool]]:
    for package in OURS:
        for path in _modules(package):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node, name, top in _imports(tree, path):
                yield package, path, node, name, top


def test_each_package_imports_only_the_packages_below_it_at_module_level():
    bad = []
    for package, path, node, name, top in _all_imports():
        if not top:
            continue
        root = name.split(".")[0]
        if root in OURS and root != package and root not in ALLOWED[package]:
            bad.append(f"{_where(path, node)}  ({package} must not import {root} at module level)")
        if root in FORBIDDEN_THIRD_PARTY.get(package, ()):
            bad.append(f"{_where(path, node)}  ({package} must not import {root} at module level; "
                       f"import it inside the function that needs it)")
    assert not bad, "module-level imports that break the layering:\n" + "\n".join(bad)


def test_the_package_graph_has_no_cycle_counting_imports_inside_functions():
    edges: dict[str, dict[str, str]] = {p: {} for p in OURS}  # package -> {imported package: first site}
    for package, path, node, name, _top in _all_imports():
        root = name.split(".")[0]
        if root in OURS and root != package:
            edges[package].setdefault(root, _where(path, node))

    def cycle_from(start: str, node: str, seen: list[str]) -> list[str] | None:
        for nxt in edges[node]:
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    for package in OURS:
        cycle = cycle_from(package, package, [package])
        assert cycle is None, "package import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(
            edges[a][b] for a, b in zip(cycle, cycle[1:], strict=False))


def test_the_layers_below_ray_jobs_never_import_the_layers_above_them():
    """Stricter than no cycle: ssl_core uses neither data_prep nor ray_jobs, data_prep not ray_jobs,
    and ctssl_base none of them, not even inside a function."""
    never = {"ctssl_base": {"data_prep", "ssl_core", "ray_jobs"}, "ssl_core": {"data_prep", "ray_jobs"},
             "data_prep": {"ray_jobs"}}
    bad = [f"{_where(path, node)}  ({package} must not import {name.split('.')[0]})"
           for package, path, node, name, _top in _all_imports()
           if name.split(".")[0] in never.get(package, ())]
    assert not bad, "imports up the layering:\n" + "\n".join(bad)


def test_the_data_layer_never_imports_torch_or_the_model_code():
    """Not even inside a function: a strategy that needs an encoder (embedding reduction) gets it
    handed in by its caller, so data_prep runs without a GPU stack."""
    bad = [_where(path, node) for package, path, node, name, _top in _all_imports()
           if package == "data_prep" and name.split(".")[0] in {"torch", "ssl_core", "timm"}]
    assert not bad, "the data layer imports torch or ssl_core:\n" + "\n".join(bad)


def test_the_rules_see_module_level_imports_inside_if_and_try_but_not_in_functions():
    src = ("import os\nif True:\n    import ray\ntry:\n    from torch import nn\nexcept ImportError:\n"
           "    import numpy\nclass A:\n    def f(self):\n        import ssl_core\n"
           "def g():\n    from . import shards\n")
    path = REPO / "data_prep" / "_example.py"  # only for naming; never written
    found = [(name, top) for _node, name, top in _imports(ast.parse(src), path)]
    assert found == [("os", True), ("ray", True), ("torch", True), ("numpy", True), ("ssl_core", False),
                     ("data_prep", False)]


def test_the_report_reads_trials_through_the_shared_record_not_the_fine_tuning_code():
    """ray_jobs.finetune writes trials and may call the report (a study summarises itself at the end);
    ray_jobs.report reads them back through ray_jobs.trial_record only, so the two never import each
    other both ways."""
    bad = []
    for path in _modules("ray_jobs"):
        if path.relative_to(REPO).parts[:2] != ("ray_jobs", "report"):
            continue
        for node, name, _top in _imports(ast.parse(path.read_text(), filename=str(path)), path):
            if name == "ray_jobs.finetune" or name.startswith("ray_jobs.finetune."):
                bad.append(_where(path, node))
    assert not bad, "the report imports the fine-tuning code:\n" + "\n".join(bad)
