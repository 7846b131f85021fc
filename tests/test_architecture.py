"""The package's shape: layers that import one way, no cycles, no private names across modules, short modules.

The layers contract itself is import-linter's (`[tool.importlinter]` in
pyproject.toml), run here as users of the tool run it. The other rules are
checked on the import graph (grimp, import-linter's own graph builder, which
sees imports inside functions too) and on the source.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "glassforge"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_layers_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], capture_output=True, text=True, cwd=PACKAGE.parents[1], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_no_import_cycles_counting_imports_inside_functions():
    import grimp

    graph = grimp.build_graph("glassforge")
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing its own modules is not a cycle of code; there are none of those here either
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("glassforge"):
                offenders += [f"{module_name(path)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def test_top_folder_holds_only_entry_points_and_subpackages():
    files = sorted(p.name for p in PACKAGE.iterdir() if p.is_file())
    assert files == ["__init__.py", "__main__.py", "build.py", "cli.py"]
    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert packages == ["core", "data", "evaluate", "model", "release", "serve", "tokenizer", "tools", "train"]
    for name in packages:
        assert (PACKAGE / name / "__init__.py").is_file(), name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_every_module_says_what_it_does_and_stays_short(path):
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc) >= 20, f"{module_name(path)} has no docstring saying what it does"
    lines = text.count("\n")
    assert lines <= 800, f"{module_name(path)}: {lines} lines"
    if lines > 600:
        assert re.search(r"\b600 lines\b", doc), f"{module_name(path)}: {lines} lines and no word on why"


def test_core_does_not_import_torch():
    import grimp

    graph = grimp.build_graph("glassforge", include_external_packages=True)
    for m in graph.find_descendants("glassforge.core") | {"glassforge.core"}:
        assert "torch" not in graph.find_modules_directly_imported_by(m), m


def test_run_folder_and_release_file_names_are_spelled_only_in_core():
    """Every name of a file of the run folder or the release is named once, in core.runfolder."""
    names = re.compile(r"""["'](?:[\w.-]+/)*(?:manifest|documents|order|shards|state|recipe|config|generation_config|"""
                       r"""tokenizer|tokenizer_config|special_tokens_map|model|optimizer|trainer|metrics|loss|"""
                       r"""sft_loss|eval|summary|attestation|attestation\.dsse|signing_key|data_summary|"""
                       r"""data_lengths|DATA_CARD|README|train|val|index)\.(?:json|jsonl|txt|toml|safetensors|png|md|"""
                       r"""pub|bin|npy)["']""")
    found = []
    for path in MODULES:
        if path == PACKAGE / "core" / "runfolder.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if names.fullmatch(repr(node.value)) or names.fullmatch(f'"{node.value}"'):
                    found.append(f"{module_name(path)}:{node.lineno}: {node.value}")
    assert not found, found
