"""What mixing pretraining text into fine-tuning costs and buys: one fine-tuning per share, side by side.

From a built run's pretrained model, fine-tunes once per `sft.pretrain_mix`
share given (each in its own folder under OUT, the run's data, tokenizer and
pretrain folders linked, not copied), and prints for each: the plain-text
validation loss (what fine-tuning costs the model as a language model), the
held-out assistant-token loss, and the pystdlib-names rates (evaluate/names.py:
greedy answers to phrasings fine-tuning never uses), next to the pretrained
model's plain-text loss.

    .venv/bin/python bench/sft_mix.py runs/default /tmp/mix 0 0.05 0.1 0.25 --json mix.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glassforge.core.recipe import dump_recipe, load_recipe  # noqa: E402
from glassforge.core.runfolder import Run, latest_weights  # noqa: E402
from glassforge.evaluate.stage import load_model, names_task, val_loss_by_source  # noqa: E402
from glassforge.tokenizer.bpe import load_tokenizer  # noqa: E402
from glassforge.train.sft import run_sft  # noqa: E402


def plain_loss(run: Run, folder: Path) -> float:
    recipe = run.load_recipe()
    by_source = val_loss_by_source(load_model(recipe.model, latest_weights(folder)), run, recipe.pretrain.seq_len)
    return sum(v["loss"] * v["tokens"] for v in by_source.values()) / sum(v["tokens"] for v in by_source.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder whose pretrain stage is done")
    p.add_argument("out", help="a new folder for the fine-tunings")
    p.add_argument("shares", nargs="+", type=float, help="sft.pretrain_mix values (0: none)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    src, out = Path(args.run).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    source = Run(src)
    rows = {"pretrained": {"plain_loss": plain_loss(source, source.pretrain)}}
    print(f"pretrained model: plain-text loss {rows['pretrained']['plain_loss']:.3f}")
    for share in args.shares:
        folder = out / f"mix-{share:g}"
        folder.mkdir()
        shutil.copyfile(src / "state.json", folder / "state.json")
        for name in ("data", "tokenizer", "pretrain"):
            (folder / name).symlink_to(src / name)
        recipe = load_recipe(src / "recipe.toml")
        recipe.sft.pretrain_mix = share
        (folder / "recipe.toml").write_text(dump_recipe(recipe))
        run = Run(folder)
        t = time.perf_counter()
        summary = run_sft(run)
        seconds = time.perf_counter() - t
        names = names_task(run, load_model(recipe.model, latest_weights(run.sft)), load_tokenizer(run.tokenizer))
        row = {"seconds": round(seconds, 1), "plain_loss": plain_loss(run, run.sft),
               "assistant_loss": summary["val_loss"],
               **{f"{which}_{key}": names[which][key] for which in names for key in ("right_name", "exact_signature")},
               "names_n": {which: names[which]["n"] for which in names}}
        rows[f"{share:g}"] = row
        print(f"pretrain_mix {share:g}: plain-text loss {row['plain_loss']:.3f}, held-out assistant loss "
              f"{row['assistant_loss']:.3f}, names right {row['train_right_name']:.3f} (training modules) "
              f"{row['held_out_right_name']:.3f} (held out), exact signature {row['train_exact_signature']:.3f}; "
              f"{seconds:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
