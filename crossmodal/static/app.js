// The search page: plain DOM, no build step, no network beyond this server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const results = $("#results");
const statusLine = $("#status");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function kValue() {
  return $("#k").value || "12";
}

async function call(url, options) {
  const response = await fetch(url, options);
  let body;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`HTTP ${response.status}`);
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function timing(ms) {
  return `${ms.total.toFixed(ms.total < 10 ? 1 : 0)} ms on the server`;
}

function imageCard(item) {
  const card = el("figure", { class: "card" + (item.true ? " true" : ""), "data-image-id": item.image_id,
                              title: item.captions && item.captions.length ? item.captions[0] : `image ${item.image_id}` },
    el("img", { src: item.thumb_url, alt: `image ${item.image_id}`, loading: "lazy" }),
    el("figcaption", { class: "meta" },
      el("span", { class: "score", text: item.score.toFixed(3) }),
      item.true ? el("span", { class: "badge", text: "\u2713 true" }) : el("span", { text: `#${item.image_id}` })));
  card.addEventListener("click", () => queryImage(item.image_id));
  return card;
}

function imageGrid(items) {
  return el("div", { class: "grid images" }, ...items.map(imageCard));
}

function captionList(items) {
  return el("ol", { class: "captions" }, ...items.map((c) => {
    const thumb = el("img", { src: c.thumb_url, alt: `image ${c.image_id}`, title: `image ${c.image_id}`, loading: "lazy" });
    thumb.addEventListener("click", () => queryImage(c.image_id));
    return el("li", { class: c.true ? "true" : "", "data-caption-id": c.caption_id },
      el("span", { class: "score", text: c.score.toFixed(3) }), el("span", { class: "text", text: c.text }), thumb);
  }));
}

async function queryText(text) {
  const q = text.trim();
  if (!q) { setStatus("Type a sentence first.", true); return; }
  setStatus("Searching\u2026");
  try {
    const r = await call(`/api/text?q=${encodeURIComponent(q)}&k=${encodeURIComponent(kValue())}`);
    const note = r.query.is_caption ? " (a caption of this split: its image is framed in green)" : "";
    results.replaceChildren(el("h2", { text: `Nearest images of \u201c${r.query.text}\u201d${note}` }),
                            imageGrid(r.images));
    setStatus(`${r.images.length} images, ${timing(r.ms)}.`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function queryImage(imageId) {
  setStatus("Searching\u2026");
  try {
    const r = await call(`/api/image/${encodeURIComponent(imageId)}?k=${encodeURIComponent(kValue())}`);
    const q = r.query;
    results.replaceChildren(
      el("div", { class: "query", id: "query-image" },
        el("a", { href: q.url, target: "_blank" }, el("img", { src: q.thumb_url, alt: `image ${q.image_id}` })),
        el("div", {}, el("b", { text: `Image ${q.image_id}` }), el("div", { text: "its captions:" }),
          el("ul", {}, ...q.captions.map((t) => el("li", { text: t }))))),
      el("div", { class: "cols" },
        el("div", {}, el("h2", { text: "Nearest captions (\u2713 = a true caption of this image)" }), captionList(r.captions)),
        el("div", {}, el("h2", { text: "More like this" }), imageGrid(r.images))));
    setStatus(`${r.captions.length} captions and ${r.images.length} images, ${timing(r.ms)}.`);
    window.scrollTo(0, 0);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function queryUpload(file) {
  if (!file) return;
  setStatus(`Embedding ${file.name}\u2026`);
  const form = new FormData();
  form.append("file", file);
  try {
    const r = await call(`/api/upload?k=${encodeURIComponent(kValue())}`, { method: "POST", body: form });
    const preview = el("img", { src: URL.createObjectURL(file), alt: file.name });
    results.replaceChildren(
      el("div", { class: "query", id: "query-upload" }, preview,
        el("div", {}, el("b", { text: file.name }),
          el("div", { text: `${r.query.width}\u00d7${r.query.height} px, a photo from outside the dataset` }))),
      el("div", { class: "cols" },
        el("div", {}, el("h2", { text: "Nearest captions" }), captionList(r.captions)),
        el("div", {}, el("h2", { text: "Nearest images" }), imageGrid(r.images))));
    setStatus(`${r.captions.length} captions and ${r.images.length} images, ${timing(r.ms)}.`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function fmt(key, value) {
  const [direction, metric] = key.split("_");
  const label = `${direction === "img2text" ? "image\u2192text" : "text\u2192image"} ${metric}`;
  return `${label} ${metric.includes("R@") ? value.toFixed(1) : value.toFixed(3)}`;
}

async function loadInfo() {
  try {
    const info = await call("/api/info");
    const m = info.metrics || {};
    const keys = ["img2text_R@1", "img2text_R@5", "text2img_R@1", "text2img_R@5", "img2text_mAP", "text2img_mAP"];
    const shown = keys.filter((k) => typeof m[k] === "number").map((k) => fmt(k, m[k])).join(" \u00b7 ");
    $("#run-info").replaceChildren(
      el("div", {}, el("b", { text: info.run }), ` (${info.checkpoint}, epoch ${info.epoch}) \u00b7 ${info.text_encoder} + ${info.image_encoder}`),
      el("div", { text: `split ${info.split}: ${info.images} images, ${info.captions} captions \u00b7 index ${info.index}` }),
      el("div", { class: "metrics", text: shown ? `${m.source}: ${shown}` : "no validation metrics recorded" }));
    document.title = `crossmodal search \u00b7 ${info.run}`;
    $("#k").max = info.limits.max_k;
    $("#q").maxLength = info.limits.max_text_chars;
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`, true);
  }
}

$("#search-form").addEventListener("submit", (event) => { event.preventDefault(); queryText($("#q").value); });
$("#file").addEventListener("change", (event) => { queryUpload(event.target.files[0]); event.target.value = ""; });
const drop = $("#drop");
for (const name of ["dragenter", "dragover"]) {
  document.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  document.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
}
document.addEventListener("drop", (event) => {
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) queryUpload(file);
});
loadInfo();
