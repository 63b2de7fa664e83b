// The sessions page of chat-proxy: the caller's sessions and their turns, and the
// upstreams' replicas, kept live by polling /ui/api every two seconds.
//
// Message text is whatever a client sent or a model wrote: it only ever reaches the
// page as text nodes (append of a string, textContent), never as HTML.
"use strict";

(() => {
  const POLL_MS = 2000;
  const HIDDEN_POLL_MS = 10000; // a tab in the background asks less often
  const PAGE = 50;

  const $ = (id) => document.getElementById(id);

  // an element with a class and children: strings become text nodes
  function el(tag, cls, ...children) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path) {
    // against the origin: a page opened with the key in its URL (user:key@host) has
    // it in its base URL too, and fetch refuses a URL that carries credentials
    const url = new URL(path, window.location.origin);
    const resp = await fetch(url, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    });
    let doc = null;
    try {
      doc = await resp.json();
    } catch (err) {
      doc = null;
    }
    if (!resp.ok) {
      const message =
        doc && doc.error && typeof doc.error.message === "string"
          ? doc.error.message
          : `HTTP ${resp.status}`;
      throw new HttpError(resp.status, message);
    }
    return doc;
  }

  function when(seconds) {
    if (typeof seconds !== "number") return "";
    const d = new Date(seconds * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return (
      `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
    );
  }

  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : 0;
  }

  // -- status line --

  function setStatus(text, bad) {
    const node = $("status");
    node.textContent = text;
    node.classList.toggle("bad", Boolean(bad));
  }

  // -- sessions --

  // id -> {doc, row, summary, turnsBox, open, shown (turns on the page), busy}
  const sessions = new Map();
  let cursor = null; // the id the next "older sessions" page starts after
  let hasMore = false;
  let paged = false; // older pages loaded: the cursor no longer follows the first page

  function newer(a, b) {
    // the store's order: updated, then id, newest first
    const at = (d) => (typeof d.updated_at === "number" ? d.updated_at : num(d.updated));
    if (at(a) !== at(b)) return at(b) - at(a);
    return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
  }

  function summaryParts(doc) {
    const usage = doc.usage || {};
    const turns = num(doc.turn_count);
    return [
      el("span", "sid", doc.id),
      el("span", "source", doc.source || ""),
      el("span", "model", doc.model || ""),
      el("span", "count", `${turns} turn${turns === 1 ? "" : "s"}`),
      el("span", "tokens", `${num(usage.total_tokens)} tokens`),
      el("span", "updated", when(doc.updated)),
    ];
  }

  function entryFor(doc) {
    let entry = sessions.get(doc.id);
    if (entry) {
      const changed =
        entry.doc.updated_at !== doc.updated_at || entry.doc.turn_count !== doc.turn_count;
      entry.doc = doc;
      if (changed) entry.summary.replaceChildren(...summaryParts(doc));
      return entry;
    }
    const summary = el("button", "summary", ...summaryParts(doc));
    summary.type = "button";
    summary.setAttribute("aria-expanded", "false");
    const turnsBox = el("div", "turns");
    turnsBox.hidden = true;
    const row = el("li", "session", summary, turnsBox);
    row.dataset.id = doc.id;
    entry = { doc, row, summary, turnsBox, open: false, shown: 0, busy: false };
    summary.addEventListener("click", () => toggle(entry));
    sessions.set(doc.id, entry);
    return entry;
  }

  function place() {
    const list = $("sessions");
    const ordered = [...sessions.values()].sort((a, b) => newer(a.doc, b.doc));
    ordered.forEach((entry, i) => {
      if (list.children[i] !== entry.row) list.insertBefore(entry.row, list.children[i] || null);
    });
    filter();
    const more = $("more");
    more.hidden = !hasMore;
  }

  function drop(id) {
    const entry = sessions.get(id);
    if (!entry) return;
    entry.row.remove();
    sessions.delete(id);
  }

  function mergeFirstPage(list) {
    const note = $("sessions-note");
    $("who").textContent = list.key_id ? `key: ${list.key_id}` : "";
    if (!list.recording) {
      note.textContent =
        "This proxy records no sessions: add the session middleware to its chain.";
    }
    const data = Array.isArray(list.data) ? list.data : [];
    const seen = new Set(data.map((d) => d.id));
    // a session that should be on this page and is not was deleted (or purged)
    const last = data.length ? data[data.length - 1] : null;
    for (const [id, entry] of sessions) {
      if (seen.has(id)) continue;
      if (!list.has_more || (last && newer(entry.doc, last) < 0)) drop(id);
    }
    for (const doc of data) entryFor(doc);
    if (!paged) {
      cursor = list.last_id;
      hasMore = Boolean(list.has_more);
    }
    if (list.recording) {
      note.textContent = sessions.size ? "" : "No sessions of this key yet.";
    }
    place();
  }

  async function loadOlder() {
    if (!cursor) return;
    const button = $("more");
    button.disabled = true;
    try {
      const list = await api(
        `/ui/api/sessions?limit=${PAGE}&after=${encodeURIComponent(cursor)}`,
      );
      paged = true;
      for (const doc of list.data || []) entryFor(doc);
      cursor = list.last_id || cursor;
      hasMore = Boolean(list.has_more);
      place();
    } catch (err) {
      setStatus(`could not load older sessions: ${err.message}`, true);
    } finally {
      button.disabled = false;
    }
  }

  function filter() {
    const q = $("search-id").value.trim().toLowerCase();
    for (const [id, entry] of sessions) {
      entry.row.hidden = Boolean(q) && !id.toLowerCase().includes(q);
    }
  }

  // -- a session's turns --

  function contentText(content) {
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content
        .map((part) => {
          if (part && typeof part === "object") {
            if (part.type === "text" && typeof part.text === "string") return part.text;
            return `[${String(part.type || "part")}]`;
          }
          return String(part);
        })
        .join("\n");
    }
    if (content === null || content === undefined) return null;
    return JSON.stringify(content);
  }

  function callsBox(calls) {
    if (!Array.isArray(calls) || !calls.length) return null;
    const box = el("div", "calls");
    for (const call of calls) {
      const fn = (call && call.function) || {};
      const args = typeof fn.arguments === "string" ? fn.arguments : "";
      box.append(el("div", "call", `\u2192 ${String(fn.name || "?")}(${args})`));
    }
    return box;
  }

  function messageBox(message, reply, stored) {
    const m = message && typeof message === "object" ? message : {};
    const role = typeof m.role === "string" ? m.role : "?";
    const box = el("div", `msg role-${role.replace(/[^a-z]/g, "")}${reply ? " reply" : ""}`);
    let label = role;
    if (typeof m.name === "string") label += ` (${m.name})`;
    if (typeof m.tool_call_id === "string") label += ` \u00b7 ${m.tool_call_id}`;
    box.append(el("div", "role", label));
    const text = contentText(m.content);
    const calls = callsBox(m.tool_calls);
    if (text) {
      box.append(el("div", "text", text));
    } else if (!calls) {
      box.append(el("div", "text none", stored ? "(no text)" : "(text not stored)"));
    }
    if (calls) box.append(calls);
    return box;
  }

  // where the turn's time went: the admission queue, the backend's first byte, its
  // first content token (what a caller hears)
  function timingOf(timing) {
    if (!timing || typeof timing !== "object") return null;
    const parts = [];
    for (const [key, label] of [
      ["queue_ms", "queue"],
      ["ttfb_ms", "first byte"],
      ["first_token_ms", "first token"],
    ]) {
      if (typeof timing[key] === "number") parts.push(`${label} ${timing[key]} ms`);
    }
    return parts.length ? el("span", "timing", parts.join(" · ")) : null;
  }

  function turnBox(turn, n) {
    const t = turn && typeof turn === "object" ? turn : {};
    const messages = Array.isArray(t.messages) ? t.messages : [];
    // sessions kept with store_content: false hold roles and tool names, no text
    const stored = messages.some((m) => m && typeof m === "object" && "content" in m);
    const usage = t.usage && typeof t.usage === "object" ? t.usage : null;
    const meta = el(
      "div",
      "meta",
      el("span", "n", `turn ${n}`),
      el("span", "at", when(t.created)),
      t.model ? el("span", "model", t.model) : null,
      t.finish_reason ? el("span", "finish", t.finish_reason) : null,
      typeof t.latency_ms === "number" ? el("span", "latency", `${t.latency_ms} ms`) : null,
      timingOf(t.timing),
      usage
        ? el(
            "span",
            "usage",
            `${num(usage.prompt_tokens)} in + ${num(usage.completion_tokens)} out = ` +
              `${num(usage.total_tokens)} tokens`,
          )
        : null,
      t.incomplete ? el("span", "incomplete", "cut short") : null,
    );
    const box = el("article", "turn", meta);
    box.dataset.n = String(n);
    for (const m of messages) box.append(messageBox(m, false, stored));
    box.append(messageBox(t.response || { role: "assistant" }, true, stored));
    return box;
  }

  async function loadTurns(entry) {
    if (entry.busy) return;
    entry.busy = true;
    try {
      const doc = await api(
        `/ui/api/sessions/${encodeURIComponent(entry.doc.id)}?from=${entry.shown}`,
      );
      const turns = Array.isArray(doc.turns) ? doc.turns : [];
      if (doc.turns_from !== entry.shown) return; // answered for another page state
      turns.forEach((turn, i) => entry.turnsBox.append(turnBox(turn, entry.shown + i + 1)));
      entry.shown += turns.length;
      delete doc.turns;
      entryFor(doc);
      place();
    } catch (err) {
      if (err.status === 404) {
        drop(entry.doc.id);
      } else {
        setStatus(`could not load the turns: ${err.message}`, true);
      }
    } finally {
      entry.busy = false;
    }
  }

  function toggle(entry) {
    entry.open = !entry.open;
    entry.turnsBox.hidden = !entry.open;
    entry.row.classList.toggle("open", entry.open);
    entry.summary.setAttribute("aria-expanded", String(entry.open));
    if (entry.open && entry.shown < num(entry.doc.turn_count)) loadTurns(entry);
  }

  async function refreshOpen() {
    const waits = [];
    for (const entry of sessions.values()) {
      if (entry.open && entry.shown < num(entry.doc.turn_count)) waits.push(loadTurns(entry));
    }
    await Promise.all(waits);
  }

  async function openById(id) {
    const note = $("sessions-note");
    let entry = sessions.get(id);
    if (!entry) {
      try {
        const doc = await api(`/ui/api/sessions/${encodeURIComponent(id)}?from=0`);
        delete doc.turns;
        entry = entryFor(doc);
        place();
      } catch (err) {
        note.textContent =
          err.status === 404 ? `No session of this key has the id \u201c${id}\u201d.` : err.message;
        return;
      }
    }
    note.textContent = "";
    if (!entry.open) toggle(entry);
    entry.row.scrollIntoView({ block: "start" });
  }

  // -- upstreams --

  function renderUpstreams(doc) {
    const body = $("replicas").tBodies[0];
    const rows = [];
    for (const up of Array.isArray(doc.data) ? doc.data : []) {
      for (const r of Array.isArray(up.replicas) ? up.replicas : []) {
        const engine = r.engine && typeof r.engine === "object" ? r.engine : null;
        const cap = typeof up.max_in_flight === "number" ? ` / ${up.max_in_flight}` : "";
        const state = String(r.state || "");
        const kv =
          engine && typeof engine.kv_usage === "number"
            ? `${Math.round(engine.kv_usage * 100)}%`
            : "\u2014";
        const tr = el(
          "tr",
          "replica",
          el("td", "upstream", up.name, up.fleet ? el("span", "note", ` ${up.balance}`) : null),
          el("td", "index", up.fleet ? `#${r.index}` : "single"),
          el("td", "state", el("span", `badge state-${state.replace(/[^a-z]/g, "")}`, state)),
          el("td", "in-flight", `${num(r.in_flight)}${cap}`),
          el("td", "running", engine ? num(engine.running) : "\u2014"),
          el("td", "waiting", engine ? num(engine.waiting) : "\u2014"),
          el("td", "kv", kv),
        );
        tr.dataset.upstream = String(up.name);
        tr.dataset.index = String(r.index);
        rows.push(tr);
      }
    }
    body.replaceChildren(...rows);
    const waiting = doc.queue ? num(doc.queue.waiting) : 0;
    $("queue").textContent =
      `${waiting} request${waiting === 1 ? "" : "s"} waiting for admission. ` +
      "States, requests in flight and the queue are this worker's.";
  }

  // -- the loop --

  async function poll() {
    const [list, ups] = await Promise.allSettled([
      api(`/ui/api/sessions?limit=${PAGE}`),
      api("/ui/api/upstreams"),
    ]);
    const errors = [];
    if (list.status === "fulfilled") {
      mergeFirstPage(list.value);
      await refreshOpen();
    } else {
      errors.push(list.reason);
    }
    if (ups.status === "fulfilled") renderUpstreams(ups.value);
    else errors.push(ups.reason);
    if (errors.length) {
      setStatus(`not live: ${errors[0].message} (retrying)`, true);
    } else {
      setStatus(`live \u00b7 ${when(Date.now() / 1000)}`, false);
    }
  }

  async function loop() {
    try {
      await poll();
    } catch (err) {
      setStatus(`not live: ${err.message} (retrying)`, true);
    }
    window.setTimeout(loop, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("search-id").addEventListener("input", filter);
    $("search").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = $("search-id").value.trim();
      if (id) openById(id);
    });
    $("more").addEventListener("click", loadOlder);
    loop();
  });
})();
