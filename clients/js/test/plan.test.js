import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ALL, MAX_TICKET_STREAMS, idsOfStreamKey, planStreams } from '../src/plan.js';

const base = { unfilteredAllowed: false, signedIn: true, maxIds: 3 };

test('no registrations wanted: no stream', () => {
  assert.deepEqual(planStreams({ ...base, keys: [] }), { streams: [], unserved: [] });
});

test('one stream with every wanted registration, sorted, for a non-admin', () => {
  assert.deepEqual(planStreams({ ...base, keys: ['12', '3', '7', '3'] }), { streams: ['3,7,12'], unserved: [] });
});

test('past the server limit the rest is polled', () => {
  assert.deepEqual(planStreams({ ...base, keys: ['1', '2', '3', '4', '5'] }), { streams: ['1,2,3'], unserved: ['4', '5'] });
});

test('a non-admin following every registration polls it', () => {
  assert.deepEqual(planStreams({ ...base, keys: [ALL, '5'] }), { streams: ['5'], unserved: [ALL] });
});

test('an admin holds the one unfiltered stream', () => {
  assert.deepEqual(planStreams({ ...base, unfilteredAllowed: true, keys: ['5'] }), { streams: [ALL], unserved: [] });
});

test('no sign-in on the server: filtered streams until every registration is wanted', () => {
  const open = { ...base, unfilteredAllowed: true, signedIn: false };
  assert.deepEqual(planStreams({ ...open, keys: ['5', '6'] }), { streams: ['5,6'], unserved: [] });
  assert.deepEqual(planStreams({ ...open, keys: ['5', ALL] }), { streams: [ALL], unserved: [] });
  assert.deepEqual(planStreams({ ...open, keys: ['1', '2', '3', '4'] }), { streams: [ALL], unserved: [] });
});

test('invalid keys are ignored', () => {
  assert.deepEqual(planStreams({ ...base, keys: ['0', '-1', 'x', '1.5', '9'] }), { streams: ['9'], unserved: [] });
});

test('stream tickets: one stream per registration, a few at most', () => {
  const keys = ['1', '2', '3', '4', '5', '6'];
  const plan = planStreams({ ...base, maxIds: 200, singleOnly: true, keys });
  assert.deepEqual(plan.streams, keys.slice(0, MAX_TICKET_STREAMS));
  assert.deepEqual(plan.unserved, keys.slice(MAX_TICKET_STREAMS));
});

test('the registrations a stream key carries', () => {
  assert.equal(idsOfStreamKey(ALL), null);
  assert.deepEqual([...idsOfStreamKey('3,7,12')], ['3', '7', '12']);
});
