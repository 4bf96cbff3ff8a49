// Patch management: upload, delete and version history (admin token kept in this page's memory only), and
// the patch list polled so a change made on another replica shows up by itself.
"use strict";

const POLL_MS = 5000;
let listSignature = "";

function adminToken() {
  const token = $("admin_token").value.trim();  // read from the field each time: never stored anywhere
  if (!token) throw new ApiError(0, "type the admin token (DMP_ADMIN_TOKEN) first", "invalid_input");
  return token;
}

function manageError(err) {
  const box = $("manage-error");
  const title = document.createElement("strong");
  title.textContent = err instanceof ApiError ? `${err.type}${err.status ? ` (HTTP ${err.status})` : ""}` : "error";
  const msg = document.createElement("span");
  msg.className = "error-message";
  msg.textContent = err.message;
  box.replaceChildren(title, ": ", msg);
  box.hidden = false;
}

function manageOk(text) {
  $("manage-error").hidden = true;
  $("manage-status").textContent = text;
}

async function onUpload(event) {
  event.preventDefault();
  const file = $("upload_file").files[0];
  const name = $("upload_name").value.trim() || (file ? file.name.replace(/\.safetensors$/i, "") : "");
  const button = $("upload");
  button.disabled = true;
  try {
    const token = adminToken();
    if (!file) throw new ApiError(0, "choose a .safetensors patch file", "invalid_input");
    manageOk(`Uploading ${file.name} as ${name}…`);
    const reply = await api(`patches/${encodeURIComponent(name)}`, {
      method: "PUT",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/octet-stream" },
      body: file,
    });
    manageOk(`Patch ${reply.name} version ${reply.version} is ${reply.state} on ${reply.base}.`);
    await pollPatches();
  } catch (err) {
    $("manage-status").textContent = "";
    manageError(err);
  } finally {
    button.disabled = false;
  }
}

async function deletePatch(name) {
  try {
    const token = adminToken();
    await api(`patches/${encodeURIComponent(name)}`, { method: "DELETE", headers: { Authorization: `Bearer ${token}` } });
    manageOk(`Patch ${name} deleted.`);
    await pollPatches();
  } catch (err) {
    $("manage-status").textContent = "";
    manageError(err);
  }
}

async function showHistory(name) {
  const box = $("history");
  try {
    const { history, current } = await api(`patches/${encodeURIComponent(name)}/history`);
    const head = document.createElement("h3");
    head.textContent = `Versions of ${name}` + (current ? ` (serving ${current})` : " (deleted)");
    const list = document.createElement("ol");
    list.reversed = true;
    for (const e of history) {
      const item = document.createElement("li");
      item.textContent = `${e.version} ${e.event} ${new Date(e.at * 1000).toLocaleString()}`;
      list.append(item);
    }
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = "As seen by the replica that answered, since it started.";
    box.replaceChildren(head, list, note);
    box.hidden = false;
    head.tabIndex = -1;
    head.focus();
  } catch (err) {
    manageError(err);
  }
}

/** Re-read /patches; re-render only when something changed (so focus and selections stay put). */
async function pollPatches() {
  const { patches } = await api("patches");
  const signature = JSON.stringify((patches || []).map((p) => [p.name, p.version, p.state, p.error]));
  if (signature === listSignature) return;
  listSignature = signature;
  state.patches = patches || [];
  renderPatchTable();
  renderPatchOptions();
}

function startPolling() {
  setInterval(async () => {
    if (document.hidden) return;
    try {
      await pollPatches();
      $("poll-status").textContent = `List checked ${new Date().toLocaleTimeString()}.`;
    } catch (err) {
      $("poll-status").textContent = `List refresh failed: ${err.type} ${err.status ? `(HTTP ${err.status})` : ""}: ${err.message}`;
    }
  }, POLL_MS);
}
