"""Jinja2 templates for generated documents (model card, data card, HTML report), escaped by default.

Cards and reports are generated from the run, never hand-written, so they
cannot drift from it. Text that comes from a recipe, a document or a model
(descriptions, source names, evaluation task names) is HTML-escaped on the way
in (autoescape): a card rendered on a hub page or a report opened in a browser
cannot be made to carry markup by its inputs. Undefined names are errors, not
empty strings.
"""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path

import jinja2


@cache
def environment(package: str) -> jinja2.Environment:
    """The templates/ folder of a glassforge subpackage, e.g. environment("glassforge.release")."""
    return jinja2.Environment(loader=jinja2.PackageLoader(package, "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(package: str, name: str, **context) -> str:
    return environment(package).get_template(name).render(**context)


def png_data_uri(path: Path) -> str | None:
    """A PNG file as a `data:image/png;base64,...` URI (an image a self-contained page carries inside it),
    or None when it is missing or not a PNG."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
