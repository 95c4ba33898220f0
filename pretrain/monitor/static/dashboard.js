// The dashboard page: a table of every run (grouped by sweep), the project's totals, and uPlot charts with the
// runs overlaid. Live (served by python -m pretrain.dashboard): every `refresh_s` it asks /api/updates for the
// metrics entries it does not have yet (a cursor per run), and the charts get only those points (setData, no
// reload). Static (an exported file): the same page drawn once from the data embedded in it.
(function () {
  "use strict";
  const config = window.DASHBOARD;
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
    "#4b5563", "#65a30d", "#7c3aed", "#0d9488"];
  const MAX_POINTS = 2000; // per series drawn; longer histories are thinned (the last point is always kept)
  const CHARTS = [
    { key: "loss", title: "Loss against tokens (validation: dots)", unit: "nats", train: "loss", eval: "val_loss" },
    { key: "throughput", title: "Throughput", unit: "tokens/s", train: "tokens_per_second" },
    { key: "emissions", title: "Cumulative emissions", unit: "kg CO2eq", train: "emissions_kg_co2eq" },
    { key: "mfu", title: "Model FLOPs utilization", unit: "MFU", train: "mfu", optional: true },
  ];

  const state = {
    summary: null,
    series: {}, // run id -> {generation, entries}
    colors: {}, // run id -> color
    hidden: new Set(),
    selected: null,
    charts: {}, // chart key -> {plot, ids, signature}
    lastUpdate: null,
    polls: 0,
  };

  // ------------------------------------------------------------------------------------- formatting
  const dash = "–";
  function num(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return dash;
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 0 : digits });
  }
  function sig(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return dash;
    if (value === 0) return "0";
    const abs = Math.abs(value);
    return abs >= 1e-3 && abs < 1e6 ? Number(value.toPrecision(digits || 3)).toString() : value.toExponential((digits || 3) - 1);
  }
  function si(value) {
    if (value === null || value === undefined || !isFinite(value)) return dash;
    const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [scale, unit] of units) if (Math.abs(value) >= scale) return (value / scale).toPrecision(3) + " " + unit;
    return String(Math.round(value));
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return dash;
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 90 * 60) return Math.round(seconds / 60) + " min";
    if (seconds < 48 * 3600) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }
  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function el(id) { return document.getElementById(id); }

  // ---------------------------------------------------------------------------------------- data
  function colorOf(id) {
    if (!(id in state.colors)) state.colors[id] = PALETTE[Object.keys(state.colors).length % PALETTE.length];
    return state.colors[id];
  }
  function merge(update) {
    state.summary = update.summary;
    for (const [id, part] of Object.entries(update.series || {})) {
      const known = state.series[id];
      if (!known || part.reset) state.series[id] = { generation: part.generation, entries: part.entries.slice() };
      else Array.prototype.push.apply(known.entries, part.entries);
    }
    const ids = new Set(state.summary.runs.map((r) => r.id));
    for (const id of Object.keys(state.series)) if (!ids.has(id)) delete state.series[id];
    state.summary.runs.forEach((r) => colorOf(r.id));
    state.lastUpdate = Date.now();
  }
  function cursor() {
    return Object.entries(state.series).map(([id, s]) => `${id}:${s.generation}:${s.entries.length}`).join(",");
  }

  // -------------------------------------------------------------------------------------- totals
  function renderTotals() {
    const t = state.summary.totals;
    const counts = Object.entries(t.status).map(([k, v]) => `${v} ${k}`).join(", ") || "none";
    const cards = [
      ["runs", t.runs, counts],
      ["energy", sig(t.energy_kwh, 4) + " kWh", "every invocation, failed ones too"],
      ["emissions", sig(t.kg_co2eq, 4) + " kg CO2eq", "sum of the emissions CSVs"],
      ["tokens", si(t.tokens), num(t.steps) + " steps"],
      ["per million tokens", sig(t.kg_co2eq_per_million_tokens, 3) + " kg", "CO2eq"],
      ["projected", sig(t.projected_kg_co2eq, 4) + " kg CO2eq", "once every run reaches max_steps"],
    ];
    el("totals").innerHTML = cards.map(([label, value, sub]) =>
      `<div class="card" data-total="${esc(label)}"><div class="label">${esc(label)}</div>` +
      `<div class="value">${esc(value)}</div><div class="sub">${esc(sub)}</div></div>`).join("");
  }

  // ---------------------------------------------------------------------------------------- table
  function runRow(run, sweep) {
    const color = colorOf(run.id);
    const off = state.hidden.has(run.id) ? " off" : "";
    const progress = run.step && run.max_steps ? Math.min(run.step / run.max_steps, 1) : 0;
    const params = run.sweep ? Object.entries(run.sweep.params).map(([k, v]) => `${k}=${v}`).join(" ") : "";
    const classes = ["run", state.selected === run.id ? "selected" : "", sweep && sweep.best === run.id ? "best" : ""];
    const val = run.val_loss === null ? dash : `${sig(run.val_loss, 4)} (${sig(run.best_val_loss, 4)})`;
    return `<tr class="${classes.join(" ")}" data-run="${esc(run.id)}" data-name="${esc(run.name)}" data-status="${esc(run.status)}">` +
      `<td><span class="swatch${off}" style="background:${color};border-color:${color}" data-toggle="${esc(run.id)}" title="show/hide in the charts"></span></td>` +
      `<td class="name">${esc(run.name)}${params ? `<span class="params">${esc(params)}</span>` : ""}</td>` +
      `<td class="status"><span class="badge ${esc(run.status)}">${esc(run.status)}</span>` +
      (run.status_detail ? `<span class="detail">${esc(run.status_detail)}</span>` : "") + `</td>` +
      `<td>${num(run.step)}${run.max_steps ? " / " + num(run.max_steps) : ""}<span class="progress"><i style="width:${(progress * 100).toFixed(1)}%"></i></span></td>` +
      `<td>${duration(run.eta_s)}</td><td>${si(run.tokens)}</td><td>${sig(run.loss, 4)}</td><td>${val}</td>` +
      `<td>${num(run.tokens_per_second)}</td><td>${run.mfu === null ? dash : (run.mfu * 100).toFixed(1) + "%"}</td>` +
      `<td>${sig(run.energy_kwh, 3)}</td><td class="kg">${sig(run.kg_co2eq, 3)}</td>` +
      `<td>${sig(run.kg_co2eq_per_million_tokens, 3)}</td><td>${sig(run.projected_kg_co2eq, 3)}</td></tr>`;
  }
  function renderTable() {
    const runs = state.summary.runs;
    const byId = Object.fromEntries(runs.map((r) => [r.id, r]));
    const rows = [];
    for (const sweep of state.summary.sweeps) {
      const best = byId[sweep.best];
      rows.push(`<tr class="group" data-sweep="${esc(sweep.id)}"><td></td><td colspan="13">sweep ${esc(sweep.id)}: ` +
        `${sweep.runs.length} points over ${esc(sweep.params.join(", ") || "?")}` +
        (best ? `; best ${esc(best.name)} (${sweep.best_by === "val_loss" ? "val loss " + sig(best.best_val_loss, 4) : "loss " + sig(best.loss, 4)})` : "") +
        `</td></tr>`);
      sweep.runs.forEach((id) => rows.push(runRow(byId[id], sweep)));
    }
    const single = runs.filter((r) => !r.sweep);
    if (single.length && state.summary.sweeps.length) rows.push(`<tr class="group"><td></td><td colspan="13">runs</td></tr>`);
    single.forEach((r) => rows.push(runRow(r, null)));
    document.querySelector("#runs tbody").innerHTML = rows.join("");
    const empty = el("empty");
    empty.hidden = runs.length > 0;
    if (!runs.length) {
      empty.innerHTML = `No runs under <code>${esc(state.summary.runs_dir)}</code> yet. A run directory (holding ` +
        `config.yaml, metrics.jsonl or status.json) appears here as soon as <code>python -m pretrain run_dir=…</code> starts in it.`;
    }
  }
  function renderDetails() {
    const panel = el("details");
    const run = state.summary.runs.find((r) => r.id === state.selected);
    panel.hidden = !run;
    if (!run) return;
    const nodes = run.nodes.map((n) => `<tr><td>node ${n.node}</td><td>${sig(n.energy_kwh, 4)} kWh</td>` +
      `<td>${sig(n.kg_co2eq, 4)} kg CO2eq</td><td>${n.invocations} invocation(s)</td></tr>`).join("");
    panel.innerHTML = `<h2>${esc(run.name)}</h2><div><code>${esc(run.path)}</code></div>` +
      `<p><span class="badge ${esc(run.status)}">${esc(run.status)}</span> ${esc(run.status_detail || "")}` +
      (run.seconds_per_step ? `; ${sig(run.seconds_per_step, 3)} s per step` : "") + `</p>` +
      (nodes ? `<table><tr><th colspan="4">energy and emissions per node (CodeCarbon)</th></tr>${nodes}</table>` : "<p>no emissions measured</p>") +
      (run.sweep ? `<p>sweep ${esc(run.sweep.id)}, point ${run.sweep.job}: ${esc(JSON.stringify(run.sweep.params))}</p>` : "") +
      (run.problems.length ? `<p>${run.problems.map(esc).join("<br>")}</p>` : "");
  }

  // --------------------------------------------------------------------------------------- charts
  function thin(points) {
    if (points.length <= MAX_POINTS) return points;
    const stride = Math.ceil(points.length / MAX_POINTS);
    const kept = points.filter((_, i) => i % stride === 0);
    if (kept[kept.length - 1] !== points[points.length - 1]) kept.push(points[points.length - 1]);
    return kept;
  }
  function table(entries, kind, field) {
    const points = entries.filter((e) => e.kind === kind && e.tokens !== undefined && e[field] !== undefined && e[field] !== null);
    const thinned = thin(points);
    return [thinned.map((e) => e.tokens), thinned.map((e) => e[field])];
  }
  function chartData(spec, runs) {
    const tables = [];
    const series = [{}];
    for (const run of runs) {
      const entries = (state.series[run.id] || { entries: [] }).entries;
      const color = colorOf(run.id);
      tables.push(table(entries, "train", spec.train));
      series.push({ label: run.name, stroke: color, width: 1.5, spanGaps: true, show: !state.hidden.has(run.id), runId: run.id, part: "train" });
      if (spec.eval) {
        tables.push(table(entries, "eval", spec.eval));
        series.push({ label: run.name + " (val)", stroke: color, width: 1, dash: [4, 4], spanGaps: true,
          points: { show: true, size: 6, fill: color }, show: !state.hidden.has(run.id), runId: run.id, part: "eval" });
      }
    }
    const data = tables.length ? uPlot.join(tables) : [[]];
    return { data, series };
  }
  function renderCharts() {
    const runs = state.summary.runs;
    const holder = el("charts");
    for (const spec of CHARTS) {
      const field = spec.train;
      const any = runs.some((r) => (state.series[r.id] || { entries: [] }).entries.some((e) => e[field] !== undefined && e[field] !== null));
      let box = el("chart-" + spec.key);
      if (spec.optional && !any) {
        if (box) { box.remove(); delete state.charts[spec.key]; }
        continue;
      }
      if (!box) {
        box = document.createElement("div");
        box.className = "chart";
        box.id = "chart-" + spec.key;
        box.innerHTML = `<h3>${esc(spec.title)}</h3><div class="plot"></div>`;
        holder.appendChild(box);
      }
      const { data, series } = chartData(spec, runs);
      const signature = series.map((s) => s.label + (s.show ? "" : "-")).join("|");
      const known = state.charts[spec.key];
      if (known && known.signature === signature) {
        known.plot.setData(data);
        known.data = data;
        continue;
      }
      if (known) known.plot.destroy();
      const width = Math.max(box.clientWidth - 16, 300);
      const plot = new uPlot({
        width, height: 260, series,
        legend: { show: false },
        scales: { x: { time: false } },
        axes: [{ label: "tokens", values: (u, vals) => vals.map(si) }, { label: spec.unit, size: 70, values: (u, vals) => vals.map((v) => sig(v, 3)) }],
        cursor: { drag: { x: true, y: false } },
      }, data, box.querySelector(".plot"));
      state.charts[spec.key] = { plot, signature, series, data };
    }
  }

  function render() {
    if (!state.summary) return;
    el("runs-dir").textContent = state.summary.runs_dir;
    renderTotals();
    renderTable();
    renderDetails();
    renderCharts();
  }

  // ----------------------------------------------------------------------------------- live updates
  async function poll() {
    try {
      const response = await fetch("api/updates?cursor=" + encodeURIComponent(cursor()), { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      merge(await response.json());
      state.polls += 1;
      render();
      el("connection").className = "connection";
    } catch (error) {
      el("connection").className = "connection lost";
      el("connection").textContent = "cannot reach the dashboard server (" + error.message + "); retrying";
    }
    setTimeout(poll, config.refresh_s * 1000);
  }
  function tick() {
    if (config.mode === "live" && state.lastUpdate && el("connection").className === "connection") {
      el("connection").textContent = "live: updated " + Math.round((Date.now() - state.lastUpdate) / 1000) + " s ago";
    }
  }

  document.addEventListener("click", (event) => {
    const toggle = event.target.closest("[data-toggle]");
    if (toggle) {
      const id = toggle.dataset.toggle;
      state.hidden.has(id) ? state.hidden.delete(id) : state.hidden.add(id);
      render();
      return;
    }
    const row = event.target.closest("tr.run");
    if (row) {
      state.selected = state.selected === row.dataset.run ? null : row.dataset.run;
      render();
    }
  });

  // What tests (and curious users, from the console) read: the state, and how many points a chart draws.
  window.dashboard = {
    state,
    pointCount(runName, chartKey) {
      const run = state.summary && state.summary.runs.find((r) => r.name === runName);
      const chart = state.charts[chartKey || "loss"];
      if (!run || !chart) return 0;
      const index = chart.series.findIndex((s) => s.runId === run.id && s.part === "train");
      return index < 0 ? 0 : chart.data[index].filter((v) => v !== null && v !== undefined).length;
    },
  };

  if (config.mode === "static") {
    merge(config.data);
    render();
    el("connection").textContent = "snapshot of " + new Date(config.data.summary.time * 1000).toLocaleString();
  } else {
    poll();
    setInterval(tick, 1000);
  }
})();
