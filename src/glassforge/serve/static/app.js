// glassforge chat page. Plain JavaScript, no build step, no network beyond this server.
// Talks to the public API only: POST /v1/chat/completions (streamed, Server-Sent Events),
// POST /v1/trace, and GET /facts. The conversation and settings live in localStorage.
"use strict";

const STORE = "glassforge.chat.v1";
const KEY_STORE = "glassforge.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  messages: [],        // {role: "user"|"assistant", content, status?: "done"|"stopped"|"error", note?}
  controller: null,    // AbortController of the answer being streamed
  facts: null,
};

// ------------------------------------------------------------------ storage

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    if (Array.isArray(saved.messages)) {
      state.messages = saved.messages.filter((m) => m && typeof m.content === "string" &&
        (m.role === "user" || m.role === "assistant"));
      // An answer still streaming when the page closed was cut off there.
      for (const m of state.messages) if (m.status === "streaming") { m.status = "stopped"; m.note = "Stopped."; }
    }
    const s = saved.settings || {};
    if (s.temperature !== undefined) $("temperature").value = s.temperature;
    if (s.maxTokens !== undefined) $("max-tokens").value = s.maxTokens;
    if (s.minSpan !== undefined) $("min-span").value = s.minSpan;
  } catch (e) {
    state.messages = [];
  }
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  if ($("api-key").value) $("key-field").hidden = false;
}

function save() {
  const settings = {temperature: $("temperature").value, maxTokens: $("max-tokens").value, minSpan: $("min-span").value};
  try {
    localStorage.setItem(STORE, JSON.stringify({messages: state.messages, settings}));
  } catch (e) { /* storage full or disabled: the page still works for this visit */ }
}

// ------------------------------------------------------------------ HTTP

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function needKey(message) {
  $("key-field").hidden = false;
  setStatus(message || "This server needs an API key: enter it under Settings.", true);
  $("api-key").focus();
}

async function errorOf(resp) {
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  const err = (body && body.error) || {};
  return {status: resp.status, code: err.code || null, message: err.message || `HTTP ${resp.status}`};
}

async function postJSON(path, body) {
  const resp = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401) needKey();
    throw Object.assign(new Error(err.message), err);
  }
  return resp.json();
}

// ------------------------------------------------------------------ status line

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text || "";
  el.classList.toggle("error", !!isError);
}

// ------------------------------------------------------------------ messages

function messageElement(msg, index) {
  const li = $("message-template").content.firstElementChild.cloneNode(true);
  li.classList.add(msg.role);
  li.dataset.index = String(index);
  li.dataset.state = msg.status || "done";
  li.querySelector(".role").textContent = msg.role === "user" ? "You" : "Model";
  li.querySelector(".content").textContent = msg.content;
  if (msg.note) addNote(li, msg.note);
  if (msg.role === "assistant") addTraceButton(li, index);
  return li;
}

function addNote(li, text) {
  let note = li.querySelector(".note");
  if (!note) {
    note = document.createElement("div");
    note.className = "note";
    li.querySelector(".content").after(note);
  }
  note.textContent = text;
}

function addTraceButton(li, index) {
  const actions = li.querySelector(".actions");
  if (actions.querySelector(".trace-button")) return;
  const b = document.createElement("button");
  b.type = "button";
  b.className = "trace-button";
  b.textContent = "Show trace";
  b.setAttribute("aria-label", `Show where answer ${index + 1}'s words came from`);
  b.addEventListener("click", () => traceInto(li.querySelector(".trace-result"), state.messages[index].content, b));
  actions.appendChild(b);
}

function render() {
  const list = $("messages");
  list.replaceChildren(...state.messages.map(messageElement));
}

function scrollToEnd() {
  const last = $("messages").lastElementChild;
  if (last) last.scrollIntoView({block: "nearest"});
}

// ------------------------------------------------------------------ chat

function numberSetting(id, fallback) {
  const v = Number($(id).value);
  return Number.isFinite(v) ? v : fallback;
}

async function sendMessage(text) {
  if (state.controller) return;
  state.messages.push({role: "user", content: text});
  const assistant = {role: "assistant", content: "", status: "streaming"};
  state.messages.push(assistant);
  save();
  render();
  const li = $("messages").lastElementChild;
  li.classList.add("streaming");
  li.querySelector(".actions").replaceChildren();
  li.dataset.chunks = "0";
  scrollToEnd();

  const controller = new AbortController();
  state.controller = controller;
  $("stop").disabled = false;
  $("send").disabled = true;
  setStatus("The model is answering… (Escape or Stop ends it)");

  let history = state.messages.slice(0, -1).filter((m) => m.status !== "error")
    .map((m) => ({role: m.role, content: m.content}));
  let dropped = 0;
  try {
    let resp;
    for (;;) {
      const body = {
        messages: history, stream: true,
        temperature: Math.min(2, Math.max(0, numberSetting("temperature", 0.7))),
        max_tokens: Math.max(1, Math.round(numberSetting("max-tokens", 128))),
      };
      resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                  signal: controller.signal});
      if (resp.ok) break;
      const err = await errorOf(resp);
      // Too long for the model's context: leave out the oldest exchange and try again.
      if (err.code === "context_length_exceeded" && history.length > 1) {
        history = history.slice(history.length > 2 ? 2 : 1);
        dropped += 1;
        continue;
      }
      if (resp.status === 401) needKey();
      throw Object.assign(new Error(err.message), err);
    }
    if (dropped) addNote(li, "Older messages were left out: the conversation no longer fits the model's context.");
    const finish = await readStream(resp, (delta) => {
      assistant.content += delta;
      li.querySelector(".content").textContent = assistant.content;
      li.dataset.chunks = String(Number(li.dataset.chunks) + 1);
    });
    assistant.status = "done";
    if (finish === "length") assistant.note = "Stopped at the length limit.";
    if (dropped) assistant.note = (assistant.note ? assistant.note + " " : "") + "Older messages were left out to fit the context.";
    setStatus("Answer complete.");
  } catch (e) {
    if (e.name === "AbortError") {
      assistant.status = "stopped";
      assistant.note = "Stopped.";
      setStatus("Stopped.");
    } else {
      assistant.status = "error";
      assistant.note = "Error: " + e.message;
      if (e.status !== 401) setStatus("Error: " + e.message, true);
    }
  } finally {
    state.controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
    li.classList.remove("streaming");
    li.dataset.state = assistant.status;
    if (assistant.note) addNote(li, assistant.note);
    if (assistant.status !== "error") addTraceButton(li, state.messages.length - 1);
    save();
    scrollToEnd();
  }
}

// Read an OpenAI-style SSE stream; call onDelta(text) per content delta; return the finish reason.
async function readStream(resp, onDelta) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  const handle = (event) => {
    const data = event.split("\n").filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    if (!data) return false;
    if (data === "[DONE]") return true;
    const obj = JSON.parse(data);
    if (obj.error) throw Object.assign(new Error(obj.error.message || "server error"), obj.error);
    for (const c of obj.choices || []) {
      if (c.index !== undefined && c.index !== 0) continue;
      const text = c.delta && c.delta.content;
      if (text) onDelta(text);
      if (c.finish_reason) finish = c.finish_reason;
    }
    return false;
  };
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (handle(event)) { reader.cancel().catch(() => {}); return finish; }
    }
  }
  if (buffer.trim()) handle(buffer);
  return finish;
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ------------------------------------------------------------------ traces

async function traceInto(container, text, button) {
  if (!text) {
    container.replaceChildren(paragraph("trace-summary", "There is no text to trace."));
    return;
  }
  const minTokens = Math.max(1, Math.round(numberSetting("min-span", 8)));
  if (button) button.disabled = true;
  container.replaceChildren(paragraph("trace-summary", "Tracing…"));
  try {
    const result = await postJSON("/v1/trace", {text, min_tokens: minTokens, max_docs: 5});
    renderTrace(container, text, result);
  } catch (e) {
    const why = e.code === "trace_unavailable" ? "This release has no trace index, so its answers cannot be traced."
      : "Trace failed: " + e.message;
    container.replaceChildren(paragraph("trace-summary error", why));
  } finally {
    if (button) button.disabled = false;
  }
}

function paragraph(cls, text) {
  const p = document.createElement("p");
  p.className = cls;
  p.textContent = text;
  return p;
}

function plural(n, word) {
  return `${Number(n).toLocaleString("en")} ${word}${n === 1 ? "" : "s"}`;
}

function renderTrace(container, text, result) {
  container.replaceChildren();
  container.dataset.spans = String(result.spans.length);
  const idx = result.index || {};
  const where = `the training data (${plural(idx.tokens || 0, "token")}, ${plural(idx.documents || 0, "document")})`;
  if (!result.spans.length) {
    const p = paragraph("trace-summary no-span",
      `No span found: no run of ${plural(result.min_tokens, "token")} or more of this text ` +
      `(${plural(result.tokens, "token")}) occurs verbatim in ${where}. Lower "Trace: shortest span" to look for shorter ones.`);
    container.appendChild(p);
    return;
  }
  const pct = Math.round(100 * result.covered_tokens / Math.max(1, result.tokens));
  container.appendChild(paragraph("trace-summary",
    `${plural(result.spans.length, "span")} of at least ${plural(result.min_tokens, "token")} ` +
    `occur${result.spans.length === 1 ? "s" : ""} verbatim in ${where}, ` +
    `covering ${pct}% of the text's ${result.tokens} tokens. Select a highlighted span to list its training documents.`));

  // Offsets are in code points (Python string indices); walk the text by code point.
  const chars = Array.from(text);
  const cuts = new Set([0, chars.length]);
  for (const s of result.spans) { cuts.add(Math.max(0, s.start)); cuts.add(Math.min(chars.length, s.end)); }
  const bounds = [...cuts].sort((a, b) => a - b);
  const traced = document.createElement("div");
  traced.className = "traced";
  const docs = document.createElement("div");
  docs.className = "span-docs";
  docs.setAttribute("aria-live", "polite");
  const buttons = [];
  let lastSpan = -1, shade = false;
  for (let k = 0; k + 1 < bounds.length; k++) {
    const a = bounds[k], b = bounds[k + 1];
    const piece = chars.slice(a, b).join("");
    // Spans come longest first: the first that covers this piece is the one to show.
    const which = result.spans.findIndex((s) => s.start <= a && s.end >= b);
    if (which < 0) { traced.appendChild(document.createTextNode(piece)); lastSpan = -1; continue; }
    const s = result.spans[which];
    // A <mark> acting as a button keeps the text flowing inline (a <button> would be a box).
    const btn = document.createElement("mark");
    if (which !== lastSpan) { shade = !shade; lastSpan = which; }
    btn.className = shade ? "span" : "span alt";  // neighbouring spans in two shades
    btn.tabIndex = 0;
    btn.setAttribute("role", "button");
    btn.dataset.span = String(which);
    btn.setAttribute("aria-pressed", "false");
    btn.setAttribute("aria-label", `${piece}: span ${which + 1}, ${plural(s.tokens, "token")}, ` +
      `${plural(s.occurrences, "occurrence")} in ${plural(s.document_count, "document")}`);
    btn.textContent = piece;
    const open = () => {
      for (const other of buttons) other.setAttribute("aria-pressed", String(other.dataset.span === String(which)));
      showDocuments(docs, s);
    };
    btn.addEventListener("click", open);
    btn.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); }
    });
    buttons.push(btn);
    traced.appendChild(btn);
  }
  container.append(traced, docs);
}

function showDocuments(container, span) {
  container.replaceChildren();
  const more = span.documents_exact ? "" : "+";
  const h = document.createElement("h3");
  const quoted = span.text.length > 120 ? span.text.slice(0, 119) + "…" : span.text;
  h.textContent = `“${quoted}”: ${plural(span.tokens, "token")}, ${plural(span.occurrences, "occurrence")} in ` +
    `${span.document_count.toLocaleString("en")}${more} training document${span.document_count === 1 ? "" : "s"}` +
    (span.documents.length < span.document_count ? ` (showing ${span.documents.length})` : "");
  h.tabIndex = -1;
  const list = document.createElement("ul");
  list.className = "docs";
  for (const d of span.documents) {
    const li = document.createElement("li");
    li.className = "doc";
    const meta = document.createElement("div");
    meta.className = "meta";
    const field = (label, value, cls) => {
      const s = document.createElement("span");
      const b = document.createElement("b");
      b.textContent = label + " ";
      s.append(b, document.createTextNode(value == null ? "n/a" : String(value)));
      if (cls) s.className = cls;
      return s;
    };
    meta.append(field("document", d.id, "mono"), field("source", d.source, "mono"),
                field("licence", d.license), field("occurrences", d.occurrences));
    const sha = field("sha256", d.sha256 ? String(d.sha256).slice(0, 16) + "…" : "n/a", "mono");
    if (d.sha256) sha.title = d.sha256;
    meta.append(sha);
    const snip = document.createElement("div");
    snip.className = "snippet";
    const parts = d.snippet_parts || [d.snippet || "", "", ""];
    const mark = document.createElement("mark");
    mark.textContent = parts[1];
    snip.append(document.createTextNode(parts[0]), mark, document.createTextNode(parts[2]));
    li.append(meta, snip);
    list.appendChild(li);
  }
  container.append(h, list);
  h.focus({preventScroll: true});
}

// ------------------------------------------------------------------ model facts

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function dl(pairs) {
  const d = el("dl");
  for (const [k, v] of pairs) {
    if (v === undefined || v === null || v === "") continue;
    d.append(el("dt", k), el("dd", v));
  }
  return d;
}

function table(columns, rows, caption) {
  const t = el("table");
  if (caption) t.appendChild(el("caption", caption));
  const head = el("tr");
  for (const c of columns) { const th = el("th", c); th.scope = "col"; head.appendChild(th); }
  const thead = el("thead"); thead.appendChild(head);
  const tbody = el("tbody");
  for (const r of rows) {
    const tr = el("tr");
    for (const c of columns) tr.appendChild(el("td", r[c] === undefined ? "" : r[c]));
    tbody.appendChild(tr);
  }
  t.append(thead, tbody);
  const wrap = el("div", null, "table-wrap");  // wide tables scroll inside the panel
  wrap.appendChild(t);
  return wrap;
}

function fmt(n, digits) {
  if (typeof n !== "number") return n;
  return Number.isInteger(n) ? n.toLocaleString("en") : n.toFixed(digits === undefined ? 4 : digits);
}

function short(h) { return h ? String(h).slice(0, 16) + "…" : null; }

function renderBadge(v) {
  const badge = $("verify-badge");
  badge.classList.remove("pending", "ok", "bad");
  if (!v) { badge.textContent = "release not checked"; badge.classList.add("pending"); return; }
  if (v.passed) {
    badge.textContent = `hashes and attestation check out (${v.passed_count}/${v.total}); replay not run`;
    badge.classList.add("ok");
  } else {
    badge.textContent = `release check FAILED (${v.total - v.passed_count} of ${v.total})`;
    badge.classList.add("bad");
  }
  const left = Object.values(v.not_checked || {}).join("; ");
  badge.title = `Checked at server start, ${v.checked_at}: ${v.how}.` + (left ? ` Not checked: ${left}.` : "");
}

function renderFacts(f) {
  state.facts = f;
  $("model-name").textContent = f.model ? "· " + f.model : "";
  document.title = `glassforge chat · ${f.model || "model"}`;
  renderBadge(f.verification);
  if (f.auth_required) $("key-field").hidden = false;
  const body = $("facts-body");
  body.replaceChildren();

  // Release check
  const v = f.verification;
  body.appendChild(el("h3", "Release check"));
  if (v) {
    body.appendChild(el("p", v.passed
      ? `Every file hash and attestation claim checked out when the server started (${v.passed_count} of ${v.total} claims, ${v.checked_at}).`
      : `${v.total - v.passed_count} of ${v.total} claims FAILED when the server started (${v.checked_at}).`,
      v.passed ? "ok" : "error"));
    const det = el("details");
    det.appendChild(el("summary", "All claims"));
    const ul = el("ul", null, "claims");
    for (const c of v.claims || []) ul.appendChild(el("li", `${c.name}: ${c.reason}`, c.ok ? "pass" : "fail"));
    det.appendChild(ul);
    if (!v.passed) det.open = true;
    body.appendChild(det);
    const notChecked = Object.entries(v.not_checked || {});
    if (notChecked.length) {
      body.appendChild(el("p", "Not checked at start (each takes minutes; run them yourself):"));
      const todo = el("ul", null, "claims");
      for (const [what, how] of notChecked) todo.appendChild(el("li", `${what}: ${how}`));
      body.appendChild(todo);
    }
  } else {
    body.appendChild(el("p", "The server was started without checking the release."));
  }

  // Model and recipe
  const r = f.recipe;
  body.appendChild(el("h3", "Model and recipe"));
  const cfg = f.config || {};
  const m = (r && r.model) || {d_model: cfg.hidden_size, n_layers: cfg.num_hidden_layers, n_heads: cfg.num_attention_heads,
                               n_kv_heads: cfg.num_key_value_heads, max_seq_len: cfg.max_position_embeddings,
                               vocab_size: cfg.vocab_size};
  body.appendChild(dl([
    ["model", f.model],
    ["recipe", r && r.name],
    ["about", r && r.description],
    ["architecture", m.n_layers && `Llama: ${m.n_layers} layers, d_model ${m.d_model}, ${m.n_heads} heads (${m.n_kv_heads} key/value)`],
    ["context", m.max_seq_len && `${m.max_seq_len} tokens`],
    ["vocabulary", m.vocab_size],
    ["pretraining", r && r.pretrain && `${r.pretrain.steps} steps × ${fmt(r.pretrain.batch_tokens)} tokens, lr ${r.pretrain.lr}, ${r.pretrain.schedule}, ${r.pretrain.optimizer}`],
    ["fine-tuning", r && r.sft && (r.sft.enabled ? `${r.sft.steps} steps on ${r.sft.conversations.join(", ")}, lr ${r.sft.lr}` : "none")],
    ["seed", r && r.seed],
    ["recipe sha256", r && short(r.sha256)],
  ]));
  if (r && r.toml) {
    const det = el("details");
    det.append(el("summary", "recipe.toml"), el("pre", r.toml));
    body.appendChild(det);
  }

  // Data
  const d = f.data || {};
  body.appendChild(el("h3", "Training data"));
  if (d.summary) body.appendChild(el("p", d.summary));
  if (d.sources_table) body.appendChild(table(d.sources_table.columns, d.sources_table.rows));
  else if (r && r.sources) body.appendChild(table(["name", "kind", "license", "weight"], r.sources));
  body.appendChild(dl([
    ["training tokens", fmt(d.train_tokens)],
    ["indexed for tracing", d.trace_index && `${fmt(d.trace_index.tokens)} tokens in ${fmt(d.trace_index.documents)} documents`],
    ["data Merkle root", short(d.mix_merkle_root)],
    ["order sha256", short(d.order_sha256)],
  ]));

  // Training
  const tr = f.training || {};
  const stages = Object.keys(tr);
  if (stages.length) {
    body.appendChild(el("h3", "Training"));
    body.appendChild(table(["stage", "steps", "train loss", "validation loss"], stages.map((s) => ({
      stage: s === "sft" ? "chat fine-tuning" : s, steps: fmt(tr[s].steps),
      "train loss": fmt(tr[s].loss), "validation loss": fmt(tr[s].val_loss)}))));
  }
  for (const c of f.loss_curves || []) {
    const fig = el("figure");
    const img = el("img");
    img.src = c.src;
    img.alt = `Loss, learning rate and throughput curves of ${c.title}`;
    fig.append(img, el("figcaption", `${c.title} (${c.file})`));
    body.appendChild(fig);
  }

  // Evaluation
  const ev = f.eval || {};
  body.appendChild(el("h3", "Evaluation"));
  if (ev.rows && ev.rows.length) {
    body.appendChild(table(["task", "metric", "value"], ev.rows));
    if (ev.source) body.appendChild(el("small", `from ${ev.source}`));
  } else {
    body.appendChild(el("p", "No evaluation results in this release."));
  }

  // Attestation
  const a = f.attestation;
  body.appendChild(el("h3", "Attestation"));
  if (a) {
    const code = a.code || {};
    body.appendChild(dl([
      ["weights sha256", short(a.weights_sha256)],
      ["code", `glassforge ${code.version || "?"}` + (code.git_commit ? `, commit ${code.git_commit.slice(0, 12)}` : "") +
        (code.git_dirty ? " (uncommitted changes)" : "")],
      ["checkpoints in chain", a.checkpoints],
      ["signed", a.signed ? "yes (attestation.dsse.json)" : "no"],
    ]));
  } else {
    body.appendChild(el("p", "This release has no attestation.json."));
  }
  if (!f.trace_available) body.appendChild(el("p", "This release has no trace index: answers cannot be traced."));
}

async function loadFacts() {
  try {
    const resp = await fetch("/facts", {headers: headers()});
    if (resp.status === 401) {
      needKey("This server needs an API key: enter it under Settings to chat and see the model facts.");
      $("facts-body").replaceChildren(el("p", "Enter the API key to see the model facts."));
      return;
    }
    if (!resp.ok) throw new Error((await errorOf(resp)).message);
    renderFacts(await resp.json());
  } catch (e) {
    $("facts-body").replaceChildren(el("p", "Could not load the model facts: " + e.message, "error"));
    renderBadge(null);
  }
}

function toggleFacts(show) {
  const aside = $("facts");
  const open = show === undefined ? aside.hidden : show;
  aside.hidden = !open;
  $("facts-toggle").setAttribute("aria-expanded", String(open));
  if (open) aside.focus();
}

// ------------------------------------------------------------------ wiring

function init() {
  load();
  render();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("message").value.trim();
    if (!text || state.controller) return;
    $("message").value = "";
    sendMessage(text);
  });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    stop();
    state.messages = [];
    save();
    render();
    setStatus("New conversation.");
    $("message").focus();
  });
  for (const id of ["temperature", "max-tokens", "min-span"]) $(id).addEventListener("change", save);
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    setStatus(key ? "API key saved in this browser." : "API key removed.");
    loadFacts();
  });
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  $("facts-toggle").addEventListener("click", () => toggleFacts());
  $("trace-form").addEventListener("submit", (e) => {
    e.preventDefault();
    traceInto($("trace-any-result"), $("trace-text").value, $("trace-submit"));
  });
  if (window.matchMedia("(min-width: 900px)").matches) toggleFacts(true);
  $("message").focus();
  loadFacts();
}

document.addEventListener("DOMContentLoaded", init);
