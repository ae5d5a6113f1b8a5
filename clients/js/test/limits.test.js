import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { renderLimits } from '../scripts/gen-wire.mjs';

test('src/limits.js is generated from the current schema (npm run schema)', () => {
  const schema = JSON.parse(readFileSync(new URL('../schema/stream.json', import.meta.url), 'utf8'));
  const current = readFileSync(new URL('../src/limits.js', import.meta.url), 'utf8');
  assert.equal(current, renderLimits(schema));
});
