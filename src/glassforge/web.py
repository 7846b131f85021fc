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
- `/facts` is computed once, when the server starts: the release's data card,
  recipe, training log, evaluation and attestation are read from disk, and
  every file hash and attestation claim is checked with
  `glassforge.verify.verify_release` (hashes only, never a training replay).
  The answer embeds the loss curves as PNG data URIs, so `<img>` tags need no
  second request (which could not carry the API key's Authorization header).
- The page and its two static files are safe to serve without the API key
  (they hold nothing of the model); `is_public_path` says which paths those are,
  for the server's key check. `/facts` follows the key like the API does.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

from glassforge.errors import UserError

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The files under /static/, with their media types; nothing else is served from there.
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
                "index.html": "text/html; charset=utf-8"}
#: Content-Security-Policy of the page: only this server's own script, styles and data: images.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: The longest data card / model card we read (they are generated and small; this bounds a hostile one).
MAX_CARD_BYTES = 1 << 20


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
            return f.read(MAX_CARD_BYTES)
    except (FileNotFoundError, IsADirectoryError):
        return None


def png_data_uri(path: Path) -> str | None:
    """A PNG file as a `data:image/png;base64,...` URI, or None when it is missing or not a PNG."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def markdown_tables(text: str) -> list[dict]:
    """Each pipe table of a markdown text: {"heading", "columns", "rows"}, heading being the last `#` line above it."""
    tables: list[dict] = []
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|?[\s:|-]+\|?", lines[i + 1].strip()) \
                and "-" in lines[i + 1]:
            columns = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = _cells(lines[i].strip())
                rows.append(dict(zip(columns, cells + [""] * (len(columns) - len(cells)))))
                i += 1
            tables.append({"heading": heading, "columns": columns, "rows": rows})
            continue
        i += 1
    return tables


def _cells(line: str) -> list[str]:
    inner = line.strip()
    if inner.startswith("|"):
        inner = inner[1:]
    if inner.endswith("|"):
        inner = inner[:-1]
    return [c.strip().strip("`") for c in inner.split("|")]


def eval_rows(results: dict) -> list[dict]:
    """eval.json as table rows {task, metric, value} (the same rows as the model card's table)."""
    rows: list[dict] = []
    for task, r in (results.get("tasks") or {}).items():
        if not isinstance(r, dict):
            continue
        if task.startswith("val-loss"):
            which = " (base model)" if "base" in task else ""
            for source, v in r.items():
                if isinstance(v, dict) and "loss" in v:
                    rows.append({"task": f"validation loss{which} ({source})", "metric": "nats/token",
                                 "value": f"{v['loss']:.3f}"})
                    if v.get("bpb") is not None:
                        rows.append({"task": f"validation loss{which} ({source})", "metric": "bits/byte",
                                     "value": f"{v['bpb']:.3f}"})
        else:
            for k, v in r.items():
                if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    label = f"{task} (n={r['n']})" if "n" in r else task
                    rows.append({"task": label, "metric": k, "value": f"{v:.3f}"})
    sft = results.get("sft") or {}
    if sft.get("base_val_loss") is not None and sft.get("val_loss") is not None:
        rows.append({"task": "held-out conversations", "metric": "assistant-token loss, base → fine-tuned",
                     "value": f"{sft['base_val_loss']:.3f} → {sft['val_loss']:.3f}"})
    return rows


def _eval_facts(release: Path) -> dict:
    """The evaluation table: the run's eval/eval.json beside the release, else the model card's table."""
    results = _read_json(release.parent / "eval" / "eval.json")
    if results is not None:
        return {"source": "eval/eval.json", "rows": eval_rows(results),
                "decontamination": (results.get("decontamination") or {}).get("removed") or {}}
    card = _read_text(release / "README.md") or ""
    for table in markdown_tables(card):
        if table["heading"].lower().startswith("evaluation"):
            rows = [{"task": r.get("task", ""), "metric": r.get("metric", ""), "value": r.get("value", "")}
                    for r in table["rows"]]
            return {"source": "README.md (model card)", "rows": rows, "decontamination": {}}
    return {"source": None, "rows": [], "decontamination": {}}


def _recipe_facts(release: Path) -> dict | None:
    from glassforge.recipe import parse_recipe

    path = release / "recipe.toml"
    if not path.is_file():
        return None
    try:
        r = parse_recipe(path.read_bytes(), "recipe.toml")
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
    from glassforge.train import read_metrics

    out: dict[str, dict] = {}
    for row in read_metrics(release / "metrics.jsonl"):
        if not isinstance(row, dict) or "step" not in row:
            continue
        s = out.setdefault(row.get("stage", "pretrain"), {"steps": 0})
        s["steps"] = row["step"]
        for key in ("loss", "val_loss", "val_bpb", "tokens", "lr", "tokens_per_s"):
            if isinstance(row.get(key), (int, float)):
                s[key] = row[key]
    return out


def _data_facts(release: Path, pred: dict) -> dict:
    card = _read_text(release / "DATA_CARD.md")
    out: dict[str, Any] = {"card": card is not None}
    if card:
        tables = markdown_tables(card)
        sources = next((t for t in tables if t["heading"].lower().startswith("source")), tables[0] if tables else None)
        if sources:
            out["sources_table"] = {"columns": sources["columns"], "rows": sources["rows"]}
        kept = re.search(r"^Kept .*$", card, re.M)
        if kept:
            out["summary"] = kept.group(0).replace("**", "")
    data = pred.get("data") or {}
    out.update({"mix_merkle_root": data.get("mix_merkle_root"), "order_sha256": data.get("order_sha256"),
                "train_tokens": data.get("train_tokens"), "train_order_entries": data.get("train_order_entries")})
    index = _read_json(release / "trace" / "index.json")
    if index:
        out["trace_index"] = {"tokens": index.get("tokens"), "documents": index.get("documents")}
    return out


def _attestation_facts(release: Path) -> dict | None:
    stmt = _read_json(release / "attestation.json")
    if stmt is None:
        return None
    pred = stmt.get("predicate") or {}
    subject = (stmt.get("subject") or [{}])[0]
    code = pred.get("code") or {}
    return {
        "subject": subject.get("name"), "weights_sha256": (subject.get("digest") or {}).get("sha256"),
        "predicate_type": stmt.get("predicateType"),
        "recipe_sha256": (pred.get("recipe") or {}).get("sha256"),
        "tokenizer_sha256": (pred.get("tokenizer") or {}).get("sha256"),
        "code": {"version": code.get("version"), "git_commit": code.get("git_commit"), "git_dirty": code.get("git_dirty")},
        "platform": pred.get("platform"),
        "training": pred.get("training"),
        "checkpoints": len(pred.get("checkpoints") or []),
        "trace_index_sha256": (pred.get("trace_index") or {}).get("sha256"),
        "signed": (release / "attestation.dsse.json").is_file(),
    }


def check_release(release: Path) -> dict:
    """Every file hash and attestation claim of the release (no replay): {"passed", "passed_count", "total", "failed", ...}."""
    from glassforge.verify import verify_release

    t0 = time.perf_counter()
    try:
        claims = verify_release(Path(release))
    except UserError as e:
        claims = [("release", False, str(e))]
    except Exception as e:  # noqa: BLE001 - a check that crashes is a check that did not pass; say why
        claims = [("release", False, f"the check itself failed: {type(e).__name__}: {e}")]
    failed = [{"name": n, "reason": r} for n, ok, r in claims if not ok]
    return {
        "passed": not failed and bool(claims),
        "passed_count": len(claims) - len(failed),
        "total": len(claims),
        "failed": failed,
        "claims": [{"name": n, "ok": bool(ok), "reason": r} for n, ok, r in claims],
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 3),
        "how": "file hashes and attestation claims (glassforge verify without --replay)",
    }


def collect_facts(release_dir: Path | str, verify: bool = True) -> dict:
    """Everything the "model facts" panel shows, read from a release folder (or a run folder holding one)."""
    from glassforge.generate import resolve_release

    release = resolve_release(release_dir)
    config = _read_json(release / "config.json") or {}
    stmt = _read_json(release / "attestation.json") or {}
    pred = stmt.get("predicate") or {}
    curves = []
    for name, title in (("loss.png", "pretraining"), ("sft_loss.png", "chat fine-tuning")):
        uri = png_data_uri(release / name)
        if uri:
            curves.append({"title": title, "file": name, "src": uri})
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
        "trace_available": (release / "trace" / "index.json").is_file(),
        "verification": check_release(release) if verify else None,
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
    page_headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html, headers=page_headers)

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


__all__ = ["mount", "collect_facts", "check_release", "is_public_path", "eval_rows", "markdown_tables",
           "png_data_uri", "STATIC_DIR", "STATIC_FILES"]
