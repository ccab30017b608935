// perfdb dashboard charts (uPlot): results over time (user and test pages), and the overview's histogram.
// The histogram's values arrive from /api/... already formatted for people; the time charts'
// bucket statistics are formatted here by formatValue, which follows perfdb.records.units.
"use strict";

(function () {
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#17becf"];
  const DASHES = [[], [8, 4], [3, 3], [12, 4, 3, 4], [1, 3]];
  const CHART_HEIGHT = 260;
  const tooltip = document.getElementById("chart-tooltip");
  const charts = [];
  // Exposed for the browser tests and for anyone poking at the page from the console.
  window.perfdbCharts = charts;

  function cssVar(name, fallback) {
    const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  const axisNumber = new Intl.NumberFormat("en", { notation: "compact", maximumSignificantDigits: 3 });

  function axisStyle() {
    return {
      stroke: cssVar("--muted", "#5d6b7a"),
      grid: { stroke: cssVar("--border", "#dde3ea"), width: 1 },
      ticks: { stroke: cssVar("--border", "#dde3ea"), width: 1 },
    };
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showMessage(container, text, kind) {
    container.replaceChildren(element("p", kind === "error" ? "notice notice-warn" : "chart-empty", text));
  }

  // The JSON of an API reply, or the error it carries as an exception.
  async function fetchJson(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      const message = body && body.error ? body.error.message : `The dashboard answered ${response.status}.`;
      throw new Error(message);
    }
    return body;
  }

  function chartWidth(container) {
    return widthOf(container.getBoundingClientRect());
  }

  function widthOf(box) {
    return Math.max(280, Math.floor(box.width));
  }

  function placeTooltip(u, left, top) {
    const box = u.over.getBoundingClientRect();
    tooltip.hidden = false;
    const width = tooltip.offsetWidth;
    let x = box.left + window.scrollX + left + 14;
    if (x + width > window.scrollX + document.documentElement.clientWidth - 8) {
      x = box.left + window.scrollX + left - width - 14;
    }
    tooltip.style.left = `${Math.max(4, x)}px`;
    tooltip.style.top = `${box.top + window.scrollY + top + 14}px`;
  }

  function hideTooltip() {
    if (tooltip) tooltip.hidden = true;
  }

  // -- results over time (user and test pages) --------------------------------------------
  //
  // The API sends each line downsampled by perfdb: per time bucket its min, median and max (a
  // band around a line), and the record id of a bucket holding one result. Lines of one chart
  // share a time grid; a null row in a line marks a pause in its results, where it breaks.

  // The same rules as perfdb.records.units (display_scale and format_value), for values drawn
  // from the API's numbers (a value exactly halfway may round the other way: Python rounds halves to even).
  const PICOSECONDS = { ps: 1, ns: 1e3, us: 1e6, ms: 1e9, s: 1e12 };
  const SHOWN_DURATIONS = [["s", 1e12], ["ms", 1e9], ["\u00b5s", 1e6], ["ns", 1e3]];
  const PER_SECOND = { "ops/s": 1, "ops/ms": 1e3, "ops/us": 1e6, "ops/ns": 1e9 };
  const SI_PREFIXES = [["G", 1e9], ["M", 1e6], ["k", 1e3]];
  const BINARY_PREFIXES = [["GiB", 1024 ** 3], ["MiB", 1024 ** 2], ["KiB", 1024]];

  function prefixed(peak, label, perUnit) {
    for (const [prefix, size] of SI_PREFIXES) {
      if (peak >= size) return { label: `${prefix} ${label}`, divisor: size / perUnit };
    }
    return { label, divisor: 1 / perUnit };
  }

  function displayScale(unit, peak) {
    const slash = unit.indexOf("/");
    const base = slash < 0 ? unit : unit.slice(0, slash);
    const per = slash < 0 ? "" : unit.slice(slash + 1);
    const suffix = per ? `/${per}` : "";
    if (base in PICOSECONDS && (per === "" || per === "op")) {
      const picoseconds = peak * PICOSECONDS[base];
      for (const [label, size] of SHOWN_DURATIONS) {
        if (picoseconds >= size) return { label: label + suffix, divisor: size / PICOSECONDS[base] };
      }
      if (picoseconds === 0 || base === "ps") return { label: (base === "us" ? "\u00b5s" : base) + suffix, divisor: 1 };
      return { label: "ns" + suffix, divisor: 1e3 / PICOSECONDS[base] };
    }
    if (unit in PER_SECOND) return prefixed(peak * PER_SECOND[unit], "ops/s", PER_SECOND[unit]);
    if (base === "B") {
      for (const [label, size] of BINARY_PREFIXES) {
        if (peak >= size) return { label: label + suffix, divisor: size };
      }
      return { label: unit, divisor: 1 };
    }
    if (unit === "percent") return { label: "%", divisor: 1 };
    if (unit === "" || unit === "1") return { label: "", divisor: 1 };
    return prefixed(peak, unit, 1);
  }

  // Tick spacings of an axis, in stored units: 1, 2, 2.5 and 5 times the powers of ten of the unit shown.
  function shownIncrements(divisor) {
    const increments = [];
    for (let power = -12; power <= 15; power += 1) {
      for (const step of [1, 2, 2.5, 5]) increments.push(step * 10 ** power * divisor);
    }
    return increments;
  }

  function formatValue(value, unit) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "-";
    if (unit === "qps") {
      const digits = Math.abs(value) >= 100 ? 0 : 2;
      return value.toLocaleString("en", { minimumFractionDigits: digits, maximumFractionDigits: digits });
    }
    if (unit === "percent") return `${value.toFixed(1)}%`;
    if (unit === "" || unit === "1") {
      if (Math.abs(value) >= 1000) {
        // Counts stay whole and grouped (1,403,434), as format_value in perfdb/records/units.py does.
        const digits = Number.isInteger(value) || Math.abs(value) >= 100000 ? 0 : 2;
        return value.toLocaleString("en", { minimumFractionDigits: digits, maximumFractionDigits: digits });
      }
      return String(value);
    }
    const scale = displayScale(unit, Math.abs(value));
    const shown = Number((value / scale.divisor).toPrecision(3));
    const text = Math.abs(shown) >= 1000 ? shown.toLocaleString("en", { maximumFractionDigits: 0 }) : String(shown);
    return `${text} ${scale.label}`;
  }
  window.perfdbFormatValue = formatValue;

  function isoTime(seconds) {
    return new Date(seconds * 1000).toISOString();
  }

  // The lines a chart draws: a line per test for one metric; the detail test's metrics otherwise.
  function linesFor(chart, data) {
    if (chart.metrics.length === 1) return data.lines.filter((line) => line.metric === chart.metrics[0]);
    return data.lines.filter((line) => line.test === data.detail && chart.metrics.includes(line.metric));
  }

  // uPlot wants one x array for all series: the union of the lines' buckets (one grid per chart).
  // A bucket a line lacks is undefined (the line spans it); its own gap rows are null (a break).
  function alignLines(lines) {
    const [start, width] = lines[0].grid;
    const buckets = [...new Set(lines.flatMap((line) => line.bucket))].sort((a, b) => a - b);
    const position = new Map(buckets.map((bucket, index) => [bucket, index]));
    const xs = buckets.map((bucket) => start + (bucket + 0.5) * width);
    const aligned = lines.map((line) => {
      const columns = { median: [], min: [], max: [], row: [] };
      for (const name of Object.keys(columns)) columns[name] = new Array(xs.length).fill(undefined);
      line.bucket.forEach((bucket, row) => {
        const at = position.get(bucket);
        columns.median[at] = line.median[row];
        columns.min[at] = line.min[row];
        columns.max[at] = line.max[row];
        columns.row[at] = row;
      });
      return { line, ...columns };
    });
    return { xs, grid: [start, width], aligned };
  }

  function lineLabel(line, chart, data, many) {
    const metric = data.metrics[line.metric].label;
    if (chart.metrics.length > 1) return metric;
    return many ? line.test : metric;
  }

  function timeSeriesChart(plot, chart, data, page, width) {
    const lines = linesFor(chart, data);
    if (lines.length === 0) {
      showMessage(plot, "No values of these metrics in this range.");
      return;
    }
    const { xs, grid, aligned } = alignLines(lines);
    const divisor = chart.axis.divisor;
    const many = new Set(lines.map((line) => line.test)).size > 1;
    // Fainter bands when many lines share a chart, so that the medians stay readable.
    const bandAlpha = lines.length > 4 ? "1f" : "38";
    const series = [{ label: "time (UTC)" }];
    const columns = [xs];
    const bands = [];
    const drawn = []; // per line: its aligned columns, colour and uPlot series indices
    aligned.forEach((item, index) => {
      const color = PALETTE[index % PALETTE.length];
      const medianIndex = series.length;
      const dots = dotted(item, width);
      series.push({
        label: lineLabel(item.line, chart, data, many),
        stroke: color,
        // One pixel: on a 1x screen a canvas drawn in software (a browser without a GPU) takes
        // its fast hairline path, a third of the raster time of a 1.6-pixel line.
        width: 1,
        spanGaps: false,
        points: { show: false, size: 6, fill: color, filter: () => dots },
      });
      const edge = { label: "", stroke: "transparent", width: 0, spanGaps: false, points: { show: false } };
      series.push({ ...edge }, { ...edge });
      columns.push(item.median, item.min, item.max);
      bands.push({ series: [medianIndex + 2, medianIndex + 1], fill: `${color}${bandAlpha}` });
      drawn.push({ ...item, color, index: { median: medianIndex, min: medianIndex + 1, max: medianIndex + 2 } });
    });
    const [since, until] = data.range;
    const pad = (until - since || 86400) * 0.015;
    const state = { hovered: null, downAt: null };
    const options = {
      width,
      height: CHART_HEIGHT,
      tzDate: (seconds) => uPlot.tzDate(new Date(seconds * 1e3), "Etc/UTC"),
      scales: {
        x: { time: true, range: () => [since - pad, until + pad] },
        y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.08 : 1] },
      },
      series,
      bands,
      axes: [
        axisStyle(),
        {
          ...axisStyle(),
          size: 64,
          label: chart.axis.label,
          labelSize: 18,
          // Ticks at round numbers of the unit shown (2 GiB/s, not 1.86), whatever the divisor.
          incrs: shownIncrements(divisor),
          values: (u, splits) => splits.map((value) => (value == null ? "" : axisNumber.format(value / divisor))),
        },
      ],
      legend: { show: false },
      cursor: {
        points: { show: false },
        // A drag selects a time range: the charts then load it at a finer grain.
        drag: { x: true, y: false, setScale: false },
      },
      hooks: {
        // Change points (perfdb's alerts): a dashed vertical line in the line's colour at the
        // first result after the change.
        draw: [
          (u) => {
            const ctx = u.ctx;
            ctx.save();
            ctx.setLineDash([5, 4]);
            ctx.lineWidth = 1.5 * devicePixelRatio;
            drawn.forEach((item) => {
              (item.line.marks || []).forEach((mark) => {
                const x = Math.round(u.valToPos(mark.time, "x", true));
                ctx.strokeStyle = item.color;
                ctx.beginPath();
                ctx.moveTo(x, u.bbox.top);
                ctx.lineTo(x, u.bbox.top + u.bbox.height);
                ctx.stroke();
              });
            });
            ctx.restore();
          },
        ],
        setCursor: [
          (u) => {
            state.hovered = hoveredBucket(u, xs, drawn);
            u.over.classList.toggle("on-point", state.hovered != null);
            if (state.hovered == null) {
              hideTooltip();
              return;
            }
            showBucketTooltip(u, state.hovered, xs, grid, data);
          },
        ],
        setSelect: [
          (u) => {
            if (u.select.width < 5) return;
            const from = u.posToVal(u.select.left, "x");
            const to = u.posToVal(u.select.left + u.select.width, "x");
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
            page.zoom(Math.max(from, since), Math.min(to, until));
          },
        ],
      },
    };
    const u = new uPlot(options, columns, plot);
    plot.append(lineLegend(u, drawn));
    u.over.addEventListener("mouseleave", hideTooltip);
    // A click on a single result opens it; on a bucket of several, the table lists them. The
    // end of a drag (a zoom) is no click.
    u.over.addEventListener("mousedown", (event) => {
      state.downAt = event.clientX;
    });
    u.over.addEventListener("click", (event) => {
      const hovered = state.hovered;
      if (hovered == null || Math.abs(event.clientX - (state.downAt ?? event.clientX)) > 3) return;
      const recordId = hovered.line.line.record_id[hovered.row];
      if (recordId != null) {
        window.location.href = `/results/${recordId}`;
        return;
      }
      const [start, width] = grid;
      const bucket = hovered.line.line.bucket[hovered.row];
      const table = new URL(data.links.table, window.location.href);
      table.searchParams.set("test", hovered.line.line.test);
      table.searchParams.set("from", isoTime(start + bucket * width));
      table.searchParams.set("to", isoTime(start + (bucket + 1) * width));
      table.searchParams.set("order", "asc"); // in the order they ran
      window.location.href = `${table.pathname}${table.search}`;
    });
    charts.push({ id: chart.id, plot: u, state, xs, grid, lines: drawn });
  }

  // Which points of a line are dots: a bucket with no drawn neighbour (a line needs two points),
  // and, when the line is sparse enough for dots to stay apart, each single result.
  function dotted(item, width) {
    const present = [];
    item.median.forEach((value, at) => {
      if (value != null) present.push(at);
    });
    const sparse = present.length * 6 <= width;
    const dots = [];
    present.forEach((at, order) => {
      const before = order > 0 ? present[order - 1] : -1;
      const after = order + 1 < present.length ? present[order + 1] : item.median.length;
      // A neighbour is drawn unless a null (a break) lies between.
      const gapBefore = before < 0 || item.median.slice(before + 1, at).includes(null);
      const gapAfter = after >= item.median.length || item.median.slice(at + 1, after).includes(null);
      const single = item.line.record_id[item.row[at]] != null;
      if ((gapBefore && gapAfter) || (sparse && single)) dots.push(at);
    });
    return dots;
  }

  // A legend of buttons: one per line, hiding or showing its median and its band together.
  function lineLegend(u, drawn) {
    const legend = element("div", "line-legend");
    for (const line of drawn) {
      const button = element("button", "legend-item");
      button.type = "button";
      button.setAttribute("aria-pressed", "true");
      const swatch = element("span", "tt-swatch");
      swatch.style.background = line.color;
      button.append(swatch, element("span", null, u.series[line.index.median].label));
      button.addEventListener("click", () => {
        const show = !u.series[line.index.median].show;
        for (const index of [line.index.median, line.index.min, line.index.max]) u.setSeries(index, { show });
        button.setAttribute("aria-pressed", String(show));
      });
      legend.append(button);
    }
    return legend;
  }

  // The index of the x nearest to `value` (xs ascending).
  function closestIndex(xs, value) {
    let low = 0;
    let high = xs.length - 1;
    while (high - low > 1) {
      const middle = (low + high) >> 1;
      if (xs[middle] < value) low = middle;
      else high = middle;
    }
    return Math.abs(xs[low] - value) <= Math.abs(xs[high] - value) ? low : high;
  }

  // The nearest index at or around `start` where `values` has a point.
  function nearestPoint(values, xs, start, xValue) {
    if (values[start] != null) return start;
    let left = start - 1;
    let right = start + 1;
    while (left >= 0 || right < values.length) {
      const leftOk = left >= 0 && values[left] != null;
      const rightOk = right < values.length && values[right] != null;
      if (leftOk && rightOk) {
        return Math.abs(xs[left] - xValue) <= Math.abs(xs[right] - xValue) ? left : right;
      }
      if (leftOk) return left;
      if (rightOk) return right;
      left -= 1;
      right += 1;
    }
    return null;
  }

  // The bucket under the pointer: of the visible lines, the one whose band (or dot) is nearest.
  function hoveredBucket(u, xs, drawn) {
    if (u.cursor.left == null || u.cursor.left < 0 || xs.length === 0) return null;
    const xValue = u.posToVal(u.cursor.left, "x");
    const closest = closestIndex(xs, xValue);
    let best = null;
    let bestDistance = Infinity;
    for (const line of drawn) {
      if (!u.series[line.index.median].show) continue;
      const index = nearestPoint(line.median, xs, closest, xValue);
      if (index == null) continue;
      const row = line.row[index];
      if (row === undefined) continue;
      const dx = Math.abs(u.valToPos(xs[index], "x") - u.cursor.left);
      const top = u.valToPos(line.max[index], "y");
      const bottom = u.valToPos(line.min[index], "y");
      const mid = u.valToPos(line.median[index], "y");
      const y = u.cursor.top;
      const dy = y >= top && y <= bottom ? Math.min(Math.abs(y - mid), 4) : Math.min(Math.abs(y - top), Math.abs(y - bottom));
      const distance = Math.hypot(dx, dy);
      if (distance < bestDistance) {
        best = { line, row, index };
        bestDistance = distance;
      }
    }
    // Only a bucket close to the pointer counts: elsewhere there is nothing to open.
    return bestDistance <= 24 ? best : null;
  }

  function showBucketTooltip(u, hovered, xs, grid, data) {
    if (!tooltip) return;
    const line = hovered.line.line;
    const row = hovered.row;
    const metric = data.metrics[line.metric];
    const [start, width] = grid;
    const bucket = line.bucket[row];
    const when = (seconds) => isoTime(seconds).slice(0, 19).replace("T", " ");
    const lines = [element("div", "tt-title", `${line.test} \u00b7 ${metric.label}`)];
    const valueRow = (label, value) => {
      const item = element("div", "tt-row");
      const swatch = element("span", "tt-swatch");
      swatch.style.background = hovered.line.color;
      item.append(swatch, element("span", null, label), element("span", "tt-value", formatValue(value, metric.unit)));
      return item;
    };
    if (line.record_id[row] != null) {
      lines.push(element("div", "tt-meta", `${line.timestamp[row].slice(0, 19).replace("T", " ")} UTC`));
      lines.push(valueRow(metric.label, line.median[row]));
      lines.push(element("div", "tt-hint", "Click to open this result"));
    } else {
      const count = line.count[row];
      lines.push(element("div", "tt-meta", `${count.toLocaleString("en")} results, ${when(start + bucket * width)} \u2013 ${when(start + (bucket + 1) * width)} UTC`));
      lines.push(valueRow("max", line.max[row]), valueRow("median", line.median[row]), valueRow("min", line.min[row]));
      lines.push(element("div", "tt-hint", "Click to list these results"));
    }
    tooltip.replaceChildren(...lines);
    placeTooltip(u, u.valToPos(xs[hovered.index], "x"), u.cursor.top);
  }

  function chartCard(container, chart) {
    const card = element("section", `card${chart.id === "latency" ? " wide" : ""}`);
    card.dataset.chart = chart.id;
    const plot = element("div", "chart");
    plot.id = `chart-${chart.id}`;
    card.append(element("h2", null, chart.title), plot);
    container.append(card);
    return plot;
  }

  // The charts on screen are drawn at once; the others once they come within this many pixels of
  // the viewport, ahead of a scroll (drawing every chart before the page showed any held it up).
  const DRAW_MARGIN = 400;
  let nearViewport = null; // the IntersectionObserver of the charts not drawn yet

  // Calls each `drawIt(width)` of a [plot, drawIt] pair now if its plot is on screen, else once it
  // comes near; each plot gets data-drawn=true once drawn.
  function drawWhenNear(items) {
    const draw = (plot, drawIt, box) => {
      drawIt(widthOf(box));
      plot.style.minHeight = "";
      plot.dataset.drawn = "true";
    };
    // Every card at its chart's height first, so that one layout places them all where they stay
    // and gives each its width (no layout per chart drawn).
    for (const [plot] of items) plot.style.minHeight = `${CHART_HEIGHT}px`;
    const boxes = items.map(([plot]) => plot.getBoundingClientRect());
    const waiting = new Map();
    items.forEach(([plot, drawIt], index) => {
      const box = boxes[index];
      if (box.bottom > 0 && box.top < window.innerHeight) draw(plot, drawIt, box);
      else waiting.set(plot, drawIt);
    });
    if (waiting.size === 0) return;
    const observer = new IntersectionObserver(
      (entries) => {
        for (const entry of entries) {
          if (!entry.isIntersecting || !waiting.has(entry.target)) continue;
          observer.unobserve(entry.target);
          const drawIt = waiting.get(entry.target);
          waiting.delete(entry.target);
          draw(entry.target, drawIt, entry.boundingClientRect);
        }
      },
      { rootMargin: `${DRAW_MARGIN}px 0px` },
    );
    for (const plot of waiting.keys()) observer.observe(plot);
    nearViewport = observer;
  }

  function removeCharts() {
    if (nearViewport) {
      nearViewport.disconnect();
      nearViewport = null;
    }
    for (let index = charts.length - 1; index >= 0; index -= 1) {
      if (charts[index].id !== "histogram") {
        charts[index].plot.destroy();
        charts.splice(index, 1);
      }
    }
  }

  // Charts of one metric draw a line per test; those of several metrics (percentiles, CPU time)
  // draw one test at a time, picked here, so that their lines stay readable.
  const SINGLE_METRIC = (chart) => chart.metrics.length === 1;

  // The user and test pages: load the API for the page's range (or a zoomed part of it), draw.
  function timeCharts(container) {
    const summary = document.getElementById("chart-summary");
    // The page carries its first data; later loads (zoom, another detail test) ask the API at the
    // same resolution (about one point per two pixels of the widest charts).
    const api = new URL(container.dataset.api, window.location.href);
    const pageUrl = new URL(window.location.href);
    for (const name of ["detail", "from", "to"]) {
      if (pageUrl.searchParams.get(name)) api.searchParams.set(name, pageUrl.searchParams.get(name));
    }
    let embedded = document.getElementById("chart-data"); // taken by the first load alone
    // While zoomed, the URL keeps the range to go back to (wfrom, wto) beside the zoomed one.
    const zoomed = () => pageUrl.searchParams.has("wfrom");
    let loading = 0;

    async function load() {
      const ticket = ++loading;
      container.dataset.ready = "false";
      const given = embedded;
      embedded = null;
      let data;
      try {
        if (given) {
          data = JSON.parse(given.textContent);
          given.remove(); // half a megabyte of text the page needs no more
          if (data.error) throw new Error(data.error.message); // the read the page was built with failed
        } else {
          data = await fetchJson(`${api.pathname}${api.search}`);
        }
      } catch (error) {
        summary.textContent = "";
        removeCharts();
        showMessage(container, `The charts could not be loaded: ${error.message}`, "error");
        return;
      }
      if (ticket !== loading) return; // a newer zoom is on its way
      render(data);
      container.dataset.ready = "true";
    }

    function navigate(changes) {
      for (const [name, value] of Object.entries(changes)) {
        if (value == null) {
          api.searchParams.delete(name);
          pageUrl.searchParams.delete(name);
        } else {
          api.searchParams.set(name, value);
          pageUrl.searchParams.set(name, value);
        }
      }
      // Kept in the URL, so a shared link shows the same charts.
      window.history.replaceState(null, "", `${pageUrl.pathname}${pageUrl.search}`);
      load();
    }

    const page = {
      zoom(from, to) {
        const whole = zoomed()
          ? {}
          : { wfrom: pageUrl.searchParams.get("from") || "", wto: pageUrl.searchParams.get("to") || "" };
        navigate({ ...whole, from: isoTime(from), to: isoTime(to) });
      },
      unzoom() {
        const from = pageUrl.searchParams.get("wfrom") || null;
        const to = pageUrl.searchParams.get("wto") || null;
        navigate({ from, to, wfrom: null, wto: null });
      },
    };

    function render(data) {
      removeCharts();
      container.replaceChildren();
      document.querySelectorAll(".chart-notice").forEach((node) => node.remove());
      if (data.tests) fillTestSelector(data.tests);
      if (data.lines.length === 0) {
        summary.textContent = "No results in this range. Try a longer range, or All time.";
        return;
      }
      const tests = [...new Set(data.lines.map((line) => line.test))];
      const points = Math.max(...data.lines.map((line) => line.bucket.length));
      summary.textContent =
        `${data.results.toLocaleString("en")} result${data.results === 1 ? "" : "s"} of ${tests.length} test${tests.length === 1 ? "" : "s"}, ` +
        `from ${isoTime(data.range[0]).slice(0, 16).replace("T", " ")} to ${isoTime(data.range[1]).slice(0, 16).replace("T", " ")} UTC, ` +
        `at most ${points.toLocaleString("en")} points a line. Bands span each moment's lowest to highest value, the line is its median; ` +
        "dots are single results (click to open). Drag across a chart to zoom in.";
      if (zoomed()) {
        const reset = element("button", null, "Zoom out to the whole range");
        reset.type = "button";
        reset.id = "zoom-out";
        reset.addEventListener("click", () => page.unzoom());
        const zoomBar = element("div", "detail-bar");
        zoomBar.append(reset);
        container.append(zoomBar);
      }
      if (data.note) summary.after(element("p", "notice notice-warn chart-notice", data.note));
      const plots = new Map();
      for (const chart of data.charts.filter(SINGLE_METRIC)) plots.set(chart.id, chartCard(container, chart));
      const choices = data.tests ? data.tests.map((test) => test.name) : [];
      if (!data.test && choices.length > 1) {
        container.append(detailSelector(choices, data.detail, (test) => navigate({ detail: test })));
      }
      for (const chart of data.charts.filter((chart) => !SINGLE_METRIC(chart))) plots.set(chart.id, chartCard(container, chart));
      // Drawn once every card is in place, so each chart is measured at its final width; the page
      // is ready when those in view are drawn.
      drawWhenNear(
        data.charts.map((chart) => {
          const plot = plots.get(chart.id);
          return [plot, (width) => timeSeriesChart(plot, chart, data, page, width)];
        }),
      );
    }

    load();
  }

  function detailSelector(tests, current, onChange) {
    const bar = element("div", "detail-bar");
    const label = element("label", null, "Percentiles and CPU time of");
    label.htmlFor = "detail-test";
    const select = element("select");
    select.id = "detail-test";
    for (const test of tests) select.append(new Option(test, test, false, test === current));
    select.addEventListener("change", () => onChange(select.value));
    bar.append(label, select);
    return bar;
  }

  function fillTestSelector(tests) {
    const select = document.getElementById("f-test");
    if (!select) return;
    const current = select.dataset.current || "";
    const options = [new Option("All tests (one line each)", "", false, current === "")];
    const names = tests.map((test) => test.name);
    if (current && !names.includes(current)) options.push(new Option(current, current, true, true));
    for (const test of tests) {
      options.push(new Option(`${test.name} (${test.count})`, test.name, false, test.name === current));
    }
    select.replaceChildren(...options);
  }

  // -- the overview's histogram -------------------------------------------------------------

  async function drawHistogram(container) {
    const note = document.getElementById("histogram-note");
    // The page carries the data it was built from; the API is asked only without it.
    const embedded = document.getElementById("histogram-data");
    let data;
    try {
      data = embedded ? JSON.parse(embedded.textContent) : await fetchJson(container.dataset.api);
    } catch (error) {
      showMessage(container, `The histogram could not be loaded: ${error.message}`, "error");
      return;
    }
    const bins = data.histogram.bins;
    if (bins.length === 0) {
      showMessage(container, "No stored result has this metric.");
      container.dataset.ready = "true";
      return;
    }
    const xs = bins.map((_, index) => index);
    const counts = bins.map((bin) => bin.count);
    const step = Math.ceil(bins.length / 10);
    const edgeTicks = [];
    for (let edge = 0; edge <= bins.length; edge += step) edgeTicks.push(edge - 0.5);
    const color = PALETTE[0];
    const state = { bin: null };
    const options = {
      width: chartWidth(container),
      height: 300,
      scales: { x: { time: false, range: [-0.6, bins.length - 0.4] }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      series: [
        { label: data.metric.label },
        {
          label: "results",
          stroke: color,
          fill: `${color}cc`,
          width: 1,
          paths: uPlot.paths.bars({ size: [0.9, 80], align: 0 }),
          points: { show: false },
        },
      ],
      axes: [
        {
          // Ticks on the bin edges, labelled with the edge's value (at most about ten of them).
          ...axisStyle(),
          size: 56,
          splits: () => edgeTicks,
          values: (u, splits) => splits.map((tick) => edgeLabel(bins, tick + 0.5)),
        },
        { ...axisStyle(), size: 56, label: "results", labelSize: 18 },
      ],
      legend: { show: false },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      hooks: {
        setCursor: [
          (u) => {
            const index = u.cursor.idx;
            state.bin = index;
            if (index == null || u.cursor.left < 0) {
              hideTooltip();
              return;
            }
            const bin = bins[index];
            tooltip.replaceChildren(
              element("div", "tt-title", bin.label),
              element("div", null, `${bin.count.toLocaleString("en")} result${bin.count === 1 ? "" : "s"}`),
            );
            placeTooltip(u, u.valToPos(index, "x"), u.cursor.top);
          },
        ],
      },
    };
    const u = new uPlot(options, [xs, counts], container);
    u.over.addEventListener("mouseleave", hideTooltip);
    charts.push({ id: "histogram", plot: u, state });
    const scale = data.histogram.scale === "log" ? "perfdb's bins: each about 1.33 times as wide as the one before (eight per tenfold)." : "Bins of equal width.";
    note.textContent = `${data.histogram.count.toLocaleString("en")} results from ${data.users.toLocaleString("en")} users. ${scale}`;
    container.dataset.ready = "true";
  }

  // The value at bin edge `edge` (0 is the low edge of the first bin), as the API formatted it.
  function edgeLabel(bins, edge) {
    if (edge >= bins.length) return bins[bins.length - 1].label.split(" \u2013 ")[1];
    return bins[edge].label.split(" \u2013 ")[0];
  }

  // -- start -----------------------------------------------------------------------------------

  function redrawOnResize() {
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        for (const chart of charts) {
          const host = chart.plot.root.parentElement;
          chart.plot.setSize({ width: chartWidth(host), height: chart.plot.height });
        }
      }, 150);
    });
  }

  const timeChartsContainer = document.getElementById("charts");
  if (timeChartsContainer) timeCharts(timeChartsContainer);
  const histogram = document.getElementById("histogram");
  if (histogram) drawHistogram(histogram);
  redrawOnResize();
})();
