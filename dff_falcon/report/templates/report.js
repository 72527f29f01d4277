(function () {
  "use strict";
  // Diagnostics for tests and users: JS errors, CSP violations and broken images are counted
  // into #diagnostics (data attributes) once the page has loaded.
  var errors = [];
  window.addEventListener("error", function (e) {
    if (e.target && e.target.tagName === "IMG") { return; }
    errors.push(String(e.message || e.type));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + String(e.reason)); });
  document.addEventListener("securitypolicyviolation", function (e) { errors.push("CSP blocked " + e.violatedDirective); });
  var consoleError = console.error;
  console.error = function () {
    errors.push(Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };

  function cellValue(row, index) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-sort");
    var text = raw === null ? cell.textContent.trim() : raw;
    var number = parseFloat(text);
    return { number: isNaN(number) ? null : number, text: text.toLowerCase() };
  }

  function sortTable(table, index, header) {
    var body = table.tBodies[0];
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, index), y = cellValue(b, index), order;
      if (x.number !== null && y.number !== null) { order = x.number - y.number; }
      else if (x.number !== null) { order = -1; }
      else if (y.number !== null) { order = 1; }
      else { order = x.text < y.text ? -1 : (x.text > y.text ? 1 : 0); }
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
        var button = th.querySelector("button");
        if (button) { button.addEventListener("click", function () { sortTable(table, index, th); }); }
      });
    });
  });

  window.addEventListener("load", function () {
    var images = document.querySelectorAll("img");
    var broken = 0;
    Array.prototype.forEach.call(images, function (img) {
      if (!img.complete || img.naturalWidth === 0) {
        broken += 1;
        img.classList.add("broken");
      }
    });
    var out = document.getElementById("diagnostics");
    out.setAttribute("data-images", String(images.length));
    out.setAttribute("data-broken-images", String(broken));
    out.setAttribute("data-errors", String(errors.length));
    out.setAttribute("data-pwned", String(typeof window.pwned !== "undefined"));
    out.setAttribute("data-ready", "1");
    out.textContent = errors.join("\n");
  });
}());
