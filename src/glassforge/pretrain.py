"""The `pretrain` stage: a base model from the token shards.

Windows of `seq_len + 1` tokens over the shuffled training stream go through
the shared trainer (`train.py`); validation loss and bits per byte are measured
on the validation stream. Output: `pretrain/checkpoints/`, `metrics.jsonl` and
`loss.png`.
"""

from __future__ import annotations

from glassforge.errors import UserError
from glassforge.runfolder import Run
from glassforge.shards import TokenStream
from glassforge.train import Windows, train


def run_pretrain(run: Run) -> dict:
    recipe = run.load_recipe()
    if not (run.data / "shards.json").is_file():
        raise UserError(f"{run.root}: no token shards; run the data and tokenizer stages first")
    cfg = recipe.pretrain
    train_set = Windows(TokenStream(run.data, "train"), cfg.seq_len)
    val_stream = TokenStream(run.data, "val")
    val_set = Windows(val_stream, cfg.seq_len) if len(val_stream) > cfg.seq_len else None
    if cfg.seq_len > recipe.model.max_seq_len:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}")
    from glassforge.build import stage_input_hash

    # Checkpoints carry the stage's input hash: they are resumed only for the same recipe and data.
    result = train(recipe.model, train_set, val_set, cfg, run.pretrain, recipe.seed,
                   stage_input_hash(run, "pretrain"), label="pretrain")
    return {"steps": result.steps, "tokens": result.tokens, "loss": result.final_loss,
            "val_loss": result.val_loss, "val_bpb": result.val_bpb, "seconds": round(result.seconds, 1)}
