"""lm-evaluation-harness (`local-completions`) against `glassforge serve`, offline, on two local tasks.

    .venv/bin/pip install -c constraints.txt lm-eval
    flock /tmp/gf-cpu.lock .venv/bin/python bench/lm_eval_server.py [RELEASE] [--limit 20]

Starts the server on the release (default: the `tiny` test model is not built
here; pass a release, or the script makes a random-weight model), writes two
tasks whose data are local JSONL files:

- `gf_mc`: multiple choice (log-likelihood: completions with `echo` and
  `logprobs`, prompts sent as token ids, the server's /tokenize routes used as
  the tokenizer);
- `gf_gen`: `generate_until` with six stop strings;

runs them with `lm_eval.simple_evaluate(model="local-completions")` and checks
the answers against the engine's own numbers and `glassforge eval`'s scorer
(the multiple-choice task uses its "Question: ...\nAnswer:" format; the two
accuracies must agree within one point): each multiple-choice decision
must equal the argmax of the continuation log-likelihoods computed directly
from the model, and each generation must equal the server's greedy
continuation cut at the first stop string. Prints the metrics and exits 1 on a
mismatch. `tests/test_serve.py::test_lm_eval_local_completions` runs the same
function (marked slow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

MC_DOCS = [
    {"question": "Which module parses JSON in Python?", "choices": ["json", "csv", "string", "textwrap"], "answer": 0},
    {"question": "The function that wraps text to a width is", "choices": ["textwrap.fill", "json.dumps",
                                                                          "string.capwords"], "answer": 0},
    {"question": "To read comma-separated values, import", "choices": ["difflib", "csv", "heapq"], "answer": 1},
    {"question": "json.dumps returns a", "choices": ["str", "list", "dict", "file"], "answer": 0},
    {"question": "Sorting helpers that keep a list ordered are in", "choices": ["bisect", "glob"], "answer": 0},
    {"question": "A shell-like lexer is provided by", "choices": ["shlex", "copy", "functools"], "answer": 0},
]
GEN_DOCS = [
    {"prompt": "def load(path):\n    ", "target": "return json.load(open(path))"},
    {"prompt": "import json\n", "target": "import os"},
    {"prompt": "The textwrap module", "target": " wraps text."},
    {"prompt": "x = [1, 2, 3]\n", "target": "print(x)"},
]
STOPS = ["\n\n", "<|end|>", "<|endoftext|>", "\nclass", "\ndef", "#"]


def write_tasks(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    (folder / "gf_mc.yaml").write_text(f"""task: gf_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "gf_gen.yaml").write_text(f"""task: gf_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {json.dumps(STOPS)}
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
""")


def run_lm_eval(base_url: str, model: str, max_length: int, engine, workdir: Path, limit: int | None = None) -> dict:
    """Run both tasks against a live server and check them against `engine` (same release, in-process)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from glassforge.serve.types import SamplingParams

    write_tasks(workdir)
    out = simple_evaluate(
        model="local-completions",
        model_args={"model": model, "base_url": f"{base_url}/v1/completions", "tokenizer_backend": "auto",
                    "max_length": max_length, "num_concurrent": 4, "max_retries": 1, "tokenized_requests": True},
        tasks=["gf_mc", "gf_gen"], task_manager=TaskManager(include_path=str(workdir)), limit=limit,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    problems = []

    def loglik(ctx: str, cont: str) -> float:
        whole = engine.encode(ctx + cont)
        n_ctx = len(engine.encode(ctx))
        with torch.no_grad():
            logits, _ = engine.model(torch.tensor([whole]))
        lp = torch.log_softmax(logits[0].float(), -1)
        return sum(float(lp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))

    for s in out["samples"]["gf_mc"]:
        doc = s["doc"]
        ref = [loglik(f"Question: {doc['question']}\nAnswer:", " " + c) for c in doc["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        if max(abs(a - b) for a, b in zip(ref, got)) > 1e-3:
            problems.append(f"gf_mc: log-likelihoods {got} differ from the model's {ref}")
    for s in out["samples"]["gf_gen"]:
        doc = s["doc"]
        ev = engine.generate(engine.encode(doc["prompt"]), SamplingParams(max_tokens=24, temperature=0))[0]
        text = ev.text
        for stop in STOPS:
            text = text.split(stop)[0]
        got = s["resps"][0][0]
        if got != text:
            problems.append(f"gf_gen: lm_eval got {got!r}, the engine makes {text!r}")
    # The same task through our own `glassforge eval` scorer must agree within one point of accuracy.
    from glassforge.evaluate.stage import score_multiple_choice
    from glassforge.tokenizer.bpe import load_tokenizer

    docs = [s["doc"] for s in out["samples"]["gf_mc"]]
    ours = score_multiple_choice(engine.model, load_tokenizer(engine.folder), docs)["acc"]
    theirs = out["results"]["gf_mc"]["acc,none"]
    if abs(ours - theirs) > 0.01:
        problems.append(f"gf_mc: lm_eval accuracy {theirs:.3f} but glassforge eval {ours:.3f}")
    return {"results": {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                        for t, r in out["results"].items()},
            "n_samples": {t: len(v) for t, v in out["samples"].items()}, "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", nargs="?", type=Path)
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    import threading
    import time

    import uvicorn

    from glassforge.serve.engine import Engine
    from glassforge.serve.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        if args.release:
            release = args.release
        else:
            from serve_throughput import make_random_release

            release = make_random_release(Path(tmp))
        engine = Engine(release, max_batch=8)
        app = create_app(engine)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            res = run_lm_eval(f"http://127.0.0.1:{port}", app.state.server.model_name, engine.max_context, engine,
                              Path(tmp) / "tasks", args.limit)
        finally:
            server.should_exit = True
            thread.join(10)
            engine.close()
    print(json.dumps(res, indent=2))
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
