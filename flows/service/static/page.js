// The operator page of the defectops inference service (flows/service/page.py). Plain DOM, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const lineSel = $("#line"), aliasSel = $("#alias"), tokenInput = $("#token");

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const isJson = (response.headers.get("content-type") || "").includes("application/json");
  const body = isJson ? await response.json() : null;
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function authHeaders() {
  const token = tokenInput.value.trim();
  if (!token) throw new Error("enter the service token (top right) to give feedback");
  return { "Authorization": `Bearer ${token}`, "Content-Type": "application/json" };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function loadLines() {
  const { lines } = await api("/v1/lines");
  lineSel.replaceChildren(...Object.keys(lines).map((name) => el("option", { value: name }, name)));
  showModel(lines);
}

function showModel(lines) {
  const info = (lines[lineSel.value] || {})[aliasSel.value];
  $("#model-info").textContent = info && info.version ? `${info.name} version ${info.version}` : "";
}

function figure(caption, png) {
  return el("figure", {}, el("img", { src: `data:image/png;base64,${png}`, alt: caption }), el("figcaption", {}, caption));
}

function renderResult(r) {
  const score = r.normalised_score === null ? "n/a" : r.normalised_score.toFixed(3);
  const card = el("article", { class: `result ${r.decision}`, "data-decision-id": String(r.decision_id) },
    el("h3", {}, `${r.image} `, el("span", { class: `badge ${r.decision}` }, r.decision)),
    el("p", {}, `normalised score ${score} (raw ${r.score.toPrecision(4)}, threshold `
      + `${r.threshold === null ? "none" : r.threshold.toPrecision(4)}); ${r.model.name} version `
      + `${r.model.version}; ${r.latency_ms.toFixed(1)} ms`),
    el("div", { class: "views" }, figure("image", r.input_png), figure("heatmap", r.heatmap_png),
      figure("outlined regions", r.overlay_png)));
  card.querySelector("p").classList.add("score");
  return card;
}

async function scoreFiles(files) {
  if (!files.length) return;
  showError("");
  const form = new FormData();
  for (const file of files) form.append("image", file, file.name);
  const url = `/v1/lines/${encodeURIComponent(lineSel.value)}/score?alias=${aliasSel.value}&views=true`;
  try {
    const { results } = await api(url, { method: "POST", body: form });
    $("#results").prepend(...results.map(renderResult));
  } catch (err) {
    showError(err.message);
  }
  await loadRecent();
}

async function sendFeedback(decisionId, label) {
  try {
    await api(`/v1/decisions/${decisionId}/feedback`, { method: "POST", headers: authHeaders(),
      body: JSON.stringify({ label }) });
    showError("");
  } catch (err) {
    showError(err.message);
  }
  await Promise.all([loadRecent(), loadReview()]);
}

async function loadRecent() {
  const { decisions } = await api(`/v1/decisions?line=${encodeURIComponent(lineSel.value)}&limit=30`);
  $("#recent tbody").replaceChildren(...decisions.map((d) => {
    const fa = el("button", { type: "button", class: "false-alarm" }, "false alarm");
    const md = el("button", { type: "button", class: "missed-defect" }, "missed defect");
    fa.onclick = () => sendFeedback(d.id, "false_alarm");
    md.onclick = () => sendFeedback(d.id, "missed_defect");
    const score = d.normalised_score === null ? "n/a" : d.normalised_score.toFixed(3);
    return el("tr", { "data-decision-id": String(d.id) }, el("td", {}, String(d.id)), el("td", {}, d.time),
      el("td", {}, d.image_name || ""), el("td", {}, d.model_version), el("td", {}, score),
      el("td", {}, el("span", { class: `badge ${d.decision}` }, d.decision)),
      el("td", { class: "feedback" }, d.feedback ? `${d.feedback} (${d.feedback_state})` : ""), el("td", {}, fa, " ", md));
  }));
}

async function review(feedbackId, verdict) {
  try {
    await api(`/v1/feedback/${feedbackId}/review`, { method: "POST", headers: authHeaders(),
      body: JSON.stringify({ verdict }) });
    showError("");
  } catch (err) {
    showError(err.message);
  }
  await Promise.all([loadRecent(), loadReview()]);
}

async function loadReview() {
  const { feedback } = await api(`/v1/feedback?line=${encodeURIComponent(lineSel.value)}`);
  $("#review tbody").replaceChildren(...feedback.map((f) => {
    const ok = el("button", { type: "button", class: "accept" }, "accept");
    const no = el("button", { type: "button", class: "reject" }, "reject");
    ok.onclick = () => review(f.id, "accepted");
    no.onclick = () => review(f.id, "rejected");
    return el("tr", { "data-feedback-id": String(f.id) }, el("td", {}, String(f.id)), el("td", {}, String(f.decision_id)),
      el("td", {}, f.label), el("td", { class: "state" }, f.exported_path ? "exported" : f.state),
      el("td", {}, f.exported_path ? "" : ok, " ", f.exported_path ? "" : no));
  }));
}

async function exportFalseAlarms() {
  try {
    const out = await api(`/v1/lines/${encodeURIComponent(lineSel.value)}/export-false-alarms`,
      { method: "POST", headers: authHeaders() });
    $("#export-result").textContent = `exported ${out.exported.length} image(s)`
      + (out.skipped.length ? `; skipped: ${out.skipped.join("; ")}` : "");
    showError("");
  } catch (err) {
    showError(err.message);
  }
  await loadReview();
}

function setUp() {
  const drop = $("#drop");
  tokenInput.value = sessionStorage.getItem("defectops-token") || "";
  tokenInput.onchange = () => sessionStorage.setItem("defectops-token", tokenInput.value.trim());
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    scoreFiles([...e.dataTransfer.files]);
  });
  $("#files").onchange = (e) => { scoreFiles([...e.target.files]); e.target.value = ""; };
  $("#refresh").onclick = () => { loadRecent(); loadReview(); };
  $("#export").onclick = exportFalseAlarms;
  lineSel.onchange = aliasSel.onchange = async () => {
    showModel((await api("/v1/lines")).lines);
    await Promise.all([loadRecent(), loadReview()]);
  };
  loadLines().then(() => Promise.all([loadRecent(), loadReview()])).catch((err) => showError(err.message));
}

setUp();
