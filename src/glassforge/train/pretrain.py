"""The `pretrain` stage: a base model from the token shards.

Windows of `seq_len + 1` tokens over the shuffled training stream go through
the shared trainer (`train.py`); validation loss and bits per byte are measured
on the validation stream. Output: `pretrain/checkpoints/`, `metrics.jsonl` and
`loss.png`.

`replay_pretrain(run, from_step, to_step)` re-trains one interval between kept
checkpoints from the shards and says whether the weights and optimiser state
come out bit for bit as kept (what `glassforge verify --replay` checks).
"""

from __future__ import annotations

from glassforge.core.errors import UserError
from glassforge.core.runfolder import Run
from glassforge.core.stages import stage_input_hash
from glassforge.tokenizer.shards import TokenStream
from glassforge.train.loop import replay, train
from glassforge.train.order import Windows


def _inputs(run: Run):
    recipe = run.load_recipe()
    if not run.shards.is_file():
        raise UserError(f"{run.root}: no token shards; run the data and tokenizer stages first")
    cfg = recipe.pretrain
    if cfg.seq_len > recipe.model.max_seq_len:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}")
    return recipe, Windows(TokenStream(run, "train"), cfg.seq_len)


def _recipe_hash(run: Run) -> str:
    # Checkpoints carry the stage's input hash: they are resumed only for the same recipe and data.
    return stage_input_hash(run, "pretrain")


def run_pretrain(run: Run) -> dict:
    recipe, train_set = _inputs(run)
    cfg = recipe.pretrain
    val_stream = TokenStream(run, "val")
    val_set = Windows(val_stream, cfg.seq_len) if len(val_stream) > cfg.seq_len else None
    result = train(recipe.model, train_set, val_set, cfg, run.pretrain, recipe.seed, _recipe_hash(run),
                   label="pretrain")
    return {"steps": result.steps, "tokens": result.tokens, "loss": result.final_loss,
            "val_loss": result.val_loss, "val_bpb": result.val_bpb, "seconds": round(result.seconds, 1)}


def replay_pretrain(run: Run, from_step: int, to_step: int, recipe_hash: str | None = None) -> dict:
    """Re-train steps from_step..to_step of run/pretrain; see `glassforge.train.replay` for the result.

    recipe_hash defaults to this run's pretrain input hash; pass the one recorded in the
    start checkpoint's trainer.json when replaying a copy made elsewhere.
    """
    recipe, train_set = _inputs(run)
    if recipe_hash is None:
        recipe_hash = _recipe_hash(run)
    return replay(run.pretrain, recipe.model, train_set, recipe.pretrain, recipe.seed, recipe_hash,
                  from_step, to_step)
