// docs/clients.md's JavaScript examples (the ```js blocks after <!-- js-example -->) work as
// printed: each runs in a Node process of its own against a real server (the URL replaced,
// `./odin-client.js` and the package name resolving to this package, a browser example given
// the ws package's WebSocket as the global one), and prints the events published.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Recorder, ROOT, startOdin } from "./odin-server.js";

const HERE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const DOC = path.join(ROOT, "docs/clients.md");
const ADDRESS = "ws://127.0.0.1:3002/ws";

function examples() {
  const text = readFileSync(DOC, "utf8");
  const found = [];
  const marked = /^<!-- js-example -->\n```js\n([\s\S]*?)^```/gm;
  for (const match of text.matchAll(marked)) {
    found.push({ code: match[1], line: text.slice(0, match.index).split("\n").length + 2 });
  }
  return found;
}

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

test("docs/clients.md has JavaScript examples for the browser and for Node", () => {
  const found = examples();
  assert.ok(found.length >= 2, `found ${found.length} marked examples`);
  assert.ok(found.some((e) => e.code.includes('from "./odin-client.js"')), "a browser example");
  assert.ok(found.some((e) => e.code.includes('from "ws"')), "a Node example");
  for (const example of found) assert.ok(example.code.includes(ADDRESS), `line ${example.line}: points at ${ADDRESS}`);
});

for (const example of examples()) {
  test(`the example at docs/clients.md line ${example.line} works`, async () => {
    const odin = await startOdin();
    cleanups.push(() => odin.kill());
    // Inside the package, so that "odin-client" and "ws" resolve as they do for a user.
    const dir = mkdtempSync(path.join(HERE, ".examples-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    let code = example.code.replaceAll(ADDRESS, odin.wsUrl).replace('from "./odin-client.js"', 'from "odin-client"');
    const browser = !code.includes('from "ws"');
    if (browser) code = `import { WebSocket as NodeWebSocket } from "ws";\nglobalThis.WebSocket ??= NodeWebSocket;\n${code}`;
    const file = path.join(dir, "example.mjs");
    writeFileSync(file, code);
    const child = spawn(process.execPath, [file], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
    cleanups.push(() => child.exitCode === null && child.kill("SIGKILL"));
    const lines = new Recorder();
    let stderr = "";
    child.stderr.on("data", (chunk) => (stderr += chunk));
    let buffer = "";
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      buffer += chunk;
      const parts = buffer.split("\n");
      buffer = parts.pop();
      for (const line of parts) lines.push({ kind: "line", line });
    });
    const exited = new Promise((resolve) => child.on("exit", (status, signal) => resolve(status ?? signal)));

    // Once the server has taken the example's subscription, an event published reaches it.
    try {
      await odin.waitFor("subscribe", 20000);
      await odin.publish("BTC.trade", { price: 97012 });
      await lines.wait((items) => items.find((i) => /^BTC\.trade \d+ \d+ \{"price":97012\}$/.test(i.line)), 10000, "the event's line");
    } catch (error) {
      throw new Error(`${error.message}\nstdout: ${lines.items.map((i) => i.line).join("\n")}\nstderr: ${stderr}`);
    }
    child.kill("SIGINT");
    const status = await Promise.race([exited, new Promise((resolve) => setTimeout(() => resolve("still running"), 10000))]);
    assert.ok(status === 0 || status === "SIGINT", `the example ended with ${status}: ${stderr}`);
    assert.equal(stderr, "");
  });
}
