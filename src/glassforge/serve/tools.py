"""Tool calling: what a request's `tools` and `tool_choice` ask of the engine, and the calls read back out.

A call is plain text in the assistant's turn, in the chat template's format
(tokenizer/bpe.py): `<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>`,
one block per call. So:

- `tool_choice` `auto` renders the tools into the prompt and reads whatever
  calls the model writes; `none` renders them and reads none.
- `required` and a named function constrain the reply through llguidance
  (grammar.py) to one or more such blocks (one when `parallel_tool_calls` is
  false or a function is named), the arguments to the tool's JSON schema, in
  the compact spacing the template renders them in.
- `CallParser` reads a reply piece by piece as it streams: text before a
  call is content; a call is announced (index, id, type and name) as soon as
  its name is complete, then its arguments follow as they are generated,
  always as JSON text (OpenAI's shape), never as an object. A `}` that may
  close the call (and the spacing before it) is held back until the next
  piece shows whether it does, and so is the start of what may be
  `<tool_call>`. A block that turns out
  malformed, or names no given tool, before anything of it was sent, is
  content after all.

The Responses API and chat completions read calls through the same parser.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from glassforge.core.errors import UserError
from glassforge.serve.protocol import APIError
from glassforge.tokenizer.bpe import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# after the opening line: `{"name": "...", "arguments": ` with any spacing
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
MAX_HEAD_CHARS = 512  # a head not complete by then is not one


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _literal(text: str) -> str:
    """text as a Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text)


def tool_grammar(schemas: dict[str, dict | None], name: str | None, parallel: bool) -> str:
    """The Lark grammar (llguidance's dialect) of a reply that is only tool calls: of the named function, or of
    any of schemas (function name to its parameters' JSON schema; None: any object), several when parallel."""
    names = [name] if name is not None else list(schemas)
    lines = []
    for i, n in enumerate(names):
        schema = dict(schemas[n] or {"type": "object"})
        schema.setdefault("x-guidance", {"whitespace_flexible": False})
        head = TOOL_CALL_OPEN + '{"name": ' + json.dumps(n) + ', "arguments": '
        lines.append(f"call{i}: {_literal(head)} args{i} {_literal('}' + TOOL_CALL_CLOSE)}")
        lines.append(f"args{i}: %json {json.dumps(schema)}")
    call = " | ".join(f"call{i}" for i in range(len(names)))
    start = f"start: call ({_literal(chr(10))} call)*" if parallel and name is None else "start: call"
    return "\n".join([start, f"call: {call}", *lines]) + "\n"


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Piece:
    """What one piece of a reply adds: content text, and tool-call deltas in OpenAI's stream shape."""

    content: str = ""
    deltas: list[dict] = field(default_factory=list)


def _held_prefix(text: str, marker: str) -> int:
    """The length of text's longest end that begins marker (to hold back until it is known)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class CallParser:
    """One reply's tool calls, read as its text arrives (`feed`, then `finish`); `calls` holds them."""

    def __init__(self, names: set[str]):
        self.names = names
        self.calls: list[Call] = []
        self.buffer = ""
        self.state = "text"  # text | head | arguments | between

    def feed(self, text: str) -> Piece:
        self.buffer += text
        piece = Piece()
        while self._step(piece, final=False):
            pass
        return piece

    def finish(self) -> Piece:
        """What is left when the reply ends: held-back text, or an unfinished block (as content, or as the
        rest of the arguments once its name was sent)."""
        piece = Piece()
        while self._step(piece, final=True):
            pass
        if self.state == "text" or (self.state == "between" and self.buffer.strip()):
            piece.content += self.buffer
        elif self.state == "head":
            piece.content += TOOL_CALL_OPEN + self.buffer
        elif self.state == "arguments" and self.buffer:  # cut short (max_tokens): send what there is
            self._arguments(piece, self.buffer)
        self.buffer, self.state = "", "text"
        return piece

    def _arguments(self, piece: Piece, text: str) -> None:
        call = self.calls[-1]
        if not call.arguments:  # the spacing after `"arguments":` is not the arguments'
            text = text.lstrip()
            if not text:
                return
        call.arguments += text
        piece.deltas.append({"index": len(self.calls) - 1, "function": {"arguments": text}})

    def _step(self, piece: Piece, final: bool) -> bool:
        """Move on as far as the buffer allows; True when the state changed and another step may go on."""
        buf = self.buffer
        if self.state in ("text", "between"):
            if self.state == "between":
                stripped = buf.lstrip()
                if not stripped:
                    return False
                if not TOOL_CALL_OPEN.startswith(stripped[:len(TOOL_CALL_OPEN)]):
                    self.state = "text"
                    return True
                buf = self.buffer = stripped
            at = buf.find(TOOL_CALL_OPEN)
            if at >= 0:
                piece.content += buf[:at]
                self.buffer, self.state = buf[at + len(TOOL_CALL_OPEN):], "head"
                return True
            keep = 0 if final else _held_prefix(buf, TOOL_CALL_OPEN)
            if self.state == "text":
                piece.content += buf[:len(buf) - keep]
                self.buffer = buf[len(buf) - keep:]
            return False
        if self.state == "head":
            m = CALL_HEAD.match(buf)
            name = None
            if m:
                try:
                    name = json.loads(m.group(1))
                except ValueError:
                    name = None
            if m and name in self.names:
                self.calls.append(Call(new_call_id(), name))
                piece.deltas.append({"index": len(self.calls) - 1, "id": self.calls[-1].id, "type": "function",
                                     "function": {"name": name, "arguments": ""}})
                self.buffer, self.state = buf[m.end():], "arguments"
                return True
            if m or final or len(buf) > MAX_HEAD_CHARS or TOOL_CALL_CLOSE in buf:  # not a call of ours
                piece.content += TOOL_CALL_OPEN
                self.state = "text"
                return True
            return False
        # arguments: everything up to the `}` that closes the block, which TOOL_CALL_CLOSE follows
        at = buf.find("}" + TOOL_CALL_CLOSE)
        if at >= 0:
            if buf[:at]:
                self._arguments(piece, buf[:at].rstrip())
            self.buffer, self.state = buf[at + 1 + len(TOOL_CALL_CLOSE):], "between"
            return True
        cut = len(buf) - _held_prefix(buf, "}" + TOOL_CALL_CLOSE)
        while cut > 0 and buf[cut - 1].isspace():  # spacing before the closing `}` is not the arguments'
            cut -= 1
        if cut > 0:
            self._arguments(piece, buf[:cut])
            self.buffer = buf[cut:]
        return False


def parse_calls(text: str, names: set[str]) -> tuple[str, list[Call]]:
    """A whole reply's content and tool calls."""
    parser = CallParser(names)
    content = parser.feed(text).content + parser.finish().content
    return content, parser.calls


@dataclass
class ToolUse:
    """What a request's tools ask for: the tools as the template renders them, their parameters' schemas, and
    how the reply may call them (`choice`: auto, none, required, or the name of the one function to call)."""

    rendered: list[dict]
    schemas: dict[str, dict | None]
    choice: str
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.choice not in ("auto", "none")

    @property
    def parsed(self) -> set[str] | None:
        """The names the reply's calls are read for (None: calls are not read)."""
        return None if self.choice == "none" else set(self.schemas)


def tool_use(functions: list[dict], choice, parallel: bool | None, param: str = "tools",
             rendered: list[dict] | None = None) -> ToolUse | None:
    """The ToolUse of a request's functions (dicts with name, description, parameters) and tool_choice (a mode,
    or a function's name); APIError (400) for a choice naming no given function, or names given twice."""
    if not functions:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' is set but no 'tools' are given", param="tool_choice")
        return None
    schemas: dict[str, dict | None] = {}
    for i, f in enumerate(functions):
        if f["name"] in schemas:
            raise APIError(400, f"'{param}' names the function {f['name']!r} twice", param=f"{param}.{i}")
        schemas[f["name"]] = f.get("parameters")
    mode = choice or "auto"
    if mode not in ("auto", "none", "required") and mode not in schemas:
        raise APIError(400, f"'tool_choice' names the function {mode!r}, which is not among the given tools "
                            f"({', '.join(sorted(schemas))})", param="tool_choice")
    return ToolUse(rendered or functions, schemas, mode, parallel is not False)


def compile_tool_grammar(grammars, use: ToolUse, schema_param: str = "tools.{i}.function.parameters") -> str:
    """The llguidance grammar of a constrained reply; each tool's schema compiled alone first, so a schema
    llguidance cannot use is a 400 naming its tool (schema_param, with {i} its place in the list)."""
    for i, (name, schema) in enumerate(use.schemas.items()):
        try:
            grammars.lark_grammar(tool_grammar({name: schema}, name, False))
        except UserError as e:
            where = schema_param.format(i=i)
            raise APIError(400, f"'{where}' ({name}): {e}", param=where) from None
    name = None if use.choice == "required" else use.choice
    try:
        return grammars.lark_grammar(tool_grammar(use.schemas, name, use.parallel))
    except UserError as e:
        raise APIError(400, f"'tools': {e}", param="tools") from None
