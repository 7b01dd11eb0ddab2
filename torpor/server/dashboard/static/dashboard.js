// torpor dashboard: progressive enhancement only (every page works without it).
// Live view: the log's SSE stream says "something was appended"; the page then asks the
// server for the rendered entries after the last one it shows (one renderer: Jinja, escaped).
"use strict";

function relTime(iso) {
  const t = Date.parse(iso);
  if (isNaN(t)) return null;
  const d = Math.max(0, (Date.now() - t) / 1000);
  if (d < 45) return "just now";
  if (d >= 86400) return Math.floor(d / 86400) + " d ago";
  if (d >= 3600) return Math.floor(d / 3600) + " h ago";
  return Math.floor(d / 60) + " min ago";
}

function refreshTimes(root) {
  (root || document).querySelectorAll("time[data-rel]").forEach((el) => {
    const s = relTime(el.getAttribute("datetime"));
    if (s) el.textContent = s;
  });
}

function busyButtons(root) {
  (root || document).querySelectorAll("form").forEach((f) => {
    if (f.dataset.bound) return;
    f.dataset.bound = "1";
    f.addEventListener("submit", () => {
      const b = f.querySelector("button[data-busy]");
      if (b) {
        // disabled after this event: the submit itself still goes out
        setTimeout(() => { b.disabled = true; b.textContent = b.dataset.busy; }, 0);
      }
    });
  });
}

function live() {
  const box = document.getElementById("transcript");
  if (!box) return;
  const sid = box.dataset.session;
  let last = parseInt(box.dataset.lastSeq || "0", 10);
  let status = box.dataset.status;
  let inflight = false, again = false;
  const liveBar = document.getElementById("live");

  function showStatus(st) {
    const pill = document.querySelector("#status .pill");
    if (pill && st) { pill.className = "pill pill-" + st; pill.textContent = st; }
    if (liveBar) liveBar.classList.toggle("on", st === "working");
    box.dataset.status = st;
  }

  async function refreshSide() {
    // the checkpoint timeline and forks after a turn ends: from the page itself
    const r = await fetch(location.pathname, { credentials: "same-origin" });
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    for (const sel of [".side-col", ".facts", ".actions"]) {
      const mine = document.querySelector(sel), theirs = doc.querySelector(sel);
      if (mine && theirs) mine.replaceWith(theirs);
    }
    busyButtons(document);
    refreshTimes(document);
  }

  async function pull() {
    if (inflight) { again = true; return; }
    inflight = true;
    try {
      const r = await fetch(`/sessions/${encodeURIComponent(sid)}/entries?after=${last}`,
        { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!r.ok) return;
      const html = await r.text();
      const newLast = parseInt(r.headers.get("X-Last-Seq") || "0", 10);
      for (const s of (r.headers.get("X-Superseded") || "").split(",")) {
        const el = s && document.getElementById("e" + s);
        if (el) el.classList.add("gone");
      }
      if (newLast > last) {
        const tpl = document.createElement("template");
        tpl.innerHTML = html;
        let checkpointed = false;
        tpl.content.querySelectorAll("article.entry").forEach((a) => {
          if (document.getElementById(a.id)) return;
          checkpointed = checkpointed || a.classList.contains("e-checkpoint");
          box.appendChild(a);
        });
        if (checkpointed) refreshSide();  // a new checkpoint: the timeline grows
        last = newLast;
        box.dataset.lastSeq = String(last);
        busyButtons(box);
        const end = box.lastElementChild;
        if (end) end.scrollIntoView({ block: "nearest" });
      }
      const st = r.headers.get("X-Status");
      const was = status;
      status = st || status;
      showStatus(status);
      if (was === "working" && status !== was) refreshSide();
    } finally {
      inflight = false;
      if (again) { again = false; pull(); }
    }
  }

  const url = box.dataset.stream;
  if (url && window.EventSource) {
    const es = new EventSource(url + (url.includes("?") ? "&" : "?") + "after=" + last);
    const poke = () => pull();
    es.onmessage = poke;
    for (const name of ["entry", "log", "append"]) es.addEventListener(name, poke);
  }
  // a slow poll as well, while a turn runs: covers a stream that names events differently
  setInterval(() => { if (box.dataset.status === "working") pull(); }, 3000);
  showStatus(status);
  pull();
  if (location.hash === "#live") setTimeout(pull, 1500);  // a send just started a turn
}

function autoRefresh() {
  // lists kept open all day: re-read the page now and then and swap the list in place
  document.querySelectorAll("[data-refresh][id]").forEach((el) => {
    const every = Math.max(5, parseInt(el.dataset.refresh, 10) || 10) * 1000;
    setInterval(async () => {
      if (document.hidden) return;
      const r = await fetch(location.href, { credentials: "same-origin" });
      if (!r.ok || r.redirected) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.getElementById(el.id);
      const mine = document.getElementById(el.id);
      if (fresh && mine) { mine.replaceWith(fresh); refreshTimes(fresh); }
    }, every);
  });
}

function composer() {
  const ta = document.getElementById("message");
  if (!ta) return;
  ta.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); ta.form.requestSubmit(); }
  });
  if (location.hash === "#live") ta.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  refreshTimes();
  setInterval(refreshTimes, 30000);
  busyButtons();
  live();
  composer();
  autoRefresh();
});
