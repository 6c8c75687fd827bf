// Builds one JavaScript policy into a WebAssembly component with
// componentize-js, called as a library: `jco componentize` failed on our
// machines ("failed to get path metadata") where this works.
//
//   node componentize.mjs SOURCE.js WIT_DIR OUT.wasm
//
// Run from the directory holding node_modules (port-range/build.sh copies it
// there). `http` and `fetch-event` are disabled: they make the component
// import wasi:http, which the executor does not grant, so it would fail to
// load. stdio (for error messages), random and clocks stay: the executor
// grants them, deterministic.
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";
import { resolve } from "node:path";

const [source, wit, out] = process.argv.slice(2);
if (!source || !wit || !out) {
  console.error("usage: node componentize.mjs SOURCE.js WIT_DIR OUT.wasm");
  process.exit(2);
}
const { component } = await componentize({
  sourcePath: resolve(source),
  witPath: resolve(wit),
  worldName: "policy",
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);
