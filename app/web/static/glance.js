// Service glance: queue depth, images/s and p95 latency parsed from /metrics (Prometheus text format).
"use strict";

const GLANCE_MS = 5000;
let lastScrape = null;  // {at, images, buckets} of the previous poll, for rates and windowed quantiles

/** Samples of the text format: [{name, labels, value}]; comments and malformed lines are skipped. */
function parseMetrics(text) {
  const out = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (!raw || raw.startsWith("#")) continue;
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

const total = (samples, name) => samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);

/** Cumulative bucket counts by upper bound, summed over every label set: [[le, count], ...] ascending. */
function buckets(samples, name) {
  const by = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket`) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    by.set(le, (by.get(le) || 0) + s.value);
  }
  return [...by.entries()].sort((a, b) => a[0] - b[0]);
}

/** The q-quantile from cumulative buckets, interpolated within its bucket as Prometheus does; null if empty. */
function quantile(q, cum) {
  const count = cum.length ? cum[cum.length - 1][1] : 0;
  if (!count) return null;
  const rank = q * count;
  for (let i = 0; i < cum.length; i++) {
    const [le, c] = cum[i];
    if (c >= rank) {
      const [lo, below] = i ? cum[i - 1] : [0, 0];
      if (le === Infinity) return lo;
      return lo + (le - lo) * ((rank - below) / Math.max(c - below, 1e-9));
    }
  }
  return null;
}

function setGlance(id, text) {
  $(id).textContent = text;
}

async function scrapeGlance() {
  let text;
  try {
    const resp = await fetch(new URL("metrics", API));
    if (!resp.ok) throw await toApiError(resp);
    text = await resp.text();
  } catch (err) {
    const e = err instanceof ApiError ? err : new ApiError(0, `cannot reach the service (${err.message})`, "network_error");
    setGlance("glance-note", `Metrics unavailable: ${e.type}${e.status ? ` (HTTP ${e.status})` : ""}: ${e.message}`);
    return;
  }
  const samples = parseMetrics(text);
  const now = performance.now();
  const images = total(samples, "dmp_images_generated_total");
  const cum = buckets(samples, "dmp_generate_seconds");
  setGlance("glance-queue", `${total(samples, "dmp_queue_depth")} waiting, ${total(samples, "dmp_inflight")} in flight`);
  if (lastScrape) {
    const seconds = (now - lastScrape.at) / 1000;
    setGlance("glance-rate", `${Math.max(0, (images - lastScrape.images) / seconds).toFixed(2)} images/s`);
    const window = cum.map(([le, c], i) => [le, c - (lastScrape.buckets[i] ? lastScrape.buckets[i][1] : 0)]);
    const recent = quantile(0.95, window);
    const overall = quantile(0.95, cum);
    setGlance("glance-p95", recent !== null ? `${(recent * 1000).toFixed(0)} ms (last ${seconds.toFixed(0)} s)`
      : overall !== null ? `${(overall * 1000).toFixed(0)} ms (since start)` : "no requests yet");
  } else {
    setGlance("glance-rate", "measuring…");
    const overall = quantile(0.95, cum);
    setGlance("glance-p95", overall !== null ? `${(overall * 1000).toFixed(0)} ms (since start)` : "no requests yet");
  }
  setGlance("glance-note", `From /metrics of the replica that answered, ${new Date().toLocaleTimeString()}.`);
  lastScrape = { at: now, images, buckets: cum };
}

function startGlance() {
  scrapeGlance();
  setInterval(() => { if (!document.hidden) scrapeGlance(); }, GLANCE_MS);
}
