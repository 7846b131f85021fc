"""Check a release's GGUF export in llama.cpp itself (through llama-cpp-python).

    .venv/bin/pip install -c constraints.txt llama-cpp-python   # compiles llama.cpp: ~8 min on 2 cores
    .venv/bin/python bench/llamacpp_check.py RUN/release [--gguf FILE] [--tokens 32]

Exports the release with `glassforge.release.export.export_gguf` (unless --gguf names
a file already made), loads it in llama.cpp, and compares with glassforge's
own model and tokenizer:

1. tokenization: llama.cpp's ids for a set of texts (code, prose, digits,
   runs of spaces, non-ASCII, a rendered chat with special tokens) equal the
   Hugging Face tokenizer's;
2. logits: llama.cpp's fp32 logits over a prompt, largest absolute difference
   from ours (reported; llama.cpp sums in another order, so not bit-equal);
3. greedy continuation: the same token ids for --tokens steps, from a plain
   prompt and from a chat prompt.

Prints one JSON report and exits 1 if tokenization or a greedy continuation
differs. Not part of `make test`: llama-cpp-python is not a dependency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

TEXTS = [
    "def dumps(obj, *, skipkeys=False, ensure_ascii=True):\n    return JSONEncoder().encode(obj)\n",
    "The quick brown fox's tail -- it isn't there; 12345 + 678 = 13023.",
    "    indented    with   runs of spaces\n\n\tand a tab",
    "Ünïcödé: naïve café, Ελληνικά, 日本語, emoji 🙂",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", type=Path)
    p.add_argument("--gguf", type=Path, help="an exported file (default: export to a temporary file)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare")
    args = p.parse_args()
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        print("llama-cpp-python is not installed: .venv/bin/pip install -c constraints.txt llama-cpp-python",
              file=sys.stderr)
        return 2

    from glassforge.release.export import export_gguf
    from glassforge.model.generate import generate_ids
    from glassforge.model.hf import load_pretrained
    from glassforge.tokenizer.bpe import END, ENDOFTEXT, load_tokenizer, render_chat

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = args.gguf or Path(export_gguf(args.release, Path(tmp) / "model.gguf")["gguf"])
        ours = load_pretrained(args.release)
        tok = load_tokenizer(args.release)
        llm = LlamaCpp(model_path=str(gguf_path), n_ctx=ours.cfg.max_seq_len, logits_all=True, verbose=False,
                       n_threads=2, seed=0)
        report: dict = {"gguf": str(gguf_path), "tokenization": [], "greedy": []}

        chat = render_chat([{"role": "user", "content": "What does json.dumps do?"}], add_generation_prompt=True)
        for text in TEXTS + [chat]:
            want = tok.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            report["tokenization"].append({"text": text[:40], "tokens": len(want), "equal": got == want})

        def llamacpp_greedy(ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
            llm.reset()
            llm.eval(ids)
            first_logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
            out = []
            stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
            for _ in range(n):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(nxt)
                if nxt in stop or llm.n_tokens >= ours.cfg.max_seq_len:
                    break
                llm.eval([nxt])
            return out, first_logits

        for name, prompt in (("plain", TEXTS[0][:60]), ("chat", chat)):
            ids = tok.encode(prompt, add_special_tokens=False).ids
            stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
            want = list(generate_ids(ours, ids, args.tokens, stop_ids=stop))
            got, cpp_logits = llamacpp_greedy(ids, args.tokens)
            with torch.no_grad():
                our_logits = ours(torch.tensor([ids]))[0][0].double().numpy()
            report["greedy"].append({"prompt": name, "equal": got == want, "ours": want, "llama.cpp": got,
                                     "max_abs_logit_diff": float(np.abs(cpp_logits - our_logits).max())})

    ok = all(t["equal"] for t in report["tokenization"]) and all(g["equal"] for g in report["greedy"])
    report["pass"] = ok
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
