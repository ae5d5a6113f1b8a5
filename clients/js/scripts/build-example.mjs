// Bundles examples/react (StrictMode app of the hook) with esbuild into examples/react/dist/:
// index.html, app.css and app.js. tests/browser/test_react_example.py serves that folder from the
// service's origin and drives it in Chromium.
import { copyFileSync, mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = fileURLToPath(new URL('../examples/react/', import.meta.url));
const out = `${here}dist/`;
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [`${here}main.tsx`],
  bundle: true,
  format: 'esm',
  target: 'es2022',
  minify: true,
  sourcemap: true,
  jsx: 'automatic',
  define: { 'process.env.NODE_ENV': '"development"' }, // React's checks on (StrictMode's double effects)
  outfile: `${out}app.js`,
  logLevel: 'warning',
});
for (const name of ['index.html', 'app.css']) copyFileSync(`${here}${name}`, `${out}${name}`);
console.log(`built ${out}`);
