"""Check that llama.cpp's llama-server renders a release's chat template, tools included, as glassforge does.

    bash bench/build_llama_server.sh            # GGML_NATIVE=OFF where the native build crashes
    .venv/bin/python bench/llama_server_chat_check.py [RELEASE]

Exports the release (default: random weights in the default shape) to GGUF, which carries the chat template,
starts `llama-server --jinja` on it, and sends conversations (plain; with a tool; with a call, its result and
a reply) to its `/apply-template`: the prompt it renders must equal `render_chat`'s text, and the prompt
tokens of its `/v1/chat/completions` answer the count of our tokenizer's ids for it. Prints one line per
conversation; exits 1 on any difference. Not part of `make test`: llama-server is not a dependency.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_throughput import find_llama_server, free_port, make_random_release  # noqa: E402

TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone <UTC> & more",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                        "required": ["zone"]}}}
QUESTION = {"role": "user", "content": "What time is it in UTC?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]}
CONVERSATIONS = {
    "plain": ([{"role": "system", "content": "Be brief."}, QUESTION], None),
    "a tool": ([QUESTION], [TOOL]),
    "a call and its result": ([QUESTION, CALL, {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
                               {"role": "assistant", "content": "It is noon."}, {"role": "user", "content": "Thanks"}],
                              [TOOL]),
}


def main() -> int:
    import httpx

    from glassforge.release.export import export_gguf
    from glassforge.tokenizer.bpe import chat_template_of, load_tokenizer, render_chat

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", nargs="?", type=Path)
    args = p.parse_args()
    binary = find_llama_server()
    if binary is None:
        raise SystemExit("llama_server_chat_check: no llama-server (bash bench/build_llama_server.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        release = args.release or make_random_release(Path(tmp))
        gguf = export_gguf(release, Path(tmp) / "model.gguf", "q8_0")["gguf"]
        port = free_port()
        proc = subprocess.Popen([binary, "-m", str(gguf), "-c", "2048", "-np", "1", "-t", "1", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-webui", "--jinja"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(120):
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            template, tokenizer = chat_template_of(release), load_tokenizer(release)
            failed = 0
            for name, (messages, tools) in CONVERSATIONS.items():
                body = {"messages": messages, **({"tools": tools} if tools else {})}
                for attempt in range(3):  # a fresh llama-server may close its first connection unanswered
                    try:
                        theirs = httpx.post(f"{base}/apply-template", json=body, timeout=60).json()["prompt"]
                        usage = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                                           json={**body, "max_tokens": 1, "temperature": 0}).json()["usage"]
                        break
                    except httpx.HTTPError:
                        time.sleep(1)
                else:
                    raise SystemExit(f"llama_server_chat_check: {base} does not answer")
                ours = render_chat(messages, True, template, tools)
                ids = len(tokenizer.encode(ours, add_special_tokens=False).ids)
                same = theirs == ours and usage["prompt_tokens"] == ids
                failed += not same
                print(f"{name}: {'same' if same else 'DIFFERENT'} text ({len(ours)} characters), "
                      f"{usage['prompt_tokens']} prompt tokens in llama-server, {ids} ours")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
