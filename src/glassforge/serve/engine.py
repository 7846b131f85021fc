"""The inference engine behind `glassforge serve`, `glassforge chat` and `glassforge generate`: the scheduler.

One background thread owns the model and a `KVCache` with one slot per running
sequence (`max_batch` slots of `max_context` positions). It loops:

1. drop sequences whose client went away (their slot is free at once);
2. admit waiting sequences into free slots and prefill their prompts, the
   prompts admitted together in one forward pass (the `n` choices of one
   prompt share a prefill: the cache rows are copied, not recomputed);
3. run one decode step for every running sequence together: one forward pass
   over `[B, 1]` tokens, each at its own position in its own slot.

So requests that arrive while others decode join between two steps
(continuous batching) and never wait for a whole batch to finish. Only one
thread touches torch, which keeps the two CPU cores to one set of matmuls at a
time; other work that needs the model (embeddings, prompt scoring) is queued to
that thread too (`call`).

The rooms around it: the forward passes are `FastPath`'s (fastpath.py: the
same arithmetic as the model's forward with fewer, larger operations; int8,
compiled and ahead-of-time decode steps); tokens are chosen by the one sampler
(`glassforge.model.sampling.sample`: batched over rows with per-row parameters,
each sequence drawing from its own generator seeded from the request's seed and
the choice index, so a seed reproduces its output whatever shares the batch);
text, stop strings and their holdback are text.py's; which slot a prompt goes
to, and how much of it is cached already, prefix.py's; `response_format` JSON is
grammar.py's (llguidance, imported only when asked for). What goes in and
comes out is types.py's: results leave the engine as `Event`s through a
callback the caller supplies (the server hands them to its event loop).

A failure serves one request only. One sequence's bad value, or an exception
while sampling, detokenizing or matching its grammar, ends that sequence with
an error event naming its request's id (the log keeps the traceback), and the
others go on: a batched sample that fails is redone row by row, a packed
prefill group by group, so that only the rows that fail alone fail. Only a
failed decode forward, which every running sequence shares, ends them all.
Before, one request's `top_k` of 10**30 ended every stream on the server.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from glassforge.core.errors import UserError
from glassforge.core.runfolder import Release, resolve_release
from glassforge.model.hf import load_pretrained
from glassforge.model.llama import KVCache
from glassforge.model.sampling import sample
from glassforge.serve.fastpath import (
    DEFAULT_DECODE_WEIGHTS,
    BackgroundCompile,
    CompileState,
    FastPath,
    ThreadTuner,
    compile_settings,
)
from glassforge.serve.grammar import Grammars, consume
from glassforge.serve.prefix import PrefixCache
from glassforge.serve.sequence import Sequence, seqs_of
from glassforge.serve.text import OutputText
from glassforge.serve.types import (
    ContextTooLong,
    Event,
    QueueFull,
    SamplingParams,
    Sink,
    TokenLogprob,
    internal_error_message,
)
from glassforge.tokenizer.bpe import END, ENDOFTEXT, chat_template_of, load_tokenizer

PREFILL_PARALLEL_TOKENS = 128  # prompts at least this long are prefilled with every intra-op thread
PACKED_PREFILL_TOKENS = 2048  # prompts arriving together are prefilled in one forward up to this many tokens

log = logging.getLogger("glassforge.serve")


def _env_on(name: str) -> bool:
    """A switch that is on unless the environment says 0, off or nothing."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "off", "")


class Engine:
    """Continuous-batching generation over one model; thread-safe `submit`."""

    def __init__(self, folder: Path | str, max_batch: int = 16, max_context: int | None = None,
                 max_queue: int | None = None, dtype: torch.dtype = torch.float32,
                 decode_threads: int | None = None, decode_weights: str | None = None,
                 compile_decode: bool | None = None, decode_aot: bool | None = None,
                 prefix_cache: bool | None = None):
        if max_batch < 1:
            raise UserError(f"--max-batch {max_batch}: must be at least 1")
        self.folder = resolve_release(folder)
        self.model = load_pretrained(self.folder, dtype=dtype)
        self.cfg = self.model.cfg
        self.tokenizer = load_tokenizer(self.folder)
        self.chat_template = chat_template_of(self.folder)
        self.end_id = self.tokenizer.token_to_id(END)
        self.eot_id = self.tokenizer.token_to_id(ENDOFTEXT)
        self.eos_ids = {i for i in (self.end_id, self.eot_id) if i is not None}
        self.vocab_size = self.cfg.vocab_size
        self.grammars = Grammars(Release(self.folder).tokenizer_json, self.vocab_size, self.end_id)
        if max_context is None:
            max_context = self.cfg.max_seq_len
        if not 2 <= max_context <= self.cfg.max_seq_len:
            raise UserError(f"--max-context {max_context}: must be between 2 and the model's "
                            f"{self.cfg.max_seq_len}")
        self.max_context = max_context
        self.max_batch = max_batch
        self.max_queue = max_queue if max_queue is not None else max(64, 8 * max_batch)
        # at least 2 slots (a dimension of size 1 would be specialised by the compiled step, and recompile),
        # and one slot and one position more than are used: the ahead-of-time graphs cover sizes below
        # the cache's (FastPath.compile_aot)
        self.cache = KVCache(self.cfg, max(max_batch, 2) + 1, max_context + 1, dtype=dtype)
        # GLASSFORGE_DECODE_WEIGHTS: f32, bf16 or int8 matrices for decode steps (FastPath; the measured
        # choice is DEFAULT_DECODE_WEIGHTS, docs/PERFORMANCE.md); prefill always uses f32.
        weights = decode_weights or os.environ.get("GLASSFORGE_DECODE_WEIGHTS", "").strip().lower() or (
            DEFAULT_DECODE_WEIGHTS if dtype == torch.float32 else "f32")
        self.fast = FastPath(self.model, max_context, weights)
        # Threads: decode steps are many small operations, where a second intra-op thread mostly waits
        # for the scheduler (on 2 shared cores, and with the HTTP side needing a core, one thread was
        # several times faster, see docs/PERFORMANCE.md); long prompts are big matmuls and get them all.
        self.all_threads = torch.get_num_threads()
        # GLASSFORGE_DECODE_THREADS: a number pins it; "auto" measures 1 against all (ThreadTuner). The
        # default is 1: in the server the HTTP side and its clients need the other core, and the tuner lost
        # to a pinned single thread there (docs/PERFORMANCE.md).
        env_threads = os.environ.get("GLASSFORGE_DECODE_THREADS", "").strip().lower()
        if decode_threads is None and env_threads == "auto":
            self.tuner = ThreadTuner(sorted({1, self.all_threads}))
        else:
            fixed = decode_threads or (int(env_threads) if env_threads.isdigit() else 1)
            self.tuner = ThreadTuner([max(1, fixed)])
        self.decode_threads = self.tuner.options[0]
        # GLASSFORGE_DECODE_COMPILE=0: eager decode steps only; GLASSFORGE_DECODE_AOT=0: no ahead-of-time
        # steps (FastPath.compile_aot) after the compile
        compile_decode = _env_on("GLASSFORGE_DECODE_COMPILE") if compile_decode is None else compile_decode
        decode_aot = _env_on("GLASSFORGE_DECODE_AOT") if decode_aot is None else decode_aot
        self.compiler = BackgroundCompile(self.fast, self.cache, self.decode_threads, lambda: self._closed,
                                          compile_decode, decode_aot and max_context > 2)
        self.free_slots = list(range(max_batch - 1, -1, -1))  # popped from the end: lowest first
        # GLASSFORGE_PREFIX_CACHE=0 (or --no-prefix-cache): every prompt prefilled whole
        self.prefix = PrefixCache(self.cache.k.shape[1], _env_on("GLASSFORGE_PREFIX_CACHE")
                                  if prefix_cache is None else prefix_cache)
        self.running: list[Sequence] = []
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.cond = threading.Condition()
        self._groups = 0
        self._closed = False
        # counters read by /metrics
        self.stats = collections.Counter()
        self._token_cache: dict[int, str] = {}
        self.thread = threading.Thread(target=self._loop, name="glassforge-engine", daemon=True)
        self.thread.start()
        self.compiler.start()

    def wait_compiled(self, timeout: float | None = None) -> CompileState:
        """Block until the background compile (and the ahead-of-time steps after it) has finished or timeout;
        returns the compile's state."""
        return self.compiler.join(timeout)

    # --- the public side ------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_str(self, token_id: int) -> str:
        s = self._token_cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_cache[token_id] = s
        return s

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Raise UserError for an empty prompt or an id outside the vocabulary, ContextTooLong when the
        prompt and max_tokens more do not fit the context: the one context check, for every route."""
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) + max_tokens > self.max_context:  # first: it costs nothing, the scan below does
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """`check_prompt` for a generation, which always makes at least one token."""
        self.check_prompt(prompt_ids, max(params.max_tokens, 1))

    def submit(self, requests: list[tuple[int, list[int], SamplingParams]], sink: Sink,
               matchers: list | None = None, tag: str = "") -> list[Sequence]:
        """Queue sequences (choice index, prompt ids, params), all or none; events go to sink.

        matchers: one grammar matcher per request, built by the caller (`Grammars.matchers`) where building
        it would hold up the caller; without them, a request with a grammar gets one built here. tag: the
        request's id, for its errors."""
        for _, ids, params in requests:
            self.check_request(ids, params)
        with self.cond:
            if self._closed:
                raise QueueFull("the engine is shutting down")
            if len(self.waiting) + len(requests) > self.max_queue + max(0, len(self.free_slots)):
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (queue limit {self.max_queue})")
            seqs = []
            groups: dict[tuple, int] = {}
            for i, (index, ids, params) in enumerate(requests):
                key = (tuple(ids), id(params))
                if key not in groups:
                    self._groups += 1
                    groups[key] = self._groups
                matcher = matchers[i] if matchers is not None else (
                    self.grammars.matchers(params.grammar)[0] if params.grammar is not None else None)
                seqs.append(Sequence(index, ids, params, sink, groups[key], OutputText(self.tokenizer, params.stop),
                                     matcher, tag))
            self.waiting.extend(seqs)
            self.cond.notify()
        return seqs

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences and free their slots before the next step."""
        with self.cond:
            for s in seqs:
                s.cancelled = True
            self.cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the engine thread (between steps); its result comes back in a Future."""
        fut: Future = Future()
        self.jobs.put((fn, fut))
        with self.cond:
            self.cond.notify()
        return fut

    def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> list[Event]:
        """Blocking: run one prompt to the end; one merged Event per choice."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        self.submit([(i, prompt_ids, params) for i in range(n)], q.put)
        merged = {i: Event(index=i) for i in range(n)}
        finished = 0
        while finished < n:
            ev = q.get()
            if ev.error:
                raise RuntimeError(ev.error)
            finished += merged[ev.index].absorb(ev)
        return [merged[i] for i in range(n)]

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def close(self) -> None:
        with self.cond:
            self._closed = True
            self.cond.notify()
        self.thread.join(timeout=10)
        torch.set_num_threads(self.all_threads)  # the setting is process-wide: give it back

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """Mean-pooled final hidden states, L2-normalised (call on the engine thread via `call`)."""
        out = []
        for ids in batch:
            h = self.model.hidden_states(torch.tensor([ids]))[0].float().mean(0)
            out.append(F.normalize(h, dim=-1).tolist())
        return out

    @torch.inference_mode()
    def score(self, ids: list[int], k: int | None) -> list[TokenLogprob] | None:
        """Log-probs of a prompt's own tokens (call on the engine thread via `call`)."""
        if k is None:
            return None
        logits, _ = self.model(torch.tensor([ids]))
        return self._prompt_logprobs(ids, logits[0, :-1], k)

    # --- the engine thread --------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        compile_settings()
        while True:
            with self.cond:
                while (not self._closed and not self.waiting and not self.running and self.jobs.empty()):
                    self.cond.wait(timeout=1.0)
                if self._closed:
                    break
            try:
                self._run_jobs()
                self._reap()
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # the decode forward, which the running sequences share, failed (or a bug):
                self._fail(list(self.running), e)  # they end; the waiting ones go on
        for s in self.running + list(self.waiting):
            self._finish(s, "abort", error="the server is shutting down")

    def _run_jobs(self) -> None:
        while not self.jobs.empty():
            fn, fut = self.jobs.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

    def _reap(self) -> None:
        with self.cond:
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        for s in gone:
            s.done = True
            self.stats["cancelled"] += 1
        for s in [s for s in self.running if s.cancelled]:
            self._release(s)
            self.stats["cancelled"] += 1

    def _release(self, s: Sequence) -> None:
        s.done = True
        if s in self.running:
            self.running.remove(s)
        if s.slot >= 0:
            self.free_slots.append(s.slot)
            s.slot = -1

    def _admit(self) -> None:
        """Prefill waiting sequences into free slots, the prompts that fit a budget in one forward."""
        while True:
            batch = self._take_prefill_batch()
            if not batch:
                return
            try:
                self._prefill(batch)
            except Exception as e:
                if len(batch) == 1:
                    self._fail(batch[0], e)
                    continue
                for group in batch:  # each alone: a prefill rewrites only its own slots, so it can be redone
                    try:
                        self._prefill([group])
                    except Exception as e:  # one group's failure is its own
                        self._fail(group, e)

    def _take_prefill_batch(self) -> list[list[Sequence]]:
        """Groups (the choices of one prompt) to prefill together, their slots assigned.

        A prompt that asks for its log-probs is prefilled alone (it needs every position's logits);
        the others are packed up to PACKED_PREFILL_TOKENS, and a longer one goes alone.
        """
        batch: list[list[Sequence]] = []
        tokens = 0
        while self.free_slots:
            with self.cond:
                if not self.waiting:
                    break
                first = self.waiting[0]
                T = len(first.prompt_ids)
                alone = first.params.prompt_logprobs is not None
                if batch and (alone or tokens + T > PACKED_PREFILL_TOKENS):
                    break
                self.waiting.popleft()
                group = [first]
                while (self.waiting and self.waiting[0].group == first.group
                       and len(group) < len(self.free_slots)):
                    group.append(self.waiting.popleft())
            group = [s for s in group if not s.cancelled]
            if not group:
                continue
            if alone:  # its every position's logits are needed: none is taken from the cache
                first.slot = min(self.free_slots)
            else:
                first.slot, first.copy_from, first.cached = self.prefix.place(
                    first.prompt_ids, self.free_slots, [s.slot for s in self.running])
            self.free_slots.remove(first.slot)
            self.free_slots.sort(reverse=True)
            admitted = time.perf_counter()
            for s in group:
                if s is not first:
                    s.slot = self.free_slots.pop()
                s.timing.admitted = admitted
            batch.append(group)
            tokens += T
            if alone:
                break
        return batch


    def _prefill(self, batch: list[list[Sequence]]) -> None:
        firsts = [group[0] for group in batch]
        want_all = len(batch) == 1 and firsts[0].params.prompt_logprobs is not None
        tokens = sum(len(s.prompt_ids) for s in firsts)
        # while the decode step compiles, the thread count stays that of its graphs (they are guarded on it)
        long_prompt = tokens >= PREFILL_PARALLEL_TOKENS and self.compiler.state is not CompileState.COMPILING
        torch.set_num_threads(self.all_threads if long_prompt else self.decode_threads)
        for s in firsts:
            if s.copy_from is not None:  # a running sequence's prompt begins as this one: copy that part
                self.cache.k[:, s.slot, :, :s.cached] = self.cache.k[:, s.copy_from, :, :s.cached]
                self.cache.v[:, s.slot, :, :s.cached] = self.cache.v[:, s.copy_from, :, :s.cached]
        for s in seqs_of(batch):
            self.prefix.forget(s.slot)
        logits = self.fast.prefill_packed([(s.prompt_ids, s.slot) for s in firsts], self.cache, want_all,
                                          [s.cached for s in firsts])
        for group in batch:  # the other choices of the same prompt: copy the cache rows
            first, T = group[0], len(group[0].prompt_ids)
            for s in group[1:]:
                self.cache.k[:, s.slot, :, :T] = self.cache.k[:, first.slot, :, :T]
                self.cache.v[:, s.slot, :, :T] = self.cache.v[:, first.slot, :, :T]
            for s in group:
                self.prefix.hold(s.slot, s.prompt_ids)
            self.stats["prompt_tokens"] += T * len(group)
            self.stats["prefix_cache_queries"] += T
            self.stats["prefix_cache_hits"] += first.cached
        self.stats["prefills"] += len(batch)
        self.stats["prefill_passes"] += 1
        prompt_lp = None
        if want_all:
            first = firsts[0]
            prompt_lp = self._prompt_logprobs(first.prompt_ids, logits[:-1], first.params.prompt_logprobs)
            logits = logits[-1:]
        seqs = seqs_of(batch)
        rows = logits[torch.tensor([j for j, group in enumerate(batch) for _ in group])]
        self.running.extend(seqs)  # last: what can fail above may be redone (_admit), and below fails per sequence
        self._sample_and_emit(seqs, rows, prompt_lp)

    def _prompt_logprobs(self, ids: list[int], logits: torch.Tensor, k: int) -> list[TokenLogprob]:
        lp = torch.log_softmax(logits.float(), -1)
        chosen = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        tops = lp.topk(k, -1) if k > 0 else None
        strs = [self.token_str(t) for t in ids]
        out = [TokenLogprob(ids[0], strs[0], None, None, 0)]
        # each token's offset is the length of the text decoded before it (not the sum of token strings,
        # which differs where a character spans tokens)
        texts = self.tokenizer.decode_batch([ids[:i] for i in range(1, len(ids))], skip_special_tokens=False)
        for i in range(1, len(ids)):
            top = None
            if tops is not None:
                top = [(t, self.token_str(t), v) for t, v in zip(tops.indices[i - 1].tolist(),
                                                                 tops.values[i - 1].tolist())]
            out.append(TokenLogprob(ids[i], strs[i], chosen[i - 1], top, len(texts[i - 1])))
        return out

    def _step(self) -> None:
        batch = self.running
        S = max(s.slot for s in batch) + 1
        tokens = [0] * S
        positions = [0] * S
        for s in batch:
            tokens[s.slot] = s.out_ids[-1]
            positions[s.slot] = s.position
        # free slots below S ride along as dummy rows at position 0; those holding a cached prefix get their
        # position 0 back after the step
        held = self.prefix.held(set(range(S)) - {s.slot for s in batch})
        kept = (self.cache.k[:, held, :, 0].clone(), self.cache.v[:, held, :, 0].clone()) if held else None
        threads = self.tuner.pick(S) if self.compiler.state is not CompileState.COMPILING else self.decode_threads
        torch.set_num_threads(threads)
        t_step = time.perf_counter()
        all_logits = self.fast.decode(torch.tensor(tokens), torch.tensor(positions), self.cache)
        if kept is not None:
            self.cache.k[:, held, :, 0], self.cache.v[:, held, :, 0] = kept
        self.tuner.record(S, threads, time.perf_counter() - t_step)
        slots = [s.slot for s in batch]
        logits = all_logits if slots == list(range(S)) else all_logits[torch.tensor(slots)]
        self.stats["decode_steps"] += 1
        self._sample_and_emit(list(batch), logits, None)

    # --- sampling and results -------------------------------------------------------

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor,
                         prompt_lp: list[TokenLogprob] | None) -> None:
        """Choose each sequence's next token and take it in; a sequence that fails, alone, fails alone."""
        try:
            chosen = self._choose(seqs, logits)
        except Exception:
            chosen = []
            for i, s in enumerate(seqs):  # one row's values broke the batch: find which, keep the others
                try:
                    chosen += self._choose([s], logits[i:i + 1])
                except Exception as e:  # the point is to catch per row
                    self._fail([s], e)
                    chosen.append(None)
        now = time.perf_counter()
        for s, c in zip(seqs, chosen):
            if c is None:
                continue
            s.timing.token(now)
            try:
                self._append(s, c[0], c[1], prompt_lp)
            except Exception as e:  # noqa: BLE001 - detokenizing, stops, grammar: this sequence's own
                self._fail([s], e)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, tuple | None]]:
        """Each sequence's next token and, when it asked for them, its log-probs (the chosen one's, the top k)."""
        masked = logits
        if any(s.matcher is not None for s in seqs):
            # a grammar allows only the tokens that keep the output a valid prefix; log-probs stay the model's
            masked = logits.float().clone()
            for i, s in enumerate(seqs):
                if s.matcher is not None:
                    masked[i].masked_fill_(~self.grammars.allowed(s.matcher), float("-inf"))
        tokens = sample(masked, [s.params for s in seqs], [s.generator for s in seqs], [s.counts for s in seqs])
        want_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lps = {}
        if want_lp:
            rows = torch.log_softmax(logits[want_lp].float(), -1)
            kmax = max(seqs[i].params.logprobs for i in want_lp)
            tops = rows.topk(kmax, -1) if kmax > 0 else None
            for j, i in enumerate(want_lp):
                k = seqs[i].params.logprobs
                top = None
                if tops is not None:
                    top = [(t, self.token_str(t), v) for t, v in
                           zip(tops.indices[j, :k].tolist(), tops.values[j, :k].tolist())]
                lps[i] = (float(rows[j, tokens[i]]), top)
        return [(tok, lps.get(i)) for i, tok in enumerate(tokens)]

    def _fail(self, seqs: list[Sequence], e: BaseException) -> None:
        """End seqs with an error event that names their request, not the exception; the log keeps that."""
        tags = sorted({s.tag or "-" for s in seqs})
        log.error("glassforge serve: %d sequence(s) of request(s) %s failed", len(seqs), ", ".join(tags),
                  exc_info=e)
        for s in seqs:
            self._finish(s, "abort", error=internal_error_message(s.tag))

    def _append(self, s: Sequence, tok: int, lp, prompt_lp) -> None:
        p = s.params
        s.out_ids.append(tok)
        self.stats["completion_tokens"] += 1
        if p.penalised:
            if s.counts is None:
                s.counts = torch.zeros(self.vocab_size)
            s.counts[tok] += 1
        if lp is not None:
            s.pending.append(TokenLogprob(tok, self.token_str(tok), lp[0], lp[1], len(s.out.text)))
        is_stop_token = tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids)
        grammar_done = False
        if s.matcher is not None:
            grammar_done = consume(s.matcher, tok)
            is_stop_token = is_stop_token or tok == self.end_id
        finish = None
        if is_stop_token:
            finish = "stop"
        elif s.out.add(s.out_ids) or grammar_done:  # a stop string, or a complete grammar: nothing may follow
            finish = "stop"
        if finish is None and (len(s.out_ids) >= p.max_tokens or s.position + 1 >= self.max_context):
            finish = "length"
        if finish is None:
            text = s.out.releasable()
            if text or s.pending or prompt_lp is not None:
                self._emit(s, text, prompt_lp)
        else:
            if finish == "length" or grammar_done:  # flush any undecoded bytes
                s.out.flush(s.out_ids)
            self._finish(s, finish, prompt_lp=prompt_lp)

    def _emit(self, s: Sequence, text: str, prompt_lp, finish: str | None = None, error: str | None = None):
        ev = Event(index=s.index, text=text, tokens=s.pending, finish_reason=finish, error=error,
                   prompt_logprobs=prompt_lp if s.first_event else None,
                   prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.out_ids), cached_tokens=s.cached)
        s.pending = []
        s.first_event = False
        try:
            s.sink(ev)
        except Exception:  # the receiver is gone: treat like a disconnect
            s.cancelled = True

    def _finish(self, s: Sequence, reason: str, prompt_lp=None, error: str | None = None) -> None:
        if s.done:
            return
        s.timing.finished, s.timing.finish_reason = time.perf_counter(), ("error" if error is not None else reason)
        text = s.out.rest()
        self._release(s)
        self._emit(s, "" if error is not None else text, prompt_lp, finish=reason, error=error)
