// The page: plain JS over the JSON/PNG API; no build step.
"use strict";
const $ = (id) => document.getElementById(id);
let models = {}, current = null, blobA = null, blobB = null;

function say(text) { $("status").textContent = text || ""; }

async function api(path, body, accept) {
  // body: an object (sent as JSON), or a Blob / FormData; the answer is a Blob (images) or JSON
  const init = { method: "POST", headers: { Accept: accept || "application/json" } };
  if (body instanceof Blob) { init.body = body; init.headers["Content-Type"] = body.type; }
  else if (body instanceof FormData) { init.body = body; }
  else { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, init);
  if (!r.ok) {
    let message = r.statusText;
    try { message = (await r.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${message}`);
  }
  return accept && accept.startsWith("image/") ? r.blob() : r.json();
}

function show(img, blob) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
}

const op = (name) => `/v1/models/${encodeURIComponent(current.name)}/${name}`;

async function sample() {
  const body = { n: Number($("n").value), seed: Number($("seed").value), temperature: Number($("temperature").value) };
  if (current.num_classes && $("label").value !== "") body.label = Number($("label").value);
  try { show($("grid"), await api(op("sample"), body, "image/png")); $("grid").dataset.done = String(Date.now()); say(""); }
  catch (e) { say(e.message); }
}

// the latent plane: a point (x, y) in [-3, 3]^2 on two chosen dims, the others 0
let pending = null, busy = false;
async function decodePoint(x, y) {
  pending = [x, y];
  if (busy) return;  // one request in flight; the latest point is sent when it returns
  busy = true;
  while (pending) {
    const [px, py] = pending; pending = null;
    const z = new Array(current.latent.dim).fill(0);
    z[Number($("dim-x").value)] = px; z[Number($("dim-y").value)] = py;
    try {
      show($("point"), await api(op("decode"), { z: [z] }, "image/png"));
      $("coords").textContent = `z[${$("dim-x").value}] = ${px.toFixed(2)}, z[${$("dim-y").value}] = ${py.toFixed(2)}`;
      $("point").dataset.z = JSON.stringify([px, py]);
      say("");
    } catch (e) { say(e.message); }
  }
  busy = false;
}

function drawPlane(x, y) {
  const c = $("plane"), g = c.getContext("2d"), s = c.width;
  g.fillStyle = "#f7f7f7"; g.fillRect(0, 0, s, s);
  g.strokeStyle = "#ccc"; g.beginPath(); g.moveTo(s / 2, 0); g.lineTo(s / 2, s); g.moveTo(0, s / 2); g.lineTo(s, s / 2); g.stroke();
  if (x !== undefined) { g.fillStyle = "#c00"; g.beginPath(); g.arc((x + 3) / 6 * s, (3 - y) / 6 * s, 5, 0, 7); g.fill(); }
}

function planeEvent(ev) {
  if (ev.type !== "pointerdown" && !(ev.buttons & 1)) return;
  const r = $("plane").getBoundingClientRect();
  const x = ((ev.clientX - r.left) / r.width) * 6 - 3, y = 3 - ((ev.clientY - r.top) / r.height) * 6;
  drawPlane(x, y);
  decodePoint(x, y);
}

// an upload, drawn at the model's size in its channels, as a PNG
async function toModelPng(file) {
  const [c, h, w] = current.image_shape;
  const bitmap = await createImageBitmap(file);
  const canvas = document.createElement("canvas"); canvas.width = w; canvas.height = h;
  const g = canvas.getContext("2d");
  g.drawImage(bitmap, 0, 0, w, h);
  if (c === 1) {
    const d = g.getImageData(0, 0, w, h);
    for (let i = 0; i < d.data.length; i += 4) {
      const v = Math.round(0.299 * d.data[i] + 0.587 * d.data[i + 1] + 0.114 * d.data[i + 2]);
      d.data[i] = d.data[i + 1] = d.data[i + 2] = v;
    }
    g.putImageData(d, 0, 0);
  }
  return new Promise((ok) => canvas.toBlob(ok, "image/png"));
}

async function uploadA() {
  if (!$("file-a").files.length) return;
  try {
    blobA = await toModelPng($("file-a").files[0]);
    show($("input-a"), blobA);
    show($("recon"), await api(op("reconstruct"), blobA, "image/png"));
    $("recon").dataset.done = String(Date.now());
    if (current.ops.includes("score")) {
      const s = await api(op("score"), blobA);
      $("score").textContent = `nll ${s.nll[0].toFixed(2)} nats (elbo ${s.elbo[0].toFixed(2)}, recon ${s.recon[0].toFixed(2)})`;
    } else { $("score").textContent = `(${current.kind} models have no score)`; }
    say("");
    await interpolate();
  } catch (e) { say(e.message); }
}

async function interpolate() {
  if (!blobA || !blobB) return;
  if (!current.ops.includes("interpolate")) { say(`${current.kind} models have no interpolate`); return; }
  const form = new FormData();
  form.append("a", blobA, "a.png"); form.append("b", blobB, "b.png"); form.append("steps", "8");
  try { show($("interp"), await api(op("interpolate"), form, "image/png")); $("interp").dataset.done = String(Date.now()); say(""); }
  catch (e) { say(e.message); }
}

async function uploadB() {
  if (!$("file-b").files.length) return;
  try { blobB = await toModelPng($("file-b").files[0]); await interpolate(); } catch (e) { say(e.message); }
}

function choose(name) {
  current = models[name];
  const info = current;
  $("about").textContent = `${info.kind}, image ${info.image_shape.join("x")}, latent ${JSON.stringify(info.latent)}, ${info.device}`;
  $("label-box").hidden = !info.num_classes;
  $("label").innerHTML = '<option value="">any</option>' +
    Array.from({ length: info.num_classes || 0 }, (_, i) => `<option value="${i}">${i}</option>`).join("");
  const dim = info.latent.dim;  // a VAE's latent size; VQ-VAEs have a code grid instead
  $("plane").hidden = !dim; $("plane-off").hidden = !!dim;
  for (const [sel, start] of [["dim-x", 0], ["dim-y", 1]]) {
    $(sel).innerHTML = Array.from({ length: dim || 0 }, (_, i) => `<option value="${i}">${i}</option>`).join("");
    $(sel).value = String(Math.min(start, (dim || 1) - 1));
  }
  drawPlane();
  sample();
  if (dim) decodePoint(0, 0);
}

async function start() {
  const r = await fetch("/v1/models");
  const doc = await r.json();
  for (const m of doc.models) models[m.name] = m;
  $("model").innerHTML = doc.models.map((m) => `<option>${m.name}</option>`).join("");
  $("model").value = doc.default;
  $("model").onchange = () => choose($("model").value);
  $("sample").onclick = sample;
  $("file-a").onchange = uploadA;
  $("file-b").onchange = uploadB;
  for (const t of ["pointerdown", "pointermove"]) $("plane").addEventListener(t, planeEvent);
  choose(doc.default);
  document.body.dataset.ready = "1";
}

start().catch((e) => say(e.message));
