"""The explorer page's HTML, style and script (`tformer.viz.explorer` fills in __TITLE__ and __DATA__).

The page keeps its state on `document.body.dataset` (layer, head, view, hover) and marks each token
it colours with data-given / data-received (the quantized weight, 0..255), which tests read back.
"""

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 12px; background: #fff; color: #222; }
#bar { display: flex; gap: 12px; align-items: center; margin-bottom: 8px; flex-wrap: wrap; }
#tokens { line-height: 1.9; max-height: 220px; overflow: auto; border: 1px solid #ddd; padding: 6px; }
#tokens span { padding: 1px 2px; margin: 0 1px; border-radius: 3px; cursor: default; white-space: pre; }
#tokens span.hover { outline: 2px solid #d33; }
#main { display: flex; gap: 16px; margin-top: 10px; align-items: flex-start; }
canvas { image-rendering: pixelated; border: 1px solid #ccc; }
#heat { width: 480px; height: 480px; }
#grid { display: flex; flex-wrap: wrap; gap: 6px; max-width: 420px; }
#grid figure { margin: 0; text-align: center; font-size: 11px; cursor: pointer; }
#grid canvas { display: block; width: 96px; height: 96px; }
#grid figure.sel canvas { border: 2px solid #d33; }
#info { min-height: 1.4em; margin-top: 6px; color: #555; }
#lens { overflow: auto; max-height: 300px; }
#lens td { font-size: 11px; padding: 1px 3px; white-space: pre; }
.key span { display: inline-block; width: 12px; height: 12px; vertical-align: middle; }
</style></head>
<body>
<div id="bar">
  <label>view <select id="view"><option value="attn">attention</option>
    <option value="rollout">rollout</option></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span class="key"><span style="background:rgb(40,110,230)"></span> attends to (row of the hovered token)
    <span style="background:rgb(240,140,20)"></span> attended by (its column)</span>
</div>
<div id="tokens"></div>
<div id="info">hover a token or a heatmap row</div>
<div id="main"><canvas id="heat"></canvas><div id="grid"></div></div>
<details id="lensbox"><summary>logit lens: top prediction of each layer at each position</summary>
  <div id="lens"></div></details>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const T = D.tokens.length, cache = new Map(), st = document.body.dataset;
const $ = (id) => document.getElementById(id);
function map(key) {  // lower triangle bytes, decoded on first use
  if (!cache.has(key)) {
    const s = atob(D.maps[key]), a = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    cache.set(key, a);
  }
  return cache.get(key);
}
const at = (m, q, k) => (k <= q ? m[q * (q + 1) / 2 + k] : 0);
function currentKey() {
  return st.view === "rollout" ? "rollout:" + st.layer : st.layer + ":" + st.head;
}
function colour(v) {  // 0..255 -> viridis-like ramp, sqrt for visibility of small weights
  const x = Math.sqrt(v / 255);
  return [Math.round(68 + 185 * x), Math.round(1 + 230 * x), Math.round(84 + 60 * x - 110 * x * x)];
}
const LUT = [...Array(256).keys()].map(colour);
function draw(canvas, m) {
  canvas.width = T; canvas.height = T;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(T, T), px = img.data;
  for (let q = 0; q < T; q++) {
    const base = q * (q + 1) / 2;
    for (let k = 0; k < T; k++) {
      const c = LUT[k <= q ? m[base + k] : 0], o = 4 * (q * T + k);
      px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2]; px[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}
const spans = D.tokens.map((t, i) => {
  const s = document.createElement("span");
  s.textContent = t; s.dataset.i = i;
  $("tokens").appendChild(s);
  return s;
});
$("tokens").addEventListener("mouseover", (e) => { if (e.target.dataset.i) hover(+e.target.dataset.i); });
$("heat").addEventListener("mousemove", (e) => {
  const r = e.target.getBoundingClientRect();
  hover(Math.min(T - 1, Math.floor((e.clientY - r.top) / r.height * T)));
});
function hover(i) {
  st.hover = i;
  const m = map(currentKey());
  spans.forEach((s, j) => {
    const g = at(m, i, j), r = at(m, j, i);
    s.dataset.given = g; s.dataset.received = r;
    s.classList.toggle("hover", j === i);
    s.style.background = g ? `rgba(40,110,230,${g / 255})` : r && j !== i ? `rgba(240,140,20,${r / 255})` : "";
  });
  let best = 0;
  for (let j = 1; j <= i; j++) if (at(m, i, j) > at(m, i, best)) best = j;
  $("info").textContent = `token ${i} ${JSON.stringify(D.tokens[i])} attends most to token ${best} ` +
    `${JSON.stringify(D.tokens[best])} (${(at(m, i, best) / 255).toFixed(3)})`;
}
function drawGrid() {
  $("grid").innerHTML = "";
  const heads = [...Array(D.n_heads).keys()].map(String).concat(["mean"]);
  for (const h of heads) {
    const f = document.createElement("figure"), c = document.createElement("canvas");
    f.dataset.head = h; f.className = h === st.head && st.view === "attn" ? "sel" : "";
    f.appendChild(c); f.appendChild(document.createTextNode(h === "mean" ? "mean" : "head " + h));
    f.onclick = () => { $("view").value = "attn"; $("head").value = h; update(); };
    $("grid").appendChild(f);
    draw(c, map(st.layer + ":" + h));
  }
}
let gridLayer = null;
function update() {
  st.view = $("view").value; st.layer = $("layer").value; st.head = $("head").value;
  $("head").disabled = st.view === "rollout";
  draw($("heat"), map(currentKey()));
  if (gridLayer !== st.layer) { gridLayer = st.layer; drawGrid(); }
  for (const f of $("grid").children) f.className = f.dataset.head === st.head && st.view === "attn" ? "sel" : "";
  if (st.hover !== undefined) hover(+st.hover);
  st.ready = "1";
}
function buildLens() {
  if (!D.lens || $("lens").firstChild) return;
  const tbl = document.createElement("table");
  const head = tbl.insertRow();
  head.insertCell().textContent = "layer";
  D.tokens.forEach((t) => { head.insertCell().textContent = t; });
  for (let l = D.n_layers - 1; l >= 0; l--) {
    const row = tbl.insertRow();
    row.insertCell().textContent = l;
    for (let t = 0; t < T; t++) {
      const c = row.insertCell(), p = D.lens.final_prob[l][t], rgb = colour(255 * p);
      c.textContent = D.lens.top[l][t][0];
      c.style.background = `rgb(${rgb})`; c.style.color = p < 0.6 ? "#fff" : "#000";
      c.title = D.lens.top[l][t].map((w, k) => `${JSON.stringify(w)} ${D.lens.probs[l][t][k]}`).join("\n");
    }
  }
  $("lens").appendChild(tbl);
}
for (let l = 0; l < D.n_layers; l++) $("layer").add(new Option(l, l));
for (let h = 0; h < D.n_heads; h++) $("head").add(new Option(h, h));
$("head").add(new Option("mean", "mean"));
for (const id of ["view", "layer", "head"]) $(id).addEventListener("change", update);
$("lensbox").addEventListener("toggle", buildLens);
if (!D.lens) $("lensbox").hidden = true;
update();
</script></body></html>
"""
