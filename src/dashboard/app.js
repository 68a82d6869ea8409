// Tether dashboard: polls /stats and /agents, follows /events, and cleans agents up.
// Every request carries `Authorization: Bearer <token>` when a token is known; the
// token comes from the prompt or the URL fragment `#token=…`, never the query string,
// and is kept in sessionStorage (this tab only).
"use strict";

(function () {
  const STATS_EVERY_MS = 1500;
  const AGENTS_EVERY_MS = 4000;
  const MAX_ROWS = 300;
  const MAX_EVENTS = 200;
  const TOKEN_KEY = "tether.dashboard.token";

  const $ = (id) => document.getElementById(id);
  let token = null;
  let authBlocked = false;
  let agents = [];
  let agentsFetchedAt = 0;
  let agentsInFlight = false;
  let agentsTimer = null;
  let statsTimer = null;
  let statsInFlight = false;
  let eventsAbort = null;
  let eventCount = 0;

  // ---- token -------------------------------------------------------------------

  function readToken() {
    const hash = window.location.hash.replace(/^#/, "");
    if (hash) {
      const params = new URLSearchParams(hash);
      const fromFragment = params.get("token");
      if (fromFragment !== null) {
        try { sessionStorage.setItem(TOKEN_KEY, fromFragment); } catch (_) { /* private mode */ }
        params.delete("token");
        const rest = params.toString();
        const url = window.location.pathname + window.location.search + (rest ? "#" + rest : "");
        history.replaceState(null, "", url);
        return fromFragment;
      }
    }
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (_) { return null; }
  }

  function headers() {
    return token ? { Authorization: "Bearer " + token } : {};
  }

  class Unauthorized extends Error {}

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ headers: headers(), cache: "no-store" }, options || {}));
    if (response.status === 401) {
      let message = "";
      try { message = (await response.json()).error || ""; } catch (_) { /* not JSON */ }
      throw new Unauthorized(message);
    }
    return response;
  }

  function askForToken(message) {
    if (authBlocked) return;
    authBlocked = true;
    stopAll();
    const had = token !== null && token !== "";
    $("token-message").textContent = had
      ? "The server refused this token. Enter the admin token (admin.token)."
      : "This server requires its admin token (admin.token)" + (message ? ": " + message : "") +
        ". It is kept in this tab only (sessionStorage).";
    $("token-prompt").hidden = false;
    $("main").hidden = true;
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    token = value;
    try { sessionStorage.setItem(TOKEN_KEY, value); } catch (_) { /* private mode */ }
    $("token-input").value = "";
    $("token-prompt").hidden = true;
    $("main").hidden = false;
    authBlocked = false;
    startAll();
  });

  // ---- formatting --------------------------------------------------------------

  const dash = "—";
  const isNum = (v) => typeof v === "number" && isFinite(v);
  const int = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : dash);

  function duration(secs) {
    if (!isNum(secs)) return dash;
    if (secs < 60) return secs.toFixed(secs < 10 ? 1 : 0) + " s";
    const m = Math.floor(secs / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
    if (d > 0) return d + "d " + (h % 24) + "h";
    if (h > 0) return h + "h " + (m % 60) + "m";
    return m + "m " + Math.floor(secs % 60) + "s";
  }

  function ms(v) {
    if (!isNum(v)) return dash;
    return (v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)) + " ms";
  }

  function ago(epochSecs) {
    if (!isNum(epochSecs)) return dash;
    return duration(Math.max(0, Date.now() / 1000 - epochSecs)) + " ago";
  }

  function clock(date) {
    return isNaN(date) ? dash : date.toLocaleTimeString("en-GB", { hour12: false });
  }

  function set(id, text) {
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // ---- /stats and /health -----------------------------------------------------

  async function refreshStats() {
    if (statsInFlight || authBlocked) return;
    statsInFlight = true;
    try {
      const response = await api("/stats");
      if (!response.ok) throw new Error("GET /stats: HTTP " + response.status);
      renderStats(await response.json());
    } catch (error) {
      if (error instanceof Unauthorized) askForToken(error.message);
    } finally {
      statsInFlight = false;
    }
    try {
      const health = await fetch("/health", { headers: headers(), cache: "no-store" });
      const report = await health.json();
      const badge = $("health");
      badge.dataset.status = report.status || "unknown";
      badge.textContent = report.status || "unknown";
      badge.title = (report.recommendations || []).join("\n") || "GET /health: no recommendation";
    } catch (_) {
      $("health").dataset.status = "unknown";
      $("health").textContent = "unreachable";
    }
  }

  function renderStats(stats) {
    const c = stats.connections || {};
    const h = stats.heartbeat || {};
    const e = stats.events || {};
    set("agents-registered", int(c.registered_agents));
    set("agents-active", int(c.active_agents));
    set("agents-inactive", int(c.inactive_agents));
    const registered = c.registered_agents || 0;
    $("bar-active").style.width = registered ? (100 * (c.active_agents || 0) / registered) + "%" : "0";
    $("bar-inactive").style.width = registered ? (100 * (c.inactive_agents || 0) / registered) + "%" : "0";
    set("open-sockets", int(c.open_sockets));
    set("peak-concurrent", int(c.peak_concurrent));
    set("stale-declared", int(c.stale_declared));
    set("stale-per-minute", int(c.stale_per_minute));
    set("registrations-per-minute", int(c.registrations_per_minute));
    set("connections-per-minute", int(c.connections_per_minute));
    set("cleanups-per-minute", int(c.cleanups_per_minute));
    set("cleanups-total", int(c.cleanups));
    set("success-rate", isNum(c.success_rate) ? c.success_rate.toFixed(1) + " %" : dash);
    set("failed-registrations", int(c.failed_registrations));
    set("registrations-attempted", int(c.registrations_attempted));
    set("average-connection", duration(c.average_connection_secs));
    set("takeovers", int(c.takeovers));
    set("disconnections", int(c.disconnections));
    const reasons = Object.entries(c.disconnections_by_reason || {})
      .sort((a, b) => b[1] - a[1]).slice(0, 3)
      .map(([reason, n]) => reason + " " + int(n));
    set("disconnection-reasons", reasons.length ? reasons.join(" · ") : "none yet");
    set("uptime", duration(c.uptime_secs));
    const rtt = h.round_trip_ms && typeof h.round_trip_ms === "object"
      ? h.round_trip_ms
      : { p50: h.ping_rtt_p50_ms, p99: h.ping_rtt_p99_ms };
    set("ping-p50", ms(rtt.p50));
    set("ping-p99", ms(rtt.p99));
    set("pings-sent", int(h.pings_sent));
    set("events-published", int(e.published));
    set("sse-subscribers", int(e.sse_subscribers));
    renderPublishers(e.publishers || []);
  }

  function publisherStatus(p) {
    if (p.failed) return "failed";
    if (!p.connected) return "disconnected";
    if (p.dropped > 0) return "dropping";
    return "healthy";
  }

  function renderPublishers(publishers) {
    const list = $("publishers");
    if (publishers.length === 0) {
      list.replaceChildren(el("li", { class: "empty" }, "No publisher configured"));
      return;
    }
    list.replaceChildren(...publishers.map((p) => {
      const status = publisherStatus(p);
      return el("li", { class: "publisher", "data-publisher": p.name, "data-status": status },
        el("span", { class: "dot" }),
        el("b", {}, p.name),
        el("span", { class: "pstatus" }, status),
        el("span", { class: "pnums" },
          int(p.delivered) + " delivered · " + int(p.buffered) + " buffered · " +
          int(p.dropped) + " dropped · " + int(p.retried) + " retried · " +
          int(p.restarts) + " restarts"),
        p.last_error ? el("span", { class: "perror", title: p.last_error }, p.last_error) : null);
    }));
  }

  // ---- /agents ------------------------------------------------------------------

  async function refreshAgents() {
    if (agentsInFlight || authBlocked) return;
    agentsInFlight = true;
    try {
      const response = await api("/agents");
      if (!response.ok) throw new Error("GET /agents: HTTP " + response.status);
      const body = await response.json();
      agents = (body.agents || []).slice().sort((a, b) =>
        a.agent_id < b.agent_id ? -1 : a.agent_id > b.agent_id ? 1 : 0);
      agentsFetchedAt = Date.now();
      $("agents-error").hidden = true;
      renderAgents();
    } catch (error) {
      if (error instanceof Unauthorized) askForToken(error.message);
      else { $("agents-error").textContent = String(error.message || error); $("agents-error").hidden = false; }
    } finally {
      agentsInFlight = false;
    }
  }

  // Lifecycle events refresh the table soon, but a big fleet is not re-read more than
  // every few seconds (its /agents answer is megabytes).
  let agentsSoon = null;
  function refreshAgentsSoon() {
    if (agentsSoon || authBlocked) return;
    const gap = agents.length > 2000 ? AGENTS_EVERY_MS : 1000;
    const wait = Math.max(300, agentsFetchedAt + gap - Date.now());
    agentsSoon = setTimeout(() => { agentsSoon = null; refreshAgents(); refreshStats(); }, wait);
  }

  function matches(agent, query) {
    if (!query) return true;
    const fields = [agent.agent_id, agent.name, agent.state, agent.node_id, agent.remote_addr];
    return fields.some((f) => typeof f === "string" && f.toLowerCase().includes(query));
  }

  let rowElements = new Map();

  function newRow(id) {
    const cleanup = el("button", {
      type: "button", class: "cleanup", "data-action": "cleanup", "data-agent-id": id,
      textContent: "Clean up", title: "DELETE /agents/" + id,
    });
    return el("tr", { "data-agent-id": id },
      el("td", { class: "agent" }, el("span", { class: "id" }, id), el("span", { class: "name" })),
      el("td", {}, el("span", { class: "state" })),
      el("td", { class: "mono" }),
      el("td", {}),
      el("td", {}),
      el("td", { class: "num" }),
      el("td", {}, cleanup));
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function updateRow(row, a) {
    const cells = row.cells;
    const state = a.state || dash;
    if (row.dataset.state !== state) row.dataset.state = state;
    const name = cells[0].lastChild;
    setText(name, a.name && a.name !== a.agent_id ? a.name : "");
    const badge = cells[1].firstChild;
    badge.dataset.state = state;
    setText(badge, state);
    setText(cells[2], typeof a.node_id === "string" ? a.node_id : dash);
    const since = new Date(a.connected_at);
    cells[3].title = a.connected_at || "";
    setText(cells[3], isNaN(since) ? dash : ago(since.getTime() / 1000));
    setText(cells[4], ago(a.last_seen));
    setText(cells[5], ms(a.round_trip_ms));
  }

  function renderAgents() {
    const query = $("search").value.trim().toLowerCase();
    const shown = [];
    let matching = 0;
    for (const agent of agents) {
      if (!matches(agent, query)) continue;
      matching += 1;
      if (shown.length < MAX_ROWS) shown.push(agent);
    }
    // Rows are kept per agent and updated in place, so a re-render never swaps the
    // button under a pointer (or a WebDriver element reference).
    const kept = new Map();
    const rows = shown.map((a) => {
      const row = rowElements.get(a.agent_id) || newRow(a.agent_id);
      updateRow(row, a);
      kept.set(a.agent_id, row);
      return row;
    });
    rowElements = kept;
    if (rows.length === 0) {
      rows.push(el("tr", { class: "empty" }, el("td", { colSpan: 7 },
        agents.length === 0 ? "No agent registered" : "No agent matches")));
    }
    const body = $("agent-rows");
    const same = body.children.length === rows.length &&
      rows.every((row, i) => body.children[i] === row);
    if (!same) body.replaceChildren(...rows);
    const count = $("agent-count");
    count.dataset.shown = String(shown.length);
    count.dataset.matching = String(matching);
    count.dataset.total = String(agents.length);
    count.textContent = "showing " + shown.length.toLocaleString("en-US") + " of " +
      matching.toLocaleString("en-US") +
      (query ? " matching (" + agents.length.toLocaleString("en-US") + " in all)" : "");
  }

  $("search").addEventListener("input", renderAgents);

  $("agent-rows").addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action=cleanup]");
    if (!button) return;
    const id = button.dataset.agentId;
    if (!window.confirm("Clean up agent " + id + "? Its connection is closed and it must register again.")) return;
    button.disabled = true;
    button.textContent = "Cleaning…";
    try {
      const response = await api("/agents/" + encodeURIComponent(id), { method: "DELETE" });
      if (response.status !== 204 && response.status !== 404) {
        let message = "HTTP " + response.status;
        try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
        throw new Error(message);
      }
      agents = agents.filter((a) => a.agent_id !== id);
      renderAgents();
      refreshAgentsSoon();
    } catch (error) {
      if (error instanceof Unauthorized) { askForToken(error.message); return; }
      button.disabled = false;
      button.textContent = "Clean up";
      $("agents-error").textContent = "Cleaning up " + id + " failed: " + (error.message || error);
      $("agents-error").hidden = false;
    }
  });

  // ---- /events (server-sent events over fetch) -----------------------------------

  function setLive(state, text) {
    const badge = $("live");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  // Parses one SSE block into {event, id, data}; null for a comment-only block.
  function parseBlock(block) {
    let event = "message", id = null;
    const data = [];
    let any = false;
    for (const line of block.split(/\r\n|\r|\n/)) {
      if (line === "" || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") { event = value; any = true; }
      else if (field === "id") { id = value; any = true; }
      else if (field === "data") { data.push(value); any = true; }
    }
    return any ? { event, id, data: data.join("\n") } : null;
  }

  // Each start follows the stream anew; a loop left from before a token prompt ends.
  let eventsGeneration = 0;
  async function followEvents() {
    const generation = ++eventsGeneration;
    let backoff = 500;
    while (!authBlocked && generation === eventsGeneration) {
      const controller = new AbortController();
      eventsAbort = controller;
      try {
        setLive("connecting", "connecting");
        const response = await api("/events", { signal: controller.signal, cache: "no-store" });
        if (!response.ok || !response.body) throw new Error("GET /events: HTTP " + response.status);
        setLive("live", "live");
        backoff = 500;
        refreshAgentsSoon();
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let at;
          while ((at = buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
            const block = buffer.slice(0, at);
            buffer = buffer.slice(at + (buffer.startsWith("\r\n\r\n", at) ? 4 : 2));
            const parsed = parseBlock(block);
            if (parsed) onEvent(parsed);
          }
        }
        throw new Error("the event stream ended");
      } catch (error) {
        if (error instanceof Unauthorized) { askForToken(error.message); return; }
        if (controller.signal.aborted) return;
        setLive("down", "reconnecting");
        await new Promise((resolve) => setTimeout(resolve, backoff));
        backoff = Math.min(backoff * 2, 10000);
      }
    }
  }

  function summary(type, data) {
    if (!data || typeof data !== "object") return "";
    const parts = [];
    if (data.reason) parts.push(data.reason);
    if (data.error_code) parts.push(data.error_code);
    if (data.close_code) parts.push("close " + data.close_code);
    if (data.takeover) parts.push("takeover: " + data.takeover);
    if (data.proof) parts.push("by incarnation " + data.by_incarnation + " (" + data.proof + ")");
    if (isNum(data.inactive_secs)) parts.push("quiet " + duration(data.inactive_secs));
    if (isNum(data.connected_secs)) parts.push("connected " + duration(data.connected_secs));
    if (isNum(data.duration_secs)) parts.push("took " + duration(data.duration_secs));
    if (data.name && type.startsWith("network.")) parts.push(data.name);
    if (type === "agent.registered" && data.remote_addr) parts.push(data.remote_addr);
    if (data.node_id) parts.push("node " + data.node_id);
    return parts.join(" · ");
  }

  function onEvent(sse) {
    let doc = null;
    try { doc = JSON.parse(sse.data); } catch (_) { /* not JSON: shown raw */ }
    const type = (doc && doc.type) || sse.event;
    const subject = (doc && (doc.subject || (doc.data && doc.data.agent_id))) || "";
    const time = new Date((doc && doc.time) || Date.now());
    const row = el("li", { class: "event", "data-type": type, "data-subject": subject, "data-id": sse.id },
      el("time", { dateTime: isNaN(time) ? "" : time.toISOString() }, clock(time)),
      el("span", { class: "etype", "data-kind": type.split(".").pop() }, type),
      el("span", { class: "esubject" }, subject),
      el("span", { class: "edetail" }, doc ? summary(type, doc.data) : sse.data));
    const list = $("events");
    list.prepend(row);
    while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
    eventCount += 1;
    set("event-count", eventCount.toLocaleString("en-US") + " received");
    if (type.startsWith("agent.")) refreshAgentsSoon();
  }

  // ---- start / stop ---------------------------------------------------------------

  function stopAll() {
    clearInterval(statsTimer);
    clearInterval(agentsTimer);
    clearTimeout(agentsSoon);
    agentsSoon = null;
    if (eventsAbort) eventsAbort.abort();
    setLive("down", "stopped");
  }

  function startAll() {
    refreshStats();
    refreshAgents();
    statsTimer = setInterval(refreshStats, STATS_EVERY_MS);
    agentsTimer = setInterval(refreshAgents, AGENTS_EVERY_MS);
    followEvents();
  }

  // Relative times ("12 s ago") age between fetches.
  setInterval(() => { if (!authBlocked && agents.length <= MAX_ROWS * 4) renderAgents(); }, 5000);

  token = readToken();
  startAll();
})();
