// The chat page: load one packaged GGUF (checking every byte against the package's sha256) into
// wllama, then stream greedy or sampled replies through the model's own chat template.
//
// Query options: model=models/<name> (default: the first in models.json), temperature (default 0.7;
// 0 is greedy), max_tokens (default 256), seed, threads, gpu=0 (no WebGPU), system (a system message),
// logprobs=1 (each reply token's log-probability and the runner-up's, kept on the reply's element as
// `.logprobs`, for checking the page against another runtime).

import { LoggerWithoutDebug, Wllama } from "./vendor/wllama/index.js";

const PACKAGE_MANIFEST = "edgedistill-package.json";
const WASM = { default: "./vendor/wllama/wasm/wllama.wasm" };
// Enough for a chat; a larger window only costs the browser memory for KV cache it never fills.
const MAX_CONTEXT = 4096;

const query = new URLSearchParams(location.search);
// a number from the query string; one that is missing or not a number keeps the default
const option = (name, fallback) => {
  const value = query.has(name) ? Number(query.get(name)) : NaN;
  return Number.isFinite(value) ? value : fallback;
};
const sampling = {
  temperature: option("temperature", 0.7),
  max_tokens: option("max_tokens", 256),
  ...(query.has("seed") ? { seed: option("seed") } : {}),
  ...(query.get("logprobs") === "1" ? { logprobs: true, top_logprobs: 2 } : {}),
};

const $ = (id) => document.getElementById(id);
const ui = { status: $("status"), progress: $("progress"), log: $("log"), form: $("chat"), prompt: $("prompt"),
  send: $("send"), reset: $("reset"), model: $("model") };

let wllama = null;
let history = [];

function setState(state, text) {
  document.body.dataset.state = state;
  ui.status.textContent = text;
  const ready = state === "ready";
  ui.prompt.disabled = ui.send.disabled = ui.reset.disabled = !ready;
  ui.model.disabled = !(ready || state === "error");
  if (ready) ui.prompt.focus();
}

function startHistory() {
  history = query.has("system") ? [{ role: "system", content: query.get("system") }] : [];
}

async function sha256Hex(buffer) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buffer));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// One file of a package as one Blob: its byte-range parts fetched, each checked, then joined (wllama
// would read several Blobs as llama-gguf-split shards, which byte ranges are not).
async function fetchChecked(base, entry, onBytes) {
  const buffers = [];
  for (const part of entry.parts || [entry]) {
    const response = await fetch(base + part.path);
    if (!response.ok) throw new Error(`${part.path}: HTTP ${response.status}`);
    const reader = response.body.getReader();
    const chunks = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      onBytes(value.byteLength);
    }
    const buffer = await new Blob(chunks).arrayBuffer();
    if (buffer.byteLength !== part.bytes || (await sha256Hex(buffer)) !== part.sha256) {
      throw new Error(`${part.path} differs from ${PACKAGE_MANIFEST} (size or sha256): re-copy the package`);
    }
    buffers.push(buffer);
  }
  return new Blob(buffers);
}

async function loadModel(dir) {
  setState("loading", `Fetching ${dir}…`);
  const base = `${dir}/`;
  const pkg = await (await fetch(base + PACKAGE_MANIFEST)).json();
  if (pkg.runtime !== "llamacpp") throw new Error(`${dir} is ${pkg.format}; this page runs GGUF artifacts`);
  const gguf = pkg.files.find((f) => f.path.endsWith(".gguf"));
  let loaded = 0;
  ui.progress.hidden = false;
  const blob = await fetchChecked(base, gguf, (n) => { ui.progress.value = (loaded += n) / gguf.bytes; });
  ui.progress.hidden = true;

  setState("loading", `Loading ${pkg.format} (${(gguf.bytes / 1e6).toFixed(1)} MB) into wllama…`);
  if (wllama) await wllama.exit();
  wllama = new Wllama(WASM, { logger: LoggerWithoutDebug });
  await wllama.loadModel([blob], {
    n_ctx: Math.min(pkg.context || MAX_CONTEXT, MAX_CONTEXT),
    ...(query.has("threads") ? { n_threads: option("threads") } : {}),
    ...(query.get("gpu") === "0" ? { n_gpu_layers: 0 } : {}),
  });
  startHistory();
  ui.log.replaceChildren();
  setState("ready", `Ready: ${pkg.format} for ${pkg.target}, verified (sha256), running in your browser.`);
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message";
  div.dataset.role = role;
  div.textContent = text;
  ui.log.append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  setState("generating", "Generating…");
  let reply = "";
  bubble.logprobs = [];
  try {
    const stream = await wllama.createChatCompletion({ messages: history, stream: true, ...sampling });
    for await (const chunk of stream) {
      const choice = chunk.choices?.[0];
      bubble.logprobs.push(...(choice?.logprobs?.content || []));
      if (choice?.delta?.content) {
        reply += choice.delta.content;
        bubble.textContent = reply;
      }
    }
    history.push({ role: "assistant", content: reply });
    bubble.dataset.done = "true";
    setState("ready", "Ready.");
  } catch (err) {
    history.pop();  // the turn that failed is not part of the conversation
    bubble.dataset.done = "error";
    throw err;
  }
}

function fail(err) {
  console.error(err);
  setState("error", `Error: ${err.message || err}`);
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || document.body.dataset.state !== "ready") return;
  ui.prompt.value = "";
  send(text).catch(fail);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.reset.addEventListener("click", () => {
  startHistory();
  ui.log.replaceChildren();
});
ui.model.addEventListener("change", () => loadModel(ui.model.value).catch(fail));

(async () => {
  const models = await (await fetch("models.json")).json();
  if (models.length === 0) throw new Error("models.json lists no model: build the site with a package (see README)");
  for (const m of models) ui.model.add(new Option(`${m.name} (${m.format}, ${(m.bytes / 1e6).toFixed(1)} MB)`, m.dir));
  ui.model.value = query.get("model") || models[0].dir;
  await loadModel(ui.model.value);
})().catch(fail);
