"""Token shards: the training stream on disk, every token traceable to its document.

After the tokenizer exists, every kept document is tokenized and written, with
`<|endoftext|>` after each, into one flat file per split: `data/train.bin` and
`data/val.bin` (uint16 while the vocabulary fits, uint32 above). Beside each,
`*.offsets.npy` holds the start of every document in the stream (n + 1
entries), and `shards.json` names the documents in stream order, so token N
maps back to its document by a binary search. Training documents are shuffled
with the recipe's seed; the order is written to `data/order.txt`, whose hash
the manifest and attestation record.

Files are memory-mapped by readers; `np.load` never unpickles (allow_pickle=False).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glassforge.errors import UserError
from glassforge.runfolder import AtomicFile, Run, atomic_write_json, atomic_write_text, sha256_file


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def run_shards(run: Run) -> dict:
    from glassforge.data import iter_documents
    from glassforge.tokenizer import ENDOFTEXT, load_tokenizer

    recipe = run.load_recipe()
    tok = load_tokenizer(run.tokenizer)
    eot = tok.token_to_id(ENDOFTEXT)
    dtype = token_dtype(tok.get_vocab_size())
    info = {"dtype": np.dtype(dtype).name, "tokenizer_sha256": sha256_file(run.tokenizer / "tokenizer.json"),
            "seed": recipe.seed}
    for split in ("train", "val"):
        docs = list(iter_documents(run, split))
        if split == "train":
            random.Random(recipe.seed).shuffle(docs)
            atomic_write_text(run.data / "order.txt", "".join(d["id"] + "\n" for d in docs))
            info["order_sha256"] = sha256_file(run.data / "order.txt")
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        with AtomicFile(run.data / f"{split}.bin") as f:
            batch = 512
            for start in tqdm(range(0, len(docs), batch), desc=f"tokenize {split}", unit="batch", leave=False):
                chunk = docs[start:start + batch]
                encs = tok.encode_batch([d["text"] for d in chunk], add_special_tokens=False)
                for j, enc in enumerate(encs):
                    ids = np.asarray(enc.ids + [eot], dtype=dtype)
                    f.write(ids.tobytes())
                    offsets[start + j + 1] = offsets[start + j] + len(ids)
        with AtomicFile(run.data / f"{split}.offsets.npy") as f:
            np.save(f, offsets, allow_pickle=False)
        info[split] = {"documents": [d["id"] for d in docs], "tokens": int(offsets[-1]),
                       "bytes": sum(len(d["text"].encode("utf-8")) for d in docs)}
    if info["train"]["tokens"] == 0:
        raise UserError("data: the training split is empty")
    atomic_write_json(run.data / "shards.json", info)
    return {"train_tokens": info["train"]["tokens"], "val_tokens": info["val"]["tokens"]}


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
