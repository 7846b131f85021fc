"""`glassforge data inspect`: a document, the document behind a training token, or a training step's documents.

It reads the run folder the way training did: the manifest for a document's
provenance, the token shards and their offsets for a token's document, and the
trainer's own data order for a step's windows, so what it shows is what the
model saw.
"""

from __future__ import annotations

from glassforge.core.errors import UserError
from glassforge.core.runfolder import Run
from glassforge.data.documents import find_document, find_entry
from glassforge.tokenizer.bpe import load_tokenizer
from glassforge.tokenizer.shards import TokenStream
from glassforge.train.order import DataOrder, Windows


def _describe(entry: dict | None, doc_id: str) -> list[str]:
    if entry is None:
        return [f"document {doc_id}: not in the manifest"]
    lines = [f"document {entry['id']}"] + ([f"  name     {entry['name']}"] if entry.get("name") else []) + [
             f"  source   {entry['source']}", f"  licence  {entry['license']}",
             f"  sha256   {entry['sha256']}", f"  bytes    {entry['bytes']}", f"  status   {entry['status']}"
             + (f" ({entry['split']})" if entry.get("split") else f": {entry.get('reason')}")]
    for key in ("duplicate_of", "similarity", "contaminated_by", "detail", "repeats", "tokens"):
        if entry.get(key) is not None:
            lines.append(f"  {key:<8} {entry[key]}")
    return lines


def inspect(run: Run, doc: str | None = None, token: int | None = None, step: int | None = None) -> str:
    """`glassforge data inspect`: a document, the document of a training token, or a training step's documents."""
    if sum(x is not None for x in (doc, token, step)) != 1:
        raise UserError("data inspect: give exactly one of --doc ID (or name), --token N, --step S")
    if not run.data_manifest.is_file():
        raise UserError(f"{run.root}: no data yet; run `glassforge data {run.root}` first")
    if doc is not None:
        entry = find_entry(run, doc)
        if entry is None:
            raise UserError(f"--doc {doc}: no such document in {run.manifest_entries}")
        lines = _describe(entry, doc)
        found = find_document(run, entry["id"]) if entry["status"] == "kept" else None
        if found is not None:
            lines += ["", found["text"]]
        return "\n".join(lines)

    stream = TokenStream(run, "train")
    if token is not None:
        if not 0 <= token < len(stream):
            raise UserError(f"--token {token}: the training stream has {len(stream)} tokens (0..{len(stream) - 1})")
        i = stream.document_of(token)
        doc_id = stream.doc_ids[i]
        start, end = int(stream.offsets[i]), int(stream.offsets[i + 1])
        lines = [f"token {token} is token {token - start} of {end - start} (separator included) "
                 f"of stream document #{i}"]
        try:
            tok = load_tokenizer(run.tokenizer)
            piece = tok.decode([int(stream.tokens[token])], skip_special_tokens=False)
            ctx = tok.decode([int(t) for t in stream.tokens[max(start, token - 16):min(end, token + 17)]],
                             skip_special_tokens=False)
            lines += [f"token id {int(stream.tokens[token])} = {piece!r}", f"context: {ctx!r}"]
        except UserError:
            pass
        lines += [""] + _describe(find_entry(run, doc_id), doc_id)
        found = find_document(run, doc_id)
        if found is not None:
            lines += ["", found["text"]]
        return "\n".join(lines)

    recipe = run.load_recipe()
    seq_len = recipe.pretrain.seq_len
    windows = Windows(stream, seq_len)
    per_step = max(1, recipe.pretrain.batch_tokens // seq_len)
    if step < 1:
        raise UserError(f"--step {step}: steps count from 1 (as in metrics.jsonl)")
    idx = DataOrder(len(windows), per_step, recipe.seed).global_batch(step - 1)
    touched: dict[int, int] = {}
    for w in idx.tolist():
        lo, hi = w * seq_len, w * seq_len + seq_len + 1
        first, last = stream.document_of(lo), stream.document_of(min(hi, len(stream)) - 1)
        for d in range(first, last + 1):
            a = max(lo, int(stream.offsets[d]))
            b = min(hi, int(stream.offsets[d + 1]))
            touched[d] = touched.get(d, 0) + max(0, b - a)
    lines = [f"step {step}: {len(idx)} windows of {seq_len + 1} tokens (seed {recipe.seed}), "
             f"{len(touched)} documents:", "  tokens  document"]
    for d, n in sorted(touched.items(), key=lambda t: (-t[1], t[0])):
        lines.append(f"  {n:>6}  {stream.doc_ids[d]}")
    return "\n".join(lines)

