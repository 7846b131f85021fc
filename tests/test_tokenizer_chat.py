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
    with pytest.raises(UserError, match="unknown role: robot"):
        render_chat([{"role": "robot", "content": "x"}])


def test_a_conversation_without_tools_renders_as_before_tools_existed():
    # the bytes every earlier build fine-tuned on: the template's tool support must not change them
    assert render_chat(CONVERSATION) == ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat does os.path.join do?<|end|>\n"
                                         "<|assistant|>\nIt joins paths.\n\nWith '/'.<|end|>\n<|user|>\nThanks<|end|>\n"
                                         "<|assistant|>\n")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 'here', in °C",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
WITH_CALLS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"role": "assistant", "content": None, "tool_calls": [  # arguments as OpenAI sends them, and as a dict
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18"},
    {"role": "tool", "tool_call_id": "call_2", "content": "16"},
    {"role": "assistant", "content": "Checking again.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
    {"role": "user", "content": "Thanks"},
]


def test_tools_render_as_transformers_renders_them(random_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(random_model))
    for gen in (True, False):
        ours = render_chat(WITH_CALLS, gen, tools=TOOLS)
        assert ours == hf.apply_chat_template(WITH_CALLS, tools=TOOLS, tokenize=False, add_generation_prompt=gen)
    ours = render_chat(WITH_CALLS, tools=TOOLS)
    assert "Weather <now> & 'here', in °C" in ours  # no HTML escaping, no ASCII escaping
    assert ('<|assistant|>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|end|>\n') in ours
    assert "<|user|>\n<tool_response>\n16\n</tool_response><|end|>\n" in ours
    assert ('<|assistant|>\nChecking again.\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n'
            '</tool_call><|end|>\n') in ours
    # a reply the template renders reads back as the same calls
    from glassforge.serve.tools import parse_calls

    reply = ours.split("<|assistant|>\n")[1].split("<|end|>")[0]
    content, calls = parse_calls(reply, {"get_weather"})
    assert content == "" and [c.arguments for c in calls] == ['{"city": "Paris"}', '{"city": "Lyon"}']

