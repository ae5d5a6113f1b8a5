import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RecentUpdates, SeqTracker } from '../src/sequence.js';
import { laterId, parseEventId, positionOf } from '../src/event-ids.js';

test('updates in order are applied, repeats dropped, a jump is a gap', () => {
  const seqs = new SeqTracker();
  assert.equal(seqs.accept(7, 4), 'apply'); // the first seen: nothing to compare with
  assert.equal(seqs.accept(7, 5), 'apply');
  assert.equal(seqs.accept(7, 5), 'repeat');
  assert.equal(seqs.accept(7, 3), 'repeat');
  assert.equal(seqs.accept(7, 8), 'gap');
  assert.equal(seqs.accept(7, 9), 'apply');
  assert.equal(seqs.accept(8, 1), 'apply'); // per registration
});

test('a seq read from the API raises what is known, never lowers it', () => {
  const seqs = new SeqTracker();
  seqs.raise(1, 5);
  assert.equal(seqs.accept(1, 5), 'repeat');
  seqs.raise(1, 2);
  assert.equal(seqs.get(1), 5);
  assert.equal(seqs.accept(1, 6), 'apply');
});

test('the leader forgets the oldest half past its bound', () => {
  const recent = new RecentUpdates(4);
  for (let seq = 1; seq <= 5; seq++) assert.equal(recent.isRepeat(1, seq), false);
  assert.equal(recent.isRepeat(1, 5), true);
  assert.equal(recent.seen.size <= 4, true);
  assert.equal(recent.isRepeat(1, 1), false); // forgotten
});

test('event ids: positions, comparison within an epoch', () => {
  assert.equal(positionOf('17_1700000000000-3~9'), '17_1700000000000-3');
  assert.deepEqual(parseEventId('17_1700000000000-3'), { epoch: '17', ms: 1700000000000, n: 3 });
  assert.equal(parseEventId('nonsense'), null);
  assert.equal(laterId('1_10-2', '1_10-1'), '1_10-2');
  assert.equal(laterId('1_9-5', '1_10-0'), '1_10-0');
  assert.equal(laterId('1_10-2', '2_1-0'), '2_1-0'); // another epoch: the newer one wins
  assert.equal(laterId(null, '1_1-1'), '1_1-1');
});
