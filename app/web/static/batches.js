// Batch API progress: this owner's batches (GET /v1/batches) with a progress bar each, polled every few seconds.
"use strict";

const BATCH_POLL_MS = 5000;

function batchRow(batch) {
  const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  const done = counts.completed + counts.failed;
  const row = document.createElement("tr");
  const cell = (text) => {
    const td = document.createElement("td");
    td.textContent = text;
    row.append(td);
    return td;
  };
  cell(batch.id);
  cell(batch.status);
  const bar = document.createElement("progress");
  bar.max = Math.max(counts.total, 1);
  bar.value = done;
  bar.setAttribute("aria-label", `${batch.id}: ${done} of ${counts.total} lines answered`);
  cell("").append(bar);
  cell(`${counts.completed} ok, ${counts.failed} failed of ${counts.total}`);
  cell(new Date(batch.created_at * 1000).toLocaleString());
  return row;
}

async function pollBatches() {
  const status = $("batches-status");
  try {
    const page = await fetch(new URL("v1/batches?limit=20", API));
    if (page.status === 401) {
      status.textContent = "Batches need an API key (DMP_API_KEYS is set); list them with the openai client.";
      return;
    }
    if (!page.ok) throw new ApiError(page.status, (await page.text()).slice(0, 200), "http_error");
    const batches = (await page.json()).data;
    $("batches-table").tBodies[0].replaceChildren(...batches.map(batchRow));
    status.textContent = batches.length ? "" : "No batches yet: POST /v1/files then /v1/batches (docs/service.md).";
  } catch (err) {
    status.textContent = `cannot list batches: ${err.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  pollBatches();
  setInterval(pollBatches, BATCH_POLL_MS);
});
