// The live page: a ticker of every channel the server carries, built on Odin's JavaScript
// client (./odin-client.js). No build step, no dependencies: an ES module the server serves.
import { connect } from "./odin-client.js";

const LOG_LIMIT = 50;

const $ = (id) => document.getElementById(id);
const rows = $("rows");
const logList = $("log");
const status = $("status");
const statusText = $("status-text");
const drop = $("drop");

// Same origin: the server fills in its WebSocket path.
const wsPath = document.querySelector('meta[name="odin-ws-path"]')?.content || "/ws";
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const url = `${scheme}//${location.host}${wsPath}`;

// The client opens its sockets through this constructor, so the page holds the current one
// and "Drop connection" can close it under the client, as a network failure would.
const NativeWebSocket = globalThis.WebSocket;
let socket = null;
function HeldWebSocket(...args) {
  const ws = new NativeWebSocket(...args);
  socket = ws;
  return ws;
}
for (const name of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) {
  HeldWebSocket[name] = NativeWebSocket[name];
}
HeldWebSocket.prototype = NativeWebSocket.prototype;

// Formatting.
const priceFormat = (value) => {
  const digits = Math.abs(value) >= 1 ? { minimumFractionDigits: 2, maximumFractionDigits: 2 }
    : { minimumSignificantDigits: 3, maximumSignificantDigits: 4 };
  return value.toLocaleString("en-US", digits);
};
const volumeFormat = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 2 });
const clock = (ms) => {
  const when = new Date(ms);
  const time = when.toLocaleTimeString("en-GB", { hour12: false });
  return `${time}.${String(when.getMilliseconds()).padStart(3, "0")}`;
};
const position = (p) => (p ? `${p.epoch}:${p.seq}` : "—");

// The ticker: one row per channel, kept in channel order.
const channels = new Map(); // channel -> {row, cells, count}

function rowFor(channel) {
  let entry = channels.get(channel);
  if (entry) return entry;
  const [symbol, event] = channel.split(".");
  const row = document.createElement("tr");
  row.dataset.channel = channel;
  const cells = {};
  for (const [key, text, numeric] of [
    ["symbol", symbol, false], ["event", event, false], ["price", "—", true],
    ["volume", "—", true], ["position", "—", false], ["count", "0", true], ["updated", "—", false],
  ]) {
    const cell = document.createElement(key === "symbol" ? "th" : "td");
    if (key === "symbol") cell.scope = "row";
    cell.className = key + (numeric ? " number" : "");
    cell.textContent = text;
    row.append(cell);
    cells[key] = cell;
  }
  entry = { row, cells, count: 0 };
  channels.set(channel, entry);
  const after = [...channels.keys()].sort().find((name) => name > channel);
  rows.insertBefore(row, after ? channels.get(after).row : null);
  $("empty").hidden = true;
  return entry;
}

function show(event) {
  const entry = rowFor(event.channel);
  const data = event.data && typeof event.data === "object" ? event.data : {};
  entry.count += 1;
  const { cells } = entry;
  if (typeof data.price === "number") {
    const before = Number(cells.price.dataset.value);
    cells.price.textContent = priceFormat(data.price);
    cells.price.dataset.value = String(data.price);
    cells.price.classList.toggle("up", data.price > before);
    cells.price.classList.toggle("down", data.price < before);
  }
  if (typeof data.volume24h === "number") cells.volume.textContent = volumeFormat.format(data.volume24h);
  cells.position.textContent = position({ epoch: event.epoch, seq: event.seq });
  cells.count.textContent = String(entry.count);
  cells.updated.textContent = clock(event.ts || Date.now());
  cells.updated.title = event.type || "";
  entry.row.classList.remove("fresh");
  void entry.row.offsetWidth; // restart the highlight
  entry.row.classList.add("fresh");
}

// The log of recoveries and gaps, newest first, bounded.
function log(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  const time = document.createElement("time");
  time.dateTime = new Date().toISOString();
  time.textContent = clock(Date.now());
  const label = document.createElement("span");
  label.className = "kind";
  label.textContent = kind;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(time, label, body);
  logList.prepend(item);
  while (logList.children.length > LOG_LIMIT) logList.lastElementChild.remove();
  $("log-empty").hidden = true;
}

function setStatus(state, text) {
  status.dataset.state = state;
  statusText.textContent = text;
  drop.disabled = state !== "connected";
}

const client = connect(url, {
  WebSocket: HeldWebSocket,
  minDelay: 250,
  maxDelay: 10000,
  replayGaps: false,
  heartbeat: 25000,
});

client.on("connected", ({ connectionId }) => {
  setStatus("connected", `Connected to ${url} · connection ${connectionId ?? "?"}`);
});

client.on("disconnected", ({ code, reason, willReconnect, delay }) => {
  const why = `closed ${code ?? ""}${reason ? ` ${reason}` : ""}`.trim();
  if (willReconnect) {
    setStatus("reconnecting", `Reconnecting in ${Math.round(delay ?? 0)} ms (${why})`);
  } else {
    setStatus("disconnected", `Disconnected (${why})`);
  }
});

client.on("recovered", ({ channel, recovered, count, reason }) => {
  const entry = channels.get(channel);
  const now = client.positions?.get?.(channel);
  if (entry && now) entry.cells.position.textContent = position(now);
  if (recovered) {
    log("recovered", `${channel}: ${count} missed event${count === 1 ? "" : "s"} replayed, no gap`);
  } else {
    log("reset", `${channel}: not recovered (${reason ?? "unknown"}): continuing from its latest event`);
  }
});

client.on("gap", ({ channel, from, to, reason }) => {
  log("gap", `${channel}: positions ${from} to ${to} missed (${reason ?? "unknown"})`);
});

client.on("error", ({ code, message }) => {
  log("error", `${code ?? "error"}: ${message ?? ""}`);
});

client.subscribe("*.*", show);

drop.addEventListener("click", () => {
  if (!socket) return;
  log("dropped", "connection dropped by this page");
  setStatus("dropping", "Dropping the connection…");
  // A browser cannot reset a TCP connection; an application close code the client did not
  // ask for is the closest: to the client it is the server going away.
  try {
    socket.close(4000, "dropped by the live page");
  } catch {
    socket.close();
  }
});
