// The hook's state (a pure reducer): runs, stages, progress, snapshots.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { progressOf, reduce } from '../src/react.js';

const start = reduce(/** @type {any} */ ({}), { type: 'reset' });
const stage = (seq, name, stageStatus) => ({
  type: 'update',
  update: { registrationId: 1, seq, status: 'PENDING', timestamp: seq, message: `${name} ${stageStatus}`, stage: name, stageStatus },
});

test('a run: stages in order, progress by completed stages, 100 when final', () => {
  let state = start;
  state = reduce(state, stage(1, 'duplicate_check', 'started'));
  assert.equal(progressOf(state), 0);
  state = reduce(state, stage(2, 'duplicate_check', 'completed'));
  state = reduce(state, stage(3, 't24_lookup', 'started'));
  assert.equal(progressOf(state), 33);
  assert.deepEqual(state.stages.map((s) => [s.stage, s.status]), [['duplicate_check', 'completed'], ['t24_lookup', 'started']]);
  state = reduce(state, stage(4, 't24_lookup', 'completed'));
  state = reduce(state, stage(5, 'status_update', 'completed'));
  assert.equal(progressOf(state), 99);
  state = reduce(state, { type: 'update', update: { registrationId: 1, seq: 6, status: 'APPROVED', timestamp: 6, message: 'ok', final: true, details: {} } });
  assert.equal(progressOf(state), 100);
  assert.equal(state.status, 'APPROVED');
  assert.equal(state.inProgress, false);
  assert.deepEqual(state.updates.map((u) => u.seq), [1, 2, 3, 4, 5, 6]);
  // the next run starts from a clean slate
  state = reduce(state, stage(7, 'duplicate_check', 'started'));
  assert.deepEqual(state.updates.map((u) => u.seq), [7]);
  assert.deepEqual(state.stages.map((s) => s.stage), ['duplicate_check']);
  assert.equal(progressOf(state), 0);
});

test('a snapshot gives the status and the stages of the latest run', () => {
  const state = reduce(start, {
    type: 'snapshot',
    data: {
      id: 1, seq: 4, status: 'FAILED', inProgress: false, result: { message: 'no', details: {} },
      processLog: [
        { seq: 1, stage: 'duplicate_check', status: 'completed', message: 'ok', timestamp: 1 },
        { seq: 2, stage: 't24_lookup', status: 'failed', message: 'KYC', timestamp: 2 },
        { seq: 3, stage: null, status: 'FAILED', message: 'no', timestamp: 3 },
      ],
    },
  });
  assert.equal(state.status, 'FAILED');
  assert.equal(progressOf(state), 100);
  assert.deepEqual(state.stages.map((s) => [s.stage, s.status]), [['duplicate_check', 'completed'], ['t24_lookup', 'failed']]);
});

test('live again clears the error', () => {
  let state = reduce(start, { type: 'error', error: new Error('lost') });
  state = reduce(state, { type: 'connection', connection: 'reconnecting' });
  assert.equal(state.error.message, 'lost');
  state = reduce(state, { type: 'connection', connection: 'live' });
  assert.equal(state.error, null);
});
