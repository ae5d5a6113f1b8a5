// A subscription through the coordinator (one tab: Node has no Web Locks), with a scripted
// EventSource: de-duplication, a gap re-read from the API, snapshots, and nothing left running
// once the last subscription closes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { configure, createRegistrationUpdates, debugState } from '../src/index.js';

class ScriptedEventSource {
  static opened = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.closed = false;
    ScriptedEventSource.opened.push(this);
  }
  open() {
    this.readyState = 1;
    this.onopen();
  }
  message(data, lastEventId = '') {
    this.onmessage({ data: JSON.stringify(data), lastEventId });
  }
  close() {
    this.closed = true;
  }
}

const reads = [];
configure({
  EventSource: ScriptedEventSource,
  whoAmI: async () => ({ role: 'viewer' }),
  authExpired: async () => false,
  fetchJson: async (path) => {
    reads.push(path);
    return { id: 42, seq: 9, status: 'PENDING', inProgress: true, processLog: [] };
  },
});

async function until(predicate, what) {
  for (let i = 0; i < 500; i++) {
    if (predicate()) return;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const timers = () => process.getActiveResourcesInfo().filter((kind) => kind === 'Timeout').length;

test('updates once each, a gap re-reads the registration, close leaves nothing running', async () => {
  const before = timers();
  const got = { updates: [], snapshots: [], states: [] };
  const sub = createRegistrationUpdates({
    registrationId: 42,
    onUpdate: (u) => got.updates.push(u.seq),
    onSnapshot: (s) => got.snapshots.push(s.resync ? 'resync' : s.data.seq),
    onStateChange: (s) => got.states.push(s),
  });
  await until(() => ScriptedEventSource.opened.length === 1, 'the stream');
  const es = ScriptedEventSource.opened[0];
  assert.equal(es.url, '/api/registrations/updates/stream?registrationId=42');
  assert.equal(debugState().role, 'leader');
  es.open();
  assert.equal(sub.isConnected, true);
  await until(() => reads.length === 1, 'the re-read on going live');
  await until(() => got.snapshots.length === 1, 'the snapshot');
  assert.deepEqual(got.snapshots, [9]); // the page's state, as of seq 9
  const update = (seq) => ({ type: 'update', data: { registrationId: 42, seq, status: 'PENDING', timestamp: Date.now(), message: 'm' } });
  es.message(update(9), '1_1-0'); // already in the snapshot
  es.message(update(10), '1_2-0');
  es.message(update(10), '1_2-0'); // repeated (an overlapping stream)
  es.message(update(13), '1_3-0'); // 11 and 12 were lost
  assert.deepEqual(got.updates, [10, 13]);
  await until(() => reads.length === 2, 'the gap re-read');
  assert.deepEqual(reads, ['/api/registrations/42', '/api/registrations/42']);
  es.message({ type: 'update', data: { registrationId: 7, seq: 1, status: 'PENDING', timestamp: 1, message: 'm' } });
  assert.deepEqual(got.updates, [10, 13]); // not ours

  sub.close();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(es.closed, true);
  assert.equal(debugState().role, 'none');
  assert.deepEqual(debugState().streams, []);
  assert.equal(timers(), before, 'a timer was left running');
  assert.deepEqual(got.states, ['connecting', 'live', 'closed']);
});

test('a close and an open in the same turn (StrictMode) keep the coordinator and its stream', async () => {
  ScriptedEventSource.opened = [];
  const first = createRegistrationUpdates({ registrationId: 5 });
  first.close();
  const second = createRegistrationUpdates({ registrationId: 5 });
  await until(() => ScriptedEventSource.opened.length >= 1, 'the stream');
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(ScriptedEventSource.opened.length, 1);
  assert.deepEqual(debugState().streams, ['5']);
  second.close();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(debugState().role, 'none');
});
