"""The embedded default corpus: the Python standard library's own documentation.

Every machine with Python has it, it is openly licensed (PSF-2.0), and every
document traces to a file and a qualified name. One document per module, class
and function: its docstring, followed by the comments written inside it (a
comment belongs to the innermost function or class around it). Functions and
classes start with their signature, so the text says what it documents.

Sources are parsed with `ast`, never imported: nothing in the library runs, and
the corpus is the same whatever is importable. Tests are excluded.
"""

from __future__ import annotations

import ast
import io
import re
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LICENSE = "PSF-2.0"
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "lib2to3", "ensurepip"}


@dataclass
class StdlibDoc:
    module: str
    qualname: str  # "" for the module itself
    kind: str  # module | class | function
    signature: str
    docstring: str
    comments: list[str]
    path: str  # relative to the standard library root

    @property
    def source(self) -> str:
        name = f"{self.module}.{self.qualname}" if self.qualname else self.module
        return f"pystdlib://{self.path}#{name}"

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}" if self.qualname else self.module

    @property
    def text(self) -> str:
        head = f"{self.name}{self.signature}" if self.kind == "function" else (
            f"class {self.name}{self.signature}" if self.kind == "class" else f"module {self.name}")
        parts = [head]
        if self.docstring:
            parts.append(self.docstring)
        if self.comments:
            parts.append("\n".join(self.comments))
        return "\n\n".join(parts)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path, modules: list[str] | None = None) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every non-test source file, sorted for determinism."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not parts or parts[0].startswith("_test"):
            continue
        if modules and parts[0] not in modules:
            continue
        yield ".".join(parts), path


def _signature(node: ast.AST) -> str:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        try:
            return f"({ast.unparse(node.args)})"
        except Exception:  # pragma: no cover - unparse handles all valid syntax
            return "(...)"
    if isinstance(node, ast.ClassDef) and node.bases:
        return "(" + ", ".join(ast.unparse(b) for b in node.bases) + ")"
    return ""


def parse_module(module: str, source: str, relpath: str) -> list[StdlibDoc]:
    tree = ast.parse(source)
    docs: list[StdlibDoc] = []
    spans: list[tuple[int, int, StdlibDoc]] = []  # (first line, last line, doc) for comment ownership

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                doc = StdlibDoc(module, qual, kind, _signature(child), ast.get_docstring(child) or "", [], relpath)
                docs.append(doc)
                spans.append((child.lineno, child.end_lineno or child.lineno, doc))
                visit(child, qual + ".")
            elif not isinstance(child, (ast.expr, ast.stmt)) or isinstance(child, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                visit(child, prefix)

    top = StdlibDoc(module, "", "module", "", ast.get_docstring(tree) or "", [], relpath)
    docs.append(top)
    visit(tree, "")
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            if not text or text.startswith(("!", "-*-", "noqa", "type:", "pragma")) or set(text) <= set("-=#*~ "):
                continue
            line = tok.start[0]
            owner = top
            for first, last, doc in spans:  # spans nest in source order; the last match is innermost
                if first <= line <= last:
                    owner = doc
            owner.comments.append(text)
    except (tokenize.TokenError, SyntaxError):
        pass
    return docs


def iter_documents(modules: list[str] | None = None, root: Path | None = None,
                   files: list[tuple[str, Path]] | None = None) -> Iterator[StdlibDoc]:
    """Every documented module, class and function (of `files`, (module, path) pairs from
    `module_files`, when given), in a fixed order."""
    root = root or stdlib_root()
    for module, path in (files if files is not None else module_files(root, modules)):
        try:
            source = path.read_text(encoding="utf-8")
            parsed = parse_module(module, source, path.relative_to(root).as_posix())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for doc in parsed:
            if doc.docstring or doc.comments:
                yield doc


# --------------------------------------------------------------------------- reading documents back


def first_paragraph(text: str, limit: int = 400) -> str:
    para = text.strip().split("\n\n")[0]
    para = re.sub(r"\s*\n\s*", " ", para).strip()
    if len(para) > limit:
        cut = para[:limit].rsplit(". ", 1)[0]
        para = cut if cut.endswith(".") else cut.rstrip() + "..."
        if not para.endswith((".", "...")):
            para += "."
    return para


def parse_doc(text: str) -> tuple[str, str, str, str] | None:
    """(kind, name, signature, docstring) from a pystdlib document's text."""
    head, _, rest = text.partition("\n\n")
    if head.startswith("module "):
        return "module", head[7:].strip(), "", rest
    if head.startswith("class "):
        m = re.match(r"class ([\w.]+)(\(.*\))?$", head)
        return ("class", m.group(1), m.group(2) or "", rest) if m else None
    m = re.match(r"([\w.]+)(\(.*\))$", head, re.S)
    return ("function", m.group(1), m.group(2), rest) if m else None

