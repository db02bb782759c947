// bulkhook dashboard: live updates from /ui/stream (Server-Sent Events), the job
// actions, and the failed records. Plain JavaScript: no build step, no libraries.
// The server renders every row and fragment; this only puts them in place.
"use strict";

(function () {
  const page = document.body.dataset.page;
  const live = document.getElementById("live");

  function status(text, on) {
    if (!live) return;
    live.hidden = false;
    live.textContent = text;
    live.className = "live " + (on ? "on" : "off");
  }

  function age(ms) {
    const s = Math.max(0, ms / 1000);
    if (s >= 86400) return Math.floor(s / 86400) + "d";
    if (s >= 3600) return Math.floor(s / 3600) + "h";
    if (s >= 60) return Math.floor(s / 60) + "m";
    return Math.floor(s) + "s";
  }

  function element(html) {
    const template = document.createElement("template");
    template.innerHTML = html.trim();
    return template.content.firstElementChild;
  }

  function subscribe(url, handlers) {
    if (!window.EventSource) return null;
    const source = new EventSource(url);
    source.onopen = () => status("live", true);
    source.onerror = () => {
      // The server ends each stream now and then; the browser reconnects by itself.
      status(source.readyState === EventSource.CLOSED ? "updates stopped: reload" : "reconnecting…", false);
    };
    for (const name of Object.keys(handlers)) {
      source.addEventListener(name, (event) => handlers[name](JSON.parse(event.data), source));
    }
    return source;
  }

  function jobsPage() {
    const table = document.getElementById("jobs");
    const body = table.tBodies[0];
    const wanted = table.dataset.state;
    const search = table.dataset.search;
    const instance = table.dataset.instance;
    const paged = table.dataset.paged === "1";

    function belongs(job) {
      if (paged) return false;
      if (wanted && job.state !== wanted) return false;
      if (instance && job.instance !== instance) return false;
      return !search || job.id.startsWith(search.toLowerCase()) || job.upstream_id === search;
    }

    subscribe("/ui/stream?since=" + encodeURIComponent(table.dataset.since), {
      job(data) {
        const row = element(data.row);
        const shown = document.getElementById("job-" + data.job.id);
        if (shown) {
          if (shown.dataset.state !== data.job.state) row.classList.add("changed");
          shown.replaceWith(row);
          return;
        }
        if (!belongs(data.job)) return;
        const empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        row.classList.add("changed");
        // Newest first: ids sort by creation time.
        const after = Array.from(body.rows).find((r) => r.id && r.id.slice(4) < data.job.id);
        body.insertBefore(row, after || null);
      },
      callbacks(data) {
        document.getElementById("callbacks").innerHTML = data.panel;
      },
    });

    setInterval(() => {
      for (const row of body.querySelectorAll("tr.job")) {
        const cell = row.querySelector(".age");
        if (cell) cell.textContent = age(Date.now() - Number(row.dataset.created));
      }
    }, 10000);
  }

  function jobPage() {
    const box = document.getElementById("job");
    const id = box.dataset.job;
    const base = "/ui/jobs/" + encodeURIComponent(id);
    const failed = document.getElementById("failed-body");
    const result = document.getElementById("action-result");
    let loaded = false;

    async function loadFailed(url) {
      loaded = true;
      try {
        const response = await fetch(url || base + "/failed", { credentials: "same-origin" });
        failed.innerHTML = await response.text();
      } catch (error) {
        loaded = false;
        failed.textContent = "The failed records could not be loaded.";
      }
    }

    // A download has no failed records (and no such section): its result is in the detail.
    if (failed) {
      if (box.dataset.failed === "1") loadFailed();

      // The failed records come a page at a time: their pager loads the next page here.
      failed.addEventListener("click", (event) => {
        const link = event.target.closest("a[data-fragment]");
        if (!link) return;
        event.preventDefault();
        loadFailed(link.getAttribute("href"));
      });
    }

    subscribe("/ui/stream?job=" + encodeURIComponent(id), {
      job(data) {
        document.getElementById("detail").innerHTML = data.detail;
        if (!failed) return;
        if (!loaded && data.has_failed) loadFailed();
        else if (!loaded && data.terminal) failed.innerHTML = '<p class="quiet">None.</p>';
      },
      gone(data, source) {
        source.close();
        status("the job is gone", false);
      },
    });

    document.addEventListener("click", async (event) => {
      const button = event.target.closest("button[data-action]");
      if (!button) return;
      const action = button.dataset.action;
      if (action === "cancel" && !window.confirm("Cancel job " + id + " upstream?")) return;
      button.disabled = true;
      result.className = "";
      result.textContent = action === "cancel" ? "Cancelling…" : "Asking the upstream…";
      try {
        const response = await fetch(base + "/" + action, {
          method: "POST",
          credentials: "same-origin",
          headers: { Accept: "application/json" },
        });
        const answer = await response.json().catch(() => ({}));
        if (response.ok) {
          result.className = "ok";
          result.textContent = (action === "cancel" ? "Cancel sent" : "Refreshed") + ": the job is " + answer.state + ".";
        } else {
          result.className = "bad";
          result.textContent = (answer.error && answer.error.message) || "Failed (HTTP " + response.status + ").";
        }
      } catch (error) {
        result.className = "bad";
        result.textContent = "The service did not answer.";
      } finally {
        button.disabled = false;
      }
    });
  }

  if (page === "index") jobsPage();
  if (page === "job") jobPage();
})();
