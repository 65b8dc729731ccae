// lhtstream view: the page's side. The server sends binary pictures (~25/s per stream)
// and a JSON state (~4/s); this file draws them. Charts are Plotly.js (served from the
// installed plotly package); the 32x32 heat map is a canvas, drawn here, because it is
// one putImageData per picture where a chart library redraws a whole figure.
"use strict";

const KIND_COLOURS = {
  trajectory: "#4e9af1", intensity_low: "#f1c84e", intensity_high: "#f17f4e",
  stall: "#c54ef1", frequency: "#4ef1c8", spot_size: "#9af14e", image: "#f14e9a",
  sensor: "#b0b0b0",
};
const PLOT_CONFIG = { displayModeBar: false, responsive: true, staticPlot: false };
const DARK = { paper_bgcolor: "#1d2128", plot_bgcolor: "#1d2128",
               font: { color: "#c8cdd4", size: 10 } };
const MAX_LOG_ROWS = 200;

// A perceptual dark-to-bright ramp (black, purple, red, orange, pale yellow), 256 steps.
const LUT = (() => {
  const stops = [[0, 0, 0, 4], [0.25, 87, 16, 110], [0.5, 188, 55, 84],
                 [0.75, 249, 142, 9], [1, 252, 255, 164]];
  const lut = new Uint8ClampedArray(256 * 4);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    let k = 0;
    while (k < stops.length - 2 && t > stops[k + 1][0]) k++;
    const [t0, r0, g0, b0] = stops[k], [t1, r1, g1, b1] = stops[k + 1];
    const f = (t - t0) / (t1 - t0);
    lut.set([r0 + f * (r1 - r0), g0 + f * (g1 - g0), b0 + f * (b1 - b0), 255], i * 4);
  }
  return lut;
})();

// Panels scrolled out of sight are not drawn (a plant has many streams; the browser's
// time goes to the ones on screen). Their logs are still kept.
const visibility = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    const p = panels.get(entry.target.dataset.stream);
    if (p) { p.visible = entry.isIntersecting; if (p.visible) p.pathKey = null; }
  }
});

let kinds = [];
const panels = new Map();
let run = null, lastEvent = 0;  // events already logged (a reconnect resends the recent ones)

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function num(v, digits = 0) {
  return v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US",
    { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

// ------------------------------------------------------------------ per-stream panel

function panelFor(name) {
  let p = panels.get(name);
  if (p) return p;
  const canvas = el("canvas", { class: "heat", width: "32", height: "32" });
  const badge = el("span", { class: "badge idle" }, "…");
  const info = el("span", { class: "info" });
  const caption = el("div", { class: "caption" }, "difference frame");
  const path = el("div", { class: "path" });
  const evidence = el("div", { class: "evidence" });
  const logBody = el("tbody");
  const root = el("div", { class: "panel", id: "stream-" + name, "data-stream": name },
    el("h2", {}, el("span", {}, name), badge, info),
    el("div", { class: "row" }, el("div", {}, canvas, caption), path),
    evidence,
    el("div", { class: "log" }, el("table", { class: "alarm-log" }, logBody)));
  document.getElementById("panels").append(root);
  p = { root, canvas, ctx: canvas.getContext("2d"), badge, info, caption, path, evidence,
        logBody, scale: 64, image: null, pathKey: null, visible: true };
  panels.set(name, p);
  visibility.observe(root);
  return p;
}

function drawPicture(buffer) {
  const view = new DataView(buffer);
  if (view.getUint8(0) !== 1) return;
  const nameLen = view.getUint8(1);
  const name = new TextDecoder().decode(new Uint8Array(buffer, 2, nameLen));
  let off = 2 + nameLen;
  if (off % 2) off += 1;
  const frame = view.getUint32(off, true);
  const rows = view.getUint16(off + 4, true), cols = view.getUint16(off + 6, true);
  const pixels = new Uint16Array(buffer.slice(off + 8, off + 8 + rows * cols * 2));
  const p = panelFor(name);
  if (!p.visible || document.hidden) return;
  if (p.canvas.width !== cols || p.canvas.height !== rows || !p.image) {
    p.canvas.width = cols; p.canvas.height = rows;
    p.image = p.ctx.createImageData(cols, rows);
  }
  let peak = 0;
  for (let i = 0; i < pixels.length; i++) if (pixels[i] > peak) peak = pixels[i];
  // colour scale follows the brightest recent pixel (decays slowly), never below 32 counts
  p.scale = Math.max(32, peak, p.scale * 0.98);
  const data = p.image.data, k = 255 / p.scale;
  for (let i = 0; i < pixels.length; i++) {
    const j = Math.min(255, (pixels[i] * k) | 0) * 4;
    data[i * 4] = LUT[j]; data[i * 4 + 1] = LUT[j + 1]; data[i * 4 + 2] = LUT[j + 2];
    data[i * 4 + 3] = 255;
  }
  p.ctx.putImageData(p.image, 0, 0);
  p.caption.textContent = `difference frame ${frame}, ${rows}x${cols} px, ` +
    `scale 0–${Math.round(p.scale)} counts`;
}

function drawPath(p, s) {
  const path = s.path;
  const key = path ? `${path.video}/${path.frame}` : "none";
  if (key === p.pathKey) return;
  p.pathKey = key;
  const traces = [];
  if (path && path.normal) {
    traces.push({ x: path.normal.x, y: path.normal.y, mode: "lines", name: "normal (model)",
                  line: { color: "#2e9e5b", width: 3, dash: "dot" }, hoverinfo: "skip" });
  }
  if (path) {
    traces.push({ x: path.x, y: path.y, mode: "markers", name: "spot, last 20 cycles",
                  marker: { size: 4, color: "#f1c84e" } });
  }
  const rows = path ? path.shape[0] : 32, cols = path ? path.shape[1] : 32;
  const layout = Object.assign({}, DARK, {
    margin: { l: 30, r: 8, t: 18, b: 24 }, showlegend: true,
    legend: { orientation: "h", y: 1.14, x: 0, font: { size: 10 } },
    xaxis: { range: [-0.5, cols - 0.5], gridcolor: "#2c323c", zeroline: false,
             constrain: "domain" },
    yaxis: { range: [rows - 0.5, -0.5], gridcolor: "#2c323c", zeroline: false,
             scaleanchor: "x", constrain: "domain" },
    annotations: path ? [] : [{ text: "no frames (start the view with --frames)",
                                showarrow: false, x: cols / 2, y: rows / 2,
                                font: { color: "#8a93a0" } }],
  });
  Plotly.react(p.path, traces, layout, PLOT_CONFIG);
}

function drawEvidence(p, s) {
  const ev = s.evidence;
  const n = kinds.length;
  const traces = [], shapes = [], annotations = [];
  const layout = Object.assign({}, DARK, {
    margin: { l: 88, r: 8, t: 4, b: 20 }, showlegend: false,
    xaxis: { range: [-10, 0], gridcolor: "#2c323c", zeroline: false, anchor: "y" + n,
             title: { text: "s ago   (score / raise threshold; dashed: threshold)",
                      font: { size: 10 }, standoff: 2 } },
  });
  const gap = 0.02, h = (1 - gap * (n - 1)) / n;
  kinds.forEach((kind, i) => {
    const axis = i === 0 ? "y" : "y" + (i + 1);
    const lo = 1 - (i + 1) * h - i * gap, hi = lo + h;
    const values = ev.kinds[kind] || [];
    const top = Math.max(1.3, ...values.filter(v => v !== null).map(v => v * 1.1));
    layout["yaxis" + (i === 0 ? "" : i + 1)] = {
      domain: [lo, hi], range: [0, top], gridcolor: "#2c323c", zeroline: false,
      tickfont: { size: 8 }, nticks: 2 };
    traces.push({ x: ev.t, y: values, yaxis: axis, mode: "lines", name: kind,
                  line: { color: KIND_COLOURS[kind] || "#ddd", width: 1.5 },
                  fill: "tozeroy", connectgaps: false });
    shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, yref: axis, y0: 1, y1: 1,
                  line: { color: "#d93b3b", width: 1, dash: "dash" } });
    annotations.push({ text: kind, xref: "paper", x: -0.01, xanchor: "right",
                       yref: "paper", y: (lo + hi) / 2, showarrow: false,
                       font: { size: 10, color: KIND_COLOURS[kind] || "#ddd" } });
  });
  layout.shapes = shapes;
  layout.annotations = annotations;
  Plotly.react(p.evidence, traces, layout, PLOT_CONFIG);
}

function logEvent(e) {
  const p = panelFor(e.stream);
  let row;
  if (e.topic === "alarm") {
    row = el("tr", { class: "alarm-row " + e.state },
      el("td", {}, e.time), el("td", { class: "state" }, e.state),
      el("td", { class: "kind" }, e.kind), el("td", {}, `T${e.type}/${e.video}`),
      el("td", {}, `frame ${e.frame}`),
      el("td", {}, `score ${num(e.score, 2)} / ${num(e.threshold, 2)}`));
  } else {
    row = el("tr", { class: "verdict" + (e.anomalous ? " anomalous" : "") },
      el("td", {}, e.time), el("td", { class: "state" }, e.anomalous ? "ANOMALOUS" : "good"),
      el("td", { class: "kind" }, (e.kinds || []).join(", ") || "–"),
      el("td", {}, `T${e.type}/${e.video}`), el("td", {}, `${num(e.frames)} frames`),
      el("td", {}, `verdict ${num(e.score, 2)}`));
  }
  p.logBody.prepend(row);
  while (p.logBody.rows.length > MAX_LOG_ROWS) p.logBody.deleteRow(-1);
}

// ------------------------------------------------------------------ overview

function drawState(msg) {
  const state = msg.state;
  kinds = state.kinds;
  const mons = document.getElementById("monitors");
  mons.replaceChildren(...state.monitors.map(m => el("span", { class: m.up ? "up" : "down" },
    `monitor ${m.endpoint}: ${m.up ? "up" : "NO STATUS"}` +
    (m.uptime_s !== null ? `, uptime ${num(m.uptime_s)} s` : "") +
    (m.model ? `, ${m.model}` : "") + "   ")));
  const body = document.querySelector("#overview tbody");
  body.replaceChildren(...state.streams.map(s => el("tr", { "data-stream": s.name },
    el("td", {}, s.name), el("td", {}, el("span", { class: "badge " + s.state }, s.word)),
    el("td", {}, s.video ? `T${s.type}/${s.video}` : "–"),
    el("td", { class: "num" }, num(s.frames)), el("td", { class: "num" }, num(s.dropped)),
    el("td", { class: "num" }, num(s.latency_us.p99)), el("td", {}, s.model || "–"))));
  document.getElementById("no-streams").hidden = state.streams.length > 0;
  const shown = new Set(state.streams.map(s => s.name));
  for (const [name, p] of panels) {  // streams the monitor no longer serves
    if (!shown.has(name)) { visibility.unobserve(p.root); p.root.remove(); panels.delete(name); }
  }
  for (const s of state.streams) {
    const p = panelFor(s.name);
    p.badge.className = "badge " + s.state;
    p.badge.textContent = s.word;
    p.root.classList.toggle("alarm", s.state === "alarm");
    p.info.textContent = s.video ? `Type${s.type}/${s.video}, frame ${num(s.frame)}` : "";
    if (p.visible && !document.hidden) {
      drawPath(p, s);
      drawEvidence(p, s);
    }
  }
  if (state.run !== run) { run = state.run; lastEvent = 0; }
  for (const e of msg.events) if (e.id > lastEvent) { logEvent(e); lastEvent = e.id; }
  document.getElementById("footer").textContent =
    `${state.streams.length} stream(s); pictures this page skipped while busy: ` +
    `${num(msg.pictures_dropped)}` + (state.model ? `; normal path from ${state.model}` : "");
}

// ------------------------------------------------------------------ history

async function loadHistory() {
  const note = document.getElementById("history-note");
  const charts = document.getElementById("history-charts");
  let h;
  try {
    h = await (await fetch("/api/history")).json();
  } catch (err) {
    note.textContent = "cannot load the history: " + err;
    return;
  }
  if (h.error) { note.textContent = h.error; charts.replaceChildren(); return; }
  note.textContent = `Alarms raised per kind and stream in ${h.journal}, per ` +
    `${h.bucket_s} s (${h.alarms.length ? "" : "no alarm yet"})`;
  const streams = [...new Set(h.alarms.map(a => a.stream).concat(
    h.verdicts.map(v => v.stream)))].sort();
  charts.replaceChildren();
  for (const stream of streams) {
    const div = el("div", { class: "hchart", "data-stream": stream });
    charts.append(div);
    const traces = [];
    for (const kind of new Set(h.alarms.filter(a => a.stream === stream).map(a => a.kind))) {
      const rows = h.alarms.filter(a => a.stream === stream && a.kind === kind);
      traces.push({ type: "bar", name: kind, x: rows.map(r => new Date(r.t * 1000)),
                    y: rows.map(r => r.n), marker: { color: KIND_COLOURS[kind] || "#ddd" } });
    }
    const bad = h.verdicts.filter(v => v.stream === stream && v.anomalous);
    if (bad.length) {
      traces.push({ type: "scatter", mode: "markers", name: "anomalous workpieces",
                    x: bad.map(r => new Date(r.t * 1000)), y: bad.map(r => r.n),
                    yaxis: "y2", marker: { color: "#d93b3b", symbol: "x", size: 8 } });
    }
    Plotly.react(div, traces, Object.assign({}, DARK, {
      barmode: "stack", margin: { l: 40, r: 40, t: 28, b: 30 },
      title: { text: `stream ${stream}`, font: { size: 12 } },
      yaxis: { title: { text: "alarms" }, gridcolor: "#2c323c" },
      yaxis2: { overlaying: "y", side: "right", title: { text: "anomalous" },
                showgrid: false, rangemode: "tozero" },
      xaxis: { gridcolor: "#2c323c" }, legend: { orientation: "h", y: -0.2 } }),
      PLOT_CONFIG);
  }
}

let historyTimer = null;
for (const tab of document.querySelectorAll("nav .tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll("nav .tab")) t.classList.toggle("active", t === tab);
    const live = tab.dataset.tab === "live";
    document.getElementById("live").hidden = !live;
    document.getElementById("history").hidden = live;
    clearInterval(historyTimer);
    if (!live) { loadHistory(); historyTimer = setInterval(loadHistory, 10000); }
  });
}

// ------------------------------------------------------------------ connection

function connect() {
  const conn = document.getElementById("connection");
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { conn.textContent = "live"; conn.className = "conn up"; };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") drawState(JSON.parse(ev.data));
    else drawPicture(ev.data);
  };
  ws.onclose = () => {
    conn.textContent = "disconnected, retrying…"; conn.className = "conn down";
    setTimeout(connect, 1000);
  };
}
connect();
