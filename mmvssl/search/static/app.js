// The search page: a text query (GET /api/search) or an uploaded file (POST, the file as the body),
// a grid of results, and a click that plays the result's video from its start time.
"use strict";
// Every API request carries X-Mmvssl: 1, which the server requires: a page on another site cannot add
// it without a CORS preflight, which the server never grants (docs/search.md, Security).
const API_HEADERS = { "X-Mmvssl": "1" };
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");
const player = document.getElementById("player");

function fmt(seconds) { return Number(seconds).toFixed(1) + " s"; }

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;  // never innerHTML: names and narrations are data
  return e;
}

function play(result) {
  const start = Number(result.start);
  const seek = () => { player.currentTime = start; player.play().catch(() => {}); };
  const src = new URL(result.media, location.href).href;
  if (player.src === src && player.readyState >= 1) { seek(); return; }
  player.addEventListener("loadedmetadata", seek, { once: true });
  player.src = src;
  player.dataset.start = String(start);
}

function show(results) {
  grid.replaceChildren();
  statusLine.textContent = results.length + " results";
  for (const r of results) {
    const card = el("div", "result");
    card.dataset.start = r.start;
    card.dataset.end = r.end;
    card.dataset.media = r.media;
    const img = el("img");
    img.src = r.thumb;
    img.alt = r.video + " at " + fmt(r.start);
    card.append(img, el("div", "span", fmt(r.start) + " – " + fmt(r.end)), el("div", "score", "score " + r.score.toFixed(3)),
                el("div", "name", r.video));
    if (r.narration) card.append(el("div", "narration", r.narration));
    card.addEventListener("click", () => play(r));
    grid.append(card);
  }
}

async function run(request) {
  statusLine.textContent = "searching…";
  try {
    const response = await request;
    const body = await response.json();
    if (!response.ok) { statusLine.textContent = "error: " + body.error; return; }
    show(body.results);
  } catch (e) {
    statusLine.textContent = "error: " + e;
  }
}

document.getElementById("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = document.getElementById("q").value;
  if (q.trim()) run(fetch("/api/search?k=24&q=" + encodeURIComponent(q), { headers: API_HEADERS }));
});

document.getElementById("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("audio/") ? "audio" : "video";
  run(fetch("/api/search?k=24&kind=" + kind, { method: "POST", body: file, headers: API_HEADERS }));
});
