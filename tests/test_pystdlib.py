from glassforge.data import pystdlib


def test_documents_have_provenance_and_signature():
    docs = {d.name: d for d in pystdlib.iter_documents(["posixpath", "json"])}
    join = docs["posixpath.join"]
    assert join.kind == "function"
    assert join.text.startswith("posixpath.join(a, *p)\n\nJoin two or more pathname components")
    assert join.source == "pystdlib://posixpath.py#posixpath.join"
    assert docs["json"].kind == "module" and "JSON" in docs["json"].docstring
    assert docs["json.decoder.JSONDecoder"].kind == "class"


def test_comments_belong_to_innermost_definition():
    source = '''"""Mod doc."""
# module comment
def outer():
    """Outer doc."""
    # outer comment
    def inner():
        # inner comment
        pass
'''
    docs = {d.name: d for d in pystdlib.parse_module("m", source, "m.py")}
    assert docs["m"].comments == ["module comment"]
    assert docs["m.outer"].comments == ["outer comment"]
    assert docs["m.outer.inner"].comments == ["inner comment"]


def test_tests_are_excluded_and_order_is_stable():
    root = pystdlib.stdlib_root()
    pairs = list(pystdlib.module_files(root))
    files = [m for m, _ in pairs]
    assert not any(m.startswith("test.") or ".test." in m or m.split(".")[-1].startswith("test_") for m in files)
    assert "json.decoder" in files and "test.support" not in files
    # files come in sorted order of their path, whatever order the file system lists them in
    paths = [p.relative_to(root).as_posix() for _, p in pairs]
    assert paths == sorted(paths)
    first = [(d.name, d.text) for d in pystdlib.iter_documents(["json"])]
    assert first == [(d.name, d.text) for d in pystdlib.iter_documents(["json"])] and len(first) > 20
