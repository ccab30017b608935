// perfdb dashboard charts (uPlot): a user's results over time, and the overview's histogram.
// Values arrive from /api/... already formatted for people (perfdb.units.format_value), so
// this file only chooses colours, places points and shows tooltips.
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
    return Math.max(280, Math.floor(container.getBoundingClientRect().width));
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

  // -- a user's results over time -------------------------------------------------------

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

  // Series for one chart: a line per test, or per metric when one test is shown.
  function seriesFor(chart, data, tests) {
    const columns = data.records.test_name;
    const series = [];
    const oneTest = tests.length === 1;
    tests.forEach((test, testIndex) => {
      chart.metrics.forEach((name, metricIndex) => {
        const metric = data.metrics[name];
        const values = metric.values.map((value, index) => (columns[index] === test ? value : null));
        if (!values.some((value) => value != null)) return;
        const many = chart.metrics.length > 1;
        let label = test;
        if (many) label = oneTest ? metric.label : `${test} · ${metric.label}`;
        const color = oneTest && many ? PALETTE[metricIndex % PALETTE.length] : PALETTE[testIndex % PALETTE.length];
        series.push({
          metric: name,
          test,
          values,
          config: {
            label,
            stroke: color,
            width: 1.6,
            dash: oneTest || !many ? [] : DASHES[metricIndex % DASHES.length],
            spanGaps: true,
            points: { show: true, size: 5, fill: color },
          },
        });
      });
    });
    return series;
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

  function timeSeriesChart(plot, chart, data, tests) {
    const xs = data.records.time;
    const series = seriesFor(chart, data, tests);
    if (series.length === 0) {
      showMessage(plot, "No values of these metrics in this range.");
      return;
    }
    const divisor = chart.axis.divisor;
    const state = { record: null };
    const options = {
      width: chartWidth(plot),
      height: CHART_HEIGHT,
      tzDate: (seconds) => uPlot.tzDate(new Date(seconds * 1e3), "Etc/UTC"),
      scales: {
        // A little room at both ends, so that the first and last points can be pointed at.
        x: { time: true, range: (u, min, max) => [min - (max - min || 86400) * 0.015, max + (max - min || 86400) * 0.015] },
        y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.08 : 1] },
      },
      series: [{ label: "time (UTC)" }, ...series.map((item) => item.config)],
      axes: [
        axisStyle(),
        {
          ...axisStyle(),
          size: 64,
          label: chart.axis.label,
          labelSize: 18,
          values: (u, splits) => splits.map((value) => (value == null ? "" : axisNumber.format(value / divisor))),
        },
      ],
      legend: { live: false },
      cursor: {
        points: { size: 9 },
        dataIdx: (u, seriesIndex, closest, xValue) => nearestPoint(u.data[seriesIndex], xs, closest, xValue),
      },
      hooks: {
        setCursor: [
          (u) => {
            state.record = hoveredRecord(u, xs);
            u.over.classList.toggle("on-point", state.record != null);
            if (state.record == null) {
              hideTooltip();
              return;
            }
            showRecordTooltip(u, state.record, data, series);
          },
        ],
      },
    };
    const u = new uPlot(options, [xs, ...series.map((item) => item.values)], plot);
    u.over.addEventListener("mouseleave", hideTooltip);
    // A click on a point opens that result.
    u.over.addEventListener("click", () => {
      if (state.record != null) {
        window.location.href = `/results/${data.records.record_id[state.record]}`;
      }
    });
    charts.push({ id: chart.id, plot: u, state, recordIds: data.records.record_id, series });
  }

  function removeChart(id) {
    const index = charts.findIndex((chart) => chart.id === id);
    if (index >= 0) {
      charts[index].plot.destroy();
      charts.splice(index, 1);
    }
  }

  // The result under the pointer: the point, of any visible line, nearest to it on screen.
  function hoveredRecord(u, xs) {
    if (u.cursor.left == null || u.cursor.left < 0) return null;
    let best = null;
    let bestDistance = Infinity;
    (u.cursor.idxs || []).forEach((index, seriesIndex) => {
      if (seriesIndex === 0 || index == null || !u.series[seriesIndex].show) return;
      const value = u.data[seriesIndex][index];
      if (value == null) return;
      const dx = u.valToPos(xs[index], "x") - u.cursor.left;
      const dy = u.valToPos(value, "y") - u.cursor.top;
      const distance = Math.hypot(dx, dy);
      if (distance < bestDistance) {
        best = index;
        bestDistance = distance;
      }
    });
    // Only a point close to the pointer counts: elsewhere there is nothing to open.
    return bestDistance <= 24 ? best : null;
  }

  function showRecordTooltip(u, record, data, series) {
    if (!tooltip) return;
    const records = data.records;
    const lines = [element("div", "tt-title", records.test_name[record])];
    const tag = records.tag[record];
    lines.push(element("div", "tt-meta", `${records.timestamp[record].slice(0, 19).replace("T", " ")} UTC · tag ${tag || "(none)"}`));
    series.forEach((item, index) => {
      if (item.values[record] == null || !u.series[index + 1].show) return;
      const row = element("div", "tt-row");
      const swatch = element("span", "tt-swatch");
      swatch.style.background = item.config.stroke;
      row.append(swatch, element("span", null, data.metrics[item.metric].label), element("span", "tt-value", data.metrics[item.metric].text[record]));
      lines.push(row);
    });
    lines.push(element("div", "tt-hint", "Click to open this result"));
    tooltip.replaceChildren(...lines);
    placeTooltip(u, u.valToPos(records.time[record], "x"), u.cursor.top);
  }

  // Charts of one metric draw a line per test; those of several metrics (percentiles, CPU time)
  // draw one test at a time, picked here, so that their lines stay readable.
  const SINGLE_METRIC = (chart) => chart.metrics.length === 1;

  async function drawUserCharts(container) {
    const summary = document.getElementById("chart-summary");
    let data;
    try {
      data = await fetchJson(container.dataset.api);
    } catch (error) {
      summary.textContent = "";
      showMessage(container, `The charts could not be loaded: ${error.message}`, "error");
      return;
    }
    fillTestSelector(data.tests);
    const count = data.records.record_id.length;
    const tests = data.test ? [data.test] : data.tests.map((test) => test.name);
    if (count === 0) {
      summary.textContent = "No results in this range. Try a longer range, or All time.";
      container.dataset.ready = "true";
      return;
    }
    summary.textContent =
      `${count.toLocaleString("en")} result${count === 1 ? "" : "s"} of ${tests.length} test${tests.length === 1 ? "" : "s"}. ` +
      "Hover a point for its value and tag; click it to open the result. Click a legend entry to hide its line.";
    if (data.note) summary.after(element("p", "notice notice-warn", data.note));
    const plots = new Map();
    for (const chart of data.charts.filter(SINGLE_METRIC)) plots.set(chart.id, chartCard(container, chart));
    const detailCharts = data.charts.filter((chart) => !SINGLE_METRIC(chart));
    let detailTest = tests[0];
    if (tests.length > 1) {
      const wanted = new URLSearchParams(window.location.search).get("detail");
      detailTest = tests.includes(wanted) ? wanted : tests[0];
      container.append(detailSelector(tests, detailTest, (test) => {
        for (const chart of detailCharts) {
          removeChart(chart.id);
          timeSeriesChart(plots.get(chart.id), chart, data, [test]);
        }
      }));
    }
    for (const chart of detailCharts) plots.set(chart.id, chartCard(container, chart));
    // Drawn once every card is in place, so each chart is measured at its final width.
    for (const chart of data.charts) {
      timeSeriesChart(plots.get(chart.id), chart, data, SINGLE_METRIC(chart) ? tests : [detailTest]);
    }
    container.dataset.ready = "true";
  }

  function detailSelector(tests, current, onChange) {
    const bar = element("div", "detail-bar");
    const label = element("label", null, "Percentiles and CPU time of");
    label.htmlFor = "detail-test";
    const select = element("select");
    select.id = "detail-test";
    for (const test of tests) select.append(new Option(test, test, false, test === current));
    select.addEventListener("change", () => {
      // Kept in the URL, so a shared link shows the same charts.
      const url = new URL(window.location.href);
      url.searchParams.set("detail", select.value);
      window.history.replaceState(null, "", url);
      onChange(select.value);
    });
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
    let data;
    try {
      data = await fetchJson(container.dataset.api);
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

  const userCharts = document.getElementById("charts");
  if (userCharts) drawUserCharts(userCharts);
  const histogram = document.getElementById("histogram");
  if (histogram) drawHistogram(histogram);
  redrawOnResize();
})();
