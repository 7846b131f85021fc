"""Fine-tunings side by side from one pretrained model: what a share of pretraining text, packing or a
learning rate costs and buys.

From a built run's pretrained model, fine-tunes once per variant (each in its
own folder under OUT, the run's data, tokenizer and pretrain folders linked,
not copied). A variant is a `sft.pretrain_mix` share (a number) or `[sft]`
fields, `key=value` joined by commas. For each it prints the plain-text
validation loss (what fine-tuning costs the model as a language model), the
held-out assistant-token loss, and the pystdlib-names rates (evaluate/names.py:
greedy answers to phrasings fine-tuning never uses), next to the pretrained
model's plain-text loss; `--every-checkpoint` also scores the names at each
kept checkpoint (how the rates grow with the steps).

    .venv/bin/python bench/sft_mix.py runs/default /tmp/mix 0 0.05 0.1 0.25 --json mix.json
    .venv/bin/python bench/sft_mix.py runs/default /tmp/pack pack=false pack=true pack=true,lr=2e-3,muon_lr=0.04 \
        --every-checkpoint
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
from glassforge.core.runfolder import Run, latest_weights, list_checkpoints  # noqa: E402
from glassforge.evaluate.stage import load_model, names_task, val_loss_by_source  # noqa: E402
from glassforge.tokenizer.bpe import load_tokenizer  # noqa: E402
from glassforge.train.sft import run_sft  # noqa: E402


def plain_loss(run: Run, folder: Path) -> float:
    recipe = run.load_recipe()
    by_source = val_loss_by_source(load_model(recipe.model, latest_weights(folder)), run, recipe.pretrain.seq_len)
    return sum(v["loss"] * v["tokens"] for v in by_source.values()) / sum(v["tokens"] for v in by_source.values())


def apply_variant(cfg, variant: str):
    """The [sft] section with a variant applied: a number is a pretrain_mix share, else key=value pairs."""
    try:
        return dataclasses.replace(cfg, pretrain_mix=float(variant))
    except ValueError:
        pass
    fields, changes = {f.name for f in dataclasses.fields(cfg)}, {}
    for pair in variant.split(","):
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"sft.{key}: no such field (known: {', '.join(sorted(fields))})")
        old = getattr(cfg, key)
        changes[key] = value.lower() in ("1", "true", "on") if isinstance(old, bool) else type(old)(value)
    return dataclasses.replace(cfg, **changes)


def names_line(names: dict) -> str:
    return (f"names right {names['train']['right_name']:.3f} (training modules) {names['held_out']['right_name']:.3f} "
            f"(held out), exact signature {names['train']['exact_signature']:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder whose pretrain stage is done")
    p.add_argument("out", help="a new folder for the fine-tunings")
    p.add_argument("variants", nargs="+", help="sft.pretrain_mix shares (0: none) or key=value[,key=value] of [sft]")
    p.add_argument("--every-checkpoint", action="store_true", help="score the names at every kept checkpoint")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    src, out = Path(args.run).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    source = Run(src)
    rows = {"pretrained": {"plain_loss": plain_loss(source, source.pretrain)}}
    print(f"pretrained model: plain-text loss {rows['pretrained']['plain_loss']:.3f}")
    for variant in args.variants:
        folder = out / variant.replace("=", "-").replace(",", "_")
        folder.mkdir()
        shutil.copyfile(src / "state.json", folder / "state.json")
        for name in ("data", "tokenizer", "pretrain"):
            (folder / name).symlink_to(src / name)
        recipe = load_recipe(src / "recipe.toml")
        recipe.sft = apply_variant(recipe.sft, variant)
        (folder / "recipe.toml").write_text(dump_recipe(recipe))
        run = Run(folder)
        t = time.perf_counter()
        summary = run_sft(run)
        seconds = time.perf_counter() - t
        tok = load_tokenizer(run.tokenizer)
        if args.every_checkpoint:
            for step, ckpt in list_checkpoints(run.sft)[:-1]:
                print(f"{variant} at step {step}: {names_line(names_task(run, load_model(recipe.model, ckpt), tok))}")
        names = names_task(run, load_model(recipe.model, latest_weights(run.sft)), tok)
        row = {"seconds": round(seconds, 1), "plain_loss": plain_loss(run, run.sft),
               "assistant_loss": summary["val_loss"],
               **{f"{which}_{key}": names[which][key] for which in names for key in ("right_name", "exact_signature")},
               "names_n": {which: names[which]["n"] for which in names}}
        rows[variant] = row
        print(f"{variant}: plain-text loss {row['plain_loss']:.3f}, held-out assistant loss "
              f"{row['assistant_loss']:.3f}, {names_line(names)}; {seconds:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
