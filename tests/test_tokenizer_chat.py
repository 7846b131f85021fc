import json

import pytest

from glassforge.core.errors import UserError
from glassforge.tokenizer.bpe import END, SPECIAL_TOKENS, load_tokenizer, render_chat

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does os.path.join do?"},
    {"role": "assistant", "content": "It joins paths.\n\nWith '/'."},
    {"role": "user", "content": "Thanks"},
]


def test_special_tokens_have_fixed_ids(random_model):
    tok = load_tokenizer(random_model)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode("<|user|>\nhi<|end|>", add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|user|>") and ids[-1] == tok.token_to_id(END)


def test_byte_level_round_trip(random_model):
    tok = load_tokenizer(random_model)
    text = "naïve café ☕ — \t tabs\nand émojis 😀 and code: x = {'a': [1, 2]}"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_our_chat_rendering_equals_transformers(random_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(random_model))
    for gen in (True, False):
        ours = render_chat(CONVERSATION, add_generation_prompt=gen)
        theirs = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    ours_ids = load_tokenizer(random_model).encode(render_chat(CONVERSATION), add_special_tokens=False).ids
    theirs_ids = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    if isinstance(theirs_ids, dict) or hasattr(theirs_ids, "keys"):
        theirs_ids = theirs_ids["input_ids"]
    assert ours_ids == list(theirs_ids)
    assert render_chat(CONVERSATION).endswith("<|user|>\nThanks<|end|>\n<|assistant|>\n")
    assert json.loads((random_model / "tokenizer_config.json").read_text())["eos_token"] == END


def test_unknown_role_is_rejected():
    with pytest.raises(UserError, match="unknown role: tool"):
        render_chat([{"role": "tool", "content": "x"}])
