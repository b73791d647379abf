// The overnight dashboard. Everything that comes from an experiment or a model is set with
// textContent: it is shown, never interpreted. The token lives in this tab only.
"use strict";

const params = new URLSearchParams(location.search);
let tag = params.get("tag") || "";
let state = null;
let sortKey = "id";
let sortUp = false;
let openId = null;

// The token: from the address the server printed (#token=...), then kept in this tab and
// in a same-site cookie, which the chart image and the event stream carry.
function setToken(t) {
  t = (t || "").replace(/[^A-Za-z0-9_-]/g, "");
  sessionStorage.setItem("overnight-token", t);
  document.cookie = "overnight_" + location.port + "=" + t + "; SameSite=Strict; path=/";
  document.getElementById("token").value = t;
  return t;
}

(function takeToken() {
  const m = location.hash.match(/token=([A-Za-z0-9_-]+)/);
  if (m) history.replaceState(null, "", location.pathname + location.search);
  setToken(m ? m[1] : sessionStorage.getItem("overnight-token"));
})();
document.getElementById("token").addEventListener("change", e => {
  setToken(e.target.value);
  refresh().then(() => { if (!source) listen(); });
});

function el(name, text, cls) {
  const e = document.createElement(name);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function q(path) {
  return tag ? path + (path.includes("?") ? "&" : "?") + "tag=" + encodeURIComponent(tag) : path;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  return Math.abs(v) >= 1000 || Math.abs(v) < 0.001 && v !== 0 ? v.toExponential(4) : v.toFixed(6);
}

function say(text, error) {
  const s = document.getElementById("said");
  s.textContent = text;
  s.className = error ? "error" : "";
}

async function refresh() {
  const r = await fetch(q("/api/state"));
  if (!r.ok) { say((await r.json()).error || "cannot read the ledger", true); return false; }
  state = await r.json();
  tag = state.tag;
  document.getElementById("tag").textContent = state.tag;
  const st = document.getElementById("state");
  const loop = state.loop;
  const word = !loop.running ? "stopped" : loop.checkpoint ? "checkpoint" : loop.paused ? "paused" : "running";
  st.textContent = word === "checkpoint" ? "waiting for approval (" + loop.checkpoint + ")" : word;
  st.className = word;
  const best = state.best ? "best #" + state.best.id + " " + fmt(state.best.value) : "no result yet";
  const base = state.baseline ? ", baseline " + fmt(state.baseline.value) : "";
  document.getElementById("summary").textContent =
    state.runs + " runs, " + best + base + " (" + state.metric + ", " + state.direction + " is better)";
  const chart = q("/chart.svg");
  document.getElementById("chart").src = chart + (chart.includes("?") ? "&" : "?") + "v=" + Date.now();
  drawLedger();
  drawRunning();
  if (openId !== null) openDetail(openId, false);
  return true;
}

function drawLedger() {
  const body = document.querySelector("#ledger tbody");
  const rows = state.rows.filter(r => r.repeat_of === null);
  rows.sort((a, b) => {
    let x = a[sortKey], y = b[sortKey];
    if (x === null || x === undefined) x = sortUp ? Infinity : -Infinity;
    if (y === null || y === undefined) y = sortUp ? Infinity : -Infinity;
    const c = typeof x === "string" ? x.localeCompare(y) : x - y;
    return sortUp ? c : -c;
  });
  const fresh = document.createDocumentFragment();
  for (const r of rows) {
    const tr = el("tr", null, r.status);
    tr.dataset.id = r.id;
    tr.append(el("td", "#" + r.id, "num"), el("td", r.status + (r.baseline ? " (baseline)" : ""), "status"),
              el("td", fmt(r.value), "num"), el("td", fmt(r.delta), "num"),
              el("td", r.runs || "", "num"), el("td", r.hw_class),
              el("td", r.description || r.reason, "desc"));
    tr.addEventListener("click", () => openDetail(r.id, true));
    fresh.append(tr);
  }
  body.replaceChildren(fresh);
  for (const th of document.querySelectorAll("#ledger th")) {
    th.classList.toggle("sorted", th.dataset.key === sortKey);
    th.classList.toggle("up", th.dataset.key === sortKey && sortUp);
  }
}

async function drawRunning() {
  const body = document.querySelector("#running tbody");
  const running = state.rows.filter(r => r.status === "running");
  const fresh = document.createDocumentFragment();
  for (const r of running) {
    const tr = el("tr");
    const cell = el("td", null, "desc");
    cell.append(el("div", r.description || "(baseline)"));
    const log = el("pre", "", "running-log");
    log.dataset.id = r.id;
    cell.append(log);
    const since = r.started_at ? Math.round(state.now - r.started_at) + " s" : "starting";
    tr.append(el("td", r.slot, "num"), el("td", "#" + r.id, "num"), el("td", since, "num"), cell);
    fresh.append(tr);
  }
  if (!running.length) {
    const tr = el("tr");
    const td = el("td", "nothing is running");
    td.colSpan = 4;
    tr.append(td);
    fresh.append(tr);
  }
  body.replaceChildren(fresh);
  await tailLogs();
}

async function tailLogs() {
  for (const pre of document.querySelectorAll("pre.running-log")) {
    const r = await fetch("/api/experiments/" + pre.dataset.id + "/log");
    if (r.ok) {
      const text = await r.text();
      pre.textContent = text.split("\n").slice(-8).join("\n");
    }
  }
}

async function openDetail(id, scroll) {
  openId = id;
  const row = state && state.rows.find(r => r.id === id);
  const box = document.getElementById("detail");
  box.className = "open";
  document.getElementById("detail-title").textContent = "#" + id + (row ? " " + row.status : "");
  const facts = document.getElementById("detail-facts");
  facts.replaceChildren();
  if (row) {
    for (const [k, v] of [["change", row.description], ["hypothesis", row.hypothesis],
                          ["value", fmt(row.value)], ["delta", fmt(row.delta)],
                          ["runs", row.runs], ["why", row.reason], ["proposer", row.proposer]]) {
      if (v === "" || v === null || v === undefined) continue;
      const p = el("div");
      p.append(el("b", k + ": "), el("span", v, "desc"));
      facts.append(p);
    }
  }
  const [diff, log] = await Promise.all([
    fetch("/api/experiments/" + id + "/diff").then(r => r.text()),
    fetch("/api/experiments/" + id + "/log").then(r => r.text()),
  ]);
  document.getElementById("detail-diff").textContent = diff;
  document.getElementById("detail-log").textContent = log;
  if (scroll) box.scrollIntoView({behavior: "smooth"});
}

async function act(action, note) {
  const token = setToken(document.getElementById("token").value.trim());
  const r = await fetch(q("/api/action"), {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Overnight-Token": token},
    body: JSON.stringify({action: action, note: note || ""}),
  });
  const answer = await r.json();
  say(answer.ok || answer.error, !r.ok);
  if (r.ok && action === "steer") document.getElementById("note").value = "";
  refresh();
}

for (const a of ["pause", "unpause", "stop"]) {
  document.getElementById(a).addEventListener("click", () => act(a));
}
document.getElementById("approve").addEventListener("click",
  () => act("approve", document.getElementById("note").value));
document.getElementById("steer").addEventListener("click",
  () => act("steer", document.getElementById("note").value));
for (const th of document.querySelectorAll("#ledger th")) {
  th.addEventListener("click", () => {
    if (sortKey === th.dataset.key) sortUp = !sortUp; else { sortKey = th.dataset.key; sortUp = true; }
    if (state) drawLedger();
  });
}

let source = null;

function listen() {
  source = new EventSource(q("/events"));
  source.addEventListener("change", () => refresh());
  source.addEventListener("tick", () => tailLogs());
  source.onerror = () => {
    document.getElementById("state").textContent = "reconnecting";
  };
}

refresh().then(ok => { if (ok) listen(); });
