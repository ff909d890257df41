// powerq fleet page: reads GET /fleet/events (server-sent events) with fetch(), so that the
// read token travels in an Authorization header, never in a URL. The token is kept in
// sessionStorage (gone when the tab closes) and never written into the document.
"use strict";

(() => {
  const KEY = "powerq.fleet.token";
  const EVENTS = "/fleet/events";
  const NAMES = { n: "on", f: "off", u: "unknown", "-": "unknown" };
  const $ = (id) => document.getElementById(id);

  let nodes = [];        // by layout position: {name, rack, ptype, pdu, code, at, err}
  let cells = [];        // the matching DOM cells
  let fresh = 60, stale = 900;
  let controller = null;
  let retryDelay = 1;
  let retryTimer = null;

  const clock = () => Date.now() / 1000;

  function status(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.dataset.status = kind;
  }

  function ageText(seconds) {
    if (seconds === null || seconds < 0) return "-";
    if (seconds < 120) return `${Math.round(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
    return `${(seconds / 86400).toFixed(1)} d`;
  }

  function ageOf(node, now) {
    return node.at === null ? null : Math.max(0, now - node.at);
  }

  function classOf(node, now) {
    const age = ageOf(node, now);
    const state = node.err ? "error" : NAMES[node.code] || "unknown";
    let cls = "cell " + state;
    if (node.code === "-" && !node.err) cls += " never";
    if (age !== null) cls += age < fresh ? " fresh" : age < stale ? " aging" : " stale";
    return cls;
  }

  function paint(i, now) {
    const cls = classOf(nodes[i], now);
    if (cells[i].className !== cls) cells[i].className = cls;
  }

  function describe(node, now) {
    const age = ageOf(node, now);
    const lines = [
      `${node.name} (rack ${node.rack}, ${node.ptype}${node.pdu ? ", pdu " + node.pdu : ""})`,
      node.code === "-" ? "state: never read" : `state: ${NAMES[node.code]}, ${ageText(age)} ago`,
    ];
    if (node.err) {
      const errAge = node.err.at === null ? "" : `, ${ageText(now - node.err.at)} ago`;
      lines.push(`last error: ${node.err.code}${errAge}`);
      if (node.err.message) lines.push(node.err.message);
    }
    return lines.join("\n");
  }

  function percentile(sorted, p) {
    if (!sorted.length) return null;
    const k = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
    return sorted[k];
  }

  function header(now) {
    const counts = { on: 0, off: 0, unknown: 0, error: 0 };
    const ages = [];
    let never = 0;
    for (const node of nodes) {
      counts[node.err ? "error" : NAMES[node.code] || "unknown"] += 1;
      const age = ageOf(node, now);
      if (age === null) never += 1; else ages.push(age);
    }
    ages.sort((a, b) => a - b);
    for (const [k, v] of Object.entries(counts)) $("count-" + k).textContent = v;
    $("count-total").textContent = nodes.length;
    for (const p of [50, 90, 99]) $("age-p" + p).textContent = ageText(percentile(ages, p));
    $("age-max").textContent = ageText(ages.length ? ages[ages.length - 1] : null);
    $("age-never").textContent = never;
  }

  function setNode(i, code, age, err, now) {
    const node = nodes[i];
    if (!node) return;
    node.code = code;
    node.at = age < 0 ? null : now - age;
    node.err = err ? { code: err[0], message: err[1], at: err[2] === null ? null : now - err[2] } : null;
    paint(i, now);
    // A visible tooltip is refreshed as the pointer moves; others are set on hover.
    if (cells[i].matches(":hover")) cells[i].title = describe(node, now);
  }

  // -- stream events
  function onLayout(data) {
    fresh = data.fresh;
    stale = data.stale;
    $("fresh-age").textContent = ageText(fresh);
    $("stale-age").textContent = ageText(stale);
    $("legend").hidden = false;
    const main = $("racks");
    main.replaceChildren();
    nodes = [];
    cells = [];
    for (const rack of data.racks) {
      const box = document.createElement("section");
      box.className = "rack";
      box.dataset.rack = rack.name;
      const title = document.createElement("h2");
      title.textContent = `${rack.name} (${rack.nodes.length})`;
      const grid = document.createElement("div");
      grid.className = "grid";
      const cols = Math.min(16, Math.max(1, Math.ceil(Math.sqrt(rack.nodes.length))));
      grid.style.setProperty("--cols", String(cols));
      for (const [name, ptype, pdu] of rack.nodes) {
        const cell = document.createElement("div");
        cell.className = "cell unknown never";
        cell.dataset.node = name;
        cell.dataset.index = String(nodes.length);
        nodes.push({ name, rack: rack.name, ptype, pdu, code: "-", at: null, err: null });
        cells.push(cell);
        grid.append(cell);
      }
      box.append(title, grid);
      main.append(box);
    }
  }

  function onSnapshot(data) {
    const now = clock();
    for (let i = 0; i < nodes.length; i++) {
      const err = data.errors[String(i)] || null;
      setNode(i, data.state[i] || "-", data.age[i] ?? -1, err, now);
    }
    header(now);
    document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
  }

  function onChange(data) {
    const now = clock();
    for (const [i, [code, age, err]] of Object.entries(data.nodes)) setNode(Number(i), code, age, err, now);
    header(now);
    document.body.dataset.changes = String(Number(document.body.dataset.changes || 0) + 1);
  }

  const HANDLERS = { layout: onLayout, snapshot: onSnapshot, change: onChange };

  function dispatch(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    const handler = HANDLERS[event];
    if (handler && data.length) handler(JSON.parse(data.join("\n")));
  }

  // -- connection
  function retry() {
    status(`reconnecting in ${retryDelay} s`, "retrying");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, retryDelay * 1000);
    retryDelay = Math.min(30, retryDelay * 2);
  }

  async function connect() {
    const token = sessionStorage.getItem(KEY);
    if (!token) return askToken("");
    if (controller) controller.abort();
    controller = new AbortController();
    status("connecting", "connecting");
    let response;
    try {
      response = await fetch(EVENTS, {
        headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
        cache: "no-store", signal: controller.signal,
      });
    } catch (exc) {
      return retry();
    }
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(KEY);
      return askToken(response.status === 401 ? "that token was refused" : "that token cannot read");
    }
    if (!response.ok || !response.body) return retry();
    status("live", "live");
    $("forget").hidden = false;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let received = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        received = true;
        retryDelay = 1;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (exc) {
      if (controller.signal.aborted) return;
    }
    if (received) {  // the server ends a stream after POWERQ_FLEET_STREAM_SECONDS
      status("reconnecting", "connecting");
      clearTimeout(retryTimer);
      retryTimer = setTimeout(connect, 200);
    } else {
      retry();
    }
  }

  function askToken(note) {
    status(note ? "token refused" : "no token", note ? "refused" : "idle");
    $("login-note").textContent = note;
    $("login").hidden = false;
    $("forget").hidden = true;
    $("token").focus();
  }

  function init() {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      const token = input.value.trim();
      input.value = "";
      if (!token) return;
      sessionStorage.setItem(KEY, token);
      $("login").hidden = true;
      retryDelay = 1;
      connect();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      if (controller) controller.abort();
      clearTimeout(retryTimer);
      askToken("");
    });
    $("racks").addEventListener("mouseover", (event) => {
      const cell = event.target.closest(".cell");
      if (cell) cell.title = describe(nodes[Number(cell.dataset.index)], clock());
    });
    setInterval(() => {  // ages move on between snapshots: re-shade and re-count
      const now = clock();
      for (let i = 0; i < nodes.length; i++) paint(i, now);
      header(now);
    }, 1000);
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
