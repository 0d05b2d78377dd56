// Runs a wasm32-wasip1 program in Node's V8 (the engine Envoy's wasm runtime uses).
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
const wasi = new WASI({ version: 'preview1', args: [], env: {} });
const wasm = await WebAssembly.compile(await readFile(process.argv[2]));
wasi.start(await WebAssembly.instantiate(wasm, wasi.getImportObject()));
