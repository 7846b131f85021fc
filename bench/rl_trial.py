"""One RL trial from a built run's fine-tuned model: does RL raise the pystdlib-names rates?

Copies what RL reads from RUN (recipe, data, tokenizer, the pretrain and sft
folders, linked, not copied) into OUT, turns `[rl]` on with the given
overrides, runs the rl stage, and scores the names task (evaluate/names.py:
greedy answers to phrasings that neither fine-tuning nor RL uses) for the
fine-tuned and the RL model on the same prompts, with McNemar's exact test on
the paired outcomes. It prints the reward curve in steps of five, both models'
rates, their ratio, and the p-values.

    .venv/bin/python bench/rl_trial.py runs/default /tmp/rl-a steps=40 lr=2e-5 temperature=0.7
    .venv/bin/python bench/rl_trial.py runs/default /tmp/rl-b steps=40 lr=2e-4 kl=0.05 --json b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glassforge.core.recipe import dump_recipe, load_recipe  # noqa: E402
from glassforge.core.runfolder import Run, latest_weights  # noqa: E402
from glassforge.evaluate.names import mcnemar  # noqa: E402
from glassforge.evaluate.stage import load_model, names_task  # noqa: E402
from glassforge.tokenizer.bpe import load_tokenizer  # noqa: E402
from glassforge.train.rl import run_rl  # noqa: E402


def _override(cfg, pairs: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"rl.{key}: no such field (known: {', '.join(sorted(fields))})")
        old = getattr(cfg, key)
        changes[key] = value.split(",") if isinstance(old, list) else (
            value.lower() in ("1", "true", "on") if isinstance(old, bool) else type(old)(value))
    return dataclasses.replace(cfg, enabled=True, **changes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder whose sft stage is done")
    p.add_argument("out", help="a new folder for the trial")
    p.add_argument("overrides", nargs="*", help="rl fields, key=value")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    src, out = Path(args.run).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    for name in ("state.json",):
        shutil.copyfile(src / name, out / name)
    for name in ("data", "tokenizer", "pretrain", "sft"):
        (out / name).symlink_to(src / name)
    recipe = load_recipe(src / "recipe.toml")
    recipe.rl = _override(recipe.rl, args.overrides)
    (out / "recipe.toml").write_text(dump_recipe(recipe))
    run = Run(out)

    t = time.perf_counter()
    result = run_rl(run)
    seconds = time.perf_counter() - t
    metrics = [json.loads(line) for line in (run.rl / "metrics.jsonl").read_text().splitlines()]
    print(f"rl: {result['steps']} steps in {seconds:.0f} s; reward table {result['reward_table']} functions")
    for i in range(0, len(metrics), 5):
        chunk = metrics[i:i + 5]
        mean = {k: sum(m[k] for m in chunk) / len(chunk) for k in ("reward", "right_name", "exact_signature")}
        print(f"  steps {i + 1:3d}-{i + len(chunk):3d}: reward {mean['reward']:.3f}, right name "
              f"{mean['right_name']:.3f}, exact signature {mean['exact_signature']:.3f} (sampled)")

    tok = load_tokenizer(run.tokenizer)
    before = names_task(run, load_model(recipe.model, latest_weights(run.sft)), tok)
    after = names_task(run, load_model(recipe.model, latest_weights(run.rl)), tok)
    figures = {"overrides": args.overrides, "seconds": round(seconds, 1), "sets": {}}
    for which in before:
        row = {}
        for metric, key in (("name", "right_name"), ("signature", "exact_signature")):
            test = mcnemar(before[which]["outcomes"][metric], after[which]["outcomes"][metric])
            b, a = before[which][key], after[which][key]
            row[key] = {"before": b, "after": a, **test}
            ratio = f"{a / b:.2f}x" if b else "n/a"
            print(f"names {which} ({before[which]['n']} prompts): {key} {b:.3f} -> {a:.3f} ({ratio}); "
                  f"gained {test['gained']}, lost {test['lost']}, McNemar p = {test['p_value']:.3g}")
        figures["sets"][which] = row
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
