"""`glassforge report RUN`: one self-contained HTML file that tells how a run went, for sharing.

The report holds, for a run folder: loss, learning-rate and throughput curves of
pretraining and chat fine-tuning (from each stage's `metrics.jsonl`), data
statistics (the data manifest's summary and the release's data card), the
evaluation table (`eval/eval.json`), and a summary of the release's attestation
with the result of checking its file hashes now.

Why a single file: it is meant to be mailed, attached to an issue or put on a
web page as it is. Styles are inline and every plot is a PNG embedded as a
base64 data URI, drawn with matplotlib's Agg backend through `Figure` directly
(no pyplot global state, no display), so the file opens offline and nothing
it shows can change under it. All text taken from the run is HTML-escaped.

A release folder on its own (no run around it) also works: its combined
`metrics.jsonl` (rows tagged by stage) and its cards stand in for the run's.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any, Iterable

from glassforge.errors import UserError
from glassforge.runfolder import atomic_write_text

STAGE_TITLES = {"pretrain": "Pretraining", "sft": "Chat fine-tuning"}

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d1f21;
  background: #fbfbfa; margin: 0; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; margin: 0.5rem 0; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.5rem; border-bottom: 1px solid #d9dcdf; padding-bottom: 0.2rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 0.4rem; }
table { border-collapse: collapse; margin: 0.4rem 0 0.8rem; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #d9dcdf; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.85em;
  overflow-wrap: anywhere; }
.plots { display: flex; flex-wrap: wrap; gap: 0.8rem; }
figure { margin: 0; background: #fff; border: 1px solid #d9dcdf; border-radius: 6px; padding: 0.4rem; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 0.8rem; color: #5b6168; }
.muted { color: #5b6168; }
.ok { color: #17663a; font-weight: 600; }
.bad { color: #a01c1c; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; }
dt { color: #5b6168; }
dd { margin: 0; overflow-wrap: anywhere; }
"""


def _e(value: Any) -> str:
    return html.escape("n/a" if value is None else str(value))


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return _e(value)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def metric_plots(rows: list[dict], stage: str) -> list[dict]:
    """Loss (train and validation), learning-rate and throughput plots of one stage: [{title, alt, src}]."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]
    if not rows:
        return []
    title = STAGE_TITLES.get(stage, stage)
    plots = []

    def series(key: str) -> tuple[list, list]:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    specs = [
        ("loss", "loss (nats/token)", [("loss", "train", "-"), ("val_loss", "validation", "o-")]),
        ("learning rate", "learning rate", [("lr", None, "-")]),
        ("throughput", "tokens/s", [("tokens_per_s", None, "-")]),
    ]
    for name, ylabel, lines in specs:
        drawn = [(series(key), label, style) for key, label, style in lines]
        drawn = [d for d in drawn if d[0][0]]
        if not drawn:
            continue
        fig = Figure(figsize=(3.9, 2.8))
        ax = fig.subplots()
        for (xs, ys), label, style in drawn:
            ax.plot(xs, ys, style, label=label, lw=1.2, ms=3)
        ax.set(xlabel="step", ylabel=ylabel, title=f"{title}: {name}")
        ax.grid(alpha=0.3)
        if any(label for _, label, _ in drawn):
            ax.legend(fontsize=8)
        fig.tight_layout()
        plots.append({"title": f"{title}: {name}", "alt": f"{title} {name} against training step",
                      "src": _png(fig)})
    return plots


# --------------------------------------------------------------------------------------- inputs


def _locate(path: Path) -> tuple[Path | None, Path | None]:
    """(run folder or None, release folder or None) for a run folder or a bare release folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    if (path / "recipe.toml").is_file() and any((path / d).is_dir() for d in ("data", "pretrain", "release")):
        release = path / "release"
        return path, release if (release / "config.json").is_file() else None
    if (path / "config.json").is_file() and (path / "manifest.json").is_file():
        run = path.parent if (path.name == "release" and (path.parent / "recipe.toml").is_file()) else None
        return run, path
    raise UserError(f"{path}: neither a run folder (recipe.toml with data/, pretrain/ or release/) nor a release "
                    f"(config.json and manifest.json); build one with `glassforge build`")


def _stage_metrics(run: Path | None, release: Path | None) -> dict[str, list[dict]]:
    from glassforge.train import read_metrics

    out: dict[str, list[dict]] = {}
    if run is not None:
        for stage in ("pretrain", "sft"):
            rows = read_metrics(run / stage / "metrics.jsonl")
            if rows:
                out[stage] = rows
    if not out and release is not None:
        for row in read_metrics(release / "metrics.jsonl"):
            out.setdefault(row.get("stage", "pretrain"), []).append(row)
    return out


def _manifest_summary(run: Path | None) -> dict | None:
    """The data manifest without its document list (read up to where the list starts)."""
    if run is None or not (run / "data" / "manifest.json").is_file():
        return None
    path = run / "data" / "manifest.json"
    head: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(' "documents": ['):
                text = "".join(head).rstrip().rstrip(",") + "\n}"
                break
            head.append(line)
        else:
            text = "".join(head)
    try:
        value = json.loads(text)
    except ValueError:
        value = _read_json(path) or {}
    value.pop("documents", None)
    return value


# --------------------------------------------------------------------------------------- sections


def _table(columns: list[str], rows: Iterable[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th scope="col"{" class=num" if i in numeric else ""}>{_e(c)}</th>' for i, c in enumerate(columns))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{cell}</td>'
                                    for i, cell in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dl(pairs: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _training_section(metrics: dict[str, list[dict]]) -> str:
    parts = ["<h2 id=training>Training</h2>"]
    if not metrics:
        return parts[0] + "<p class=muted>No training log (metrics.jsonl) found.</p>"
    summary = []
    for stage, rows in metrics.items():
        last = rows[-1]
        vals = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
        tps = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
        summary.append([_e(STAGE_TITLES.get(stage, stage)), _num(last.get("step")), _num(last.get("tokens")),
                        _num(last.get("loss")), _num(vals[-1]) if vals else "n/a",
                        _num(sum(tps) / len(tps), 0) if tps else "n/a"])
    parts.append(_table(["stage", "steps", "tokens", "final train loss", "final validation loss", "mean tokens/s"],
                        summary, numeric={1, 2, 3, 4, 5}))
    for stage, rows in metrics.items():
        parts.append(f"<h3>{_e(STAGE_TITLES.get(stage, stage))}</h3><div class=plots>")
        for p in metric_plots(rows, stage):
            parts.append(f'<figure><img src="{p["src"]}" alt="{_e(p["alt"])}"><figcaption>{_e(p["title"])}'
                         f"</figcaption></figure>")
        parts.append("</div>")
    return "".join(parts)


def _data_section(summary: dict | None, release: Path | None) -> str:
    from glassforge.web import markdown_tables, png_data_uri

    parts = ["<h2 id=data>Data</h2>"]
    s = (summary or {}).get("summary") or {}
    if s:
        parts.append(_dl([
            ("documents seen", _num(s.get("documents_seen"))),
            ("documents kept", _num(s.get("documents_kept"))),
            ("training / validation", f"{_num(s.get('train_documents'))} / {_num(s.get('val_documents'))}"),
            ("bytes kept / seen", f"{_num(s.get('bytes_kept'))} / {_num(s.get('bytes_seen'))}"),
            ("exact duplicates dropped", _num((s.get("dedup") or {}).get("exact_duplicates"))),
            ("near-duplicates dropped", _num((s.get("dedup") or {}).get("near_duplicates"))),
            ("training-order entries", _num((s.get("order") or {}).get("entries"))),
            ("data Merkle root", f"<code>{_e(((summary or {}).get('merkle') or {}).get('mix'))}</code>"),
            ("order sha256", f"<code>{_e((summary or {}).get('order_sha256'))}</code>"),
        ]))
        sources = s.get("sources") or {}
        if sources:
            parts.append("<h3>By source</h3>")
            parts.append(_table(["source", "seen", "kept", "train", "validation", "bytes kept"],
                                [[_e(n), _num(v.get("seen")), _num(v.get("kept")), _num(v.get("train")),
                                  _num(v.get("val")), _num(v.get("bytes_kept"))] for n, v in sources.items()],
                                numeric={1, 2, 3, 4, 5}))
        dropped = s.get("dropped") or {}
        parts.append("<h3>Dropped</h3>")
        parts.append(_table(["reason", "documents"], [[f"<code>{_e(k)}</code>", _num(v)] for k, v in
                                                      sorted(dropped.items(), key=lambda t: -t[1])], numeric={1})
                     if dropped else "<p>Nothing was dropped.</p>")
    card_path = release / "DATA_CARD.md" if release is not None else None
    if card_path is not None and card_path.is_file():
        tables = markdown_tables(card_path.read_text(encoding="utf-8", errors="replace"))
        src = next((t for t in tables if t["heading"].lower().startswith("source")), None)
        if src and not s:
            parts.append("<h3>Sources (data card)</h3>")
            parts.append(_table(src["columns"], [[_e(r.get(c, "")) for c in src["columns"]] for r in src["rows"]]))
        hist = png_data_uri(release / "data_lengths.png")
        if hist:
            parts.append('<h3>Document lengths (data card)</h3><div class=plots><figure>'
                         f'<img src="{hist}" alt="Histogram of kept document lengths by source">'
                         "<figcaption>data_lengths.png from the release's data card</figcaption></figure></div>")
    if len(parts) == 1:
        parts.append("<p class=muted>No data manifest (data/manifest.json) or data card found.</p>")
    return "".join(parts)


def _eval_section(results: dict | None) -> str:
    from glassforge.web import eval_rows

    head = "<h2 id=evaluation>Evaluation</h2>"
    if not results:
        return head + "<p class=muted>No evaluation results (eval/eval.json).</p>"
    rows = eval_rows(results)
    out = head + _table(["task", "metric", "value"], [[_e(r["task"]), _e(r["metric"]), _e(r["value"])] for r in rows],
                        numeric={2})
    dc = results.get("decontamination") or {}
    if dc.get("removed"):
        out += (f"<p class=muted>Evaluation items sharing a {_e(dc.get('ngram'))}-gram of tokens with the training "
                "data were removed before scoring: " + _e(", ".join(f"{k}: {v}" for k, v in dc["removed"].items()))
                + ".</p>")
    return out


def _attestation_section(release: Path | None, check: bool) -> str:
    head = "<h2 id=attestation>Attestation</h2>"
    if release is None:
        return head + "<p class=muted>No release: run <code>glassforge release RUN</code>.</p>"
    stmt = _read_json(release / "attestation.json")
    if stmt is None:
        return head + "<p class=bad>The release has no attestation.json.</p>"
    pred = stmt.get("predicate") or {}
    subject = (stmt.get("subject") or [{}])[0]
    code = pred.get("code") or {}
    data = pred.get("data") or {}
    plat = pred.get("platform") or {}
    training = pred.get("training") or {}
    pairs = [
        ("subject", f"<code>{_e(subject.get('name'))}</code> sha256 <code>{_e((subject.get('digest') or {}).get('sha256'))}</code>"),
        ("predicate type", f"<code>{_e(stmt.get('predicateType'))}</code>"),
        ("recipe", f"{_e((pred.get('recipe') or {}).get('name'))}, sha256 <code>{_e((pred.get('recipe') or {}).get('sha256'))}</code>"),
        ("data Merkle root", f"<code>{_e(data.get('mix_merkle_root'))}</code>"),
        ("data order sha256", f"<code>{_e(data.get('order_sha256'))}</code>"),
        ("training tokens", _num(data.get("train_tokens"))),
        ("tokenizer sha256", f"<code>{_e((pred.get('tokenizer') or {}).get('sha256'))}</code>"),
        ("code", _e(f"glassforge {code.get('version')}, commit {code.get('git_commit') or 'unknown'}"
                    + (" (with uncommitted changes)" if code.get("git_dirty") else ""))),
        ("dependency lock", f"<code>{_e((pred.get('dependency_lock') or {}).get('sha256'))}</code>"),
        ("platform", _e(", ".join(f"{k} {v}" for k, v in plat.items()) if isinstance(plat, dict) else plat)),
        ("training", _e("; ".join(f"{STAGE_TITLES.get(s, s)}: {i.get('steps')} steps, {i.get('tokens') or 0:,} tokens"
                                  for s, i in training.items() if isinstance(i, dict)))),
        ("checkpoint chain", f"{len(pred.get('checkpoints') or [])} kept checkpoints"),
        ("trace index", f"<code>{_e((pred.get('trace_index') or {}).get('sha256'))}</code>"),
        ("signed", "yes (attestation.dsse.json)" if (release / "attestation.dsse.json").is_file() else "no"),
    ]
    out = head + _dl(pairs)
    if check:
        from glassforge.web import check_release

        v = check_release(release)
        verdict = (f'<p class=ok>All {v["total"]} claims pass</p>' if v["passed"] else
                   f'<p class=bad>{v["total"] - v["passed_count"]} of {v["total"]} claims FAIL</p>')
        out += (f"<h3>Checked now ({_e(v['checked_at'])}): {_e(v['how'])}</h3>" + verdict +
                _table(["claim", "result", "reason"],
                       [[_e(c["name"]), "<span class=ok>PASS</span>" if c["ok"] else "<span class=bad>FAIL</span>",
                         _e(c["reason"])] for c in v["claims"]]))
    return out


# --------------------------------------------------------------------------------------- entry


def render_report(run: Path | str, check: bool = True) -> str:
    """The report's HTML for a run folder (or a release folder)."""
    from glassforge import __version__

    run_dir, release = _locate(Path(run))
    metrics = _stage_metrics(run_dir, release)
    summary = _manifest_summary(run_dir)
    results = _read_json(run_dir / "eval" / "eval.json") if run_dir is not None else None
    recipe_name = None
    recipe_path = (run_dir / "recipe.toml") if run_dir is not None else (release / "recipe.toml")
    description = ""
    if recipe_path.is_file():
        from glassforge.recipe import parse_recipe

        try:
            recipe = parse_recipe(recipe_path.read_bytes(), str(recipe_path))
            recipe_name, description = recipe.name, recipe.description
        except UserError:
            pass
    name = Path(run).resolve().name
    title = f"glassforge report: {name}" + (f" (recipe {recipe_name})" if recipe_name else "")
    nav = ('<nav aria-label="Sections"><a href="#training">Training</a> · <a href="#data">Data</a> · '
           '<a href="#evaluation">Evaluation</a> · <a href="#attestation">Attestation</a></nav>')
    body = "".join([
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(description)}</p>" if description else "",
        f"<p class=muted>Made by glassforge {_e(__version__)} on "
        f"{_e(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))} from <code>{_e(Path(run).resolve())}</code>.</p>",
        nav,
        _training_section(metrics),
        _data_section(summary, release),
        _eval_section(results),
        _attestation_section(release, check),
    ])
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def write_report(run: Path, out: Path | None = None) -> Path:
    """Write the report of a run folder to out (default RUN/report.html), atomically; return its path."""
    run = Path(run)
    html_text = render_report(run)
    path = Path(out) if out is not None else run / "report.html"
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; give a file name such as {path / 'report.html'}")
    atomic_write_text(path, html_text)  # with the usual 0666 & ~umask mode: a report is for sharing
    return path


__all__ = ["write_report", "render_report", "metric_plots"]
