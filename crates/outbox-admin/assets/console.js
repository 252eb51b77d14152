// The console's one script. Live parts of its pages: every element with
// data-refresh (a URL on this server answering its new inner HTML) is
// fetched again every 2 s while the tab is visible, and not at all while it
// is hidden. A session that has ended sends the page to the sign-in form.
//
// Times come from the server in UTC (<time datetime=…>); they are shown in
// the browser's time zone, with UTC kept in the tooltip.
(() => {
  "use strict";
  const local = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short",
  });
  const localize = (root) => {
    for (const el of root.querySelectorAll("time[datetime]")) {
      const at = new Date(el.getAttribute("datetime"));
      if (!Number.isNaN(at.getTime())) el.textContent = local.format(at);
    }
  };
  localize(document);
  // Time inputs marked data-utc hold UTC from the server: shown in the
  // browser's zone, sent back in UTC (without the script they stay UTC, as
  // their label says).
  const pad = (n) => String(n).padStart(2, "0");
  const asLocalInput = (d) =>
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}` +
    `T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  for (const input of document.querySelectorAll("input[data-utc]")) {
    const at = new Date(`${input.value}Z`);
    if (input.value && !Number.isNaN(at.getTime())) input.value = asLocalInput(at);
  }
  // An error page's Back returns to the page the action came from, with
  // what was typed in its form (without the script: the list of apps).
  for (const back of document.querySelectorAll("a[data-back]")) {
    if (window.history.length > 1) {
      back.addEventListener("click", (event) => {
        event.preventDefault();
        window.history.back();
      });
    }
  }
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  for (const label of document.querySelectorAll("[data-zone]")) label.textContent = `(${zone})`;
  // Forms marked data-confirm ask before they change anything. Without the
  // script they submit at once; nothing they do is lost (a replay or an
  // ignore is in the audit log, a pause is undone by a resume).
  // A form acting on ticked boxes (data-needs-ticked: their name) says so
  // when none is ticked; its question names the button's action ({action})
  // and how many are ticked ({n}).
  document.addEventListener("submit", (event) => {
    const form = event.target;
    const needs = form.dataset?.needsTicked;
    const ticked = needs ? form.querySelectorAll(`input[name="${CSS.escape(needs)}"]:checked`).length : 0;
    if (needs && ticked === 0) {
      event.preventDefault();
      window.alert("Tick the ones to act on first.");
      return;
    }
    const action = event.submitter?.textContent?.trim().split(" ")[0] ?? "Act on";
    const question = form.dataset?.confirm
      ?.replaceAll("{action}", () => action)
      .replaceAll("{n}", () => String(ticked));
    if (question && !window.confirm(question)) {
      event.preventDefault();
      return;
    }
    for (const input of form.querySelectorAll("input[data-utc]")) {
      const at = new Date(input.value);
      if (!input.value || Number.isNaN(at.getTime())) continue;
      const utc = document.createElement("input");
      utc.type = "hidden";
      utc.name = input.name;
      utc.value = at.toISOString();
      input.disabled = true;
      input.after(utc);
    }
  });
  const parts = document.querySelectorAll("[data-refresh]");
  if (parts.length === 0) return;
  let timer = null;
  const refresh = async () => {
    for (const part of parts) {
      try {
        const res = await fetch(part.dataset.refresh, {
          credentials: "same-origin",
          headers: { Accept: "text/html" },
        });
        if (res.redirected) {
          window.location.reload();
          return;
        }
        if (res.ok) {
          part.innerHTML = await res.text();
          localize(part);
        }
      } catch (_) {
        // The server is restarting or the network dropped: the next tick tries again.
      }
    }
  };
  const start = () => {
    if (timer === null) timer = window.setInterval(refresh, 2000);
  };
  const stop = () => {
    if (timer !== null) window.clearInterval(timer);
    timer = null;
  };
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      stop();
    } else {
      refresh();
      start();
    }
  });
  if (!document.hidden) start();
})();
