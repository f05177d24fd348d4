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
