"""The web page of `glassforge serve`: chat with the model, see where its words came from.

`mount(app, release_dir, facts)` adds three things to the server's FastAPI app:

    GET /               the page (static/index.html): chat, traces, model facts
    GET /static/NAME    its script and style sheet (static/app.js, style.css)
    GET /facts          JSON the page's "model facts" panel is built from

Why it is built this way:

- No build step and no network: the page is three plain files shipped in the
  package (`static/*` is package data), with no framework, no CDN and no web
  fonts, so it works on an air-gapped machine exactly as on a laptop.
- The page talks to the server only through the public API (streamed
  `POST /v1/chat/completions`, `POST /v1/trace`) plus `/facts`, so what it
  shows is what any client can check.
- `/facts` is computed once, when the server starts: the release's data
  summary, recipe, training log, evaluation and attestation are read from
  disk, and every file hash and attestation claim is checked with
  `glassforge.release.verify.verify_release` (hashes only, never a training
  replay). The data figures come from `data_summary.json`, the JSON the data
  card is rendered from, and the evaluation rows from eval.json through the
  same `results_rows` as the model card's table: nothing is parsed back out
  of Markdown, so a card's wording can change without the page breaking.
  The answer embeds the loss curves as PNG data URIs, so `<img>` tags need no
  second request (which could not carry the API key's Authorization header).
- The page and its two static files are safe to serve without the API key
  (they hold nothing of the model); `is_public_path` says which paths those are,
  for the server's key check. `/facts` follows the key like the API does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glassforge.core.errors import UserError
from glassforge.core.recipe import parse_recipe
from glassforge.core.runfolder import Release, resolve_release
from glassforge.core.templates import png_data_uri
from glassforge.evaluate.stage import results_rows
from glassforge.release.attest import attestation_summary
from glassforge.release.verify import check_summary
from glassforge.train.metrics import read_metrics

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The files under /static/, with their media types; nothing else is served from there.
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
                "index.html": "text/html; charset=utf-8"}
#: Content-Security-Policy of the page: only this server's own script, styles and data: images. The server's
#: Guard (guard.py) sends it with every HTML answer, /static/index.html as much as /.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: The longest text file we read to show (recipe.toml: generated and small; this bounds a hostile one).
MAX_TEXT_BYTES = 1 << 20


def is_public_path(path: str) -> bool:
    """Whether a request path is the page or one of its static files (served without the API key)."""
    return path == "/" or path == "/favicon.ico" or (path.startswith("/static/") and path[8:] in STATIC_FILES)


# --------------------------------------------------------------------------------------- facts


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _read_text(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(MAX_TEXT_BYTES)
    except (FileNotFoundError, IsADirectoryError):
        return None


#: The sources table of the page: its column headings, in the data card's order, and the summary's fields.
SOURCE_COLUMNS = (("source", "name"), ("kind", "kind"), ("licence", "license"), ("weight", "weight"),
                  ("seen", "seen"), ("kept", "kept"), ("train", "train"), ("val", "val"),
                  ("bytes kept", "bytes_kept"), ("tokens kept", "tokens_kept"))


def _count(n) -> str:
    """A figure as the data card prints it: 12,345; n/a when unknown."""
    if isinstance(n, bool) or n is None:
        return "n/a" if n is None else str(n)
    if isinstance(n, int):
        return f"{n:,}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def _eval_facts(release: Path) -> dict:
    """The evaluation table from the release's eval.json; no rows when there is none."""
    path = Release(release).eval_results
    results = _read_json(path)
    if results is None:
        return {"source": None, "rows": [], "decontamination": {}}
    return {"source": path.name, "rows": results_rows(results),
            "decontamination": (results.get("decontamination") or {}).get("removed") or {}}


def _recipe_facts(release: Path) -> dict | None:
    path = Release(release).recipe
    if not path.is_file():
        return None
    try:
        r = parse_recipe(path.read_bytes(), path.name)
    except UserError as e:
        return {"error": str(e)}

    def stage(t) -> dict:
        return {"steps": t.steps, "seq_len": t.seq_len, "batch_tokens": t.batch_tokens, "lr": t.lr,
                "schedule": t.schedule, "warmup_steps": t.warmup_steps, "optimizer": t.optimizer,
                "weight_decay": t.weight_decay}

    return {
        "name": r.name, "description": r.description, "seed": r.seed, "sha256": r.hash(),
        "sources": [{"name": s.name, "kind": s.kind, "license": s.license, "weight": s.weight} for s in r.data.sources],
        "tokenizer": {"vocab_size": r.tokenizer.vocab_size},
        "model": {"d_model": r.model.d_model, "n_layers": r.model.n_layers, "n_heads": r.model.n_heads,
                  "n_kv_heads": r.model.n_kv_heads, "max_seq_len": r.model.max_seq_len,
                  "vocab_size": r.model.vocab_size},
        "pretrain": stage(r.pretrain),
        "sft": {**stage(r.sft), "enabled": r.sft.enabled, "conversations": list(r.sft.conversations)},
        "toml": _read_text(path),
    }


def _training_facts(release: Path) -> dict:
    """Per stage: steps, tokens and the last train and validation loss in the release's metrics.jsonl."""
    out: dict[str, dict] = {}
    for row in read_metrics(Release(release).metrics):
        if not isinstance(row, dict) or "step" not in row:
            continue
        s = out.setdefault(row.get("stage", "pretrain"), {"steps": 0})
        s["steps"] = row["step"]
        for key in ("loss", "val_loss", "val_bpb", "tokens", "lr", "tokens_per_s"):
            if isinstance(row.get(key), (int, float)):
                s[key] = row[key]
    return out


def _data_facts(release: Path, pred: dict) -> dict:
    """The training data: the release's data_summary.json (sources table, counts) and the attested hashes."""
    files = Release(release)
    summary = _read_json(files.data_summary)
    out: dict[str, Any] = {"card": files.data_card.is_file()}
    if summary is not None:
        rows = [{column: _count(source.get(key)) for column, key in SOURCE_COLUMNS}
                for source in summary.get("sources") or [] if isinstance(source, dict)]
        out["sources_table"] = {"columns": [column for column, _ in SOURCE_COLUMNS], "rows": rows}
        n = {k: _count(summary.get(k)) for k in ("documents_kept", "documents_seen", "train_documents",
                                                 "val_documents", "bytes_kept", "bytes_seen")}
        out["summary"] = (f"Kept {n['documents_kept']} of {n['documents_seen']} documents ({n['train_documents']} "
                          f"training, {n['val_documents']} validation; {n['bytes_kept']} of {n['bytes_seen']} bytes).")
    data = pred.get("data") or {}
    merkle = (summary or {}).get("merkle") or {}
    out.update({"mix_merkle_root": data.get("mix_merkle_root") or merkle.get("mix"),
                "order_sha256": data.get("order_sha256") or (summary or {}).get("order_sha256"),
                "train_tokens": data.get("train_tokens"), "train_order_entries": data.get("train_order_entries")})
    index = _read_json(files.trace_index)
    if index:
        out["trace_index"] = {"tokens": index.get("tokens"), "documents": index.get("documents")}
    return out


def _attestation_facts(release: Path) -> dict | None:
    summary = attestation_summary(release)
    if summary is None:
        return None
    keep = ("subject", "weights_sha256", "predicate_type", "recipe_sha256", "tokenizer_sha256", "code", "platform",
            "training", "checkpoints", "trace_index_sha256", "signed")
    return {k: summary[k] for k in keep}


def collect_facts(release_dir: Path | str, verify: bool = True) -> dict:
    """Everything the "model facts" panel shows, read from a release folder (or a run folder holding one)."""
    release = resolve_release(release_dir)
    files = Release(release)
    config = _read_json(files.config) or {}
    stmt = _read_json(files.attestation) or {}
    pred = stmt.get("predicate") or {}
    curves = []
    for stage, title in (("pretrain", "pretraining"), ("sft", "chat fine-tuning")):
        uri = png_data_uri(files.loss_plot(stage))
        if uri:
            curves.append({"title": title, "file": files.loss_plot(stage).name, "src": uri})
    return {
        "model": release.parent.name if release.name == "release" else release.name,
        "config": {k: config.get(k) for k in ("architectures", "hidden_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads",
                                              "max_position_embeddings", "vocab_size") if k in config},
        "recipe": _recipe_facts(release),
        "data": _data_facts(release, pred),
        "training": _training_facts(release),
        "eval": _eval_facts(release),
        "attestation": _attestation_facts(release),
        "loss_curves": curves,
        "trace_available": files.trace_index.is_file(),
        "verification": check_summary(release) if verify else None,
    }


# --------------------------------------------------------------------------------------- routes


def mount(app, release_dir: Path | str, facts: dict | None = None, verify: bool = True) -> dict:
    """Add `GET /`, `GET /static/{name}` and `GET /facts` to a FastAPI app; return the facts served.

    release_dir: the release being served (or its run folder). facts: extra fields the server
    knows and the page uses, merged over the computed ones, e.g. {"model": name, "auth_required":
    bool, "max_context": int}. The release is checked here, once (file hashes, no replay), unless
    verify is False. Calling it again on the same app only merges facts in.
    """
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    already = getattr(app.state, "web_facts", None)
    if already is not None:  # mounted before (by the server): add the caller's fields, check nothing twice
        already.update(facts or {})
        return already
    for name in STATIC_FILES:
        if not (STATIC_DIR / name).is_file():
            raise UserError(f"{STATIC_DIR / name}: missing; the glassforge package is incomplete (reinstall it)")
    served = collect_facts(release_dir, verify=verify)
    served.update(facts or {})
    served.setdefault("auth_required", False)
    app.state.web_facts = served
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html, headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        media = STATIC_FILES.get(name)
        if media is None:
            return JSONResponse({"error": {"message": f"no static file {name!r}", "type": "not_found_error",
                                           "param": None, "code": None}}, status_code=404)
        return FileResponse(STATIC_DIR / name, media_type=media,
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    @app.get("/facts")
    async def get_facts() -> dict:
        return served

    return served


__all__ = ["mount", "collect_facts", "is_public_path", "STATIC_DIR", "STATIC_FILES"]
