// DMP console: plain browser JS, no build step and nothing loaded from outside the service.
"use strict";

// The page lives at <root>/ui/, the API at <root>/, so a path prefix added by a proxy keeps working.
const API = new URL("../", document.baseURI);
const NO_PATCH = "";  // the "base" choice of the patch select
const PREVIEWS = 4;  // evolving x0 previews per generation (SSE progress events)
const MAX_COMPARE_SEEDS = 4;

const state = { models: [], patches: [], running: null };  // running: the AbortController of a generation
const $ = (id) => document.getElementById(id);

/** An API failure carrying the service's {error, error_type} reply. */
class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

/** Turn a non-2xx reply into an ApiError; tolerates non-JSON bodies (proxies, crashes). */
async function toApiError(resp) {
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: fall through */ }
  if (body && typeof body.error === "string") {
    return new ApiError(resp.status, body.error, body.error_type || "error");
  }
  return new ApiError(resp.status, text.slice(0, 300) || resp.statusText, "http_error");
}

async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(new URL(path, API), options);
  } catch (e) {
    throw new ApiError(0, `cannot reach the service (${e.message})`, "network_error");
  }
  if (!resp.ok) throw await toApiError(resp);
  return resp.json();
}

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const title = document.createElement("strong");
  title.textContent = err instanceof ApiError
    ? `${err.type}${err.status ? ` (HTTP ${err.status})` : ""}`
    : "error";
  const msg = document.createElement("span");
  msg.className = "error-message";
  msg.textContent = err.message;
  box.append(title, ": ", msg);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value) || null;
}

/** Class names from /models when the base ships them, else the class indices. */
function classNames(model) {
  const labels = model.labels || [];
  return Array.from({ length: model.num_classes }, (_, i) => (i < labels.length ? `${i} · ${labels[i]}` : String(i)));
}

function renderModelFields() {
  const model = currentModel();
  const info = $("model-info");
  if (!model) {
    info.textContent = "";
    return;
  }
  info.textContent = `${model.task}` + (model.text_encoder ? ` (${model.text_encoder})` : "") +
    (model.task === "class" ? `, ${model.num_classes} classes` : "") +
    (model.image_size ? `, ${model.image_size}×${model.image_size}` : "");

  $("label-field").hidden = model.task !== "class";
  $("caption-field").hidden = model.task !== "text";
  if (model.task === "class") {
    const select = $("class_label");
    const previous = select.value;
    select.replaceChildren(...classNames(model).map((text, i) => option(String(i), text)));
    if (previous && Number(previous) < model.num_classes) select.value = previous;
  }
  // Empty fields mean "the model's default": show it rather than send it.
  $("steps").placeholder = String(model.default_steps);
  $("sampler").options[0].textContent = `default (${model.default_sampler})`;
  $("guidance_scale").placeholder = String(model.default_guidance);
  $("guidance_scale").disabled = model.task === "uncond";
  renderPatchOptions();
}

function renderPatchOptions() {
  const model = currentModel();
  const select = $("patch");
  const previous = select.value;
  const mine = state.patches.filter((p) => model && p.base === model.name);
  select.replaceChildren(option(NO_PATCH, "base (no patch)"),
    ...mine.map((p) => option(p.name, `${p.name}${p.version ? ` · ${p.version}` : ""}`)));
  if (mine.some((p) => p.name === previous)) select.value = previous;
  $("patch-info").textContent = mine.length ? "" : "No patches for this model yet.";
  renderCompareHint();
  renderMixOptions();
}

/** The second patch of a mix: any other patch of the same model; strength controls only with a patch. */
function renderMixOptions() {
  const model = currentModel();
  const first = $("patch").value;
  const select = $("mix_patch");
  const previous = select.value;
  const others = state.patches.filter((p) => model && p.base === model.name && p.name !== first);
  select.replaceChildren(option(NO_PATCH, "nothing"), ...others.map((p) => option(p.name, p.name)));
  if (others.some((p) => p.name === previous)) select.value = previous;
  const hasPatch = first !== NO_PATCH;
  $("patch_scale").disabled = !hasPatch;
  select.disabled = !hasPatch || !others.length;
  $("mix_scale").disabled = select.disabled || select.value === NO_PATCH;
}

/** What the request mixes: [{name, scale}] (empty for the base) from the patch, mix and strength controls. */
function patchMix(patch) {
  if (!patch) return [];
  const mix = [{ name: patch, scale: Number($("patch_scale").value) }];
  const second = $("mix_patch").value;
  if (second && second !== patch && !$("mix_patch").disabled) mix.push({ name: second, scale: Number($("mix_scale").value) });
  return mix;
}

function mixText(mix) {
  return mix.length ? mix.map((p) => `${p.name} ×${p.scale}`).join(" + ") : "base";
}

function renderCompareHint() {
  const hasPatch = $("patch").value !== NO_PATCH;
  $("compare").disabled = !hasPatch;
  if (!hasPatch) $("compare").checked = false;
  $("compare-hint").textContent = hasPatch ? "" : "Pick a patch to compare it with the base.";
}

function renderPatchTable() {
  const body = $("patches-table").tBodies[0];
  if (!state.patches.length) {
    const row = body.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 7;
    cell.className = "hint";
    cell.textContent = "No patches installed.";
    body.replaceChildren(row);
    return;
  }
  const rows = state.patches.map((p) => {
    const row = document.createElement("tr");
    for (const key of ["name", "base", "version", "state", "task", "domain"]) {
      const cell = row.insertCell();
      cell.textContent = p[key] ?? "";
      if (key === "state") {
        cell.className = `state state-${String(p[key] ?? "").toLowerCase()}`;
        if (p.error) cell.title = p.error;  // why a load failed, on hover
      }
    }
    const use = document.createElement("button");
    use.type = "button";
    use.className = "secondary small";
    use.textContent = "Use";
    use.setAttribute("aria-label", `Use patch ${p.name}`);
    use.disabled = !state.models.some((m) => m.name === p.base);
    use.addEventListener("click", () => {
      $("model").value = p.base;
      renderModelFields();
      $("patch").value = p.name;
      renderCompareHint();
      renderMixOptions();
      renderGates();
      $("patch").focus();
    });
    const history = document.createElement("button");
    history.type = "button";
    history.className = "secondary small";
    history.textContent = "History";
    history.setAttribute("aria-label", `Version history of patch ${p.name}`);
    history.addEventListener("click", () => showHistory(p.name));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "danger small";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete patch ${p.name} (admin)`);
    del.addEventListener("click", () => deletePatch(p.name));
    const actions = row.insertCell();
    actions.className = "actions";
    actions.append(use, history, del);
    return row;
  });
  body.replaceChildren(...rows);
}

async function loadModels() {
  const { models } = await api("models");
  state.models = models || [];
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => option(m.name, m.name)));
  if (state.models.some((m) => m.name === previous)) select.value = previous;
  if (!state.models.length) $("model-info").textContent = "The service has no models loaded.";
}

async function loadPatches() {
  await pollPatches();
}

async function checkHealth() {
  const badge = $("health");
  try {
    const resp = await fetch(new URL("health/ready", API));
    badge.textContent = resp.ok ? "ready" : `not ready (HTTP ${resp.status})`;
    badge.className = `badge ${resp.ok ? "ok" : "warn"}`;
  } catch {
    badge.textContent = "service unreachable";
    badge.className = "badge bad";
  }
}

/** A number input's value; undefined when empty. The browser blanks unparsable text, so refuse it here. */
function numberField(id) {
  const input = $(id);
  if (input.validity.badInput) {
    throw new ApiError(0, `${input.labels[0].textContent} is not a number`, "invalid_input");
  }
  return input.value.trim() === "" ? undefined : Number(input.value);
}

/** The POST /generate body from the form; empty fields are left to the server's defaults. */
function requestBody(patch) {
  const model = currentModel();
  const body = { model: model ? model.name : $("model").value, patch: patch || null };
  const mix = patchMix(patch);
  if (mix.length > 1) {  // a composition replaces `patch`
    delete body.patch;
    body.patches = mix;
  } else if (mix.length) {
    body.patch_scale = mix[0].scale;
  }
  if (model && model.task === "class") body.class_label = Number($("class_label").value);
  if (model && model.task === "text") body.caption = $("caption").value;
  const steps = numberField("steps");
  if (steps !== undefined) body.steps = steps;
  if ($("sampler").value) body.sampler = $("sampler").value;
  const guidance = numberField("guidance_scale");
  if (guidance !== undefined && !$("guidance_scale").disabled) body.guidance_scale = guidance;
  const numImages = numberField("num_images");
  if (numImages !== undefined) body.num_images = numImages;
  const seed = $("seed").value.trim();
  // A non-integer seed is sent as typed so the server's validation message explains it.
  if (seed) body.seed = /^-?\d+$/.test(seed) ? Number(seed) : seed;
  return body;
}

/** One generation streamed as SSE: the progress area follows it; `label` says which run it is. */
async function generate(patch, seed, label, signal) {
  const body = requestBody(patch);
  if (seed !== undefined) body.seed = seed;
  body.previews = PREVIEWS;
  const started = performance.now();
  const headers = { "Content-Type": "application/json" };
  // Routers hash on it, so a patch's requests reach the replica that holds it (deploy/haproxy/haproxy.cfg).
  const first = body.patch || (body.patches && body.patches[0].name);
  if (first) headers["X-DMP-Patch"] = first;
  showProgress(label, "sending…", 0, 1);
  const reply = await streamGenerate(body, headers, (name, ev) => {
    if (name === "queued") {
      showProgress(label, ev.position ? `queued: ${ev.position} ahead` : "queued: next", 0, 1);
    } else if (name === "progress") {
      showProgress(label, `step ${ev.step}/${ev.of}`, ev.step, ev.of);
      if (ev.preview && ev.preview.length) {
        $("preview").src = `data:image/png;base64,${ev.preview[0]}`;
        $("preview").alt = `Preview of ${label} at step ${ev.step} of ${ev.of}`;
        $("preview").hidden = false;
      }
    }
  }, signal);
  reply.round_trip_ms = performance.now() - started;
  return reply;
}

function showProgress(label, text, value, max) {
  $("progress").hidden = false;
  $("progress-bar").max = max;
  $("progress-bar").value = value;
  $("progress-text").textContent = `${label}: ${text}`;
}

function hideProgress() {
  $("progress").hidden = true;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
}

function ms(value) {
  return typeof value === "number" ? `${value.toFixed(value < 10 ? 1 : 0)} ms` : "–";
}

/** What the request asked for, in words: the class name or the caption. */
function promptText() {
  const model = currentModel();
  if (model && model.task === "class") return $("class_label").selectedOptions[0]?.textContent ?? "";
  if (model && model.task === "text") return $("caption").value;
  return "unconditional";
}

function resultCard(title, reply, prompt) {
  const card = document.createElement("figure");
  card.className = "result";
  const grid = document.createElement("div");
  grid.className = "grid";
  const used = reply.patches || [];
  const patchName = used.length ? used.map((p) => `${p.name} ${p.version || ""} ×${p.scale}`).join(" + ") : "base";
  reply.images.forEach((b64, i) => {
    const img = document.createElement("img");
    img.src = `data:image/${reply.output_format || "png"};base64,${b64}`;
    img.alt = `Image ${i + 1} of ${reply.images.length}: model ${reply.model}, ${patchName}, seed ${reply.seed}`;
    grid.append(img);
  });
  const cap = document.createElement("figcaption");
  const t = reply.timings || {};
  const head = document.createElement("strong");
  head.textContent = title;
  const meta = document.createElement("dl");
  meta.className = "meta";
  const items = [["model", reply.model], ["patch", patchName], ["prompt", prompt], ["seed", reply.seed],
    ["queue", ms(t.queue_ms)], ["sample", ms(t.sample_ms)], ["decode", ms(t.decode_ms)],
    ["round trip", ms(reply.round_trip_ms)]];
  for (const [k, v] of items) {
    const pair = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    dd.dataset.field = k.replace(" ", "_");
    pair.append(dt, dd);
    meta.append(pair);
  }
  if (reply.cached) head.textContent += " (from the result cache)";
  cap.append(head, meta);
  card.append(grid, cap);
  return card;
}

/** Seeds for a comparison: the typed one (or the server's pick for the first) then the next ones. */
function compareSeeds() {
  const n = numberField("compare_seeds") ?? 1;
  if (!Number.isInteger(n) || n < 1 || n > MAX_COMPARE_SEEDS) {
    throw new ApiError(0, `Seeds to compare must be 1 to ${MAX_COMPARE_SEEDS}`, "invalid_input");
  }
  return n;
}

/** base, patch and |Δ| for one seed; the base run picks the seed when none is given. */
async function comparePair(patch, seed, prompt, signal) {
  const base = await generate(NO_PATCH, seed, `base, seed ${seed ?? "random"}`, signal);
  const what = mixText(patchMix(patch));
  const patched = await generate(patch, base.seed, `${what}, seed ${base.seed}`, signal);
  const row = document.createElement("div");
  row.className = "compare-row";
  row.append(resultCard("base", base, prompt), resultCard(what, patched, prompt),
    await diffCard(base, patched));
  return { row, seed: base.seed };
}

async function diffCard(base, patched) {
  const card = document.createElement("figure");
  card.className = "result diff";
  const grid = document.createElement("div");
  grid.className = "grid";
  const fmt = `data:image/${base.output_format || "png"};base64,`;
  let total = 0;
  for (let i = 0; i < Math.min(base.images.length, patched.images.length); i++) {
    const d = await differenceImage(fmt + base.images[i], fmt + patched.images[i]);
    total += d.mean;
    const img = document.createElement("img");
    img.src = d.src;
    img.alt = `Per-pixel difference of image ${i + 1}, seed ${base.seed}: brighter = changed more (white = ${d.max} of 255)`;
    grid.append(img);
  }
  const mean = total / Math.max(1, base.images.length);
  const cap = document.createElement("figcaption");
  const head = document.createElement("strong");
  head.textContent = "|base − patch|";
  const meta = document.createElement("p");
  meta.className = "diff-mean";
  meta.dataset.mean = mean.toFixed(3);
  meta.textContent = `mean |Δ| = ${mean.toFixed(2)} of 255` + (mean === 0 ? " (the patch changed nothing)" : "");
  cap.append(head, meta);
  card.append(grid, cap);
  return card;
}

async function onSubmit(event) {
  event.preventDefault();
  clearError();
  const button = $("generate");
  const results = $("results");
  const patch = $("patch").value;
  const compare = $("compare").checked && patch !== NO_PATCH;
  const prompt = promptText();
  const controller = new AbortController();
  state.running = controller;
  button.disabled = true;
  $("cancel").hidden = false;
  results.setAttribute("aria-busy", "true");
  $("status").textContent = compare ? "Generating base and patch…" : "Generating…";
  try {
    let cards;
    if (compare) {
      const n = compareSeeds();
      const typed = $("seed").value.trim();
      let seed = /^-?\d+$/.test(typed) ? Number(typed) : (typed || undefined);
      cards = [];
      for (let i = 0; i < n; i++) {
        const pair = await comparePair(patch, seed, prompt, controller.signal);
        cards.push(pair.row);
        seed = pair.seed + 1;
      }
    } else {
      const reply = await generate(patch, undefined, patch || "base", controller.signal);
      cards = [resultCard(patch || "base", reply, prompt)];
    }
    results.className = compare ? "results compare" : "results";
    results.replaceChildren(...cards);
    $("status").textContent = "Done.";
  } catch (err) {
    results.replaceChildren();  // old images next to a new error would read as its result
    if (err.name === "AbortError") {
      $("status").textContent = "Cancelled: the service stops the work at its next step.";
    } else {
      showError(err);
      $("status").textContent = "Failed.";
    }
  } finally {
    state.running = null;
    hideProgress();
    button.disabled = false;
    $("cancel").hidden = true;
    results.removeAttribute("aria-busy");
  }
}

async function refresh() {
  clearError();
  try {
    await loadModels();
    await loadPatches();
    renderModelFields();
    renderGates();
  } catch (err) {
    showError(err);
  }
  checkHealth();
}

document.addEventListener("DOMContentLoaded", () => {
  $("gen-form").addEventListener("submit", onSubmit);
  $("model").addEventListener("change", () => { renderModelFields(); renderGates(); });
  $("patch").addEventListener("change", () => { renderCompareHint(); renderMixOptions(); renderGates(); });
  $("mix_patch").addEventListener("change", renderMixOptions);
  for (const id of ["patch_scale", "mix_scale"]) {
    $(id).addEventListener("input", () => { $(`${id}_value`).textContent = Number($(id).value).toFixed(1); });
  }
  $("class_label").addEventListener("change", renderGates);
  $("caption").addEventListener("change", renderGates);
  $("cancel").addEventListener("click", () => state.running && state.running.abort());
  $("refresh").addEventListener("click", refresh);
  $("upload-form").addEventListener("submit", onUpload);
  startPolling();
  startGlance();
  refresh();
});
