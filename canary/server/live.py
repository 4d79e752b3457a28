"""The live view: one page at `/` listing the rollouts in progress and the recent ones.

Why a page and not only `canary status -w`: an SRE watching a rollout wants the curves (the
weight asked for and the weight read back, each arm's request and error rates, each metric's
estimate inside its anytime-valid bounds) and a link to the report, in a browser tab.

The page is self-contained: its CSS and its small script are inline, the charts are SVG drawn
by that script, and it makes no request but to this server (no CDN, no fonts, no images). It
holds no data: the script polls the server's JSON routes, `/rollouts?history=1` (each rollout's
state and its recent ticks, canary.runner.runner) and, where served, `/reports/?format=json`
(the recent records, with the ids of their reports).

Authentication is the server's own (canary.server.auth), as with `kubectl` against the API:
the shell at `/` is public (it is the same for everyone and holds no secret) and every data
request carries `Authorization: Bearer <token>` when the user gave one: typed in the page, or
passed once as `#token=...` in the address (a fragment never reaches a server or its logs; the
script moves it to the tab's sessionStorage and removes it from the address). With
`--public-reads` (and in the demo) no token is needed. Report links open the report fetched
with the same token. The server's guard still refuses cross-origin requests, so another site
cannot read the data through a user's browser.

May import: aiohttp, canary.server.app.
"""

from __future__ import annotations

from aiohttp import web

from canary.server.app import PUBLIC_PAGES

__all__ = ["LIVE_PATH", "live_page", "register_live"]

LIVE_PATH = "/"
# The page's own policy: nothing but this origin, and inline script/style (the page's own).
_CSP = (
    "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)

_CSS = """
[hidden] { display: none !important; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f4f6f7; color: #1c2833; }
header { background: #1c2833; color: #fff; padding: 10px 20px; display: flex; gap: 16px;
  align-items: center; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; }
header .meta { color: #aab7b8; font-size: 12px; }
header form { margin-left: auto; display: flex; gap: 6px; }
header input { width: 260px; }
main { max-width: 1200px; margin: 0 auto; padding: 12px 20px; }
section.rollout { background: #fff; border: 1px solid #d5dbdb; border-radius: 6px;
  margin: 12px 0; padding: 10px 14px; }
section.rollout h2 { font-size: 16px; margin: 0 0 4px; }
.phase { font-weight: 600; padding: 1px 6px; border-radius: 3px; background: #eaeded; }
.Succeeded, .promoted { color: #1e8449; } .Failed, .rolled_back { color: #c0392b; }
.Progressing, .running { color: #b9770e; } .Paused { color: #2471a3; }
.facts { color: #566573; margin: 2px 0 6px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
  gap: 8px; }
figure { margin: 0; } figcaption { font-weight: 600; font-size: 13px; }
svg { width: 100%; height: auto; font: 10px system-ui, sans-serif; }
svg text { fill: #566573; }
table { border-collapse: collapse; background: #fff; margin: 4px 0; }
th, td { border: 1px solid #e5e8e8; padding: 3px 8px; text-align: left; }
th { background: #eaeded; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1e8449; font-weight: 600; } .fail { color: #c0392b; font-weight: 600; }
.continue { color: #566573; }
#problem { color: #c0392b; font-weight: 600; }
.empty { color: #566573; }
"""

# The charts follow canary.reports.charts: 560-wide viewBox, same margins, colours and legend.
_SCRIPT = r"""
"use strict";
const EVERY_MS = Math.max(500, Number(new URLSearchParams(location.search).get("every")) || 2000);
const PRIMARY = "#2471a3", CANARY = "#d35400", SET = "#7f8c8d", GOOD = "#1e8449", BAD = "#c0392b";
const METRIC_COLORS = ["#8e44ad", "#16a085", "#d35400", "#2471a3", "#7d6608"];
let polls = 0;

// A token given as #token=... moves to this tab's storage, out of the address bar.
(function takeToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem("canary-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();
function token() { return sessionStorage.getItem("canary-token") || ""; }
function headers() {
  const t = token();
  return t ? {"Authorization": "Bearer " + t} : {};
}
async function getJSON(path) {
  const response = await fetch(path, {headers: headers(), cache: "no-store", redirect: "error"});
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    throw Object.assign(new Error(body.error || response.statusText), {auth: true});
  }
  if (!response.ok) throw Object.assign(new Error(path + ": " + response.status), {status: response.status});
  return response.json();
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}
const SVGNS = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function fmtDuration(s) {
  if (s < 90) return Math.round(s) + "s";
  if (s < 5400) return (s / 60).toFixed(s < 600 ? 1 : 0).replace(/\.0$/, "") + "m";
  return (s / 3600).toFixed(1).replace(/\.0$/, "") + "h";
}
function fmtNum(v, digits) {
  if (v === null || v === undefined || !isFinite(v)) return "\u2013";
  return Number(v).toPrecision(digits || 3).replace(/\.?0+e/, "e");
}
function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

// One chart: lines [{label, color, points: [[x, y|null]], dashed, step}], bands
// [{label, color, points: [[x, lo|null, hi|null]]}], hlines [[y, label, color]].
function chart(id, title, {lines = [], bands = [], hlines = [], yFormat = fmtNum, yMin, yCap}) {
  const width = 560, plotH = 176, left = 58, right = 12, top = 10, plotW = width - left - right;
  const legend = [...lines.map(l => [l.label, l.color, l.dashed ? "dash" : "line"]),
                  ...bands.map(b => [b.label, b.color, "band"])];
  const bottom = 44, height = top + plotH + bottom + 14 * Math.floor(legend.length / 4);
  const svg = svgEl("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title});
  const figure = el("figure", {id}, el("figcaption", {}, title), svg);
  let values = [], xMax = 0;
  const cap = v => (yCap !== undefined ? Math.min(v, yCap) : v);
  for (const l of lines) for (const [x, y] of l.points) { xMax = Math.max(xMax, x); if (y !== null) values.push(cap(y)); }
  for (const b of bands) for (const [x, lo, hi] of b.points) {
    xMax = Math.max(xMax, x);
    for (const v of [lo, hi]) if (v !== null) values.push(cap(v));
  }
  for (const [y] of hlines) values.push(y);
  if (!values.length || xMax <= 0) {
    svg.append(svgEl("text", {x: width / 2, y: height / 2, "text-anchor": "middle"}, "no data yet"));
    return figure;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (yMin !== undefined) lo = Math.min(lo, yMin);
  if (hi === lo) hi = lo + (Math.abs(lo) * 0.1 || 1);
  const pad = (hi - lo) * 0.05;
  if (yMin === undefined) lo -= pad;
  hi += pad;
  const px = x => left + plotW * Math.min(Math.max(x / xMax, 0), 1);
  const py = y => top + plotH * (1 - Math.min(Math.max((cap(y) - lo) / (hi - lo), 0), 1));
  svg.append(svgEl("rect", {x: left, y: top, width: plotW, height: plotH, fill: "#fbfcfc", stroke: "#d5dbdb"}));
  for (const t of niceTicks(lo, hi, 5)) {
    if (t < lo || t > hi) continue;
    svg.append(svgEl("line", {x1: left, x2: left + plotW, y1: py(t), y2: py(t), stroke: "#eaeded"}));
    svg.append(svgEl("text", {x: left - 5, y: py(t) + 4, "text-anchor": "end"}, yFormat(t)));
  }
  for (const t of niceTicks(0, xMax, 6)) {
    if (t > xMax) continue;
    svg.append(svgEl("line", {x1: px(t), x2: px(t), y1: top + plotH, y2: top + plotH + 4, stroke: "#7f8c8d"}));
    svg.append(svgEl("text", {x: px(t), y: top + plotH + 16, "text-anchor": "middle"}, fmtDuration(t)));
  }
  for (const b of bands) {
    const pts = b.points.filter(([, l, h]) => l !== null && h !== null);
    if (pts.length < 2) continue;
    const upper = pts.map(([x, , h]) => `${px(x).toFixed(1)},${py(h).toFixed(1)}`);
    const lower = pts.slice().reverse().map(([x, l]) => `${px(x).toFixed(1)},${py(l).toFixed(1)}`);
    svg.append(svgEl("polygon", {class: "band", points: upper.concat(lower).join(" "),
      fill: b.color, "fill-opacity": 0.18, stroke: "none"}));
  }
  for (const [y, label, color] of hlines) {
    svg.append(svgEl("line", {x1: left, x2: left + plotW, y1: py(y), y2: py(y), stroke: color,
      "stroke-width": 1.3, "stroke-dasharray": "6,4"}));
    svg.append(svgEl("text", {x: left + plotW - 4, y: py(y) - 4, "text-anchor": "end", style: `fill:${color}`}, label));
  }
  for (const l of lines) {
    let run = [];
    const flush = () => {
      if (run.length === 1) svg.append(svgEl("circle", {cx: run[0][0], cy: run[0][1], r: 2.5, fill: l.color}));
      else if (run.length > 1) svg.append(svgEl("polyline", {class: "series", "data-series": l.label,
        "data-points": run.length, fill: "none", stroke: l.color, "stroke-width": l.width || 1.6,
        "stroke-dasharray": l.dashed ? "5,3" : "none", points: run.map(p => p.join(",")).join(" ")}));
      run = [];
    };
    let previous = null;
    for (const [x, y] of l.points) {
      if (y === null) { flush(); previous = null; continue; }
      if (l.step && previous !== null) run.push([px(x).toFixed(1), py(previous).toFixed(1)]);
      run.push([px(x).toFixed(1), py(y).toFixed(1)]);
      previous = y;
    }
    flush();
  }
  let lx = left, ly = top + plotH + 36;
  for (const [label, color, kind] of legend) {
    if (lx + 28 + 6.2 * label.length > width && lx > left) { lx = left; ly += 14; }
    if (kind === "band") svg.append(svgEl("rect", {x: lx, y: ly - 8, width: 16, height: 8, fill: color, "fill-opacity": 0.25}));
    else svg.append(svgEl("line", {x1: lx, x2: lx + 16, y1: ly - 4, y2: ly - 4, stroke: color,
      "stroke-width": 2, "stroke-dasharray": kind === "dash" ? "4,2" : "none"}));
    svg.append(svgEl("text", {x: lx + 20, y: ly}, label));
    lx += 28 + 6.2 * label.length;
  }
  return figure;
}

// Per-tick rates from cumulative counts; a counter that went back (a restart) gives no point.
function rates(history, arm) {
  const requests = [], errors = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i], x = b.elapsed_s;
    const dt = b.at - a.at;
    if (!a[arm] || !b[arm] || !(dt > 0)) { requests.push([x, null]); errors.push([x, null]); continue; }
    const dr = b[arm][0] - a[arm][0], de = b[arm][1] - a[arm][1];
    if (dr < 0 || de < 0) { requests.push([x, null]); errors.push([x, null]); continue; }
    requests.push([x, dr / dt]);
    errors.push([x, dr > 0 ? de / dr : null]);
  }
  return {requests, errors};
}
const pct = v => (Math.abs(v) < 0.1 && v !== 0 ? (v * 100).toPrecision(2) : (v * 100).toFixed(0)) + "%";

function rolloutSection(state, reports) {
  const history = state.history || [];
  const steps = state.steps || [];
  const id = state.name.replace(/[^A-Za-z0-9_-]/g, "_");
  const section = el("section", {class: "rollout", id: "rollout-" + id, "data-name": state.name,
    "data-phase": state.phase, "data-step": state.step, "data-weight": state.weight,
    "data-points": history.length});
  const report = reports.get(state.rollout);
  const title = el("h2", {}, state.name + " ", el("span", {class: "phase " + state.phase}, state.phase));
  if (report) title.append(" ", reportLink(report, "report"));
  section.append(title);
  const read = state.weight_read === undefined || state.weight_read === null ? "?" : state.weight_read + "%";
  const stepText = steps.length ? `step ${Math.min(state.step + 1, steps.length)}/${steps.length}` : "";
  section.append(el("div", {class: "facts"},
    [stepText, `weight ${state.weight}% set / ${read} read`,
     state.elapsed_s !== undefined ? `analysis ${fmtDuration(state.elapsed_s)}` : "",
     state.last_decision ? `last decision ${state.last_decision}` : "",
     state.rollout || ""].filter(Boolean).join(" · ")));
  if (state.message) section.append(el("div", {class: "facts message"}, state.message));
  const metrics = state.metrics || {};
  if (Object.keys(metrics).length) {
    const table = el("table", {class: "metrics"}, el("tr", {},
      ...["metric", "decision", "estimate", "lower", "upper", "fails above"].map(h => el("th", {}, h))));
    for (const [name, m] of Object.entries(metrics)) {
      table.append(el("tr", {"data-metric": name}, el("td", {}, name + (m.critical ? "" : " (not critical)")),
        el("td", {class: m.decision}, m.decision), el("td", {class: "num"}, fmtNum(m.estimate)),
        el("td", {class: "num"}, fmtNum(m.lower)), el("td", {class: "num"}, fmtNum(m.upper)),
        el("td", {class: "num"}, fmtNum(m.fail_ratio))));
    }
    section.append(table);
  }
  const charts = el("div", {class: "charts"});
  const xs = history.map(p => p.elapsed_s);
  charts.append(chart(`weights-${id}`, "Canary weight: set and read back", {
    lines: [{label: "set", color: SET, points: history.map(p => [p.elapsed_s, p.weight_set]), step: true, dashed: true},
            {label: "read back", color: CANARY, points: history.map(p => [p.elapsed_s, p.weight_read]), step: true}],
    yFormat: v => v.toFixed(0) + "%", yMin: 0}));
  const p = rates(history, "primary"), c = rates(history, "canary");
  charts.append(chart(`requests-${id}`, "Requests per second", {
    lines: [{label: "primary", color: PRIMARY, points: p.requests}, {label: "canary", color: CANARY, points: c.requests}],
    yMin: 0}));
  charts.append(chart(`errors-${id}`, "Error rate", {
    lines: [{label: "primary", color: PRIMARY, points: p.errors}, {label: "canary", color: CANARY, points: c.errors}],
    yFormat: pct, yMin: 0}));
  const names = [...new Set(history.flatMap(p => Object.keys(p.metrics || {})))];
  names.forEach((name, i) => {
    const color = METRIC_COLORS[i % METRIC_COLORS.length];
    const pts = history.map(p => [p.elapsed_s, ...((p.metrics || {})[name] || [null, null, null])]);
    const hlines = [[1, "equal", "#7f8c8d"]];
    const failAt = (metrics[name] || {}).fail_ratio;
    if (failAt && failAt !== 1) hlines.push([failAt, "fails above", BAD]);
    const tolerance = (metrics[name] || {}).tolerance;
    if (tolerance) hlines.push([1 + tolerance, "passes below", GOOD]);
    charts.append(chart(`metric-${id}-${name.replace(/[^A-Za-z0-9_-]/g, "_")}`,
      `${name}: canary / primary, estimate and bounds`, {
        lines: [{label: "estimate", color, points: pts.map(([x, e]) => [x, e])}],
        bands: [{label: "anytime-valid bounds", color, points: pts.map(([x, , lo, hi]) => [x, lo, hi])}],
        hlines, yCap: 4}));
  });
  if (!xs.length) section.append(el("p", {class: "empty"}, "no ticks seen yet by this controller"));
  section.append(charts);
  return section;
}

function reportLink(report, text) {
  const href = "reports/" + encodeURIComponent(report.id);
  const a = el("a", {href, class: "report-link", "data-report": report.id}, text);
  a.addEventListener("click", async event => {
    if (!token()) return;  // public reads: a plain link
    event.preventDefault();  // fetch it with the token, show it in a new tab
    const tab = window.open("", "_blank");
    const response = await fetch(href, {headers: headers(), redirect: "error"});
    const blob = new Blob([await response.text()], {type: "text/html"});
    if (tab) tab.location = URL.createObjectURL(blob);
  });
  return a;
}

function recentTable(reports) {
  if (!reports.length) return el("p", {class: "empty"}, "No rollout records yet.");
  const table = el("table", {id: "recent"}, el("tr", {},
    ...["started", "target", "versions", "outcome", "report"].map(h => el("th", {}, h))));
  for (const r of reports.slice(0, 30)) {
    const started = new Date(r.started_at * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
    table.append(el("tr", {"data-rollout": r.rollout}, el("td", {}, started), el("td", {}, r.target),
      el("td", {}, `${r.primary_version || "?"} → ${r.canary_version || "?"}`),
      el("td", {class: r.outcome}, r.outcome.replace("_", " ")), el("td", {}, reportLink(r, r.rollout))));
  }
  return table;
}

async function refresh() {
  const problem = document.getElementById("problem");
  let states;
  try {
    states = (await getJSON("rollouts?history=1")).rollouts;
  } catch (error) {
    problem.textContent = error.auth
      ? "This server needs a token to show its rollouts: paste it above (" + error.message + ")."
      : "Cannot read the rollouts: " + error.message;
    document.getElementById("token-form").hidden = false;
    return;
  }
  let reports = [], reportsNote = "";
  try {
    reports = (await getJSON("reports/?format=json")).reports;
  } catch (error) {
    reportsNote = error.status === 404 ? "This server keeps no reports." : "Cannot read the reports: " + error.message;
  }
  problem.textContent = "";
  polls += 1;
  const byRollout = new Map(reports.map(r => [r.rollout, r]));
  const live = document.getElementById("live");
  const sections = states.map(s => rolloutSection(s, byRollout));
  live.replaceChildren(...(sections.length ? sections : [el("p", {class: "empty"}, "No rollouts.")]));
  const recent = document.getElementById("recent-list");
  recent.replaceChildren(reportsNote ? el("p", {class: "empty"}, reportsNote) : recentTable(reports));
  document.getElementById("updated").textContent =
    `updated ${new Date().toLocaleTimeString()} · every ${EVERY_MS / 1000}s`;
  document.body.dataset.polls = polls;
}

document.getElementById("token-form").addEventListener("submit", event => {
  event.preventDefault();
  const field = document.getElementById("token");
  sessionStorage.setItem("canary-token", field.value.trim());
  field.value = "";
  refresh();
});
if (token()) document.getElementById("token-form").hidden = true;
async function loop() {
  try {
    await refresh();
  } catch (error) {  // a bug or an odd answer must not stop the polling
    document.getElementById("problem").textContent = "Cannot show the rollouts: " + error;
  } finally {
    setTimeout(loop, EVERY_MS);
  }
}
loop();
"""


def live_page() -> str:
    """The page: static, the same for everyone, no data and no secret in it."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>canary: live view</title>"
        f'<style>{_CSS}</style></head><body data-polls="0">'
        "<header><h1>canary: live view</h1>"
        '<span class="meta" id="updated">loading ...</span>'
        '<form id="token-form" hidden autocomplete="off">'
        '<input id="token" type="password" placeholder="bearer token" aria-label="bearer token">'
        '<button type="submit">use token</button></form></header>'
        '<main><p id="problem" role="alert"></p>'
        '<h2>Rollouts</h2><div id="live"><p class="empty">loading ...</p></div>'
        '<h2>Recent rollouts</h2><div id="recent-list"></div></main>'
        f"<script>{_SCRIPT}</script></body></html>"
    )


def register_live(app: web.Application, *, path: str = LIVE_PATH) -> None:
    """Serve the page at `path` (public: the data it shows needs the server's usual token)."""
    page = live_page().encode()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": _CSP,
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    app.router.add_get(path, handler)
    app[PUBLIC_PAGES].add(path)
