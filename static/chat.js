// Chat: stream answers over server-sent events; render answers as sanitized markdown; Stop; Copy; Enter to send;
// show why a message was refused; confirm deletes.
//
// Model output is untrusted. Markdown is parsed by marked with raw HTML turned into text, then DOMPurify keeps only
// the tags markdown makes (no images, no attributes but href/title, only http(s)/mailto links); the result is
// inserted as a DOM fragment. Without these libraries the answer stays plain text (textContent).
(function () {
  "use strict";

  var ALLOWED_TAGS = ["p", "br", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a", "hr",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td"];
  var PURIFY = {
    ALLOWED_TAGS: ALLOWED_TAGS,
    ALLOWED_ATTR: ["href", "title", "start", "align"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
    RETURN_DOM_FRAGMENT: true
  };
  var sources = new WeakMap(); // element -> the markdown it shows (what Copy copies)
  var parser = null;

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function markdownParser() {
    if (parser || !window.marked || !window.DOMPurify) return parser;
    parser = new window.marked.Marked({ gfm: true, breaks: true, async: false });
    parser.use({
      renderer: {
        // Raw HTML in an answer is shown as the text it is, never as markup.
        html: function (token) {
          var text = escapeHtml(token.text);
          return token.block ? "<p>" + text.trim().replace(/\n/g, "<br>") + "</p>" : text;
        },
        // No images (they would load from anywhere): a link with the alt text.
        image: function (token) {
          return '<a href="' + escapeHtml(token.href) + '">' + escapeHtml(token.text || token.href) + "</a>";
        }
      }
    });
    window.DOMPurify.addHook("afterSanitizeAttributes", function (node) {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("rel", "noopener noreferrer nofollow");
        node.setAttribute("target", "_blank");
      }
    });
    return parser;
  }

  function renderMarkdown(el, source) {
    sources.set(el, source);
    var md = markdownParser();
    if (!md) { el.textContent = source; return; }
    el.replaceChildren(window.DOMPurify.sanitize(md.parse(source), PURIFY));
    el.classList.add("rendered");
  }

  function renderAll(root) {
    root.querySelectorAll(".content.markdown:not([data-stream-url]):not(.rendered)").forEach(function (el) {
      renderMarkdown(el, el.textContent);
    });
  }

  function csrfToken() {
    var headers = document.body.getAttribute("hx-headers");
    try { return JSON.parse(headers)["X-CSRF-Token"]; } catch (e) { return ""; }
  }

  function showError(text) {
    var toast = document.getElementById("toast");
    if (!toast) return;
    var p = document.createElement("p");
    p.className = "toast error";
    p.textContent = text;
    toast.replaceChildren(p);
  }

  function startStream(box) {
    if (box.dataset.started) return;
    box.dataset.started = "1";
    var article = box.closest("article");
    var stopButton = article.querySelector("button.stop");
    var source = new EventSource(box.dataset.streamUrl);
    var finished = false;
    var text = "";
    var pending = false;

    function finish() {
      if (finished) return;
      finished = true;
      source.close();
      htmx.ajax("GET", box.dataset.finalUrl, { target: "#" + article.id, swap: "outerHTML" });
    }
    source.addEventListener("delta", function (event) {
      text += JSON.parse(event.data).text;
      if (pending) return;
      pending = true;
      setTimeout(function () { // re-render at most every 40 ms, not once per token
        pending = false;
        renderMarkdown(box, text);
        article.scrollIntoView({ block: "end" });
      }, 40);
    });
    source.addEventListener("error", function (event) {
      if (event.data) { showError("No answer: " + JSON.parse(event.data).detail); } // refused before a token
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

  // The answer settings (posted with each message) are kept in this browser, across chats and after each send.
  var SETTINGS = ["temperature", "top_p", "max_tokens"];

  function restoreSettings() {
    var form = document.getElementById("composer");
    if (!form) return;
    SETTINGS.forEach(function (name) {
      var value = null;
      try { value = window.localStorage.getItem("flywheel.chat." + name); } catch (e) { value = null; }
      if (value !== null && form.elements[name]) { form.elements[name].value = value; }
    });
  }

  document.addEventListener("change", function (event) {
    var input = event.target;
    if (input.form && input.form.id === "composer" && SETTINGS.indexOf(input.name) >= 0) {
      try { window.localStorage.setItem("flywheel.chat." + input.name, input.value); } catch (e) { /* private mode */ }
    }
  });

  function scan(root) {
    root = root || document;
    restoreSettings();
    renderAll(root);
    root.querySelectorAll("[data-stream-url]").forEach(startStream);
    var input = root.querySelector ? root.querySelector("#message-input") : null;
    if (input) { input.focus(); }
  }

  document.addEventListener("DOMContentLoaded", function () { scan(document); });
  document.addEventListener("htmx:load", function (event) { scan(event.target); });

  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (event.key !== "Enter" || event.shiftKey) return;
    if (target.id === "message-input") {
      event.preventDefault();
      if (target.value.trim()) { htmx.trigger(target.form, "submit"); }
    } else if (target.matches(".feedback input[name=comment]")) {
      event.preventDefault(); // Enter in the comment saves it (change), it does not click the first thumb
      target.blur();
    }
  });
  document.addEventListener("input", function (event) {
    var input = event.target;
    var count = document.getElementById("message-count");
    if (input.id === "message-input" && count) { // the character cap made visible: never a silent cut
      count.textContent = input.value.length + " / " + input.dataset.maxChars + " characters";
    }
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (!button) return;
    var content = button.closest("article").querySelector(":scope > .content");
    window.flywheelCopy(sources.has(content) ? sources.get(content) : content.textContent, button);
  });

  // A refused message (too long for the model, too many characters, no model) keeps its text in the box and says
  // why beside it, as well as in the toast.
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.target.id !== "composer") return;
    var error = document.getElementById("composer-error");
    if (event.detail.successful) {
      event.target.reset();
      restoreSettings();
      if (error) { error.textContent = ""; }
      var count = document.getElementById("message-count");
      if (count) { count.textContent = ""; }
    } else if (error) {
      var toast = document.querySelector("#toast .toast");
      error.textContent = toast ? toast.textContent : "The message was not sent (the server did not answer).";
    }
  });
  document.addEventListener("htmx:afterSettle", function () {
    var title = document.getElementById("chat-title");
    if (title) { document.title = title.textContent + " · Flywheel"; }
  });
  document.addEventListener("submit", function (event) {
    var button = event.submitter;
    if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) { event.preventDefault(); }
  }, true);
})();
