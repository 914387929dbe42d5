// The seqserve playground: one session per page, fed incrementally as you type (never two
// requests at once), generations streamed as server-sent events. Plain JS, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const ROUTE = randomKey(); // the routing key: every call of this page reaches one replica
let token = null; // a bearer token, only in memory, when the server asks for one

// ---- the HTTP/JSON API --------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.httpStatus = status;
    this.code = e.status || "UNKNOWN";
    this.reason = (e.details || []).map((d) => d.reason).find(Boolean) || null; // ErrorInfo's
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A failure that says nothing about the call: the server could not be reached (fetch's
// TypeError: a restart, a dropped connection) or it, or a proxy before it, is briefly unable to
// answer (502-504). The same call, sent again, may well succeed.
function transient(e) {
  return !(e instanceof ApiError) || [502, 503, 504].includes(e.httpStatus);
}

const RETRY_FOR_MS = 30_000; // how long a transient failure is retried before it is shown

// `call()`, retried with a growing delay while its failure is transient (a restarted server
// comes back with its sessions restored from the spill tier, so they are worth keeping) and
// `wanted()` still holds. A transient failure may come after the server applied the call (its
// answer lost on the way back), so a call that changes state sends the same body every time,
// with one `requestId` (see `newRequestId`): the server applies it once and answers a retry
// with the first reply.
async function retried(call, wanted = () => true) {
  const start = Date.now();
  for (let delay = 250; ; delay = Math.min(2 * delay, 2000)) {
    try {
      return await call();
    } catch (e) {
      if (!transient(e) || !wanted() || Date.now() - start > RETRY_FOR_MS) throw e;
      status(`${e instanceof ApiError ? e.code : "no answer"}: ${e.message}; retrying…`, true);
      await sleep(delay);
    }
  }
}

function headers(json) {
  const h = { "x-seqserve-route": ROUTE };
  if (json) h["content-type"] = "application/json";
  if (token) h["authorization"] = `Bearer ${token}`;
  return h;
}

async function api(method, path, body, init = {}) {
  const res = await fetch(path, {
    method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body), ...init,
  });
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    if (res.status === 401) askForToken();
    throw new ApiError(res.status, data);
  }
  return data;
}

// Server-sent events from a POST (EventSource only does GET without headers).
async function* events(path, body, signal) {
  const res = await fetch(path, {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  });
  if (!res.ok) {
    const data = await res.json().catch(() => null);
    if (res.status === 401) askForToken();
    throw new ApiError(res.status, data);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { event, data: JSON.parse(data) };
    }
  }
}

// ---- page state ---------------------------------------------------------------------------

let models = [];         // ListModels
let manifest = null;     // the chosen version's manifest
let session = null;      // {id, text, position}: what the session has consumed
let wanted = "";         // what the text box says
let epoch = 0;           // bumped by every model or version switch
let pumping = null;      // the epoch of the pump in flight (a request for the text box), or null
let generating = null;   // AbortController of the running generation

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function showSession() {
  $("session-line").textContent = session
    ? `session ${session.id} · position ${session.position}` : "";
}

function askForToken() {
  $("auth").hidden = false;
  $("token").focus();
}

function randomKey() {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_");
}

// A new call's request id, for it and all its retries (never for another call: the server
// would answer that with the first call's reply, or refuse it).
function newRequestId() {
  return `playground-${randomKey()}`;
}

const utf8 = new TextEncoder();

// ---- models -------------------------------------------------------------------------------

async function loadModels() {
  try {
    models = (await api("GET", "/v1/models")).models;
  } catch (e) {
    status(e.message, true);
    return;
  }
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  await chooseModel();
}

async function chooseModel() {
  await stopGenerating();
  const name = $("model").value;
  const model = models.find((m) => m.name === name);
  if (!model) return;
  const options = [new Option(`default (${model.defaultVersion})`, "")];
  for (const [alias, v] of Object.entries(model.aliases)) options.push(new Option(`${alias} → ${v}`, alias));
  for (const v of model.versions) options.push(new Option(`${v}`, `${v}`));
  $("version").replaceChildren(...options);
  await chooseVersion();
}

async function chooseVersion() {
  epoch++; // a pump still waiting on the old session's answer drops it
  await stopGenerating();
  await closeSession();
  const name = $("model").value;
  let detail;
  try {
    detail = (await retried(() => api("GET", `/v1/models/${encodeURIComponent(name)}`))).model;
  } catch (e) {
    status(`${e.code || "error"}: ${e.message}`, true);
    return;
  }
  const wantedVersion = $("version").value || detail.defaultVersion;
  const resolved = detail.aliases[wantedVersion] || wantedVersion;
  const version = detail.versions.find((v) => `${v.version}` === `${resolved}`);
  manifest = version && version.manifestJson ? JSON.parse(version.manifestJson) : null;
  const frames = manifest && manifest.input && manifest.input.kind === "features";
  $("tokens-panel").hidden = !!frames;
  $("frames-panel").hidden = !frames;
  if (frames) {
    $("frame-dim").textContent = manifest.input.dim;
    status(`${name}: a frame model (${manifest.input.dim} values in, ${manifest.head.dim} out)`);
  } else {
    status(`${name}: type to see the next-token distribution`);
    wanted = $("prompt").value;
    pump();
  }
}

// ---- token models: feed as you type ---------------------------------------------------------

// Close the session, waiting out a restart of the server (which restores it, and would keep it
// until its TTL) rather than forgetting it at the first failed call.
async function closeSession() {
  const old = session;
  session = null;
  showSession();
  if (!old) return;
  try {
    await retried(() => deleteWhenIdle(old.id));
  } catch (e) {
    // gone already, not ours to close, or the server stayed away
  }
}

// A generation just stopped may still hold the session for a moment (409 SESSION_BUSY).
async function deleteWhenIdle(id) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await api("DELETE", `/v1/sessions/${id}`);
    } catch (e) {
      if (e.httpStatus !== 409 || attempt >= 20) throw e;
      await sleep(50);
    }
  }
}

// Stop a running generation and wait until it has let go of the session.
async function stopGenerating() {
  if (!generating) return;
  generating.abort();
  while (generating) await sleep(20);
}

function createBody(prefix) {
  const body = { model: $("model").value, version: $("version").value, options: { topK: topK() } };
  if (prefix) body.prefix = { text: prefix };
  return body;
}

function topK() {
  return Math.max(1, Math.min(50, parseInt($("top-k").value, 10) || 8));
}

// Bring the session to the text box's text, one request at a time. Appended text is fed as a
// step; any other edit (backspace, a paste in the middle) restarts from the new text. A pump
// belongs to the model and version it started on: once they change it stops, dropping any late
// answer, and leaves the page to a pump of the new choice.
async function pump() {
  if (generating || pumping === epoch) return;
  const mine = epoch;
  const current = () => epoch === mine;
  pumping = mine;
  let restarted = false;
  try {
    while (current() && (session === null || session.dirty || session.text !== wanted)) {
      const target = wanted;
      const s = session;
      let reply;
      if (s && !s.dirty && target.startsWith(s.text)) {
        const body = stepBody(s, target); // one requestId for the step and its retries
        try {
          reply = await retried(() => api("POST", `/v1/sessions/${s.id}:step`, body), current);
        } catch (e) {
          // The session expired, was closed, or moved on without us: start again from the
          // text at once (once), rather than at the next keystroke.
          if (!current()) return;
          if (restarted || transient(e) || e.code === "RESOURCE_EXHAUSTED") throw e;
          restarted = true;
          s.dirty = true;
          continue;
        }
        if (!current()) return;
        s.position = reply.position;
        s.text = target;
      } else {
        await closeSession();
        if (!current()) return;
        const body = { ...createBody(target), requestId: newRequestId() }; // and its retries
        reply = await retried(() => api("POST", "/v1/sessions", body), current);
        const made = { id: reply.session.sessionId, text: target, position: reply.session.position };
        if (!current()) {
          await api("DELETE", `/v1/sessions/${made.id}`).catch(() => {});
          return;
        }
        session = made;
      }
      showSession();
      showBars(reply.prediction);
    }
    if (current()) status("");
  } catch (e) {
    if (!current()) return;
    status(`${e.code || "error"}: ${e.message}`, true);
    // Start again from the text at the next keystroke; after a failure that was only the
    // server out of reach, with the same session.
    if (session && !transient(e)) session.dirty = true;
  } finally {
    if (pumping === mine) pumping = null;
  }
}

// A step feeding the text `target` has beyond what session `s` has consumed: a new call.
function stepBody(s, target) {
  return {
    input: { text: target.slice(s.text.length) },
    expectedPosition: s.position,
    requestId: newRequestId(),
    options: { topK: topK() },
  };
}

function showBars(prediction) {
  const bars = $("bars");
  const top = prediction && prediction.tokens ? prediction.tokens.top : [];
  if (!top.length) {
    bars.replaceChildren();
    return;
  }
  bars.replaceChildren(...top.map((t) => {
    const row = document.createElement("div");
    row.className = "bar";
    const label = document.createElement("span");
    label.className = "tok";
    label.textContent = JSON.stringify(t.text).slice(1, -1) || `#${t.id}`;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(t.prob * 100).toFixed(1)}%`;
    track.append(fill);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = `${(t.prob * 100).toFixed(1)}%`;
    row.append(label, track, p);
    return row;
  }));
}

// A session closed or expired under the page is replaced from the text and the generation
// asked for again, once: pump() alone sends nothing when the text has not changed.
async function generate() {
  if (generating) return;
  while (pumping !== null) await sleep(20);
  wanted = $("prompt").value;
  for (let mayRetry = true; ; mayRetry = false) {
    await pump();
    if (!session || session.dirty || session.text !== wanted) return; // pump said why
    if (!(await streamGeneration(mayRetry))) return;
    if (session) session.dirty = true;
  }
}

// Stream a generation into the text box. True (and nothing shown) when `mayRetry` and the
// session was gone before the first token, for the caller to replace it and ask again.
async function streamGeneration(mayRetry) {
  generating = new AbortController();
  $("model").disabled = $("version").disabled = true;
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("prompt").readOnly = true;
  $("bars").replaceChildren();
  status("generating…");
  const temperature = parseFloat($("temperature").value);
  const body = {
    expectedPosition: session.position,
    sampling: {
      maxTokens: parseInt($("max-tokens").value, 10) || 60,
      temperature: Number.isFinite(temperature) ? temperature : 0.8,
    },
  };
  let finish = "";
  let tokens = 0;
  let gone = false;
  try {
    for await (const { event, data } of events(`/v1/sessions/${session.id}:generate`, body, generating.signal)) {
      if (event === "token") {
        tokens++;
        session.text += data.token.text;
        session.position = data.position;
        $("prompt").value = session.text;
        showSession();
      } else if (event === "done") {
        finish = data.finishReason;
      } else if (event === "error") {
        throw new ApiError(500, data);
      }
    }
    status(`done: ${finish.replace("FINISH_REASON_", "").toLowerCase()} — type on to see the bars again`);
  } catch (e) {
    if (mayRetry && tokens === 0 && sessionGone(e)) gone = true;
    else if (e.name === "AbortError") status("stopped");
    else status(`${e.code || "error"}: ${e.message}`, true);
    if (!gone) await resync();
  } finally {
    generating = null;
    $("model").disabled = $("version").disabled = false;
    $("generate").disabled = false;
    $("stop").disabled = true;
    $("prompt").readOnly = false;
    wanted = $("prompt").value;
    if (session && utf8.encode(session.text).length !== Number(session.position)) session.dirty = true;
  }
  return gone;
}

// Closed, expired, or never known to this server: not the call's fault but the session's.
function sessionGone(e) {
  return e instanceof ApiError && ["SESSION_NOT_FOUND", "SESSION_CLOSED"].includes(e.reason);
}

// After a stopped or failed generation the session may hold tokens this page never saw.
async function resync() {
  if (!session) return;
  try {
    const s = (await api("GET", `/v1/sessions/${session.id}`)).session;
    if (s.position !== session.position) session.dirty = true;
  } catch (e) {
    session.dirty = true;
  }
}

// ---- frame models: a series in, its predictions plotted -------------------------------------

function parseSeries(text, dim) {
  const frames = [];
  text.split(/\r?\n/).forEach((line, i) => {
    const trimmed = line.trim();
    if (!trimmed || /^[a-zA-Z#]/.test(trimmed)) return; // blank, a header or a comment
    const values = trimmed.split(/[,;\s]+/).map(Number);
    if (values.length !== dim || values.some((v) => !Number.isFinite(v))) {
      throw new Error(`line ${i + 1}: expected ${dim} numbers, got "${trimmed.slice(0, 40)}"`);
    }
    frames.push(values);
  });
  if (!frames.length) throw new Error("no frames: paste or upload a series first");
  return frames;
}

// Three years of a CO2-like weekly series (a trend and a seasonal cycle) as [value, sin, cos]
// of the week's phase in the year; other shapes get a smooth random walk.
function exampleSeries(dim) {
  const lines = [];
  let walk = 0;
  for (let w = 0; w < 156; w++) {
    const doy = (w * 7) % 365.25;
    const phase = (2 * Math.PI * doy) / 365.25;
    if (dim === 3) {
      const co2 = 355 + (1.6 * w) / 52.18 + 3 * Math.sin(phase + 0.9);
      lines.push([co2.toFixed(2), Math.sin(phase).toFixed(4), Math.cos(phase).toFixed(4)].join(","));
    } else {
      walk += Math.sin(w / 5) * 0.3;
      lines.push(Array.from({ length: dim }, (_, k) => (walk + k * 0.1).toFixed(3)).join(","));
    }
  }
  return lines.join("\n");
}

async function predictSeries() {
  let frames;
  try {
    frames = parseSeries($("series").value, manifest.input.dim);
  } catch (e) {
    status(e.message, true);
    return;
  }
  $("predict").disabled = true;
  status("predicting…");
  let id = null;
  try {
    const created = await api("POST", "/v1/sessions", { model: $("model").value, version: $("version").value });
    id = created.session.sessionId;
    const reply = await api("POST", `/v1/sessions/${id}:step`, {
      input: { frames: { values: frames.flat() } },
      options: { perPosition: true },
    });
    const predictions = reply.perPosition.map((p) => p.regression.values[0]);
    plot(frames.map((f) => f[0]), predictions);
    status(`${frames.length} frames; the last prediction (the frame after the series): ${predictions[predictions.length - 1].toFixed(3)}`);
  } catch (e) {
    status(`${e.code || "error"}: ${e.message}`, true);
  } finally {
    if (id) await api("DELETE", `/v1/sessions/${id}`).catch(() => {});
    $("predict").disabled = false;
  }
}

// Input value k against the prediction made after frame k-1 (for frame k).
function plot(inputs, predictions) {
  const canvas = $("plot");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 36;
  ctx.clearRect(0, 0, w, h);
  const all = inputs.concat(predictions);
  const lo = Math.min(...all), hi = Math.max(...all);
  const n = inputs.length + 1;
  const x = (i) => pad + ((w - 2 * pad) * i) / Math.max(1, n - 1);
  const y = (v) => h - pad - ((h - 2 * pad) * (v - lo)) / (hi - lo || 1);
  ctx.strokeStyle = "#e4e7ec";
  ctx.fillStyle = "#667085";
  ctx.font = "12px system-ui, sans-serif";
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    ctx.beginPath(); ctx.moveTo(pad, y(v)); ctx.lineTo(w - pad, y(v)); ctx.stroke();
    ctx.fillText(v.toFixed(1), 2, y(v) + 4);
  }
  const line = (values, offset, color) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(i + offset), y(v)) : ctx.moveTo(x(i + offset), y(v))));
    ctx.stroke();
  };
  line(inputs, 0, "#667085");
  line(predictions, 1, "#2f6fdf");
}

// ---- wiring -------------------------------------------------------------------------------

$("model").addEventListener("change", chooseModel);
$("version").addEventListener("change", chooseVersion);
$("prompt").addEventListener("input", () => {
  wanted = $("prompt").value;
  pump();
});
$("top-k").addEventListener("change", () => {
  if (session) session.dirty = true;
  pump();
});
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => generating && generating.abort());
$("example").addEventListener("click", () => {
  $("series").value = exampleSeries(manifest.input.dim);
  predictSeries();
});
$("predict").addEventListener("click", predictSeries);
$("series-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  $("series").value = await file.text();
  predictSeries();
});
$("auth-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim() || null;
  $("token").value = "";
  $("auth").hidden = true;
  loadModels();
});
window.addEventListener("pagehide", () => {
  if (generating) generating.abort(); // the server stops it when the connection closes
  if (session) fetch(`/v1/sessions/${session.id}`, { method: "DELETE", headers: headers(false), keepalive: true });
});

loadModels();
