/* Sortable tables (click or Enter on a header), copy buttons, and a self-check that
   runs when the page is opened with #selftest. Sorting reads each cell's data-v (the
   raw value; '' = missing, always last), so formatting never changes the order. */
(function () {
  "use strict";

  function value(row, col) {
    var v = row.cells[col].getAttribute("data-v");
    return v === null || v === "" ? null : v;
  }

  function compare(a, b, numeric) {
    if (numeric) {
      var x = Number(a), y = Number(b);
      return x < y ? -1 : (x > y ? 1 : 0);
    }
    return a < b ? -1 : (a > b ? 1 : 0);
  }

  function sortTable(table, col, dir) {
    var head = table.tHead.rows[0].cells;
    var numeric = head[col].classList.contains("num");
    var tbody = table.tBodies[0];
    var items = Array.prototype.map.call(tbody.rows, function (row, i) { return { row: row, i: i }; });
    items.sort(function (p, q) {
      var a = value(p.row, col), b = value(q.row, col);
      if (a === null || b === null) {
        return a === b ? p.i - q.i : (a === null ? 1 : -1);
      }
      return dir * compare(a, b, numeric) || p.i - q.i;
    });
    items.forEach(function (item) { tbody.appendChild(item.row); });
    for (var k = 0; k < head.length; k++) {
      head[k].setAttribute("aria-sort", k === col ? (dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  function onHeader(table, th) {
    var col = Array.prototype.indexOf.call(th.parentNode.cells, th);
    sortTable(table, col, th.getAttribute("aria-sort") === "ascending" ? -1 : 1);
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.addEventListener("click", function () { onHeader(table, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onHeader(table, th); }
      });
    });
  });

  function copyText(button) {
    var pre = document.getElementById(button.getAttribute("data-target"));
    if (!pre) { return; }
    function done(ok) {
      button.textContent = ok ? "Copied" : "Selected: press Ctrl+C";
      window.setTimeout(function () { button.textContent = "Copy"; }, 1800);
    }
    function fallback() {
      var range = document.createRange();
      range.selectNodeContents(pre);
      var sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      done(ok);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(pre.textContent).then(function () { done(true); }, fallback);
    } else {
      fallback();
    }
  }

  Array.prototype.forEach.call(document.querySelectorAll("button.copy"), function (button) {
    button.addEventListener("click", function () { copyText(button); });
  });

  /* Figures scale to the page width; a click shows one at full size, scrolling inside its box. */
  Array.prototype.forEach.call(document.querySelectorAll("figure img"), function (img) {
    img.addEventListener("click", function () { img.closest("figure").classList.toggle("zoomed"); });
  });

  /* #selftest: sort every sortable table by each numeric column both ways and check
     the order; the verdict goes to <body data-selftest>. */
  function ordered(table, col, dir) {
    var numeric = table.tHead.rows[0].cells[col].classList.contains("num");
    var rows = table.tBodies[0].rows, prev = null, seenMissing = false;
    for (var r = 0; r < rows.length; r++) {
      var v = value(rows[r], col);
      if (v === null) { seenMissing = true; continue; }
      if (seenMissing) { return false; }
      if (prev !== null && dir * compare(prev, v, numeric) > 0) { return false; }
      prev = v;
    }
    return true;
  }

  function selftest() {
    var problems = [], checks = 0;
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      var head = table.tHead.rows[0].cells;
      for (var c = 0; c < head.length; c++) {
        head[c].click();
        if (!ordered(table, c, 1)) { problems.push(table.id + ":" + c + ":asc"); }
        head[c].click();
        if (!ordered(table, c, -1)) { problems.push(table.id + ":" + c + ":desc"); }
        checks += 2;
      }
    });
    document.body.setAttribute("data-selftest", problems.length ? "fail " + problems.join(",") : "ok " + checks);
    var root = document.documentElement;  /* the page must not scroll sideways (wide tables scroll in their box) */
    document.body.setAttribute("data-overflow-px", String(Math.max(0, root.scrollWidth - root.clientWidth)));
  }

  if (window.location.hash === "#selftest") { selftest(); }
  document.body.setAttribute("data-report-ready", "1");
})();
