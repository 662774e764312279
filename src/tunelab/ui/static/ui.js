// tunelab ui: the little JavaScript the pages need (no library). Every POST sends this page's CSRF token.
"use strict";
const csrf = document.querySelector('meta[name="csrf"]').content;
const $ = (sel) => document.querySelector(sel);

async function post(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                              body: JSON.stringify(body)});
  const text = await r.text();
  if (!r.ok) {
    let msg = text;
    try { const j = JSON.parse(text); msg = (j.error && (j.error.message || j.error)) || j.detail || text; } catch (e) {}
    throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
  }
  return text;
}

function showError(id, err) {
  const el = $(id);
  el.hidden = !err;
  el.textContent = err ? String(err.message || err) : "";
}

const enc = (ref) => ref.split("/").map(encodeURIComponent).join("/");
const fmt = (v) => (typeof v === "number" ? v.toFixed(4) : "-");

// ---------------------------------------------------------------- the line chart (SVG)
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function drawChart(box, series) {
  const W = 760, H = 280, L = 56, R = 12, T = 12, B = 28;
  const pts = series.flatMap((s) => s.points);
  box.textContent = "";
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img"}, box);
  if (!pts.length) { svg("text", {x: L, y: H / 2, class: "axis"}, root).textContent = "no metrics yet"; return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis-line"}, root);
  svg("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis-line"}, root);
  for (const [v, y] of [[y1, T + 10], [y0, H - B]]) svg("text", {x: 4, y, class: "axis"}, root).textContent = v.toPrecision(3);
  svg("text", {x: L, y: H - 8, class: "axis"}, root).textContent = `step ${x0}`;
  svg("text", {x: W - R - 80, y: H - 8, class: "axis"}, root).textContent = `step ${x1}`;
  for (const s of series) {
    if (!s.points.length) continue;
    svg("polyline", {points: s.points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), class: `line ${s.cls}`,
                     "data-n": s.points.length}, root);
    if (s.dots) for (const p of s.points) svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3, class: `dot ${s.cls}`}, root);
  }
}

// ---------------------------------------------------------------- pages
function runPage() {
  const box = $("#chart"), ref = box.dataset.ref;
  const loss = [], evals = [];
  let offset = 0;
  async function poll() {
    try {
      const r = await fetch(`/api/metrics/${enc(ref)}?offset=${offset}`);
      const d = await r.json();
      if (d.reset) { loss.length = 0; evals.length = 0; }
      for (const row of d.rows) {
        if (typeof row.loss === "number") loss.push([row.step, row.loss]);
        if (typeof row.eval_loss === "number") evals.push([row.step, row.eval_loss]);
      }
      offset = d.offset;
      const status = $("#status");
      status.textContent = d.status;
      status.className = `status ${d.status}`;
      $("#max-steps").textContent = d.max_steps || "?";
      if (loss.length) { $("#step").textContent = loss[loss.length - 1][0]; $("#loss").textContent = fmt(loss[loss.length - 1][1]); }
      if (evals.length) $("#eval-loss").textContent = fmt(evals[evals.length - 1][1]);
      if (d.job) { const log = $("#log"); log.hidden = false; log.textContent = d.job.log; }
      drawChart(box, [{points: loss, cls: "loss"}, {points: evals, cls: "eval", dots: true}]);
    } catch (e) { /* the server went away: try again at the next tick */ }
  }
  poll();
  setInterval(poll, 1500);
}

function runsPage() {
  setInterval(async () => {
    const r = await fetch("/api/runs");
    if (!r.ok) return;
    for (const run of await r.json()) {
      const tr = document.querySelector(`tr[data-ref="${CSS.escape(run.ref)}"]`);
      if (!tr) continue;
      const st = tr.querySelector(".status");
      st.textContent = run.status; st.className = `status ${run.status}`;
      tr.querySelector(".step").textContent = `${run.step}/${run.max_steps || "?"}`;
      tr.querySelector(".loss").textContent = typeof run.loss === "number" ? run.loss.toFixed(4) : "";
    }
  }, 3000);
}

function dataPage() {
  $("#data-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("#data-error", null);
    $("#data-report").textContent = "checking ...";
    try {
      $("#data-report").innerHTML = await post("/api/data-check", {config: ev.target.config.value});  // server-escaped
    } catch (e) { $("#data-report").textContent = ""; showError("#data-error", e); }
  });
}

function stopButtons() {
  for (const b of document.querySelectorAll("#stop, button.stop")) {
    b.addEventListener("click", async () => {
      try { await post("/api/runs/stop", {run: b.dataset.run}); b.disabled = true; b.textContent = "stopping ..."; }
      catch (e) { alert(e.message); }
    });
  }
}

function trainPage() {
  $("#train-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    showError("#train-error", null);
    try {
      const job = JSON.parse(await post("/api/runs/start", {config: f.config.value, name: f.elements["name"].value,
        root: f.root ? f.root.value : null, resume: f.resume.checked}));
      location.href = `/run/${enc(job.run)}`;
    } catch (e) { showError("#train-error", e); }
  });
}

function chatPage() {
  const form = $("#chat-form");
  if (!form) return;
  let history = [];
  const add = (role, text) => {
    const p = document.createElement("p");
    p.className = `msg ${role}`;
    p.textContent = text;
    $("#messages").appendChild(p);
    return p;
  };
  $("#clear").addEventListener("click", () => { history = []; $("#messages").textContent = ""; });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const content = form.content.value.trim();
    if (!content) return;
    showError("#chat-error", null);
    history.push({role: "user", content});
    add("user", `${content}`);
    form.content.value = "";
    const model = form.model.value;
    try {
      const reply = JSON.parse(await post("/v1/chat/completions", {model, messages: history,
        max_tokens: Number(form.max_tokens.value) || 64}));
      const text = reply.choices[0].message.content;
      history.push({role: "assistant", content: text});
      add("assistant", text).dataset.model = model;
    } catch (e) { history.pop(); showError("#chat-error", e); }
  });
}

function loginPage() {
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try { await post("/login", {token: ev.target.token.value}); location.href = "/"; }
    catch (e) { showError("#login-error", e); }
  });
}

const pages = {run: runPage, runs: runsPage, data: dataPage, train: trainPage, chat: chatPage, login: loginPage};
const page = document.body.dataset.page;
if (pages[page]) pages[page]();
stopButtons();
