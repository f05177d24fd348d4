(function () {
  "use strict";
  var controls = document.getElementById("gallery-controls");
  var items = Array.prototype.slice.call(document.querySelectorAll("#gallery-items .item"));
  if (!controls || items.length === 0) {
    return;
  }
  var flagSelect = document.getElementById("filter-flag");
  var classSelect = document.getElementById("filter-class");
  var status = document.getElementById("gallery-status");
  var empty = document.getElementById("gallery-empty");
  function apply() {
    var flag = flagSelect ? flagSelect.value : "";
    var name = classSelect ? classSelect.value : "";
    var shown = 0;
    items.forEach(function (item) {
      var visible = (flag === "" || item.getAttribute("data-flag") === flag) &&
        (name === "" || item.getAttribute("data-given") === name || item.getAttribute("data-suggested") === name);
      item.hidden = !visible;
      if (visible) {
        shown += 1;
      }
    });
    status.textContent = "Showing " + shown + " of " + items.length;
    empty.hidden = shown !== 0;
  }
  if (flagSelect) {
    flagSelect.addEventListener("change", apply);
  }
  if (classSelect) {
    classSelect.addEventListener("change", apply);
  }
  controls.hidden = false;
  apply();
})();
(function () {
  "use strict";
  // Review: keep / drop / relabel per gallery item, downloaded as a CSV built here in
  // the page (a Blob; nothing is sent anywhere) for `minnorm-audit clean --decisions`.
  var bar = document.getElementById("review-bar");
  // Flagged examples and outliers alike can be kept, dropped or relabeled.
  var items = Array.prototype.slice.call(document.querySelectorAll("#gallery-items .item, #outlier-items .item"));
  if (!bar || items.length === 0) {
    return;
  }
  var download = document.getElementById("review-download");
  var clear = document.getElementById("review-clear");
  var status = document.getElementById("review-status");
  var classOptions = document.getElementById("review-class-options");
  var decisions = items.map(function () { return null; });
  var unsaved = false;

  function defaultLabel(item) {
    var given = item.getAttribute("data-given");
    var candidates = [item.getAttribute("data-suggested"), item.getAttribute("data-competing")];
    for (var index = 0; index < candidates.length; index += 1) {
      if (candidates[index] && candidates[index] !== given) {
        return candidates[index];
      }
    }
    return "";
  }

  function classSelect(item) {
    var select = item.querySelector("select.relabel-class");
    if (select && select.options.length === 0 && classOptions) {
      Array.prototype.forEach.call(classOptions.options, function (option) {
        select.appendChild(option.cloneNode(true));
      });
      var preferred = defaultLabel(item);
      if (preferred) {
        select.value = preferred;
      }
    }
    return select;
  }

  function show(index) {
    var item = items[index];
    var decision = decisions[index];
    var chosen = decision ? decision.decision : "";
    Array.prototype.forEach.call(item.querySelectorAll("button.decide"), function (button) {
      button.setAttribute("aria-pressed", String(button.getAttribute("data-decision") === chosen));
    });
    ["keep", "drop", "relabel"].forEach(function (name) {
      item.classList.toggle("decided-" + name, chosen === name);
    });
    var relabelTo = item.querySelector(".relabel-to");
    if (relabelTo) {
      relabelTo.hidden = chosen !== "relabel";
    }
  }

  function summarize() {
    var counts = {keep: 0, drop: 0, relabel: 0};
    var total = 0;
    decisions.forEach(function (decision) {
      if (decision) {
        counts[decision.decision] += 1;
        total += 1;
      }
    });
    status.textContent = total === 0 ? "No decisions yet" :
      total + " decision" + (total === 1 ? "" : "s") + ": " + counts.keep + " keep, " + counts.drop +
      " drop, " + counts.relabel + " relabel";
    download.disabled = total === 0;
    clear.disabled = total === 0;
  }

  function decide(index, name) {
    var current = decisions[index];
    if (current && current.decision === name) {
      decisions[index] = null;  // pressing the chosen button again takes the decision back
    } else if (name === "relabel") {
      var select = classSelect(items[index]);
      decisions[index] = {decision: "relabel", label: select ? select.value : ""};
    } else {
      decisions[index] = {decision: name, label: ""};
    }
    unsaved = true;
    show(index);
    summarize();
  }

  function csvCell(text) {
    return /[",\r\n]/.test(text) ? "\"" + text.replace(/"/g, "\"\"") + "\"" : text;
  }

  function decisionsCsv() {
    var lines = ["source,decision,label"];
    decisions.forEach(function (decision, index) {
      if (decision) {
        lines.push([items[index].getAttribute("data-source"), decision.decision, decision.label].map(csvCell).join(","));
      }
    });
    return lines.join("\n") + "\n";
  }

  items.forEach(function (item, index) {
    Array.prototype.forEach.call(item.querySelectorAll("button.decide"), function (button) {
      button.addEventListener("click", function () {
        decide(index, button.getAttribute("data-decision"));
      });
    });
    var select = item.querySelector("select.relabel-class");
    if (select) {
      select.addEventListener("change", function () {
        if (decisions[index] && decisions[index].decision === "relabel") {
          decisions[index].label = select.value;
          unsaved = true;
        }
      });
    }
    item.querySelector(".review").hidden = false;
  });

  download.addEventListener("click", function () {
    var blob = new Blob([decisionsCsv()], {type: "text/csv;charset=utf-8"});
    var url = URL.createObjectURL(blob);
    var link = document.createElement("a");
    link.href = url;
    link.download = download.getAttribute("data-filename") || "decisions.csv";
    link.hidden = true;
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
    window.setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
    unsaved = false;
  });

  clear.addEventListener("click", function () {
    decisions = decisions.map(function () { return null; });
    items.forEach(function (item, index) { show(index); });
    unsaved = false;
    summarize();
  });

  window.addEventListener("beforeunload", function (event) {
    if (unsaved) {
      event.preventDefault();
      event.returnValue = "";
    }
  });

  bar.hidden = false;
  summarize();
})();
