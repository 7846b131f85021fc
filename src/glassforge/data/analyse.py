"""One part's work in the data stage: read, clean, filter, hash, find contamination, sign for near-dedup;
and, once the stage has decided every duplicate, write the part's final entries and kept documents.

This is everything that needs no state across documents, so any worker can do
any part (`data/parts.py`) in any order. A task writes its part's files under
temporary names and renames them into place, the result file last, so a task
killed midway leaves nothing the stage would read, and a retried one replaces,
never duplicates, what the killed one began; a part whose result file records
the same inputs is not done again (an interrupted stage resumes).

Files of part i, in RUN/data/work/ (names in `core.runfolder.PartFiles`):
- `entries.jsonl`: one line per item, in the source's order: name, id,
  source URI, licence, sha256, bytes, the read or filter reason (or null), its
  detail, the evaluation sets it shares an n-gram with;
- `documents.jsonl`: the final `documents.jsonl` line of every item that passed
  the filters, same order (the stage copies those it keeps);
- `arrays.npz`: for those items, their sha256 digests, whether they have a
  word, and their LSH band keys; `signatures.npy` their MinHash signatures
  (memory-mapped by the band tasks, which read only the ones they compare).

After the decisions (`data/stage.py`), `finish_part` turns a part's files and
its documents' verdicts into its final manifest lines and kept document lines
(`final.entries.jsonl`, `kept.documents.jsonl`), with its counters; the stage
concatenates them in part order.

Document ids are content-addressed: `{source name}:{first 24 hex digits of
sha256("{name}\\n{sha256 of the cleaned text}")}`, where the name says where
the item is in its source (`pystdlib:json.dumps`, `files:a/b.jsonl#L7`), so an
id changes exactly when the text or its place does, and anyone can recompute
it from the manifest's name and sha256 fields. Nothing in an id depends on
which worker read it, or when.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glassforge.core.files import AtomicFile, atomic_write_json
from glassforge.core.hashing import canonical_json, sha256_bytes
from glassforge.core.recipe import DataConfig, output_fields_hash
from glassforge.core.runfolder import PartFiles
from glassforge.data.clean import filter_reason, json_string_of_normalized, normalize, split_of, train_repeats
from glassforge.data.dedup import ContaminationIndex, LSHIndex, MinHasher, Words, eval_items
from glassforge.data.parts import Part, iter_part

_BATCH_DOCS = 512
_BATCH_BYTES = 512 << 10


def document_id(source_name: str, name: str, sha256_hex: str | None) -> str:
    """The content address of an item (see the module docstring)."""
    digest = hashlib.sha256(f"{name}\n{sha256_hex or ''}".encode("utf-8")).hexdigest()
    return f"{source_name}:{digest[:24]}"


class Analyzer:
    """Clean, hash, filter, sign and check a batch of texts: a pure function of the texts and `[data]`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.minhasher = MinHasher(cfg.near_dedup_bands * cfg.near_dedup_rows, cfg.near_dedup_shingle) \
            if cfg.near_dedup else None
        self.keyer = LSHIndex(cfg.near_dedup_bands, cfg.near_dedup_rows, cfg.near_dedup_threshold)
        self.contam = ContaminationIndex(cfg.decontaminate_ngram)
        for path in cfg.decontaminate:
            self.contam.add_set(path, eval_items(Path(path)))

    def __call__(self, texts: list[str | None]) -> dict:
        cfg = self.cfg
        norm, nbytes, digests, reasons, live = [], [], [], [], []
        for text in texts:
            if text is None:
                norm.append(None), nbytes.append(None), digests.append(None), reasons.append(None)
                continue
            text = normalize(text)
            encoded = text.encode("utf-8")
            reason = filter_reason(text, cfg, encoded)
            norm.append(text if reason is None else None)
            nbytes.append(len(encoded))
            digests.append(hashlib.sha256(encoded).digest())
            reasons.append(reason)
            if reason is None:
                live.append(encoded)
        out = {"norm": norm, "bytes": nbytes, "digests": digests, "reasons": reasons,
               "sigs": None, "has": None, "keys": None, "hits": [[] for _ in live]}
        if live and (self.minhasher is not None or self.contam.sets):
            words = Words(live)
            if self.minhasher is not None:
                out["sigs"], out["has"] = self.minhasher.signatures(words)
                out["keys"] = self.keyer.keys(out["sigs"])
            if self.contam.sets:
                out["hits"] = self.contam.hits(words)
        return out


_ANALYZERS: dict[str, Analyzer] = {}


def _analyzer(cfg: DataConfig) -> Analyzer:
    """One Analyzer per worker process and configuration (the evaluation sets' n-grams are built once)."""
    key = output_fields_hash(cfg)
    if key not in _ANALYZERS:
        _ANALYZERS.clear()
        _ANALYZERS[key] = Analyzer(cfg)
    return _ANALYZERS[key]


@dataclass(frozen=True)
class PartTask:
    """Part number `index` of the plan, to be written under `work` (a PartFiles root)."""

    index: int
    part: Part
    cfg: DataConfig  # a worker needs nothing else
    work: str

    @property
    def key(self) -> str:
        return sha256_bytes(canonical_json({"part": self.part.describe(), "data": output_fields_hash(self.cfg)}))


def _batches(items):
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item.text) if item.text is not None else 0
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def analyse_part(task: PartTask) -> dict:
    """Write part `task.index`'s files; return its result (also written, last, as the part's result file)."""
    files = PartFiles(Path(task.work))
    i = task.index
    done = files.result(i)
    if done.is_file():
        try:
            result = json.loads(done.read_text())
            if result.get("key") == task.key:
                return result
        except (OSError, ValueError):
            pass
    cfg = task.cfg
    analyzer = _analyzer(cfg)
    bands = cfg.near_dedup_bands
    names: set[str] = set()
    ids, digests, has, keys, sigs, contaminated = [], [], [], [], [], []
    items = live = 0
    with AtomicFile(files.entries(i), "w") as entries_out, AtomicFile(files.documents(i), "w") as docs_out:
        for batch in _batches(iter_part(task.part, cfg)):
            texts = [raw.text for raw in batch]
            for raw in batch:
                raw.text = None  # the analysis holds the only copy now
            a = analyzer(texts)
            li = 0
            for k, raw in enumerate(batch):
                name = raw.id
                if name in names:  # two definitions of one name (in one module, so in one part)
                    n = 2
                    while f"{name}~{n}" in names:
                        n += 1
                    name = f"{name}~{n}"
                names.add(name)
                digest = a["digests"][k]
                sha = digest.hex() if digest is not None else None
                doc_id = document_id(raw.source_name, name, sha)
                reason = (raw.reason or "unreadable") if digest is None else a["reasons"][k]
                entry = {"name": name, "id": doc_id, "source": raw.source, "license": raw.license, "sha256": sha,
                         "bytes": a["bytes"][k], "reason": reason, "detail": raw.detail or None, "hits": []}
                if reason is None:
                    entry["hits"] = a["hits"][li]
                    ids.append(doc_id)
                    contaminated.append(bool(entry["hits"]))
                    digests.append(digest)
                    if a["sigs"] is not None:
                        has.append(bool(a["has"][li]))
                        keys.append(a["keys"][li])
                        sigs.append(a["sigs"][li])
                    split = split_of(sha, cfg.val_fraction)
                    docs_out.write(f'{{"id":{json.dumps(doc_id)},"split":"{split}","text":'
                                   f'{json_string_of_normalized(a["norm"][k])}}}\n')
                    li += 1
                    live += 1
                entries_out.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
                items += 1
    n = len(digests)
    with AtomicFile(files.arrays(i)) as f:
        np.savez(f, ids=np.array(ids, dtype=str) if ids else np.zeros(0, dtype="U1"),
                 contaminated=np.array(contaminated, dtype=bool),
                 digests=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 32),
                 has=np.array(has, dtype=bool) if sigs else np.zeros(n, dtype=bool),
                 keys=np.array(keys, dtype=np.uint64).reshape(-1, bands) if keys else np.zeros((n, bands), np.uint64))
    k = cfg.near_dedup_bands * cfg.near_dedup_rows
    with AtomicFile(files.signatures(i)) as f:
        np.save(f, np.array(sigs, dtype=np.uint32).reshape(-1, k) if sigs else np.zeros((n, k), np.uint32),
                allow_pickle=False)
    result = {"key": task.key, "part": i, "items": items, "live": live}
    atomic_write_json(done, result)
    return result


EXACT, CONTAMINATED, NEAR = 1, 2, 3  # verdicts on an item that passed the filters; 0 keeps it


@dataclass(frozen=True)
class FinishTask:
    """Part number `index`'s verdicts, one per item that passed the filters, in order: code (0 keep, EXACT,
    CONTAMINATED, NEAR), the id it duplicates (or None), its estimated Jaccard with it (NEAR)."""

    index: int
    work: str
    source_name: str
    weight: float
    seed: int
    codes: tuple
    duplicate_of: tuple
    similarity: tuple


def finish_part(task: FinishTask) -> dict:
    """Write the part's final manifest entries (sorted keys) and kept document lines; return its counters and
    its training documents (id, sha256, repeats) in order."""
    files = PartFiles(Path(task.work))
    i = task.index
    out = {"seen": 0, "bytes_seen": 0, "kept": 0, "train": 0, "val": 0, "bytes_kept": 0, "dropped": {},
           "contam_matched": {}, "contam_dropped": {}, "near_similarities": [], "train_documents": []}

    def count(d: dict, key: str) -> None:
        d[key] = d.get(key, 0) + 1

    g = 0
    with open(files.entries(i), encoding="utf-8") as entries, open(files.documents(i), encoding="utf-8") as docs, \
            AtomicFile(files.final_entries(i), "w") as entries_out, AtomicFile(files.kept_documents(i), "w") as kept:
        for line in entries:
            e = json.loads(line)
            hits = e.pop("hits")
            entry = {**e, "source_name": task.source_name, "status": "dropped", "split": None, "duplicate_of": None}
            if not entry["detail"]:
                del entry["detail"]
            out["seen"] += 1
            if entry["bytes"] is not None:
                out["bytes_seen"] += entry["bytes"]
            if entry["reason"] is None:
                doc_line = docs.readline()
                code = task.codes[g]
                if code == EXACT:
                    entry.update(reason="exact_duplicate", duplicate_of=task.duplicate_of[g])
                elif code == CONTAMINATED:
                    entry.update(reason="contaminated", contaminated_by=hits)
                    for name in hits:
                        count(out["contam_matched"], name)
                    count(out["contam_dropped"], hits[0])
                elif code == NEAR:
                    entry.update(reason="near_duplicate", duplicate_of=task.duplicate_of[g],
                                 similarity=round(task.similarity[g], 4))
                    out["near_similarities"].append(task.similarity[g])
                else:
                    split = "val" if doc_line.startswith(f'{{"id":{json.dumps(entry["id"])},"split":"val"') else "train"
                    entry.update(status="kept", split=split)
                    out["kept"] += 1
                    out[split] += 1
                    out["bytes_kept"] += entry["bytes"]
                    if split == "train":
                        reps = train_repeats(task.weight, task.seed, entry["id"])
                        entry["repeats"] = reps
                        out["train_documents"].append((entry["id"], entry["sha256"], reps))
                    kept.write(doc_line)
                g += 1
            if entry["status"] == "dropped":
                count(out["dropped"], entry["reason"])
            entries_out.write(json.dumps(entry, sort_keys=True, ensure_ascii=False))
            entries_out.write("\n")
    return out
