import { test } from 'node:test';
import assert from 'node:assert/strict';
import { coverageOf, coverageOfKey } from '../src/coverage.js';

test('a registration is live when an open stream carries it', () => {
  const held = { states: { '3,7': 'open', 9: 'connecting' }, unserved: ['11'] };
  assert.equal(coverageOfKey(held, '7'), 'live');
  assert.equal(coverageOfKey(held, '9'), 'switching');
  assert.equal(coverageOfKey(held, '11'), 'polling');
  assert.equal(coverageOfKey(held, '12'), 'down');
  assert.equal(coverageOfKey({ states: { '*': 'open' }, unserved: [] }, '12'), 'live');
  assert.equal(coverageOfKey({ states: { '3,7': 'reconnecting' }, unserved: [] }, '3'), 'down');
});

test('a subscription has the worst coverage of its registrations', () => {
  const held = { states: { '3,7': 'open' }, unserved: ['11'] };
  assert.equal(coverageOf(held, ['3', '7'], 0), 'live');
  assert.equal(coverageOf(held, ['3', '11'], 0), 'polling');
  assert.equal(coverageOf(held, ['3', '12'], 0), 'down');
});

test('while it switches to other registrations, down reads switching', () => {
  const held = { states: { '3,7': 'open' }, unserved: [] };
  assert.equal(coverageOf(held, ['3', '12'], 2000, 1000), 'switching');
  assert.equal(coverageOf(held, ['3', '12'], 2000, 2000), 'down');
});
