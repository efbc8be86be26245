// Assemble the static site: the page, wllama's module and WebAssembly binary, and the model packages
// that `edgedistill package OUT/T --app web` wrote. Everything the page loads is in the output
// folder, so it runs offline from any static host.
//
//   npm ci && node build.mjs PACKAGE... [--out dist]
//
// A plain copy, not a bundler: the page is one ES module and wllama ships as one (its worker code is
// inlined), so there is nothing to bundle, and the output is exactly the files listed below.

import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const WLLAMA = join(HERE, "node_modules", "@wllama", "wllama");
const PACKAGE_MANIFEST = "edgedistill-package.json";
// wllama's ES module and its single WebAssembly binary (v3 picks threads at run time), with its licence
const VENDOR = [
  ["esm/index.js", "vendor/wllama/index.js"],
  ["esm/wasm/wllama.wasm", "vendor/wllama/wasm/wllama.wasm"],
  ["LICENCE", "vendor/wllama/LICENCE"],
];

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

function parseArgs(argv) {
  const packages = [];
  let out = join(HERE, "dist");
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out") out = resolve(argv[++i] ?? fail("--out needs a folder"));
    else if (argv[i] === "--help" || argv[i] === "-h") {
      console.log("usage: node build.mjs PACKAGE... [--out dist]\n\nPACKAGE: a folder written by "
        + "`edgedistill package OUT/T --app web` (GGUF artifacts; wllama runs llama.cpp).");
      process.exit(0);
    } else if (argv[i].startsWith("-")) fail(`unknown option ${argv[i]}`);
    else packages.push(resolve(argv[i]));
  }
  return { packages, out };
}

// The model folders of one web package: models/<name>/ holding PACKAGE_MANIFEST.
function modelsOf(pkgDir) {
  const root = join(pkgDir, "models");
  if (!existsSync(root)) fail(`${pkgDir} is not a web package (no models/ folder); run edgedistill package OUT/T --app web`);
  const found = [];
  for (const name of readdirSync(root)) {
    const manifestPath = join(root, name, PACKAGE_MANIFEST);
    if (!existsSync(manifestPath)) continue;
    const pkg = JSON.parse(readFileSync(manifestPath, "utf8"));
    if (pkg.runtime !== "llamacpp") {
      fail(`${join(root, name)} holds ${pkg.format}: this page runs GGUF artifacts in wllama; package one with --format gguf-q4_0`);
    }
    found.push({ dir: `models/${name}`, src: join(root, name), name, format: pkg.format, target: pkg.target,
      bytes: pkg.total_bytes });
  }
  if (found.length === 0) fail(`${root} holds no ${PACKAGE_MANIFEST}`);
  return found;
}

function main() {
  const { packages, out } = parseArgs(process.argv.slice(2));
  if (!existsSync(WLLAMA)) fail(`${WLLAMA} is missing: run \`npm ci\` in ${HERE} first`);
  const models = packages.flatMap(modelsOf);
  const names = new Set();
  for (const m of models) {
    if (names.has(m.dir)) fail(`two packages hold ${m.dir}; package them with different --name`);
    names.add(m.dir);
  }

  if (existsSync(out) && readdirSync(out).length > 0 && !existsSync(join(out, "models.json"))) {
    fail(`${out} is not empty and is not a site this script wrote; choose another --out`);
  }
  // build beside the output and rename into place, so a failed build never leaves half a site
  const staging = join(dirname(out), `.${basename(out)}.partial-${process.pid}`);
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(staging, { recursive: true });
  cpSync(join(HERE, "src"), staging, { recursive: true });
  for (const [from, to] of VENDOR) {
    mkdirSync(dirname(join(staging, to)), { recursive: true });
    cpSync(join(WLLAMA, from), join(staging, to));
  }
  for (const m of models) cpSync(m.src, join(staging, m.dir), { recursive: true });
  writeFileSync(join(staging, "models.json"),
    JSON.stringify(models.map(({ src, ...m }) => m), null, 2) + "\n");
  rmSync(out, { recursive: true, force: true });
  renameSync(staging, out);
  console.log(`wrote ${out}: the page, wllama, ${models.length} model(s): ${models.map((m) => m.name).join(", ") || "none"}`);
  console.log(`serve it with: python serve.py ${out}`);
}

main();
