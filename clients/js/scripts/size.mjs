// Prints the size budget: the core client (src/index.js and what it imports) and the React hook
// on top of it, each bundled by esbuild --minify and gzipped (zlib, level 9). React is the app's,
// not ours (external). `--json` prints the numbers for tests; exit status 1 over the budget.
//   budget: core <= 10 KB, the hook <= 2 KB more
import { gzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

export const CORE_BUDGET = 10 * 1024;
export const HOOK_BUDGET = 2 * 1024;
const root = fileURLToPath(new URL('..', import.meta.url));

async function gzipped(entry) {
  const result = await build({
    entryPoints: [`${root}${entry}`],
    bundle: true,
    minify: true,
    format: 'esm',
    target: 'es2022',
    external: ['react'],
    write: false,
    logLevel: 'silent',
  });
  const code = result.outputFiles[0].contents;
  return { min: code.length, gz: gzipSync(code, { level: 9 }).length };
}

const core = await gzipped('src/index.js');
const withHook = await gzipped('src/react.js');
const hook = { min: withHook.min - core.min, gz: withHook.gz - core.gz };
const ok = core.gz <= CORE_BUDGET && hook.gz <= HOOK_BUDGET;
if (process.argv.includes('--json')) {
  console.log(JSON.stringify({ core, hook, withHook, budget: { core: CORE_BUDGET, hook: HOOK_BUDGET }, ok }));
} else {
  const kb = (n) => `${(n / 1024).toFixed(2)} KB`;
  console.log(`core:        ${kb(core.gz)} min+gz (${kb(core.min)} min)   budget ${kb(CORE_BUDGET)}`);
  console.log(`react hook: +${kb(hook.gz)} min+gz (+${kb(hook.min)} min)   budget ${kb(HOOK_BUDGET)}`);
  console.log(ok ? 'within budget' : 'OVER BUDGET');
}
process.exit(ok ? 0 : 1);
