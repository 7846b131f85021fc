"""Automatic prefix caching (serve/prefix.py): the same outputs as without it, the reuse it reports, and what
it must never reuse."""

from __future__ import annotations

import queue

import pytest
import torch

from helpers import engine_server, make_random_model_folder, metrics_of, wait_until

openai = pytest.importorskip("openai")

SYSTEM = {"role": "system", "content": "You answer questions about the Python standard library, briefly, and "
                                       "always name the module a function comes from."}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_random_model_folder(tmp_path_factory.mktemp("prefix_model"), max_seq_len=1024)


def engine_of(folder, cache: bool, max_batch: int = 4):
    from glassforge.serve.engine import Engine

    return Engine(folder, max_batch=max_batch, compile_decode=False, prefix_cache=cache)


def chat_ids(engine, messages):
    from glassforge.tokenizer.bpe import render_chat

    return engine.encode(render_chat(messages, True))


def greedy(n: int, **kw):
    from glassforge.serve.types import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, logprobs=0, **kw)


def conversation(engine, turns: int) -> list[tuple[str, list[int], int, list[float]]]:
    """A multi-turn chat, each reply fed back: (text, token ids, cached tokens, log-probs) per turn."""
    messages, out = [SYSTEM], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what does json.dumps do with indent?"})
        ev = engine.generate(chat_ids(engine, messages), greedy(16))[0]
        out.append((ev.text, [t.id for t in ev.tokens], ev.cached_tokens, [t.logprob for t in ev.tokens]))
        messages.append({"role": "assistant", "content": ev.text})
    return out


def test_a_conversation_is_the_same_with_and_without_the_cache(folder):
    plain, cached = engine_of(folder, False), engine_of(folder, True)
    try:
        a, b = conversation(plain, 4), conversation(cached, 4)
        assert [t[:2] for t in a] == [t[:2] for t in b]  # text and token ids
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x[3]), torch.tensor(y[3]), atol=1e-5, rtol=0)
        assert [t[2] for t in a] == [0, 0, 0, 0]
        # each turn reuses the whole previous prompt (not the reply: decode steps computed its keys)
        lengths, messages = [], [SYSTEM]
        for turn, t in enumerate(a):
            messages.append({"role": "user", "content": f"Question {turn}: what does json.dumps do with indent?"})
            lengths.append(len(chat_ids(plain, messages)))
            messages.append({"role": "assistant", "content": t[0]})
        assert [t[2] for t in b] == [0] + lengths[:-1]
        assert cached.stats["prefix_cache_hits"] == sum(lengths[:-1])
        assert cached.stats["prefix_cache_queries"] == plain.stats["prefix_cache_queries"] == sum(lengths)
    finally:
        plain.close()
        cached.close()


def test_a_running_sequence_shares_its_system_prompt(folder):
    from glassforge.serve.prefix import MIN_REUSE

    first = chat_ids(engine_of_cached := engine_of(folder, True), [SYSTEM, {"role": "user", "content": "hello"}])
    second = chat_ids(engine_of_cached, [SYSTEM, {"role": "user", "content": "what is os.path.join?"}])
    plain = engine_of(folder, False)
    try:
        want = plain.generate(second, greedy(12))[0]
        q: queue.SimpleQueue = queue.SimpleQueue()
        running = engine_of_cached.submit([(0, first, greedy(200, ignore_eos=True))], q.put)
        wait_until(lambda: running[0].out_ids, 30, "the first sequence never started")
        got = engine_of_cached.generate(second, greedy(12))[0]
        assert not running[0].done  # it was copied from while it ran
        shared = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
        assert got.cached_tokens == shared >= MIN_REUSE
        assert got.text == want.text and [t.id for t in got.tokens] == [t.id for t in want.tokens]
        engine_of_cached.cancel(running)
    finally:
        plain.close()
        engine_of_cached.close()


def test_a_free_slot_keeps_its_prefix_while_other_slots_decode(folder):
    # slot 0 finishes first and rides along the longer sequence's decode steps as a dummy row at position 0:
    # its cached prefix must come out of them intact
    plain, cached = engine_of(folder, False), engine_of(folder, True)
    try:
        short = chat_ids(plain, [SYSTEM, {"role": "user", "content": "a short question"}])
        other = plain.encode("an unrelated long prompt " * 4)
        q: queue.SimpleQueue = queue.SimpleQueue()
        seqs = cached.submit([(0, short, greedy(2, ignore_eos=True)), (1, other, greedy(60, ignore_eos=True))],
                             q.put)
        wait_until(lambda: all(s.done for s in seqs), 60, "the two sequences never finished")
        assert cached.prefix.tokens[:2] == [short, other]  # short's slot is 0, below the other's
        follow = short + plain.encode("and a follow-up")
        want = plain.generate(follow, greedy(12))[0]
        got = cached.generate(follow, greedy(12))[0]
        assert got.cached_tokens == len(short)
        assert [t.id for t in got.tokens] == [t.id for t in want.tokens]
        torch.testing.assert_close(torch.tensor([t.logprob for t in got.tokens]),
                                   torch.tensor([t.logprob for t in want.tokens]), atol=1e-5, rtol=0)
    finally:
        plain.close()
        cached.close()


def test_the_compiled_and_ahead_of_time_decode_steps_give_the_same_outputs_with_the_cache(folder):
    # the path a served release takes: decode steps compiled, then ahead of time (the tests above run eager
    # steps); one engine, its cache off and then on, so both runs take the same compiled graphs
    from glassforge.serve.engine import Engine

    engine = Engine(folder, max_batch=4, compile_decode=True, decode_aot=True, prefix_cache=False)
    try:
        engine.wait_compiled(900)
        assert engine.compiler.health() == {"decode_compile": "on", "decode_aot": "on"}
        short = chat_ids(engine, [SYSTEM, {"role": "user", "content": "a short question"}])
        follow = short + engine.encode("and a follow-up")
        plain, want = conversation(engine, 4), engine.generate(follow, greedy(12))[0]
        engine.prefix.enabled = True
        cached = conversation(engine, 4)
        # a free slot's prefix riding 60 ahead-of-time decode steps as a dummy row comes out intact
        other = engine.encode("an unrelated long prompt " * 4)
        q: queue.SimpleQueue = queue.SimpleQueue()
        seqs = engine.submit([(0, short, greedy(2, ignore_eos=True)), (1, other, greedy(60, ignore_eos=True))], q.put)
        wait_until(lambda: all(s.done for s in seqs), 60, "the two sequences never finished")
        slots = engine.prefix.tokens
        assert slots.index(short) < slots.index(other)  # short's slot is below: it rode along as a dummy row
        got = engine.generate(follow, greedy(12))[0]
    finally:
        engine.close()
    assert [t[:2] for t in plain] == [t[:2] for t in cached]
    for x, y in zip(plain, cached):
        torch.testing.assert_close(torch.tensor(x[3]), torch.tensor(y[3]), atol=1e-4, rtol=0)
    assert cached[0][2] == 0 and all(turn[2] > 0 for turn in cached[1:])
    assert got.cached_tokens == len(short) and [t.id for t in got.tokens] == [t.id for t in want.tokens]
    torch.testing.assert_close(torch.tensor([t.logprob for t in got.tokens]),
                               torch.tensor([t.logprob for t in want.tokens]), atol=1e-4, rtol=0)


def test_prompt_logprobs_and_a_reused_slot_are_never_served_from_the_cache(folder):
    from glassforge.serve.types import SamplingParams

    engine = engine_of(folder, True, max_batch=1)
    try:
        a = chat_ids(engine, [SYSTEM, {"role": "user", "content": "first conversation"}])
        b = engine.encode("something else entirely, long enough to be worth caching " * 3)
        first = engine.generate(a, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
        again = engine.generate(a, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
        assert first.cached_tokens == again.cached_tokens == 0  # every position's logits were needed
        assert [t.logprob for t in again.prompt_logprobs] == [t.logprob for t in first.prompt_logprobs]
        assert engine.generate(a, greedy(1))[0].cached_tokens == len(a) - 1  # the last token is always computed
        assert engine.generate(b, greedy(1))[0].cached_tokens == 0  # the one slot now holds b: a is evicted
        assert engine.generate(a, greedy(1))[0].cached_tokens == 0
    finally:
        engine.close()


def test_placement_rules():
    from glassforge.serve.prefix import MIN_REUSE, PrefixCache, shared_length

    assert shared_length([1, 2, 3], [1, 2, 4]) == 2 and shared_length([1, 2], [1, 2, 3]) == 2
    assert shared_length([], [1]) == 0 and shared_length(list(range(1000)), list(range(999)) + [5]) == 999
    cache = PrefixCache(4)
    long = list(range(100))
    cache.hold(2, long[:40])
    cache.hold(3, long[:60])
    assert cache.place(long, free=[0, 1, 2], running=[3]) == (0, 3, 60)  # copy from the running slot
    assert cache.place(long, free=[0, 1, 2, 3], running=[]) == (3, None, 60)  # in place
    assert cache.place(long[:30] + [-1] * 70, free=[0, 1, 2], running=[3]) == (2, None, 30)
    assert cache.place(long[:MIN_REUSE - 1] + [-1], free=[1, 2], running=[3]) == (1, None, 0)  # too short
    assert cache.place(long[:41], free=[2], running=[]) == (2, None, 40)  # the last token left to compute
    assert PrefixCache(4, enabled=False).place(long, free=[2, 1], running=[]) == (1, None, 0)


# --- through the server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(folder):
    with engine_server(folder, max_batch=4, prefix_cache=True) as srv:
        yield srv


def test_usage_reports_cached_tokens_and_metrics_count_them(live):
    client = openai.OpenAI(base_url=live.base, api_key="x", max_retries=0, timeout=60)
    messages = [SYSTEM, {"role": "user", "content": "What is textwrap.dedent?"}]
    before = metrics_of(live.root)
    r1 = client.chat.completions.create(model=live.model, messages=messages, max_tokens=4, temperature=0)
    r2 = client.chat.completions.create(model=live.model, messages=messages, max_tokens=4, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1
    assert r2.choices[0].message.content == r1.choices[0].message.content
    chunks = list(client.chat.completions.create(model=live.model, messages=messages, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1
    resp = client.responses.create(model=live.model, input=messages, max_output_tokens=4, temperature=0)
    assert resp.usage.input_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1
    after = metrics_of(live.root)
    label = f'{{model_name="{live.model}"}}'
    assert after[f"vllm:prefix_cache_queries_total{label}"] - before.get(f"vllm:prefix_cache_queries_total{label}", 0) \
        == 4 * r1.usage.prompt_tokens
    assert after[f"vllm:prefix_cache_hits_total{label}"] - before.get(f"vllm:prefix_cache_hits_total{label}", 0) \
        == 3 * (r1.usage.prompt_tokens - 1)
