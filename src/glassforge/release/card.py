"""The model card (README.md of the release): what the model is, what it was trained on, how to check it.

Rendered from `templates/model_card.md.j2` with the run's recipe, data
manifest head, training logs and evaluation; the YAML front matter is what
the Hugging Face Hub reads (licence, datasets, tags).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from glassforge import __version__
from glassforge.core.hashing import sha256_file
from glassforge.core.manifest import read_manifest_head
from glassforge.core.runfolder import Run
from glassforge.core.templates import render
from glassforge.evaluate.stage import results_rows
from glassforge.train.metrics import read_metrics

# Licence identifiers the Hugging Face Hub knows; anything else is `other` with its own name.
HUB_LICENSES = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0",
                "cc-by-nc-4.0", "gpl-2.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "odc-by", "odbl", "unlicense"}


def hub_license_lines(licenses: list[str]) -> list[str]:
    if len(licenses) == 1 and licenses[0].lower() in HUB_LICENSES:
        return [f"license: {licenses[0].lower()}"]
    return ["license: other", f"license_name: {'-'.join(name.lower() for name in licenses) or 'unknown'}"]


def optimizer_words(cfg) -> str:
    """The optimiser of a training section, as the model card states it."""
    if cfg.optimizer == "muon":
        return (f"Muon for the hidden matrices (peak learning rate {cfg.muon_lr}) and AdamW for embeddings and "
                f"norms (peak learning rate {cfg.lr})")
    return f"AdamW, peak learning rate {cfg.lr}"


def count_params(weights: Path) -> int:
    """Parameters in a safetensors file, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _last(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{values[-1]:.4f}" if values else "n/a"


def _first(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{values[0]:.4f}" if values else "n/a"


def model_card(run: Run) -> str:
    recipe = run.load_recipe()
    head = read_manifest_head(run)
    stage, weights = run.final_weights()
    evals = json.loads(run.eval_results.read_text()) if run.eval_results.is_file() else None
    return render("glassforge.release", "model_card.md.j2",
                  license_lines=hub_license_lines(sorted({s.license for s in recipe.data.sources})),
                  recipe=recipe, summary=head.get("summary", {}), stage=stage, version=__version__,
                  n_params=count_params(weights), pretrain=read_metrics(run.metrics("pretrain")),
                  sft=read_metrics(run.metrics("sft")), rl=read_metrics(run.metrics("rl")), last=_last, first=_first,
                  optimizer=optimizer_words,
                  eval_rows=results_rows(evals) if evals else [],
                  decontamination=(evals or {}).get("decontamination") if (evals or {}).get(
                      "decontamination", {}).get("removed") else None,
                  weights_sha256=sha256_file(weights), merkle=head.get("merkle") or {},
                  order_sha256=head.get("order_sha256"))
