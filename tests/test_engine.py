"""The continuous-batching engine: its fast path is the model's forward, batched decoding matches one-at-a-time
decoding, its limits hold, and its compiled decode steps keep the eager step's arithmetic.

Engines here do not compile their decode step (compile_decode=False) unless compiling is what is tested."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from glassforge.core.errors import UserError
from glassforge.model.llama import KVCache
from glassforge.serve.engine import Engine
from glassforge.serve.fastpath import AOT_GRAPHS, DECODE_WEIGHTS, CompileState, FastPath, compile_settings
from glassforge.serve.text import StopScanner
from glassforge.serve.types import ContextTooLong, QueueFull, SamplingParams
from helpers import wait_until


@pytest.fixture(scope="module")
def engine(random_model):
    # the f32 eager decode step: its results must equal the model's own forward exactly
    e = Engine(random_model, max_batch=4, max_queue=8, decode_weights="f32", compile_decode=False)
    yield e
    e.close()


def reference_greedy(engine, ids, n):
    """Plain single-sequence greedy decoding with the model's full forward (no cache)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = engine.model(torch.tensor([ids]))
            t = int(logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def ids_of(ev):
    return [t.id for t in ev.tokens]


PROMPTS = ["import json\n", "def dedent(text):\n    ", "The string module contains", "x"]


def test_batched_decoding_matches_reference(engine):
    """Sequences that join a running batch at different times decode exactly as they would alone."""
    prompts = [engine.encode(p) for p in PROMPTS]
    lengths = [20, 7, 15, 11]
    refs = [reference_greedy(engine, p, n) for p, n in zip(prompts, lengths)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0) for n in lengths]
    q: queue.SimpleQueue = queue.SimpleQueue()
    results: dict[int, list[int]] = {i: [] for i in range(4)}
    started = threading.Event()

    def sink(ev):
        results[ev.index] += ids_of(ev)
        started.set()
        q.put(ev)

    engine.submit([(0, prompts[0], params[0])], sink)
    started.wait(10)  # the first sequence is decoding; the others join between its steps
    engine.submit([(1, prompts[1], params[1])], sink)
    time.sleep(0.01)
    engine.submit([(2, prompts[2], params[2]), (3, prompts[3], params[3])], sink)
    done = 0
    while done < 4:
        if q.get(timeout=30).finish_reason:
            done += 1
    assert [results[i] for i in range(4)] == refs
    assert engine.stats["decode_steps"] > 0


def test_n_choices_share_a_prefill(engine):
    ids = engine.encode(PROMPTS[1])
    before = engine.stats["prefills"]
    evs = engine.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0), n=3)
    assert engine.stats["prefills"] == before + 1
    assert ids_of(evs[0]) == ids_of(evs[1]) == ids_of(evs[2]) == reference_greedy(engine, ids, 6)


def test_packed_prefill_equals_one_prompt_at_a_time(random_model):
    """Prompts prefilled in one forward give each prompt's own logits and cache rows."""
    e = Engine(random_model, max_batch=4, decode_weights="f32", compile_decode=False)
    try:
        prompts = [e.encode(p) for p in PROMPTS]
        with torch.no_grad():
            alone = torch.cat([e.fast.prefill(ids, e.cache, slot, False) for slot, ids in enumerate(prompts)])
            k_alone, v_alone = e.cache.k.clone(), e.cache.v.clone()
            e.cache.k.zero_()
            e.cache.v.zero_()
            packed = e.fast.prefill_packed([(ids, slot) for slot, ids in enumerate(prompts)], e.cache)
        assert packed.shape == (len(PROMPTS), e.vocab_size)
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e.cache.k, k_alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e.cache.v, v_alone, rtol=1e-5, atol=1e-5)
    finally:
        e.close()


def test_fast_path_is_the_models_forward(engine):
    """FastPath (f32) gives the logits and cache writes of the model's own forward: the plain forward for a
    whole prompt, and the cached forward (cache, positions, slots) for packed prompts and for decode steps
    where every slot is at its own position."""
    model, tol = engine.model, dict(rtol=1e-5, atol=1e-5)
    fast = FastPath(model, engine.max_context, "f32")  # its own cache: the engine's belongs to its thread
    prompts = [engine.encode(p) for p in PROMPTS]
    ours, theirs = (KVCache(model.cfg, len(prompts) + 1, engine.max_context + 1) for _ in range(2))
    with torch.no_grad():
        whole, _ = model(torch.tensor([prompts[1]]))
        torch.testing.assert_close(fast.prefill(prompts[1], ours, 0, True), whole[0], **tol)
        last = fast.prefill_packed([(ids, slot) for slot, ids in enumerate(prompts)], ours)
        want = [model(torch.tensor([ids]), cache=theirs, positions=torch.arange(len(ids))[None],
                      slots=torch.tensor([slot]))[0][0, -1] for slot, ids in enumerate(prompts)]
        torch.testing.assert_close(last, torch.stack(want), **tol)
        tokens = last.argmax(-1)
        positions = torch.tensor([len(ids) for ids in prompts])
        for _ in range(8):
            got = fast.decode(tokens, positions, ours)
            want, _ = model(tokens[:, None], cache=theirs, positions=positions[:, None],
                            slots=torch.arange(len(prompts)))
            torch.testing.assert_close(got, want[:, -1], **tol)
            tokens, positions = got.argmax(-1), positions + 1
    torch.testing.assert_close(ours.k, theirs.k, **tol)
    torch.testing.assert_close(ours.v, theirs.v, **tol)


def test_prompts_submitted_together_share_one_prefill_pass(random_model):
    e = Engine(random_model, max_batch=4, decode_weights="f32", compile_decode=False)
    try:
        prompts = [e.encode(p) for p in PROMPTS]
        refs = [reference_greedy(e, ids, 5) for ids in prompts]
        q: queue.SimpleQueue = queue.SimpleQueue()
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
        e.submit([(i, ids, params) for i, ids in enumerate(prompts)], q.put)
        got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        done = 0
        while done < len(prompts):
            ev = q.get(timeout=30)
            got[ev.index] += ids_of(ev)
            done += bool(ev.finish_reason)
        assert [got[i] for i in range(len(prompts))] == refs
        assert e.stats["prefills"] == len(prompts) and e.stats["prefill_passes"] == 1
    finally:
        e.close()


def test_seeded_sampling_is_independent_of_batch_companions(engine):
    ids = engine.encode(PROMPTS[0])
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    alone = engine.generate(ids, p)[0].text
    other = SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True)
    engine.submit([(0, engine.encode(PROMPTS[2]), other), (1, engine.encode(PROMPTS[3]), other)], lambda ev: None)
    together = engine.generate(ids, p)[0].text
    assert alone == together
    assert engine.generate(ids, SamplingParams(**{**p.__dict__, "seed": 43}))[0].text != alone


def scan(text: str, stops: list[str], pieces: int = 1) -> tuple[int | None, int]:
    """A StopScanner fed text in `pieces` equal parts: where the first stop begins, and the hold-back after."""
    scanner = StopScanner(stops)
    step = max(1, len(text) // pieces)
    for start in range(0, len(text), step):
        cut = scanner.feed(text[:start + step], start)
        if cut is not None:
            return cut, scanner.holdback()
    return None, scanner.holdback()


def test_stop_strings_are_found_and_held_back():
    assert scan("abc STOP def", ["STOP"]) == (4, 4)
    assert scan("abc ST", ["STOP"]) == (None, 2)
    for pieces in (1, 3, 12):  # however the text arrives
        assert scan("abc STOP def", ["STOP"], pieces)[0] == 4
        assert scan("abababc", ["ababc"], pieces)[0] == 2  # a partial match that fails falls back, not restarts
    assert scan("xxSTxxOP", ["OP", "ST"]) == (2, 2)
    assert scan("hello S", ["STOP"]) == (None, 1)
    assert scan("hello STO", ["STOP", "Ox"]) == (None, 3)
    assert scan("hello", ["STOP"]) == (None, 0)
    assert scan("aaab", ["aab", "b"])[0] == 1  # the stop that begins first wins, not the one that ends first
    assert scan("hello", ["", "lo"])[0] == 3  # an empty stop string is no stop


def test_stop_holdback_is_linear_in_the_stop_length():
    """The worst case for the old holdback (every prefix of every stop checked at every token): text that keeps
    ending in a long prefix of the stop. Its cost per token must not grow with the stop's length."""
    def seconds(stop_len: int) -> float:
        # the text never ends in a prefix of the first stop, and always in a long prefix of the second
        stops = ["b" + "a" * (stop_len - 1), "a" * (stop_len - 1) + "b"] * 4
        scanner = StopScanner(stops)  # the tables are built (and cached) before the clock starts
        text = ""
        started = time.perf_counter()
        for _ in range(2000):  # 2000 tokens of 4 characters each
            start = len(text)
            text += "aaaa"
            assert scanner.feed(text, start) is None
        assert scanner.holdback() == min(len(text), stop_len - 1)
        return time.perf_counter() - started

    short, long = seconds(64), seconds(8000)
    assert long < 4 * short + 0.05, (short, long)  # the old check took over a minute for the long stops


def test_stop_token_and_max_tokens(engine):
    ids = engine.encode(PROMPTS[0])
    ref = reference_greedy(engine, ids, 8)
    k = next((i for i in range(1, 8) if ref[i] not in ref[:i]), 0)
    ev = engine.generate(ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                             stop_token_ids={ref[k]}, logprobs=0))[0]
    assert ev.finish_reason == "stop" and ids_of(ev) == ref[:k + 1] and ev.completion_tokens == k + 1
    ev = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert ev.finish_reason == "length" and ev.completion_tokens == 4


def test_limits(engine):
    with pytest.raises(ContextTooLong):
        engine.check_request([1] * 10, SamplingParams(max_tokens=engine.max_context))
    with pytest.raises(UserError, match=f"token id {engine.vocab_size + 5} is outside the vocabulary"):
        engine.check_request([engine.vocab_size + 5], SamplingParams(max_tokens=1))
    with pytest.raises(UserError, match="the prompt is empty"):
        engine.check_request([], SamplingParams(max_tokens=1))
    # a generation makes at least one token; scoring and embeddings (max_tokens 0) may fill the context
    engine.check_prompt([1] * engine.max_context, 0)
    with pytest.raises(ContextTooLong):
        engine.check_request([1] * engine.max_context, SamplingParams(max_tokens=0))


def test_cancel_frees_the_slot_and_queue_bound(random_model):
    e = Engine(random_model, max_batch=1, max_queue=1, compile_decode=False)
    try:
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        got: queue.SimpleQueue = queue.SimpleQueue()
        seqs = e.submit([(0, e.encode("import"), long)], got.put)
        got.get(timeout=10)
        e.submit([(0, e.encode("x"), SamplingParams(max_tokens=1))], lambda ev: None)  # waits: slot taken
        with pytest.raises(QueueFull):
            e.submit([(0, e.encode("y"), SamplingParams(max_tokens=1))], lambda ev: None)
        e.cancel(seqs)
        wait_until(lambda: not (e.batch_size or e.queue_depth), 5, "cancelled sequences still held")
        assert e.stats["cancelled"] == 1 and e.stats["completion_tokens"] < 200
    finally:
        e.close()


def test_max_context_caps_generation(random_model):
    e = Engine(random_model, max_batch=2, max_context=16, compile_decode=False)
    try:
        ids = e.encode("import json")
        ev = e.generate(ids, SamplingParams(max_tokens=16 - len(ids), temperature=0, ignore_eos=True))[0]
        assert ev.finish_reason == "length" and ev.completion_tokens == 16 - len(ids)
        with pytest.raises(ContextTooLong):
            e.check_request(ids, SamplingParams(max_tokens=17 - len(ids)))
    finally:
        e.close()


# --- decode weights and the compiled step -----------------------------------------------------

# Largest |logit - f32 logit| allowed, as a fraction of the largest |f32 logit|: bf16 matrices round
# each weight to 8 bits of mantissa, int8 to 1/254 of its row's largest weight (and both round the
# activations entering a product to bf16). Agreement on a trained model: docs/PERFORMANCE.md.
TOLERANCE = {"f32": 1e-5, "bf16": 0.01, "int8": 0.03}


def teacher_forced_logits(e: Engine, ids: list[int], step, int8_rows: bool = False) -> torch.Tensor:
    """Decode-step logits along ids (each position fed the true previous token), in slot 0 and 1 at once;
    int8_rows: the step of large batches (int8 activations too)."""
    compile_settings()  # as on the engine thread: dynamo's settings and the step's thread count
    torch.set_num_threads(e.decode_threads)
    views = (list(e.cache.k.unbind(0)), list(e.cache.v.unbind(0)))
    rows = []
    with torch.no_grad():
        e.fast.prefill(ids[:2], e.cache, 0, False)
        e.fast.prefill(ids[:2], e.cache, 1, False)
        for p in range(2, len(ids)):  # the engine's decode steps start at position 1 (span 2)
            tok = torch.tensor([ids[p - 1], ids[p - 1]])
            pos = torch.tensor([p - 1, p - 1])
            rows.append(step(tok, pos, *views, p, int8_rows)[0])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def engines(random_model):
    """One idle engine per decode-weight format, its decode step compiled; used only through e.fast."""
    es = {w: Engine(random_model, max_batch=2, decode_weights=w, compile_decode=True) for w in DECODE_WEIGHTS}
    for e in es.values():
        e.wait_compiled(600)
    yield es
    for e in es.values():
        e.close()  # gives the process its thread count back


WEIGHT_CASES = [(w, False) for w in DECODE_WEIGHTS] + [("int8", True)]  # (weights, int8 activations)


@pytest.mark.parametrize("weights,int8_rows", WEIGHT_CASES)
def test_decode_weights_stay_close_to_f32(engines, weights, int8_rows):
    """bf16 and int8 decode matrices (and int8 activations in large batches) change logits by at most
    TOLERANCE of their scale; top-1 agrees wherever the f32 margin between the two best tokens is larger
    than twice that."""
    e = engines[weights]
    ids = e.encode("def dedent(text):\n    lines = text.splitlines()\n    return '\\n'.join(lines)\n")
    ref = teacher_forced_logits(engines["f32"], ids, engines["f32"].fast._decode)
    got = teacher_forced_logits(e, ids, e.fast._decode, int8_rows)
    tol = TOLERANCE[weights] * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol
    top2 = ref.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert clear.sum() >= len(ids) // 4  # the check below is not empty
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("weights,int8_rows", WEIGHT_CASES)
def test_compiled_decode_matches_eager(engines, weights, int8_rows):
    """The compiled step is the eager step's arithmetic: same greedy tokens, logits within float noise."""
    e = engines[weights]
    assert e.compiler.state is CompileState.ON, e.compiler.health()
    ids = e.encode("import json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n")
    eager = teacher_forced_logits(e, ids, e.fast._decode, int8_rows)
    compiled = teacher_forced_logits(e, ids, e.fast.step, int8_rows)
    assert e.fast.step is not e.fast._decode and e.fast.compile_error is None
    assert (compiled - eager).abs().max().item() <= 1e-4 * eager.abs().max().item() + 1e-5
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


def test_int8_activations_from_eight_rows(engines):
    """Batches of 8 rows or more round activations to int8 as well, and that changes the arithmetic."""
    fast = engines["int8"].fast
    assert [fast.int8_rows(b) for b in (1, 7, 8, 32)] == [False, False, True, True]
    assert not engines["bf16"].fast.int8_rows(32) and not engines["f32"].fast.int8_rows(32)
    ids = engines["int8"].encode("import os\n")
    weight_only = teacher_forced_logits(engines["int8"], ids, fast._decode)
    both = teacher_forced_logits(engines["int8"], ids, fast._decode, int8_rows=True)
    assert not torch.equal(weight_only, both)


def test_default_engine_greedy_equals_its_eager_step(random_model):
    """End to end through the engine (compiled, default weights): greedy tokens are those of the eager
    step of the same weights, for sequences decoded together."""
    compiled = Engine(random_model, max_batch=4, compile_decode=True)
    eager = Engine(random_model, max_batch=4, compile_decode=False)
    try:
        assert compiled.wait_compiled(600) is CompileState.ON
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
        for prompt in PROMPTS[:2]:
            ids = compiled.encode(prompt)
            a = [ids_of(ev) for ev in compiled.generate(ids, params, n=2)]
            b = [ids_of(ev) for ev in eager.generate(ids, params, n=2)]
            assert a == b
    finally:
        compiled.close()
        eager.close()


def test_ahead_of_time_steps_equal_the_compiled_steps(random_model):
    """The AOT graphs (batch 1, other batches, int8 rows from 8) write the cache and give the compiled
    step's logits; through the engine, greedy tokens are those of an engine without them, up to the
    end of the context."""
    aot = Engine(random_model, max_batch=8, max_context=64, compile_decode=True, decode_aot=True)
    plain = Engine(random_model, max_batch=8, max_context=64, compile_decode=True, decode_aot=False)
    try:
        assert aot.wait_compiled(900) is CompileState.ON and plain.wait_compiled(600) is CompileState.ON
        assert aot.compiler.aot is CompileState.ON and set(aot.fast.aot) == set(AOT_GRAPHS), aot.compiler.health()
        assert aot.compiler.health() == {"decode_compile": "on", "decode_aot": "on"}
        assert plain.compiler.aot is CompileState.OFF and not plain.fast.aot
        ids = aot.encode(PROMPTS[0])
        with torch.no_grad():
            for e in (aot, plain):
                e.fast.prefill(ids, e.cache, 0, False)
            tok, pos = torch.tensor([ids[-1]]), torch.tensor([len(ids)])
            got = aot.fast.decode(tok, pos, aot.cache)
            want = plain.fast.decode(tok, pos, plain.cache)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item() + 1e-5
        torch.testing.assert_close(aot.cache.k[:, 0, :, len(ids)], plain.cache.k[:, 0, :, len(ids)])
        params = SamplingParams(max_tokens=64 - len(ids), temperature=0, ignore_eos=True, logprobs=0)
        for n in (1, 2, 8):  # one graph each
            assert [ids_of(ev) for ev in aot.generate(ids, params, n=n)] == \
                [ids_of(ev) for ev in plain.generate(ids, params, n=n)]
    finally:
        aot.close()
        plain.close()


def test_compile_failure_keeps_the_eager_step(random_model, monkeypatch):
    def broken(self, cache, threads, stop):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(FastPath, "compile", broken)
    e = Engine(random_model, max_batch=2, decode_weights="f32", compile_decode=True, decode_aot=True)
    try:
        assert e.wait_compiled(60) is CompileState.FAILED
        assert e.compiler.reason == "RuntimeError: no C++ compiler"
        # /health keeps saying why, in the words it always used; the AOT steps, which wait for it, never start
        assert e.compiler.health() == {"decode_compile": "failed: RuntimeError: no C++ compiler",
                                       "decode_aot": "off"}
        ids = e.encode(PROMPTS[0])
        ev = e.generate(ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0))[0]
        assert ids_of(ev) == reference_greedy(e, ids, 5)
    finally:
        e.close()


def test_close_during_the_compile_stops_it(random_model):
    """An engine closed while its step compiles stops after the graph being made and never switches."""
    e = Engine(random_model, max_batch=2, compile_decode=True)
    e.close()
    assert e.wait_compiled(600) is CompileState.OFF
    assert e.fast.step == e.fast._decode


def test_unknown_decode_weights_is_a_user_error(random_model):
    with pytest.raises(UserError, match="decode weights 'fp4'"):
        Engine(random_model, decode_weights="fp4", compile_decode=False)
