// The client in a real browser: headless Chromium (the Debian package, driven by
// playwright-core; no browser download) loads a page that imports src/odin-client.js and
// reports what the client sees. Skipped without chromium unless ODIN_REQUIRE_BROWSER is set.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Recorder, startOdin, startRelay, tempDir, within } from "./odin-server.js";

const HERE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

function findChromium() {
  if (process.env.ODIN_CHROMIUM) return process.env.ODIN_CHROMIUM;
  for (const name of ["chromium", "chromium-browser"]) {
    try {
      const found = execFileSync("which", [name], { encoding: "utf8" }).trim();
      if (found) return found;
    } catch {
      // not this one
    }
  }
  return null;
}

const CHROMIUM = findChromium();
const missing = !CHROMIUM || !existsSync(CHROMIUM);
if (missing && process.env.ODIN_REQUIRE_BROWSER) {
  throw new Error(`chromium is required (ODIN_REQUIRE_BROWSER) but not found (${CHROMIUM ?? "which chromium: nothing"}; set ODIN_CHROMIUM)`);
}
const skip = missing ? "chromium is not installed (set ODIN_CHROMIUM, or ODIN_REQUIRE_BROWSER to fail)" : false;

const PAGE = `<!doctype html><meta charset="utf-8"><title>odin-client test</title>
<script type="module">
import { connect } from "/odin-client.js";
const params = new URLSearchParams(location.search);
const report = (info) => window.report(info);
// The slow tab: the first event's handler keeps the main thread busy until the test says the
// burst is published (a synchronous request to the page's server), so the socket is not read.
let slow = params.get("slow") === "1";
const published = () => {
  const request = new XMLHttpRequest();
  request.open("GET", "/published", false);
  request.send();
  return request.responseText === "yes";
};
const client = connect(params.get("ws"), { minDelay: 50, maxDelay: 500 });
window.client = client;
for (const kind of ["connected", "disconnected", "gap", "recovered", "error", "token"]) {
  client.on(kind, (info) => report({ kind, ...info, hello: undefined }));
}
client.subscribe("BTC.trade", (event) => {
  report({ kind: "event", channel: event.channel, seq: event.seq, prev: event.prev, epoch: event.epoch, n: event.data.n });
  if (slow) {
    slow = false;
    const started = Date.now();
    while (!published() && Date.now() - started < 20000) {
      // busy
    }
  }
});
client.ready().then(() => report({ kind: "ready" }));
</script>`;

let browser;
let pages;
const state = { published: false };
const cleanups = [];

before(async () => {
  if (skip) return;
  const { chromium } = await import("playwright-core");
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  const source = readFileSync(path.join(HERE, "src/odin-client.js"));
  pages = http.createServer((request, response) => {
    const url = new URL(request.url, "http://x");
    if (url.pathname === "/odin-client.js") {
      response.writeHead(200, { "Content-Type": "text/javascript" }).end(source);
    } else if (url.pathname === "/published") {
      response.writeHead(200, { "Content-Type": "text/plain" }).end(state.published ? "yes" : "no");
    } else if (url.pathname === "/") {
      response.writeHead(200, { "Content-Type": "text/html; charset=utf-8" }).end(PAGE);
    } else {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolve) => pages.listen(0, "127.0.0.1", resolve));
});

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await browser?.close();
  if (pages) await new Promise((resolve) => pages.close(resolve));
});

/** Open the page on `wsUrl`; what its client reports goes to the returned recorder. */
async function openPage(wsUrl, { slow = false } = {}) {
  const context = await browser.newContext();
  cleanups.push(() => context.close());
  const page = await context.newPage();
  const seen = new Recorder();
  await page.exposeFunction("report", (info) => seen.push(info));
  page.on("pageerror", (error) => seen.push({ kind: "pageerror", message: String(error) }));
  const query = new URLSearchParams({ ws: wsUrl, slow: slow ? "1" : "0" });
  await page.goto(`http://127.0.0.1:${pages.address().port}/?${query}`);
  await seen.waitCount("ready", 1, 15000);
  return { page, seen };
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

const ns = (seen) => seen.of("event").map((e) => e.n);

test("in a browser: live events arrive", { skip }, async () => {
  const odin = await server();
  const { page, seen } = await openPage(odin.wsUrl);
  await odin.publish([1, 2, 3].map((n) => ({ channel: "BTC.trade", data: { n } })));
  await seen.waitCount("event", 3, 10000);
  assert.deepEqual(ns(seen), [1, 2, 3]);
  const [connected] = seen.of("connected");
  assert.ok(connected.connectionId);
  assert.equal(await page.evaluate(() => window.client.connected), true);
  assert.deepEqual(seen.of("pageerror"), []);
});

test("in a browser: a drain, and the client reconnects to a new server", { skip }, async () => {
  const a = await server();
  const door = await relay(a.port);
  const { page, seen } = await openPage(door.url);
  const stopping = a.stop();
  const [gone] = await seen.waitCount("disconnected", 1, 15000);
  assert.equal(gone.code, 1001);
  assert.ok(gone.delay >= 100 && gone.delay <= 300, `the server's after_ms, not ${gone.delay}`);
  assert.equal(await stopping, 0);
  const b = await server();
  door.target = b.port;
  await seen.waitCount("connected", 2, 15000);
  await within(page.evaluate(() => window.client.ready()), 10000, "ready on the new server");
  await b.publish("BTC.trade", { n: 1 });
  await seen.waitCount("event", 1, 10000);
  assert.deepEqual(ns(seen), [1]);
});

test("in a browser: a server restart with a shared history recovers exactly", { skip }, async () => {
  const dir = tempDir();
  const a = await server({ dir, nats: true });
  const door = await relay(a.port);
  const { page, seen } = await openPage(door.url);
  for (let n = 1; n <= 3; n++) await a.publish("BTC.trade", { n });
  await seen.waitCount("event", 3, 15000);
  door.paused = true;
  assert.equal(await a.stop(), 0);
  await seen.waitCount("disconnected", 1, 15000);
  const b = await server({ dir, nats: true });
  for (let n = 4; n <= 7; n++) await b.publish("BTC.trade", { n });
  door.target = b.port;
  door.paused = false;
  const [report] = await seen.waitCount("recovered", 1, 20000);
  assert.deepEqual([report.recovered, report.count], [true, 4]);
  await seen.waitCount("event", 7, 15000);
  await b.publish("BTC.trade", { n: 8 });
  await seen.waitCount("event", 8, 15000);
  assert.deepEqual(ns(seen), [1, 2, 3, 4, 5, 6, 7, 8]);
  const last = seen.of("event").at(-1);
  assert.deepEqual(await page.evaluate(() => window.client.positions.get("BTC.trade")), { epoch: last.epoch, seq: last.seq });
  assert.deepEqual(seen.of("gap"), []);
});

test("in a browser: a slow tab is closed (1008), reconnects and recovers", { skip }, async () => {
  const odin = await server({ config: { connection: { queue_max_messages: 8, queue_max_bytes: 262144 } } });
  state.published = false;
  const { page, seen } = await openPage(odin.wsUrl, { slow: true });
  const count = 400;
  const pad = "x".repeat(30000);
  await odin.publish("BTC.trade", { n: 1, pad });
  await seen.waitCount("event", 1, 10000); // the tab is busy from now on
  for (let start = 2; start <= count; start += 50) {
    const batch = [];
    for (let n = start; n < Math.min(start + 50, count + 1); n++) batch.push({ channel: "BTC.trade", data: { n, pad } });
    await odin.publish(batch);
  }
  state.published = true;
  await within(odin.waitFor("slow_consumer", 15000), 16000, "the server's slow_consumer line");
  await seen.waitCount("event", count, 60000);
  assert.deepEqual(ns(seen), Array.from({ length: count }, (_, i) => i + 1), "every event once, in order");
  const closes = seen.of("disconnected");
  assert.ok(closes.length >= 1, "the server closed the slow tab");
  for (const gone of closes) assert.ok([1008, 1006].includes(gone.code), `closed ${gone.code} ${gone.reason}`);
  assert.ok(seen.of("recovered").length >= 1 && seen.of("recovered").every((r) => r.recovered));
  const last = seen.of("event").at(-1);
  assert.deepEqual(await page.evaluate(() => window.client.positions.get("BTC.trade")), { epoch: last.epoch, seq: last.seq });
  assert.deepEqual(seen.of("gap"), []);
});
