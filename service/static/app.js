// Demo page for the anytime inference server (contract: docs/api.md).
//
// The page posts image bytes to /v1/classify with `Accept: text/event-stream` and reads
// the answer with fetch() and a stream reader rather than EventSource, because
// EventSource can only send GET requests without a body or custom headers.
"use strict";

// The content types /v1/classify accepts; anything else is re-encoded as PNG first.
const SUPPORTED_TYPES = new Set([
  "image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif",
]);
const DEADLINE_MAX_MS = 500;
const REASONS = {
  deepest: "the deepest column answered",
  deadline: "no deeper column fits in the remaining budget",
  confident: "the confidence reached the minimum asked for",
  load: "the server was busy: deeper columns run on spare capacity only",
};

const state = {
  image: null, // {blob, name, label}: what the next request sends
  controller: null, // AbortController of the request in flight
  deadlineMs: null, // deadline of the request shown
  startedAt: 0, // performance.now() when the request shown was sent
  rows: [], // [{element, prediction}] in arrival order
};

const byId = (id) => document.getElementById(id);

// Builds an element; children are nodes or strings (set as text, never parsed as HTML).
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "style") Object.assign(node.style, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return `${ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0)} ms`;
}

function formatPercent(p) {
  return p === null || p === undefined ? "–" : `${(100 * p).toFixed(1)}%`;
}

// ---------------------------------------------------------------- deadline and inputs

// The slider is logarithmic: 0..100 maps to 1..DEADLINE_MAX_MS ms.
function sliderToMs(value) {
  return Math.max(1, Math.round(DEADLINE_MAX_MS ** (Number(value) / 100)));
}

function updateDeadlineOutput() {
  const slider = byId("deadline");
  const off = byId("no-deadline").checked;
  const text = off ? "no deadline" : `${sliderToMs(slider.value)} ms`;
  slider.disabled = off;
  slider.setAttribute("aria-valuetext", text);
  byId("deadline-value").textContent = text;
}

function readDeadline() {
  return byId("no-deadline").checked ? null : sliderToMs(byId("deadline").value);
}

// Returns null when unset, a number in [0, 1], or throws with a message for the user.
function readMinConfidence() {
  const input = byId("min-confidence");
  const raw = input.value.trim();
  if (raw === "" && input.validity.valid) return null;
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value) || value < 0 || value > 1) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
    throw new Error("The minimum confidence must be a number from 0 to 1, or empty.");
  }
  input.removeAttribute("aria-invalid");
  return value;
}

// ---------------------------------------------------------------- the image

function setImage(blob, name, label) {
  state.image = { blob, name, label };
  const preview = byId("preview");
  const img = byId("preview-img");
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = URL.createObjectURL(blob);
  img.src = img.dataset.url;
  img.alt = label ? `Selected sample: ${label}` : `Selected file: ${name}`;
  byId("preview-caption").textContent = label ? `${name} · true label: ${label}` : name;
  preview.hidden = false;
}

async function loadSamples() {
  const container = byId("samples");
  try {
    const response = await fetch("/static/samples/index.json");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const index = await response.json();
    container.replaceChildren(
      ...index.samples.map((sample, i) => {
        const input = el("input", {
          type: "radio", name: "sample", value: sample.file, id: `sample-${i}`,
          "data-label": sample.label,
        });
        input.addEventListener("change", () => selectSample(sample));
        return el(
          "label", { class: "sample", for: `sample-${i}`, title: sample.file },
          input,
          el("img", { src: `/static/samples/${sample.file}`, alt: "", width: 64, height: 64 }),
          el("span", {}, sample.label),
        );
      }),
    );
  } catch (err) {
    container.replaceChildren(el("p", { class: "muted" }, `No samples (${err.message}).`));
  }
}

async function selectSample(sample) {
  try {
    const response = await fetch(`/static/samples/${sample.file}`);
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    setImage(await response.blob(), sample.file, sample.label);
    byId("file-input").value = "";
  } catch (err) {
    showError(`Could not load the sample ${sample.file}: ${err.message}`);
  }
}

function selectFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type}).`);
    return;
  }
  for (const radio of document.querySelectorAll('input[name="sample"]')) radio.checked = false;
  clearError();
  setImage(file, file.name, null);
}

function setUpDropZone() {
  const zone = byId("drop-zone");
  const input = byId("file-input");
  input.addEventListener("change", () => selectFile(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    selectFile(event.dataTransfer.files[0]);
  });
}

// The server reads PNG, JPEG, WebP, BMP and GIF; other formats the browser can decode
// (AVIF, SVG, ...) are re-encoded as PNG here rather than rejected with a 415.
async function requestBody(blob) {
  if (SUPPORTED_TYPES.has(blob.type)) return blob;
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    throw new Error("This browser cannot read the file as an image.");
  }
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return new Promise((resolve, reject) =>
    canvas.toBlob((png) => (png ? resolve(png) : reject(new Error("PNG encoding failed"))),
      "image/png"),
  );
}

// ---------------------------------------------------------------- server-sent events

// Incremental SSE parser (the WHATWG event-stream format): feed it text as it arrives;
// it calls onEvent(type, data) for each complete event.
function createSseParser(onEvent) {
  let pending = "";
  let type = "";
  let data = [];
  function line(text) {
    if (text === "") {
      if (data.length) onEvent(type || "message", data.join("\n"));
      type = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  return {
    push(chunk) {
      pending += chunk;
      // A chunk can end between the "\r" and "\n" of one line ending: hold the "\r".
      const heldCr = pending.endsWith("\r");
      const lines = (heldCr ? pending.slice(0, -1) : pending).split(/\r\n|\r|\n/);
      pending = lines.pop() + (heldCr ? "\r" : "");
      lines.forEach(line);
    },
    end() {
      if (pending) line(pending.replace(/\r$/, ""));
      pending = "";
      line("");
    },
  };
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = createSseParser(onEvent);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.push(decoder.decode(value, { stream: true }));
  }
  parser.push(decoder.decode());
  parser.end();
}

// ---------------------------------------------------------------- results

function showError(message) {
  const box = byId("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  byId("error").hidden = true;
  byId("error").textContent = "";
}

function setStatus(text) {
  byId("status").textContent = text;
}

function resetResults(deadlineMs) {
  clearError();
  state.rows = [];
  state.deadlineMs = deadlineMs;
  byId("answers").replaceChildren();
  byId("final").hidden = true;
  byId("final").replaceChildren();
  byId("timeline-scale").hidden = true;
}

// Bars share one scale: the deadline, or (without one, or when an answer came late)
// the slowest answer so far.
function timelineScaleMs() {
  const slowest = Math.max(0, ...state.rows.map((row) => row.elapsedMs));
  if (state.deadlineMs !== null) return Math.max(state.deadlineMs, slowest);
  return slowest > 0 ? slowest * 1.1 : 1;
}

function redrawTimeline() {
  const scale = timelineScaleMs();
  byId("timeline-scale").hidden = state.rows.length === 0;
  byId("scale-end").textContent = state.deadlineMs === null
    ? `${formatMs(scale)} (no deadline)`
    : `deadline ${formatMs(state.deadlineMs)}`;
  for (const row of state.rows) {
    const track = row.element.querySelector(".track");
    track.querySelector(".bar").style.width = `${Math.min(100, (100 * row.elapsedMs) / scale)}%`;
    const mark = track.querySelector(".deadline-mark");
    mark.hidden = state.deadlineMs === null;
    if (state.deadlineMs !== null) mark.style.left = `${(100 * state.deadlineMs) / scale}%`;
  }
}

// "fp32", "int8", or with two views (the image and its mirror) "fp32, 2 views".
function variantForm(v) {
  return v.views === 2 ? `${v.precision}, 2 views` : String(v.precision);
}

function describeColumn(p) {
  const parts = [];
  if (p.depth !== undefined) parts.push(`depth ${p.depth}`);
  if (p.precision) parts.push(variantForm(p));
  if (typeof p.accuracy === "number") parts.push(`test accuracy ${formatPercent(p.accuracy)}`);
  return parts.join(" · ");
}

function addAnswer(p) {
  const browserMs = performance.now() - state.startedAt;
  const elapsedMs = typeof p.elapsed_ms === "number" ? p.elapsed_ms : browserMs;
  const late = state.deadlineMs !== null && elapsedMs > state.deadlineMs;
  const when = state.deadlineMs === null
    ? `answered at ${formatMs(elapsedMs)}`
    : `answered at ${formatMs(elapsedMs)} of a ${formatMs(state.deadlineMs)} deadline` +
      (late ? " (late)" : "");
  const element = el(
    "li",
    {
      class: late ? "answer late" : "answer",
      "data-column": p.column,
      "data-precision": p.precision,
    },
    el("div", { class: "answer-head" },
      el("span", { class: "column-tag" }, `Column ${p.column}`),
      el("span", { class: "muted" }, describeColumn(p)),
      el("span", { class: "badge", hidden: true }, "final"),
    ),
    el("div", { class: "answer-main" },
      el("strong", { class: "class-name" }, p.class_name ?? `class ${p.class_index}`),
      el("span", { class: "confidence" }, formatPercent(p.confidence)),
      el("span", { class: "confidence-bar", "aria-hidden": "true" },
        el("span", { style: { width: `${100 * (p.confidence ?? 0)}%` } })),
    ),
    // The bar repeats the text below it, so screen readers skip it.
    el("div", { class: "track", "aria-hidden": "true" },
      el("span", { class: "bar" }),
      el("span", { class: "deadline-mark", title: "deadline" }),
    ),
    el("p", { class: "when muted" },
      `${when} · received by the browser after ${formatMs(browserMs)}`),
  );
  state.rows.push({ element, prediction: p, elapsedMs });
  byId("answers").append(element);
  redrawTimeline();
  setStatus(`Column ${p.column} answered: ${p.class_name} (${formatPercent(p.confidence)}).`);
}

function markFinal(done) {
  const final = done.final ?? {};
  let row = state.rows.findLast((r) => r.prediction.column === final.column);
  if (!row && final.column !== undefined) {
    addAnswer(final);
    row = state.rows[state.rows.length - 1];
  }
  if (row) {
    row.element.classList.add("final");
    row.element.setAttribute("data-final", "true");
    row.element.querySelector(".badge").hidden = false;
  }
  const reason = REASONS[done.reason] ?? done.reason ?? "not given";
  const parts = [
    el("strong", {}, `Final answer: ${final.class_name} (${formatPercent(final.confidence)})`),
    ` from column ${final.column}. Why this one: `,
    el("span", { class: "reason", "data-reason": done.reason ?? "" },
      `${done.reason ?? "?"}: ${reason}`),
    ".",
  ];
  if (Array.isArray(done.columns_run)) parts.push(` Columns run: ${done.columns_run.join(", ")}.`);
  if (done.elapsed_ms !== undefined) {
    parts.push(` Total ${formatMs(done.elapsed_ms)}`);
    if (done.deadline_ms !== null && done.deadline_ms !== undefined) {
      const met = done.deadline_met ? "met" : "missed";
      parts.push(` of ${formatMs(done.deadline_ms)}; deadline ${met}`);
    }
    parts.push(".");
  }
  const label = state.image?.label;
  if (label) parts.push(` True label: ${label}${label === final.class_name ? " (correct)" : ""}.`);
  const box = byId("final");
  box.replaceChildren(...parts);
  box.classList.toggle("missed", done.deadline_met === false);
  box.hidden = false;
  setStatus(`Done: ${final.class_name} from column ${final.column} (${done.reason}).`);
}

// A JSON answer (a server or proxy that ignored Accept) is shown as a one-step stream.
function showJsonAnswer(answer) {
  addAnswer(answer);
  markFinal({
    final: answer,
    reason: answer.cascade?.reason ?? "single answer",
    columns_run: answer.cascade?.columns_run ?? [answer.column],
    elapsed_ms: answer.elapsed_ms,
    deadline_ms: answer.deadline_ms,
    deadline_met: answer.deadline_met,
  });
}

async function describeHttpError(response) {
  const text = await response.text();
  let detail = text.trim() || response.statusText;
  try {
    const body = JSON.parse(text);
    if (body && body.error) detail = body.error + (body.reason ? ` (reason: ${body.reason})` : "");
  } catch {
    // Not JSON (a proxy's error page, say): show the text as it is.
  }
  const retry = response.headers.get("Retry-After");
  return `The server answered ${response.status}: ${detail.replace(/\.$/, "")}.` +
    (retry ? ` Retry after ${retry} s.` : "");
}

// ---------------------------------------------------------------- submitting

function setBusy(busy) {
  byId("submit").disabled = busy;
  byId("stop").disabled = !busy;
  byId("results").setAttribute("aria-busy", busy ? "true" : "false");
}

async function classify(event) {
  event.preventDefault();
  clearError();
  if (!state.image) {
    showError("Pick a sample or upload an image first.");
    return;
  }
  let minConfidence;
  let body;
  try {
    minConfidence = readMinConfidence();
    body = await requestBody(state.image.blob);
  } catch (err) {
    showError(err.message);
    return;
  }
  state.controller?.abort();
  const controller = new AbortController();
  state.controller = controller;
  const deadlineMs = readDeadline();
  resetResults(deadlineMs);
  const headers = { Accept: "text/event-stream", "Content-Type": body.type };
  if (deadlineMs !== null) headers["X-Deadline-Ms"] = String(deadlineMs);
  if (minConfidence !== null) headers["X-Min-Confidence"] = String(minConfidence);

  setBusy(true);
  const budget = deadlineMs === null ? "no deadline" : `a ${deadlineMs} ms deadline`;
  setStatus(`Sent ${state.image.name} with ${budget}…`);
  state.startedAt = performance.now();
  try {
    const response = await fetch("/v1/classify", {
      method: "POST", body, headers, signal: controller.signal,
    });
    if (!response.ok) {
      showError(await describeHttpError(response));
      setStatus("No answer.");
      return;
    }
    if (!(response.headers.get("Content-Type") ?? "").startsWith("text/event-stream")) {
      showJsonAnswer(await response.json());
      return;
    }
    let finished = false;
    await readEvents(response, (type, data) => {
      let payload;
      try {
        payload = JSON.parse(data);
      } catch {
        showError(`The server sent an unreadable ${type} event: ${data}`);
        return;
      }
      if (type === "prediction") addAnswer(payload);
      else if (type === "done") {
        finished = true;
        markFinal(payload);
      } else if (type === "error") {
        finished = true;
        showError(`The server stopped with an error: ${payload.error ?? data}`);
        setStatus("Stopped by an error.");
      }
    });
    if (!finished) showError("The stream ended without a final answer.");
  } catch (err) {
    if (err.name !== "AbortError") showError(`The request failed: ${err.message}`);
    // An abort by a newer request leaves that request's status alone.
    else if (state.controller === controller) setStatus("Stopped.");
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
      loadModelCard();
    }
  }
}

// ---------------------------------------------------------------- the model card

// "×1 0.21 · ×8 0.76": milliseconds by batch size.
function latencyText(byBatch) {
  if (!byBatch) return "–";
  return Object.entries(byBatch)
    .sort(([a], [b]) => Number(a) - Number(b))
    .map(([batch, ms]) => `×${batch} ${ms < 10 ? ms.toFixed(2) : ms.toFixed(1)}`)
    .join(" · ");
}

// Class names, with their index where the name is not the index itself (digits).
function classItem(name, index) {
  if (name === String(index)) return el("li", {}, name);
  return el("li", {}, el("span", { class: "muted" }, `${index} `), name);
}

function renderModel(model) {
  const input = model.input ?? {};
  const facts = [
    ["Name", model.name],
    ["Version", model.version],
    ["Dataset", model.dataset],
    ["Input", [`${input.height}×${input.width}×${input.channels}`, input.dtype, input.layout]
      .filter(Boolean).join(" ")],
    ["Providers", (model.providers ?? []).join(", ")],
    ["Ready", model.ready ? "yes" : "no"],
  ];
  const variants = [...(model.variants ?? [])].sort(
    (a, b) => a.column - b.column || variantForm(a).localeCompare(variantForm(b)),
  );
  const header = ["Column", "Precision", "Depth", "Parameters", "Test accuracy",
    "Latency now (ms, ×batch)", "Latency at export", "Queue"];
  return el("article", { class: "model-card", "data-model": model.name },
    el("dl", { class: "facts" },
      facts.map(([name, value]) => [el("dt", {}, name), el("dd", {}, value ?? "–")])),
    el("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": "Columns" },
      el("table", {},
        el("caption", {}, "Columns, shallow to deep"),
        el("thead", {}, el("tr", {}, header.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, variants.map((v) => el("tr", {},
          el("th", { scope: "row" }, String(v.column)),
          el("td", {}, variantForm(v)),
          el("td", {}, String(v.depth)),
          el("td", {}, v.parameters?.toLocaleString() ?? "–"),
          el("td", {}, formatPercent(v.accuracy)),
          el("td", {}, latencyText(v.latency_ms)),
          el("td", {}, latencyText(v.manifest_latency_ms)),
          el("td", {}, String(v.queue_depth ?? "–")),
        ))),
      ),
    ),
    el("p", { class: "hint" }, "Latency now: the server's estimate, learned from recent runs; " +
      "at export: measured when the bundle was made. ×n: a batch of n images."),
    el("h3", {}, `Classes (${(model.classes ?? []).length})`),
    el("ul", { class: "classes" }, (model.classes ?? []).map(classItem)),
  );
}

async function loadModelCard() {
  const card = byId("model-card");
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await describeHttpError(response));
    const body = await response.json();
    const models = body.models ?? [];
    card.replaceChildren(...(models.length
      ? models.map(renderModel)
      : [el("p", { class: "muted" }, "No model loaded.")]));
  } catch (err) {
    card.replaceChildren(
      el("p", { class: "error" }, `Could not read the model card: ${err.message}`));
  }
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  byId("deadline").addEventListener("input", updateDeadlineOutput);
  byId("no-deadline").addEventListener("change", updateDeadlineOutput);
  byId("classify-form").addEventListener("submit", classify);
  byId("stop").addEventListener("click", () => state.controller?.abort());
  byId("refresh-model").addEventListener("click", loadModelCard);
  setUpDropZone();
  updateDeadlineOutput();
  loadSamples();
  loadModelCard();
});
