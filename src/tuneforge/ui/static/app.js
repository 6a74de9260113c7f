// tuneforge ui: the pages, drawn from the JSON API (/api/...). Plain JavaScript, no libraries.
// Everything a run folder holds is shown as text (textContent), never as HTML.
"use strict";

const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#0c8599", "#e8590c", "#5c7cfa", "#868e96"];
const main = document.getElementById("main");
let timers = [];

function el(tag, attrs, ...children) {
  const node = tag === "svg" || tag in SVG_TAGS
    ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const SVG_TAGS = { polyline: 1, line: 1, text: 1, g: 1, rect: 1, circle: 1, path: 1 };
// replaceChildren without the null / false that conditional parts leave
const fill = (node, ...kids) => node.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) { const e = new Error(data.error || `HTTP ${r.status}`); e.data = data; throw e; }
  return data;
}

// an axis label: as many digits as the axis' span needs
function tick(v, span) {
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
  const digits = Math.max(0, Math.min(8, Math.ceil(-Math.log10(span / 4)) + 1));
  return v.toFixed(digits);
}

function fmt(x, digits = 4) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  if (Math.abs(x) >= 1000) return x.toFixed(0);
  return Number(x.toPrecision(digits)).toString();
}
const runUrl = (id) => `/run/${id.split("/").map(encodeURIComponent).join("/")}`;
const apiPath = (prefix, id) => `${prefix}/${id.split("/").map(encodeURIComponent).join("/")}`;
const badge = (status) => el("span", { class: `badge ${String(status).replace(" ", "-")}`, text: status });

// -- charts --------------------------------------------------------------------------------------
// series: [{name, color, points: [[x, y]...], dashed}]
function lineChart(id, title, series, opts = {}) {
  const W = 640, H = 260, L = 64, R = 12, T = 10, B = 30;
  const all = series.flatMap((s) => s.points);
  const wrap = el("div", { class: "chart card", id });
  wrap.append(el("div", { class: "title", text: title }));
  if (!all.length) {
    wrap.append(el("p", { class: "muted", text: opts.empty || "no points yet" }));
    return wrap;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4, x = x0 + ((x1 - x0) * i) / 4;
    svg.append(el("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eceff3" }));
    svg.append(el("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", "font-size": 11, fill: "#68707c", text: tick(y, y1 - y0) }));
    svg.append(el("text", { x: sx(x), y: H - 10, "text-anchor": "middle", "font-size": 11, fill: "#68707c", text: fmt(Math.round(x)) }));
  }
  svg.append(el("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#9aa3ae" }));
  svg.append(el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9aa3ae" }));
  const legend = el("div", { class: "legend" });
  for (const s of series) {
    if (!s.points.length) continue;
    const pts = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg.append(el("polyline", {
      points: pts, fill: "none", stroke: s.color, "stroke-width": 2,
      "stroke-dasharray": s.dashed ? "6 4" : null, "data-series": s.name, "data-count": s.points.length,
    }));
    if (s.points.length === 1) {
      const [p] = s.points;
      svg.append(el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color }));
    }
    legend.append(el("span", {}, el("i", { style: `background:${s.color}` }), s.name));
  }
  wrap.append(svg, legend);
  return wrap;
}

const pointsOf = (records, key) =>
  records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);

// -- pages ---------------------------------------------------------------------------------------
function setPage(page) {
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
  }
}
// fn again ms after each call ends (never two at once on a slow server), until the page changes
let pageGen = 0;
function every(ms, fn) {
  const gen = pageGen;
  const tick = async () => {
    try { await fn(); } finally { if (gen === pageGen) timers.push(setTimeout(tick, ms)); }
  };
  timers.push(setTimeout(tick, ms));
}

async function runsPage() {
  setPage("");
  const table = el("table", { id: "runs-table" },
    el("thead", {}, el("tr", {}, ["", "run", "status", "model", "method", "objective", "steps",
      "best eval loss", "eval metric", "tokens/s", "started"].map((h) => el("th", { text: h })))),
    el("tbody"));
  const compare = el("button", { id: "compare-selected", disabled: true, onclick: () => {
    const ids = [...table.querySelectorAll("input:checked")].map((c) => c.value);
    location.href = "/compare?" + ids.map((i) => "run=" + encodeURIComponent(i)).join("&");
  } }, "Compare selected");
  fill(main, el("h1", { text: "Runs" }),
    el("div", { class: "actions" }, compare, el("a", { class: "button secondary", href: "/launch" }, "Launch a run")),
    table, el("p", { id: "runs-empty", class: "muted" }));
  const selected = new Set();
  async function refresh() {
    const data = await api("/api/runs");
    document.getElementById("root").textContent = data.root;
    const body = table.querySelector("tbody");
    fill(body, ...data.runs.map((r) => {
      const box = el("input", { type: "checkbox", value: r.id, checked: selected.has(r.id), onchange: (e) => {
        e.target.checked ? selected.add(r.id) : selected.delete(r.id);
        compare.disabled = selected.size < 2;
      } });
      const ev = r.eval ? `${r.eval.name} ${fmt(r.eval.value)}` + (r.eval.base !== null && r.eval.base !== undefined ? ` (base ${fmt(r.eval.base)})` : "") : "–";
      return el("tr", { "data-run": r.id },
        el("td", {}, box), el("td", {}, el("a", { href: runUrl(r.id), text: r.id })),
        el("td", {}, badge(r.status)), el("td", { text: r.model || "–" }), el("td", { text: r.method || "–" }),
        el("td", { text: r.objective || "–" }),
        el("td", { class: "num", text: r.step === undefined ? "–" : `${r.step}${r.total_steps ? " / " + r.total_steps : ""}` }),
        el("td", { class: "num", text: fmt(r.best_eval_loss) }), el("td", { text: ev }),
        el("td", { class: "num", text: fmt(r.tokens_per_s) }), el("td", { text: r.started || "–" }));
    }));
    document.getElementById("runs-empty").textContent = data.runs.length ? "" :
      `No runs under ${data.root} yet: launch one, or start tuneforge train with output_dir there.`;
  }
  await refresh();
  every(3000, refresh);
}

async function runPage(id) {
  setPage("");
  const records = [];
  let next = 0, detail = null;
  const charts = el("div", { class: "charts" });
  const head = el("div");
  const body = el("div");
  fill(main, head, charts, body);

  function drawCharts() {
    fill(charts, 
      lineChart("loss-chart", "Loss", [
        { name: "loss", color: COLORS[0], points: pointsOf(records, "loss") },
        { name: "eval_loss", color: COLORS[1], points: pointsOf(records, "eval_loss"), dashed: true },
      ]),
      lineChart("lr-chart", "Learning rate", [{ name: "lr", color: COLORS[2], points: pointsOf(records, "lr") }]));
  }
  function drawDetail(d) {
    const running = d.status === "running" || d.status === "starting";
    const act = async (what) => {
      try { await api(apiPath(`/api/${what}`, id), {}); setTimeout(refresh, 300); }
      catch (e) { actionError.textContent = e.message; }
    };
    const actionError = el("span", { class: "error", id: "action-error" });
    const canResume = !running && (d.checkpoints || []).length > 0 && ["stopped", "crashed", "unknown"].includes(d.status);
    const done = d.status === "finished" || d.status === "stopped early";
    fill(head, 
      el("h1", {}, id, " ", badge(d.status)),
      el("div", { class: "actions" },
        el("button", { id: "stop", class: "danger", disabled: !running, onclick: () => act("stop") }, "Stop"),
        el("button", { id: "resume", class: "secondary", disabled: !canResume, onclick: () => act("resume") }, "Resume"),
        el("button", { id: "evaluate", class: "secondary", disabled: !done, onclick: () => act("evaluate") }, "Evaluate"),
        done ? el("a", { class: "button secondary", id: "chat-link", href: `/chat/${runUrl(id).slice(5)}` }, "Chat") : null,
        actionError),
      d.error ? el("p", { class: "error", text: d.error }) : null);
    const s = d.summary || {};
    const numbers = [["model", d.model], ["method", d.method], ["objective", d.objective],
      ["steps", d.step === undefined ? null : `${d.step}${d.total_steps ? " / " + d.total_steps : ""}`],
      ["best eval loss", d.best_eval_loss], ["best step", s.best_step], ["tokens/s", d.tokens_per_s],
      ["trainable parameters", s.trainable_parameters], ["started", d.started], ["finished", s.finished_at]];
    if (d.eval) numbers.push([`eval: ${d.eval.name}`, `${fmt(d.eval.value)} (base zero-shot ${fmt(d.eval.base)})`]);
    fill(body, 
      el("div", { class: "grid2" },
        el("div", { class: "card" }, el("h2", { text: "Summary" }),
          el("dl", { class: "kv", id: "summary" }, numbers.filter((n) => n[1] !== null && n[1] !== undefined)
            .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: fmt(v) })])),
          d.eval_verdict ? el("p", { text: typeof d.eval_verdict === "string" ? d.eval_verdict : (d.eval_verdict.text || "") }) : null,
          (d.advice || []).length ? el("ul", {}, d.advice.map((a) => el("li", { text: a }))) : null),
        el("div", { class: "card" }, el("h2", { text: "Config" }), el("pre", { id: "config", text: d.config_text || "" }))),
      d.report ? el("div", { class: "card" }, el("h2", {}, "Evaluation report ", el("a", { href: d.report, target: "_blank" }, "(open)")),
        el("iframe", { class: "report", src: d.report, title: "evaluation report", sandbox: "" })) : null,
      d.log ? el("div", { class: "card" }, el("h2", { text: "Log" }), el("pre", { id: "log", text: d.log })) : null);
  }
  async function refresh() {
    try {
      const m = await api(`${apiPath("/api/metrics", id)}?since=${next}`);
      if (m.reset) records.length = 0;  // metrics.jsonl was cut back to a checkpoint (resume)
      records.push(...m.records); next = m.next;
      if (m.records.length || !detail) drawCharts();
      const d = await api(apiPath("/api/run", id));
      const key = JSON.stringify(d);
      if (key !== detail) { detail = key; drawDetail(d); }
    } catch (e) { fill(head, el("p", { class: "error", text: e.message })); }
  }
  await refresh();
  every(1500, refresh);
}

async function comparePage() {
  setPage("compare");
  const ids = new URLSearchParams(location.search).getAll("run");
  if (ids.length < 2) {
    const data = await api("/api/runs");
    const pick = el("div", { class: "card" }, el("p", { text: "Pick two or more runs:" }),
      data.runs.map((r) => el("label", { style: "display:block" }, el("input", { type: "checkbox", value: r.id }), " ", r.id)),
      el("button", { onclick: () => {
        const chosen = [...pick.querySelectorAll("input:checked")].map((c) => "run=" + encodeURIComponent(c.value));
        location.href = "/compare?" + chosen.join("&");
      } }, "Compare"));
    fill(main, el("h1", { text: "Compare" }), pick);
    return;
  }
  const qs = ids.map((i) => "run=" + encodeURIComponent(i)).join("&");
  let data;
  try { data = await api(`/api/compare?${qs}`); }
  catch (e) { fill(main, el("h1", { text: "Compare" }), el("p", { class: "error", text: e.message })); return; }
  const color = (i) => COLORS[i % COLORS.length];
  const train = ids.map((id, i) => ({ name: id, color: color(i), points: pointsOf(data.curves[id], "loss") }));
  const evals = ids.map((id, i) => ({ name: id, color: color(i), points: pointsOf(data.curves[id], "eval_loss"), dashed: true }));
  const metricRows = [["status", (r) => r.status], ["steps", (r) => r.step], ["best eval loss", (r) => r.best_eval_loss],
    ["eval metric", (r) => (r.eval ? `${r.eval.name} ${fmt(r.eval.value)}` : null)], ["tokens/s", (r) => r.tokens_per_s]];
  const differ = new Set(data.differ);
  let showAll = false;
  const settings = el("tbody");
  function drawSettings() {
    const keys = Object.keys(data.settings).filter((k) => showAll || differ.has(k));
    fill(settings, ...keys.map((k) => el("tr", { class: differ.has(k) ? "differ" : null, "data-key": k },
      el("td", { text: k }), data.settings[k].map((v) => el("td", { text: typeof v === "object" && v !== null ? JSON.stringify(v) : fmt(v) })))));
  }
  const heads = el("tr", {}, el("th", { text: "" }), ids.map((id, i) => el("th", {}, el("i", { style: `display:inline-block;width:10px;height:10px;background:${color(i)};margin-right:6px` }), el("a", { href: runUrl(id), text: id }))));
  fill(main, el("h1", { text: `Compare ${ids.length} runs` }),
    el("div", { class: "charts" }, lineChart("compare-train", "Training loss", train), lineChart("compare-eval", "Eval loss", evals)),
    el("h2", { text: "Numbers" }),
    el("table", { id: "compare-metrics" }, el("thead", {}, heads.cloneNode(true)), el("tbody", {},
      metricRows.map(([name, get]) => el("tr", {}, el("td", { text: name }), data.runs.map((r) => el("td", { class: "num", text: fmt(get(r)) })))))),
    el("h2", {}, `Settings (${data.differ.length} differ) `,
      el("label", { class: "muted", style: "font-weight:normal" }, el("input", { type: "checkbox", onchange: (e) => { showAll = e.target.checked; drawSettings(); } }), " show all")),
    el("table", { id: "compare-settings" }, el("thead", {}, heads), settings));
  drawSettings();
}

async function launchPage() {
  setPage("launch");
  const form = await api("/api/form");
  const yamlBox = el("textarea", { id: "yaml", spellcheck: "false" });
  yamlBox.value = form.template;
  const yamlError = el("div", { id: "yaml-error" });
  const status = el("span", { id: "check-status" });
  const launch = el("button", { id: "launch", disabled: true }, "Launch");
  const inputs = {};
  const fields = el("div", { class: "form card" }, form.fields.map((f) => {
    const input = f.choices
      ? el("select", { "data-key": f.key }, el("option", { value: "", text: "(default)" }), f.choices.map((c) => el("option", { value: c, text: c })))
      : el("input", { "data-key": f.key, name: f.key });
    inputs[f.key] = input;
    input.addEventListener("change", () => setField(f.key, input.value));
    return el("div", {}, el("label", { text: f.key }), input, el("div", { class: "help", text: f.help }),
      el("div", { class: "field-error", "data-key": f.key }));
  }));
  async function fillForm() {  // the form shows what the YAML says (the server parses it)
    const flat = (await api("/api/parse", { yaml: yamlBox.value })).values;
    if (!flat) return;
    for (const [k, input] of Object.entries(inputs)) {
      const v = flat[k];
      if (document.activeElement !== input) input.value = v === undefined || v === null ? "" : String(v);
    }
  }
  async function setField(key, value) {
    try { yamlBox.value = (await api("/api/form", { yaml: yamlBox.value, set: { [key]: value } })).yaml; }
    catch (e) { showError(e); return; }
    check();
  }
  function showError(e) {
    for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
    const field = e.data && e.data.field;
    const spot = field && document.querySelector(`.field-error[data-key="${CSS.escape(field)}"]`);
    if (spot) spot.textContent = e.message;
    yamlError.textContent = e.message;
    yamlBox.classList.add("bad");
    status.textContent = "";
    launch.disabled = true;
  }
  let pending = 0;
  async function check() {
    const mine = ++pending;
    await fillForm();
    status.textContent = "checking…";
    try {
      const r = await api("/api/validate", { yaml: yamlBox.value });
      if (mine !== pending) return;
      for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
      yamlError.textContent = ""; yamlBox.classList.remove("bad");
      fill(status, el("span", { class: "ok", text: `ready: the run goes to ${r.run}` }));
      launch.disabled = false;
    } catch (e) { if (mine === pending) showError(e); }
  }
  let timer = null;
  yamlBox.addEventListener("input", () => { clearTimeout(timer); launch.disabled = true; timer = setTimeout(check, 400); });
  launch.addEventListener("click", async () => {
    launch.disabled = true;
    try { const job = await api("/api/launch", { yaml: yamlBox.value }); location.href = runUrl(job.run); }
    catch (e) { showError(e); }
  });
  fill(main, el("h1", { text: "Launch a run" }),
    el("p", { class: "muted", text: "Edit the common settings in the form or any key in the YAML; both are checked as tuneforge train checks them. Relative paths are relative to the folder tuneforge ui started in." }),
    el("div", { class: "grid2" }, fields, el("div", {}, el("div", { class: "card" }, yamlBox, yamlError,
      el("div", { class: "actions" }, launch, status)))));
  check();
}

async function chatPage(id) {
  setPage("");
  const history = [];
  const box = el("div", { id: "messages", class: "card" });
  const input = el("textarea", { id: "prompt", placeholder: "Message (Enter sends, Shift+Enter for a new line)" });
  const base = el("input", { type: "checkbox", id: "base" });
  const send = el("button", { id: "send" }, "Send");
  const note = el("span", { class: "muted", id: "chat-status" });
  async function go() {
    const text = input.value.trim();
    if (!text) return;
    history.push({ role: "user", content: text });
    box.append(el("div", { class: "msg user" }, el("span", { class: "who", text: "you" }), text));
    input.value = ""; send.disabled = true; note.textContent = "generating… (the first message loads the model)";
    try {
      const r = await api(apiPath("/api/chat", id), { messages: history, base: base.checked });
      history.push({ role: "assistant", content: r.reply });
      box.append(el("div", { class: "msg assistant" }, el("span", { class: "who", text: r.model }), r.reply));
      note.textContent = r.finish_reason === "length" ? "(stopped at the token limit)" : "";
    } catch (e) { history.pop(); fill(note, el("span", { class: "error", text: e.message })); }
    send.disabled = false;
  }
  send.addEventListener("click", go);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); go(); } });
  fill(main, el("h1", {}, "Chat with ", el("a", { href: runUrl(id), text: id })),
    el("div", { class: "actions" }, el("label", {}, base, " base model (adapter off)"),
      el("button", { class: "secondary", onclick: () => { history.length = 0; box.replaceChildren(); } }, "New conversation")),
    box, el("div", { class: "chatbox" }, input, send), note);
}

function route() {
  pageGen++; timers.forEach(clearTimeout); timers = [];
  const path = decodeURIComponent(location.pathname);
  const [, page, ...rest] = path.split("/");
  const id = rest.join("/");
  const pages = { "": runsPage, run: () => runPage(id), compare: comparePage, launch: launchPage, chat: () => chatPage(id) };
  (pages[page] || runsPage)().catch((e) => fill(main, el("p", { class: "error", text: e.message })));
}
route();
