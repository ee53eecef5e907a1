// Test helper: a real `odin serve` in a subprocess, and small waiting tools.
//
// startOdin() writes a TOML configuration to a temporary directory, spawns
// `${ODIN_PYTHON || <repo>/.venv/bin/python} -m odin_fanout serve --port N --workers 1`, reads its
// JSON log (stderr) for the `listening` line and returns its URLs. The log goes to a file, not
// a pipe: a test that blocks this process on purpose (a slow consumer) must not block the
// server on a full pipe. Events are published with
// POST /api/publish and an API key. Every server started is killed when the process exits.

import { spawn } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.ODIN_PYTHON || path.join(ROOT, ".venv/bin/python");
export const API_KEY = "js-client-test-publish-key-0123456789";

/** @type {Set<import("node:child_process").ChildProcess>} */
const running = new Set();
/** Data directories of embedded nats-servers these tests started. */
const natsDirs = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
  // An embedded nats-server outlives an Odin killed outright (by design: other Odins of the
  // data directory may use it); stop the ones these tests started, by the pid its owner wrote.
  for (const dir of natsDirs) {
    try {
      const { pid } = JSON.parse(readFileSync(path.join(dir, "embedded.json"), "utf8"));
      if (Number.isInteger(pid) && pid > 1) process.kill(pid, "SIGTERM");
    } catch {
      // never started, or already gone
    }
  }
});

/** A temporary directory, removed at exit. */
export function tempDir(prefix = "odin-js-") {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** TOML for a {section: {key: value}} object (strings, numbers, booleans, arrays of those). */
export function toml(config) {
  const lines = [];
  for (const [section, fields] of Object.entries(config)) {
    lines.push(`[${section}]`);
    for (const [key, value] of Object.entries(fields)) lines.push(`${key} = ${JSON.stringify(value)}`);
    lines.push("");
  }
  return lines.join("\n");
}

function merge(base, extra) {
  const out = structuredClone(base);
  for (const [section, fields] of Object.entries(extra ?? {})) {
    out[section] = { ...(out[section] ?? {}), ...fields };
  }
  return out;
}

/**
 * Start `odin serve`.
 * @param {object} [options]
 * @param {object} [options.config] TOML sections merged over the defaults
 * @param {string} [options.dir] the state directory (shared by servers that must share the
 *   embedded NATS history); a new temporary one by default
 * @param {number} [options.port] 0: any free port
 * @param {boolean} [options.nats] use the embedded NATS broker (else the memory broker)
 */
export async function startOdin({ config, dir, port = 0, nats = false } = {}) {
  dir ??= tempDir();
  const defaults = {
    server: { host: "127.0.0.1" },
    broker: { kind: nats ? "nats" : "memory" },
    publish: { enabled: true, api_keys: [API_KEY], rate_per_second: 0, max_batch: 1000, max_body: 16 * 1024 * 1024 },
    control: { enabled: false },
    log: { format: "json" },
    shutdown: { reconnect_min_ms: 100, reconnect_max_ms: 300, drain_timeout: 10 },
  };
  if (nats) {
    defaults.nats = { embedded_data_dir: path.join(dir, "nats") };
    natsDirs.add(path.join(dir, "nats"));
  }
  const file = path.join(dir, `odin-${Date.now()}-${Math.random().toString(36).slice(2)}.toml`);
  writeFileSync(file, toml(merge(defaults, config)));
  const log = `${file}.log`;
  const fd = openSync(log, "w");
  const child = spawn(PYTHON, ["-m", "odin_fanout", "serve", "--port", String(port), "--workers", "1", "--config", file], {
    cwd: ROOT,
    env: { ...process.env, XDG_STATE_HOME: dir, XDG_RUNTIME_DIR: dir, ODIN_SERVER_WORKERS: "1" },
    stdio: ["ignore", "ignore", fd],
  });
  closeSync(fd);
  running.add(child);
  const server = new OdinServer(child, dir, log);
  const listening = await server.waitFor("listening", 30000);
  const ws = listening.websocket[0];
  server.port = Number(new URL(ws).port);
  server.wsUrl = ws;
  server.httpUrl = listening.http[0];
  // With NATS the server listens before its stream is ready: a subscription acknowledged, or
  // an event published, in between can be lost (see the report), so wait for it.
  if (nats) await server.waitFor("broker_ready", 30000);
  return server;
}

export class OdinServer {
  constructor(child, dir, log) {
    this.child = child;
    this.dir = dir;
    /** @type {any[]} */
    this.records = [];
    this.port = 0;
    this.wsUrl = "";
    this.httpUrl = "";
    this.exitCode = undefined;
    this._buffer = "";
    this._waiters = new Set();
    this._log = openSync(log, "r");
    this._offset = 0;
    // The log file is read as it grows (every 20 ms, and once more at the exit).
    this._reader = setInterval(() => this._read(), 20);
    this.exited = new Promise((resolve) => {
      child.on("exit", (code, signal) => {
        running.delete(child);
        clearInterval(this._reader);
        this._read();
        closeSync(this._log);
        this.exitCode = code ?? signal;
        for (const wake of [...this._waiters]) wake();
        resolve(this.exitCode);
      });
    });
  }

  _read() {
    const chunk = Buffer.alloc(1 << 20);
    let got = 0;
    let text = "";
    while ((got = readSync(this._log, chunk, 0, chunk.length, this._offset)) > 0) {
      this._offset += got;
      text += chunk.toString("utf8", 0, got);
    }
    if (!text) return;
    this._buffer += text;
    const lines = this._buffer.split("\n");
    this._buffer = lines.pop();
    for (const line of lines) {
      try {
        this.records.push(JSON.parse(line));
      } catch {
        this.records.push({ event: "unparsed", line });
      }
    }
    for (const wake of [...this._waiters]) wake();
  }

  /** The first log record with this event (and these fields), waiting up to `timeout` ms. */
  waitFor(event, timeout = 15000, fields = {}) {
    const find = () =>
      this.records.find((r) => r.event === event && Object.entries(fields).every(([k, v]) => r[k] === v));
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = find();
        if (found) return done(() => resolve(found));
        if (this.exitCode !== undefined) {
          return done(() => reject(new Error(`odin exited (${this.exitCode}) before ${event}: ${this.tail()}`)));
        }
      };
      const timer = setTimeout(() => done(() => reject(new Error(`no ${event} log line within ${timeout} ms: ${this.tail()}`))), timeout);
      const done = (then) => {
        clearTimeout(timer);
        this._waiters.delete(check);
        then();
      };
      this._waiters.add(check);
      check();
    });
  }

  tail(n = 15) {
    return this.records.slice(-n).map((r) => JSON.stringify(r)).join("\n");
  }

  /** POST /api/publish: one event (channel, data) or a batch (array of {channel, data}). */
  async publish(channelOrEvents, data) {
    const body = Array.isArray(channelOrEvents) ? { events: channelOrEvents } : { channel: channelOrEvents, data };
    const response = await fetch(`${this.httpUrl}/api/publish`, {
      method: "POST",
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (response.status !== 200) throw new Error(`publish: ${response.status} ${JSON.stringify(answer)}`);
    return answer;
  }

  /** SIGTERM (a drain) and wait for the exit; SIGKILL after `timeout` ms. */
  async stop(timeout = 20000) {
    if (this.exitCode !== undefined) return this.exitCode;
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), timeout);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }

  kill() {
    if (this.exitCode === undefined) this.child.kill("SIGKILL");
    return this.exited;
  }
}

/** The next `name` event of `client` that satisfies `filter`, within `timeout` ms. */
export function nextEvent(client, name, filter = () => true, timeout = 15000) {
  return new Promise((resolve, reject) => {
    const handler = (info) => {
      if (!filter(info)) return;
      clearTimeout(timer);
      client.off(name, handler);
      resolve(info);
    };
    const timer = setTimeout(() => {
      client.off(name, handler);
      reject(new Error(`no ${name} event within ${timeout} ms`));
    }, timeout);
    client.on(name, handler);
  });
}

/** A promise rejected after `ms` with `what` unless `promise` settles first. */
export function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * A TCP relay in front of the servers, so that a test decides which server the client's
 * fixed URL reaches and when: `target` is the port connections go to; while `paused`, new
 * connections are refused (closed at once), as when no server listens. `stall()` stops
 * relaying on the open connections, both ways, without closing them: a silent network.
 */
export async function startRelay(target = 0) {
  const net = await import("node:net");
  const sockets = new Set();
  const pairs = new Set();
  const relay = {
    target,
    paused: false,
    port: 0,
    url: "",
    connections: 0,
    stall() {
      for (const [client, upstream] of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
      pairs.clear();
    },
    close() {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
  const server = net.createServer((client) => {
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => {});
    if (relay.paused || !relay.target) {
      client.destroy();
      return;
    }
    relay.connections += 1;
    const upstream = net.connect(relay.target, "127.0.0.1");
    sockets.add(upstream);
    upstream.on("close", () => {
      sockets.delete(upstream);
      client.destroy();
    });
    upstream.on("error", () => {});
    client.on("close", () => upstream.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
    const pair = [client, upstream];
    pairs.add(pair);
    client.on("close", () => pairs.delete(pair));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  relay.port = server.address().port;
  relay.url = `ws://127.0.0.1:${relay.port}/ws`;
  return relay;
}

/**
 * Collects what a test observes (events, client notices) and waits, event-driven, for a
 * condition on what was collected.
 */
export class Recorder {
  constructor() {
    /** @type {any[]} */
    this.items = [];
    this._waiters = new Set();
  }

  push(item) {
    this.items.push(item);
    for (const check of [...this._waiters]) check();
  }

  /** Items of one kind (`{kind}` field), or all. */
  of(kind) {
    return this.items.filter((item) => item.kind === kind);
  }

  /** Resolve with predicate(items)'s truthy value once it holds; reject after `timeout` ms. */
  wait(predicate, timeout = 15000, what = "a condition") {
    return new Promise((resolve, reject) => {
      const check = () => {
        let value;
        try {
          value = predicate(this.items);
        } catch (error) {
          finish();
          reject(error);
          return;
        }
        if (value) {
          finish();
          resolve(value);
        }
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`timed out after ${timeout} ms waiting for ${what}; saw ${JSON.stringify(this.items.slice(-10))}`));
      }, timeout);
      const finish = () => {
        clearTimeout(timer);
        this._waiters.delete(check);
      };
      this._waiters.add(check);
      check();
    });
  }

  /** Wait for `count` items of `kind` (matching `filter`). */
  waitCount(kind, count, timeout = 15000, filter = () => true) {
    return this.wait(
      (items) => {
        const found = items.filter((item) => item.kind === kind && filter(item));
        return found.length >= count ? found : null;
      },
      timeout,
      `${count} ${kind}`,
    );
  }
}

/** A recorder fed by every notice of `client` and the events of the subscriptions it makes. */
export function record(client, recorder = new Recorder()) {
  for (const kind of ["connected", "disconnected", "gap", "recovered", "error", "token"]) {
    client.on(kind, (info) => recorder.push({ kind, ...info }));
  }
  return recorder;
}
