"""The explorer page's HTML, style and script (`tformer.viz.explorer` fills in __TITLE__ and __DATA__).

The page keeps its state on `document.body.dataset` (stack, layer, head, view, hover, hoverKey) and
marks each token it colours with data-given / data-received (the quantized weight, 0..255), which
tests read back. A map's queries are the tokens of #tokens; a rectangular (cross-attention) map's
keys are those of #keys, shown only then: hovering a query colours the keys it attends to, hovering
a key the queries that attend to it.
"""

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 12px; background: #fff; color: #222; }
#bar { display: flex; gap: 12px; align-items: center; margin-bottom: 8px; flex-wrap: wrap; }
#tokens, #keys { line-height: 1.9; max-height: 220px; overflow: auto; border: 1px solid #ddd; padding: 6px; }
#tokens span, #keys span { padding: 1px 2px; margin: 0 1px; border-radius: 3px; cursor: default; white-space: pre; }
#tokens span.hover, #keys span.hover { outline: 2px solid #d33; }
.cap, #note { color: #555; font-size: 12px; margin: 4px 0 2px; }
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
  <label id="stackbox" hidden>attention <select id="stack"></select></label>
  <label>view <select id="view"><option value="attn">attention</option>
    <option value="rollout">rollout</option></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span class="key"><span style="background:rgb(40,110,230)"></span> attends to (row of the hovered token)
    <span style="background:rgb(240,140,20)"></span> attended by (its column)</span>
</div>
<div id="note" hidden></div>
<div class="cap" id="qcap" hidden></div>
<div id="tokens"></div>
<div class="cap" id="kcap" hidden></div>
<div id="keys" hidden></div>
<div id="info">hover a token or a heatmap row</div>
<div id="main"><canvas id="heat"></canvas><div id="grid"></div></div>
<details id="lensbox"><summary>logit lens: top prediction of each layer at each position</summary>
  <div id="lens"></div></details>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const multi = !!D.stacks, cache = new Map(), st = document.body.dataset;
const SEQ = multi ? D.sequences : {"": D.tokens};
const STACKS = multi ? D.stacks : {"": {queries: "", keys: "", n_layers: D.n_layers, n_heads: D.n_heads,
                                         causal: D.causal !== false, rollout: true}};
const $ = (id) => document.getElementById(id);
let K, T, S, square, qspans = [], kspans = [];  // the shown stack, its query and key counts, the token spans
function map(key) {  // stored bytes, decoded on first use
  if (!cache.has(key)) {
    const s = atob(D.maps[key]), a = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    cache.set(key, a);
  }
  return cache.get(key);
}
const at = (m, q, k) => (K.causal ? (k <= q ? m[q * (q + 1) / 2 + k] : 0) : m[q * S + k]);
const prefix = () => (multi ? st.stack + "/" : "");
function currentKey() {
  return prefix() + (st.view === "rollout" ? "rollout:" + st.layer : st.layer + ":" + st.head);
}
function colour(v) {  // 0..255 -> viridis-like ramp, sqrt for visibility of small weights
  const x = Math.sqrt(v / 255);
  return [Math.round(68 + 185 * x), Math.round(1 + 230 * x), Math.round(84 + 60 * x - 110 * x * x)];
}
const LUT = [...Array(256).keys()].map(colour);
function draw(canvas, m) {
  canvas.width = S; canvas.height = T;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(S, T), px = img.data;
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < S; k++) {
      const c = LUT[at(m, q, k)], o = 4 * (q * S + k);
      px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2]; px[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}
function strip(box, tokens) {
  box.textContent = "";
  return tokens.map((t, i) => {
    const s = document.createElement("span");
    s.textContent = t; s.dataset.i = i;
    box.appendChild(s);
    return s;
  });
}
$("tokens").addEventListener("mouseover", (e) => { if (e.target.dataset.i) hover(+e.target.dataset.i); });
$("keys").addEventListener("mouseover", (e) => { if (e.target.dataset.i) hoverKey(+e.target.dataset.i); });
$("heat").addEventListener("mousemove", (e) => {
  const r = e.target.getBoundingClientRect();
  hover(Math.min(T - 1, Math.floor((e.clientY - r.top) / r.height * T)));
});
function paint(s, g, r, self) {
  if (g === undefined) delete s.dataset.given; else s.dataset.given = g;
  if (r === undefined) delete s.dataset.received; else s.dataset.received = r;
  s.classList.toggle("hover", self);
  s.style.background = g ? `rgba(40,110,230,${g / 255})` : r && !self ? `rgba(240,140,20,${r / 255})` : "";
}
function hover(i) {  // query i: the keys it attends to (and, square, the queries attending to it)
  st.hover = i; delete st.hoverKey;
  const m = map(currentKey()), qt = SEQ[K.queries], kt = SEQ[K.keys];
  if (square) qspans.forEach((s, j) => paint(s, at(m, i, j), at(m, j, i), j === i));
  else {
    qspans.forEach((s, j) => paint(s, undefined, undefined, j === i));
    kspans.forEach((s, j) => paint(s, at(m, i, j), undefined, false));
  }
  let best = 0;
  for (let j = 1; j < (K.causal ? i + 1 : S); j++) if (at(m, i, j) > at(m, i, best)) best = j;
  $("info").textContent = `token ${i} ${JSON.stringify(qt[i])} attends most to ${square ? "" : K.keys + " "}token ` +
    `${best} ${JSON.stringify(kt[best])} (${(at(m, i, best) / 255).toFixed(3)})`;
}
function hoverKey(k) {  // key k of a rectangular map: the queries that attend to it
  st.hoverKey = k; delete st.hover;
  const m = map(currentKey());
  kspans.forEach((s, j) => paint(s, undefined, undefined, j === k));
  qspans.forEach((s, q) => paint(s, undefined, at(m, q, k), false));
  let best = 0;
  for (let q = 1; q < T; q++) if (at(m, q, k) > at(m, best, k)) best = q;
  $("info").textContent = `${K.keys} token ${k} ${JSON.stringify(SEQ[K.keys][k])} is attended most by ` +
    `${K.queries} token ${best} ${JSON.stringify(SEQ[K.queries][best])} (${(at(m, best, k) / 255).toFixed(3)})`;
}
function drawGrid() {
  $("grid").innerHTML = "";
  const heads = [...Array(K.n_heads).keys()].map(String).concat(["mean"]);
  for (const h of heads) {
    const f = document.createElement("figure"), c = document.createElement("canvas");
    f.dataset.head = h; f.className = h === st.head && st.view === "attn" ? "sel" : "";
    f.appendChild(c); f.appendChild(document.createTextNode(h === "mean" ? "mean" : "head " + h));
    f.onclick = () => { $("view").value = "attn"; $("head").value = h; update(); };
    $("grid").appendChild(f);
    draw(c, map(prefix() + st.layer + ":" + h));
  }
}
function options(select, values) {
  const keep = select.value;
  select.textContent = "";
  for (const v of values) select.add(new Option(v, v));
  if (values.map(String).includes(keep)) select.value = keep;
}
function setStack() {  // the stack's selectors, token strips and captions
  st.stack = $("stack").value;
  K = STACKS[st.stack]; T = SEQ[K.queries].length; S = SEQ[K.keys].length; square = K.queries === K.keys;
  options($("layer"), [...Array(K.n_layers).keys()]);
  options($("head"), [...Array(K.n_heads).keys()].concat(["mean"]));
  $("view").options[1].disabled = !K.rollout;
  if (!K.rollout) $("view").value = "attn";
  qspans = strip($("tokens"), SEQ[K.queries]);
  kspans = square ? qspans : strip($("keys"), SEQ[K.keys]);
  $("keys").hidden = $("kcap").hidden = square;
  $("qcap").hidden = !multi;
  $("qcap").textContent = `${K.queries} tokens (queries${square ? " and keys" : ""})`;
  $("kcap").textContent = `${K.keys} tokens (keys)`;
  delete st.hover; delete st.hoverKey;
}
let gridKey = null;
function update() {
  if ($("stack").value !== st.stack) setStack();
  st.view = $("view").value; st.layer = $("layer").value; st.head = $("head").value;
  $("head").disabled = st.view === "rollout";
  draw($("heat"), map(currentKey()));
  if (gridKey !== prefix() + st.layer) { gridKey = prefix() + st.layer; drawGrid(); }
  for (const f of $("grid").children) f.className = f.dataset.head === st.head && st.view === "attn" ? "sel" : "";
  if (st.hover !== undefined) hover(+st.hover);
  if (st.hoverKey !== undefined) hoverKey(+st.hoverKey);
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
    for (let t = 0; t < D.tokens.length; t++) {
      const c = row.insertCell(), p = D.lens.final_prob[l][t], rgb = colour(255 * p);
      c.textContent = D.lens.top[l][t][0];
      c.style.background = `rgb(${rgb})`; c.style.color = p < 0.6 ? "#fff" : "#000";
      c.title = D.lens.top[l][t].map((w, k) => `${JSON.stringify(w)} ${D.lens.probs[l][t][k]}`).join("\n");
    }
  }
  $("lens").appendChild(tbl);
}
for (const name of Object.keys(STACKS)) $("stack").add(new Option(name, name));
$("stackbox").hidden = !multi;
if (D.note) { $("note").textContent = D.note; $("note").hidden = false; }
st.stack = "\u0000";  // no stack shown yet: update() sets the first
for (const id of ["stack", "view", "layer", "head"]) $(id).addEventListener("change", update);
$("lensbox").addEventListener("toggle", buildLens);
if (!D.lens) $("lensbox").hidden = true;
update();
</script></body></html>
"""
