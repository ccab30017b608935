// Inlined at the top of the chart pages' <head>: asks for the charts' data at once, while the
// browser is still fetching and running the static files (charts.js takes the reply from here).
"use strict";
(function () {
  const script = document.currentScript;
  const api = new URL(script.dataset.api, window.location.href);
  const page = new URLSearchParams(window.location.search);
  // The charts' container is <main>'s content box: the viewport up to main's max-width, less its
  // padding (dashboard.css); about one point per two pixels of it.
  const width = Math.min(document.documentElement.clientWidth, Number(script.dataset.maxWidth)) - Number(script.dataset.padding);
  api.searchParams.set("points", String(Math.max(50, Math.min(2000, Math.round(width / 2)))));
  for (const name of ["detail", "from", "to"]) {
    if (page.get(name)) api.searchParams.set(name, page.get(name));
  }
  const url = `${api.pathname}${api.search}`;
  const response = fetch(url, { headers: { Accept: "application/json" } });
  // charts.js reports a failure; until it reads the reply, a rejection is not "unhandled".
  response.catch(() => {});
  window.perfdbSeries = { url, response };
})();
