// The gate view: the heatmap PNG from /patches/{name}/gates.png and, per block, the top prompts' weight vs t.
"use strict";

const GATE_TIMESTEPS = 50;
const TOP_PROMPTS = 3;
const LINE_COLOURS = ["#2457c5", "#c62828", "#1a7f37"];  // distinct in both colour schemes, with labels too
const SVG = "http://www.w3.org/2000/svg";
let gatesRequest = 0;  // only the latest selection's reply is drawn

/** The query for the form's condition: its class label or caption. */
function gateQuery() {
  const q = new URLSearchParams({ timesteps: String(GATE_TIMESTEPS) });
  const model = currentModel();
  if (model && model.task === "class" && $("class_label").value !== "") q.set("class_label", $("class_label").value);
  if (model && model.task === "text" && $("caption").value.trim()) q.set("caption", $("caption").value.trim());
  return q;
}

function svgEl(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

/** The top of a chart's weight axis: a little above the data's peak, in a round step (64-prompt gates stay
 * under 0.04, so a fixed 0-1 axis would draw them flat on zero). */
function axisTop(peak) {
  if (!(peak > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(peak));
  return Math.min(1, Math.ceil((peak * 1.05) / step) * step);
}

/** One small chart: x = timestep, y = gate weight in [0, top] (top fitted to the data), one line per top prompt. */
function blockChart(block, rows, timesteps) {
  const W = 260, H = 130, L = 34, R = 8, T = 20, B = 26;
  const tMax = timesteps[timesteps.length - 1] || 1;
  const n = rows[0].length;
  const peak = Array.from({ length: n }, (_, p) => Math.max(...rows.map((r) => r[p])));
  const top = peak.map((v, p) => [v, p]).sort((a, b) => b[0] - a[0]).slice(0, TOP_PROMPTS).map(([, p]) => p);
  const yTop = axisTop(Math.max(...peak));
  const x = (t) => L + (t / tMax) * (W - L - R);
  const y = (w) => T + (1 - w / yTop) * (H - T - B);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "gate-chart" });
  const title = svgEl("title", {});
  title.textContent = `Block ${block}: weight of prompts ${top.join(", ")} against timestep`;
  svg.append(title);
  svg.append(svgEl("line", { x1: L, y1: y(0), x2: W - R, y2: y(0), class: "axis" }));
  svg.append(svgEl("line", { x1: L, y1: y(0), x2: L, y2: y(yTop), class: "axis" }));
  const text = (s, attrs) => { const t = svgEl("text", attrs); t.textContent = s; return t; };
  svg.append(text(`block ${block}`, { x: L, y: 13, class: "chart-title" }));
  svg.append(text(String(+yTop.toPrecision(2)), { x: L - 4, y: y(yTop) + 4, "text-anchor": "end", class: "y-top" }));
  svg.append(text("0", { x: L - 4, y: y(0) + 4, "text-anchor": "end" }));
  svg.append(text("0", { x: L, y: H - 10, "text-anchor": "middle" }));
  svg.append(text(String(tMax), { x: W - R, y: H - 10, "text-anchor": "end" }));
  svg.append(text("timestep t", { x: (L + W) / 2, y: H - 10, "text-anchor": "middle" }));
  top.forEach((p, i) => {
    const pts = rows.map((r, j) => `${x(timesteps[j]).toFixed(1)},${y(r[p]).toFixed(1)}`).join(" ");
    svg.append(svgEl("polyline", { points: pts, fill: "none", stroke: LINE_COLOURS[i], "stroke-width": 2 }));
    svg.append(text(`p${p}`, { x: W - R - 4 - (TOP_PROMPTS - 1 - i) * 30, y: 13, fill: LINE_COLOURS[i],
      "text-anchor": "end", class: "legend" }));
  });
  return svg;
}

async function renderGates() {
  const name = $("patch").value;
  const img = $("gates-img");
  const lines = $("gates-lines");
  const status = $("gates-status");
  const mine = ++gatesRequest;
  if (!name) {
    img.hidden = true;
    img.removeAttribute("src");
    lines.replaceChildren();
    status.textContent = "Pick a patch in Generate to see which of its prompts each block uses, and when.";
    return;
  }
  status.textContent = `Loading the gates of ${name}…`;
  const q = gateQuery();
  try {
    const data = await api(`patches/${encodeURIComponent(name)}/gates?${q}`);
    if (mine !== gatesRequest) return;
    lines.replaceChildren(...data.weights.map((rows, b) => blockChart(b, rows, data.timesteps)));
    img.alt = `Heatmap of the gate weights of patch ${name} (${data.condition.text}): one panel per block, ` +
      `prompt index across, timestep up`;
    img.src = new URL(`patches/${encodeURIComponent(name)}/gates.png?${q}`, API).href;
    img.hidden = false;
    status.textContent = `${name} ${data.version}: ${data.blocks} blocks × ${data.prompts} prompts, ` +
      `gate input ${data.gate_input}, ${data.condition.text}.`;
  } catch (err) {
    if (mine !== gatesRequest) return;
    img.hidden = true;
    lines.replaceChildren();
    status.textContent = `Could not load the gates: ${err.type || "error"}${err.status ? ` (HTTP ${err.status})` : ""}: ${err.message}`;
  }
}
