"""RL with verifiable rewards: the reward on hand-made cases, the prompts, the rollouts' weights, the log's
re-scoring, the names task's statistics, and the stage's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glassforge.evaluate.names import QUESTIONS, mcnemar, name_prompts
from glassforge.train.conversations import FUNCTION_QUESTIONS, held_out_module
from glassforge.train.rewards import Entry, asked_name, has_signature, names, reward_table, score, word_f1
from glassforge.train.rl import RL_QUESTIONS, names_prompts

DOCS = [
    {"id": "py:posixpath.join", "split": "train",
     "text": "posixpath.join(a, *p)\n\nJoin two or more pathname components, inserting '/' as needed.\n\nMore."},
    {"id": "py:json.dumps", "split": "train",
     "text": "json.dumps(obj, *, skipkeys=False)\n\nSerialize ``obj`` to a JSON formatted ``str``."},
    {"id": "py:json.dump", "split": "train", "text": "json.dump(obj, fp)\n\nSerialize ``obj`` as a JSON stream to fp."},
    {"id": "py:json._private", "split": "train", "text": "json.x._private(a)\n\nA private helper, never asked about."},
    {"id": "py:json.loads", "split": "val", "text": "json.loads(s)\n\nDeserialize s, a str holding a JSON document."},
    {"id": "py:json", "split": "train", "text": "module json\n\nJSON encoder and decoder."},
]


@pytest.fixture
def table() -> dict[str, Entry]:
    return reward_table(DOCS)


def test_the_table_holds_training_functions_by_the_names_they_are_asked_by(table):
    assert sorted(table) == ["json.dump", "json.dumps", "os.path.join", "posixpath.join"]  # no val, private, module
    assert table["os.path.join"].signature == "(a, *p)" and table["os.path.join"].document == "py:posixpath.join"
    assert table["json.dumps"].description == "Serialize ``obj`` to a JSON formatted ``str``."


def test_asked_name_is_the_longest_table_name_the_prompt_mentions(table):
    assert asked_name("What does os.path.join do?", table) == "os.path.join"
    assert asked_name("What is json.dumps.", table) == "json.dumps"  # a sentence's full stop is not part of it
    assert asked_name("Compare json.dump and json.dumps", table) == "json.dumps"
    assert asked_name("What does json.loads do?", table) is None  # validation documents are not in the table
    assert asked_name("What does myjson.dumps do?", table) is None


@pytest.mark.parametrize("completion, name, signature", [
    ("Signature: json.dumps(obj, *, skipkeys=False)\n\nSerialize obj to a JSON str.", 1, 1),
    ("Signature: json.dumps(obj)\n\nSerialize obj.", 1, 0),  # the right name, not its signature
    ("Signature: json.dump(obj, fp)\n\nSerialize obj as a JSON stream.", 0, 0),  # another function
    ("Signature: json.dumps_all(obj)", 0, 0),  # a longer name is not this one
    ("Signature: myjson.dumps(obj, *, skipkeys=False)", 0, 0),
    ("The signature is json.dumps(obj, *, skipkeys=False).", 1, 1),
    ("Serialize obj.\nSignature: json.dumps(obj, *, skipkeys=False)", 0, 0),  # only the first line counts
    ("Signature: json.dumps(obj, *, skipkeys=False)(x)", 1, 0),  # nothing glued to the signature
])
def test_name_and_signature_are_judged_on_the_first_line(table, completion, name, signature):
    got = score("What is json.dumps used for?", completion, table)
    assert (got["name"], got["signature"]) == (name, signature)
    assert got["reward"] == pytest.approx(got["name"] + got["signature"] + 0.5 * got["description"], abs=1e-6)


def test_description_is_content_word_overlap_so_filler_earns_nothing(table):
    good = score("What does json.dumps do?", "Signature: json.dumps(obj)\n\nSerialize obj to a JSON formatted str.",
                 table)
    filler = score("What does json.dumps do?", "Signature: json.dumps(obj)\n\nReturn a list of the string of a list.",
                   table)
    assert good["description"] > 0.5 and filler["description"] == 0.0
    assert word_f1("the of and a", "the of and a") == 0.0  # function words do not count
    assert names("Signature: os.path.join(a)", "os.path.join") and not names("os.path.joiner", "os.path.join")
    assert has_signature("x os.path.join(a, *p) y", Entry("os.path.join", "(a, *p)", "", ""))


def test_a_name_not_in_the_table_scores_zero(table):
    assert score("What does frobnicate.now do?", "Signature: frobnicate.now()\n\nIt frobnicates.", table) == {
        "name": 0.0, "signature": 0.0, "description": 0.0, "reward": 0.0}


def test_eval_phrasings_are_never_trained_on_and_sets_are_split_by_module(table):
    assert not set(QUESTIONS) & set(FUNCTION_QUESTIONS)
    assert not set(RL_QUESTIONS) & (set(QUESTIONS) | set(FUNCTION_QUESTIONS))
    big = {f"mod{i}.f{j}": Entry(f"mod{i}.f{j}", "()", "Does a thing.", "") for i in range(60) for j in range(5)}
    sets = name_prompts(big, seed=3, limit=40)
    assert len(sets["train"]) == 40 and 0 < len(sets["held_out"]) <= 40
    assert all(held_out_module(e.name.split(".")[0]) for _, e in sets["held_out"])
    assert not any(held_out_module(e.name.split(".")[0]) for _, e in sets["train"])
    assert all(any(q == p.format(name=e.name) for p in QUESTIONS) for q, e in sets["train"])
    assert name_prompts(big, seed=3, limit=40) == sets  # a function of the seed


def test_rl_asks_each_training_function_once_in_its_own_phrasings():
    big = {f"mod{i}.f{j}": Entry(f"mod{i}.f{j}", "()", "Does a thing.", "") for i in range(60) for j in range(5)}
    prompts = names_prompts(big, seed=3)
    trained = sorted(n for n in big if not held_out_module(n.split(".")[0]))
    assert 0 < len(trained) < len(big) and len(prompts) == len(trained)
    assert all(any(q == p.format(name=n) for p in RL_QUESTIONS) for q, n in zip(prompts, trained))
    assert len({q.replace(n, "{name}") for q, n in zip(prompts, trained)}) == len(RL_QUESTIONS)
    assert names_prompts(big, seed=3) == prompts != names_prompts(big, seed=4)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    assert mcnemar("0000", "0000") == {"gained": 0, "lost": 0, "p_value": 1.0}
    t = mcnemar("0" * 10, "1" * 10)
    assert t["gained"] == 10 and t["lost"] == 0 and t["p_value"] == pytest.approx(2 / 2 ** 10)
    t = mcnemar("0101", "1010")
    assert t["gained"] == 2 and t["lost"] == 2 and t["p_value"] == 1.0


def test_prompt_file_problems_are_reported_with_line_numbers_and_skipped(tmp_path, capsys):
    from glassforge.train.rl import read_prompts_jsonl

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What does json.dumps do?"}\nnot json\n{"text": "no prompt field"}\n\n'
                    '{"prompt": "What is os.path.join for?"}\n')
    prompts, problems = read_prompts_jsonl(path)
    assert prompts == ["What does json.dumps do?", "What is os.path.join for?"]
    assert problems == [f"{path}:2: not JSON", f"{path}:3: needs a non-empty string 'prompt'"]


class _Tok:
    """A character-level stand-in for the tokenizer: ids are code points, 1 and 2 are the stop tokens."""

    def token_to_id(self, token):
        return {"<|end|>": 1, "<|endoftext|>": 2, "<|pad|>": 0}[token]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 2)


def test_rollout_weights_are_group_advantages_on_completion_tokens_only(table):
    """A group's advantages sum to zero, an all-equal group is skipped, prompt tokens carry no weight."""
    from glassforge.core.recipe import RLConfig
    from glassforge.train import rl

    cfg = RLConfig(group=2, prompts_per_step=2, seq_len=64, max_new_tokens=40)
    prompts = [rl.Prompt("What does json.dumps do?", tuple(range(10, 20))),
               rl.Prompt("What does json.dump do?", tuple(range(20, 30)))]
    answers = [[ord(c) for c in "Signature: json.dumps(obj, *, skipkeys=False)"] + [1],
               [ord(c) for c in "Signature: json.dump(obj, fp)"] + [1],
               [ord(c) for c in "nothing"] + [1], [ord(c) for c in "nothing"] + [1]]
    rollouts = rl.Rollouts(prompts, table, _Tok(), cfg, seed=0)
    original = rl.generate_batch
    rl.generate_batch = lambda model, ps, budget, sampling, seeds, stop: answers
    try:
        trained = rollouts.prepare(0, None, np.array([0, 1]))
    finally:
        rl.generate_batch = original
    x, y, extra = rollouts.batch([0, 1])
    w = extra["weights"]
    # as wide as the longest prompt and completion (10 + 46 tokens, less the last, which is only a target)
    assert x.shape == (4, 10 + len(answers[0]) - 1) and trained == len(answers[0]) + len(answers[1])
    first, second = w[0][w[0] != 0], w[1][w[1] != 0]
    assert len(first) == len(answers[0]) and (first > 0).all() and (second < 0).all()
    assert float(first[0] + second[0]) == pytest.approx(0.0)  # advantage = reward - the group's mean
    assert (w[2:] == 0).all()  # the second prompt's two answers score alike: no signal, skipped
    assert (y[0, :9] == -100).all() and y[0, 9] == answers[0][0]  # the first completion token, from the prompt's end
    assert rollouts.step_stats()["groups_used"] == 1


def test_cutting_a_batch_to_its_longest_row_changes_no_gradient(table):
    """Eager RL trains on batches cut after their longest row; a compiled trainer keeps seq_len for one shape.
    The cut columns are padding no earlier token attends to: the loss and every gradient are the uncut ones."""
    from glassforge.core.recipe import ModelConfig, RLConfig
    from glassforge.model.llama import Llama
    from glassforge.train import rl

    cfg = RLConfig(group=2, prompts_per_step=1, seq_len=48, max_new_tokens=30)
    prompts = [rl.Prompt("What does json.dumps do?", tuple(range(10, 20)))]
    answers = [[ord(c) for c in "Signature: json.dumps(obj)"] + [1], [ord(c) for c in "no"] + [1]]
    original = rl.generate_batch
    rl.generate_batch = lambda model, ps, budget, sampling, seeds, stop: answers
    batches = {}
    try:
        for fixed in (True, False):
            rollouts = rl.Rollouts(prompts, table, _Tok(), cfg, seed=0)
            rollouts.prepare(0, None, np.array([0]), fixed_shape=fixed)
            batches[fixed] = rollouts.batch([0])
    finally:
        rl.generate_batch = original
    assert batches[True][0].shape == (2, 48) and batches[False][0].shape == (2, 10 + len(answers[0]) - 1)
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    grads, losses = {}, {}
    for fixed, (x, y, extra) in batches.items():
        model.zero_grad()
        _, per_token = model(x, y, reduction="none")
        loss = (per_token * extra["weights"].reshape(-1)).sum()
        loss.backward()
        losses[fixed], grads[fixed] = loss.item(), [p.grad.clone() for p in model.parameters()]
    assert losses[False] == pytest.approx(losses[True], rel=1e-5) and losses[True] != 0
    for cut, full in zip(grads[False], grads[True]):
        torch.testing.assert_close(cut, full, rtol=1e-4, atol=1e-6)


def test_rescoring_finds_a_log_the_scoring_did_not_make(table):
    from glassforge.train.rl import rescore_rollouts

    tok = _Tok()
    prompt = [ord(c) for c in "What does json.dumps do?"]
    outs = [[ord(c) for c in "Signature: json.dumps(obj, *, skipkeys=False)"] + [1], [ord(c) for c in "no"] + [1]]
    scores = [score("What does json.dumps do?", tok.decode(o), table) for o in outs]
    rewards = np.array([s["reward"] for s in scores])
    line = {"step": 1, "rows": [0], "prompt_ids": [prompt], "completions": [outs], "rewards": [scores],
            "advantages": [[round(float(a), 6) for a in rewards - rewards.mean()]]}
    assert rescore_rollouts([json.dumps(line)], table, tok) == (1, 2, None)
    forged = json.loads(json.dumps(line))
    forged["rewards"][0][1]["reward"] = 2.0
    steps, _, why = rescore_rollouts([json.dumps(forged)], table, tok)
    assert why.startswith("step 1: completion 1 of a prompt scores")
    assert "malformed" in rescore_rollouts(["{not json"], table, tok)[2]


def test_the_rl_stage_needs_a_fine_tuned_model_and_functions(tmp_path):
    from glassforge.core.errors import UserError
    from glassforge.core.recipe import dump_recipe, load_recipe
    from glassforge.core.runfolder import Run
    from glassforge.train.rl import run_rl

    run = Run.create(tmp_path / "run")
    recipe = load_recipe("tiny")
    recipe.rl.enabled = True
    run.recipe.write_text(dump_recipe(recipe))
    with pytest.raises(UserError, match="no sft checkpoint"):
        run_rl(run)


def test_rl_command_errors_are_one_line(tmp_path, capsys):
    """`glassforge rl RUN` on a recipe that turns RL off, or on training documents that document no function."""
    from glassforge.cli import main
    from glassforge.core.recipe import dump_recipe, load_recipe
    from glassforge.core.runfolder import Run

    run = Run.create(tmp_path / "run")
    recipe = load_recipe("tiny")
    recipe.rl.enabled = False
    run.recipe.write_text(dump_recipe(recipe))
    assert main(["rl", str(run.root)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "[rl] enabled = false; set it to true" in err and "Traceback" not in err

    from glassforge.train.rl import rl_examples

    recipe.rl.enabled = True
    run.recipe.write_text(dump_recipe(recipe))
    run.documents.parent.mkdir(parents=True, exist_ok=True)
    run.documents.write_text(json.dumps({"id": "a:1", "split": "train", "text": "Plain prose, no function."}) + "\n")
    from glassforge.core.errors import UserError

    with pytest.raises(UserError, match="the reward table is empty"):
        rl_examples(run, tok=None)


def test_rollouts_weigh_the_trainers_loss(table):
    """The trainer's weighted loss is the policy gradient: a step raises the log-probability of the answers
    with positive advantage and lowers the others'."""
    from glassforge.core.recipe import ModelConfig
    from glassforge.model.llama import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32))
    x = torch.randint(3, 128, (2, 16))
    y = x.roll(-1, 1)
    w = torch.zeros(2, 16)
    w[0, 8:] = 1.0
    w[1, 8:] = -1.0

    def logp():
        with torch.no_grad():
            lp = torch.log_softmax(model(x)[0].float(), -1).gather(-1, y[..., None])[..., 0]
        return (lp[:, 8:]).sum(1)

    before = logp()
    _, losses = model(x, y, reduction="none")
    (losses * w.reshape(-1)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = logp()
    assert after[0] > before[0] and after[1] < before[1]
