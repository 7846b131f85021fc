"""The `tokenizer` stage: a byte-level BPE trained on the training split.

Byte-level BPE (GPT-2's pre-tokenizer, Hugging Face `tokenizers`) can encode any
text without an unknown token, and llama.cpp and transformers both read it.
Special tokens are reserved first, so their ids are fixed across recipes:
`<|endoftext|>` separates documents, `<|system|>`, `<|user|>`, `<|assistant|>`
open chat turns and `<|end|>` closes one. No BOS token is added anywhere, which
rules out the double-BOS bug by construction.

The chat template is Jinja, stored in `tokenizer_config.json`, so transformers'
`apply_chat_template`, vLLM and llama.cpp render conversations exactly as
`render_chat` here does (the same template through the same engine settings).
"""

from __future__ import annotations

import functools

import json
from pathlib import Path

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_json, atomic_write_text
from glassforge.core.runfolder import (
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    Run,
)
from glassforge.data.documents import iter_documents

ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END = (
    "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = [ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END]
ROLES = ("system", "user", "assistant")  # what fine-tuning data may hold

# A tool call is plain text in the assistant's turn, one block per call (the format serve/tools.py parses and
# constrains); tool results come back as user turns wrapped in <tool_response>. No new special tokens: the
# vocabulary, and so every earlier release, stays as it was, and a conversation without tools renders exactly
# as before.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|system|>\nYou can call these functions. To call one, answer with one block per call:\n<tool_call>\n"
    "{\"name\": <function name>, \"arguments\": <its arguments as a JSON object>}\n</tool_call>\n' }}"
    "{%- for tool in tools -%}{{ tool | tojson + '\n' }}{%- endfor -%}"
    "{{ '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{ '<|user|>\n<tool_response>\n' + message['content'] + '\n</tool_response><|end|>\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + (message['content'] or '') }}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{%- if message['content'] or not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{{ '<tool_call>\n{\"name\": ' + f['name'] | tojson + ', \"arguments\": ' }}"
    "{{- f['arguments'] if f['arguments'] is string else f['arguments'] | tojson -}}"
    "{{ '}\n</tool_call>' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config() -> dict:
    """transformers' tokenizer_config.json: the fast tokenizer, its special tokens and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": END,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": [ENDOFTEXT, SYSTEM, USER, ASSISTANT],
    }


def special_tokens_map() -> dict:
    return {"eos_token": END, "pad_token": PAD, "additional_special_tokens": [ENDOFTEXT, SYSTEM, USER, ASSISTANT]}


def write_tokenizer_files(folder: Path, tok) -> None:
    atomic_write_text(folder / TOKENIZER_JSON, tok.to_str(pretty=True))
    atomic_write_json(folder / TOKENIZER_CONFIG, tokenizer_config())
    atomic_write_json(folder / SPECIAL_TOKENS_MAP, special_tokens_map())


def run_tokenizer(run: Run) -> dict:
    """Train the tokenizer on the training documents of the run."""
    recipe = run.load_recipe()
    if not run.documents.is_file():
        raise UserError(f"{run.root}: no data yet; run `glassforge data {run.root}` first")
    texts = (d["text"] for d in iter_documents(run, "train"))
    tok = train_tokenizer(texts, recipe.tokenizer.vocab_size, recipe.tokenizer.min_frequency)
    write_tokenizer_files(run.tokenizer, tok)
    return {"vocab_size": tok.get_vocab_size()}


def load_tokenizer(folder: Path | str):
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_JSON
    if not path.is_file():
        raise UserError(f"{folder}: no {TOKENIZER_JSON}")
    return Tokenizer.from_file(str(path))


def _raise_exception(message):
    raise UserError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson` filter (Jinja's own escapes <, > and & for HTML, which a prompt must not do)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
    """The template compiled once per process: compiling it took 6 ms a call, and fine-tuning renders 15,000
    conversations (33 s of the default's sft stage before this cache)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def render_chat(messages: list[dict], add_generation_prompt: bool = True, template: str = CHAT_TEMPLATE,
                tools: list[dict] | None = None) -> str:
    """The conversation as text, through the same Jinja settings transformers uses; tools as transformers
    passes them (OpenAI's `{"type": "function", "function": {...}}` entries)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"messages[{i}]: needs a 'role' and a string 'content'")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise UserError(f"messages[{i}]: needs a 'role' and a string 'content'")
    return _compiled_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               tools=tools or None)


def chat_template_of(folder: Path | str) -> str:
    cfg = Path(folder) / TOKENIZER_CONFIG
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("chat_template") or CHAT_TEMPLATE
    return CHAT_TEMPLATE
