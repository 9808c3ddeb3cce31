// Chat: stream answers over server-sent events into their placeholders; Stop; Enter to send; confirm deletes.
(function () {
  "use strict";

  function csrfToken() {
    var headers = document.body.getAttribute("hx-headers");
    try { return JSON.parse(headers)["X-CSRF-Token"]; } catch (e) { return ""; }
  }

  function startStream(box) {
    if (box.dataset.started) return;
    box.dataset.started = "1";
    var article = box.closest("article");
    var stopButton = article.querySelector("button.stop");
    var source = new EventSource(box.dataset.streamUrl);
    var finished = false;

    function finish() {
      if (finished) return;
      finished = true;
      source.close();
      htmx.ajax("GET", box.dataset.finalUrl, { target: "#" + article.id, swap: "outerHTML" });
    }
    source.addEventListener("delta", function (event) {
      box.textContent += JSON.parse(event.data).text; // textContent: model output is never parsed as HTML
      article.scrollIntoView({ block: "end" });
    });
    source.addEventListener("done", finish);
    source.onerror = function () { if (!finished) { finish(); } };
    if (stopButton) {
      stopButton.addEventListener("click", function () {
        stopButton.disabled = true;
        fetch(box.dataset.stopUrl, { method: "POST", headers: { "X-CSRF-Token": csrfToken() } })
          .finally(function () { setTimeout(finish, 300); });
      });
    }
  }

  function scan(root) {
    (root || document).querySelectorAll("[data-stream-url]").forEach(startStream);
  }

  document.addEventListener("DOMContentLoaded", function () {
    scan(document);
    var input = document.getElementById("message-input");
    if (input) {
      input.addEventListener("keydown", function (event) {
        if (event.key === "Enter" && !event.shiftKey) {
          event.preventDefault();
          if (input.value.trim()) { htmx.trigger(input.form, "submit"); }
        }
      });
      var count = document.getElementById("message-count");
      if (count) {  // the character cap made visible: the text box never cuts a message silently
        input.addEventListener("input", function () {
          count.textContent = input.value.length + " / " + input.dataset.maxChars + " characters";
        });
      }
      input.focus();
    }
  });
  document.addEventListener("htmx:load", function (event) { scan(event.target); });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.target.id === "composer" && event.detail.successful) { event.target.reset(); }
  });
  document.addEventListener("submit", function (event) {
    var button = event.submitter;
    if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) { event.preventDefault(); }
  }, true);
})();
