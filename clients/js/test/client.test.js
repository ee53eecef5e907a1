// The client against a real `odin serve`: live events, patterns, positions, a drain, a
// restart with recovery, a restart that cannot recover, tokens.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import path from "node:path";
import { after, test } from "node:test";
import WebSocket from "ws";

import { connect } from "../src/odin-client.js";
import { API_KEY, record, startOdin, startRelay, tempDir, within } from "./odin-server.js";

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

/** A client of `url` whose notices and events go to a recorder; closed after the tests. */
function client(url, options = {}) {
  const c = connect(url, { WebSocket, minDelay: 50, maxDelay: 500, ...options });
  cleanups.push(() => c.close());
  return { client: c, seen: record(c) };
}

/** Subscribe, recording each event as {kind: "event", sub: name, ...event}. */
function listen(c, seen, channels, name = String(channels)) {
  return c.subscribe(channels, (event) => seen.push({ kind: "event", sub: name, ...event }));
}

async function server(options) {
  const odin = await startOdin(options);
  cleanups.push(() => odin.kill());
  return odin;
}

async function relay(target) {
  const r = await startRelay(target);
  cleanups.push(() => r.close());
  return r;
}

const events = (seen, sub) => seen.of("event").filter((e) => sub === undefined || e.sub === sub);

test("live events arrive in order, through patterns, with their positions", async () => {
  const odin = await server();
  const { client: c, seen } = client(odin.wsUrl);
  // ETH.trade has a history before the client subscribes: the ack gives its position.
  const before = await odin.publish("ETH.trade", { n: 0 });
  listen(c, seen, "BTC.*");
  listen(c, seen, ["ETH.trade", "SOL.trade"], "exact");
  await within(c.ready(), 10000, "ready");
  assert.equal(c.connected, true);
  assert.deepEqual(c.positions.get("ETH.trade"), { epoch: before.positions[0].epoch, seq: before.positions[0].seq });

  const answer = await odin.publish([
    { channel: "BTC.trade", data: { n: 1 } },
    { channel: "BTC.liquidity", data: { n: 2 } },
    { channel: "DOGE.trade", data: { n: 3 } },
    { channel: "BTC.trade", data: { n: 4 } },
    { channel: "ETH.trade", data: { n: 5 } },
  ]);
  await seen.waitCount("event", 4, 10000);
  const btc = events(seen, "BTC.*");
  assert.deepEqual(btc.map((e) => [e.channel, e.data.n]), [["BTC.trade", 1], ["BTC.liquidity", 2], ["BTC.trade", 4]]);
  const [first, , fourth] = btc;
  const published = answer.positions;
  assert.equal(first.seq, published[0].seq);
  assert.equal(first.epoch, published[0].epoch);
  assert.equal(fourth.prev, first.seq, "prev links the channel's previous event");
  assert.equal(first.type, "trade:update");
  assert.equal(typeof first.ts, "number");
  assert.deepEqual(events(seen, "exact").map((e) => [e.channel, e.data.n, e.prev]), [["ETH.trade", 5, before.positions[0].seq]]);
  // positions: the last event delivered per channel
  assert.deepEqual(c.positions.get("BTC.trade"), { epoch: published[3].epoch, seq: published[3].seq });
  assert.deepEqual(c.positions.get("BTC.liquidity"), { epoch: published[1].epoch, seq: published[1].seq });
  assert.deepEqual(c.positions.get("ETH.trade"), { epoch: published[4].epoch, seq: published[4].seq });
  assert.equal(c.positions.has("DOGE.trade"), false);
  assert.deepEqual(seen.of("error"), []);
  assert.deepEqual(seen.of("gap"), []);
});

test("unsubscribe stops events; a handler that throws becomes an error event", async () => {
  const odin = await server();
  const { client: c, seen } = client(odin.wsUrl);
  const sub = listen(c, seen, "BTC.trade");
  c.subscribe("ETH.trade", () => {
    throw new Error("boom");
  });
  listen(c, seen, "ETH.trade", "eth");
  assert.deepEqual(sub.channels, ["BTC.trade"]);
  await within(c.ready(), 10000, "ready");
  await odin.publish("ETH.trade", { n: 1 });
  const [error] = await seen.waitCount("error", 1, 10000);
  assert.equal(error.code, "HANDLER_ERROR");
  assert.match(error.message, /boom/);
  await seen.waitCount("event", 1, 10000, (e) => e.sub === "eth");
  assert.equal(c.connected, true, "the connection survived the handler's exception");

  sub.unsubscribe();
  c.unsubscribe("ETH.trade");
  // A subscription made after them is acknowledged after their unsubscribe was sent: no
  // event of theirs published after its ack can arrive.
  listen(c, seen, "SOL.trade", "sol");
  await within(c.ready(), 10000, "ready");
  await odin.publish([
    { channel: "BTC.trade", data: { n: 2 } },
    { channel: "ETH.trade", data: { n: 3 } },
    { channel: "SOL.trade", data: { n: 4 } },
  ]);
  await seen.waitCount("event", 1, 10000, (e) => e.sub === "sol");
  assert.deepEqual(events(seen).map((e) => e.data.n), [1, 4]);
});

test("a drain: the client follows the server's reconnect hint to a new server", async () => {
  const a = await server();
  const door = await relay(a.port);
  const { client: c, seen } = client(door.url);
  listen(c, seen, "BTC.trade");
  await within(c.ready(), 10000, "ready");
  const firstId = c.connectionId;
  const stopped = a.stop();
  const [gone] = await seen.waitCount("disconnected", 1, 15000);
  assert.equal(gone.code, 1001);
  assert.equal(gone.willReconnect, true);
  // The server's after_ms (configured 100-300 ms) is the delay, not the client's backoff.
  assert.ok(gone.delay >= 100 && gone.delay <= 300, `delay ${gone.delay}`);
  assert.equal(await stopped, 0);

  const b = await server();
  door.target = b.port;
  await seen.waitCount("connected", 2, 15000);
  await within(c.ready(), 10000, "ready again");
  assert.notEqual(c.connectionId, firstId);
  await b.publish("BTC.trade", { n: 1 });
  const [event] = await seen.waitCount("event", 1, 10000);
  assert.equal(event.data.n, 1);
});

test("a restart with a shared history: exactly the missed events, once, in order", async () => {
  const dir = tempDir();
  const a = await server({ dir, nats: true });
  const door = await relay(a.port);
  const { client: c, seen } = client(door.url);
  listen(c, seen, "BTC.*");
  await within(c.ready(), 15000, "ready");
  for (let n = 1; n <= 3; n++) await a.publish("BTC.trade", { n });
  await seen.waitCount("event", 3, 15000);

  // The server goes; while no server answers, events are published to the history.
  door.paused = true;
  assert.equal(await a.stop(), 0);
  await seen.waitCount("disconnected", 1, 15000);
  const b = await server({ dir, nats: true });
  for (let n = 4; n <= 8; n++) await b.publish("BTC.trade", { n });
  door.target = b.port;
  door.paused = false;

  await seen.waitCount("connected", 2, 20000);
  const recovered = await seen.waitCount("recovered", 1, 15000, (r) => r.channel === "BTC.trade");
  assert.equal(recovered[0].recovered, true);
  assert.equal(recovered[0].count, 5);
  await seen.waitCount("event", 8, 15000);
  for (let n = 9; n <= 10; n++) await b.publish("BTC.trade", { n });
  await seen.waitCount("event", 10, 15000);
  assert.deepEqual(
    events(seen).map((e) => e.data.n),
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
  );
  const seqs = events(seen).map((e) => e.seq);
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y));
  assert.deepEqual(c.positions.get("BTC.trade").seq, seqs.at(-1));
  assert.deepEqual(seen.of("gap"), []);
  assert.deepEqual(seen.of("error"), []);
});

test("a restart that loses the history: recovered false, then the latest value", async () => {
  const a = await server();
  const door = await relay(a.port);
  const { client: c, seen } = client(door.url);
  listen(c, seen, "BTC.trade");
  await within(c.ready(), 10000, "ready");
  await a.publish([
    { channel: "BTC.trade", data: { n: 1 } },
    { channel: "BTC.trade", data: { n: 2 } },
  ]);
  await seen.waitCount("event", 2, 10000);
  const oldEpoch = c.positions.get("BTC.trade").epoch;

  door.paused = true;
  assert.equal(await a.stop(), 0);
  // A new in-memory broker: a new epoch, and a history the client's position is not in.
  const b = await server();
  const published = await b.publish([
    { channel: "BTC.trade", data: { n: 10 } },
    { channel: "BTC.trade", data: { n: 11 } },
  ]);
  door.target = b.port;
  door.paused = false;

  const [report] = await seen.waitCount("recovered", 1, 15000);
  assert.deepEqual(
    { channel: report.channel, recovered: report.recovered, reason: report.reason },
    { channel: "BTC.trade", recovered: false, reason: "epoch_changed" },
  );
  // Only the latest value follows, and it comes after the report.
  const [, , latest] = await seen.waitCount("event", 3, 10000);
  assert.equal(latest.data.n, 11);
  assert.ok(seen.items.indexOf(report) < seen.items.indexOf(latest));
  assert.notEqual(latest.epoch, oldEpoch);
  assert.deepEqual(c.positions.get("BTC.trade"), { epoch: published.positions[1].epoch, seq: published.positions[1].seq });
  await b.publish("BTC.trade", { n: 12 });
  const [, , , next] = await seen.waitCount("event", 4, 10000);
  assert.equal(next.data.n, 12);
  assert.equal(next.prev, latest.seq);
  assert.deepEqual(events(seen).map((e) => e.data.n), [1, 2, 11, 12]);
  assert.deepEqual(seen.of("gap"), []);
});

// ---- tokens -------------------------------------------------------------------------------

const SECRET = "a-js-client-test-secret-of-32-bytes-or-more";

/** An HS256 JWT. */
function jwt(claims, secret = SECRET) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

const now = () => Math.floor(Date.now() / 1000);

test("the token provider is called on connect and on token_expiring", async () => {
  // Tokens that expire within the notice period get token_expiring at once.
  const odin = await server({ config: { auth: { required: true, hmac_secret: SECRET, expiry_notice: 30 } } });
  const issued = [];
  const provider = async () => {
    const exp = now() + (issued.length === 0 ? 10 : 600);
    issued.push(exp);
    return jwt({ sub: "alice", exp });
  };
  const { client: c, seen } = client(odin.wsUrl, { token: provider });
  listen(c, seen, "BTC.trade");
  await within(c.ready(), 10000, "ready");
  // The first "token" comes with the connection, the second with the refresh's auth_ok.
  const tokens = await seen.waitCount("token", 2, 15000);
  assert.equal(issued.length, 2, "called on connect, then once for token_expiring");
  assert.deepEqual(tokens.map((t) => [t.sub, t.expiresAt]), [["alice", issued[0] * 1000], ["alice", issued[1] * 1000]]);
  await odin.waitFor("token_taken", 5000, { via: "refresh", sub: "alice" });
  await odin.publish("BTC.trade", { n: 1 });
  await seen.waitCount("event", 1, 10000);
  assert.equal(seen.of("connected").length, 1, "the refresh kept the connection");
  assert.deepEqual(seen.of("error"), []);
});

test("an expired token (4010): reconnect with a fresh one and recover", async () => {
  const odin = await server({ config: { auth: { required: true, hmac_secret: SECRET, expiry_notice: 0, leeway: 0 } } });
  let calls = 0;
  const provider = () => {
    calls += 1;
    // The first expires at once (no notice, no refresh); the next are good for long.
    return jwt({ sub: "bob", exp: now() + (calls === 1 ? 2 : 600) });
  };
  const { client: c, seen } = client(odin.wsUrl, { token: provider });
  listen(c, seen, "BTC.trade");
  await within(c.ready(), 10000, "ready");
  await odin.publish("BTC.trade", { n: 1 });
  await seen.waitCount("event", 1, 10000);
  const [gone] = await seen.waitCount("disconnected", 1, 15000);
  assert.equal(gone.code, 4010);
  assert.equal(gone.willReconnect, true);
  await odin.publish("BTC.trade", { n: 2 }); // while it is away, or just back
  await seen.waitCount("connected", 2, 10000);
  await seen.waitCount("event", 2, 10000);
  assert.equal(calls, 2);
  assert.deepEqual(events(seen).map((e) => e.data.n), [1, 2]);
});

test("a static token the server refuses (4012) gives up", async () => {
  const odin = await server({ config: { auth: { required: true, hmac_secret: SECRET } } });
  const bad = jwt({ sub: "mallory", exp: now() + 600 }, "not-the-server-secret-but-32-bytes-long");
  const { client: c, seen } = client(odin.wsUrl, { token: bad, tokenIn: "message" });
  listen(c, seen, "BTC.trade");
  const readiness = c.ready();
  const [gone] = await seen.waitCount("disconnected", 1, 10000);
  assert.equal(gone.code, 4012);
  assert.match(gone.reason, /token invalid: invalid_signature/);
  assert.equal(gone.willReconnect, false);
  const [error] = seen.of("error");
  assert.equal(error.code, "TOKEN_INVALID");
  await assert.rejects(within(readiness, 5000, "ready settles"), /closed/);
  assert.equal(c.connected, false);
  assert.equal(seen.of("connected").length, 0);
  // It stopped for good: it is closed, and the server saw exactly one attempt.
  assert.throws(() => c.subscribe("ETH.trade", () => {}), /closed/);
  await odin.waitFor("auth_refused", 5000);
  assert.equal(odin.records.filter((r) => r.event === "auth_refused").length, 1);
});

test("in Node, a static token refused at the upgrade (401) gives up too", async () => {
  const odin = await server({ config: { auth: { required: true, hmac_secret: SECRET } } });
  const expired = jwt({ sub: "erin", exp: now() - 3600 });
  const { client: c, seen } = client(odin.wsUrl, { token: expired });
  listen(c, seen, "BTC.trade");
  const [gone] = await seen.waitCount("disconnected", 1, 10000);
  assert.equal(gone.willReconnect, false);
  assert.match(gone.reason, /401/);
  const [error] = seen.of("error");
  assert.equal(error.code, "TOKEN_INVALID");
  await odin.waitFor("auth_refused", 5000, { reason: "expired" });
  assert.equal(c.connected, false);
});

test("a good token sent in-band (tokenIn: message) is accepted", async () => {
  const odin = await server({ config: { auth: { required: true, hmac_secret: SECRET } } });
  const exp = now() + 600;
  const { client: c, seen } = client(odin.wsUrl, { token: jwt({ sub: "dana", exp }), tokenIn: "message" });
  listen(c, seen, "BTC.trade");
  await within(c.ready(), 10000, "ready");
  const [token] = await seen.waitCount("token", 1, 5000);
  assert.deepEqual([token.sub, token.expiresAt], ["dana", exp * 1000]);
  await odin.publish("BTC.trade", { n: 1 });
  await seen.waitCount("event", 1, 10000);
});

// ---- a slow consumer ------------------------------------------------------------------------

/**
 * Publish `count` events of ~`size` bytes on `channel` from another process (this one is
 * about to be blocked by a slow handler), in batches; write `done` once all were accepted.
 */
function burst(odin, { channel, count, size, done, first = 1 }) {
  const script = `
    const [url, key, channel, count, size, done, first] = process.argv.slice(1);
    const pad = "x".repeat(Number(size));
    for (let start = Number(first); start < Number(first) + Number(count); start += 50) {
      const events = [];
      for (let n = start; n < Math.min(start + 50, Number(first) + Number(count)); n++) events.push({ channel, data: { n, pad } });
      const response = await fetch(url + "/api/publish", { method: "POST", body: JSON.stringify({ events }),
        headers: { Authorization: "Bearer " + key, "Content-Type": "application/json" } });
      if (response.status !== 200) { console.error(await response.text()); process.exit(1); }
    }
    (await import("node:fs")).writeFileSync(done, "done");
  `;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script, odin.httpUrl, API_KEY, channel, String(count), String(size), done, String(first)], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  return new Promise((resolve, reject) => {
    child.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`the publisher exited ${code}`))));
  });
}

/** Block this process (a slow consumer) until `file` exists, at most `limit` ms. */
function blockUntil(file, limit = 20000) {
  const started = Date.now();
  while (!existsSync(file) && Date.now() - started < limit) {
    // busy: the socket is not read meanwhile
  }
}

test("a slow consumer (policy conflate) without replayGaps is told every gap", async () => {
  const odin = await server({
    config: { connection: { slow_consumer_policy: "conflate", queue_max_messages: 8, queue_max_bytes: 262144 } },
  });
  const { client: c, seen } = client(odin.wsUrl);
  const done = path.join(tempDir(), "published");
  const count = 400;
  let blocked = false;
  c.subscribe("BTC.trade", (event) => {
    seen.push({ kind: "event", ...event });
    if (!blocked) {
      blocked = true;
      blockUntil(done);
    }
  });
  await within(c.ready(), 10000, "ready");
  await burst(odin, { channel: "BTC.trade", count, size: 30000, done });
  // The newest event always comes (conflation keeps the newest of the channel).
  await seen.wait((items) => items.some((i) => i.kind === "event" && i.data.n === count), 30000, "the last event");
  const gaps = seen.of("gap");
  assert.ok(gaps.length >= 1, "the server conflated, and said so");
  assert.ok(gaps.every((g) => g.reason === "conflated" && g.channel === "BTC.trade"));
  // Every position up to the last event is accounted for: delivered, or inside a gap.
  const delivered = events(seen);
  for (const [i, e] of delivered.entries()) {
    if (i === 0) continue;
    const previous = delivered[i - 1];
    if (e.prev === previous.seq) continue;
    assert.ok(
      gaps.some((g) => g.from <= previous.seq + 1 && g.to >= e.prev),
      `seq ${previous.seq} -> ${e.seq} (prev ${e.prev}) skipped without a gap`,
    );
  }
  const ns = delivered.map((e) => e.data.n);
  assert.deepEqual(ns, [...ns].sort((x, y) => x - y), "in order");
  assert.equal(new Set(ns).size, ns.length, "no duplicates");
});

for (const policy of ["conflate", "close"]) {
  test(`a slow consumer (policy ${policy}) loses nothing: ${policy === "conflate" ? "gaps replayed" : "reconnect and recover"}`, async () => {
    const odin = await server({
      config: { connection: { slow_consumer_policy: policy, queue_max_messages: 8, queue_max_bytes: 262144 } },
    });
    const { client: c, seen } = client(odin.wsUrl, { replayGaps: true });
    const done = path.join(tempDir(), "published");
    const count = 400;
    let blocked = false;
    c.subscribe("BTC.trade", (event) => {
      seen.push({ kind: "event", ...event });
      if (!blocked) {
        blocked = true;
        blockUntil(done);
      }
    });
    await within(c.ready(), 10000, "ready");
    const publishing = burst(odin, { channel: "BTC.trade", count, size: 30000, done });
    try {
      await seen.waitCount("event", count, 30000);
    } catch (error) {
      const summary = seen.items.map((i) => (i.kind === "event" ? i.data.n : `${i.kind}:${JSON.stringify({ ...i, hello: undefined })}`));
      throw new Error(`${error.message.slice(0, 80)}\n${summary.join(" ")}\n${odin.tail(10)}`);
    }
    await publishing;
    const got = events(seen).map((e) => e.data.n);
    assert.deepEqual(got, Array.from({ length: count }, (_, i) => i + 1), "every event once, in order");
    if (policy === "conflate") {
      await odin.waitFor("slow_consumer", 5000, { action: "conflated" }); // the server conflated
      await odin.waitFor("replay", 5000); // and the client asked for what was conflated
      assert.equal(seen.of("connected").length, 1, "conflation keeps the connection");
    } else {
      const closes = seen.of("disconnected");
      assert.ok(closes.length >= 1, "the server closed the slow consumer");
      for (const gone of closes) assert.ok([1008, 1006].includes(gone.code), `closed ${gone.code} ${gone.reason}`);
      await odin.waitFor("slow_consumer", 5000); // the server closed a slow consumer
      assert.equal(seen.of("connected").length, closes.length + 1);
      assert.ok(seen.of("recovered").every((r) => r.recovered));
    }
    assert.deepEqual(seen.of("gap"), [], "replayGaps filled every gap");
    assert.deepEqual(c.positions.get("BTC.trade").seq, events(seen).at(-1).seq);
  });
}

test("a silent connection: no pong to the heartbeat, so it reconnects and recovers", async () => {
  const odin = await server();
  const door = await relay(odin.port);
  const { client: c, seen } = client(door.url, { heartbeat: 300 });
  listen(c, seen, "BTC.trade");
  await within(c.ready(), 10000, "ready");
  await odin.publish("BTC.trade", { n: 1 });
  await seen.waitCount("event", 1, 10000);
  door.stall(); // the network goes silent: no close, no data
  await odin.publish("BTC.trade", { n: 2 }); // lost on the stalled connection
  const [gone] = await seen.waitCount("disconnected", 1, 5000);
  assert.equal(gone.willReconnect, true);
  assert.match(gone.reason, /pong/);
  const [report] = await seen.waitCount("recovered", 1, 10000);
  assert.deepEqual([report.recovered, report.count], [true, 1]);
  await seen.waitCount("event", 2, 10000);
  assert.deepEqual(events(seen).map((e) => e.data.n), [1, 2]);
});

test("a refused subscription is an error event and ends only that subscription", async () => {
  const odin = await server();
  const { client: c, seen } = client(odin.wsUrl);
  listen(c, seen, "btc.trade", "bad");
  listen(c, seen, "BTC.trade", "good");
  const [error] = await seen.waitCount("error", 1, 10000);
  assert.equal(error.code, "INVALID_CHANNEL");
  assert.match(error.message, /btc\.trade/);
  await within(c.ready(), 10000, "ready without the refused subscription");
  await odin.publish("BTC.trade", { n: 1 });
  await seen.waitCount("event", 1, 10000);
  assert.deepEqual(events(seen).map((e) => e.sub), ["good"]);
});
