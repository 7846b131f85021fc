"""The `sft` stage: chat fine-tuning of the pretrained model, loss on assistant tokens only.

Each conversation is rendered with the release's chat template and tokenized
once, as inference will see it; a token is trained on when it starts inside an
assistant message's content or its closing `<|end|>` (so the model learns to
stop). System and user tokens, role headers and padding carry no loss.

Conversations are cut to `sft.seq_len` and, with `sft.pack`, packed into rows
of that length, best fit (`pack_rows`); each attends only to itself, from
position 0, so a packed conversation trains as it would alone. The default's
conversations average 72 tokens, so padded rows of 128 were 44% padding:
packing puts about 1.7 conversations in a row, for the same cost a step
(docs/PERFORMANCE.md, "Packed fine-tuning"). Without `pack`, one conversation
a row, padded.

Training goes through the shared trainer (`train.py`), so resume, determinism
and torchrun work as for pretraining. The base model's loss on the held-out
conversations is measured first, so the gain from fine-tuning is on record
(`sft/summary.json`, and the model card).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_json
from glassforge.core.runfolder import Run, latest_weights
from glassforge.core.stages import stage_input_hash
from glassforge.data.documents import iter_documents
from glassforge.model.hf import load_weights
from glassforge.model.llama import Llama
from glassforge.tokenizer.bpe import END, PAD, load_tokenizer, render_chat
from glassforge.tokenizer.shards import TokenStream
from glassforge.train.conversations import (
    Conversation,
    pystdlib_qa,
    read_messages_jsonl,
)
from glassforge.train.device import pick_dtype
from glassforge.train.loop import evaluate, train
from glassforge.train.order import Windows


def assistant_spans(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss.

    Built piece by piece in the template's own format, and checked against the
    Jinja rendering so the two can never drift apart.
    """
    text, spans = "", []
    for m in messages:
        text += f"<|{m['role']}|>\n"
        start = len(text)
        text += m["content"] + END
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    if text != render_chat(messages, add_generation_prompt=False):
        raise AssertionError("chat template and loss masking disagree")
    return text, spans


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Conversations into rows of `capacity` positions, best fit: each, in order, into the open row with the
    least room that holds it, else a new row. A function of the lengths alone, so the rows are the same on
    every machine."""
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> rows with that much
    for i, n in enumerate(lengths):
        room = next((r for r in range(n, capacity + 1) if by_room[r]), None)
        if room is None:
            row, room = len(rows), capacity
            rows.append([])
        else:
            row = by_room[room].pop()
        rows[row].append(i)
        by_room[room - n].append(row)
    return rows


class Conversations:
    """Rows of token ids and targets (-100 where there is no loss): one conversation a row, padded, or with
    `pack`, several, numbered in `segments` so that each attends only to itself (model/llama.py)."""

    def __init__(self, convs: list[Conversation], tok, seq_len: int, pack: bool = False):
        pad = tok.token_to_id(PAD)
        total_tokens = total_bytes = 0
        texts_spans = [assistant_spans(c.messages) for c in convs]
        encodings = tok.encode_batch([t for t, _ in texts_spans], add_special_tokens=False)
        inputs, targets = [], []
        for (text, spans), enc in zip(texts_spans, encodings):
            ids = enc.ids[: seq_len + 1]
            starts = [s for s, _ in enc.offsets[: len(ids)]]
            trained = np.array([any(a <= s < b for a, b in spans) for s in starts], dtype=bool)
            target = np.asarray(ids[1:], dtype=np.int64)
            target[~trained[1:]] = -100
            inputs.append(ids[:-1])
            targets.append(target)
            total_tokens += int(trained[1:].sum())
            total_bytes += sum(len(text[a:b].encode()) for a, b in spans)
        rows = pack_rows([len(t) for t in inputs], seq_len) if pack else [[i] for i in range(len(convs))]
        self.x = np.full((len(rows), seq_len), pad, dtype=np.int64)
        self.y = np.full((len(rows), seq_len), -100, dtype=np.int64)
        # padding after the last conversation is a segment of its own, which no loss reads
        self.segments = np.zeros((len(rows), seq_len), dtype=np.int64) if pack else None
        for r, members in enumerate(rows):
            at = 0
            for k, i in enumerate(members):
                n = len(inputs[i])
                self.x[r, at:at + n], self.y[r, at:at + n] = inputs[i], targets[i]
                if pack:
                    self.segments[r, at:at + n] = k
                at += n
            if pack:
                self.segments[r, at:] = len(members)
        self.n_conversations = len(convs)
        self.bytes_per_token = total_bytes / max(1, total_tokens)
        self.target_tokens = total_tokens

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices):
        idx = np.asarray(indices)
        x, y = torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])
        if self.segments is None:
            return x, y
        return x, y, {"segments": torch.from_numpy(self.segments[idx])}


def load_conversations(run: Run, files: dict[str, Path] | None = None) -> tuple[list[Conversation],
                                                                               list[Conversation], dict]:
    """(train, validation, report) from the recipe's sft.conversations.

    files maps a conversation file the recipe names to where it is now (a release carries copies: replay
    reads those, not the builder's paths).
    """
    recipe = run.load_recipe()
    train, val, report = [], [], {}
    for name in recipe.sft.conversations:
        if name == "pystdlib-qa":
            pystdlib_names = {s.name for s in recipe.data.sources if s.kind == "pystdlib"}
            docs = (d for d in iter_documents(run) if d["id"].split(":", 1)[0] in pystdlib_names)
            t, v = pystdlib_qa(docs, recipe.seed)
            report[name] = {"train": len(t), "val": len(v)}
        else:
            convs, rep = read_messages_jsonl((files or {}).get(name, Path(name)))
            for p in rep.problems:
                print(f"sft: skipped {p}")
            # Files are split by position: every 20th conversation validates.
            t = [c for i, c in enumerate(convs) if i % 20 != 19]
            v = [c for i, c in enumerate(convs) if i % 20 == 19]
            report[name] = {"train": len(t), "val": len(v), "skipped": rep.skipped, "problems": rep.problems[:20]}
        train += t
        val += v
    if not train:
        raise UserError("sft.conversations: no training conversations")
    return train, val, report


class WithPretraining:
    """Conversations with pretraining text mixed in: rows past the conversations are windows of the
    pretraining stream (every token trained on), `share` of all rows, spread evenly over the stream."""

    def __init__(self, conversations: Conversations, windows: Windows, share: float):
        self.conversations, self.windows = conversations, windows
        self.n_conv = len(conversations)
        wanted = round(share / (1 - share) * self.n_conv)
        stride = max(1, len(windows) // max(1, wanted))
        self.picked = np.arange(0, len(windows), stride, dtype=np.int64)[:wanted]
        self.bytes_per_token = conversations.bytes_per_token
        self.target_tokens = conversations.target_tokens + len(self.picked) * windows.seq_len

    def __len__(self) -> int:
        return self.n_conv + len(self.picked)

    def batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        conv, text = idx[idx < self.n_conv], self.picked[idx[idx >= self.n_conv] - self.n_conv]
        x = np.empty((len(idx), self.windows.seq_len), dtype=np.int64)
        y = np.empty_like(x)
        segments = np.zeros_like(x)  # a window is one segment
        if len(conv):
            cx, cy, *extra = self.conversations.batch(conv)
            x[idx < self.n_conv], y[idx < self.n_conv] = cx.numpy(), cy.numpy()
            if extra:
                segments[idx < self.n_conv] = extra[0]["segments"].numpy()
        if len(text):
            wx, wy = self.windows.batch(text)
            x[idx >= self.n_conv], y[idx >= self.n_conv] = wx.numpy(), wy.numpy()
        if getattr(self.conversations, "segments", None) is None:
            return torch.from_numpy(x), torch.from_numpy(y)
        return torch.from_numpy(x), torch.from_numpy(y), {"segments": torch.from_numpy(segments)}

    def target_count(self, rows) -> int:
        rows = np.asarray(rows, dtype=np.int64)
        conv = rows[rows < self.n_conv]
        return int((self.conversations.y[conv] != -100).sum()) + int((rows >= self.n_conv).sum()) * \
            self.windows.seq_len


def sft_examples(run: Run, tok, files: dict[str, Path] | None = None):
    """Fine-tuning's training examples: the recipe's conversations, with pretraining text mixed in when
    sft.pretrain_mix asks (what a replay of fine-tuning re-trains on too); and the held-out conversations."""
    recipe = run.load_recipe()
    cfg = recipe.sft
    train_convs, val_convs, report = load_conversations(run, files)
    # validation stays one conversation a row: its loss is comparable whether training packs or not
    train_set = Conversations(train_convs, tok, cfg.seq_len, pack=cfg.pack)
    val_set = Conversations(val_convs, tok, cfg.seq_len) if val_convs else None
    if cfg.pretrain_mix:
        if not 0 < cfg.pretrain_mix < 1:
            raise UserError(f"sft.pretrain_mix={cfg.pretrain_mix}: the share of pretraining rows must be in (0, 1)")
        train_set = WithPretraining(train_set, Windows(TokenStream(run, "train"), cfg.seq_len), cfg.pretrain_mix)
        report["pretraining windows"] = len(train_set.picked)
    return train_set, val_set, report


def run_sft(run: Run) -> dict:
    recipe = run.load_recipe()
    cfg = recipe.sft
    if cfg.seq_len > recipe.model.max_seq_len:
        raise UserError(f"sft.seq_len={cfg.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}")
    base = latest_weights(run.pretrain)
    tok = load_tokenizer(run.tokenizer)
    train_set, val_set, report = sft_examples(run, tok)

    base_val = None
    if val_set is not None:
        model = Llama(recipe.model)
        load_weights(base, model)
        base_val, _ = evaluate(model, val_set, cfg, torch.device("cpu"), pick_dtype(cfg, torch.device("cpu")))

    result = train(recipe.model, train_set, val_set, cfg, run.sft, recipe.seed + 1,
                   stage_input_hash(run, "sft"), init_weights=base, label="sft")
    summary = {"conversations": report, "train_rows": len(train_set),
               "val_conversations": len(val_set) if val_set else 0,
               "train_target_tokens": train_set.target_tokens,
               "base_val_loss": base_val, "val_loss": result.val_loss, "final_loss": result.final_loss,
               "steps": result.steps, "seconds": round(result.seconds, 1)}
    atomic_write_json(run.sft_summary, summary)
    return summary


def sft_summary(run: Run) -> dict | None:
    path = run.sft_summary
    return json.loads(path.read_text()) if path.is_file() else None
