// keygate portal: progressive enhancement only. Every page works without
// this file; with it, "Copy" buttons next to a one-time secret appear.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  if (!navigator.clipboard) { return; }
  document.querySelectorAll("button.copy[data-copy]").forEach(function (b) {
    var target = document.getElementById(b.getAttribute("data-copy"));
    if (!target) { return; }
    b.hidden = false;
    b.addEventListener("click", function () {
      navigator.clipboard.writeText(target.textContent).then(function () {
        b.textContent = "Copied";
      }, function () {
        b.textContent = "Select and copy";
      });
    });
  });
});
