// lstmlm serve's page: pick a run, continue a prefix (streamed from /api/generate), colour each
// character by one unit of a gate (/api/inspect, lstmlm's own colour scale), show on hover the
// units strongest there, and chart the run's perplexity, following a training in progress.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 3000;  // how often the chart asks for new epochs

const state = {
  runs: [],          // GET /api/runs
  run: null,         // the chosen run's summary
  text: "",          // what the output shows: the prefix as the model read it, then the continuation
  prefixLength: 0,
  inspected: null,   // the last /api/inspect answer
  inspecting: false, // one inspection at a time; a newer text waits for it
  wanted: false,     // the text or the unit changed while one was running
  controller: null,  // aborts the generation in flight
  metricsKey: "",    // what the chart shows, to redraw only on change
};

// ---- small helpers ------------------------------------------------------------------------------

function status(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function api(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function fixed(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function ink(hex) {  // light text on the dark ends of the scale
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 ? "#fff" : "#111";
}

// ---- runs ---------------------------------------------------------------------------------------

async function loadRuns() {
  const {runs} = await api("/api/runs");
  state.runs = runs;
  const select = $("run");
  select.innerHTML = "";
  for (const run of runs) {
    const label = run.error ? run.name + " (unreadable)" : run.trained ? run.name : run.name + " (no checkpoint yet)";
    select.add(new Option(label, run.name));
  }
  if (!runs.length) {
    status("No runs in this server's runs directory: train one with lstmlm train.", true);
    return;
  }
  const wanted = decodeURIComponent(location.hash.slice(1));
  select.value = runs.some((r) => r.name === wanted) ? wanted : runs[0].name;
  chooseRun();
}

function chooseRun() {
  state.run = state.runs.find((r) => r.name === $("run").value) || null;
  const run = state.run;
  if (!run) return;
  history.replaceState(null, "", "#" + encodeURIComponent(run.name));
  if (run.error) {
    $("run-info").textContent = run.error;
    return;
  }
  const m = run.config.model;
  const best = run.best ? ` · best validation ${fixed(run.best.val_perplexity)} (epoch ${run.best.epoch})` : "";
  $("run-info").textContent = `${run.cell} ${m.model}, ${m.layers} × ${m.hidden} hidden, vocabulary ${run.vocab_size}, ${run.config.data.normalize} text${best}`;
  $("gate").innerHTML = "";  // a new model: its cell's gates come with the first colours
  const layer = $("layer");
  layer.innerHTML = "";
  for (let k = 0; k < m.layers; k++) layer.add(new Option(String(k), String(k)));
  layer.value = String(m.layers - 1);
  $("unit").max = String(m.hidden - 1);
  $("unit").value = "";  // a new model: let the server pick a lively unit
  if (!$("prefix").value) $("prefix").value = run.prefix;
  state.metricsKey = "";
  refreshMetrics();
  if (state.text) inspectSoon();
}

// ---- generation ---------------------------------------------------------------------------------

function request() {
  const seed = $("seed").value;
  return {
    run: state.run.name,
    prefix: $("prefix").value,
    length: Math.max(1, +$("length").value || 1),
    temperature: +$("temperature").value,
    top_p: +$("top-p").value,
    seed: seed === "" ? null : +seed,
  };
}

async function generate() {
  if (!state.run || state.run.error) return;
  stopGenerating();
  const controller = new AbortController();
  state.controller = controller;
  $("go").disabled = true;
  $("stop").disabled = false;
  status("generating…");
  let made = 0, reason = "";
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request()), signal: controller.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    for await (const [name, data] of events(response.body)) {
      if (name === "start") startText(data.prefix);
      else if (name === "text") { addText(data.text); made += Array.from(data.text).length; }  // characters, not UTF-16 units: an emoji is one
      else if (name === "done") reason = data.finish_reason;
      else if (name === "error") throw new Error(data.error);
    }
    status(`${made} characters (${reason === "stop" ? "a stop string" : reason === "deadline" ? "the server's deadline" : "the length asked for"} ended it)`);
  } catch (e) {
    if (e.name === "AbortError") status(`stopped after ${made} characters`);
    else status(e.message, true);
  } finally {
    if (state.controller === controller) state.controller = null;
    $("go").disabled = false;
    $("stop").disabled = true;
    inspectSoon();
  }
}

function stopGenerating() {
  if (state.controller) state.controller.abort();
}

async function* events(body) {
  // Server-sent events from a fetch body: "event: NAME\ndata: JSON\n\n" each.
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield [name, JSON.parse(data)];
    }
  }
}

// ---- the text, one span per character -------------------------------------------------------------

function startText(prefix) {
  state.text = "";
  state.prefixLength = prefix.length;
  state.inspected = null;
  $("output").textContent = "";
  addText(prefix);
}

function addText(text) {
  const output = $("output");
  const fragment = document.createDocumentFragment();
  for (const c of text) {
    const span = document.createElement("span");
    span.textContent = c;
    if (state.text.length < state.prefixLength) span.className = "prefix";
    state.text += c;
    fragment.append(span);
  }
  const atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
  output.append(fragment);
  if (atEnd) output.scrollTop = output.scrollHeight;
  inspectSoon();
}

// ---- colours from /api/inspect ----------------------------------------------------------------------

function inspectSoon() {
  if (!state.text || !state.run) return;
  state.wanted = true;
  if (!state.inspecting) inspect();
}

async function inspect() {
  state.inspecting = true;
  try {
    while (state.wanted) {
      state.wanted = false;
      const unit = $("unit").value;  // empty: the server picks the unit that varies most
      const asked = {run: state.run.name, text: state.text, gate: $("gate").value || null, layer: +$("layer").value, units: unit === "" ? [] : [+unit], top: 6};
      try {
        const answer = await api("/api/inspect", asked);
        if (unit === "" && $("unit").value === "") $("unit").value = String(answer.units[0].unit);
        if (answer.run === state.run.name && state.text.startsWith(answer.text)) paint(answer);
      } catch (e) {
        status("colours: " + e.message, true);
        return;
      }
    }
  } finally {
    state.inspecting = false;
  }
}

function paint(answer) {
  const gate = $("gate");
  if (Array.from(gate.options, (o) => o.value).join() !== answer.gates.map((g) => g.name).join()) {
    gate.innerHTML = "";  // the run's cell's gates, its default chosen
    for (const g of answer.gates) gate.add(new Option(g.meaning, g.name));
    gate.value = answer.gate;
  }
  if (gate.value !== answer.gate) return;  // an answer for the gate chosen before: the chosen one's is on its way
  state.inspected = answer;
  const unit = answer.units[0];
  const spans = $("output").children;
  const n = Math.min(spans.length, unit.colours.length);
  for (let t = 0; t < n; t++) {
    spans[t].style.background = unit.colours[t];
    spans[t].style.color = ink(unit.colours[t]);
  }
  const shown = answer.gates.find((g) => g.name === answer.gate);
  $("low").textContent = shown.low === null ? "tanh −1" : String(shown.low).replace("-", "−");
  $("high").textContent = shown.low === null ? "+1" : "+" + String(shown.high);
  $("output").dataset.painted = String(n);
}

function hover(event) {
  const span = event.target;
  if (span.parentElement !== $("output") || !state.inspected) return;
  const t = Array.prototype.indexOf.call($("output").children, span);
  const answer = state.inspected;
  if (t < 0 || t >= answer.units[0].values.length) return;
  for (const s of $("output").querySelectorAll(".here")) s.classList.remove("here");
  span.classList.add("here");
  const box = $("hover");
  box.textContent = `step ${t} ${JSON.stringify(span.textContent)}: ${answer.gate} of unit ${answer.units[0].unit} = ${fixed(answer.units[0].values[t])}; strongest here: `;
  for (const [unit, value] of answer.top[t]) {
    const link = document.createElement("a");
    link.textContent = `${unit} (${value >= 0 ? "+" : ""}${fixed(value, 2)})`;
    link.title = "colour the text by this unit";
    link.onclick = () => { $("unit").value = String(unit); inspectSoon(); };
    box.append(link);
  }
}

function stepUnit(by) {
  if (!state.run || state.run.error) return;
  const n = state.run.config.model.hidden;
  $("unit").value = String(((+$("unit").value + by) % n + n) % n);
  inspectSoon();
}

// ---- the perplexity chart ---------------------------------------------------------------------------

async function refreshMetrics() {
  const run = state.run;
  if (!run || document.hidden) return;
  try {
    const {epochs, baselines} = await api(`/api/runs/${encodeURIComponent(run.name)}/metrics`);
    if (state.run !== run) return;
    const key = run.name + ":" + JSON.stringify(epochs.at(-1) || null) + ":" + epochs.length + ":" + JSON.stringify(baselines);
    if (key !== state.metricsKey) {
      state.metricsKey = key;
      drawChart(epochs, baselines);
    }
  } catch (e) {
    $("chart-info").textContent = "metrics: " + e.message;
  }
}

// An epoch's record carries the latest validation, made at its end or before it (a line of its
// own within the epoch, or an epoch earlier): one the same as the point before it is that
// validation again, drawn once (as lstmlm plot draws it: plot.points).
function series(epochs, key) {
  const kept = [];
  for (const r of epochs) {
    if (typeof r[key] !== "number") continue;
    const carried = key === "val_perplexity" && Number.isInteger(r.epoch) && kept.length && kept[kept.length - 1][1] === r[key];
    if (!carried) kept.push([r.epoch, r[key]]);
  }
  return kept;
}

// The run's baselines as horizontal lines: the perplexity (2^bits) a uniform choice, its unigram
// and its bigram model score on the validation text (lstmlm/baselines.py).
const BASELINES = [["bigram", "#2e7d32"], ["unigram", "#ef6c00"], ["uniform", "#888"]];

function drawChart(epochs, baselines) {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(300, Math.round(canvas.clientWidth || 520)), height = Math.round(width * 0.55);  // drawn at the size shown
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.fillStyle = "#fff";
  g.fillRect(0, 0, width, height);
  const train = series(epochs, "train_perplexity"), val = series(epochs, "val_perplexity");
  const points = train.concat(val);
  const lines = baselines && points.length ? BASELINES.map(([name, colour]) => [name, colour, 2 ** baselines[name]]) : [];
  canvas.dataset.points = String(points.length);
  canvas.dataset.baselines = String(lines.length);
  if (!points.length) {
    $("chart-info").textContent = "no finished epoch or validation yet";
    return;
  }
  const left = 50, right = width - 12, top = 14, bottom = height - 34;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]).concat(lines.map((l) => l[2]));
  const x0 = Math.min(...xs), x1 = Math.max(Math.max(...xs), x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (e) => left + (e - x0) / (x1 - x0) * (right - left);
  // a log scale where baselines are drawn: a uniform choice's perplexity is the vocabulary's size
  const scale = lines.length && y0 > 0 ? Math.log : (v) => v;
  const Y = (v) => bottom - (scale(v) - scale(y0)) / (scale(y1) - scale(y0)) * (bottom - top);
  g.strokeStyle = "#ccc";
  g.fillStyle = "#666";
  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {  // horizontal grid with perplexity labels
    const v = scale === Math.log ? y0 * (y1 / y0) ** (i / 4) : y0 + (y1 - y0) * i / 4, y = Y(v);
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
    g.textAlign = "right"; g.fillText(v.toFixed(v < 10 ? 2 : 1), left - 6, y + 4);
  }
  g.textAlign = "center";
  const whole = xs.every(Number.isInteger);  // epochs' ends only; else validations within one too (1.25)
  for (const e of [x0, whole ? Math.round((x0 + x1) / 2) : (x0 + x1) / 2, x1]) g.fillText(whole ? String(e) : e.toFixed(2), X(e), bottom + 16);
  g.fillText("epoch", (left + right) / 2, height - 4);
  const line = (data, colour) => {
    g.strokeStyle = colour; g.fillStyle = colour; g.lineWidth = 2;
    g.beginPath();
    data.forEach(([e, v], i) => (i ? g.lineTo(X(e), Y(v)) : g.moveTo(X(e), Y(v))));
    g.stroke();
    for (const [e, v] of data) { g.beginPath(); g.arc(X(e), Y(v), 2.5, 0, 2 * Math.PI); g.fill(); }
  };
  g.setLineDash([4, 4]);
  g.lineWidth = 1;
  g.textAlign = "left";
  for (const [name, colour, v] of lines) {
    g.strokeStyle = colour; g.fillStyle = colour;
    g.beginPath(); g.moveTo(left, Y(v)); g.lineTo(right, Y(v)); g.stroke();
    g.fillText(`${name} ${fixed(v)}`, left + 4, Y(v) - 3);
  }
  g.setLineDash([]);
  line(train, "#1f77b4");
  line(val, "#c2185b");
  g.textAlign = "left"; g.font = "12px system-ui, sans-serif";
  g.fillStyle = "#1f77b4"; g.fillText("train", right - 100, top + 10);
  g.fillStyle = "#c2185b"; g.fillText("validation", right - 62, top + 10);
  const last = epochs.at(-1), finished = epochs.filter((r) => Number.isInteger(r.epoch)).length, within = epochs.length - finished;
  const also = within ? ` (and ${within} validation${within === 1 ? "" : "s"} within an epoch)` : "";
  $("chart-info").textContent = `${finished} epoch${finished === 1 ? "" : "s"}${also} · last: train ${fixed(last.train_perplexity)}, validation ${fixed(last.val_perplexity)}`;
}

// ---- wiring -------------------------------------------------------------------------------------------

function showSlider(id) {
  $(id + "-value").textContent = (+$(id).value).toFixed(2);
}

for (const id of ["temperature", "top-p"]) {
  $(id).addEventListener("input", () => showSlider(id));
  showSlider(id);
}
$("run").addEventListener("change", chooseRun);
$("go").addEventListener("click", generate);
$("stop").addEventListener("click", stopGenerating);
$("prefix").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
for (const id of ["gate", "layer", "unit"]) $(id).addEventListener("change", inspectSoon);
$("prev").addEventListener("click", () => stepUnit(-1));
$("next").addEventListener("click", () => stepUnit(1));
$("output").addEventListener("mouseover", hover);
setInterval(refreshMetrics, POLL_MS);
api("/api/status").then((limits) => { $("length").max = String(limits.max_length); }).catch(() => {});
loadRuns().catch((e) => status("runs: " + e.message, true));
