// Parse LogQL queries with Grafana's own grammar (@grafana/lezer-logql, what Grafana's
// query editor uses): reads a JSON list of queries on stdin, prints each one that does not
// parse with where, and exits 1 if any did not. Node resolves the package from NODE_PATH.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH ?? ".", "noop.js"));
const { parser } = require("@grafana/lezer-logql");

const queries = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const query of queries) {
  const tree = parser.parse(query);
  const errors = [];
  tree.iterate({
    enter(node) {
      if (node.type.isError) errors.push(node.from);
    },
  });
  if (errors.length) {
    failed += 1;
    const at = errors[0];
    console.log(`does not parse at ${at}: ${query.slice(0, at)} >>> ${query.slice(at)}`);
  }
}
console.log(`${queries.length - failed} of ${queries.length} queries parse`);
process.exit(failed ? 1 : 0);
