// perfdb dashboard, every page: tidy filter forms and their URLs, and the retry countdown.
"use strict";

(function () {
  const form = document.getElementById("filters");
  if (form) {
    // Choices that need no typing take effect at once.
    form.addEventListener("change", (event) => {
      const target = event.target;
      if (target.matches("select, input[type=checkbox]")) {
        form.requestSubmit();
      }
    });
    // Leave empty fields and default columns out of the URL, so shared links stay short.
    form.addEventListener("submit", () => {
      const boxes = Array.from(form.querySelectorAll("input[type=checkbox][name=cols]"));
      const allColumns = boxes.length > 0 && boxes.every((box) => box.checked);
      for (const element of Array.from(form.elements)) {
        if (!element.name || element.type === "submit") continue;
        if (element.name === "cols") {
          if (allColumns) {
            element.disabled = true;
          } else if (element.type === "hidden") {
            element.disabled = boxes.some((box) => box.checked);
          }
          continue;
        }
        // Empty fields, and choices left at their default, say nothing the server does not know.
        if (element.value === "" || element.value === element.dataset.default) element.disabled = true;
      }
      // Re-enable after the browser has read the form, in case the page is kept (back button).
      setTimeout(() => { for (const element of Array.from(form.elements)) element.disabled = false; }, 0);
    });
  }

  // Error pages: perfdb may be back soon, so try again by ourselves.
  const retry = document.getElementById("retry");
  if (retry) {
    let seconds = 15;
    const label = document.createElement("span");
    label.id = "retry-countdown";
    retry.after(label);
    const tick = () => {
      if (seconds <= 0) {
        window.location.reload();
        return;
      }
      label.textContent = `Retrying by itself in ${seconds} s.`;
      seconds -= 1;
      setTimeout(tick, 1000);
    };
    tick();
  }
})();
