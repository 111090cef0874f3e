// The Ensemble dashboard (docs/dashboard.md). Plain JavaScript, no dependencies, built into
// the master's binary. It reads only the master's operator routes with the session cookie:
// /queues, /workers, /tasks, /task/{id} and its events, /events, /deadletters, /dispatch.
// Text from the API is only ever set as text (textContent), never parsed as HTML.
"use strict";

const session = { csrf: "", auth: true };
let leave = null; // the current page's clean-up (timers, event streams)

// ---- small helpers ---------------------------------------------------------------------

/** Builds an element: h("a", {href: "#/"}, "text", child). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = dv;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : String(c));
  return el;
}

class HttpError extends Error {
  constructor(status, body) {
    const detail = body && body.error ? body.error.message : typeof body === "string" ? body : "";
    super(`${status}${detail ? ": " + detail : ""}`);
    this.status = status;
  }
}

/** Calls the master. Changes carry the session's CSRF token; a 401 goes back to sign-in. */
async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = session.csrf;
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (r.status === 401 && !path.startsWith("/ui/")) {
    showLogin("Your session has ended. Sign in again.");
  }
  if (!r.ok) throw new HttpError(r.status, data);
  return data;
}

/** Runs `fn` now and then every `ms` (never two at once) until the returned stop is called. */
function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      await fn();
    } catch (e) {
      if (!stopped) console.warn(e);
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

const num = (n) => (n === undefined || n === null ? "–" : Number(n).toLocaleString("en"));

function ago(ms) {
  if (!ms) return "–";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 1) return "just now";
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function duration(ms) {
  if (ms === undefined || ms === null || ms < 0) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}

function when(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

const badge = (status) => h("span", { class: `badge s-${status}` }, status);

function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function problem(where, e) {
  where.replaceChildren(h("p", { class: "error", role: "alert" }, String(e.message || e)));
}

function table(headings, rows, attrs) {
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      attrs || {},
      h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows),
    ),
  );
}

// ---- sign-in, navigation -------------------------------------------------------------------

function showLogin(message) {
  if (leave) leave();
  leave = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  const key = h("input", {
    id: "key",
    name: "key",
    type: "password",
    autocomplete: "current-password",
    required: true,
    placeholder: "operator key",
  });
  const note = h("p", { class: "error", role: "alert", id: "login-error" }, message || "");
  const form = h(
    "form",
    { class: "card login", id: "login" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Use an operator key (OPERATOR_API_KEYS). The session lasts 12 hours."),
    h("label", { for: "key" }, "Operator key"),
    key,
    h("button", { type: "submit" }, "Sign in"),
    note,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const s = await api("/ui/login", { method: "POST", body: { key: key.value } });
      Object.assign(session, s);
      key.value = "";
      route();
    } catch (e) {
      note.textContent = e.status === 401 || e.status === 403 ? "That is not an operator key." : String(e.message);
    }
  });
  document.getElementById("main").replaceChildren(form);
  key.focus();
}

async function signOut() {
  try {
    await api("/ui/logout", { method: "POST" });
  } finally {
    session.csrf = "";
    showLogin("Signed out.");
  }
}

const pages = { overview, workers, tasks, task: taskPage, dead: deadLetters };

/** Shows the page the location's hash names: #/, #/workers, #/tasks?…, #/task/<id>, #/dead. */
function route() {
  if (leave) leave();
  leave = null;
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean);
  const name = parts[0] || "overview";
  const page = pages[name] || overview;
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = !session.auth;
  for (const a of document.querySelectorAll("#nav a")) {
    const current = a.dataset.page === name || (name === "task" && a.dataset.page === "tasks");
    if (current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = h("div", { class: "page", id: `page-${name}` });
  document.getElementById("main").replaceChildren(main);
  leave = page(main, { args: parts.slice(1).map(decodeURIComponent), query: new URLSearchParams(query || "") });
}

async function boot() {
  document.getElementById("signout").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  try {
    Object.assign(session, await api("/ui/session"));
    route();
  } catch {
    showLogin("");
  }
}

// ---- overview ------------------------------------------------------------------------------

const WINDOW_MS = 10 * 60 * 1000; // what the charts cover
const BUCKET_MS = 10 * 1000;

function overview(main) {
  const queues = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const updated = h("span", { class: "muted small" });
  const charts = new Charts();
  main.append(
    h("h1", {}, "Overview"),
    h("section", { class: "card" }, h("h2", {}, "Queues ", updated), queues),
    charts.el,
  );
  const stop = every(2000, async () => {
    try {
      const q = await api("/queues");
      queues.replaceChildren(queueTable(q.queues || []));
      updated.textContent = `updated ${when(Date.now()).slice(11)}`;
    } catch (e) {
      problem(queues, e);
    }
  });
  charts.start();
  return () => {
    stop();
    charts.stop();
  };
}

function queueTable(rows) {
  if (!rows.length) return h("p", { class: "muted" }, "No capabilities yet.");
  const fields = [
    ["queued", "Queued", num],
    ["delayed", "Delayed", num],
    ["in_flight", "In flight", num],
    ["dead_lettered", "Dead-lettered", num],
    ["live_workers", "Live workers", num],
    ["backlog_per_worker", "Backlog / worker", (v) => (v === null ? "–" : Number(v).toFixed(1))],
    ["oldest_queued_age_seconds", "Oldest queued", (v) => (v ? duration(v * 1000) : "–")],
  ];
  return table(
    ["Capability", ...fields.map((f) => f[1])],
    rows.map((r) =>
      h(
        "tr",
        { data: { cap: r.capability } },
        h("th", { scope: "row" }, r.capability),
        fields.map(([key, , fmt]) =>
          h("td", { class: "n", data: { field: key, value: r[key] ?? "" } }, fmt(r[key])),
        ),
      ),
    ),
    { id: "queues" },
  );
}

/**
 * Throughput, failure rate and latency over the last minutes, from the operators' event
 * stream (GET /events), which the master keeps for the last 10,000 transitions while a
 * dashboard or another operator stream is open. The stream starts 10 minutes back, so a
 * reload keeps the charts; what happened while no one watched is not in it.
 */
class Charts {
  constructor() {
    this.buckets = new Map(); // bucket start ms -> {ok, failed, latencies[]}
    this.submitted = new Map(); // task id -> submit ms
    this.since = null;
    this.figures = h("div", { class: "figures", id: "figures" });
    this.throughput = h("div", { class: "chart", id: "chart-throughput" });
    this.failures = h("div", { class: "chart", id: "chart-failures" });
    this.latency = h("div", { class: "chart", id: "chart-latency" });
    this.note = h("p", { class: "muted small" });
    this.el = h(
      "section",
      { class: "card" },
      h("h2", {}, "Last 10 minutes"),
      this.figures,
      h(
        "div",
        { class: "charts" },
        h("figure", {}, h("figcaption", {}, "Tasks finished per second"), this.throughput),
        h("figure", {}, h("figcaption", {}, "Failure rate (%)"), this.failures),
        h("figure", {}, h("figcaption", {}, "Latency, submit to finish (ms): p50, p95, p99"), this.latency),
      ),
      this.note,
    );
  }

  start() {
    const after = `${Date.now() - WINDOW_MS}-0.0`;
    this.source = new EventSource(`/events?after=${after}`);
    const on = (type, fn) => this.source.addEventListener(type, (m) => fn(JSON.parse(m.data)));
    on("task.submitted", (e) => {
      if (this.since === null) this.since = e.at_ms;
      if (this.submitted.size < 200000) this.submitted.set(e.task_id, e.at_ms);
    });
    const done = (failed) => (e) => {
      if (this.since === null) this.since = e.at_ms;
      const start = Math.floor(e.at_ms / BUCKET_MS) * BUCKET_MS;
      const b = this.buckets.get(start) || { ok: 0, failed: 0, latencies: [] };
      if (failed) b.failed += 1;
      else b.ok += 1;
      const t0 = this.submitted.get(e.task_id);
      if (t0 !== undefined) {
        b.latencies.push(e.at_ms - t0);
        this.submitted.delete(e.task_id);
      }
      this.buckets.set(start, b);
    };
    on("task.succeeded", done(false));
    on("task.failed", done(true));
    on("task.cancelled", (e) => this.submitted.delete(e.task_id));
    this.timer = setInterval(() => this.draw(), 1000);
    this.draw();
  }

  stop() {
    if (this.source) this.source.close();
    clearInterval(this.timer);
  }

  draw() {
    const now = Date.now();
    const first = Math.floor((now - WINDOW_MS) / BUCKET_MS) * BUCKET_MS;
    for (const k of this.buckets.keys()) if (k < first) this.buckets.delete(k);
    for (const [id, t] of this.submitted) if (t < now - 3 * WINDOW_MS) this.submitted.delete(id);
    const xs = [];
    for (let t = first; t <= now; t += BUCKET_MS) xs.push(t);
    const rows = xs.map((t) => this.buckets.get(t) || { ok: 0, failed: 0, latencies: [] });
    const seconds = BUCKET_MS / 1000;
    const rate = rows.map((b) => (b.ok + b.failed) / seconds);
    const failure = rows.map((b) => (b.ok + b.failed ? (100 * b.failed) / (b.ok + b.failed) : null));
    const pct = (q) => rows.map((b) => percentile(b.latencies, q));
    lineChart(this.throughput, xs, [{ name: "tasks/s", values: rate }]);
    lineChart(this.failures, xs, [{ name: "failed %", values: failure }], 100);
    lineChart(this.latency, xs, [
      { name: "p50", values: pct(0.5) },
      { name: "p95", values: pct(0.95) },
      { name: "p99", values: pct(0.99) },
    ]);
    // The last minute in figures.
    const recent = rows.slice(-6);
    const ok = recent.reduce((s, b) => s + b.ok, 0);
    const failed = recent.reduce((s, b) => s + b.failed, 0);
    const lat = recent.flatMap((b) => b.latencies);
    const figure = (label, value, id) =>
      h("div", { class: "figure" }, h("span", { class: "value", id }, value), h("span", { class: "label" }, label));
    this.figures.replaceChildren(
      figure("tasks/s, last minute", ((ok + failed) / 60).toFixed(2), "fig-rate"),
      figure("failed, last minute", ok + failed ? `${((100 * failed) / (ok + failed)).toFixed(1)} %` : "–", "fig-failed"),
      figure("p50 latency", lat.length ? duration(percentile(lat, 0.5)) : "–", "fig-p50"),
      figure("p99 latency", lat.length ? duration(percentile(lat, 0.99)) : "–", "fig-p99"),
    );
    this.note.textContent =
      this.since === null
        ? "Waiting for tasks to finish. The charts come from the operators' event stream."
        : `From the operators' event stream, since ${when(Math.max(this.since, now - WINDOW_MS)).slice(11)}.`;
  }
}

function percentile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

/** Draws series of numbers (null = no data) over time as an SVG line chart. */
function lineChart(where, xs, series, fixedMax) {
  const W = 600;
  const H = 150;
  const pad = { l: 44, r: 8, t: 8, b: 20 };
  const all = series.flatMap((s) => s.values.filter((v) => v !== null));
  const max = fixedMax || Math.max(1, ...all) * 1.1;
  const x = (i) => pad.l + (i * (W - pad.l - pad.r)) / Math.max(1, xs.length - 1);
  const y = (v) => H - pad.b - (v * (H - pad.t - pad.b)) / max;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", preserveAspectRatio: "none" });
  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    root.append(
      svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: pad.l - 4, y: y(v) + 4, "text-anchor": "end", class: "axis" }, v >= 10 ? Math.round(v) : v.toFixed(1)),
    );
  }
  root.append(
    svg("text", { x: pad.l, y: H - 4, class: "axis" }, "10 min ago"),
    svg("text", { x: W - pad.r, y: H - 4, "text-anchor": "end", class: "axis" }, "now"),
  );
  series.forEach((s, n) => {
    let d = "";
    s.values.forEach((v, i) => {
      if (v === null) return;
      d += `${d && s.values[i - 1] !== null ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
    });
    root.append(svg("path", { d: d || "M0,0", class: `line l${n}` }));
  });
  const legend =
    series.length > 1 ? h("div", { class: "legend" }, series.map((s, n) => h("span", { class: `key l${n}` }, s.name))) : null;
  where.replaceChildren(root, legend || "");
}

// ---- workers -------------------------------------------------------------------------------

function workers(main) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  main.append(h("h1", {}, "Workers"), body);
  return every(2000, async () => {
    let list;
    try {
      list = await api("/workers");
    } catch (e) {
      return problem(body, e);
    }
    const live = list.workers || [];
    const state = (w) =>
      w.draining ? "draining" : w.degraded ? `degraded: ${w.degraded}` : w.unavailable ? `unavailable: ${w.unavailable}` : "ready";
    const rows = live.map((w) =>
      h(
        "tr",
        { data: { worker: w.id } },
        h("th", { scope: "row" }, w.id),
        h("td", {}, (w.capabilities || []).join(", ")),
        h("td", { class: "n" }, `${w.leased ?? (w.in_flight || []).length} / ${w.max_concurrency}`),
        h("td", {}, w.version),
        h("td", {}, h("span", { class: `badge ${w.draining || w.degraded || w.unavailable ? "s-failed" : "s-succeeded"}` }, state(w))),
        h("td", {}, ago(w.heartbeat_at_ms)),
        h("td", {}, ago(w.started_at_ms)),
        h("td", { class: "small" }, w.url),
      ),
    );
    const malformed = list.malformed || [];
    body.replaceChildren(
      h(
        "section",
        { class: "card" },
        h("h2", {}, `Live workers (${live.length})`),
        live.length
          ? table(["Worker", "Capabilities", "Load / slots", "Version", "State", "Last heartbeat", "Started", "URL"], rows, { id: "workers" })
          : h("p", { class: "muted" }, "No live workers."),
      ),
      h(
        "section",
        { class: "card" },
        h("h2", {}, "Workers per capability"),
        table(
          ["Capability", "Workers"],
          Object.entries(list.by_capability || {}).map(([cap, ids]) => h("tr", {}, h("th", { scope: "row" }, cap), h("td", {}, ids.join(", ")))),
        ),
      ),
      malformed.length
        ? h(
            "section",
            { class: "card" },
            h("h2", {}, `Invalid records (${malformed.length})`),
            h("p", { class: "muted" }, "Live records that do not parse. Such a worker gets no work."),
            table(["Worker", "Key", "Reason"], malformed.map((m) => h("tr", {}, h("th", { scope: "row" }, m.id), h("td", {}, m.key), h("td", {}, m.reason)))),
          )
        : "",
    );
  });
}

// ---- tasks ---------------------------------------------------------------------------------

// A waiting task is searched as running (the index keeps no "waiting" part).
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

function toLocalInput(ms) {
  if (!ms) return "";
  const d = new Date(Number(ms) - new Date().getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 16);
}

function tasks(main, { query }) {
  const field = (name, input) => h("label", {}, h("span", {}, name), input);
  const status = h("select", { name: "status", id: "f-status" }, h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s }, s)));
  status.value = query.get("status") || "";
  const client = h("input", { name: "client", id: "f-client", value: query.get("client") || "", placeholder: "client id" });
  const pipeline = h("input", { name: "pipeline", id: "f-pipeline", value: query.get("pipeline") || "", placeholder: "pipeline" });
  const since = h("input", { name: "since", type: "datetime-local", id: "f-since", value: toLocalInput(query.get("since")) });
  const until = h("input", { name: "until", type: "datetime-local", id: "f-until", value: toLocalInput(query.get("until")) });
  const form = h(
    "form",
    { class: "filters", id: "task-filters" },
    field("Status", status),
    field("Client", client),
    field("Pipeline", pipeline),
    field("Submitted from", since),
    field("to", until),
    h("button", { type: "submit" }, "Search"),
  );
  const results = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const pager = h("div", { class: "pager" });
  main.append(h("h1", {}, "Tasks"), h("section", { class: "card" }, form, results, pager));

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (client.value.trim()) q.set("client", client.value.trim());
    if (pipeline.value.trim()) q.set("pipeline", pipeline.value.trim());
    if (since.value) q.set("since", String(new Date(since.value).getTime()));
    if (until.value) q.set("until", String(new Date(until.value).getTime()));
    location.hash = `#/tasks?${q}`;
  });

  const cursors = [null]; // page n starts at cursors[n]
  let page = 0;
  const load = async () => {
    const q = new URLSearchParams(query);
    q.set("limit", "50");
    if (cursors[page]) q.set("cursor", cursors[page]);
    try {
      const answer = await api(`/tasks?${q}`);
      const list = answer.tasks || [];
      cursors[page + 1] = answer.next || null;
      results.replaceChildren(
        list.length
          ? table(
              ["Task", "Status", "Client", "Pipeline", "Steps", "Submitted", "Finished"],
              list.map((t) =>
                h(
                  "tr",
                  { data: { task: t.id, status: t.status } },
                  h("th", { scope: "row" }, h("a", { href: `#/task/${encodeURIComponent(t.id)}`, class: "mono" }, t.id)),
                  h("td", {}, badge(t.status)),
                  h("td", {}, t.client ?? "–"),
                  h("td", {}, t.pipeline ?? "inline"),
                  h("td", { class: "n" }, num(t.steps)),
                  h("td", {}, when(t.created_at)),
                  h("td", {}, when(t.finished_at)),
                ),
              ),
              { id: "tasks" },
            )
          : h("p", { class: "muted", id: "no-tasks" }, "No task matches."),
      );
      pager.replaceChildren(
        h("button", { class: "quiet", disabled: page === 0, onclick: () => { page -= 1; load(); } }, "← Newer"),
        h("span", { class: "muted small" }, `page ${page + 1}`),
        h("button", { class: "quiet", id: "next-page", disabled: !answer.next, onclick: () => { page += 1; load(); } }, "Older →"),
      );
    } catch (e) {
      problem(results, e);
    }
  };
  load();
  return () => {};
}

// ---- one task ------------------------------------------------------------------------------

const FINAL = ["task.succeeded", "task.failed", "task.cancelled"];
const EVENT_TYPES = [
  "task.submitted", "step.queued", "step.dispatched", "step.progress", "step.retrying", "step.succeeded",
  "step.failed", "step.waiting", "step.skipped", "step.cancelled", "signal.received", "task.redriven", ...FINAL,
];

function taskPage(main, { args }) {
  const id = args[0] || "";
  const head = h("div", {}, h("h1", {}, "Task ", h("span", { class: "mono" }, id)));
  const summary = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const graph = h("div", { class: "graph", id: "graph" });
  const waterfall = h("div", { id: "waterfall" });
  const detail = h("div", { id: "step-detail" }, h("p", { class: "muted" }, "Pick a step to see its input, output and attempts."));
  const log = h("ol", { class: "events", id: "events", reversed: true });
  main.append(
    head,
    h("section", { class: "card" }, summary),
    h("section", { class: "card" }, h("h2", {}, "Steps"), graph),
    h("section", { class: "card" }, h("h2", {}, "Timing"), waterfall),
    h("section", { class: "card" }, h("h2", {}, "Step"), detail),
    h("section", { class: "card" }, h("h2", {}, "Events"), log),
  );

  let view = null;
  let selected = null;
  const partial = new Map(); // step id -> text streamed so far (step.progress)
  let closed = false;

  const render = () => {
    if (!view) return;
    summary.replaceChildren(taskSummary(view, cancel));
    drawGraph(graph, view.steps, (s) => {
      selected = s.id;
      render();
    }, selected);
    waterfall.replaceChildren(timing(view));
    const step = flatSteps(view.steps).find((s) => s.id === selected);
    if (step) detail.replaceChildren(stepDetail(view, step, partial.get(step.id)));
  };

  let pending = null;
  const refresh = () => {
    // Several events in a burst make one read.
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try {
        view = await api(`/task/${encodeURIComponent(id)}`);
        render();
      } catch (e) {
        problem(summary, e);
      }
    }, 150);
  };

  const cancel = async () => {
    if (!confirm(`Cancel task ${id}?`)) return;
    try {
      await api(`/task/${encodeURIComponent(id)}`, { method: "DELETE" });
      refresh();
    } catch (e) {
      alert(`Could not cancel: ${e.message}`);
    }
  };

  const source = new EventSource(`/task/${encodeURIComponent(id)}/events`);
  const onEvent = (m) => {
    const e = JSON.parse(m.data);
    const signal = e.signal ? `signal “${e.signal}”${e.buffered ? ", kept until the step is reached" : ""}` : "";
    const text = [e.step, signal, e.attempt ? `attempt ${e.attempt}` : "", e.worker_id ? `on ${e.worker_id}` : "", e.error ? e.error.message : ""]
      .filter(Boolean)
      .join(" · ");
    if (e.type === "step.progress") {
      const deltas = (e.messages || []).map((x) => (x && typeof x.delta === "string" ? x.delta : JSON.stringify(x))).join("");
      partial.set(e.step, (partial.get(e.step) || "") + deltas);
      if (selected === e.step) render();
    } else {
      log.prepend(h("li", { data: { type: e.type } }, h("time", {}, when(e.at_ms).slice(11)), " ", h("b", {}, e.type), text ? ` ${text}` : ""));
      refresh();
    }
    if (FINAL.includes(e.type)) {
      // The stream ends after the final event; without this the browser would reconnect.
      source.close();
      closed = true;
    }
  };
  for (const t of EVENT_TYPES) source.addEventListener(t, onEvent);
  source.onerror = () => {
    if (closed) source.close();
  };
  refresh();
  return () => {
    source.close();
    clearTimeout(pending);
  };
}

function taskSummary(v, cancel) {
  const finished = ["succeeded", "failed", "cancelled"].includes(v.status);
  const total = v.usage && v.usage.total;
  return h(
    "div",
    { class: "summary" },
    h(
      "dl",
      {},
      h("dt", {}, "Status"), h("dd", { id: "task-status", data: { status: v.status } }, badge(v.status)),
      h("dt", {}, "Pipeline"), h("dd", {}, v.pipeline ?? "inline steps"),
      h("dt", {}, "Submitted"), h("dd", {}, when(v.created_at_ms)),
      h("dt", {}, "Duration"), h("dd", {}, duration((v.finished_at_ms || Date.now()) - v.created_at_ms)),
      total ? [h("dt", {}, "Model usage"), h("dd", {}, `${num(total.input_tokens)} in / ${num(total.output_tokens)} out tokens${total.cost_usd !== undefined ? `, $${Number(total.cost_usd).toFixed(4)}` : ""}`)] : "",
      v.error ? [h("dt", {}, "Error"), h("dd", { class: "error" }, v.error.message)] : "",
    ),
    finished ? "" : h("button", { class: "danger", id: "cancel", onclick: cancel }, "Cancel task"),
    v.result !== null && v.result !== undefined ? h("details", {}, h("summary", {}, "Result"), json(v.result)) : "",
  );
}

function flatSteps(steps) {
  return steps.flatMap((s) => [s, ...flatSteps(s.instances || [])]);
}

/** Lays the steps out in columns by depth (longest chain of `needs` before them). */
function drawGraph(where, steps, pick, selected) {
  const byId = new Map(steps.map((s) => [s.id, s]));
  const depth = new Map();
  const depthOf = (s, seen = new Set()) => {
    if (depth.has(s.id)) return depth.get(s.id);
    if (seen.has(s.id)) return 0;
    seen.add(s.id);
    const d = Math.max(-1, ...(s.needs || []).map((n) => (byId.has(n) ? depthOf(byId.get(n), seen) : -1))) + 1;
    depth.set(s.id, d);
    return d;
  };
  steps.forEach((s) => depthOf(s));
  const columns = [];
  for (const s of steps) (columns[depth.get(s.id)] ||= []).push(s);
  const lines = svg("svg", { class: "edges", "aria-hidden": "true" });
  const card = (s) => {
    const label = s.capability || s.kind || "step";
    const sub = [];
    if (s.attempts) sub.push(`${s.attempts} attempt${s.attempts > 1 ? "s" : ""}`);
    if (s.worker_id) sub.push(s.worker_id);
    if (s.map) sub.push(`${s.map.finished}/${s.map.total ?? "?"} items`);
    if (s.wait) sub.push(`waits for “${s.wait.signal}”`);
    return h(
      "button",
      {
        class: `step s-${s.status}${s.id === selected ? " selected" : ""}`,
        data: { step: s.id, status: s.status },
        title: `${s.id}: ${s.status}`,
        onclick: () => pick(s),
      },
      h("span", { class: "step-id" }, s.id),
      h("span", { class: "step-cap" }, label),
      badge(s.status),
      sub.length ? h("span", { class: "step-sub" }, sub.join(" · ")) : "",
      (s.instances || []).length
        ? h("span", { class: "instances" }, s.instances.map((i) => h("span", { class: `dot s-${i.status}`, title: `${i.id}: ${i.status}`, data: { step: i.id, status: i.status } })))
        : "",
    );
  };
  const grid = h("div", { class: "columns" }, columns.map((col) => h("div", { class: "column" }, col.map(card))));
  where.replaceChildren(lines, grid);
  // Edges from each step to the steps that need it, drawn once the cards have a place.
  requestAnimationFrame(() => {
    const box = where.getBoundingClientRect();
    lines.setAttribute("width", box.width);
    lines.setAttribute("height", where.scrollHeight);
    const at = (id) => where.querySelector(`.columns [data-step="${CSS.escape(id)}"]`);
    for (const s of steps) {
      for (const n of s.needs || []) {
        const a = at(n);
        const b = at(s.id);
        if (!a || !b) continue;
        const ra = a.getBoundingClientRect();
        const rb = b.getBoundingClientRect();
        const side = rb.left >= ra.right; // columns side by side (desktop) or stacked (phone)
        const [x1, y1, x2, y2] = side
          ? [ra.right, ra.top + ra.height / 2, rb.left, rb.top + rb.height / 2]
          : [ra.left + ra.width / 2, ra.bottom, rb.left + rb.width / 2, rb.top];
        const [sx, sy, ex, ey] = [x1 - box.left, y1 - box.top, x2 - box.left, y2 - box.top];
        const d = side
          ? `M${sx},${sy} C${(sx + ex) / 2},${sy} ${(sx + ex) / 2},${ey} ${ex},${ey}`
          : `M${sx},${sy} C${sx},${(sy + ey) / 2} ${ex},${(sy + ey) / 2} ${ex},${ey}`;
        lines.append(svg("path", { d }));
      }
    }
  });
}

/** A bar per step: waiting in the queue (light), then running (dark), on the task's clock. */
function timing(v) {
  const steps = flatSteps(v.steps).filter((s) => s.queued_at_ms || s.dispatched_at_ms || s.finished_at_ms);
  if (!steps.length) return h("p", { class: "muted" }, "No step has started yet.");
  const t0 = v.created_at_ms;
  const end = Math.max(v.finished_at_ms || 0, ...steps.map((s) => s.finished_at_ms || Date.now()));
  const span = Math.max(1, end - t0);
  const pct = (t) => `${((100 * (t - t0)) / span).toFixed(2)}%`;
  const width = (a, b) => `${Math.max(0.4, (100 * (b - a)) / span).toFixed(2)}%`;
  return h(
    "div",
    { class: "waterfall" },
    steps.map((s) => {
      const queued = s.queued_at_ms || s.dispatched_at_ms || t0;
      const started = s.dispatched_at_ms || s.finished_at_ms || Date.now();
      const finished = s.finished_at_ms || Date.now();
      const wait = h("span", { class: "wait" });
      const run = h("span", { class: `run s-${s.status}` });
      // Positions go through the CSSOM: the page's policy allows no inline style attributes.
      wait.style.left = pct(queued);
      wait.style.width = width(queued, started);
      run.style.left = pct(started);
      run.style.width = width(started, finished);
      return h(
        "div",
        { class: "row", data: { step: s.id } },
        h("span", { class: "name" }, s.id),
        h("span", { class: "track" }, wait, s.dispatched_at_ms ? run : ""),
        h("span", { class: "took small" }, s.dispatched_at_ms ? duration(finished - started) : "–"),
      );
    }),
    h("p", { class: "muted small" }, `0 to ${duration(span)} from submission. Light: queued; dark: running.`),
  );
}

function stepDetail(v, s, streamed) {
  const needs = s.needs || [];
  // What the step received: the task input and the outputs of the steps it needs.
  const outputs = Object.fromEntries(needs.map((n) => [n, (flatSteps(v.steps).find((x) => x.id === n) || {}).output ?? null]));
  return h(
    "div",
    { class: "detail", data: { step: s.id } },
    h("h3", {}, s.id, " ", badge(s.status)),
    h(
      "dl",
      {},
      h("dt", {}, "Capability"), h("dd", {}, s.capability || s.kind || "–"),
      h("dt", {}, "Attempts"), h("dd", {}, num(s.attempts)),
      h("dt", {}, "Worker"), h("dd", {}, s.worker_id || "–"),
      h("dt", {}, "Queued"), h("dd", {}, when(s.queued_at_ms)),
      h("dt", {}, "Dispatched"), h("dd", {}, when(s.dispatched_at_ms)),
      h("dt", {}, "Finished"), h("dd", {}, when(s.finished_at_ms)),
      s.usage ? [h("dt", {}, "Model usage"), h("dd", {}, `${num(s.usage.input_tokens)} in / ${num(s.usage.output_tokens)} out tokens`)] : "",
    ),
    h("h4", {}, "Input"),
    json(needs.length ? { input: v.input, needs: outputs } : { input: v.input }),
    streamed && s.output === null ? [h("h4", {}, "Output so far"), h("pre", { class: "json live", id: "partial" }, streamed)] : "",
    s.output !== null && s.output !== undefined ? [h("h4", {}, "Output"), json(s.output)] : "",
    s.error ? [h("h4", {}, "Error"), json(s.error)] : "",
  );
}

// ---- dead letters --------------------------------------------------------------------------

function deadLetters(main) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const note = h("p", { class: "notice", role: "status", id: "dead-notice" });
  main.append(h("h1", {}, "Dead letters"), note, body);
  const act = async (what, path, options) => {
    try {
      const answer = await api(path, options);
      const n = answer && (answer.redriven ? answer.redriven.length : answer.purged);
      note.replaceChildren(`${what}: ${n ?? "done"}. `);
      if (answer && answer.redriven && answer.redriven.length === 1) {
        const id = answer.redriven[0];
        note.append(h("a", { href: `#/task/${encodeURIComponent(id)}`, id: "redriven-link" }, `Watch task ${id} run`));
      }
      load();
    } catch (e) {
      note.textContent = `${what} failed: ${e.message}`;
    }
  };
  const load = async () => {
    let answer;
    try {
      answer = await api("/deadletters?limit=500");
    } catch (e) {
      return problem(body, e);
    }
    const groups = new Map();
    for (const d of answer.dead_letters || []) {
      if (!groups.has(d.capability)) groups.set(d.capability, []);
      groups.get(d.capability).push(d);
    }
    if (!groups.size) {
      body.replaceChildren(h("section", { class: "card" }, h("p", { class: "muted", id: "no-dead" }, "No dead letters.")));
      return;
    }
    body.replaceChildren(
      ...[...groups].map(([cap, list]) =>
        h(
          "section",
          { class: "card", data: { cap } },
          h(
            "div",
            { class: "card-head" },
            h("h2", {}, `${cap} (${list.length}${answer.next ? "+" : ""})`),
            h(
              "div",
              { class: "actions" },
              h("button", { class: "redrive-all", onclick: () => act(`Redrove ${cap}`, "/dispatch", { method: "POST", body: { capability: cap } }) }, "Redrive all"),
              h(
                "button",
                {
                  class: "danger purge",
                  onclick: () => confirm(`Purge every dead letter of ${cap}? The tasks stay failed.`) && act(`Purged ${cap}`, `/deadletters/${encodeURIComponent(cap)}`, { method: "DELETE" }),
                },
                "Purge",
              ),
            ),
          ),
          table(
            ["Task", "Step", "Failed", "Error", ""],
            list.map((d) =>
              h(
                "tr",
                { data: { task: d.task_id } },
                h("th", { scope: "row" }, h("a", { href: `#/task/${encodeURIComponent(d.task_id)}`, class: "mono" }, d.task_id)),
                h("td", {}, d.step ?? "–"),
                h("td", {}, ago(d.failed_at)),
                h("td", { class: "error-text" }, d.error ?? "–"),
                h("td", {}, h("button", { class: "redrive", onclick: () => act("Redriven", "/dispatch", { method: "POST", body: { task_id: d.task_id } }) }, "Redrive")),
              ),
            ),
          ),
        ),
      ),
    );
  };
  load();
  return () => {};
}

boot();
