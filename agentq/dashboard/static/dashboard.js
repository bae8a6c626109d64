// agentq dashboard: live updates. The server sends one event per log event the
// logged-in agent may see; a page whose content it touches reloads that content
// (the part of the page below its controls) from the server, at most every 150 ms.
// Nothing else runs in the browser: every page works without this script.
(function () {
  "use strict";
  var live = document.body.dataset.live;
  var region = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!live || !region || !window.EventSource) {
    return;
  }
  var related = live === "all" ? null : new Set(live.split(" "));
  var pending = false;
  var running = false;

  function show(text, title) {
    if (status) {
      status.textContent = text;
      status.title = title;
    }
  }

  function refresh() {
    if (running) {
      pending = true;
      return;
    }
    running = true;
    pending = false;
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) {
        if (answer.status === 401) {
          window.location.reload();
          return null;
        }
        return answer.ok ? answer.text() : null;
      })
      .then(function (html) {
        // Not while the user types into one of the content's forms.
        var typing = document.activeElement && region.contains(document.activeElement) &&
          document.activeElement.tagName === "INPUT" && document.activeElement.value;
        if (html !== null && !typing) {
          region.innerHTML = html;
          document.body.dispatchEvent(new CustomEvent("agentq:refreshed"));
        }
      })
      .catch(function () { /* the next event tries again */ })
      .finally(function () {
        running = false;
        if (pending) {
          window.setTimeout(refresh, 150);
        }
      });
  }

  var timer = null;
  function soon() {
    if (timer === null) {
      timer = window.setTimeout(function () { timer = null; refresh(); }, 50);
    }
  }

  var source = new EventSource("/events");
  source.addEventListener("ready", function () { show("●", "live"); });
  source.addEventListener("open", function () { show("●", "live"); });
  source.addEventListener("error", function () { show("○", "reconnecting…"); });
  source.addEventListener("reload", soon);
  source.addEventListener("logout", function () {
    source.close();
    window.location.assign("/login");
  });
  source.addEventListener("message", function (message) {
    var event = JSON.parse(message.data);
    if (related === null || related.has(event.jobId)) {
      soon();
    }
  });
})();
