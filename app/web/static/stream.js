// POST /generate as Server-Sent Events, read with fetch + ReadableStream (EventSource cannot POST).
"use strict";

/** Split an SSE buffer into complete events; returns [events, rest]. */
function parseSse(buffer) {
  const events = [];
  const blocks = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) events.push({ name, data: data.join("\n") });
  }
  return [events, rest];
}

/**
 * Stream one generation: onEvent(name, payload) for queued/progress; resolves with the `done` payload.
 * Aborting `signal` closes the connection, which cancels the work on the server.
 */
async function streamGenerate(body, headers, onEvent, signal) {
  let resp;
  try {
    resp = await fetch(new URL("generate", API), {
      method: "POST", headers: { ...headers, Accept: "text/event-stream" }, body: JSON.stringify(body), signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the service (${e.message})`, "network_error");
  }
  if (!resp.ok) throw await toApiError(resp);
  if (!(resp.headers.get("content-type") || "").startsWith("text/event-stream")) return resp.json();
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    let events;
    [events, buffer] = parseSse(buffer + decoder.decode(value, { stream: true }));
    for (const ev of events) {
      let payload;
      try { payload = JSON.parse(ev.data); } catch { continue; }  // not ours: skip
      if (ev.name === "done") return payload;
      if (ev.name === "error") throw new ApiError(resp.status, payload.error, payload.error_type || "error");
      onEvent(ev.name, payload);
    }
  }
  throw new ApiError(0, "the stream ended before the result arrived", "stream_ended");
}
