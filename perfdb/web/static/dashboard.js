// perfdb dashboard, every page: tidy filter forms and their URLs, picking results to compare, and the retry
// countdown.
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

  // The results table: tick two results, then compare them (the server makes the older one the base).
  const picks = document.getElementById("compare-picks");
  if (picks) {
    const button = document.getElementById("compare-picked");
    const hint = document.getElementById("compare-hint");
    const boxes = () => Array.from(document.querySelectorAll("input.pick[form=compare-picks]"));
    const update = () => {
      const picked = boxes().filter((box) => box.checked).length;
      button.disabled = picked !== 2;
      // Two is the most a comparison of picked results takes.
      for (const box of boxes()) box.disabled = !box.checked && picked >= 2;
      hint.textContent = picked === 2
        ? "Compare the two picked results (the older one is the base)."
        : `Tick ${2 - picked} more result${picked === 1 ? "" : "s"} to compare them (the older one is the base).`;
    };
    document.addEventListener("change", (event) => {
      if (event.target.matches("input.pick")) update();
    });
    window.addEventListener("pageshow", update); // boxes the browser kept ticked on the way back
    update();
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
