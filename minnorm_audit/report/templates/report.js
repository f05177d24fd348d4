(function () {
  "use strict";
  // The gallery: every flagged example (the page's JSON block, most difficult first)
  // paged through here, filtered and sorted; review decisions (keep / drop / relabel)
  // are kept by source across pages and downloaded as a CSV built in the page (a Blob;
  // nothing is sent anywhere) for `minnorm-audit clean --decisions`. Cards are built
  // with textContent and attributes only, so a class name or path is never markup.
  var dataElement = document.getElementById("gallery-data");
  if (!dataElement) {
    return;
  }
  var data = JSON.parse(dataElement.textContent);
  var pageSize = Math.max(1, data.pageSize || 60);
  var classOptions = document.getElementById("review-class-options");
  var reviewBar = document.getElementById("review-bar");
  var decisions = {};  // source -> {decision, label}
  var decidedOrder = [];  // sources in the order first decided: the CSV's rows
  var unsaved = false;

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function formatNumber(value) {
    if (value === undefined || value === null) {
      return "\u2014";
    }
    if (Number.isInteger(value) && Math.abs(value) < 1e15) {
      return value.toLocaleString("en-US");
    }
    var size = Math.abs(value);
    if (size >= 1e5 || size < 1e-3) {
      return value.toExponential(3);
    }
    return String(Number(value.toPrecision(4)));
  }

  function defaultLabel(item) {
    var candidates = [item.p, item.c];
    for (var index = 0; index < candidates.length; index += 1) {
      if (candidates[index] && candidates[index] !== item.g) {
        return candidates[index];
      }
    }
    return "";
  }

  // ---------------------------------------------------------------- review

  var review = {
    status: document.getElementById("review-status"),
    download: document.getElementById("review-download"),
    clear: document.getElementById("review-clear")
  };

  function summarize() {
    if (!reviewBar) {
      return;
    }
    var counts = {keep: 0, drop: 0, relabel: 0};
    var total = 0;
    decidedOrder.forEach(function (source) {
      var decision = decisions[source];
      if (decision) {
        counts[decision.decision] += 1;
        total += 1;
      }
    });
    review.status.textContent = total === 0 ? "No decisions yet" :
      total + " decision" + (total === 1 ? "" : "s") + ": " + counts.keep + " keep, " + counts.drop +
      " drop, " + counts.relabel + " relabel";
    review.download.disabled = total === 0;
    review.clear.disabled = total === 0;
  }

  function showDecision(card, source) {
    var decision = decisions[source];
    var chosen = decision ? decision.decision : "";
    Array.prototype.forEach.call(card.querySelectorAll("button.decide"), function (button) {
      button.setAttribute("aria-pressed", String(button.getAttribute("data-decision") === chosen));
    });
    ["keep", "drop", "relabel"].forEach(function (name) {
      card.classList.toggle("decided-" + name, chosen === name);
    });
    var relabelTo = card.querySelector(".relabel-to");
    if (relabelTo) {
      relabelTo.hidden = chosen !== "relabel";
    }
    var select = card.querySelector("select.relabel-class");
    if (select && decision && decision.decision === "relabel" && decision.label) {
      select.value = decision.label;
    }
  }

  function decide(card, item, name) {
    var source = item.s;
    var current = decisions[source];
    if (current && current.decision === name) {
      delete decisions[source];  // pressing the chosen button again takes the decision back
    } else {
      var select = card.querySelector("select.relabel-class");
      decisions[source] = {decision: name, label: name === "relabel" && select ? select.value : ""};
      if (decidedOrder.indexOf(source) < 0) {
        decidedOrder.push(source);
      }
    }
    unsaved = true;
    showDecision(card, source);
    summarize();
  }

  function reviewControls(card, item) {
    var box = element("div", "review");
    var group = element("div", "decide-group");
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", "Decision for " + item.s);
    var names = data.regression || !classOptions ? ["keep", "drop"] : ["keep", "drop", "relabel"];
    names.forEach(function (name) {
      var button = element("button", "decide " + name, name);
      button.type = "button";
      button.setAttribute("data-decision", name);
      button.setAttribute("aria-pressed", "false");
      button.addEventListener("click", function () { decide(card, item, name); });
      group.appendChild(button);
    });
    box.appendChild(group);
    if (names.length === 3) {
      var label = element("label", "relabel-to");
      label.hidden = true;
      label.appendChild(document.createTextNode("as "));
      var select = element("select", "relabel-class");
      select.setAttribute("aria-label", "New label for " + item.s);
      Array.prototype.forEach.call(classOptions.options, function (option) {
        select.appendChild(option.cloneNode(true));
      });
      var preferred = defaultLabel(item);
      if (preferred) {
        select.value = preferred;
      }
      select.addEventListener("change", function () {
        var decision = decisions[item.s];
        if (decision && decision.decision === "relabel") {
          decision.label = select.value;
          unsaved = true;
        }
      });
      label.appendChild(select);
      box.appendChild(label);
    }
    return box;
  }

  // ---------------------------------------------------------------- cards

  function definition(list, term, value, className) {
    list.appendChild(element("dt", null, term));
    var detail = element("dd", className || null, value);
    list.appendChild(detail);
    return detail;
  }

  function card(item) {
    var node = element("article", "item " + item.f);
    node.setAttribute("data-flag", item.f);
    node.setAttribute("data-given", item.g || "");
    node.setAttribute("data-suggested", item.p || "");
    node.setAttribute("data-competing", item.c || "");
    node.setAttribute("data-source", item.s);
    var head = element("div", "head");
    head.appendChild(element("span", "badge " + item.f, item.f));
    head.appendChild(element("span", "rank", "#" + item.rank + (item.i === null || item.i === undefined ? "" : " \u00b7 id " + item.i)));
    node.appendChild(head);
    if (item.t) {
      var image = element("img", "thumb");
      image.src = item.t;
      image.alt = item.s;
      image.width = 96;
      image.height = 96;
      node.appendChild(image);
    } else if (item.x) {
      var features = element("div", "features");
      var table = element("table");
      item.x.forEach(function (pair) {
        var row = element("tr");
        row.appendChild(element("td", null, pair[0]));
        row.appendChild(element("td", null, pair[1]));
        table.appendChild(row);
      });
      features.appendChild(table);
      node.appendChild(features);
    } else if (item.xr) {
      node.appendChild(element("div", "features mono", item.xr));
    } else if (!data.table) {
      node.appendChild(element("div", "nothumb", "no thumbnail stored"));
    }
    var list = element("dl");
    if (data.regression) {
      definition(list, "given target", formatNumber(item.gt));
      definition(list, "predicted", formatNumber(item.pt));
      definition(list, "residual", formatNumber(item.r));
    } else {
      definition(list, "given", item.g || "");
      if (item.f === "mislabeled") {
        definition(list, "suggested", item.p || "", "suggest");
      } else if (item.c && item.c !== item.g) {
        definition(list, "leans to", item.c);
      }
    }
    var difficulty = definition(list, "difficulty", formatNumber(item.d));
    if (item.q) {
      difficulty.appendChild(document.createTextNode(" "));
      difficulty.appendChild(element("span", "rank", "(" + item.q + ")"));
    }
    node.appendChild(list);
    var source = element("div", "source mono", (data.table ? "row " : "") + item.s);
    source.title = item.s;
    node.appendChild(source);
    if (reviewBar) {
      node.appendChild(reviewControls(node, item));
      showDecision(node, item.s);
    }
    return node;
  }

  // ---------------------------------------------------------------- sections

  function Section(name, containerId, filters) {
    this.name = name;
    this.container = document.getElementById(containerId);
    this.pager = document.querySelector('.pager[data-section="' + name + '"]');
    this.items = (data.sections[name] || {items: []}).items;
    this.items.forEach(function (item, index) { item.rank = index + 1; });
    this.filters = filters;
    this.page = 0;
    this.shown = this.items;
  }

  Section.prototype.apply = function (resetPage) {
    var filters = this.filters;
    var shown = this.items.filter(function (item) {
      return !filters || filters.matches(item);
    });
    if (filters && filters.ascending()) {
      shown = shown.slice().reverse();
    }
    this.shown = shown;
    if (resetPage) {
      this.page = 0;
    }
    this.render();
  };

  Section.prototype.pages = function () {
    return Math.max(1, Math.ceil(this.shown.length / pageSize));
  };

  Section.prototype.render = function () {
    if (!this.container) {
      return;
    }
    this.page = Math.min(this.page, this.pages() - 1);
    var start = this.page * pageSize;
    var slice = this.shown.slice(start, start + pageSize);
    while (this.container.firstChild) {
      this.container.removeChild(this.container.firstChild);
    }
    var fragment = document.createDocumentFragment();
    slice.forEach(function (item) { fragment.appendChild(card(item)); });
    this.container.appendChild(fragment);
    var text = this.shown.length === 0 ? "Showing 0 of 0" :
      "Showing " + (start + 1) + "\u2013" + (start + slice.length) + " of " + this.shown.length +
      (this.shown.length !== this.items.length ? " matching (" + this.items.length + " in all)" : "") +
      " \u00b7 page " + (this.page + 1) + " of " + this.pages();
    if (this.pager) {
      this.pager.hidden = this.items.length <= pageSize;
      this.pager.querySelector(".page-status").textContent = text;
      this.pager.querySelector(".page-prev").disabled = this.page === 0;
      this.pager.querySelector(".page-next").disabled = this.page >= this.pages() - 1;
    }
    if (this.filters) {
      this.filters.status.textContent = text;
      this.filters.empty.hidden = this.shown.length !== 0;
    }
  };

  Section.prototype.start = function () {
    var section = this;
    if (!section.container) {
      return;
    }
    if (section.pager) {
      section.pager.querySelector(".page-prev").addEventListener("click", function () {
        section.page = Math.max(0, section.page - 1);
        section.render();
        section.container.scrollIntoView({block: "start"});
      });
      section.pager.querySelector(".page-next").addEventListener("click", function () {
        section.page = Math.min(section.pages() - 1, section.page + 1);
        section.render();
        section.container.scrollIntoView({block: "start"});
      });
    }
    section.apply(true);
  };

  var controls = document.getElementById("gallery-controls");
  var flagSelect = document.getElementById("filter-flag");
  var classSelect = document.getElementById("filter-class");
  var suggestedSelect = document.getElementById("filter-suggested");
  var sortSelect = document.getElementById("sort-order");
  var filters = controls ? {
    status: document.getElementById("gallery-status"),
    empty: document.getElementById("gallery-empty") || element("p"),
    ascending: function () { return sortSelect && sortSelect.value === "asc"; },
    matches: function (item) {
      var flag = flagSelect ? flagSelect.value : "";
      var name = classSelect ? classSelect.value : "";
      var suggested = suggestedSelect ? suggestedSelect.value : "";
      return (flag === "" || item.f === flag) &&
        (name === "" || item.g === name || item.p === name) &&
        (suggested === "" || (item.f === "mislabeled" && item.p === suggested));
    }
  } : null;
  var gallery = new Section("gallery", "gallery-items", filters);
  var outliers = new Section("outliers", "outlier-items", null);
  [flagSelect, classSelect, suggestedSelect, sortSelect].forEach(function (select) {
    if (select) {
      select.addEventListener("change", function () { gallery.apply(true); });
    }
  });
  gallery.start();
  outliers.start();
  if (controls && gallery.container) {
    controls.hidden = false;
  }

  // ---------------------------------------------------------------- download

  function csvCell(text) {
    return /[",\r\n]/.test(text) ? "\"" + text.replace(/"/g, "\"\"") + "\"" : text;
  }

  function decisionsCsv() {
    var lines = ["source,decision,label"];
    decidedOrder.forEach(function (source) {
      var decision = decisions[source];
      if (decision) {
        lines.push([source, decision.decision, decision.label].map(csvCell).join(","));
      }
    });
    return lines.join("\n") + "\n";
  }

  if (!reviewBar || (!gallery.container && !outliers.container)) {
    return;
  }
  review.download.addEventListener("click", function () {
    var blob = new Blob([decisionsCsv()], {type: "text/csv;charset=utf-8"});
    var url = URL.createObjectURL(blob);
    var link = document.createElement("a");
    link.href = url;
    link.download = review.download.getAttribute("data-filename") || "decisions.csv";
    link.hidden = true;
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
    window.setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
    unsaved = false;
  });

  review.clear.addEventListener("click", function () {
    decisions = {};
    decidedOrder = [];
    gallery.render();
    outliers.render();
    unsaved = false;
    summarize();
  });

  window.addEventListener("beforeunload", function (event) {
    if (unsaved) {
      event.preventDefault();
      event.returnValue = "";
    }
  });

  reviewBar.hidden = false;
  summarize();
})();
