"""Token shards: the training stream on disk, every token traceable to its document.

After the tokenizer exists, every kept document is tokenized and written, with
`<|endoftext|>` after each, into one flat file per split: `data/train.bin` and
`data/val.bin` (uint16 while the vocabulary fits, uint32 above). Beside each,
`*.offsets.npy` holds the start of every document in the stream (n + 1
entries), and `shards.json` names the documents in stream order, so token N
maps back to its document by a binary search.

The training stream follows `data/order.txt`, the seeded, weighted order the
data stage wrote (a document of a source with weight 2 appears twice);
validation documents follow `documents.jsonl`. `shards.json` records the
tokenizer's sha256, the seed and the order file's sha256.

Tokenizing is most of this stage's time. ASCII documents go through
`FastAsciiEncoder` (the same ids as `tokenizers`, checked at the start of
every run), the rest through `tokenizers`' `encode_batch_fast`.

Memory stays bounded whatever the corpus size: documents are tokenized once,
streaming, in `documents.jsonl` order into a temporary token file (with each
document's offset); the training stream is then gathered from it in
`order.txt` order through a memory map.

The data manifest gets each document's `tokens` and the tokenizer's hash when
the build does not fingerprint `manifest.json` as the data stage's output
(rewriting it would otherwise make the build re-run every stage); otherwise
they live here, in `shards.json` ("tokens_per_document", "tokenizer_sha256").

Files are memory-mapped by readers; `np.load` never unpickles (allow_pickle=False).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glassforge.errors import UserError
from glassforge.runfolder import AtomicFile, Run, atomic_write_json, sha256_file


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class FastAsciiEncoder:
    """Byte-level BPE for ASCII documents, several times faster than `tokenizers`' own pipeline, same ids.

    For ASCII text, the byte-level pre-tokenizer's GPT-2 pattern (letters are
    [A-Za-z], numbers [0-9] there) runs with Python's `re`, each piece is mapped
    to the byte-level alphabet and BPE-encoded by the tokenizer's own model
    (`tok.model.tokenize`), and pieces are cached, so a frequent word costs a
    dict lookup. Used only when the tokenizer is exactly the shape glassforge
    trains (no normalizer, ByteLevel without prefix space, plain BPE) and only
    for ASCII documents free of special-token strings; anything else goes
    through `tokenizers`. `run_shards` also checks the first documents against
    `tokenizers` and falls back for the whole run on any difference.
    """

    PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
    MAX_CACHE = 1 << 20

    def __init__(self, tok):
        spec = json.loads(tok.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if (spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
                or not pre.get("use_regex", True) or model.get("type") != "BPE" or model.get("dropout")
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
                or model.get("byte_fallback")):
            raise ValueError("not a plain byte-level BPE tokenizer")
        self.model = tok.model
        self.table = str.maketrans({chr(b): c for b, c in _bytes_to_unicode().items()})
        self.specials = [t["content"] for t in spec.get("added_tokens", [])]
        self.cache: dict[str, list[int]] = {}

    def usable(self, text: str) -> bool:
        return text.isascii() and not any(sp in text for sp in self.specials)

    def encode(self, text: str) -> list[int]:
        cache, out = self.cache, []
        if len(cache) > self.MAX_CACHE:
            cache.clear()
        for piece in self.PATTERN.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = [t.id for t in self.model.tokenize(piece.translate(self.table))]
            out += ids
        return out


def _manifest_is_data_output(run: Run) -> bool:
    try:
        from glassforge.build import STAGES

        data_stage = next(s for s in STAGES if s.name == "data")
        return any(p.name == "manifest.json" for p in data_stage.outputs(run))
    except Exception:  # no build module, or an unexpected layout: never rewrite the manifest
        return True


def run_shards(run: Run) -> dict:
    from glassforge.data import iter_documents
    from glassforge.tokenizer import ENDOFTEXT, load_tokenizer

    recipe = run.load_recipe()
    if not (run.data / "documents.jsonl").is_file() or not (run.data / "order.txt").is_file():
        raise UserError(f"{run.root}: no data (documents.jsonl, order.txt); run `glassforge data {run.root}` first")
    tok = load_tokenizer(run.tokenizer)
    eot = tok.token_to_id(ENDOFTEXT)
    dtype = np.dtype(token_dtype(tok.get_vocab_size()))
    tokenizer_sha = sha256_file(run.tokenizer / "tokenizer.json")
    order_sha = sha256_file(run.data / "order.txt")
    info: dict = {"dtype": dtype.name, "tokenizer_sha256": tokenizer_sha, "seed": recipe.seed,
                  "order_sha256": order_sha}

    # encode_batch_fast skips character offsets we never use (about 1.4x faster); older tokenizers lack it.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    try:
        fast: FastAsciiEncoder | None = FastAsciiEncoder(tok)
    except ValueError:
        fast = None
    verified = [0]  # fast results compared with tokenizers' so far
    # Pass 1: tokenize every kept document once, in documents.jsonl order, into a temporary file.
    tmp_path = run.data / ".tokens_by_document.tmp"
    index: dict[str, int] = {}  # id -> position in documents.jsonl
    starts = [0]
    nbytes: list[int] = []
    val_positions: list[int] = []
    try:
        with open(tmp_path, "wb") as tmp:
            chunk: list[dict] = []

            def flush():
                nonlocal fast
                results: list = [None] * len(chunk)
                if fast is not None:
                    for i, d in enumerate(chunk):
                        if fast.usable(d["text"]):
                            results[i] = fast.encode(d["text"])
                    if verified[0] < 64:  # the first 64 fast results must equal tokenizers' own
                        check = [i for i, r in enumerate(results) if r is not None][:64 - verified[0]]
                        encs = encode([chunk[i]["text"] for i in check], add_special_tokens=False)
                        if any(results[i] != enc.ids for i, enc in zip(check, encs)):
                            fast, results = None, [None] * len(chunk)
                        verified[0] += len(check)
                rest = [i for i, r in enumerate(results) if r is None]
                if rest:
                    for i, enc in zip(rest, encode([chunk[i]["text"] for i in rest], add_special_tokens=False)):
                        results[i] = enc.ids
                for ids in results:
                    ids.append(eot)
                    tmp.write(np.asarray(ids, dtype=dtype).tobytes())
                    starts.append(starts[-1] + len(ids))
                chunk.clear()

            bar = tqdm(desc="tokenize", unit="doc", leave=False, mininterval=1.0)
            size = 0
            for doc in iter_documents(run):
                pos = len(nbytes)
                if doc["id"] in index:
                    raise UserError(f"{run.data / 'documents.jsonl'}: id '{doc['id']}' appears twice; "
                                    f"run `glassforge data {run.root}` again")
                index[doc["id"]] = pos
                nbytes.append(len(doc["text"].encode("utf-8")))
                if doc["split"] == "val":
                    val_positions.append(pos)
                chunk.append(doc)
                size += nbytes[-1]
                if len(chunk) >= 1024 or size >= (4 << 20):
                    bar.update(len(chunk))
                    flush()
                    size = 0
            if chunk:
                flush()
            bar.close()
        starts_arr = np.asarray(starts, dtype=np.int64)
        lengths = np.diff(starts_arr)
        all_tokens = np.memmap(tmp_path, dtype=dtype, mode="r") if starts[-1] else np.empty(0, dtype=dtype)

        order = (run.data / "order.txt").read_text(encoding="utf-8").splitlines()
        unknown = [d for d in order if d not in index]
        if unknown:
            raise UserError(f"{run.data / 'order.txt'}: names '{unknown[0]}', not a kept document; "
                            f"run `glassforge data {run.root}` again")
        ids_of = {pos: doc_id for doc_id, pos in index.items()}
        # Pass 2: gather each split's stream from the temporary file.
        for split, positions in (("train", [index[d] for d in order]), ("val", val_positions)):
            ids = [ids_of[p] for p in positions]
            positions = np.asarray(positions, dtype=np.int64)
            offsets = np.zeros(len(positions) + 1, dtype=np.int64)
            if len(positions):
                np.cumsum(lengths[positions], out=offsets[1:])
            with AtomicFile(run.data / f"{split}.bin") as f:
                for p in positions.tolist():
                    f.write(memoryview(all_tokens[starts[p]:starts[p + 1]]))
            with AtomicFile(run.data / f"{split}.offsets.npy") as f:
                np.save(f, offsets, allow_pickle=False)
            info[split] = {"documents": list(ids), "tokens": int(offsets[-1]),
                           "bytes": int(sum(nbytes[p] for p in positions.tolist()))}
        del all_tokens
    finally:
        tmp_path.unlink(missing_ok=True)
    if info["train"]["tokens"] == 0:
        raise UserError("data: the training split is empty")
    tokens_per_document = {doc_id: int(lengths[pos]) - 1 for doc_id, pos in index.items()}
    if _manifest_is_data_output(run):
        info["tokens_per_document"] = tokens_per_document
    else:
        _annotate_manifest(run, tokens_per_document, tokenizer_sha)
    atomic_write_json(run.data / "shards.json", info)
    return {"train_tokens": info["train"]["tokens"], "val_tokens": info["val"]["tokens"]}


def _annotate_manifest(run: Run, tokens: dict[str, int], tokenizer_sha: str) -> None:
    """Add tokens per document and the tokenizer's hash to data/manifest.json (atomically)."""
    from glassforge.data import _manifest_head, _write_manifest_file, iter_manifest_documents

    head = json.loads(_manifest_head(run))
    head["tokenizer_sha256"] = tokenizer_sha

    def lines():
        for d in iter_manifest_documents(run):
            if d["id"] in tokens and d.get("status") == "kept":
                d["tokens"] = tokens[d["id"]]
            yield json.dumps(d, sort_keys=True, ensure_ascii=False)

    _write_manifest_file(run.data / "manifest.json", head, lines())


def document_tokens(run: Run) -> dict[str, int]:
    """Tokens (without the separator) of every kept document, from the manifest or shards.json."""
    info = json.loads((run.data / "shards.json").read_text()) if (run.data / "shards.json").is_file() else {}
    if "tokens_per_document" in info:
        return info["tokens_per_document"]
    from glassforge.data import iter_manifest_documents

    return {d["id"]: d["tokens"] for d in iter_manifest_documents(run) if d.get("tokens") is not None}


class TokenStream:
    """A memory-mapped split: tokens, document offsets and ids."""

    def __init__(self, data_dir: Path, split: str):
        info_path = Path(data_dir) / "shards.json"
        if not info_path.is_file():
            raise UserError(f"{data_dir}: no token shards; run the data and tokenizer stages first")
        info = json.loads(info_path.read_text())
        self.tokens = np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(info["dtype"]), mode="r")
        self.offsets = np.load(Path(data_dir) / f"{split}.offsets.npy", allow_pickle=False)
        self.doc_ids: list[str] = info[split]["documents"]
        # Bytes of text per token, to turn a loss in nats per token into bits per byte.
        self.bytes_per_token = info[split]["bytes"] / max(1, info[split]["tokens"])

    def __len__(self) -> int:
        return len(self.tokens)

    def document_of(self, token_index: int) -> int:
        """Index (into doc_ids) of the document that holds stream position token_index."""
        if not 0 <= token_index < len(self.tokens):
            raise IndexError(token_index)
        return int(np.searchsorted(self.offsets, token_index, side="right") - 1)
