// IPDC dashboard: one page, hash routes (#/jobs, #/peers, #/tf, #/job/<id>), redrawn from the
// state the controller service streams as server-sent events. No build step, no framework;
// elements are made with h() so no data ever goes through innerHTML.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
let state = null;
let source = null;
let streamFor = null;
const logs = {};  // job id -> {workers, missing} once fetched

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") for (const [p, x] of Object.entries(v)) el.style.setProperty(p, x);
    else if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  return { page: parts[0] || "jobs", id: parts[1] || "" };
}

function connect() {
  const r = route();
  const job = r.page === "job" ? r.id : "";
  if (source && streamFor === job) return;
  if (source) source.close();
  streamFor = job;
  source = new EventSource(`events?token=${encodeURIComponent(token)}&job=${encodeURIComponent(job)}`);
  source.onmessage = (e) => { state = JSON.parse(e.data); setLive(true); render(); };
  source.onerror = () => setLive(false);
}

function setLive(on) {
  const el = document.getElementById("live");
  el.textContent = on ? "live" : "reconnecting…";
  el.className = on ? "live" : "live off";
}

const when = (ts) => ts ? new Date(ts * 1000).toLocaleString() : "-";
const secs = (s) => s === null || s === undefined ? "-" : (s < 60 ? `${s.toFixed(1)}s` : `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`);

function duration(job) {
  if (!job.started_at) return null;
  return (job.finished_at || state.time) - job.started_at;
}

function progressCell(job) {
  const p = job.progress || {};
  let done = 0, total = 0;
  for (const phase of ["map", "reduce"]) if (p[phase]) { done += p[phase][0]; total += p[phase][1]; }
  const frac = job.state === "succeeded" ? 1 : (total ? done / total : 0);
  const text = ["map", "reduce"].filter((k) => p[k]).map((k) => `${k} ${p[k][0]}/${p[k][1]}`).join("  ") || "-";
  return h("td", { class: "progress" }, h("div", { class: "bar", title: text },
    h("div", { style: { width: `${Math.round(frac * 100)}%` } })), h("span", { class: "muted" }, text));
}

function jobsPage() {
  const rows = state.jobs.map((j) => h("tr", { "data-job-id": j.id },
    h("td", { class: "mono" }, h("a", { href: `#/job/${j.id}` }, j.id.slice(0, 12))),
    h("td", { class: "hide-narrow" }, j.kind),
    h("td", {}, h("span", { class: `state ${j.state}` }, j.state)),
    progressCell(j),
    h("td", { class: "hide-narrow" }, when(j.submitted_at)),
    h("td", {}, secs(duration(j))),
    h("td", { class: "hide-narrow mono" }, j.workers.map((w) => w[0]).join(", ") || "-")));
  return [h("h2", {}, "Jobs submitted from this node"),
    rows.length ? h("div", { class: "scroll" }, h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["id", "kind", "state", "progress", "submitted", "duration", "workers"]
        .map((c) => h("th", { class: ["kind", "submitted", "workers"].includes(c) ? "hide-narrow" : "" }, c)))),
      h("tbody", {}, rows)))
      : h("p", { class: "muted" }, "No job yet: run `ipdc mr INPUT` on this node.")];
}

function peersPage() {
  return [h("h2", {}, `Live peers (${state.peers.length})`), h("div", { class: "scroll" }, h("table", { id: "peers" },
    h("thead", {}, h("tr", {}, ["node", "address", "cores", "free MB", "TF", "slots", "load", "tasks running", "seen"]
      .map((c) => h("th", {}, c)))),
    h("tbody", {}, state.peers.map((p) => h("tr", { "data-peer": p.name },
      h("td", { class: "mono", title: p.peer_id }, p.name), h("td", {}, p.host), h("td", {}, p.cores),
      h("td", {}, p.mem_free_mb), h("td", {}, p.tf ? "yes" : "no"), h("td", {}, p.slots),
      h("td", {}, p.load.toFixed(2)), h("td", {}, p.running), h("td", {}, `${p.last_seen_s}s ago`))))))];
}

function tfPage() {
  if (!state.tf.length) return [h("h2", {}, "TF clusters"), h("p", { class: "muted" }, "No TF cluster was started from this node (`ipdc tf SPEC`).")];
  return [h("h2", {}, "TF clusters"), h("div", { class: "scroll" }, h("table", { id: "tf" },
    h("thead", {}, h("tr", {}, ["name", "state", "tasks", "peers"].map((c) => h("th", {}, c)))),
    h("tbody", {}, state.tf.map((c) => h("tr", {},
      h("td", { class: "mono" }, c.name),
      h("td", {}, h("span", { class: `state ${c.up ? "succeeded" : "failed"}` }, c.up ? "up" : "down")),
      h("td", {}, c.tasks.map((t) => `${t.job}:${t.index} ${t.address}`).join(", ")),
      h("td", { class: "mono" }, [...new Set(c.tasks.map((t) => t.peer))].join(", ")))))))];
}

function timeline(job) {
  const attempts = [];
  for (const kind of ["map", "reduce"]) for (const t of job.tasks[kind]) for (const a of t.attempts) attempts.push({ kind, task: t.index, ...a });
  const elapsed = job.started_at ? (job.finished_at || job.now) - job.started_at : 0;
  const span = Math.max(elapsed, ...attempts.map((a) => a.ended || a.started), 0.001);
  const workers = [...new Set([...job.workers.map((w) => w[0]), ...Object.keys(job.lost), ...attempts.map((a) => a.peer)])];
  const lanes = workers.map((w) => {
    const mine = attempts.filter((a) => a.peer === w);
    return h("div", { class: "worker", "data-worker": w },
      h("div", { class: "name", title: w }, w + (job.lost[w] ? " (lost)" : "")),
      h("div", { class: "lane" }, mine.map((a) => {
        const end = a.ended === null ? elapsed : a.ended;
        const label = `${a.kind === "map" ? "m" : "r"}${a.task}#${a.number}`;
        return h("div", { class: `attempt ${a.state} ${a.kind}`, "data-task": `${a.kind}-${a.task}-${a.number}`,
          title: `${a.kind} task ${a.task}, attempt ${a.number}: ${a.state}, ${secs(a.started)} → ${a.ended === null ? "now" : secs(a.ended)}${a.error ? " — " + a.error : ""}`,
          style: { left: `${(a.started / span) * 100}%`, width: `${Math.max(((end - a.started) / span) * 100, 0.5)}%` } }, label);
      })));
  });
  const legend = h("div", { class: "legend" }, [["running", "--run"], ["done", "--ok"], ["failed", "--bad"], ["lost", "--lost"], ["superseded", "--gone"]]
    .map(([name, color]) => h("span", { style: { "--c": `var(${color})` } }, name)));
  return [legend, h("div", { class: "timeline", id: "timeline" }, lanes),
    h("p", { class: "muted" }, `0 → ${secs(span)} since the job started; top track: map tasks (m), bottom: reduce tasks (r), from assigned to reported; #n = attempt`)];
}

function loadLogs(id) {
  logs[id] = { loading: true };
  render();
  fetch(`api/logs?token=${encodeURIComponent(token)}&job=${encodeURIComponent(id)}`)
    .then((r) => r.json()).then((data) => { logs[id] = data; render(); })
    .catch((e) => { logs[id] = { error: String(e) }; render(); });
}

function logsSection(job) {
  const l = logs[job.id];
  const button = h("button", { onclick: () => loadLogs(job.id) }, l && !l.loading ? "Reload logs" : "Load logs");
  if (!l) return [h("h2", {}, "Logs"), button];
  if (l.loading) return [h("h2", {}, "Logs"), h("p", { class: "muted" }, "asking every worker…")];
  if (l.error) return [h("h2", {}, "Logs"), button, h("p", { class: "state failed" }, l.error)];
  return [h("h2", {}, "Logs"), button,
    ...Object.entries(l.workers).map(([w, lines]) => [h("h3", { class: "mono" }, w), h("pre", { class: "logs", "data-logs": w }, lines.join("\n") || "(no lines)")]),
    l.missing.length ? h("p", { class: "muted" }, `no answer from ${l.missing.join(", ")}`) : null];
}

function jobPage(id) {
  const job = state.job;
  if (!job || job.id !== id) return [h("p", { class: "muted" }, `no job ${id} in this node's history`)];
  if (!logs[id] && ["succeeded", "failed", "cancelled"].includes(job.state)) loadLogs(id);
  const count = (kind) => `${job.tasks[kind].filter((t) => t.state === "done" || t.state === "fetched").length}/${job.tasks[kind].length}`;
  return [h("h2", {}, "Job ", h("span", { class: "mono" }, job.id), " ", h("span", { class: `state ${job.state}`, id: "job-state" }, job.state)),
    h("dl", { class: "facts" },
      h("dt", {}, "submitted"), h("dd", {}, `${when(job.submitted_at)} by ${job.node}`),
      h("dt", {}, "duration"), h("dd", {}, secs(duration({ ...job, finished_at: job.finished_at || null })) ),
      h("dt", {}, "tasks"), h("dd", {}, `map ${count("map")}, reduce ${count("reduce")}`),
      h("dt", {}, "output"), h("dd", { class: "mono" }, job.output_dir),
      job.result_cid ? [h("dt", {}, "result"), h("dd", { class: "mono" }, job.result_cid)] : null,
      job.error ? [h("dt", {}, "error"), h("dd", { class: "state failed" }, job.error)] : null),
    h("h2", {}, "Timeline by worker"), timeline(job),
    job.reassigned.length ? [h("h2", {}, "Reassignments"), h("ul", {}, job.reassigned.map((r) =>
      h("li", {}, `${r.kind} task ${r.task}${r.attempt === null ? " (its output)" : ` attempt ${r.attempt}`}: ${r.from} → ${r.to || "the remaining workers"}`)))] : null,
    Object.keys(job.lost).length ? [h("h2", {}, "Lost workers"), h("ul", {}, Object.entries(job.lost).map(([w, why]) => h("li", {}, `${w}: ${why}`)))] : null,
    logsSection(job)];
}

let drawn = "";  // what the page on screen was drawn from: a redraw with the same data is skipped

function render() {
  const r = route();
  connect();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === r.page));
  if (!state) return;
  document.getElementById("node").textContent = `node ${state.node}`;
  const pages = { jobs: [jobsPage, state.jobs], peers: [peersPage, state.peers], tf: [tfPage, state.tf],
                  job: [() => jobPage(r.id), [state.job, logs[r.id]]] };
  const [page, data] = pages[r.page] || pages.jobs;
  const running = (state.jobs || []).some((j) => j.state === "running");  // durations tick
  const key = JSON.stringify([r, data, running ? state.time : 0]);
  if (key === drawn) return;
  drawn = key;
  document.getElementById("main").replaceChildren(...[page()].flat(3).filter(Boolean));
}

window.addEventListener("hashchange", () => { state = state && { ...state, job: null }; render(); });
render();
