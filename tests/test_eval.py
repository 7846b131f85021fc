import json

import numpy as np
import pytest
import torch

from glassforge.core.errors import UserError
from glassforge.evaluate.scoring import (
    TrainingNgrams,
    continuation_logprobs,
    decontaminate,
    read_task_jsonl,
    score_multiple_choice,
)
from glassforge.model.hf import load_pretrained
from glassforge.tokenizer.bpe import load_tokenizer


class Oracle(torch.nn.Module):
    """A 'model' that puts all probability on the tokens of one preferred text."""

    def __init__(self, tok, preferred: str, vocab: int):
        super().__init__()
        self.tok, self.vocab = tok, vocab
        self.preferred = tok.encode(preferred, add_special_tokens=False).ids
        self.cfg = type("C", (), {"max_seq_len": 256})()

    def forward(self, x, targets=None, reduction="mean"):
        logits = torch.zeros(x.shape[0], x.shape[1], self.vocab)
        for b in range(x.shape[0]):
            row = x[b].tolist()
            for t in range(x.shape[1]):
                # favour the next token of `preferred` wherever the row has matched it so far
                for k in range(len(self.preferred) - 1):
                    if row[t] == self.preferred[k]:
                        logits[b, t, self.preferred[k + 1]] += 10
        return logits, None


def test_multiple_choice_scores_known_answers(random_model):
    tok = load_tokenizer(random_model)
    items = [{"question": "Pick", "choices": ["zebra crossing", "Return the lowest index", "x"], "answer": 1},
             {"question": "Pick", "choices": ["Return the lowest index", "zebra", "y"], "answer": 0},
             {"question": "Pick", "choices": ["zebra", "y", "Return the lowest index"], "answer": 1}]
    model = Oracle(tok, "Answer: Return the lowest index", tok.get_vocab_size())
    result = score_multiple_choice(model, tok, items)
    assert result["n"] == 3
    assert result["acc"] == pytest.approx(2 / 3)


def test_real_model_scoring_is_deterministic_and_picks_the_likeliest_choice(random_model):
    tok = load_tokenizer(random_model)
    model = load_pretrained(random_model)
    items = [{"question": "What is 2+2?", "choices": ["4", "five", "22"], "answer": 0},
             {"question": "Which module parses JSON?", "choices": ["textwrap", "json", "string"], "answer": 1},
             {"question": "Pick a colour", "choices": ["red", "a dog", "seven", "blue sky"], "answer": 3}]
    a, b = score_multiple_choice(model, tok, items), score_multiple_choice(model, tok, items)
    assert a == b
    # acc is the share of items whose answer has the highest summed log-probability, each choice scored alone
    hits = []
    for item in items:
        alone = [continuation_logprobs(model, tok, f"Question: {item['question']}\nAnswer:", [f" {c}"])[0][0]
                 for c in item["choices"]]
        hits.append(int(np.argmax(alone)) == item["answer"])
    assert a["n"] == 3 and a["acc"] == pytest.approx(sum(hits) / 3)


def test_decontamination_drops_overlapping_items(random_model):
    tok = load_tokenizer(random_model)
    train_text = "Return the lowest index in the list where the value is found, raising an error otherwise."
    ngrams = TrainingNgrams(np.array(tok.encode(train_text, add_special_tokens=False).ids), n=8)
    items = [{"question": train_text, "choices": ["a", "b"], "answer": 0},
             {"question": "Something else entirely different", "choices": ["a", "b"], "answer": 0}]
    kept, removed = decontaminate(items, tok, ngrams)
    assert removed == 1 and kept == items[1:]


def test_task_file_errors_name_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 3}) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl:1: needs question, choices"):
        read_task_jsonl(p)
    p.write_text('{"question": "q"\n')
    with pytest.raises(UserError, match=r"t.jsonl:1: not JSON"):
        read_task_jsonl(p)
