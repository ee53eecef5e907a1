// The checked-in types/odin-client.d.ts is what tsc generates from the JSDoc of
// src/odin-client.js today, and code written against the documented API type-checks.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const HERE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const TSC = path.join(HERE, "node_modules/typescript/bin/tsc");

function tsc(...args) {
  try {
    return execFileSync(process.execPath, [TSC, ...args], { cwd: HERE, encoding: "utf8", timeout: 120000 });
  } catch (error) {
    assert.fail(`tsc ${args.join(" ")} failed:\n${error.stdout}${error.stderr}`);
  }
}

test("types/odin-client.d.ts is up to date (npm run types regenerates it)", () => {
  const out = mkdtempSync(path.join(tmpdir(), "odin-types-"));
  try {
    tsc("-p", "tsconfig.json", "--outDir", out);
    const fresh = readFileSync(path.join(out, "odin-client.d.ts"), "utf8");
    const checkedIn = readFileSync(path.join(HERE, "types/odin-client.d.ts"), "utf8");
    assert.ok(fresh === checkedIn, "types/odin-client.d.ts differs from a fresh generation: run `npm run types` in clients/js");
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("code using the documented API type-checks against the declarations", () => {
  const dir = mkdtempSync(path.join(HERE, ".types-check-"));
  try {
    writeFileSync(
      path.join(dir, "use.ts"),
      `import { connect, type OdinEvent, type Position } from "../types/odin-client.js";
const client = connect("ws://127.0.0.1:3002/ws", {
  token: async () => "jwt", minDelay: 250, maxDelay: 10000, replayGaps: true, heartbeat: 25000,
});
client.on("connected", ({ connectionId, hello }) => console.log(connectionId.length, hello));
client.on("disconnected", ({ code, reason, willReconnect, delay }) => console.log(code + delay, reason, willReconnect));
client.on("gap", ({ channel, from, to, reason }) => console.log(channel, from + to, reason));
client.on("recovered", ({ channel, recovered, count, reason }) => console.log(channel, recovered, count, reason));
client.on("error", ({ code, message }) => console.log(code, message));
client.on("token", ({ sub, expiresAt }) => console.log(sub, expiresAt));
const sub = client.subscribe("BTC.*", (event: OdinEvent) => console.log(event.seq - event.prev, event.data));
const channels: string[] = sub.channels;
sub.unsubscribe();
client.unsubscribe("BTC.*");
const position: Position | undefined = client.positions.get("BTC.trade");
const up: boolean = client.connected;
client.ready().then(() => client.close());
console.log(channels, position, up);
// @ts-expect-error: not an event of the client
client.on("nope", () => {});
`,
    );
    tsc("--noEmit", "--strict", "--target", "ES2022", "--module", "ES2022", "--moduleResolution", "bundler", "--lib", "ES2022,DOM", path.join(dir, "use.ts"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
