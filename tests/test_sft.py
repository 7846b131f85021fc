import json


from glassforge.train.conversations import Conversation, pystdlib_qa, read_messages_jsonl
from glassforge.train.sft import Conversations, assistant_spans
from glassforge.tokenizer.bpe import PAD, load_tokenizer


def test_loss_only_on_assistant_tokens(random_model):
    tok = load_tokenizer(random_model)
    conv = Conversation([
        {"role": "system", "content": "SYSTEM TEXT"},
        {"role": "user", "content": "USER QUESTION"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "MORE USER"},
        {"role": "assistant", "content": "second answer"},
    ])
    rows = Conversations([conv], tok, 128)
    targets = rows.y[0][rows.y[0] != -100]
    assert tok.decode(targets.tolist(), skip_special_tokens=False) == "first answer<|end|>second answer<|end|>"
    # inputs are the rendered conversation, padded
    text, _ = assistant_spans(conv.messages)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert rows.x[0][: len(ids) - 1].tolist() == ids[:-1]
    assert rows.target_tokens == len(targets)


def test_pack_rows_is_best_fit_in_order():
    from glassforge.train.sft import pack_rows

    # 70 opens a row; 60 does not fit beside it; 50 goes where it leaves least room (beside 70: 8 left);
    # 60's row (68 left) takes 40; 130 is cut to the capacity by the caller, so 128 fills a row alone
    assert pack_rows([70, 60, 50, 40, 128, 8], 128) == [[0, 2, 5], [1, 3], [4]]
    assert pack_rows([], 128) == []


def test_packed_conversations_hold_the_same_tokens_and_targets(random_model):
    tok = load_tokenizer(random_model)
    convs = [Conversation([{"role": "user", "content": f"question {i} " + "word " * i},
                           {"role": "assistant", "content": f"answer {i}"}]) for i in range(9)]
    padded, packed = Conversations(convs, tok, 64), Conversations(convs, tok, 64, pack=True)
    assert len(packed) < len(padded) and packed.n_conversations == padded.n_conversations == 9
    assert packed.target_tokens == padded.target_tokens
    assert padded.batch([0])[2:] == ()  # one conversation a row: no segments
    x, y, extra = packed.batch(list(range(len(packed))))
    segments = extra["segments"]
    # each segment of a packed row is one conversation's row, as the padded rows hold it
    pieces = sorted((x[r][segments[r] == k].tolist(), y[r][segments[r] == k].tolist())
                    for r in range(len(packed)) for k in segments[r].unique().tolist()
                    if (y[r][segments[r] == k] != -100).any())
    want = sorted((padded.x[i][:(padded.x[i] != tok.token_to_id(PAD)).sum()].tolist(),
                   padded.y[i][:(padded.x[i] != tok.token_to_id(PAD)).sum()].tolist()) for i in range(9))
    assert pieces == want
    assert all((s[1:] >= s[:-1]).all() for s in segments)  # numbered in order along each row


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "c.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text("\n".join([
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
        json.dumps(good),
    ]) + "\n")
    convs, report = read_messages_jsonl(path)
    assert len(convs) == 2 and report.read == 2 and report.skipped == 3
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in report.problems] == ["2", "3", "4"]
    assert "not JSON" in report.problems[0]
    assert "unknown role 'wizard'" in report.problems[1]
    assert "missing content" in report.problems[2]


def test_pystdlib_qa_is_grounded_and_holds_out_whole_modules():
    from glassforge.data import pystdlib

    docs = [{"id": f"pystdlib:{d.name}", "split": "train", "text": d.text}
            for d in pystdlib.iter_documents(["posixpath", "json", "textwrap", "string", "shlex", "glob", "heapq",
                                              "bisect", "copy", "csv", "difflib", "fnmatch", "base64"])]
    train, val = pystdlib_qa(docs, seed=1)
    assert train and val
    mods = lambda cs: {c.provenance["document"].split(":")[1].split(".")[0] for c in cs}
    assert not mods(train) & mods(val)
    join = [c for c in train + val if "os.path.join" in c.messages[-2]["content"]
            and "signature" not in c.messages[-2]["content"] and "arguments" not in c.messages[-2]["content"]]
    assert len(join) >= 2
    for c in join:
        assert c.messages[-1]["content"].startswith("Signature: os.path.join(a, *p)\n\nJoin two or more pathname components")
        assert c.provenance["document"] == "pystdlib:posixpath.join"
    assert all(len(c.provenance["sha256"]) == 64 for c in train)


def test_pretraining_rows_are_mixed_in_at_their_share_with_every_token_a_target():
    import types

    import numpy as np

    from glassforge.train.order import Windows
    from glassforge.train.sft import WithPretraining

    class FakeConversations:
        def __init__(self, n, seq_len):
            self.x = np.arange(n * seq_len, dtype=np.int64).reshape(n, seq_len) + 10_000
            self.y = np.full((n, seq_len), -100, dtype=np.int64)
            self.y[:, -2:] = 7  # two assistant tokens a row
            self.bytes_per_token, self.target_tokens = 3.0, 2 * n

        def __len__(self):
            return len(self.x)

        def batch(self, idx):
            import torch

            return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])

    stream = types.SimpleNamespace(tokens=np.arange(1001, dtype=np.uint16), bytes_per_token=4.0)
    convs = FakeConversations(30, 8)
    mixed = WithPretraining(convs, Windows(stream, 8), share=0.25)
    assert len(mixed.picked) == 10 and len(mixed) == 40  # 10 of 40 rows: a quarter
    assert list(mixed.picked) == list(range(0, 120, 12))  # spread evenly over the 125 windows
    assert mixed.target_tokens == 2 * 30 + 10 * 8
    x, y = mixed.batch([0, 30, 39])
    assert x[0].tolist() == convs.x[0].tolist() and y[0].tolist() == convs.y[0].tolist()
    assert x[1].tolist() == list(range(0, 8)) and y[1].tolist() == list(range(1, 9))  # window 0, shifted
    assert x[2].tolist() == list(range(108 * 8, 109 * 8))
    assert mixed.target_count([0, 1, 30, 31]) == 2 + 2 + 8 + 8
