// Checks the package's wire types against the service's published schema: json-schema-to-
// typescript turns schema/stream.json into TypeScript (.check/stream-schema.ts), then tsc
// compiles test/schema-types.ts, which asserts that each generated type and the package's type
// of the same name are assignable to each other (both ways). Exit status 1 when they disagree.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { compile } from 'json-schema-to-typescript';

const root = fileURLToPath(new URL('..', import.meta.url));
const schema = JSON.parse(readFileSync(`${root}schema/stream.json`, 'utf8'));
delete schema['x-regstream'];
const ts = await compile(schema, 'StreamFrame', {
  bannerComment: '// Generated from schema/stream.json by scripts/check-schema.mjs: do not edit.',
  additionalProperties: false,
  unreachableDefinitions: true,
  format: false,
});
mkdirSync(`${root}.check`, { recursive: true });
writeFileSync(`${root}.check/stream-schema.ts`, ts);
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
const result = spawnSync(process.execPath, [tsc, '-p', `${root}test/schema/tsconfig.json`], { stdio: 'inherit' });
if (result.status !== 0) {
  console.error('the package types (src/wire.js) and schema/stream.json disagree (see above)');
  process.exit(1);
}
console.log('wire types agree with schema/stream.json');
