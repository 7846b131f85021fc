"""Trace text back to the training documents that contain it verbatim, through the release's trace index.

The index (`trace_index.py` builds it and describes its files) needs nothing
but the release's tokenizer at query time.

Why these choices:

- A plain suffix array answers every question we ask (does this span occur,
  how often, where) with two binary searches, and needs nothing but the tokens
  beside it. At 4 bytes per token (5 past 4G tokens) it stays under the
  6-bytes-per-token budget; an FM-index would be smaller but far slower to
  query from Python, a suffix tree or automaton far larger.
- Query-time comparisons are `bytes < bytes` on slices of an `mmap` of the
  big-endian tokens, i.e. memcmp in C, so a binary search costs about a
  microsecond a step. The bucket table (one int64 per vocabulary entry) skips
  the first log2(vocab) steps of every search.
- Tracing needs, for every start i of the query, the longest match L(i); the
  maximal spans are the starts where i + L(i) grows. All starts bisect their
  first 4 tokens (2 with a uint32 vocabulary) together in numpy, so most of a
  novel text is settled in one vectorised pass; only starts whose first tokens
  occur go on to a memcmp bisection, inside an already narrow range; and a
  start that matches to the end of the query settles all later ones, so a
  passage copied from the data costs one search.
- Documents never straddle: every document ends with `<|endoftext|>`, and a
  query is cut at any `<|endoftext|>` it contains, so no matched span can
  include one, and so no span can cross from one document into the next.
- Everything is memory-mapped at query time; `np.load` never unpickles.

Matching is on whole tokens, as the model saw its data: a span must start and
end on the token boundaries the training tokenization had. `contains` also
tries the text with a leading space, since the byte-level BPE glues a word to
the space before it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from glassforge.core.errors import UserError
from glassforge.core.hashing import sha256_file
from glassforge.core.runfolder import Release, resolve_release
from glassforge.release.trace_search import DOC_SCAN_LIMIT, TraceIndex, open_index

__all__ = ["TraceIndex", "Tracer", "open_tracer", "trace_command", "contains_command"]
from glassforge.tokenizer.bpe import load_tokenizer

SNIPPET_CONTEXT = 24  # tokens each side of the span


class Tracer:
    """Trace text against a release's trace index, tokenized with the release's tokenizer.

    Thread-safe for concurrent queries (read-only maps; the tokenizer is reentrant).
    """

    def __init__(self, trace_dir: Path | str):
        trace_dir = Path(trace_dir)
        self.index = open_index(trace_dir)
        self.tokenizer = load_tokenizer(trace_dir.parent)
        want = self.index.meta.get("tokenizer_sha256")
        tokenizer_json = Release(trace_dir.parent).tokenizer_json
        if want and sha256_file(tokenizer_json) != want:
            raise UserError(f"{trace_dir}: the trace index was built with another tokenizer than {tokenizer_json}")

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False) if len(ids) else ""

    def _snippet(self, doc: int, pos: int, length: int, context: int = SNIPPET_CONTEXT) -> dict:
        a, b = self.index.doc_span(doc)
        s, e = max(a, pos - context), min(b, pos + length + context)
        toks = self.index.token_slice
        before, match, after = (self._decode(toks(s, pos)), self._decode(toks(pos, pos + length)),
                                self._decode(toks(pos + length, e)))
        lead, tail = ("…" if s > a else ""), ("…" if e < b else "")
        return {"snippet": f"{lead}{before}«{match}»{after}{tail}",
                "snippet_parts": [lead + before, match, after + tail],
                "token_offset": pos - a}

    def _documents(self, found: list[tuple[int, int, int]], length: int) -> list[dict]:
        out = []
        for doc, n_occ, pos in found:
            row = self.index.document(doc)
            out.append({"id": row.get("id"), "source": row.get("source"), "license": row.get("license"),
                        "sha256": row.get("sha256"), "occurrences": n_occ, **self._snippet(doc, pos, length)})
        return out

    def _encode(self, text: str):
        if not isinstance(text, str) or not text:
            raise UserError("the text is empty")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def trace(self, text: str, min_tokens: int = 8, max_docs: int = 5) -> dict:
        """Maximal spans of text (at least min_tokens tokens) found verbatim in the training data.

        Spans come longest first, then rarest; each gives char offsets [start, end) into text, its
        token count, the number of occurrences in the training stream and up to max_docs documents
        (those holding it most often) with a snippet where «the span» is marked.
        """
        if min_tokens < 1:
            raise UserError(f"min_tokens must be at least 1, not {min_tokens}")
        if max_docs < 0:
            raise UserError(f"max_docs must be at least 0, not {max_docs}")
        t0 = time.perf_counter()
        if not isinstance(text, str):
            raise UserError("the text must be a string")
        # An empty text (an empty completion, say) has no spans; it is not an error.
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        spans = self.index.trace_ids(ids, min_tokens=min_tokens, max_docs=max_docs)
        covered = np.zeros(len(ids), dtype=bool)
        for s in spans:
            i, j = s["token_start"], s["token_end"]
            covered[i:j] = True
            s["start"], s["end"] = offsets[i][0], offsets[j - 1][1]
            s["text"] = text[s["start"]:s["end"]]
            s["documents"] = self._documents(s["documents"], j - i)
        ordered = [{k: s[k] for k in ("start", "end", "text", "tokens", "token_start", "token_end", "occurrences",
                                      "document_count", "documents_exact", "documents")} for s in spans]
        return {
            "tokens": len(ids),
            "min_tokens": min_tokens,
            "spans": ordered,
            "covered_tokens": int(covered.sum()),
            "index": {"tokens": self.index.n, "documents": self.index.n_docs},
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 3),
        }

    def contains(self, text: str, max_docs: int = 10) -> dict:
        """Exact membership: how often text occurs in the training stream, and in which documents.

        Matching is on whole tokens; the text is also tried with a leading space (the tokenizer
        joins a word to the space before it, so mid-sentence occurrences tokenize that way). The
        two forms start with different tokens, so their occurrences never overlap and add up.
        """
        t0 = time.perf_counter()
        enc = self._encode(text)
        forms = [enc.ids]
        if not text[0].isspace():
            forms.append(self.tokenizer.encode(" " + text, add_special_tokens=False).ids)
        total, exact, merged = 0, True, {}
        for ids in forms:
            if self.index.eot_id in ids:
                continue
            count, occ = self.index.span_occurrences(ids, DOC_SCAN_LIMIT)
            total += count
            exact = exact and occ["documents_exact"]
            if count:
                for doc, n_occ, pos in occ["documents"]:
                    if doc in merged:
                        merged[doc][1] += n_occ
                    else:
                        merged[doc] = [doc, n_occ, pos, len(ids)]
        ranked = sorted(merged.values(), key=lambda r: (-r[1], r[0]))
        docs = []
        for doc, n_occ, pos, length in ranked[:max_docs]:
            docs.extend(self._documents([(doc, n_occ, pos)], length))
        return {
            "text": text,
            "tokens": len(enc.ids),
            "count": total,
            "document_count": len(merged),
            "documents_exact": exact,
            "documents": docs,
            "index": {"tokens": self.index.n, "documents": self.index.n_docs},
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 3),
        }


# --------------------------------------------------------------------------------------------- CLI


def open_tracer(run: Path | str) -> Tracer:
    """The Tracer of a run folder's release, or of a release folder."""
    release = Release(resolve_release(run))
    if not release.trace_index.is_file():
        raise UserError(f"{release.root}: the release has no trace index (trace/index.json); "
                        f"rebuild it with `glassforge release`")
    return Tracer(release.trace)


def _short(text: str, limit: int = 240) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_trace(result: dict) -> str:
    idx = result["index"]
    where = f"the training data ({_plural(idx['tokens'], 'token')}, {_plural(idx['documents'], 'document')})"
    if not result["spans"]:
        return (f"No span of {result['min_tokens']} or more tokens of this text "
                f"({_plural(result['tokens'], 'token')}) occurs verbatim in {where}.")
    pct = 100 * result["covered_tokens"] / max(1, result["tokens"])
    n = len(result["spans"])
    lines = [f"{_plural(n, 'span')} of at least {result['min_tokens']} tokens occur{'s' if n == 1 else ''} verbatim in "
             f"{where}, covering {pct:.0f}% of the text's {result['tokens']} tokens.", ""]
    for k, s in enumerate(result["spans"], 1):
        ndoc = f"{s['document_count']:,}{'' if s['documents_exact'] else '+'} document" \
               f"{'' if s['document_count'] == 1 else 's'}"
        lines.append(f"[{k}] characters {s['start']}-{s['end']}, {s['tokens']} tokens, "
                     f"{_plural(s['occurrences'], 'occurrence')} in {ndoc}")
        lines.append(f"    \"{_short(s['text'])}\"")
        lines += _format_docs(s["documents"])
        lines.append("")
    return "\n".join(lines).rstrip()


def _format_docs(docs: list[dict]) -> list[str]:
    lines = []
    for d in docs:
        lines.append(f"    - {d['id']}  licence {d['license']}  sha256 {str(d['sha256'])[:16]}…  "
                     f"({_plural(d['occurrences'], 'time')})")
        if d.get("source"):
            lines.append(f"      {d['source']}")
        lines.append(f"      {_short(d['snippet'], 300)}")
    return lines


def format_contains(result: dict) -> str:
    idx = result["index"]
    if not result["count"]:
        return (f"Not found: the text ({_plural(result['tokens'], 'token')}) does not occur verbatim in the training "
                f"data ({_plural(idx['tokens'], 'token')}, {_plural(idx['documents'], 'document')}).")
    more = "" if result["documents_exact"] else "+"
    lines = [f"Found {_plural(result['count'], 'time')} in {result['document_count']:,}{more} training "
             f"document{'' if result['document_count'] == 1 else 's'}"
             f"{' (showing ' + str(len(result['documents'])) + ')' if len(result['documents']) < result['document_count'] else ''}:"]
    lines += _format_docs(result["documents"])
    return "\n".join(lines)


def trace_command(run: Path | str, text: str, as_json: bool = False, min_tokens: int = 8) -> int:
    """`glassforge trace`: print the spans of text found in the training data. Exit 0 (also when none)."""
    result = open_tracer(run).trace(text, min_tokens=min_tokens)
    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_trace(result))
    return 0


def contains_command(run: Path | str, text: str, as_json: bool = False) -> int:
    """`glassforge contains`: exit 0 when the text occurs in the training data, 1 when not (like grep)."""
    result = open_tracer(run).contains(text)
    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_contains(result))
    return 0 if result["count"] else 1


