// The sdxl web page: a form for one generation request, live progress, and a gallery of results.
// Plain JavaScript, no build step. It talks only to its own server (same origin), through the native API
// (POST/GET/DELETE v1/jobs, GET v1/models); the browser sends the Basic auth it already holds.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { config: null, job: null, lastSeed: null, gallery: [], init: null, painted: false };
const GALLERY_KEY = "sdxl.gallery";
const JOB_KEY = "sdxl.job";
const GALLERY_MAX = 60;
const POLL_MS = 300;

// ---- server ----------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (options.body) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { credentials: "same-origin", ...options, headers });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { detail: text }; }
  if (!r.ok) throw new Error(errorText(body) || `${r.status} ${r.statusText}`);
  return body;
}

function errorText(body) {
  // The server's errors are {"detail": "<one line>"}; FastAPI's own are {"detail": [{loc, msg}, ...]}.
  const d = body && body.detail;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
  return typeof d === "string" ? d : "";
}

// ---- the form --------------------------------------------------------------------------------------------

function fillSelect(select, entries, value) {
  select.replaceChildren(...entries.map(([v, label]) => new Option(label, v)));
  if (value !== undefined) select.value = value;
}

function sizePresets(config) {
  // The native size, the report's aspect buckets at the model's scale, then the buckets as they are.
  const n = config.native.resolution;
  const label = ([w, h]) => `${w} × ${h}`;
  const byAspect = [...config.buckets].sort((a, b) => a[0] / a[1] - b[0] / b[1]);
  const groups = [["native", [[n, n]]]];
  if (n !== 1024) {
    const scaled = byAspect.map(([w, h]) => [Math.round(w * n / 1024 / 8) * 8, Math.round(h * n / 1024 / 8) * 8]);
    const seen = new Set();
    groups.push([`at ${n} scale`, scaled.filter((s) => !seen.has(`${s}`) && seen.add(`${s}`))]);
  }
  groups.push(["SDXL buckets", byAspect]);
  const select = $("size-preset");
  select.replaceChildren(new Option("custom", ""));
  for (const [name, sizes] of groups) {
    const group = document.createElement("optgroup");
    group.label = name;
    for (const s of sizes) group.append(new Option(label(s), `${s[0]}x${s[1]}`));
    select.append(group);
  }
}

function matchPreset() {
  const v = `${$("width").value}x${$("height").value}`;
  $("size-preset").value = [...$("size-preset").options].some((o) => o.value === v) ? v : "";
}

async function setUp() {
  const [config, models] = await Promise.all([api("page/config"), api("v1/models")]);
  fillSelect($("sampler"), Object.entries(config.samplers), config.native.sampler);
  fillSelect($("schedule"), Object.entries(config.schedules), config.default_schedule);
  const usable = (kind) => (models[kind] || []).filter((m) => !m.refused).map((m) => [m.name, m.title]);
  fillSelect($("model"), usable("checkpoints"), models.current);
  const checkpoints = usable("checkpoints");
  fillSelect($("refiner"), checkpoints, (checkpoints.find(([name]) => /refiner/i.test(name)) || [""])[0]);
  fillSelect($("vae"), [["", "the model's own"], ...usable("vae")]);
  fillSelect($("lora"), [["", "LoRA…"], ...usable("loras")]);
  applyNative(config);
}

function applyNative(config, values = true) {
  // A model's native settings: the form starts from them (the size presets lead with its native size).
  page.config = config;
  sizePresets(config);
  if (values) {
    $("width").value = $("height").value = config.native.resolution;
    $("steps").value = config.native.steps;
    $("cfg").value = config.native.cfg;
    $("refiner_switch").value = config.native.refiner_switch;
    $("refiner-on").checked = config.builtin_refiner;
  }
  // The default model's refiner is built in (on unless unticked: then the job asks for refiner "none").
  $("refiner").hidden = config.builtin_refiner;
  $("refiner-builtin").hidden = !config.builtin_refiner;
  matchPreset();
}

async function modelChanged(values = true) {
  try {
    applyNative(await api(`page/config?model=${encodeURIComponent($("model").value)}`), values);
  } catch (e) {
    showError(e.message);
  }
}

function selectByStem(select, stem) {
  // Infotext names models by file stem ("Model: sd_xl_base_1.0"); the lists by file name.
  const match = [...select.options].find((o) => o.value.replace(/\.[^.\/]+$/, "") === stem);
  if (match) select.value = match.value;
  return Boolean(match);
}

const number = (id) => Number($(id).value);

async function jobBody() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    width: number("width"), height: number("height"), steps: number("steps"),
    sampler: $("sampler").value, schedule: $("schedule").value, cfg: number("cfg"),
    seed: number("seed"), batch: number("batch"), n_iter: number("n_iter"),
  };
  if ($("refiner-on").checked) {
    body.refiner_switch = number("refiner_switch");
    if (!page.config.builtin_refiner) body.refiner = $("refiner").value;
  } else if (page.config.builtin_refiner) {
    body.refiner = "none";
  }
  if ($("hires-on").checked) {
    Object.assign(body, { hires_scale: number("hires_scale"), hires_upscale: $("hires_upscale").value,
      hires_strength: number("hires_strength") });
    if (number("hires_steps") > 0) body.hires_steps = number("hires_steps");
  }
  if ($("img2img-on").checked && page.init) {
    body.init_image = await dataUrl(page.init.file);
    body.strength = number("strength");
    if (page.painted) body.mask = maskDataUrl();
  }
  body.model = $("model").value;
  if ($("vae").value) body.vae = $("vae").value;
  return body;
}

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// ---- a job: submit, follow, cancel --------------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  if (page.job) return;
  showError("");
  try {
    const { id } = await api("v1/jobs", { method: "POST", body: JSON.stringify(await jobBody()) });
    await track(id);
  } catch (e) {
    showError(e.message);
  }
}

async function track(id) {
  // Follow a job to its end; its id outlives a reload of the page (sessionStorage), the job runs on regardless.
  page.job = id;
  sessionStorage.setItem(JOB_KEY, id);
  showImages([]);
  showProgress({ state: "queued", step: 0, total: 0, job_count: 1 });
  busy(true);
  try {
    const job = await follow(id);
    if (job.images.length) showResults(job);  // a cancelled job keeps the runs it finished
    if (job.state === "failed") showError(job.error || "the job failed");
    if (job.state === "cancelled") showError("cancelled");
  } finally {
    sessionStorage.removeItem(JOB_KEY);
    page.job = null;
    busy(false);
  }
}

async function follow(id) {
  for (;;) {
    const job = await api(`v1/jobs/${encodeURIComponent(id)}`);
    showProgress(job);
    if (["done", "failed", "cancelled"].includes(job.state)) return job;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

async function cancel() {
  if (!page.job) return;
  try {
    await api(`v1/jobs/${encodeURIComponent(page.job)}`, { method: "DELETE" });
  } catch (e) {
    showError(e.message);
  }
}

function resume() {
  // A job this tab started before a reload: follow it again.
  const id = sessionStorage.getItem(JOB_KEY);
  if (id) track(id).catch((e) => showError(e.message));
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("generate").textContent = on ? "Generating…" : "Generate";
  $("progress").hidden = !on;
  if (!on) {
    $("preview").hidden = true;
    $("placeholder").hidden = $("result").childElementCount > 0;
  }
}

function showProgress(job) {
  const total = Math.max(job.total || 0, 1);
  $("bar").style.width = `${Math.round(100 * (job.step || 0) / total)}%`;
  $("progress-text").textContent = job.state === "queued"
    ? `queued (${job.job_count || 1} in the queue)` : `step ${job.step || 0} of ${job.total || "?"}`;
  $("queue").textContent = job.job_count > 1 ? `${job.job_count} jobs in the queue` : "";
  if (job.preview) {
    $("preview").src = `data:image/png;base64,${job.preview}`;
    $("preview").hidden = false;
    $("placeholder").hidden = true;
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// ---- results and the gallery ----------------------------------------------------------------------------------

function resultsOf(job) {
  return job.images.map((url, i) => ({ url, infotext: job.infotexts[i] || "", seed: job.seeds[i],
    prompt: job.prompts[i] || "", width: job.width, height: job.height, id: job.id }));
}

function showResults(job) {
  const results = resultsOf(job);
  page.lastSeed = results[0].seed;
  page.gallery = [...results, ...page.gallery].slice(0, GALLERY_MAX);
  saveGallery();
  renderGallery();
  showImages(results);
}

function showImages(results) {
  $("preview").hidden = true;
  $("placeholder").hidden = results.length > 0;
  $("result").replaceChildren(...results.map((r) => resultCard(r, "result-item")));
  $("result").classList.toggle("many", results.length > 1);
}

function resultCard(r, cls) {
  const fig = document.createElement("figure");
  fig.className = cls;
  const img = new Image();
  img.src = r.url;
  img.alt = r.prompt;
  img.width = r.width;
  img.height = r.height;
  const caption = document.createElement("figcaption");
  const text = document.createElement("pre");
  text.className = "infotext";
  text.textContent = r.infotext;
  const tools = document.createElement("div");
  tools.className = "row tight";
  const save = document.createElement("a");
  save.href = r.url;
  save.download = `sdxl-${r.seed}.png`;
  save.className = "button small download";
  save.textContent = "Download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "small";
  reuse.textContent = "Use settings";
  reuse.onclick = () => applyInfotext(r.infotext);
  tools.append(save, reuse);
  caption.append(tools, text);
  fig.append(img, caption);
  return fig;
}

function renderGallery() {
  $("gallery").replaceChildren(...page.gallery.map((r) => {
    const fig = document.createElement("figure");
    fig.className = "thumb";
    fig.title = r.infotext;
    const img = new Image();
    img.src = r.url;
    img.alt = r.prompt;
    img.loading = "lazy";
    img.onerror = () => {  // gone from the server (its output folder was cleared): forget it
      page.gallery = page.gallery.filter((g) => g !== r);
      saveGallery();
      fig.remove();
    };
    const caption = document.createElement("figcaption");
    caption.textContent = `${r.prompt || "(no prompt)"} · seed ${r.seed}`;
    fig.append(img, caption);
    fig.onclick = () => showImages([r]);
    return fig;
  }));
}

function saveGallery() {
  try {
    localStorage.setItem(GALLERY_KEY, JSON.stringify(page.gallery));
  } catch { /* storage full or off: the gallery lives in memory */ }
}

function loadGallery() {
  try { page.gallery = JSON.parse(localStorage.getItem(GALLERY_KEY) || "[]"); } catch { page.gallery = []; }
  if (!Array.isArray(page.gallery)) page.gallery = [];
  renderGallery();
}

// ---- img2img and the inpainting mask ----------------------------------------------------------------------

function loadInit(file) {
  const img = new Image();
  img.onload = () => {
    page.init = { file, img };
    for (const c of [$("init-canvas"), $("mask-canvas")]) {
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
    }
    $("init-canvas").getContext("2d").drawImage(img, 0, 0);
    clearMask();
    $("paint").hidden = $("paint-tools").hidden = false;
    $("img2img-on").checked = true;
    fitSize(img.naturalWidth, img.naturalHeight);
  };
  img.onerror = () => showError(`${file.name}: not an image the browser can read`);
  img.src = URL.createObjectURL(file);
}

function fitSize(w, h) {
  // The output keeps the init image's aspect, as large as the current size's longer side, in multiples of 8.
  const side = Math.max(number("width"), number("height"));
  const k = side / Math.max(w, h);
  $("width").value = Math.max(8, Math.round(w * k / 8) * 8);
  $("height").value = Math.max(8, Math.round(h * k / 8) * 8);
  matchPreset();
}

function clearMask() {
  const c = $("mask-canvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  page.painted = false;
}

function paintAt(event, start) {
  const c = $("mask-canvas");
  const box = c.getBoundingClientRect();
  const k = c.width / box.width;
  const x = (event.clientX - box.left) * k;
  const y = (event.clientY - box.top) * k;
  const ctx = c.getContext("2d");
  Object.assign(ctx, { lineWidth: number("brush") * k, lineCap: "round", lineJoin: "round", strokeStyle: "#ff3d8b" });
  if (start) {
    ctx.beginPath();
    ctx.moveTo(x, y);
  }
  ctx.lineTo(x, y);
  ctx.stroke();
  page.painted = true;
}

function maskDataUrl() {
  // The painted strokes as a black and white PNG at the init image's size: white = repaint.
  const src = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = src.width;
  out.height = src.height;
  const data = src.getContext("2d").getImageData(0, 0, src.width, src.height);
  for (let i = 0; i < data.data.length; i += 4) {
    const v = data.data[i + 3] > 0 ? 255 : 0;
    data.data.set([v, v, v, 255], i);
  }
  out.getContext("2d").putImageData(data, 0, 0);
  return out.toDataURL("image/png");
}

function setUpPainting() {
  const c = $("mask-canvas");
  let drawing = false;
  c.addEventListener("pointerdown", (e) => { drawing = true; c.setPointerCapture(e.pointerId); paintAt(e, true); });
  c.addEventListener("pointermove", (e) => { if (drawing) paintAt(e, false); });
  c.addEventListener("pointerup", () => { drawing = false; });
  $("mask-clear").onclick = clearMask;
  $("init-file").onchange = (e) => { if (e.target.files[0]) loadInit(e.target.files[0]); };
}

// ---- infotext: read a PNG's text chunks, parse A1111's parameters, fill the form --------------------------------

const latin1 = (bytes) => Array.from(bytes, (b) => String.fromCharCode(b)).join("");

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function pngTexts(buffer) {
  // tEXt, zTXt and iTXt chunks (PNG spec §11.3.4) -> {keyword: text}; null when it is not a PNG.
  const b = new Uint8Array(buffer);
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (b.length < 8 || signature.some((v, i) => b[i] !== v)) return null;
  const view = new DataView(buffer);
  const out = {};
  for (let p = 8; p + 12 <= b.length;) {
    const length = view.getUint32(p);
    const type = latin1(b.subarray(p + 4, p + 8));
    const data = b.subarray(p + 8, Math.min(p + 8 + length, b.length));
    const z = data.indexOf(0);
    if (type === "tEXt" && z > 0) out[latin1(data.subarray(0, z))] = latin1(data.subarray(z + 1));
    if (type === "zTXt" && z > 0) out[latin1(data.subarray(0, z))] = latin1(await inflate(data.subarray(z + 2)));
    if (type === "iTXt" && z > 0) {
      const compressed = data[z + 1] === 1;
      const lang = data.indexOf(0, z + 3);
      const start = data.indexOf(0, lang + 1) + 1;
      const text = compressed ? await inflate(data.subarray(start)) : data.subarray(start);
      out[latin1(data.subarray(0, z))] = new TextDecoder().decode(text);
    }
    if (type === "IEND") break;
    p += 12 + length;
  }
  return out;
}

function parseInfotext(text) {
  // A1111's parse_generation_parameters (modules/infotext_utils.py): prompt lines, "Negative prompt:" lines,
  // then a last line of "Key: value" pairs (values with commas are JSON-quoted).
  const pair = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
  const lines = text.trim().split("\n");
  let last = lines.length > 1 ? lines[lines.length - 1] : "";
  if ([...last.matchAll(pair)].length < 3) last = "";
  else lines.pop();
  const prompt = [];
  const negative = [];
  for (const line of lines) {
    if (line.startsWith("Negative prompt:")) negative.push(line.slice(16).trim());
    else (negative.length ? negative : prompt).push(line);
  }
  const fields = {};
  for (const m of last.matchAll(pair)) {
    let v = m[2].trim();
    if (v.startsWith('"')) try { v = JSON.parse(v); } catch { /* keep it quoted */ }
    fields[m[1].trim()] = v;
  }
  return { prompt: prompt.join("\n").trim(), negative: negative.join("\n").trim(), fields };
}

function samplerFromA1111(name, scheduleType) {
  // sdxl.sampling.names.from_a1111: "DPM++ 2M" (+ a Schedule type) or the old "DPM++ 2M Karras"; ours too.
  const { samplers, schedules, default_schedule: fallback } = page.config;
  const find = (table, key) => Object.keys(table).find((k) => k === key || table[k].toLowerCase() === key);
  let key = name.trim().toLowerCase();
  let schedule = fallback;
  let sampler = find(samplers, key);
  if (!sampler) {
    const cut = key.lastIndexOf(" ");
    sampler = find(samplers, key.slice(0, cut));
    schedule = find(schedules, key.slice(cut + 1)) || fallback;
  }
  if (scheduleType && scheduleType.toLowerCase() !== "automatic") {
    schedule = find(schedules, scheduleType.trim().toLowerCase()) || schedule;
  }
  return [sampler, schedule];
}

async function applyInfotext(text) {
  const { prompt, negative, fields: f } = parseInfotext(text);
  $("prompt").value = prompt;
  $("negative_prompt").value = negative;
  const set = (id, v) => { if (v !== undefined && v !== "") $(id).value = v; };
  set("steps", f.Steps);
  set("cfg", f["CFG scale"]);
  set("seed", f.Seed);
  $("batch").value = f["Batch size"] || 1;
  if (f.Size) [$("width").value, $("height").value] = f.Size.split("x");
  if (f.Sampler) {
    const [sampler, schedule] = samplerFromA1111(f.Sampler, f["Schedule type"]);
    if (sampler) $("sampler").value = sampler;
    if (schedule) $("schedule").value = schedule;
  }
  set("refiner_switch", f["Refiner switch at"]);
  $("hires-on").checked = Boolean(f["Hires upscale"]);
  if (f["Hires upscale"]) {
    set("hires_scale", f["Hires upscale"]);
    set("hires_steps", f["Hires steps"]);
    set("hires_strength", f["Denoising strength"]);
    $("hires_upscale").value = /^latent/i.test(f["Hires upscaler"] || "Latent") ? "latent" : "pixel";
  } else {
    set("strength", f["Denoising strength"]);
  }
  matchPreset();
  showError("");
  const model = $("model").value;
  if (f.Model && selectByStem($("model"), f.Model) && $("model").value !== model) await modelChanged(false);
  const builtin = page.config.builtin_refiner;
  $("refiner-on").checked = Boolean(f.Refiner) && (builtin || selectByStem($("refiner"), f.Refiner));
}

async function dropped(event) {
  event.preventDefault();
  $("drop-hint").hidden = true;
  const file = event.dataTransfer.files[0];
  if (!file) return;
  if (event.target.closest && event.target.closest("#img2img-box")) {
    $("img2img-box").open = true;
    loadInit(file);  // onto the img2img box: the init image
    return;
  }
  let texts = null;
  try {
    texts = await pngTexts(await file.arrayBuffer());
  } catch {  // a damaged compressed chunk
    showError(`${file.name}: its text chunks cannot be read (a damaged PNG)`);
    return;
  }
  if (texts && texts.parameters) await applyInfotext(texts.parameters);
  else showError(`${file.name}: carries no generation parameters (only PNGs with A1111 infotext do)`);
}

function setUpDrop() {
  document.addEventListener("dragover", (e) => { e.preventDefault(); $("drop-hint").hidden = false; });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) $("drop-hint").hidden = true; });
  document.addEventListener("drop", dropped);
}

// ---- wiring ---------------------------------------------------------------------------------------------

function insertLora() {
  // A1111 names a LoRA by its file name without the extension.
  const name = $("lora").value.replace(/\.safetensors$/i, "");
  if (!name) return;
  const tag = `<lora:${name}:${$("lora-weight").value || 1}>`;
  const box = $("prompt");
  const at = box.selectionEnd ?? box.value.length;
  const before = box.value.slice(0, at);
  const gap = before && !/\s$/.test(before) ? " " : "";
  box.value = before + gap + tag + box.value.slice(at);
  box.focus();
}

function wire() {
  $("form").addEventListener("submit", generate);
  $("cancel").onclick = cancel;
  $("seed-random").onclick = () => { $("seed").value = -1; };
  $("seed-reuse").onclick = () => { if (page.lastSeed !== null) $("seed").value = page.lastSeed; };
  $("lora-add").onclick = insertLora;
  $("model").onchange = () => modelChanged();
  $("gallery-clear").onclick = () => { page.gallery = []; saveGallery(); renderGallery(); };
  $("size-preset").onchange = (e) => {
    if (e.target.value) [$("width").value, $("height").value] = e.target.value.split("x");
  };
  $("width").oninput = $("height").oninput = matchPreset;
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  setUpPainting();
  setUpDrop();
}

wire();
loadGallery();
setUp().then(resume, (e) => showError(`cannot load the form: ${e.message}`));
