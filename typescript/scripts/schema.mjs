// The generated API types: `src/schema.d.ts`, made by openapi-typescript from ../docs/openapi.json.
//
//   node scripts/schema.mjs generate   rewrite src/schema.d.ts            (npm run generate)
//   node scripts/schema.mjs check      regenerate into a temporary file and fail if it differs from
//                                      src/schema.d.ts: docs/openapi.json changed without a regeneration
//                                      (npm run check:schema)
//   node scripts/schema.mjs copy       put src/schema.d.ts beside the compiled declarations in dist/src
//                                      (tsc does not emit .d.ts inputs; part of npm run build)
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
// FORKD_OPENAPI: another copy of the contract (e.g. `git show HEAD:docs/openapi.json`), to compare against
const spec = process.env.FORKD_OPENAPI || join(root, "..", "docs", "openapi.json");
const committed = join(root, "src", "schema.d.ts");
const cli = join(root, "node_modules", "openapi-typescript", "bin", "cli.js");
// --default-non-nullable=false: a field with a default is optional, in requests as in answers
const FLAGS = ["--default-non-nullable=false"];

function generate(out) {
  execFileSync(process.execPath, [cli, spec, ...FLAGS, "--output", out], { cwd: root, stdio: ["ignore", "ignore", "inherit"] });
}

const verb = process.argv[2];
if (verb === "generate") {
  generate(committed);
} else if (verb === "check") {
  const dir = mkdtempSync(join(tmpdir(), "forkd-schema-"));
  try {
    const fresh = join(dir, "schema.d.ts");
    generate(fresh);
    if (readFileSync(fresh, "utf8") !== readFileSync(committed, "utf8")) {
      console.error("typescript/src/schema.d.ts is out of date with docs/openapi.json: run `npm run generate` " +
                    "in typescript/ (then fix what `tsc --noEmit` reports)");
      process.exit(1);
    }
    console.log("typescript/src/schema.d.ts matches docs/openapi.json");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
} else if (verb === "copy") {
  mkdirSync(join(root, "dist", "src"), { recursive: true });
  copyFileSync(committed, join(root, "dist", "src", "schema.d.ts"));
} else {
  console.error("usage: node scripts/schema.mjs generate|check|copy");
  process.exit(2);
}
