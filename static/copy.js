// Copy to the clipboard: `window.flywheelCopy(text)` for scripts, and any <button data-copy-from="#id"> copies
// that element's text. The Clipboard API needs a secure context (https or localhost); elsewhere (a server reached
// over plain http by address) a hidden text area and execCommand("copy") do the same.
(function () {
  "use strict";

  function fallbackCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    return ok ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  function copy(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return fallbackCopy(text); });
    }
    return fallbackCopy(text);
  }

  function confirmOn(button, ok) {
    var label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    button.textContent = ok ? "Copied" : "Copy failed: select and copy by hand";
    setTimeout(function () { button.textContent = label; }, 1500);
  }

  window.flywheelCopy = function (text, button) {
    return copy(text).then(
      function () { if (button) confirmOn(button, true); },
      function () { if (button) confirmOn(button, false); }
    );
  };

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-copy-from]");
    if (!button) return;
    var source = document.querySelector(button.dataset.copyFrom);
    if (source) { window.flywheelCopy(source.textContent.trim(), button); }
  });
})();
