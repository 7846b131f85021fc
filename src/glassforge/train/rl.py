"""The `rl` stage: reinforcement learning with verifiable rewards, from the fine-tuned model.

Fine-tuning teaches the format of an answer ("Signature: os.path.join(a, *p)",
then the docstring); it does not make a small model name the function it was
asked about. The standard library is its own answer key, so the reward is
exact (train/rewards.py): right name, exact signature, overlap with the
docstring, scored from the run's own training documents.

Each step takes `prompts_per_step` prompts in the trainer's data order, samples
`group` completions of each at `temperature` from the model being trained
(model/generate.py and the one sampler, each completion from its own
generator seeded by (seed, step, row, sample), so a step's rollouts are a
function of the weights and the step alone), scores them and trains on them:

- advantage = reward minus the group's mean reward (the group is the
  baseline: no value model), not divided by the group's standard deviation,
  which Dr. GRPO (arXiv 2503.20783) shows favours questions that are too easy
  or too hard;
- groups whose rewards are all equal carry no signal and are skipped (DAPO's
  dynamic sampling, arXiv 2503.14476);
- the loss is token-level: every completion token's log-probability times its
  advantage, summed and divided by the number of such tokens in the global
  batch (DAPO; the trainer's own normalisation), so long answers are not
  down-weighted per token;
- one gradient step per batch of rollouts, on-policy, so the importance ratio
  is 1 and needs no clipping (nanochat's `chat_rl.py` makes the same choice);
- an optional per-token KL penalty towards the fine-tuned model (`kl`), folded
  into each token's advantage as InstructGPT folds it into the reward.

The trainer is the one pretraining and fine-tuning use (train/loop.py): the
rollouts are a source of examples it asks to `prepare` a step, so resume,
deterministic kernels, checkpoints, replay and torchrun all apply. Every
step's rollouts are logged (`rl/rollouts.jsonl`: prompt ids, completion ids,
reward components, advantages); the release carries the log, the attestation
its hash, and `glassforge verify` re-scores every logged completion.

Prompts: `pystdlib-names` asks about every public function of the training
modules (never those fine-tuning holds out), each in one of RL's own
phrasings (`RL_QUESTIONS`, used by neither fine-tuning nor evaluation), chosen
by the seed; a `.jsonl` file gives one {"prompt": ...} a
line (malformed lines are reported with their line numbers, skipped and
counted).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glassforge.core.errors import UserError
from glassforge.core.files import AtomicFile
from glassforge.core.recipe import RLConfig
from glassforge.core.runfolder import ROLLOUT_LOG, WEIGHTS, Run, list_checkpoints
from glassforge.core.stages import stage_input_hash
from glassforge.data.documents import iter_documents
from glassforge.model.generate import generate_batch
from glassforge.model.hf import load_weights
from glassforge.model.llama import Llama
from glassforge.model.sampling import Sampling
from glassforge.tokenizer.bpe import END, ENDOFTEXT, PAD, load_tokenizer, render_chat
from glassforge.train.conversations import held_out_module
from glassforge.train.loop import train
from glassforge.train.rewards import Entry, reward_table, score

@dataclass(frozen=True)
class Prompt:
    question: str
    ids: tuple[int, ...]  # the chat-rendered question, ready for the assistant's reply


# RL asks in phrasings of its own, neither fine-tuning's (train/conversations.py) nor evaluation's
# (evaluate/names.py): in fine-tuning's, where the fine-tuned model already answers best, 20 steps gave no
# significant gain (docs/PERFORMANCE.md, "RL"); in these, at temperature 0.7, two of three trials did.
RL_QUESTIONS = [
    "What is the purpose of {name}?",
    "Give me a short description of {name}.",
    "Help me understand {name}.",
    "What's {name} for?",
    "Tell me what {name} does.",
    "Show me the signature of {name} and what it does.",
]


def names_prompts(table: dict[str, Entry], seed: int) -> list[str]:
    """One question per public function of the modules fine-tuning trains on, in RL's own phrasings."""
    rng = random.Random(f"{seed}:rl-prompts")
    names = sorted(n for n in table if not n.startswith("os.path.") and not held_out_module(n.split(".")[0]))
    return [rng.choice(RL_QUESTIONS).format(name=n) for n in names]


def read_prompts_jsonl(path: Path) -> tuple[list[str], list[str]]:
    """(prompts, problems) from a JSONL file of {"prompt": "..."} lines; each problem names its line."""
    if not path.is_file():
        raise UserError(f"rl.prompts: {path}: no such file")
    prompts, problems = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path}:{lineno}: not JSON")
            continue
        text = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{path}:{lineno}: needs a non-empty string 'prompt'")
            continue
        prompts.append(text)
    return prompts, problems


def load_prompts(sources: list[str], table: dict[str, Entry], seed: int, tok, max_prompt_tokens: int
                 ) -> tuple[list[Prompt], dict]:
    """The recipe's RL prompts, tokenized as the chat template renders them; and a report of each source."""
    questions, report = [], {}
    for source in sources:
        if source == "pystdlib-names":
            got = names_prompts(table, seed)
            report[source] = {"prompts": len(got)}
        elif source.endswith(".jsonl"):
            got, problems = read_prompts_jsonl(Path(source))
            for p in problems:
                print(f"rl: skipped {p}", flush=True)
            report[source] = {"prompts": len(got), "skipped": len(problems), "problems": problems[:20]}
        else:
            raise UserError(f"rl.prompts: unknown source {source!r} (built in: pystdlib-names; or a .jsonl file)")
        questions += got
    prompts, too_long = [], 0
    for q in questions:
        ids = tok.encode(render_chat([{"role": "user", "content": q}], True), add_special_tokens=False).ids
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        prompts.append(Prompt(q, tuple(ids)))
    if too_long:
        report["too_long"] = too_long
    if not prompts:
        raise UserError("rl.prompts: no usable prompt (check rl.prompts and rl.seq_len)")
    return prompts, report


def _sample_seed(seed: int, step: int, position: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{position}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


class Rollouts:
    """The trainer's examples for RL: prompts whose completions the model being trained samples each step."""

    bytes_per_token = 1.0  # no bits-per-byte for rewards

    def __init__(self, prompts: list[Prompt], table: dict[str, Entry], tok, cfg: RLConfig, seed: int,
                 log_dir: Path | None = None, reference: Llama | None = None):
        self.prompts, self.table, self.tok, self.cfg, self.seed = prompts, table, tok, cfg, seed
        # one log per process under torchrun (each samples its own rows): rollouts.jsonl, rollouts.rank1.jsonl, ...
        rank = int(os.environ.get("RANK", "0"))
        name = ROLLOUT_LOG if rank == 0 else ROLLOUT_LOG.replace(".jsonl", f".rank{rank}.jsonl")
        self.log = Path(log_dir) / name if log_dir is not None else None
        self.reference = reference
        self.stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
        self.pad = tok.token_to_id(PAD)
        self._ready: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._fixed_shape = False
        self._stats: dict = {}
        self.report: dict = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def resume(self, step: int) -> None:
        """Drop logged steps past the checkpoint training resumes from (they are sampled again, identically)."""
        if self.log is None or not self.log.is_file():
            return
        kept = [line for line in self.log.read_text(encoding="utf-8").splitlines()
                if line.endswith("}") and json.loads(line)["step"] <= step]
        with AtomicFile(self.log, "w") as f:
            f.write("".join(line + "\n" for line in kept))

    def prepare(self, step: int, model: Llama, rows: np.ndarray, fixed_shape: bool = False) -> int:
        """Sample, score and weigh this step's completions for rows; return their trained tokens.

        fixed_shape (a compiled trainer): every batch is seq_len wide. Otherwise a batch is only as wide as
        its longest prompt and completion: the padding after it is attended by nothing before it (the
        attention is causal) and carries no target, so cutting it changes no gradient and saves its share of
        the step's forward and backward (docs/PERFORMANCE.md, "RL in the default build")."""
        cfg, G, T = self.cfg, self.cfg.group, self.cfg.seq_len
        rows = [int(r) for r in rows]
        prompts = [self.prompts[r] for r in rows for _ in range(G)]
        seeds = [_sample_seed(self.seed, step, i, g) for i in range(len(rows)) for g in range(G)]
        budget = max(1, min(cfg.max_new_tokens, T + 1 - max(len(p.ids) for p in prompts)))
        completions = generate_batch(model, [list(p.ids) for p in prompts], budget,
                                     Sampling(temperature=cfg.temperature), seeds, self.stop)
        texts = [self.tok.decode([t for t in ids if t not in self.stop]) for ids in completions]
        scores = [score(p.question, text, self.table) for p, text in zip(prompts, texts)]
        rewards = np.array([s["reward"] for s in scores]).reshape(len(rows), G)
        advantages = rewards - rewards.mean(1, keepdims=True)
        advantages[np.ptp(rewards, axis=1) == 0] = 0.0  # all equal: no signal, skipped
        x = torch.full((len(prompts), T), self.pad, dtype=torch.long)
        y = torch.full((len(prompts), T), -100, dtype=torch.long)
        w = torch.zeros((len(prompts), T), dtype=torch.float32)
        trained = 0
        for k, (p, ids) in enumerate(zip(prompts, completions)):
            seq = (list(p.ids) + ids)[:T + 1]
            n_prompt = len(p.ids)
            x[k, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[k, n_prompt - 1:len(seq) - 1] = torch.tensor(seq[n_prompt:])
            a = float(advantages.flat[k])
            if a:
                w[k, n_prompt - 1:len(seq) - 1] = a
                trained += len(seq) - n_prompt
        if cfg.kl and self.reference is not None:
            w += self._kl_shaping(model, x, y, w != 0)
        self._ready = [(r, x[i * G:(i + 1) * G], y[i * G:(i + 1) * G], w[i * G:(i + 1) * G])
                       for i, r in enumerate(rows)]
        self._fixed_shape = fixed_shape
        self._log(step, rows, prompts, completions, scores, advantages)
        names = [s["name"] for s in scores]
        self._stats = {"reward": round(float(rewards.mean()), 4), "right_name": round(float(np.mean(names)), 4),
                       "exact_signature": round(float(np.mean([s["signature"] for s in scores])), 4),
                       "groups_used": int((np.ptp(rewards, axis=1) > 0).sum())}
        return trained

    def _kl_shaping(self, model: Llama, x, y, mask) -> torch.Tensor:
        """-kl * (log pi - log pi_ref) at each trained token: the KL penalty as a per-token advantage."""
        def logp(m):
            logits, _ = m(x)
            lp = torch.log_softmax(logits.float(), -1)
            return lp.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        return torch.where(mask, -self.cfg.kl * (logp(model) - logp(self.reference)), torch.zeros_like(x,
                                                                                                      dtype=torch.float32))

    def batch(self, rows) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The prepared completions of rows (the next rows of this step, in the order prepare saw them)."""
        rows = [int(r) for r in rows]
        take, self._ready = self._ready[:len(rows)], self._ready[len(rows):]
        if [t[0] for t in take] != rows:
            raise RuntimeError("rollouts: batches asked for out of the order they were prepared in")
        x, y, w = (torch.cat([t[k] for t in take]) for k in (1, 2, 3))
        if not self._fixed_shape:
            width = int((y != -100).any(0).nonzero().max()) + 1 if (y != -100).any() else 1
            x, y, w = x[:, :width], y[:, :width], w[:, :width]
        return x, y, {"weights": w}

    def step_stats(self) -> dict:
        return self._stats

    def _log(self, step, rows, prompts, completions, scores, advantages) -> None:
        if self.log is None:
            return
        G = self.cfg.group
        line = {"step": step + 1, "rows": rows,
                "prompt_ids": [list(prompts[i * G].ids) for i in range(len(rows))],
                "completions": [completions[i * G:(i + 1) * G] for i in range(len(rows))],
                "rewards": [scores[i * G:(i + 1) * G] for i in range(len(rows))],
                "advantages": [[round(float(a), 6) for a in row] for row in advantages]}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())


def rl_examples(run: Run, tok, log_dir: Path | None = None, reference: Llama | None = None
                ) -> "Rollouts":
    """RL's source of examples for a run: its prompts, the reward table of its training documents (what a
    replay re-trains with too)."""
    recipe = run.load_recipe()
    cfg = recipe.rl
    table = reward_table(iter_documents(run))
    if not table:
        raise UserError("rl: the reward table is empty: the training documents hold no documented function "
                        "(the pystdlib source gives them)")
    prompts, report = load_prompts(cfg.prompts, table, recipe.seed, tok, cfg.seq_len - cfg.max_new_tokens)
    rollouts = Rollouts(prompts, table, tok, cfg, recipe.seed + 2, log_dir=log_dir, reference=reference)
    rollouts.report = report
    return rollouts


def run_rl(run: Run) -> dict:
    """RL from the fine-tuned model: the `rl` stage's entry function."""
    recipe = run.load_recipe()
    cfg = recipe.rl
    if not cfg.enabled:
        raise UserError(f"{run.recipe}: [rl] enabled = false; set it to true to run the rl stage")
    if cfg.seq_len > recipe.model.max_seq_len:
        raise UserError(f"rl.seq_len={cfg.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}")
    ckpts = list_checkpoints(run.sft)
    if not ckpts:
        raise UserError(f"{run.root}: the rl section starts from the fine-tuned model, and there is no sft "
                        f"checkpoint; enable [sft] and run `glassforge sft {run.root}` first")
    start = ckpts[-1][1] / WEIGHTS
    reference = None
    if cfg.kl:
        reference = Llama(recipe.model)
        load_weights(start, reference)
        reference.eval()
    rollouts = rl_examples(run, load_tokenizer(run.tokenizer), log_dir=run.rl, reference=reference)
    report, table = rollouts.report, rollouts.table
    result = train(recipe.model, rollouts, None, cfg, run.rl, recipe.seed + 2, stage_input_hash(run, "rl"),
                   init_weights=start, label="rl")
    return {"prompts": report, "reward_table": len(table), "steps": result.steps,
            "seconds": round(result.seconds, 1)}


def rescore_rollouts(lines, table: dict[str, Entry], tok) -> tuple[int, int, str | None]:
    """Score every logged completion again from the table and compare with the log: (steps, completions, the
    first disagreement or None). The reward is a pure function of the prompt, the completion and the table,
    so a log that was not made by this scoring, from these documents, disagrees somewhere."""
    stop = {tok.token_to_id(END), tok.token_to_id(ENDOFTEXT)}
    steps = completions = 0
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            groups = zip(entry["prompt_ids"], entry["completions"], entry["rewards"], entry["advantages"])
            for prompt_ids, outs, logged, advantages in groups:
                question = tok.decode(prompt_ids)
                got = [score(question, tok.decode([t for t in ids if t not in stop]), table) for ids in outs]
                if got != logged:
                    k = next(i for i, (a, b) in enumerate(zip(got, logged)) if a != b)
                    return steps, completions, (f"step {entry['step']}: completion {k} of a prompt scores {got[k]} "
                                                f"but the log says {logged[k]}")
                rewards = np.array([g["reward"] for g in got])
                want = rewards - rewards.mean() if np.ptp(rewards) > 0 else np.zeros_like(rewards)
                if [round(float(a), 6) for a in want] != advantages:
                    return steps, completions, f"step {entry['step']}: the logged advantages are not the group's"
                completions += len(outs)
            steps += 1
        except (ValueError, KeyError, TypeError) as e:
            return steps, completions, f"line {n} is malformed ({type(e).__name__}: {e})"
    return steps, completions, None
