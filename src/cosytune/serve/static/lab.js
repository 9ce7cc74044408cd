// cosytune listening lab: plain JavaScript, no build step, no network beyond this server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { config: null, variants: { llm: [], flow: [] }, takes: [], abPair: null, rated: 0, sampleRate: 24000 };

function status(msg, isError) {
  const el = $("#status");
  el.textContent = msg;
  el.style.color = isError ? "#fca5a5" : "";
}

function authHeaders() {
  const key = localStorage.getItem("cosytune_api_key");
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const opts = Object.assign({}, options);
  opts.headers = Object.assign({}, authHeaders(), options.headers || {});
  let res = await fetch(path, opts);
  if (res.status === 401) {
    const key = prompt("This server needs its API key:");
    if (key) {
      localStorage.setItem("cosytune_api_key", key);
      opts.headers = Object.assign({}, authHeaders(), options.headers || {});
      res = await fetch(path, opts);
    }
  }
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { msg = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

async function apiJSON(path, body) {
  const opts = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  return (await api(path, opts)).json();
}

// ---------------------------------------------------------------- tabs
for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => showTab(b.dataset.tab));
}
function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".pane")) p.classList.toggle("active", p.id === "pane-" + name);
  if (name === "results") loadSummary();
  if (name === "dataset") loadDataset();
}

// ---------------------------------------------------------------- set-up
function checkbox(container, value, label, checked) {
  const l = document.createElement("label");
  const c = document.createElement("input");
  c.type = "checkbox"; c.value = value; c.checked = !!checked;
  l.appendChild(c); l.appendChild(document.createTextNode(label));
  container.appendChild(l);
}

async function init() {
  try {
    state.config = await apiJSON("/lab/api/config");
    state.sampleRate = state.config.sample_rate;
    const v = await apiJSON("/v1/variants");
    state.variants = v;
    const sp = $("#speaker");
    for (const s of state.config.speakers) { const o = document.createElement("option"); o.value = o.textContent = s; sp.appendChild(o); }
    for (const kind of ["llm", "flow"]) {
      const box = $("#" + kind + "-variants");
      for (const item of v[kind]) {
        const extra = item.epoch != null ? " (epoch " + item.epoch + ")" : "";
        checkbox(box, item.name, item.name + extra, item.name === "model");
      }
    }
    for (const name of Object.keys(state.config.presets)) checkbox($("#presets"), name, name, name === "default");
    if (!state.config.dataset) $("#tab-dataset").title = "start the server with --data_dir to use this page";
    status("ready: " + state.config.speakers.length + " voice(s), " + v.llm.length + " LLM and " + v.flow.length + " flow variant(s)");
    document.body.dataset.ready = "1";
  } catch (e) {
    status("could not load the lab's settings: " + e.message, true);
  }
}

function checked(id) {
  return Array.from(document.querySelectorAll("#" + id + " input:checked")).map((c) => c.value);
}

// ---------------------------------------------------------------- compare
function pcmToFloat(bytes) {
  const n = Math.floor(bytes.length / 2);
  const view = new DataView(bytes.buffer, bytes.byteOffset, n * 2);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = view.getInt16(i * 2, true) / 32768;
  return out;
}

function wavBlob(chunks, sampleRate) {
  const total = chunks.reduce((a, c) => a + c.length, 0);
  const buf = new ArrayBuffer(44 + total);
  const v = new DataView(buf);
  const w = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  w(0, "RIFF"); v.setUint32(4, 36 + total, true); w(8, "WAVE"); w(12, "fmt ");
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, sampleRate, true); v.setUint32(28, sampleRate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  w(36, "data"); v.setUint32(40, total, true);
  let off = 44;
  const bytes = new Uint8Array(buf);
  for (const c of chunks) { bytes.set(c, off); off += c.length; }
  return new Blob([buf], { type: "audio/wav" });
}

let audioCtx = null;
function context() {
  if (!audioCtx) audioCtx = new (window.AudioContext || window.webkitAudioContext)();
  if (audioCtx.state === "suspended") audioCtx.resume();
  return audioCtx;
}

async function synthTake(take, row) {
  const t0 = performance.now();
  const body = { text: take.text, spk_id: take.speaker || null, llm_ckpt: take.llm, flow_ckpt: take.flow,
                 seed: take.seed, stream: take.stream, response_format: take.stream ? "pcm" : "wav" };
  const preset = state.config.presets[take.preset];
  if (preset && Object.keys(preset).length) body.sampling = preset;
  const res = await api("/v1/tts", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  take.id = res.headers.get("X-Request-Id");
  take.seed = Number(res.headers.get("X-Cosytune-Seed"));
  const cells = row.children;
  cells[4].textContent = take.seed;
  let blob;
  if (take.stream) {
    // Play each chunk as it arrives: schedule it right after the previous one on one AudioContext.
    const ctx = context();
    const reader = res.body.getReader();
    const chunks = [];
    let carry = new Uint8Array(0);
    let at = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      let bytes = value;
      if (carry.length) { const j = new Uint8Array(carry.length + value.length); j.set(carry); j.set(value, carry.length); bytes = j; }
      const even = bytes.length - (bytes.length % 2);
      carry = bytes.slice(even);
      const piece = bytes.slice(0, even);
      if (!piece.length) continue;
      chunks.push(piece);
      const samples = pcmToFloat(piece);
      const buffer = ctx.createBuffer(1, samples.length, state.sampleRate);
      buffer.copyToChannel(samples, 0);
      const src = ctx.createBufferSource();
      src.buffer = buffer; src.connect(ctx.destination);
      at = Math.max(at, ctx.currentTime + 0.02);
      src.start(at);
      at += buffer.duration;
      if (take.firstAudioMs == null) {
        take.firstAudioMs = performance.now() - t0;
        row.dataset.firstAudioMs = take.firstAudioMs.toFixed(0);
        cells[7].textContent = (take.firstAudioMs / 1000).toFixed(2) + " s";
        cells[9].textContent = "playing…";
      }
      take.chunks = chunks.length;
    }
    blob = wavBlob(chunks, state.sampleRate);
    take.doneMs = performance.now() - t0;
    try {
      const facts = await apiJSON("/v1/runs/" + take.id);
      take.rtf = facts.timings.rtf;
      take.duration = facts.audio_s;
    } catch (e) { /* timings are optional */ }
  } else {
    blob = await res.blob();
    take.doneMs = performance.now() - t0;
    const timings = JSON.parse(res.headers.get("X-Cosytune-Timings") || "{}");
    take.rtf = timings.rtf;
    take.duration = Number(res.headers.get("X-Cosytune-Audio-Seconds"));
    cells[7].textContent = (take.doneMs / 1000).toFixed(2) + " s";
  }
  row.dataset.doneMs = take.doneMs.toFixed(0);
  take.url = URL.createObjectURL(blob);
  const audio = document.createElement("audio");
  audio.controls = true; audio.src = take.url; audio.preload = "auto";
  cells[6].textContent = "";
  cells[6].appendChild(audio);
  cells[5].textContent = (take.duration != null ? take.duration.toFixed(2) + " s" : "");
  cells[8].textContent = take.rtf != null ? take.rtf.toFixed(3) : "";
  cells[9].textContent = "done"; cells[9].className = "state-done";
  row.dataset.state = "done";
}

$("#synth").addEventListener("click", async () => {
  const text = $("#text").value.trim();
  const llms = checked("llm-variants"), flows = checked("flow-variants"), presets = checked("presets");
  const seeds = $("#seeds").value.split(",").map((s) => s.trim()).filter((s) => s).map(Number);
  if (!text) { status("type a text first", true); return; }
  if (seeds.some((s) => !Number.isInteger(s) || s < 0)) { status("seeds must be whole numbers >= 0", true); return; }
  const plan = [];
  for (const llm of llms) for (const flow of flows) for (const preset of presets) for (const seed of (seeds.length ? seeds : [null]))
    plan.push({ text, speaker: $("#speaker").value, llm, flow, preset, seed, stream: $("#stream").checked });
  if (!plan.length) { status("pick at least one LLM, flow and preset", true); return; }
  $("#synth").disabled = true;
  $("#plan").textContent = plan.length + " take(s)";
  const tbody = $("#takes tbody");
  for (const take of plan) {
    const row = document.createElement("tr");
    const n = state.takes.length + 1;
    for (const v of [n, take.llm, take.flow, take.preset, take.seed ?? "random", "", "", "", "", "queued"]) {
      const td = document.createElement("td"); td.textContent = v; row.appendChild(td);
    }
    row.dataset.state = "queued";
    row.dataset.llm = take.llm; row.dataset.flow = take.flow;
    tbody.appendChild(row);
    state.takes.push(take);
    take.row = row;
  }
  for (const take of plan) {   // one after another: the server queues anyway, and timings stay comparable
    take.row.children[9].textContent = "synthesising…";
    try {
      await synthTake(take, take.row);
    } catch (e) {
      take.error = e.message;
      take.row.dataset.state = "error";
      take.row.children[9].textContent = e.message; take.row.children[9].className = "state-error";
    }
  }
  $("#synth").disabled = false;
  const ok = plan.filter((t) => !t.error).length;
  status(ok + " of " + plan.length + " take(s) ready");
});

// ---------------------------------------------------------------- blind A/B
function label(t) { return "llm=" + t.llm + " flow=" + t.flow + " preset=" + t.preset; }

function nextPair() {
  const ready = state.takes.filter((t) => t.url);
  const pairs = [];
  for (let i = 0; i < ready.length; i++) for (let j = i + 1; j < ready.length; j++)
    if (label(ready[i]) !== label(ready[j]) && ready[i].text === ready[j].text) pairs.push([ready[i], ready[j]]);
  if (!pairs.length) { status("synthesise at least two different variants of one text on the Compare tab first", true); return; }
  let pair = pairs[Math.floor(Math.random() * pairs.length)];
  if (Math.random() < 0.5) pair = [pair[1], pair[0]];
  state.abPair = pair;
  $("#ab-a").src = pair[0].url; $("#ab-b").src = pair[1].url;
  $("#ab-pair").classList.remove("hidden");
  $("#ab-pair").dataset.round = String(state.rated + 1);
  for (const b of document.querySelectorAll(".choices button")) b.disabled = false;
}

function takeRecord(t) {
  const preset = state.config.presets[t.preset] || {};
  return { llm: t.llm, flow: t.flow, preset: t.preset, seed: t.seed, settings: { sampling: preset, stream: t.stream } };
}

async function rate(choice) {
  if (!state.abPair) return;
  for (const b of document.querySelectorAll(".choices button")) b.disabled = true;
  const [a, b] = state.abPair;
  try {
    await apiJSON("/lab/api/ratings", { text: a.text, choice, a: takeRecord(a), b: takeRecord(b) });
    state.rated += 1;
    $("#ab-count").textContent = state.rated + " rated";
    $("#ab-pair").dataset.rated = String(state.rated);
    status("rating saved");
    nextPair();
  } catch (e) {
    status("rating not saved: " + e.message, true);
    for (const btn of document.querySelectorAll(".choices button")) btn.disabled = false;
  }
}
$("#ab-start").addEventListener("click", nextPair);
$("#pick-a").addEventListener("click", () => rate("a"));
$("#pick-b").addEventListener("click", () => rate("b"));
$("#pick-same").addEventListener("click", () => rate("same"));

// ---------------------------------------------------------------- results
async function loadSummary() {
  try {
    const s = await apiJSON("/lab/api/ratings/summary");
    const tbody = $("#summary tbody");
    tbody.textContent = "";
    for (const v of s.variants) {
      const tr = document.createElement("tr");
      for (const x of [v.variant, v.n, v.wins, v.ties, v.losses, (100 * v.win_rate).toFixed(0) + "%",
                       (100 * v.ci95[0]).toFixed(0) + "–" + (100 * v.ci95[1]).toFixed(0) + "%"]) {
        const td = document.createElement("td"); td.textContent = x; tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
    if (!s.variants.length) status("no ratings yet");
  } catch (e) { status(e.message, true); }
}
$("#results-refresh").addEventListener("click", loadSummary);

// ---------------------------------------------------------------- dataset
async function loadDataset() {
  const tbody = $("#dataset tbody");
  try {
    const d = await apiJSON("/lab/api/dataset");
    tbody.textContent = "";
    for (const r of d.rows) tbody.appendChild(datasetRow(r));
    status(d.rows.length + " clip(s) in review.tsv");
  } catch (e) { status(e.message, true); }
}

function datasetRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.utt = r.utt;
  const cell = (x) => { const td = document.createElement("td"); if (x instanceof Node) td.appendChild(x); else td.textContent = x; tr.appendChild(td); return td; };
  cell(r.utt);
  cell(r.duration_s != null ? r.duration_s.toFixed(1) : "");
  cell([r.status, ...r.flags].filter((x) => x).join(", "));
  if (r.audio) {
    const a = document.createElement("audio");
    a.controls = true; a.preload = "none";
    a.src = "/lab/api/dataset/audio/" + encodeURIComponent(r.utt);
    cell(a);
  } else cell("");
  const text = document.createElement("input");
  text.type = "text"; text.value = r.text; text.className = "transcript";
  cell(text);
  const del = document.createElement("input");
  del.type = "checkbox"; del.checked = r.delete; del.className = "exclude";
  cell(del);
  tr.classList.toggle("excluded", r.delete);
  const save = document.createElement("button");
  save.textContent = "Save"; save.className = "save";
  const td = cell(save);
  save.addEventListener("click", async () => {
    try {
      const out = await apiJSON("/lab/api/dataset/rows/" + encodeURIComponent(r.utt), { text: text.value, delete: del.checked });
      text.value = out.text;
      tr.classList.toggle("excluded", out.delete);
      tr.dataset.saved = String(Number(tr.dataset.saved || 0) + 1);
      save.textContent = "Saved";
      status("saved " + r.utt + " to review.tsv");
    } catch (e) { status(e.message, true); save.textContent = "Save"; }
  });
  const dirty = () => { save.textContent = "Save"; };
  text.addEventListener("input", dirty); del.addEventListener("change", dirty);
  void td;
  return tr;
}
$("#dataset-load").addEventListener("click", loadDataset);
$("#apply-review").addEventListener("click", async () => {
  $("#apply-review").disabled = true;
  try {
    const out = await apiJSON("/lab/api/dataset/apply", {});
    $("#apply-result").textContent = Object.entries(out.summary).map(([k, v]) => k + ": " + v).join(" · ");
    $("#apply-result").dataset.done = "1";
    status("apply-review finished");
    await loadDataset();
  } catch (e) { status("apply-review failed: " + e.message, true); }
  $("#apply-review").disabled = false;
});

init();
