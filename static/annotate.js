// Ranking workspace: number keys pick the next best answer (Shift+number ties with the previous pick), Backspace
// undoes, Enter submits, S skips, F flags; drag and drop (SortableJS) orders the list; ranked cards move to the top
// in rank order; long answers collapse.
(function () {
  "use strict";
  var form, items, picks = [], started = Date.now();

  function rankOf(item) { return item.querySelector("select.rank"); }

  function render() {
    items.forEach(function (item) { rankOf(item).value = ""; item.classList.remove("ranked"); });
    var rank = 0;
    picks.forEach(function (pick) {
      if (!pick.tie || rank === 0) { rank += 1; }
      rankOf(pick.item).value = String(rank);
      pick.item.classList.add("ranked");
    });
    reorder();
    var done = items.every(function (item) { return rankOf(item).value !== ""; });
    document.getElementById("ranking-status").textContent = done
      ? "All ranked — press Enter to submit."
      : picks.length + " of " + items.length + " ranked";
  }

  // The cards move as they are ranked: ranked ones first, best first, then the rest in their original order.
  // Keys stay with their cards (each shows its number), so "3" always means the card labelled 3.
  function reorder() {
    var list = document.getElementById("candidates");
    var ranked = picks.map(function (p) { return p.item; });
    var rest = items.filter(function (item) { return ranked.indexOf(item) < 0; });
    var order = ranked.concat(rest);
    var current = Array.prototype.slice.call(list.children);
    if (order.every(function (item, i) { return current[i] === item; })) { return; }
    var before = {};
    order.forEach(function (item) { before[item.id] = item.getBoundingClientRect(); });
    order.forEach(function (item) { list.appendChild(item); });
    order.forEach(function (item) { // slide from the old place to the new one (skipped when motion is reduced)
      var now = item.getBoundingClientRect();
      var dx = before[item.id].left - now.left, dy = before[item.id].top - now.top;
      if ((!dx && !dy) || !item.animate || window.matchMedia("(prefers-reduced-motion: reduce)").matches) { return; }
      item.animate([{ transform: "translate(" + dx + "px, " + dy + "px)" }, { transform: "none" }], { duration: 160 });
    });
  }

  function pick(index, tie) {
    var item = items[index];
    if (!item || picks.some(function (p) { return p.item === item; })) { return; }
    picks.push({ item: item, tie: tie });
    render();
  }

  function fromSelects() { // a mouse user may set ranks with the selects directly
    picks = items.filter(function (item) { return rankOf(item).value !== ""; })
      .sort(function (a, b) { return Number(rankOf(a).value) - Number(rankOf(b).value); })
      .map(function (item, i, all) {
        return { item: item, tie: i > 0 && rankOf(all[i - 1]).value === rankOf(item).value };
      });
  }

  function submit(action) {
    form.querySelector("input[name=time_spent_ms]").value = String(Date.now() - started);
    var button = form.querySelector("button[value=" + action + "]");
    form.requestSubmit(button);
  }

  document.addEventListener("DOMContentLoaded", function () {
    form = document.getElementById("ranking-form");
    if (!form) { return; }
    items = Array.prototype.slice.call(form.querySelectorAll("li.candidate"));
    items.forEach(function (item) {
      rankOf(item).addEventListener("change", function () { fromSelects(); render(); });
      var content = item.querySelector(".clampable");
      if (content.textContent.length > 400) {
        content.classList.add("clamped");
        var toggle = document.createElement("button");
        toggle.type = "button";
        toggle.className = "link expand";
        toggle.textContent = "Show all";
        toggle.addEventListener("click", function () {
          var clamped = content.classList.toggle("clamped");
          toggle.textContent = clamped ? "Show all" : "Show less";
        });
        content.after(toggle);
      }
    });
    form.addEventListener("submit", function () {
      form.querySelector("input[name=time_spent_ms]").value = String(Date.now() - started);
    });
    if (window.Sortable) {
      window.Sortable.create(document.getElementById("candidates"), {
        handle: ".drag-handle, .candidate-head", animation: 120,
        onEnd: function () { // the order on screen becomes the ranking (no ties)
          var ordered = Array.prototype.slice.call(form.querySelectorAll("li.candidate"));
          picks = ordered.map(function (item) { return { item: item, tie: false }; });
          render();
        }
      });
    }
    document.addEventListener("keydown", function (event) {
      var target = event.target;
      if (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT") { return; }
      var digit = /^Digit([1-9])$/.exec(event.code);
      if (digit) { event.preventDefault(); pick(Number(digit[1]) - 1, event.shiftKey); return; }
      if (event.key === "Backspace") { event.preventDefault(); picks.pop(); render(); return; }
      if (event.key === "Enter") { event.preventDefault(); submit("rank"); return; }
      if (event.key === "s" || event.key === "S") { event.preventDefault(); submit("skip"); return; }
      if (event.key === "f" || event.key === "F") { event.preventDefault(); submit("flag"); }
    });
    render();
  });
})();
