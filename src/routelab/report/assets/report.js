// report.html's interactive parts: the sortable, filterable comparison table, the quality-vs-cost plot and
// the token-level routing explorer. Plain DOM code, no network: the data is the page's embedded JSON
// (#report-data) and, per explorer run, a script beside the page (explorer/<n>.js) added on demand.
// Dataset text is only ever set through textContent, never parsed as HTML.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const data = JSON.parse(document.getElementById("report-data").textContent);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    return String(Number(Number(value).toPrecision(digits || 4)));  // 3100, not 3.10e+3
  }

  // ---- comparison table -------------------------------------------------------------------------------

  // The number a cell starts with ("3.1 [2.9, 3.3]" -> 3.1, "1,234" -> 1234), NaN for "–" or text.
  function leadingNumber(text) {
    const match = text.trim().match(/^[-+]?(\d[\d,]*)?\.?\d+(e[-+]?\d+)?/i);
    return match ? parseFloat(match[0].replace(/,/g, "")) : NaN;
  }

  function setUpTable() {
    const table = document.querySelector("table.comparison");
    if (!table) return;
    const headers = [...table.tHead.rows[0].cells];
    const body = table.tBodies[0];
    const rows = [...body.rows];
    const datasetColumn = headers.findIndex((th) => th.textContent.trim() === "dataset");
    const filter = document.getElementById("table-filter");
    const datasetSelect = document.getElementById("table-dataset");
    const count = document.getElementById("table-count");
    const datasets = [...new Set(rows.map((row) => row.cells[datasetColumn].textContent.trim()))].sort();
    for (const name of datasets) datasetSelect.appendChild(el("option", { value: name }, name));

    function applyFilter() {
      const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      const dataset = datasetSelect.value;
      let shown = 0;
      for (const row of rows) {
        const text = row.textContent.toLowerCase();
        const visible = words.every((word) => text.includes(word)) &&
          (!dataset || row.cells[datasetColumn].textContent.trim() === dataset);
        row.hidden = !visible;
        shown += visible ? 1 : 0;
      }
      count.textContent = `${shown} of ${rows.length} runs`;
    }

    function sortBy(column) {
      const header = headers[column];
      const descending = header.getAttribute("aria-sort") === "ascending";
      const cells = rows.map((row) => row.cells[column].textContent.trim());
      const present = cells.filter((text) => text !== "–" && text !== "");
      const numeric = present.length > 0 && present.every((text) => !isNaN(leadingNumber(text)));
      const order = rows.map((row, i) => i);
      order.sort((a, b) => {
        const x = cells[a], y = cells[b];
        const missingX = x === "–" || x === "", missingY = y === "–" || y === "";
        if (missingX || missingY) return missingX - missingY; // missing values last in either direction
        const sign = descending ? -1 : 1;
        if (numeric) return sign * (leadingNumber(x) - leadingNumber(y)) || a - b;
        return sign * x.localeCompare(y, undefined, { numeric: true }) || a - b;
      });
      for (const th of headers) th.removeAttribute("aria-sort");
      header.setAttribute("aria-sort", descending ? "descending" : "ascending");
      for (const i of order) body.appendChild(rows[i]);
    }

    headers.forEach((th, column) => {
      th.title = "click to sort";
      th.addEventListener("click", () => sortBy(column));
    });
    filter.addEventListener("input", applyFilter);
    datasetSelect.addEventListener("change", applyFilter);
    applyFilter();
  }

  // ---- quality vs cost --------------------------------------------------------------------------------

  const COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
                   "#1f78b4", "#b2df8a", "#fb9a99", "#cab2d6"];

  function niceTicks(low, high, count) {
    const span = high - low || Math.abs(high) || 1;
    const step0 = span / count;
    const magnitude = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= step0);
    const ticks = [];
    for (let t = Math.ceil(low / step) * step; t <= high + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }

  function pointDetails(point) {
    const lines = [
      `${point.routing} · ${point.dataset}`,
      `method: ${point.method}`,
      `params: ${point.params || "–"}`,
      `${point.metric} (${point.higher ? "↑" : "↓"}): ${fmt(point.quality)} [${fmt(point.low)}, ${fmt(point.high)}]`,
      `experts per token and layer: ${fmt(point.experts_mean, 3)}`,
      `active expert FLOPs per token: ${fmt(point.flops, 3)}`,
      `FLOPs vs baseline (${data.baseline}): ${fmt(point.flops_vs_baseline, 3)}`,
    ];
    if (point.baseline) lines.push("the baseline");
    return lines;
  }

  function drawPlot() {
    const holder = document.getElementById("cost-plot");
    if (!holder) return;
    const select = document.getElementById("plot-dataset");
    const tooltip = document.getElementById("plot-tooltip");
    const points = data.plot.points.filter((p) => isFinite(p.quality) && isFinite(p.flops));
    const datasets = [...new Set(points.map((p) => p.dataset))].sort();
    const methods = [...new Set(data.plot.points.map((p) => p.method))].sort();
    const colour = (method) => COLOURS[methods.indexOf(method) % COLOURS.length];
    for (const name of datasets) select.appendChild(el("option", { value: name }, name));

    function draw() {
      holder.replaceChildren();
      const shown = points.filter((p) => p.dataset === select.value);
      if (!shown.length) {
        holder.appendChild(el("p", { class: "caption" }, "No run of this dataset has both quality and FLOPs."));
        return;
      }
      const W = 760, H = 440, left = 70, right = 170, top = 20, bottom = 50;
      const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                                 "aria-label": `quality against active expert FLOPs per token, ${select.value}` });
      const xs = shown.map((p) => p.flops);
      const ys = shown.flatMap((p) => [p.quality, p.low, p.high].filter(isFinite));
      const pad = (lo, hi) => { const d = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 1; return [lo - d, hi + d]; };
      const [x0, x1] = pad(Math.min(...xs), Math.max(...xs));
      const [y0, y1] = pad(Math.min(...ys), Math.max(...ys));
      const sx = (x) => left + (x - x0) / (x1 - x0) * (W - left - right);
      const sy = (y) => H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom);
      for (const t of niceTicks(x0, x1, 6)) {
        svg.appendChild(svgEl("line", { x1: sx(t), x2: sx(t), y1: top, y2: H - bottom, stroke: "#eee" }));
        svg.appendChild(svgEl("text", { x: sx(t), y: H - bottom + 16, "text-anchor": "middle" }, fmt(t, 3)));
      }
      for (const t of niceTicks(y0, y1, 6)) {
        svg.appendChild(svgEl("line", { x1: left, x2: W - right, y1: sy(t), y2: sy(t), stroke: "#eee" }));
        svg.appendChild(svgEl("text", { x: left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t, 4)));
      }
      svg.appendChild(svgEl("rect", { x: left, y: top, width: W - left - right, height: H - top - bottom,
                                      fill: "none", stroke: "#999" }));
      svg.appendChild(svgEl("text", { x: (left + W - right) / 2, y: H - 10, "text-anchor": "middle" },
                            data.plot.x_label));
      const metric = shown[0];
      svg.appendChild(svgEl("text", { transform: `translate(16 ${(top + H - bottom) / 2}) rotate(-90)`,
                                      "text-anchor": "middle" },
                            `${metric.metric} (${metric.higher ? "↑ higher" : "↓ lower"} is better)`));
      for (const point of shown) {
        if (isFinite(point.low) && isFinite(point.high)) {
          svg.appendChild(svgEl("line", { x1: sx(point.flops), x2: sx(point.flops), y1: sy(point.low),
                                          y2: sy(point.high), stroke: colour(point.method), "stroke-width": 1.5 }));
        }
      }
      // the ringed baseline first, so a run drawn over it can still be hovered
      for (const point of [...shown].sort((a, b) => b.baseline - a.baseline)) {
        const dot = svgEl("circle", { cx: sx(point.flops), cy: sy(point.quality), r: point.baseline ? 7 : 5.5,
                                      fill: colour(point.method), class: "point" + (point.baseline ? " baseline" : ""),
                                      "data-routing": point.routing, tabindex: 0 });
        const show = () => {
          tooltip.replaceChildren(...pointDetails(point).map((line) => el("div", {}, line)));
          tooltip.hidden = false;
          const box = holder.getBoundingClientRect(), at = dot.getBoundingClientRect();
          tooltip.style.left = `${at.right - box.left + 10}px`;
          tooltip.style.top = `${at.top - box.top - 10}px`;
          dot.classList.add("active");
        };
        const hide = () => { tooltip.hidden = true; dot.classList.remove("active"); };
        dot.addEventListener("mouseenter", show);
        dot.addEventListener("focus", show);
        dot.addEventListener("mouseleave", hide);
        dot.addEventListener("blur", hide);
        svg.appendChild(dot);
      }
      methods.filter((m) => shown.some((p) => p.method === m)).forEach((method, i) => {
        const y = top + 14 + i * 18;
        svg.appendChild(svgEl("circle", { cx: W - right + 18, cy: y - 4, r: 5, fill: colour(method) }));
        svg.appendChild(svgEl("text", { x: W - right + 30, y: y }, method));
      });
      holder.appendChild(svg);
    }

    select.addEventListener("change", draw);
    draw();
  }

  // ---- token explorer ---------------------------------------------------------------------------------

  function bytesOf(b64) {
    const text = atob(b64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  function uint16s(b64) { // little endian, as numpy's "<u2"
    const b = bytesOf(b64), out = new Array(b.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = b[2 * i] | (b[2 * i + 1] << 8);
    return out;
  }

  function halfFloats(b64) { // IEEE 754 binary16, little endian
    return uint16s(b64).map((h) => {
      const sign = h >> 15 ? -1 : 1, exponent = (h >> 10) & 31, fraction = h & 1023;
      if (exponent === 0) return sign * fraction * Math.pow(2, -24);
      if (exponent === 31) return fraction ? NaN : sign * Infinity;
      return sign * (1 + fraction / 1024) * Math.pow(2, exponent - 15);
    });
  }

  // One document's arrays per (token, layer): experts, weights and p-values by expert index.
  function decodeDocument(run, doc) {
    if (doc.decoded) return doc.decoded;
    const L = run.layers.length, E = run.num_experts;
    const k = [...bytesOf(doc.k)];
    const experts = run.expert_bytes === 1 ? [...bytesOf(doc.experts)] : uint16s(doc.experts);
    const weights = halfFloats(doc.weights);
    const codes = doc.pvalues ? uint16s(doc.pvalues) : null;
    const cells = [];
    let offset = 0;
    for (let t = 0; t < doc.text.length; t++) {
      const layers = [];
      for (let l = 0; l < L; l++) {
        const cell = t * L + l, n = k[cell];
        let pvalues = null;
        if (codes && codes[cell * E] !== 65535) {
          pvalues = codes.slice(cell * E, (cell + 1) * E).map((c) => Math.pow(10, -c / 1000));
        }
        layers.push({ layer: run.layers[l], experts: experts.slice(offset, offset + n),
                      weights: weights.slice(offset, offset + n), pvalues: pvalues,
                      passingRank: doc.passing_rank ? doc.passing_rank[cell] : -1 });
        offset += n;
      }
      cells.push(layers);
    }
    doc.decoded = cells;
    return cells;
  }

  function setUpExplorer() {
    const root = document.getElementById("explorer-app");
    if (!root || !data.explorer.length) return;
    const runSelect = document.getElementById("explorer-run");
    const docSelect = document.getElementById("explorer-doc");
    const shadeSelect = document.getElementById("explorer-shade");
    const status = document.getElementById("explorer-status");
    const textBox = document.getElementById("explorer-text");
    const detail = document.getElementById("explorer-detail");
    const store = (window.routelabExplorer = window.routelabExplorer || {});
    let current = null, pinned = null, chosenLayer = 0;

    data.explorer.forEach((entry, i) => {
      runSelect.appendChild(el("option", { value: i }, `${entry.routing} · ${entry.dataset}`));
    });

    function load(entry) {
      return new Promise((resolve, reject) => {
        if (store[entry.id]) return resolve(store[entry.id]);
        const script = document.createElement("script");
        script.src = entry.file;
        script.onload = () => (store[entry.id] ? resolve(store[entry.id]) : reject(new Error("no data")));
        script.onerror = () => reject(new Error(`could not load ${entry.file}`));
        document.head.appendChild(script);
      });
    }

    function selectRun() {
      const entry = data.explorer[+runSelect.value];
      const previousDoc = docSelect.value;
      docSelect.replaceChildren(...entry.documents.map((d) => el("option", { value: d.doc_id },
        `document ${d.doc_id} (${d.tokens}${d.tokens < d.tokens_total ? " of " + d.tokens_total : ""} tokens)`)));
      if (entry.documents.some((d) => String(d.doc_id) === previousDoc)) docSelect.value = previousDoc;
      status.textContent = `loading ${entry.file} …`;
      load(entry).then((run) => {
        current = run;
        const previousShade = shadeSelect.value;
        shadeSelect.replaceChildren(el("option", { value: "sum" }, "experts summed over layers"),
          ...run.layers.map((layer, i) => el("option", { value: i }, `experts in layer ${layer}`)));
        if ([...shadeSelect.options].some((o) => o.value === previousShade)) shadeSelect.value = previousShade;
        status.textContent = run.alpha !== null ? `BH level α = ${fmt(run.alpha, 3)}; p-values recorded` : "";
        drawDocument();
      }, (error) => {
        status.textContent = `${error.message}: keep the explorer/ folder beside report.html`;
      });
    }

    function currentDoc() {
      return current.documents.find((d) => String(d.doc_id) === docSelect.value) || current.documents[0];
    }

    function drawDocument() {
      if (!current) return;
      const doc = currentDoc();
      const cells = decodeDocument(current, doc);
      const shade = shadeSelect.value;
      const values = cells.map((layers) => shade === "sum" ? layers.reduce((s, c) => s + c.experts.length, 0)
                                                           : layers[+shade].experts.length);
      const low = Math.min(...values), high = Math.max(...values);
      pinned = null;
      textBox.replaceChildren();
      doc.text.forEach((piece, t) => {
        if (t > 0 && doc.window[t] !== doc.window[t - 1]) {
          textBox.appendChild(el("span", { class: "window-break" }, `— window ${doc.window[t]} —`));
        }
        const alpha = high > low ? 0.08 + 0.72 * (values[t] - low) / (high - low) : 0.3;
        const span = el("span", { class: "tok" + (doc.generated[t] ? " gen" : ""), "data-token": t,
                                  title: `${values[t]} experts` }, piece === "" ? "\u200b" : piece);
        span.style.backgroundColor = `rgba(33, 102, 172, ${alpha.toFixed(3)})`;
        textBox.appendChild(span);
      });
      document.getElementById("explorer-legend").textContent =
        `Shade: ${shade === "sum" ? "experts selected, summed over layers" : "experts selected in layer " +
        current.layers[+shade]}; lightest ${low}, darkest ${high}. Dotted underline: generated tokens. ` +
        "Hover a token to see its routing, click to keep it.";
      if (doc.text.length) showToken(0);
      else detail.replaceChildren();
    }

    function showToken(t) {
      const doc = currentDoc(), layers = decodeDocument(current, doc)[t];
      for (const node of textBox.querySelectorAll(".tok.active")) node.classList.remove("active");
      const span = textBox.querySelector(`.tok[data-token="${t}"]`);
      if (span) span.classList.add("active");
      const heading = el("p", {}, "");
      heading.appendChild(el("b", {}, `token ${t}`));
      heading.appendChild(document.createTextNode(
        ` “${doc.text[t]}” · document ${doc.doc_id}, window ${doc.window[t]}, position ${doc.position[t]}` +
        (doc.generated[t] ? " (generated)" : "")));
      const table = el("table", { class: "token-layers" });
      const head = el("tr");
      for (const name of ["layer", "k", "experts (weight)"].concat(current.alpha !== null ? ["BH rank"] : [])) {
        head.appendChild(el("th", {}, name));
      }
      table.appendChild(head);
      if (chosenLayer >= layers.length) chosenLayer = 0;
      layers.forEach((cell, l) => {
        const row = el("tr", { class: "layer-row" + (l === chosenLayer ? " chosen" : ""), "data-layer": cell.layer });
        row.appendChild(el("td", {}, String(cell.layer)));
        row.appendChild(el("td", {}, String(cell.experts.length)));
        row.appendChild(el("td", {}, cell.experts.map((e, i) => `${e} (${fmt(cell.weights[i], 3)})`).join(", ")));
        if (current.alpha !== null) row.appendChild(el("td", {}, cell.passingRank >= 0 ? String(cell.passingRank) : "–"));
        row.addEventListener("click", () => { chosenLayer = l; showToken(t); });
        table.appendChild(row);
      });
      const tableBox = el("div", {});
      tableBox.append(heading, table);
      const parts = [tableBox];
      if (layers.some((cell) => cell.pvalues)) parts.push(bhPlot(layers[chosenLayer]));
      detail.replaceChildren(...parts);
    }

    function bhPlot(cell) {
      const box = el("div", { class: "bh-plot" });
      box.appendChild(el("p", {}, `Layer ${cell.layer}: sorted p-values against the BH line i·α/N`));
      if (!cell.pvalues) {
        box.appendChild(el("p", { class: "caption" }, "no p-values recorded for this token and layer"));
        return box;
      }
      const N = cell.pvalues.length, alpha = current.alpha;
      const chosen = new Set(cell.experts);
      const order = cell.pvalues.map((p, e) => e).sort((a, b) => cell.pvalues[a] - cell.pvalues[b]);
      const W = 420, H = 260, left = 50, right = 10, top = 10, bottom = 40;
      const logs = cell.pvalues.map((p) => Math.log10(Math.max(p, 1e-65)));
      const lineLow = alpha ? Math.log10(alpha / N) : 0;
      const y0 = Math.floor(Math.min(...logs, lineLow)), y1 = 0;
      const sx = (i) => left + (i - 0.5) / N * (W - left - right);
      const sy = (v) => top + (y1 - v) / (y1 - y0 || 1) * (H - top - bottom);
      const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "bh-svg" });
      const step = Math.max(1, Math.ceil((y1 - y0) / 6));
      for (let v = y0; v <= y1; v += step) {
        svg.appendChild(svgEl("line", { x1: left, x2: W - right, y1: sy(v), y2: sy(v), stroke: "#eee" }));
        svg.appendChild(svgEl("text", { x: left - 4, y: sy(v) + 4, "text-anchor": "end" }, `1e${v}`));
      }
      svg.appendChild(svgEl("rect", { x: left, y: top, width: W - left - right, height: H - top - bottom,
                                      fill: "none", stroke: "#999" }));
      svg.appendChild(svgEl("text", { x: (left + W - right) / 2, y: H - 8, "text-anchor": "middle" },
                            `rank i of the sorted p-values (N = ${N})`));
      if (alpha) {
        const path = order.map((e, i) => `${i ? "L" : "M"}${sx(i + 1).toFixed(1)},${sy(Math.log10((i + 1) * alpha / N)).toFixed(1)}`);
        svg.appendChild(svgEl("path", { d: path.join(""), stroke: "#d6604d", fill: "none", "stroke-width": 1.5,
                                        class: "bh-line" }));
      }
      order.forEach((e, i) => {
        const selected = chosen.has(e);
        const dot = svgEl("circle", { cx: sx(i + 1), cy: sy(logs[e]), r: selected ? 3.5 : 2.5,
                                      fill: selected ? "#2166ac" : "#fff", stroke: selected ? "#2166ac" : "#888",
                                      class: selected ? "pv selected" : "pv" });
        dot.appendChild(svgEl("title", {}, `expert ${e}: p = ${fmt(cell.pvalues[e], 3)}` +
                              (alpha ? `, threshold ${fmt((i + 1) * alpha / N, 3)}` : "") +
                              (selected ? " (selected)" : "")));
        svg.appendChild(dot);
      });
      box.appendChild(svg);
      const smallest = order.slice(0, Math.max(8, cell.experts.length)).map((e) =>
        `${e}: ${fmt(cell.pvalues[e], 3)}${chosen.has(e) ? " ✓" : ""}`);
      box.appendChild(el("p", { class: "caption pvalue-list" },
        `filled: selected experts; line: i·α/N (α = ${fmt(alpha, 3)}); passing rank ${cell.passingRank}. ` +
        `Smallest p-values (expert: p): ${smallest.join(", ")}`));
      return box;
    }

    textBox.addEventListener("mouseover", (event) => {
      const span = event.target.closest(".tok");
      if (span && pinned === null) showToken(+span.dataset.token);
    });
    textBox.addEventListener("click", (event) => {
      const span = event.target.closest(".tok");
      if (!span) return;
      const t = +span.dataset.token;
      pinned = pinned === t ? null : t;
      showToken(t);
    });
    runSelect.addEventListener("change", selectRun);
    docSelect.addEventListener("change", drawDocument);
    shadeSelect.addEventListener("change", drawDocument);
    selectRun();
  }

  setUpTable();
  drawPlot();
  setUpExplorer();
})();
